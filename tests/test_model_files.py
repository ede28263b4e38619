"""Model files a user can trust (issue: "the model a user runs is the model they trained").

One tiny training run (module fixture, 2 epochs on a copy of the synthetic demo set given as ``--dataset_dir``) is
copied into each test's own folder, which then resumes it, starts a new run beside it, or runs the bundle with bad
input: a resume keeps the best score and its data, a record names the weights it describes, a new run moves an earlier
run's files aside, and the bundle ends an error with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monai_ecrm
from monai_ecrm.data import make_demo_dataset
from monai_ecrm.handlers import latest_checkpoint
from monai_ecrm.record import RecordMismatchError, file_sha256, load_network, read_record

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "polyp_ecrm"
CONFIGS = BUNDLE / "configs"
TINY = ["--spatial_size", "64", "--batch_size", "4", "--val_batch_size", "4", "--num_workers", "0"]
TINY += ["--backbone", "resnet10", "--bank_size", "4", "--progress_bar", "False", "--num_checkpoints", "1"]


def run_bundle(root: Path, configs: list[str], *args: str, env: dict[str, str] | None = None):
    config_arg = str([str(CONFIGS / name) for name in configs]) if len(configs) > 1 else str(CONFIGS / configs[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, "--bundle_root", str(root)]
    environment = {key: value for key, value in os.environ.items() if key != "MONAI_ECRM_DEBUG"}
    environment.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=environment, timeout=300, cwd=REPO)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A bundle folder after a 2-epoch run on ``data/`` (a copy of the demo set, passed as ``--dataset_dir``)."""
    base = tmp_path_factory.mktemp("model_files")
    root = base / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    make_demo_dataset(base / "data", num_images=12, size=64)
    ok(run_bundle(root, ["train.json"], "--max_epochs", "2", "--dataset_dir", str(base / "data"), *TINY))
    return root


@pytest.fixture
def bundle(first_run, tmp_path) -> Path:
    root = tmp_path / "polyp_ecrm"
    shutil.copytree(first_run, root)
    return root


def _data_args(first_run: Path) -> list[str]:
    return ["--dataset_dir", str(first_run.parent / "data")]


def test_the_record_names_the_exact_weights_beside_it_and_is_readable_by_all(first_run, tmp_path):
    models = first_run / "models"
    record = read_record(models / "model.pt")
    assert record["weights"]["file"] == "model.pt"
    assert record["weights"]["sha256"] == file_sha256(models / "model.pt")
    assert record["source"]["monai_ecrm"] == monai_ecrm.__version__
    # the memory as saved: its fill and the names of the cases in it, not "null"
    flat = torch.load(models / "model.pt", weights_only=True)
    assert record["memory"]["filled"] == int(flat["ecrm.memory.filled"]) > 0
    assert len(record["memory"]["sources"]) == record["memory"]["slots"]
    assert all(name and name.endswith(".png") for name in record["memory"]["sources"][: record["memory"]["filled"]])
    assert record["training"]["train_images"] + record["training"]["val_images"] == 12
    mode = stat.S_IMODE((models / "model.json").stat().st_mode)
    assert mode & 0o044 == 0o044, f"model.json must be as readable as model.pt, is {oct(mode)}"

    # other weights under this record: every reader refuses, naming both files
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    state["seg_head.0.bias"] = state["seg_head.0.bias"] + 1 if "seg_head.0.bias" in state else state[next(iter(state))]
    torch.save(state, copy / "model.pt")
    with pytest.raises(RecordMismatchError, match="model.json.*model.pt"):
        load_network(copy / "model.pt")


def test_training_checkpoints_carry_their_own_record(first_run):
    """``checkpoint_final.pt`` is not ``model.pt``: it is described by the record inside it, not by ``model.json``."""
    network, record = load_network(first_run / "models" / "checkpoint_final.pt")
    assert record["preprocessing"]["spatial_size"] == [64, 64] and "weights" not in record
    assert record["training"]["run_id"], "the record is the run's, carried inside the checkpoint"
    assert record["network"]["kwargs"]["backbone"] == "resnet10"


def test_a_resume_keeps_the_best_score_so_far(bundle, first_run):
    """The checkpoint's best score survives the resume: a validation that does not beat it leaves model.pt alone
    (set here to a score no model can reach, so that every validation of the resume is worse)."""
    models = bundle / "models"
    checkpoint = latest_checkpoint(models)
    state = torch.load(checkpoint, weights_only=True)
    state["run"]["best_saved"] = [[2.0, "model.pt"]]
    state["run"]["best_metric"] = 2.0
    torch.save(state, checkpoint)
    before = file_sha256(models / "model.pt"), (models / "model.json").read_text()
    result = ok(
        run_bundle(
            bundle, ["train.json"], "--max_epochs", "3", "--resume_from", "latest", *_data_args(first_run), *TINY
        )
    )
    log = result.stdout + result.stderr
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log
    assert "Got new best metric" not in log, "the first validation after a resume is no new best by default"
    assert (file_sha256(models / "model.pt"), (models / "model.json").read_text()) == before
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert final["run"]["best_metric"] == 2.0 and final["run"]["run_id"] == state["run"]["run_id"]


def test_a_resume_on_other_data_stops_in_one_line_and_changes_nothing(bundle):
    """Resuming a run without its --dataset_dir (the bundle would fall back to the synthetic demo set) or with other
    data is refused before any training, naming the option and both values."""
    models = bundle / "models"
    before = {path.name: file_sha256(path) for path in models.iterdir() if path.is_file()}
    result = run_bundle(bundle, ["train.json"], "--max_epochs", "3", "--resume_from", "latest", *TINY)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "--dataset_dir" in lines[0] and "data" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert {path.name: file_sha256(path) for path in models.iterdir() if path.is_file()} == before


def test_a_new_run_in_a_used_folder_moves_the_earlier_run_aside(bundle, first_run):
    """A new run (here 96 px, validating only after epoch 5, stopped after 1) neither prunes, resumes nor relabels the
    earlier run's files: they move to models/previous/<run>/ byte for byte, and no record describes old weights."""
    models = bundle / "models"
    earlier = {path.name: file_sha256(path) for path in models.iterdir() if path.is_file()}
    run_id = read_record(models)["training"]["run_id"]
    at_96 = ["96" if arg == "64" else arg for arg in TINY]
    ok(run_bundle(bundle, ["train.json"], "--max_epochs", "1", "--val_interval", "5", *_data_args(first_run), *at_96))
    moved = models / "previous" / run_id
    assert {path.name: file_sha256(path) for path in moved.iterdir()} == earlier
    assert not (models / "model.json").exists() and not (models / "model.pt").exists(), "no validation, no model"
    latest = torch.load(latest_checkpoint(models), weights_only=True)
    assert latest["run"]["run_id"] != run_id and latest["run"]["spatial_size"] == 96


def test_bundle_errors_end_in_one_line(bundle, tmp_path):
    result = run_bundle(bundle, ["train.json"], "--dataset_dir", str(tmp_path / "no_such_folder"), *TINY)
    assert result.returncode != 0
    assert error_lines(result) == [line for line in result.stderr.splitlines() if "no_such_folder" in line]
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stdout + result.stderr
    assert "Traceback" in (bundle / "logs" / "error.log").read_text(), "the traceback goes to the log"
    debug = run_bundle(
        bundle, ["train.json"], "--dataset_dir", str(tmp_path / "no_such_folder"), *TINY, env={"MONAI_ECRM_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bundle_inference_exits_non_zero_naming_every_unreadable_input(bundle, first_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for source in sorted((first_run.parent / "data" / "images").glob("*.png"))[:2]:
        shutil.copy(source, inputs / source.name)
    for name in ("bad1.png", "bad2.png"):
        (inputs / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    result = run_bundle(
        bundle,
        ["inference.json"],
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(out),
        *TINY,
        env={"PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode != 0, "an input that failed must make the command fail"
    lines = error_lines(result)
    assert len(lines) == 1 and "bad1.png" in lines[0] and "bad2.png" in lines[0], result.stderr[-2000:]
    assert len(list(out.glob("*_seg.png"))) == 2, "the readable inputs are still written"


def test_one_version_everywhere():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["version"] == monai_ecrm.__version__
    assert metadata["required_packages_version"]["monai-ecrm"] == monai_ecrm.__version__
    assert monai_ecrm.__version__ in metadata["changelog"]
    assert tuple(int(part) for part in monai_ecrm.__version__.split(".")) >= (0, 2, 0)


def test_the_record_keeps_the_interpolation_and_a_compiled_state_dict_loads(tmp_path):
    """A bilinear model is recorded and rebuilt as bilinear (nearest differs); the state dict of a
    ``torch.compile``-wrapped network (``_orig_mod.`` keys) loads like the plain one."""
    from monai_ecrm.networks.nets import ECRMUNet
    from monai_ecrm.record import make_record, record_from_network, write_record

    torch.manual_seed(0)
    network = ECRMUNet(
        backbone="resnet10", bank_size=2, interp_mode="bilinear", decoder_channels=(16, 8, 8, 8, 8)
    ).eval()
    kwargs = record_from_network(network)["network"]["kwargs"]
    assert kwargs["interp_mode"] == "bilinear"
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    write_record(path, make_record(kwargs, 64, weights={"file": "model.pt", "sha256": file_sha256(path)}))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(monai_ecrm.load_model(path)(x), network(x))
    compiled = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.{key}": value for key, value in network.state_dict().items()}, compiled)
    loaded, record = load_network(compiled, flags={"interp_mode": "bilinear"})
    with torch.no_grad():
        assert torch.equal(loaded(x), network(x))


def test_evaluation_names_its_metrics_without_val_and_selects_nothing(first_run):
    """``evaluate.json`` scores a test set: its metrics are not called ``val_*`` and it announces no "new best"."""
    result = ok(
        run_bundle(
            first_run,
            ["train.json", "evaluate.json"],
            *_data_args(first_run),
            *TINY,
            "--output_dir",
            str(first_run / "eval_test"),
            "--explain",
            "0",
        )
    )
    log = result.stdout + result.stderr
    assert "mean_dice" in log and "val_mean_dice" not in log and "Got new best metric" not in log, log[-3000:]
    page = (first_run / "eval_test" / "report" / "report.html").read_text()
    assert file_sha256(first_run / "models" / "model.pt") in page and "model.pt" in page, "the page names its model"
