"""benchmarks/memory_content.py's core on a tiny random ECRMUNet and a tiny SYNTHETIC set laid out like ../shared/data.

Needs nothing from ../shared: the real run (the shared models on the PraNet split) is the benchmark itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_ecrm.data import make_demo_dataset, pranet_datalist
from monai_ecrm.networks.nets import ECRMUNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_content as mc  # noqa: E402


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two synthetic 'datasets' of 10 pairs each with PraNet-style id lists: 8 train + 2 test per dataset."""
    root = tmp_path_factory.mktemp("memory_content") / "data"
    (root / "pranet_split").mkdir(parents=True)
    for seed, (folder, name) in enumerate((("kvasir_seg", "kvasir"), ("cvc_clinicdb", "clinicdb"))):
        demo = make_demo_dataset(root / folder, num_images=10, size=48, seed=seed)
        ids = sorted(path.stem for path in (demo / "images").iterdir())
        (root / "pranet_split" / f"train_{name}.txt").write_text("\n".join(ids[:8]) + "\n")
        (root / "pranet_split" / f"test_{name}.txt").write_text("\n".join(ids[8:]) + "\n")
    return pranet_datalist(root, val_fraction=0.25)


def test_memories_are_scored_and_summarised(datalist: dict) -> None:
    torch.manual_seed(0)
    net = ECRMUNet(
        backbone="resnet10",
        bank_size=3,
        ecrm_channels=16,
        key_channels=8,
        decoder_channels=(16,) * 5,
        memory_stride=16,
        prototypes="label",
        background_tokens=True,
        supervise_attention=True,
    ).eval()
    scorer = mc.Scorer(64, "imagenet")
    bank = net.ecrm.memory.num_slots
    shipped = datalist["training"][:bank]  # the "shipped" memory: the first training items, as the shared models'
    scorer.write(net, {"cases": shipped, "masks_of": shipped})
    sets = mc.evaluation_sets(datalist)
    assert {name: len(items) for name, items in sets.items()} == {"kvasir": 2, "clinicdb": 2, "validation": 4}
    memories = mc.draw_memories(datalist["training"], [mc.case_id(i) for i in shipped], bank, draws=2, seed=0)
    for spec in memories["shuffled_labels"]:  # every case written with another case's mask
        assert all(mc.case_id(c) != mc.case_id(m) for c, m in zip(spec["cases"], spec["masks_of"]))
    assert all(mc.dataset_of(c) == "clinicdb" for spec in memories["clinicdb_random"] for c in spec["cases"])
    saved: dict[str, dict] = {}
    before = {k: v.clone() for k, v in net.ecrm.memory.state_dict().items()}
    results = mc.run_model(net, sets, memories, scorer, saved.get, saved.__setitem__)
    assert all(torch.equal(before[k], v) for k, v in net.ecrm.memory.state_dict().items())  # net left as it was
    assert [len(results[c]) for c in mc.SCORED] == [1, 1, 1, 2, 2, 2]
    assert len(saved) == 9 and "probs" in saved["as_shipped-0"]
    # a rerun takes every unit from the store: no forward pass (a scorer that cannot score)
    again = mc.run_model(net, sets, memories, None, saved.get, saved.__setitem__)  # type: ignore[arg-type]
    assert again == results
    summary = mc.summarise(results, sets)
    dice = summary["mean_dice"]
    assert set(dice) == set(mc.CONDITIONS)
    for condition in mc.CONDITIONS:
        for name in sets:
            assert 0.0 <= dice[condition][name]["mean"] <= 1.0
    # the shipped cases written again the same way: the same memory, the same scores
    assert all(summary["delta_vs_as_shipped"]["shipped_cases_rewritten"][n]["mean"] == 0.0 for n in sets)
    # own_test_set: the Kvasir test set with the Kvasir memories, ClinicDB's with ClinicDB's
    assert dice["own_test_set"]["kvasir"] == dice["kvasir_random"]["kvasir"]
    assert dice["own_test_set"]["clinicdb"] == dice["clinicdb_random"]["clinicdb"]
    emptied = summary["delta_vs_as_shipped"]["emptied"]["kvasir"]["mean"]
    assert np.isclose(summary["delta_vs_emptied"]["as_shipped"]["kvasir"]["mean"], -emptied)
    sensitivity = summary["content_sensitivity"]
    assert np.isclose(
        sensitivity["clinicdb_frames_own_minus_shipped"]["mean"],
        summary["delta_vs_as_shipped"]["own_test_set"]["clinicdb"]["mean"],
    )
    assert sensitivity["own_minus_other"]["clinicdb"]["draws"] == 2
    report = {
        "spatial_size": 64,
        "threads": 1,
        "draws": 2,
        "command": "test",
        "sets": {n: len(i) for n, i in sets.items()},
        "models": [{"name": "tiny", "summary": summary}],
        "wall_seconds": 1.0,
        "scoring_seconds_total": 1.0,
    }
    text = mc.markdown(report)
    assert "| tiny | own_test_set |" in text and "Content sensitivity" in text
