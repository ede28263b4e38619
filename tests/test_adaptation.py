"""Few-shot site adaptation (``monai_ecrm.adaptation``, ``monai-ecrm-bundle adapt``): a site's labelled cases written
into a trained model's ECRM memory without training, everything else of the model bit-identical."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import monai_ecrm
from monai_ecrm.adaptation import AdaptationError, adapt_memory, adapt_network, adaptation_cases, memory_state_keys
from monai_ecrm.bundle import main as bundle_main
from monai_ecrm.data import make_demo_dataset
from monai_ecrm.networks.nets import ECRMUNet
from monai_ecrm.record import (
    describe_weights,
    file_sha256,
    load_network,
    make_record,
    read_record,
    record_from_network,
    verify_weights,
    write_record,
)

SIZE, SLOTS = 64, 4
TINY = {"backbone": "resnet10", "bank_size": SLOTS, "key_channels": 16, "decoder_channels": (16, 8, 8, 8, 8)}
TRAINING_NAMES = ["train/a.png", "train/b.png", "train/c.png", "train/d.png"]


def _save_model(folder: Path, filled: int = SLOTS, **kwargs) -> Path:
    """A tiny random ECRMUNet whose memory holds ``filled`` training prototypes with names, saved as
    ``folder/model.pt`` with its record (``model.json``) as the bundle writes them."""
    torch.manual_seed(0)
    network = ECRMUNet(**{**TINY, **kwargs})
    if network.use_ecrm:
        labels = (torch.rand(filled, 1, SIZE, SIZE) > 0.5).float()
        network.train()(torch.rand(filled, 3, SIZE, SIZE), labels=labels, sources=torch.arange(filled))
        network.ecrm.memory.set_source_names(TRAINING_NAMES[:filled])
    network.eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save(network.state_dict(), path)
    memory, names = None, None
    if network.use_ecrm:
        bank = network.ecrm.memory
        memory, names = {"slots": SLOTS, "filled": int(bank.filled)}, bank.slot_names()
    kwargs = record_from_network(network)["network"]["kwargs"]
    record = make_record(
        kwargs, SIZE, training={"dataset_dir": "/data/site_a"}, memory=memory, memory_sources=names,
        weights=describe_weights(path),
    )  # fmt: skip
    write_record(path, record)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model")).parent


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """Six synthetic cases of another size than the model's input (80 px): the record's resize applies."""
    return make_demo_dataset(tmp_path_factory.mktemp("sites") / "site_b", num_images=6, size=80, seed=3)


@pytest.fixture
def model(model_dir, tmp_path) -> Path:
    """A fresh copy of the model (and its record) per test, so that a test that fails cannot spoil another."""
    target = tmp_path / "models"
    shutil.copytree(model_dir, target)
    return target / "model.pt"


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included: a temporary file left behind shows) and its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _only_memory_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], memory: list[str]) -> None:
    assert set(memory) <= set(after) and set(before) <= set(after)
    assert set(after) - set(before) <= set(memory)
    for key in before:
        if key not in memory:
            assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def test_replace_changes_only_the_memory_and_the_record_names_the_adaptation(model, site_dir, tmp_path):
    model_files = _fingerprint(model.parent)
    out = tmp_path / "adapted" / "adapted.pt"
    assert adapt_memory(model, site_dir, out, k=3, seed=7) == out
    assert _fingerprint(model.parent) == model_files, "the model and its record are untouched"
    assert sorted(path.name for path in out.parent.iterdir()) == ["adapted.json", "adapted.pt"]

    network, _ = load_network(model)
    keys = memory_state_keys(network)
    assert sorted(key.rsplit(".", 1)[1] for key in keys) == sorted(
        ["memory", "pointer", "filled", "rejected", "sources", "source_names_utf8"]
    )
    before, after = _state(model), _state(out)
    _only_memory_changed(before, after, keys)

    record = read_record(out)
    adaptation = record["adaptation"]
    expected_cases = sorted(
        path.name for path in (site_dir / "images").iterdir()
    )  # the draw is seeded and put back in folder order
    assert adaptation["cases"] == sorted(adaptation["cases"]) and set(adaptation["cases"]) <= set(expected_cases)
    assert len(adaptation["cases"]) == adaptation["k"] == adaptation["written"] == 3
    assert adaptation["site"] == "site_b" and adaptation["mode"] == "replace" and adaptation["seed"] == 7
    assert adaptation["drawn"] is True and adaptation["not_written"] == [] and adaptation["date"]
    assert adaptation["from"] == describe_weights(model)
    assert record["weights"] == describe_weights(out) and record["weights"]["sha256"] == file_sha256(out)
    verify_weights(record, out, "adapted.json")
    assert record["memory"] == {"slots": SLOTS, "filled": 3, "sources": [*adaptation["cases"], None]}
    original = read_record(model)
    for key in ("network", "preprocessing", "threshold", "training", "input", "output"):
        assert record[key] == original[key], key

    adapted = monai_ecrm.load_model(out)
    bank = adapted.ecrm.memory
    assert int(bank.filled) == 3 and int(bank.pointer) == 3
    assert bank.sources.tolist() == [0, 1, 2, -1]
    assert bank.slot_names() == [*adaptation["cases"], None]
    assert bank.source_names == adaptation["cases"]
    assert not bank.memory[3].any(), "the slot beyond k stays empty"

    # the same seed draws the same cases; the library's in-memory path writes the same memory
    again = tmp_path / "again.pt"
    adapt_memory(model, site_dir, again, k=3, seed=7)
    assert read_record(again)["adaptation"]["cases"] == adaptation["cases"]
    network, merged = load_network(model)
    items, names, _ = adaptation_cases(site_dir, k=3, seed=7, slots=SLOTS)
    summary = adapt_network(network, items, merged, names=names)
    assert summary["written"] == 3 and summary["filled"] == 3 and summary["cases"] == names
    for key in keys:
        assert torch.equal(network.state_dict()[key], after[key]), key


def _ecrm_output(network: ECRMUNet, x: torch.Tensor) -> torch.Tensor:
    """What ECRM gives the decoder (the memory-enhanced features) for ``x``: where the memory acts, undiluted by a
    random decoder."""
    seen = []
    handle = network.ecrm.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        with torch.no_grad():
            network(x)
    finally:
        handle.remove()
    return seen[0]


def test_empty_slots_are_not_attended(model, site_dir, tmp_path):
    """With k below the slots the rest stay empty: ECRM attends to the filled slots only, so whatever an empty slot
    holds does not change the output, while the filled ones do."""
    out = tmp_path / "adapted.pt"
    adapt_memory(model, site_dir, out, k=2)
    network = monai_ecrm.load_model(out)
    memory = network.ecrm.memory.memory
    x = torch.rand(1, 3, SIZE, SIZE)
    reference = _ecrm_output(network, x)
    assert not torch.allclose(reference, _ecrm_output(monai_ecrm.load_model(model), x)), "the memory was changed"
    with torch.no_grad():
        memory[2:] = torch.randn_like(memory[2:]) * 10
    assert torch.equal(_ecrm_output(network, x), reference), "an empty slot is no token of the attention"
    with torch.no_grad():
        memory[:2] = torch.randn_like(memory[:2]) * 10
    assert not torch.allclose(_ecrm_output(network, x), reference), "the filled slots are attended"


def test_add_writes_after_the_existing_slots_over_the_oldest(model, site_dir, tmp_path):
    before = monai_ecrm.load_model(model).ecrm.memory
    assert int(before.filled) == SLOTS and int(before.pointer) == 0  # full: the next write replaces slot 0
    out = tmp_path / "added.pt"
    adapt_memory(model, site_dir, out, k=2, mode="add", site="b")
    bank = monai_ecrm.load_model(out).ecrm.memory
    cases = read_record(out)["adaptation"]["cases"]
    assert int(bank.filled) == SLOTS and int(bank.pointer) == 2
    assert bank.slot_names() == [*cases, *TRAINING_NAMES[2:]], "the two oldest slots are replaced, the rest kept"
    assert torch.equal(bank.memory[2:], before.memory[2:])
    assert bank.source_names == TRAINING_NAMES + cases
    assert read_record(out)["memory"]["sources"] == bank.slot_names()

    # a memory with free slots: the cases go into them, nothing is overwritten
    partial = _save_model(tmp_path / "partial", filled=1)
    out = tmp_path / "partial_added.pt"
    adapt_memory(partial, site_dir, out, k=2, mode="add")
    bank = monai_ecrm.load_model(out).ecrm.memory
    cases = read_record(out)["adaptation"]["cases"]
    assert int(bank.filled) == 3 and int(bank.pointer) == 3
    assert bank.slot_names() == [TRAINING_NAMES[0], *cases, None]
    # replace empties it first
    out = tmp_path / "partial_replaced.pt"
    adapt_memory(partial, site_dir, out, k=1)
    cases = read_record(out)["adaptation"]["cases"]
    assert monai_ecrm.load_model(out).ecrm.memory.slot_names() == [*cases, None, None, None]


def test_tensor_items_prepared_as_the_record_says_write_the_same_memory(model, site_dir):
    """``adapt_network`` on a built network, for benchmarks: file items, or tensors prepared with the record's
    preprocessing, give the same memory; a failing case leaves the memory as it was."""
    from monai_ecrm.transforms import eval_transforms

    items, names, _ = adaptation_cases(site_dir, k=2, seed=0, slots=SLOTS)
    from_files, record = load_network(model)
    adapt_network(from_files, items, record, names=names)
    size, normalization = record["preprocessing"]["spatial_size"], record["preprocessing"]["normalization"]
    preprocessing = eval_transforms(size, normalization=normalization)
    tensors = [{key: value for key, value in preprocessing(dict(item)).items() if key in ("image", "label")}
               for item in items]  # fmt: skip
    from_tensors, _ = load_network(model)
    summary = adapt_network(from_tensors, tensors, None, mode="replace", names=names)
    assert summary["written"] == 2 and summary["filled"] == 2
    for key, value in from_files.ecrm.memory.state_dict().items():
        assert torch.equal(value, from_tensors.ecrm.memory.state_dict()[key]), key

    before = {key: value.clone() for key, value in from_tensors.ecrm.memory.state_dict().items()}
    broken = [dict(tensors[0]), {"image": tensors[1]["image"][:, :7]}]  # the second: no label
    with pytest.raises(AdaptationError, match="no 'label'"):
        adapt_network(from_tensors, broken, None, mode="add")
    wrong = [dict(tensors[0]), {"image": torch.rand(2, SIZE, SIZE), "label": tensors[1]["label"]}]  # 2 channels
    with pytest.raises(RuntimeError):
        adapt_network(from_tensors, wrong, None, mode="add")
    for key, value in from_tensors.ecrm.memory.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adapting_again_lists_both_adaptations(model, site_dir, tmp_path):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    adapt_memory(model, site_dir, first, k=2, site="b")
    adapt_memory(first, site_dir, second, k=1, seed=1, mode="add", site="c")
    adaptations = read_record(second)["adaptation"]
    assert isinstance(adaptations, list) and [entry["site"] for entry in adaptations] == ["b", "c"]
    assert adaptations[1]["from"] == describe_weights(first)
    assert int(monai_ecrm.load_model(second).ecrm.memory.filled) == 3


def test_a_case_without_polyp_gives_no_prototype_and_is_named(model, site_dir, tmp_path):
    site = tmp_path / "site_c"
    shutil.copytree(site_dir, site)
    empty = site / "masks" / "synthetic_001.png"
    Image.fromarray(np.zeros((80, 80), dtype=np.uint8)).save(empty)
    out = tmp_path / "adapted.pt"
    # a list of items this time: all of them (no k), in the list's order
    items = [{"image": site / "images" / name, "label": site / "masks" / name} for name in ("synthetic_000.png",
             "synthetic_001.png", "synthetic_002.png")]  # fmt: skip
    adapt_memory(model, items, out, site="c")
    adaptation = read_record(out)["adaptation"]
    assert adaptation["cases"] == ["synthetic_000.png", "synthetic_001.png", "synthetic_002.png"]
    assert adaptation["site"] == "c" and adaptation["k"] == 3 and adaptation["drawn"] is False
    assert adaptation["written"] == 2 and adaptation["not_written"] == ["synthetic_001.png"]
    bank = monai_ecrm.load_model(out).ecrm.memory
    assert bank.slot_names() == ["synthetic_000.png", "synthetic_002.png", None, None]


def _bad_cases(kind: str, site_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A site folder with one bad case, and the text the error must contain."""
    site = tmp_path / f"site_{kind}"
    shutil.copytree(site_dir, site)
    if kind == "unreadable":
        (site / "images" / "synthetic_002.png").write_bytes(b"not a picture at all")
        return site, "synthetic_002.png"
    Image.fromarray(np.zeros((40, 56), dtype=np.uint8)).save(site / "masks" / "synthetic_004.png")
    return site, "synthetic_004.png"


BAD_INPUTS = ["unreadable image", "mask size", "k above slots", "k above cases", "out is model", "no memory"]


def _bad_call(kind: str, model: Path, site_dir: Path, tmp_path: Path) -> tuple[dict, str, Path]:
    """Arguments of :func:`adapt_memory` for one bad input, what the error names, and the folder that must stay as
    it was."""
    out = tmp_path / "out" / "adapted.pt"
    call = {"model_path": model, "cases": site_dir, "out_path": out, "k": 2}
    if kind == "unreadable image":
        call["cases"], named = _bad_cases("unreadable", site_dir, tmp_path)
    elif kind == "mask size":
        call["cases"], named = _bad_cases("mask", site_dir, tmp_path)
        named = "size mismatch"
    elif kind == "k above slots":
        call["k"], named = SLOTS + 1, f"{SLOTS} slots"
    elif kind == "k above cases":
        few = make_demo_dataset(tmp_path / "few", num_images=3, size=80, seed=5)
        call["cases"], call["k"], named = few, 4, "3 case(s)"
    elif kind == "out is model":
        call["out_path"], named = model, "--out"
    else:
        call["model_path"] = _save_model(tmp_path / "plain", use_ecrm=False)
        named = "no ECRM memory"
    return call, named, Path(call["model_path"]).parent


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_error_and_writes_nothing(kind, model, site_dir, tmp_path):
    call, named, folder = _bad_call(kind, model, site_dir, tmp_path)
    files = _fingerprint(folder)
    with pytest.raises(ValueError, match=re.escape(named)) as caught:
        adapt_memory(**call)
    if kind in ("k above slots", "k above cases", "out is model", "no memory"):
        assert isinstance(caught.value, AdaptationError)
    if kind == "mask size":
        assert "synthetic_004.png" in str(caught.value)
    assert _fingerprint(folder) == files, "the model and its record are untouched"
    assert not (tmp_path / "out").exists(), "nothing is written"


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_the_command_ends_bad_input_in_one_line_with_status_2(kind, model, site_dir, tmp_path, capsys):
    call, named, folder = _bad_call(kind, model, site_dir, tmp_path)
    files = _fingerprint(folder)
    argv = ["adapt", "--model", str(call["model_path"]), "--cases", str(call["cases"]), "--out", str(call["out_path"])]
    assert bundle_main([*argv, "--k", str(call["k"])]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert captured.out == ""
    assert _fingerprint(folder) == files
    assert not (tmp_path / "out").exists()


def test_the_command_end_to_end_and_the_adapted_model_runs_in_monai_ecrm_infer(model, site_dir, tmp_path, capsys):
    from monai_ecrm.infer import EXIT_OK
    from monai_ecrm.infer import main as infer_main

    out = tmp_path / "adapted.pt"
    argv = ["adapt", "--model", str(model), "--cases", str(site_dir), "--out", str(out), "--k", "2"]
    assert bundle_main([*argv, "--mode", "add", "--site", "hospital_b", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: 2 of 2 case(s) of site 'hospital_b' written") and "4/4 slots" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["adaptation"]["site"] == "hospital_b" and record["adaptation"]["mode"] == "add"
    assert record["adaptation"]["seed"] == 3 and record["weights"]["sha256"] == file_sha256(out)

    picture = site_dir / "images" / "synthetic_005.png"
    masks = tmp_path / "masks"
    assert infer_main([str(picture), "-o", str(masks), "--checkpoint", str(out), "--no-progress"]) == EXIT_OK
    assert Image.open(masks / "synthetic_005_seg.png").size == (80, 80)


def test_the_help_names_the_modes_and_the_default(capsys):
    with pytest.raises(SystemExit):
        bundle_main(["adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--cases", "--out", "--k", "--mode", "--site", "--seed"):
        assert option in text
    assert "replace: empty the memory" in text and "(default" in text
