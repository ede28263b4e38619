"""INT8 and float32 ONNX accuracy against PyTorch with trained weights (issue #17): mean Dice on the Kvasir and
CVC-ClinicDB test sets at each image's original size, the same pre- and post-processing for every engine.

The weights are an accuracy-protocol run (``benchmarks/polyp_accuracy.py``: ``final_model.pt`` and its
``result.json``, which states the network and input size) or any model whose record says so. The model is exported
(``monai_ecrm.onnx.export_network``), quantised (``quantize_int8``: QDQ, per-channel, calibrated on ``--num-images``
training images of the PraNet split drawn with ``--seed``), then every test image is run through PyTorch, ONNX
Runtime float32 and ONNX Runtime INT8. Prints JSON: mean Dice per set and engine, the INT8 - float32 difference,
and the agreement of the INT8 masks with the float32 ones.

    python benchmarks/onnx_accuracy.py --run /work/runs/screen128/ecrm-pretrained-seed0 --out-dir /tmp/onnx_acc
    python benchmarks/onnx_accuracy.py --model ../runs/bundle256/ecrm-seed0/polyp_ecrm/models/model.pt \
        --out-dir /tmp/onnx_acc256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polyp_accuracy as pa  # noqa: E402

from monai_ecrm import onnx as monai_onnx  # noqa: E402
from monai_ecrm.record import load_network  # noqa: E402


def _dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 2.0 * int((pred & gt).sum()) / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pa.add_model_arguments(parser)
    parser.add_argument("--data", type=Path, default=pa.DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-test", type=int, default=0, help="first N images of each test set (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = pa.model_file(args)
    net, record = load_network(model_path)
    net.eval()
    size = record["preprocessing"]["spatial_size"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    datalist = args.out_dir / "pranet.json"
    if not datalist.is_file():
        from monai_ecrm.bundle import write_pranet_datalist

        write_pranet_datalist(args.data, datalist)
    float_path, int8_path = args.out_dir / "model.onnx", args.out_dir / "model.int8.onnx"
    onnx_record = monai_onnx.make_record(
        record["network"]["kwargs"], size, record["preprocessing"]["normalization"], record["threshold"]
    )
    monai_onnx.export_network(net, float_path, onnx_record, sample_shape=(1, 3, *size))
    monai_onnx.quantize_int8(float_path, int8_path, datalist, num_images=args.num_images, seed=args.seed)
    sessions = {
        name: monai_onnx.load_onnx_session(path, threads=args.threads)[0]
        for name, path in (("ort_fp32", float_path), ("ort_int8", int8_path))
    }
    pargs = pa.parse_args(["--size", str(size[0]), "--backbone", record["network"]["kwargs"]["backbone"]])
    preprocessing = pa.full_size_eval_transforms(size[0], normalization=record["preprocessing"]["normalization"])
    postprocessing = pa.full_size_eval_postprocessing(preprocessing)
    tests = pa.load_datalists(pargs)["test"]
    results: dict[str, dict] = {}
    for name, items in tests.items():
        items = items[: args.max_test] if args.max_test else items
        scores = {engine: [] for engine in ("pytorch", "ort_fp32", "ort_int8")}
        agreement = []
        for item in items:
            sample = preprocessing(dict(item))
            image = sample["image"][None]
            with torch.no_grad():
                logits = {"pytorch": net(image)[0].float()}
            for engine, session in sessions.items():
                feed = {session.get_inputs()[0].name: image.numpy().astype(np.float32)}
                logits[engine] = torch.from_numpy(session.run(None, feed)[0][0])
            masks = {}
            for engine, value in logits.items():
                out = postprocessing({**sample, "pred": value})
                masks[engine] = torch.as_tensor(out["pred"])[0] > 0.5
                gt = torch.as_tensor(out["gt"])[0] > 0.5
                scores[engine].append(_dice(masks[engine], gt))
            if masks["ort_fp32"].any():
                agreement.append(_dice(masks["ort_int8"], masks["ort_fp32"]))
        results[name] = {
            "images": len(items),
            **{f"mdice_{engine}": float(np.mean(values)) for engine, values in scores.items()},
            "int8_minus_fp32": float(np.mean(scores["ort_int8"]) - np.mean(scores["ort_fp32"])),
            "int8_vs_fp32_mask_dice_mean": float(np.mean(agreement)) if agreement else None,
        }
    report = {
        "model_file": str(model_path),
        "spatial_size": size,
        "calibration": monai_onnx.read_metadata(int8_path).get("calibration"),
        "results": results,
        "threads": args.threads,
    }
    (args.out_dir / "onnx_accuracy.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
