"""benchmarks/gpu_speed.py without a GPU: the one-line refusal, its measurement core forced onto the CPU (a tiny
network and size, one round: the JSON layout, the accuracy check on a synthetic set), the JSON assembly and the
compile fallback. The GPU figures themselves come from running the script on a lent GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_speed as gs  # noqa: E402


def _env() -> dict:
    root = str(SCRIPT.parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + (os.pathsep + path if path else ""))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure")
def test_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [gs.REFUSAL]
    assert proc.stdout == ""
    assert not out.exists()


def test_measurement_core_runs_on_the_cpu_when_forced(tmp_path: Path) -> None:
    from monai_ecrm.data import make_demo_dataset
    from monai_ecrm.networks.nets import ECRMUNet

    kvasir = make_demo_dataset(tmp_path / "kvasir", num_images=2, size=48, seed=0)
    torch.manual_seed(0)
    net = ECRMUNet(backbone="resnet10", bank_size=2)
    (tmp_path / "model").mkdir()
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(half, tmp_path / "model" / "model_fp16.pt")  # as in ../shared/models
    out = tmp_path / "speed.json"
    args = ["--allow-cpu", "--quick", "--backbones", "resnet10", "--extra-backbones", "efficientnet-lite9"]
    args += ["--size", "64", "--batches", "1", "--train-batches", "2", "--precisions", "fp32"]
    args += ["--channels-last", "off", "--compile-batches", "", "--bank-size", "2", "--repeats", "1", "--warmup", "1"]
    args += ["--inner", "1", "--train-repeats", "1", "--train-warmup", "1", "--train-inner", "1"]
    args += ["--kvasir", str(kvasir), "--checkpoint", str(tmp_path / "model"), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text())["runs"].keys() == report["runs"].keys()
    for key in ("device", "versions", "settings", "summary", "targets", "runs", "memory_cache", "skipped", "errors"):
        assert key in report, key
    assert report["errors"] == []
    assert report["device"]["type"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert report["memory_filled"] == {"resnet10": 2}
    assert {"what": "extra backbone efficientnet-lite9", "reason": "not registered in MONAI's FLEXUNET_BACKBONE"} in (
        report["skipped"]
    )
    summary = report["summary"]["resnet10"]
    for model in gs.MODELS:
        assert summary["inference_per_s"][model]["fp32"]["b1"] > 0
        assert summary["training_images_per_s"][model]["bf16"]["b2"] > 0
    assert set(summary["ecrm_overhead_pct"]) == {
        "inference",
        "training",
        "inference_best_layout",
        "training_best_layout",
    }
    assert "resnet10 training bf16 batch 2: ECRM overhead <= 10% (faster layouts)" in report["targets"]
    assert set(report["memory_cache"]["resnet10"]["fp32"]["frames_per_s"]) == {"cache_on", "cache_off"}
    run = report["runs"]["ecrm_unet/resnet10/inference/fp32/contiguous/b1"]
    assert run["batch"] == 1 and len(run["rounds_ms"]) == 1 and run["per_s"] > 0
    accuracy = report["accuracy"]
    assert accuracy["frames"] == 2 and set(accuracy["mean_dice"]) == {"fp32", "bf16"}
    assert set(accuracy["mean_dice_minus_fp32"]) == {"bf16"}
    assert "Kvasir mean Dice bf16 vs fp32 within 0.005" in report["targets"]


def _run(model: str, mode: str, layout: str, batch: int, per_s: float, compiled: bool = False) -> tuple[str, dict]:
    key = gs.run_key(model, "lite0", mode, "bf16", layout, batch, compiled)
    return key, {"model": model, "backbone": "lite0", "mode": mode, "precision": "bf16", "layout": layout,
                 "batch": batch, "compiled": compiled, "per_s": per_s}  # fmt: skip


def test_report_assembly_overheads_layouts_and_targets() -> None:
    runs = dict(
        [
            _run("ecrm_unet", "inference", "contiguous", 1, 100.0),
            _run("no_ecrm", "inference", "contiguous", 1, 120.0),
            _run("ecrm_unet", "inference", "channels_last", 1, 105.0),
            _run("no_ecrm", "inference", "channels_last", 1, 110.0),
            _run("ecrm_unet", "inference", "contiguous", 16, 1000.0),
            _run("no_ecrm", "inference", "contiguous", 16, 1500.0),
            _run("ecrm_unet", "inference", "contiguous", 1, 300.0, compiled=True),
            _run("no_ecrm", "inference", "contiguous", 1, 310.0, compiled=True),
            _run("ecrm_unet", "training", "contiguous", 8, 200.0),
            _run("no_ecrm", "training", "contiguous", 8, 210.0),
            _run("ecrm_unet", "memory_cache_off", "contiguous", 1, 90.0),
        ]
    )
    accuracy = {"mean_dice_minus_fp32": {"bf16": -0.001, "bf16+compile": 0.007}}
    report = gs.assemble_report({"device": {"name": "test"}}, runs, {"accuracy": accuracy, "skipped": []})
    summary = report["summary"]["lite0"]
    assert summary["inference_per_s"]["ecrm_unet"] == {
        "bf16": {"b1": 100.0, "b16": 1000.0},
        "bf16/channels_last": {"b1": 105.0},
        "bf16+compile": {"b1": 300.0},
    }
    overhead = summary["ecrm_overhead_pct"]
    assert overhead["inference"]["bf16"] == {"b1": 20.0, "b16": 50.0}
    assert overhead["inference"]["bf16/channels_last"] == {"b1": 4.76}
    assert overhead["inference_best_layout"]["bf16"] == {"b1": 14.29, "b16": 50.0}  # 120 / 105
    assert overhead["inference_best_layout"]["bf16+compile"] == {"b1": 3.33}
    assert overhead["training"]["bf16"] == {"b8": 5.0}
    assert summary["best_layout"]["inference"]["ecrm_unet"]["bf16"]["b1"] == "channels_last"
    assert summary["best_layout"]["inference"]["no_ecrm"]["bf16"]["b1"] == "contiguous"
    assert summary["channels_last_gain_pct"]["inference"]["ecrm_unet"]["bf16"] == {"b1": 5.0}
    targets = report["targets"]
    assert targets["lite0 inference bf16 batch 1: ECRM overhead <= 10% (faster layouts)"] == {
        "overhead_pct": 14.29,
        "met": False,
    }
    assert targets["lite0 inference bf16+compile batch 1: ECRM overhead <= 10% (faster layouts)"]["met"]
    assert targets["lite0 training bf16 batch 8: ECRM overhead <= 10% (faster layouts)"]["met"]
    assert not any("batch 16" in what for what in targets)  # the targets: batch 1 and training
    assert targets["Kvasir mean Dice bf16 vs fp32 within 0.005"]["met"]
    assert not targets["Kvasir mean Dice bf16+compile vs fp32 within 0.005"]["met"]
    assert report["device"] == {"name": "test"} and report["runs"] == runs and report["skipped"] == []
    json.dumps(report)


def test_a_failing_compile_is_recorded_with_its_reason() -> None:
    def call_of(module: torch.nn.Module):
        def call() -> None:
            raise RuntimeError("inductor said no\nsecond line")

        return call

    result = gs.compile_and_warm(torch.nn.Identity(), call_of, "reduce-overhead", 5.0)
    assert result == {
        "status": "failed",
        "reason": "RuntimeError: inductor said no",
        "fallback": "eager (see the eager figures)",
    }
