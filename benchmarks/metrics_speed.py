"""Polyp metric suite: images per second, ours against pysodmetrics, on the same real mask pairs in one run.

Pairs: the 100 Kvasir-SEG masks of PraNet's test split at their original sizes, each with a probability map made
from it (the mask shifted, blurred and noised). Ours runs the MONAI metric objects of ``monai_ecrm.metrics`` (MAE:
MONAI's ``MAEMetric``) on float32 tensors ``(1, 1, H, W)``, one image per call as an evaluator with original-size
outputs does, and ``polyp_metric_suite`` for the whole suite (what the evaluation report runs). pysodmetrics runs
its metric classes as its documentation and the polyp papers' scripts use them: 8-bit maps and 0/255 masks,
``normalize=True`` (``--reference-input float`` gives it float64 maps and bool masks with ``normalize=False``
instead, skipping its input normalisation). Each figure sums, over the images, the best of ``--repeats`` timings
of the image (other processes share the CPU); ours and the reference score each image one right after the other.

Ours is also timed batched: the images that share a size stacked into one ``(B, 1, H, W)`` call, as an evaluator
with a batch size above one (predictions compared at the network's size) feeds them.

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


def ours_steps(pairs, device: str) -> tuple[list, dict[str, Callable[[], Callable[[int], object]]]]:
    """Per metric, a factory of a fresh ``step(index)`` that scores pair ``index`` with our metric objects."""
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

    def metric_steps(factory):
        def fresh():
            metric = factory()
            return lambda index: metric(*tensors[index])

        return fresh

    steps = {name: metric_steps(factory) for name, factory in factories.items()}
    steps["suite"] = lambda: lambda index: polyp_metric_suite(*tensors[index])
    return tensors, steps, factories


def reference_steps(pairs, reference_input: str) -> dict[str, Callable[[], Callable[[int], object]]]:
    """Per metric, a factory of a fresh ``step(index)`` that scores pair ``index`` with pysodmetrics."""
    import py_sod_metrics as psm

    if reference_input == "uint8":
        inputs = [((pred * 255).round().astype(np.uint8), mask.astype(np.uint8) * 255) for pred, mask in pairs]
        normalize = True
    else:
        inputs = [(pred.astype(np.float64), mask) for pred, mask in pairs]
        normalize = False
    handlers = {"dice": psm.DICEHandler, "iou": psm.IOUHandler, "precision": psm.PrecisionHandler}
    handlers["recall"] = psm.RecallHandler

    def classes(*factories):
        def fresh():
            metrics = [factory() for factory in factories]

            def step(index):
                for metric in metrics:
                    metric.step(*inputs[index], normalize=normalize)

            return step

        return fresh

    def overlap(names):
        return lambda: psm.FmeasureV2({name: handlers[name](False, False, with_binary=True) for name in names})

    steps = {name: classes(overlap([name])) for name in handlers}
    steps["s_measure"] = classes(psm.Smeasure)
    # one Emeasure step computes the curve (mean, max) and the adaptive score together
    steps["e_measure_mean"] = steps["e_measure_max"] = steps["e_measure_adaptive"] = classes(psm.Emeasure)
    steps["weighted_f_measure"] = classes(psm.WeightedFmeasure)
    steps["mae"] = classes(psm.MAE)
    steps["suite"] = classes(overlap(list(handlers)), psm.Smeasure, psm.Emeasure, psm.WeightedFmeasure, psm.MAE)
    return steps


def batched_seconds(tensors: list, factories: dict, repeats: int) -> dict[str, float]:
    """Our metrics with the images that share a size stacked into one batch ``(B, 1, H, W)`` (how a MONAI evaluator
    with a batch size above one feeds them): per metric, the sum over the size groups of the best of ``repeats``."""
    groups: dict[tuple, list[int]] = {}
    for index, (pred, _) in enumerate(tensors):
        groups.setdefault(tuple(pred.shape), []).append(index)
    stacked = [
        (torch.cat([tensors[i][0] for i in indices]), torch.cat([tensors[i][1] for i in indices]))
        for indices in groups.values()
    ]
    totals = {}
    for name, factory in factories.items():
        total = 0.0
        for pred, mask in stacked:
            factory()(pred[:1], mask[:1])  # warm-up
            best = np.inf
            for _ in range(repeats):
                metric = factory()
                start = time.perf_counter()
                metric(pred, mask)
                best = min(best, time.perf_counter() - start)
            total += best
        totals[name] = total
    return totals, len(groups)


def timed(step: Callable[[int], object], index: int) -> float:
    start = time.perf_counter()
    step(index)
    return time.perf_counter() - start


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
    tensors, ours, factories = ours_steps(pairs, args.device)
    reference = reference_steps(pairs, args.reference_input)
    names = list(ours)
    count = len(pairs)
    # per image, the best time over the passes: other processes share the CPU, and ours and the reference score
    # each image one right after the other, so that both meet the same load
    best = {(side, name): np.full(count, np.inf) for side in ("ours", "reference") for name in names}
    for name in names:
        ours[name]()(0)  # warm-up
        for _ in range(args.repeats):
            ours_step, reference_step = ours[name](), reference[name]()
            for index in range(count):
                best["ours", name][index] = min(best["ours", name][index], timed(ours_step, index))
                if name in ("e_measure_max", "e_measure_adaptive"):
                    continue  # the same reference run as e_measure_mean
                best["reference", name][index] = min(best["reference", name][index], timed(reference_step, index))
    for name in ("e_measure_max", "e_measure_adaptive"):
        best["reference", name] = best["reference", "e_measure_mean"]
    seconds = {key: float(times.sum()) for key, times in best.items()}
    from monai_ecrm.metrics import polyp_metric_suite

    factories["suite"] = lambda: polyp_metric_suite
    batched, num_groups = batched_seconds(tensors, factories, args.repeats)

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
    for name, result in [*metrics.items(), ("suite", suite)]:
        rate = len(pairs) / batched[name]
        result["ours_batched_images_per_s"] = round(rate, 1)
        result["speedup_batched"] = round(rate / result["pysodmetrics_images_per_s"], 2)
    report = {
        "pairs": len(pairs),
        "data": "Kvasir-SEG masks of PraNet's test split, original sizes "
        f"{min(sizes)}..{max(sizes)} (H, W); predictions: the masks shifted, blurred and noised (float32)",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "timing": f"sum over the images of each image's best time in {args.repeats} passes",
        "pysodmetrics": {
            "version": getattr(py_sod_metrics, "__version__", "unknown"),
            "input": "uint8 maps, 0/255 masks, normalize=True"
            if args.reference_input == "uint8"
            else "float64 maps, bool masks, normalize=False",
        },
        "batched": f"ours also timed with same-size images stacked into one batch ({num_groups} size groups)",
        "metrics": metrics,
        "suite": suite,
        "targets": {
            "suite_at_least_3x": suite["speedup"] >= 3,
            "no_distance_transform_at_least_10x": {
                name: metrics[name]["speedup"] >= 10 for name in NO_DISTANCE_TRANSFORM
            },
            "batched_suite_at_least_3x": suite["speedup_batched"] >= 3,
            "batched_no_distance_transform_at_least_10x": {
                name: metrics[name]["speedup_batched"] >= 10 for name in NO_DISTANCE_TRANSFORM
            },
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
