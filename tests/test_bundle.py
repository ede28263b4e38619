"""The polyp_ecrm bundle run for real, at a tiny size: train once (shared fixture), then evaluate, infer, export,
resume, metadata and property checks, and the bundle shipped in a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "polyp_ecrm"
CONFIGS = BUNDLE / "configs"
TINY = ["--spatial_size", "64", "--batch_size", "4", "--val_batch_size", "4", "--num_workers", "0"]
TINY += ["--backbone", "resnet18", "--bank_size", "6", "--progress_bar", "False"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bundle_run(bundle_root: Path, configs: list[str], *args: str, check: bool = True, timeout: int = 300):
    config_arg = str([str(CONFIGS / name) for name in configs]) if len(configs) > 1 else str(CONFIGS / configs[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, "--bundle_root", str(bundle_root)]
    result = subprocess.run(
        cmd + list(args), capture_output=True, text=True, env=_env(), timeout=timeout, cwd=str(REPO)
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """One tiny training run shared by every test that needs a trained bundle."""
    root = tmp_path_factory.mktemp("bundle") / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    result = bundle_run(root, ["train.json"], "--max_epochs", "2", *TINY)
    (root / "train.log").write_text(result.stdout + result.stderr)
    return root


def test_training_writes_best_model_and_resumable_checkpoints(trained_bundle):
    models = trained_bundle / "models"
    flat = torch.load(models / "model.pt", weights_only=True)
    assert "ecrm.memory.memory" in flat and "ecrm.memory.filled" in flat, "model.pt must carry the ECRM memory"
    assert not any(key.startswith("module.") for key in flat)
    assert int(flat["ecrm.memory.filled"]) > 0, "the saved model must have a filled memory"
    checkpoints = sorted(models.glob("checkpoint_*.pt"))
    assert checkpoints, "training checkpoints missing"
    state = torch.load(checkpoints[-1], weights_only=True)
    assert {"network", "optimizer", "trainer", "rng"} <= set(state)
    assert (trained_bundle / "demo_data" / "README.txt").is_file(), "the synthetic demo set is generated and labelled"


def test_resume_continues_from_the_last_checkpoint(trained_bundle, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(trained_bundle, root)
    result = bundle_run(root, ["train.json"], "--max_epochs", "3", "--resume_from", "latest", *TINY)
    log = result.stdout + result.stderr
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log, "a resumed run must not start over"
    state = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    trainer = state["trainer"]
    assert trainer["max_epochs"] == 3 and trainer["iteration"] == 3 * trainer["epoch_length"]


def test_evaluate_reports_main_and_aux_metrics_per_image_and_summary(trained_bundle):
    result = bundle_run(trained_bundle, ["train.json", "evaluate.json"], *TINY)
    log = result.stdout + result.stderr
    # an evaluation's metrics are not named val_* (it may score a test set) and it announces no "new best"
    assert "aux_dice" in log and "mean_dice" in log and "val_mean_dice" not in log and "Got new best" not in log
    eval_dir = trained_bundle / "eval"
    metrics = (eval_dir / "metrics.csv").read_text()
    assert "mean_dice" in metrics and "aux_dice" in metrics
    per_image = (eval_dir / "mean_dice_raw.csv").read_text().splitlines()
    assert len(per_image) == 1 + 5, "one row per validation image (5 of the 24 synthetic pairs) plus a header"
    assert (eval_dir / "report" / "summary.md").read_text().count("|") > 10
    assert list((eval_dir / "report" / "overlays").rglob("*.png")), "overlays of the worst cases"
    # the documented evaluation log (bundle docs, "Log lines"): each event once, nothing about a best epoch
    assert log.count("Evaluation metrics -- ") == 1 and "best value" not in log
    assert sum("WARNING" in line and "SYNTHETIC demo set" in line for line in log.splitlines()) == 1


def test_training_logs_each_event_once_at_its_level(trained_bundle):
    """The documented training log (bundle docs, "Log lines") of a 2-epoch demo run validating every epoch."""
    lines = (trained_bundle / "train.log").read_text().splitlines()

    def count(text: str, level: str = "INFO") -> int:
        return sum(text in line and f" {level} " in line for line in lines)

    assert count("Epoch 1: learning rate") == 1 and count("Epoch 2: learning rate") == 1
    assert count("BatchNorm running statistics recomputed") == 3, "before each validation and at the end"
    assert count("ECRM memory refreshed with the current weights") == 3, "before each validation and at the end"
    assert count("Epoch[2] ECRM memory:") == 1
    assert count("Train completed, saved final checkpoint") == 1
    assert not any(" WARNING " in line or " ERROR " in line for line in lines), [
        line for line in lines if " WARNING " in line or " ERROR " in line
    ]


def test_inference_over_a_folder_with_a_corrupt_file(trained_bundle, tmp_path):
    from PIL import Image

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sources = sorted((trained_bundle / "demo_data" / "images").glob("*.png"))[:3]
    for source in sources:
        shutil.copy(source, inputs / source.name)
    Image.open(sources[0]).convert("RGB").resize((100, 70)).save(inputs / "other_size.jpg")
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    result = bundle_run(
        trained_bundle, ["inference.json"], "--dataset_dir", str(inputs), "--output_dir", str(out), *TINY, check=False
    )
    assert result.returncode != 0, "an input that could not be read makes the run fail, after the others"
    assert "corrupt.png" in result.stderr.splitlines()[-1], "the unreadable input must be reported"
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted([s.stem + "_seg.png" for s in sources] + ["other_size_seg.png"])
    assert Image.open(out / "other_size_seg.png").size == (100, 70), "masks are written at the input's size"


def test_metadata_verifies_against_the_local_schema_and_each_required_field_matters(tmp_path):
    schema = BUNDLE / "docs" / "metadata_schema.json"
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    required = json.loads(schema.read_text())["required"]
    assert {"version", "changelog", "network_data_format", "intended_use", "references"} <= set(required)
    for field in required:
        broken = {k: v for k, v in metadata.items() if k != field}
        path = tmp_path / f"without_{field}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError):
            verify_metadata(meta_file=str(path), filepath=str(schema))
    nested = json.loads(json.dumps(metadata))
    del nested["network_data_format"]["inputs"]["image"]["num_channels"]
    path = tmp_path / "without_num_channels.json"
    path.write_text(json.dumps(nested))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(path), filepath=str(schema))


def test_verify_net_in_out():
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--bundle_root",
        str(BUNDLE),
        "--backbone",
        "resnet18",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_torchscript_export_has_the_memory_and_matches_eager(trained_bundle, tmp_path):
    from monai_ecrm.networks.nets import ECRMUNet

    exported = tmp_path / "model.ts"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(trained_bundle / "models" / "model.pt"),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--bundle_root",
        str(trained_bundle),
        "--backbone",
        "resnet18",
        "--bank_size",
        "6",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scripted = torch.jit.load(str(exported))
    eager = ECRMUNet(backbone="resnet18", bank_size=6)
    eager.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    eager.eval()
    torch.testing.assert_close(scripted.ecrm.memory.memory, eager.ecrm.memory.memory)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("workflow_type,configs", [("train", ["train.json"]), ("infer", ["inference.json"])])
def test_config_workflow_properties(workflow_type, configs):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_bundle_ships_in_the_wheel(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel = next(dist.glob("monai_ecrm-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # dependencies come from this environment (a path entry, so this environment's editable install is not seen)
    Path(purelib, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import monai_ecrm, monai_ecrm.bundle as b; print(monai_ecrm.__file__); print(b.bundle_path())",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    package_file, bundle_dir = probe.stdout.strip().splitlines()[-2:]
    assert package_file.startswith(str(venv)), "the wheel's package, not the source tree, must be imported"
    assert bundle_dir.startswith(str(venv)), f"bundle must come from the wheel, got {bundle_dir}"
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json"):
        assert (Path(bundle_dir) / "configs" / name).is_file(), name
    assert (Path(bundle_dir) / "docs" / "README.md").is_file() and (Path(bundle_dir) / "LICENSE").is_file()
    command = subprocess.run([str(venv / "bin" / "monai-ecrm-bundle"), "path"], capture_output=True, text=True)
    assert command.stdout.strip() == bundle_dir


def test_a_config_that_contradicts_the_trained_model_is_refused_in_one_line(trained_bundle):
    """The fixture was trained at 64 px: running it at another size must not happen silently."""
    assert json.loads((trained_bundle / "models" / "model.json").read_text())["preprocessing"]["spatial_size"] == [
        64,
        64,
    ]
    args = [a for a in TINY if a not in ("--spatial_size", "64")]
    result = bundle_run(trained_bundle, ["inference.json"], "--spatial_size", "128", *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "spatial_size" in lines[0] and "64" in lines[0] and "128" in lines[0], lines
