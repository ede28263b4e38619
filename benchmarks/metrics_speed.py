"""Polyp metric suite: images per second, ours against pysodmetrics, on the same real mask pairs in one run.

Pairs: the 100 Kvasir-SEG masks of PraNet's test split at their original sizes, each with a probability map made
from it (the mask shifted, blurred and noised). Ours runs the MONAI metric objects of ``monai_ecrm.metrics`` (MAE:
MONAI's ``MAEMetric``) on float32 tensors ``(1, 1, H, W)``, one image per call as an evaluator with original-size
outputs does, and ``polyp_metric_suite`` for the whole suite (what the evaluation report runs). pysodmetrics runs
its metric classes as its documentation and the polyp papers' scripts use them: 8-bit maps and 0/255 masks,
``normalize=True`` (``--reference-input float`` gives it float64 maps and bool masks with ``normalize=False``
instead, skipping its input normalisation). Each figure is the best of ``--repeats`` passes over all pairs (other
processes share the CPU); ours and the reference alternate within a pass.

Usage: ``python benchmarks/metrics_speed.py [--repeats 3] [--images 100] [--device cpu] [--threads 1]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NO_DISTANCE_TRANSFORM = ("dice", "iou", "precision", "recall", "s_measure", "e_measure_mean", "e_measure_max")
NO_DISTANCE_TRANSFORM += ("e_measure_adaptive", "mae")


def load_pairs(data: Path, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(probability map float32, mask bool)`` pairs at original size, deterministic."""
    ids = (data / "pranet_split" / "test_kvasir.txt").read_text().split()[:count]
    pairs = []
    for index, name in enumerate(ids):
        mask = np.asarray(Image.open(data / "kvasir_seg" / "masks" / f"{name}.jpg").convert("L")) > 128
        rng = np.random.default_rng(index)
        shifted = np.roll(mask, (int(rng.integers(-15, 15)), int(rng.integers(-15, 15))), axis=(0, 1))
        soft = ndimage.gaussian_filter(shifted.astype(np.float32), sigma=float(rng.uniform(2, 8)))
        soft = np.clip(soft + rng.normal(0, 0.03, mask.shape).astype(np.float32), 0, 1).astype(np.float32)
        pairs.append((soft, mask))
    return pairs


def ours_runs(pairs, device: str) -> dict[str, Callable[[], object]]:
    from monai_ecrm.metrics import (
        EMeasureMetric,
        MAEMetric,
        PolypOverlapMetric,
        SMeasureMetric,
        WeightedFMeasureMetric,
        polyp_metric_suite,
    )

    tensors = [
        (
            torch.from_numpy(pred)[None, None].to(device),
            torch.from_numpy(mask.astype(np.float32))[None, None].to(device),
        )
        for pred, mask in pairs
    ]
    factories = {
        "dice": lambda: PolypOverlapMetric("dice"),
        "iou": lambda: PolypOverlapMetric("iou"),
        "precision": lambda: PolypOverlapMetric("precision"),
        "recall": lambda: PolypOverlapMetric("recall"),
        "s_measure": SMeasureMetric,
        "e_measure_mean": lambda: EMeasureMetric("mean"),
        "e_measure_max": lambda: EMeasureMetric("max"),
        "e_measure_adaptive": lambda: EMeasureMetric("adaptive"),
        "weighted_f_measure": WeightedFMeasureMetric,
        "mae": MAEMetric,
    }

    def metric_run(factory):
        def run():
            metric = factory()
            for pred, label in tensors:
                metric(pred, label)
            return float(metric.aggregate())

        return run

    def suite_run():
        return [polyp_metric_suite(pred, label) for pred, label in tensors]

    runs = {name: metric_run(factory) for name, factory in factories.items()}
    runs["suite"] = suite_run
    return runs


def reference_runs(pairs, reference_input: str) -> dict[str, Callable[[], object]]:
    import py_sod_metrics as psm

    if reference_input == "uint8":
        inputs = [((pred * 255).round().astype(np.uint8), mask.astype(np.uint8) * 255) for pred, mask in pairs]
        normalize = True
    else:
        inputs = [(pred.astype(np.float64), mask) for pred, mask in pairs]
        normalize = False
    handlers = {"dice": psm.DICEHandler, "iou": psm.IOUHandler, "precision": psm.PrecisionHandler}
    handlers["recall"] = psm.RecallHandler

    def run_classes(*factories):
        def run():
            metrics = [factory() for factory in factories]
            for pred, mask in inputs:
                for metric in metrics:
                    metric.step(pred, mask, normalize=normalize)
            return [metric.get_results() for metric in metrics]

        return run

    def overlap(names):
        return lambda: psm.FmeasureV2({name: handlers[name](False, False, with_binary=True) for name in names})

    runs = {name: run_classes(overlap([name])) for name in handlers}
    runs["s_measure"] = run_classes(psm.Smeasure)
    # one Emeasure step computes the curve (mean, max) and the adaptive score together
    runs["e_measure_mean"] = runs["e_measure_max"] = runs["e_measure_adaptive"] = run_classes(psm.Emeasure)
    runs["weighted_f_measure"] = run_classes(psm.WeightedFmeasure)
    runs["mae"] = run_classes(psm.MAE)
    runs["suite"] = run_classes(overlap(list(handlers)), psm.Smeasure, psm.Emeasure, psm.WeightedFmeasure, psm.MAE)
    return runs


def best_seconds(run: Callable[[], object], best: float) -> float:
    start = time.perf_counter()
    run()
    return min(best, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (numpy runs on one)")
    parser.add_argument("--reference-input", choices=("uint8", "float"), default="uint8")
    args = parser.parse_args()
    if not (args.data / "kvasir_seg" / "masks").is_dir():
        raise SystemExit(f"real data absent: {args.data / 'kvasir_seg'} (see shared/data/SOURCES.md)")
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.data, args.images)
    ours, reference = ours_runs(pairs, args.device), reference_runs(pairs, args.reference_input)
    names = list(ours)
    for name in names:  # warm-up: first calls, caches
        ours[name]()
    seconds = {("ours", name): float("inf") for name in names}
    seconds.update({("reference", name): float("inf") for name in names})
    reference_done: dict[int, float] = {}
    for _ in range(args.repeats):
        reference_done.clear()
        for name in names:
            seconds["ours", name] = best_seconds(ours[name], seconds["ours", name])
            shared = id(reference[name])  # the three E-measure entries share one reference run per pass
            if shared not in reference_done:
                reference_done[shared] = best_seconds(reference[name], seconds["reference", name])
            seconds["reference", name] = reference_done[shared]

    def entry(name: str) -> dict[str, float]:
        ours_rate, reference_rate = len(pairs) / seconds["ours", name], len(pairs) / seconds["reference", name]
        return {
            "ours_images_per_s": round(ours_rate, 1),
            "pysodmetrics_images_per_s": round(reference_rate, 1),
            "speedup": round(ours_rate / reference_rate, 2),
        }

    import py_sod_metrics

    sizes = [mask.shape for _, mask in pairs]
    metrics = {name: entry(name) for name in names if name != "suite"}
    suite = entry("suite")
    report = {
        "pairs": len(pairs),
        "data": "Kvasir-SEG masks of PraNet's test split, original sizes "
        f"{min(sizes)}..{max(sizes)} (H, W); predictions: the masks shifted, blurred and noised (float32)",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "timing": f"best of {args.repeats} passes over all pairs",
        "pysodmetrics": {
            "version": getattr(py_sod_metrics, "__version__", "unknown"),
            "input": "uint8 maps, 0/255 masks, normalize=True"
            if args.reference_input == "uint8"
            else "float64 maps, bool masks, normalize=False",
        },
        "metrics": metrics,
        "suite": suite,
        "targets": {
            "suite_at_least_3x": suite["speedup"] >= 3,
            "no_distance_transform_at_least_10x": {
                name: metrics[name]["speedup"] >= 10 for name in NO_DISTANCE_TRANSFORM
            },
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
