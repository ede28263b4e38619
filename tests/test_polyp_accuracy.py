"""benchmarks/polyp_accuracy.py end to end at a tiny size on a tiny SYNTHETIC set laid out like ../shared/data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_ecrm.data import make_demo_dataset
from monai_ecrm.metrics.functional import SUITE_KEYS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "polyp_accuracy.py"
TINY = ["--size", "64", "--batch-size", "2", "--seeds", "0", "--init", "random", "--val-fraction", "0.34"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic pairs as fake Kvasir-SEG and CVC-ClinicDB roots with PraNet-style id lists: 6 train, 1 + 1 test."""
    tmp = tmp_path_factory.mktemp("polyp_accuracy")
    demo = make_demo_dataset(tmp / "demo", num_images=8, size=64)
    root = tmp / "data"
    (root / "pranet_split").mkdir(parents=True)
    (root / "kvasir_seg").symlink_to(demo)
    (root / "cvc_clinicdb").symlink_to(demo)
    ids = sorted(path.stem for path in (demo / "images").iterdir())
    lists = {
        "train_kvasir.txt": ids[:4],
        "train_clinicdb.txt": ids[4:6],
        "test_kvasir.txt": ids[6:7],
        "test_clinicdb.txt": ids[7:8],
    }
    for name, stems in lists.items():
        (root / "pranet_split" / name).write_text("\n".join(stems) + "\n")
    return root


def _run(data_root: Path, work_dir: Path, *options: str) -> str:
    command = [sys.executable, str(SCRIPT), "--data", str(data_root), "--work-dir", str(work_dir), *TINY, *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_train_evaluate_and_resume_after_interruption(data_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "runs"
    models = ["--models", "ecrm,no_ecrm", "--steps", "4"]
    # first invocation: checkpoints every step and stops after 2 of 4 (what a kill after a checkpoint leaves)
    _run(data_root, work, *models, "--ckpt-every", "1", "--stop-after", "2")
    for model in ("ecrm", "no_ecrm"):
        run_dir = work / f"{model}-random-seed0"
        assert not (run_dir / "result.json").exists()
        checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
        assert checkpoint["step"] == 2
        assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(checkpoint)
    # second invocation: continues at step 2
    log = _run(data_root, work, *models)
    assert "ecrm-random-seed0: resuming from step 2 of 4" in log
    assert "no_ecrm-random-seed0: resuming from step 2 of 4" in log
    report = json.loads((work / "results.json").read_text())
    runs = {run["model"]: run for run in report["runs"]}
    assert set(runs) == {"ecrm", "no_ecrm"}
    for run in runs.values():
        assert run["steps"] == 4 and run["resumed_from_step"] == 2
        assert [(s["start"], s["end"]) for s in run["segments"]] == [(0, 2), (2, 4)]
        assert run["train_images"] == 4 and run["val_images"] == 2 and run["train_images_per_s"] > 0
        assert set(run["summary"]) == {"val", "kvasir", "clinicdb"}
        for name, summary in run["summary"].items():
            assert set(SUITE_KEYS) <= set(summary) and summary["images"] == (2 if name == "val" else 1)
    assert runs["ecrm"]["memory_refreshed_images"] == 4 and runs["no_ecrm"]["memory_refreshed_images"] is None
    for run in runs.values():
        # the plateau check: the validation loss at step 0 and at the end survives the interruption
        assert [step for step, _ in run["val_loss"]] == [0, 4], run["val_loss"]
        assert all(0 < loss < 10 for _, loss in run["val_loss"])
        assert run["val_loss_plateau"] is None  # two points say nothing about a plateau
    entry = report["aggregate"][0]
    assert entry["summary"]["kvasir"]["dice"]["n"] == 1 and entry["summary"]["kvasir"]["dice"]["sd"] is None
    table = (work / "results.md").read_text()
    assert "| Model | Init | Steps | Seeds | mDice | mIoU |" in table
    assert "| ecrm | random | 4 | 0 |" in table and "| no_ecrm | random | 4 | 0 |" in table
    assert "Differences within one standard deviation" in table and "ecrm vs no_ecrm" in table
    assert "## Validation loss (plateau check)" in table and "| step 0 | step 4 |" in table


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_and_merge(data_root: Path, tmp_path: Path) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    options = ["--models", "ecrm", "--steps", "3"]
    # the interrupted run also measures the validation loss at every step, the straight one never: neither the
    # interruption nor the validation passes may change what the training computes
    _run(data_root, interrupted, *options, "--ckpt-every", "1", "--stop-after", "1", "--val-every", "1")
    _run(data_root, interrupted, *options, "--val-every", "1")
    _run(data_root, straight, *options, "--val-every", "0", "--save-best", str(tmp_path / "model.pt"))
    measured = json.loads((interrupted / "ecrm-random-seed0" / "result.json").read_text())["val_loss"]
    assert [step for step, _ in measured] == [0, 1, 2, 3]
    assert json.loads((straight / "ecrm-random-seed0" / "result.json").read_text())["val_loss"] == []
    first = torch.load(interrupted / "ecrm-random-seed0" / "final_model.pt", weights_only=True)
    second = torch.load(straight / "ecrm-random-seed0" / "final_model.pt", weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    best = json.loads((straight / "results.json").read_text())["best_model"]
    assert best["run"] == "ecrm-random-seed0" and best["network"]["ecrm_channels"] == 320
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved.keys() == second.keys()
    # the reference weights are for the bundle: its inference config, with the overrides the script prints, builds
    # a network that takes them strictly (memory included)
    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / "polyp_ecrm" / "configs" / "inference.json")
    parser.update(best["bundle_override_values"])
    bundle_net = parser.get_parsed_content("network_def")
    bundle_net.load_state_dict(saved, strict=True)
    assert parser.get_parsed_content("spatial_size") == 64
    assert "--network_def#ecrm_channels 320" in best["bundle_overrides"]
    log = _run(data_root, interrupted, *options, "--merge-only", "--out-md", str(tmp_path / "merged.md"))
    assert "1 finished run(s) merged" in log and (tmp_path / "merged.md").is_file()


def test_save_best_takes_a_bundle_study_run_as_it_is_with_its_record(tmp_path: Path) -> None:
    """``--save-best`` over ``benchmarks/bundle_study.py`` runs: the bundle's own ``model.pt`` of the run with the
    best validation mDice, byte for byte, with the model record beside it (replacing a stale one), so that it loads
    without overrides."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import polyp_accuracy

    from monai_ecrm.networks.nets import ECRMUNet
    from monai_ecrm.record import load_network, make_record, write_record

    kwargs = {"backbone": "efficientnet-lite0", "bank_size": 4, "key_channels": 16}
    results = []
    for seed, val_dice in ((0, 0.71), (1, 0.75)):
        models = tmp_path / "runs" / f"ecrm-seed{seed}" / "polyp_ecrm" / "models"
        models.mkdir(parents=True)
        torch.manual_seed(seed)
        torch.save(ECRMUNet(**kwargs).state_dict(), models / "model.pt")
        write_record(models / "model.pt", make_record(kwargs, 64))
        results.append({"model": "ecrm/s16_attn_sup", "seed": seed, "run": f"ecrm-seed{seed}", "size": 64,
                        "steps": 10, "val_images": 3, "config": {"normalization": "imagenet"},
                        "summary": {polyp_accuracy.VAL: {"dice": val_dice}}})  # fmt: skip
    out = tmp_path / "reference" / "model.pt"
    out.parent.mkdir()
    write_record(out, make_record({**kwargs, "bank_size": 20}, 128))  # a stale record of another network
    info = polyp_accuracy.save_best(results, out, tmp_path / "runs")
    assert info["run"] == "ecrm-seed1"
    assert out.read_bytes() == (tmp_path / "runs" / "ecrm-seed1" / "polyp_ecrm" / "models" / "model.pt").read_bytes()
    network, record = load_network(out)
    assert network.ecrm.memory.num_slots == 4 and record["preprocessing"]["spatial_size"] == [64, 64]
    assert "--bank_size 4" in info["bundle_overrides"] and "--spatial_size 64" in info["bundle_overrides"]
