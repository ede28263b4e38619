"""A memory worth having (issue "A memory worth having", item 1): the cases the deployed ECRM memory is written from are
chosen by a stated, seeded policy (``monai_ecrm.data.select_memory_cases``), not by file order, and the model record
says which policy, which seed and which cases.

The policies are tested on synthetic datalists (no file is read); ``case_prototypes`` on the tiny engine network; the
bundle by one short training run on two demo datasets listed one after the other (as the PraNet list puts Kvasir-SEG
before CVC-ClinicDB).
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_fixtures import items as tensor_items
from engine_fixtures import tiny_net
from monai.utils import set_determinism
from test_model_files import BUNDLE, TINY, error_lines, ok, run_bundle

from monai_ecrm.data import (
    MEMORY_POLICIES,
    kcenter_greedy,
    make_demo_dataset,
    memory_group,
    select_memory_cases,
    stratified_allocation,
    with_case_index,
)
from monai_ecrm.handlers import refresh_memory
from monai_ecrm.handlers.case_names import case_names
from monai_ecrm.handlers.memory_refresh import case_prototypes
from monai_ecrm.handlers.model_record import selection_record
from monai_ecrm.record import read_record


def _datalist(sizes: dict[str, int], root: str = "/data") -> list[dict]:
    """Indexed items of several datasets in the ``<root>/<dataset>/images/<file>`` layout, dataset after dataset."""
    listed = [
        {"image": f"{root}/{name}/images/{name}_{i:04d}.png", "label": f"{root}/{name}/masks/{name}_{i:04d}.png"}
        for name, size in sizes.items()
        for i in range(size)
    ]
    return with_case_index(listed)


PRANET_LIKE = {"kvasir_seg": 815, "cvc_clinicdb": 490}


def _indices(chosen: list[dict]) -> list[int]:
    return [item["case_index"] for item in chosen]


# ---------------------------------------------------------------------------------------------- the policies
@pytest.mark.parametrize("policy", ["random", "stratified"])
def test_a_seed_gives_the_same_cases_and_another_seed_other_cases(policy):
    data = _datalist(PRANET_LIKE)
    state = (random.getstate(), torch.get_rng_state())
    first = _indices(select_memory_cases(data, 20, policy, seed=0))
    assert _indices(select_memory_cases(list(data), 20, policy, seed=0)) == first, "same list and seed: same cases"
    assert first == sorted(first) and len(set(first)) == 20, "in list order, no case twice"
    assert _indices(select_memory_cases(data, 20, policy, seed=1)) != first, "another seed draws other cases"
    # a relocated copy of the data (other absolute paths) is the same choice: only order and datasets count
    assert _indices(select_memory_cases(_datalist(PRANET_LIKE, "/elsewhere/x"), 20, policy, seed=0)) == first
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1]), "global state untouched"


def test_the_stratified_draw_is_pinned_whatever_the_machine():
    """The exact cases for a fixed list and seed (Python's ``random.Random``, exact rational shares): a change here
    changes the memory of every model trained with the defaults."""
    chosen = _indices(select_memory_cases(_datalist(PRANET_LIKE), 20, "stratified", seed=0))
    assert chosen == [
        41, 265, 310, 366, 394, 414, 430, 488, 497, 523, 776, 802,
        886, 926, 959, 1073, 1113, 1201, 1271, 1279,
    ]  # fmt: skip


def test_first_is_the_first_n_items():
    data = _datalist(PRANET_LIKE)
    assert select_memory_cases(data, 20, "first") == data[:20]
    assert select_memory_cases(data, 20, "first", seed=5) == data[:20], "first draws nothing"
    assert {memory_group(item) for item in data[:20]} == {"kvasir_seg"}, "file order: no CVC-ClinicDB case"


def test_stratified_takes_every_dataset_in_proportion():
    data = _datalist(PRANET_LIKE)
    counts = Counter(memory_group(item) for item in select_memory_cases(data, 20, "stratified", seed=3))
    assert counts == {"kvasir_seg": 12, "cvc_clinicdb": 8}, "quotas 12.49 and 7.51"

    three = _datalist({"a": 600, "b": 300, "c": 5})  # "c" would get 0.11 of 20 slots: it gets one
    for seed in range(5):
        counts = Counter(memory_group(item) for item in select_memory_cases(three, 20, "stratified", seed=seed))
        assert counts == {"a": 13, "b": 6, "c": 1}

    # the item's "dataset" key comes before the folder; group_key names another key or a function
    mixed = [{**item, "dataset": "site_a" if item["case_index"] % 2 else "site_b"} for item in _datalist({"x": 10})]
    by_dataset = select_memory_cases(mixed, 4, "stratified")
    assert Counter(item["dataset"] for item in by_dataset) == {"site_a": 2, "site_b": 2}
    by_key = select_memory_cases(mixed, 4, "stratified", group_key="dataset")
    assert Counter(item["dataset"] for item in by_key) == {"site_a": 2, "site_b": 2}
    halves = select_memory_cases(mixed, 4, "stratified", group_key=lambda item: item["case_index"] < 8)
    assert Counter(item["case_index"] < 8 for item in halves) == {True: 3, False: 1}


def test_the_rounding_rule():
    assert stratified_allocation([815, 490], 20) == [12, 8]
    assert stratified_allocation([6, 4], 4) == [2, 2]  # 2.4 and 1.6: the larger remainder takes the spare slot
    assert stratified_allocation([5, 5], 3) == [2, 1]  # equal remainders and sizes: the group listed first
    assert stratified_allocation([100, 100, 1], 3) == [1, 1, 1]  # at least one per group
    assert stratified_allocation([5, 3, 1], 2) == [1, 1, 0]  # fewer slots than groups: the largest groups
    assert stratified_allocation([3, 2], 10) == [3, 2]  # more slots than items: every item
    for sizes in ([7, 1, 1], [50, 30, 20, 1, 1], [2, 2, 2, 2], [1000, 3]):
        for slots in range(len(sizes), sum(sizes)):
            counts = stratified_allocation(sizes, slots)
            assert sum(counts) == slots and all(1 <= c <= s for c, s in zip(counts, sizes)), (sizes, slots, counts)


def test_kcenter_picks_one_case_per_cluster():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator) * 20
    cluster = torch.arange(100) % 5
    features = centers[cluster] + torch.randn(100, 16, generator=generator)
    data = _datalist({"train": 100})
    for seed in range(4):
        chosen = select_memory_cases(data, 5, "kcenter", seed=seed, features=features)
        assert sorted(int(cluster[i]) for i in _indices(chosen)) == [0, 1, 2, 3, 4], f"seed {seed}"
        assert _indices(chosen) == sorted(_indices(chosen))
    assert kcenter_greedy(features, 5, seed=2) == kcenter_greedy(features.double().numpy(), 5, seed=2)
    assert kcenter_greedy(features, 5, seed=2)[0] != kcenter_greedy(features, 5, seed=3)[0], "the seed picks the first"
    # a case without a prototype (NaN row) is never chosen
    holed = features.clone()
    holed[7] = float("nan")
    assert 7 not in kcenter_greedy(holed, 99, seed=0) and len(kcenter_greedy(holed, 99, seed=0)) == 99


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([{"image": "/d/a/images/1.png"}], 1), {"policy": "best"}, "policy must be one of"),
        (([{"image": "/d/a/images/1.png"}], 0), {}, "num_cases must be an integer >= 1"),
        (([{"image": "/d/a/images/1.png"}], -3), {}, "num_cases must be an integer >= 1"),
        (([{"image": "/d/a/images/1.png"}], 2.5), {}, "num_cases must be an integer >= 1"),
        (([{"image": "/d/a/images/1.png"}], True), {}, "num_cases must be an integer >= 1"),
        (([], 4), {}, "no items"),
        (("/d/a/images/1.png", 4), {}, "items must be a list"),
        (([{"image": "/d/a/images/1.png"}], 1), {"seed": None}, "seed must be an integer"),
        (([{"image": "/d/a/images/1.png"}], 1), {"policy": "kcenter"}, "needs features"),
        (([{"image": "/d/a/images/1.png"}] * 3, 1), {"policy": "kcenter", "features": torch.zeros(2, 4)}, "2 feature"),
        (([{"label": "x"}, {"label": "y"}], 1), {}, "neither a 'dataset' nor an image path"),
        (([{"image": "/d/a/images/1.png"}] * 2, 1), {"group_key": "site"}, "no group key 'site'"),
    ],
)
def test_bad_arguments_are_one_clear_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_memory_cases(*args, **kwargs)


def test_a_memory_larger_than_the_list_takes_every_item():
    data = _datalist({"a": 3, "b": 2})
    for policy in ("first", "random", "stratified"):
        assert select_memory_cases(data, 5, policy) == data and select_memory_cases(data, 9, policy) == data
    assert set(MEMORY_POLICIES) == {"first", "random", "stratified", "kcenter"}


# ------------------------------------------------------------------------------------------ per-case prototypes
def test_case_prototypes_are_what_the_refresh_writes_and_change_nothing():
    set_determinism(seed=0)
    net = tiny_net(bank_size=6)
    data = tensor_items(6, seed=1)
    refresh_memory(net, data[:2])  # something in the memory that must stay
    before = {key: value.clone() for key, value in net.state_dict().items()}
    net.train()

    features = case_prototypes(net, data)

    bank = net.ecrm.memory
    assert features.shape == (6, bank.num_classes * bank.channels) and features.dtype == torch.float32
    after = net.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items()), "memory and weights untouched"
    assert all(module.training for module in net.modules()) and "enqueue" not in vars(bank)
    refresh_memory(net, data)
    torch.testing.assert_close(features, bank.slots().flatten(1), atol=1e-6, rtol=0)
    set_determinism(seed=None)


def test_case_prototypes_leave_a_case_without_a_polyp_out_of_kcenter():
    set_determinism(seed=0)
    net = tiny_net(prototypes="label", background_tokens=False)
    data = tensor_items(5, seed=2)
    data[2]["label"] = torch.zeros_like(data[2]["label"])  # no polyp: label prototypes write nothing for it
    features = case_prototypes(net, data)
    assert torch.isnan(features[2]).all() and torch.isfinite(features[[0, 1, 3, 4]]).all()
    assert 2 not in kcenter_greedy(features, 4, seed=0)
    set_determinism(seed=None)


def test_the_record_names_the_selection_as_the_memory_names_its_cases():
    training = [{"image": f"/d/{name}/images/{i}.png"} for name in ("kvasir_seg", "cvc_clinicdb") for i in range(3)]
    chosen = select_memory_cases(with_case_index(training), 2, "stratified", seed=4)
    entry = selection_record({"policy": "stratified", "seed": 4, "cases": chosen}, {"training": training})
    table = case_names(training)
    assert entry == {"policy": "stratified", "seed": 4, "cases": [table[item["case_index"]] for item in chosen]}
    assert [name.split("/")[0] for name in entry["cases"]] == ["kvasir_seg", "cvc_clinicdb"]
    assert selection_record({"policy": "first", "seed": 4, "cases": ["a.png"]})["seed"] is None
    with pytest.raises(ValueError, match="policy must be one of"):
        selection_record({"policy": "newest", "seed": 0, "cases": []})


# ------------------------------------------------------------------------------------------------- the bundle
def _two_datasets(base: Path) -> Path:
    """A datalist JSON over two demo sets, Kvasir-like first: 6 + 4 training and 2 + 2 validation pairs."""
    make_demo_dataset(base / "kvasir_seg", num_images=8, size=64, seed=0)
    make_demo_dataset(base / "cvc_clinicdb", num_images=6, size=64, seed=1)

    def pairs(name: str, numbers: range) -> list[dict[str, str]]:
        return [
            {"image": f"{name}/images/synthetic_{i:03d}.png", "label": f"{name}/masks/synthetic_{i:03d}.png"}
            for i in numbers
        ]

    listed = {
        "training": pairs("kvasir_seg", range(6)) + pairs("cvc_clinicdb", range(4)),
        "validation": pairs("kvasir_seg", range(6, 8)) + pairs("cvc_clinicdb", range(4, 6)),
    }
    assert all((base / item["image"]).is_file() for item in listed["training"] + listed["validation"])
    path = base / "datalist.json"
    path.write_text(json.dumps(listed, indent=1))
    return path


def test_the_bundle_writes_and_records_a_stratified_memory(tmp_path):
    root = tmp_path / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    datalist = _two_datasets(tmp_path / "data")

    # kcenter needs a trained network's features: the bundle says so in one line, before any training
    refused = run_bundle(root, ["train.json"], "--dataset_dir", str(datalist), "--memory_policy", "kcenter", *TINY)
    assert refused.returncode != 0 and not (root / "models" / "model.pt").exists()
    assert len(error_lines(refused)) == 1 and "kcenter" in error_lines(refused)[0], refused.stderr[-2000:]

    ok(run_bundle(root, ["train.json"], "--max_epochs", "1", "--dataset_dir", str(datalist), *TINY))

    record = read_record(root / "models" / "model.pt")
    selection = record["memory"]["selection"]
    assert selection["policy"] == "stratified" and selection["seed"] == 0  # train.json's defaults: seed = @seed
    cases = selection["cases"]
    assert Counter(name.split("/")[0] for name in cases) == {"kvasir_seg": 2, "cvc_clinicdb": 2}, cases
    first = json.loads(datalist.read_text())["training"][:4]
    assert all(item["image"].startswith("kvasir_seg/") for item in first), "'first' would have taken Kvasir only"
    # the memory saved with model.pt was written from exactly those cases (validation refreshes it before scoring)
    filled = record["memory"]["filled"]
    assert filled == 4 and sorted(record["memory"]["sources"][:filled]) == sorted(cases)
