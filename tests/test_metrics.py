"""The polyp metric suite equals pysodmetrics (the reference of the polyp papers' evaluation) on real masks."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from monai_ecrm.metrics import (
    SUITE_KEYS,
    EMeasureMetric,
    MAEMetric,
    PolypOverlapMetric,
    SMeasureMetric,
    WeightedFMeasureMetric,
    compute_mae,
    compute_overlap,
    compute_polyp_metrics,
    functional,
    polyp_metric_suite,
    score_pair,
)

psm = pytest.importorskip("py_sod_metrics", reason="pysodmetrics (test dependency) is the reference implementation")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR_MASKS = DATA / "kvasir_seg" / "masks"
TOLERANCE = 1e-4
N_MASKS = 8


@lru_cache(maxsize=1)
def kvasir_masks() -> tuple[np.ndarray, ...]:
    """Every 100th Kvasir-SEG mask at its original size (JPEG: foreground above 128)."""
    if not KVASIR_MASKS.is_dir():
        pytest.skip(f"real data absent: {KVASIR_MASKS} (see shared/data/SOURCES.md)")
    files = sorted(KVASIR_MASKS.glob("*.jpg"))[:: 1000 // N_MASKS][:N_MASKS]
    return tuple(np.asarray(Image.open(path).convert("L")) > 128 for path in files)


def blurred_map(mask: np.ndarray, seed: int) -> np.ndarray:
    """A soft probability map: the mask shifted, blurred and noised, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(mask, (int(rng.integers(-15, 15)), int(rng.integers(-15, 15))), axis=(0, 1))
    soft = ndimage.gaussian_filter(shifted.astype(np.float32), sigma=float(rng.uniform(2, 8)))
    return np.clip(soft + rng.normal(0, 0.03, mask.shape).astype(np.float32), 0, 1).astype(np.float32)


def perturbed_mask(mask: np.ndarray, seed: int) -> np.ndarray:
    """A binary prediction: the mask grown or shrunk, shifted, with a false-positive blob, as float32."""
    rng = np.random.default_rng(seed)
    grown = ndimage.binary_dilation(mask, iterations=5) if seed % 2 else ndimage.binary_erosion(mask, iterations=5)
    pred = np.roll(grown, int(rng.integers(-20, 20)), axis=1)
    pred[:25, :25] = True
    return pred.astype(np.float32)


def reference(pred: np.ndarray, gt: np.ndarray, normalize: bool = False) -> dict[str, float]:
    """The suite from pysodmetrics, as the polyp papers' evaluation scripts compute it."""
    handlers = {"dice": psm.DICEHandler, "iou": psm.IOUHandler, "precision": psm.PrecisionHandler}
    handlers["recall"] = psm.RecallHandler
    overlap = psm.FmeasureV2({name: cls(False, False, with_binary=True) for name, cls in handlers.items()})
    s_measure, e_measure, wf_measure, mae = psm.Smeasure(), psm.Emeasure(), psm.WeightedFmeasure(), psm.MAE()
    for metric in (overlap, s_measure, e_measure, wf_measure, mae):
        metric.step(pred, gt, normalize=normalize)
    scores = {name: float(value["binary"]) for name, value in overlap.get_results().items()}
    e_results = e_measure.get_results()["em"]
    scores.update(
        s_measure=float(s_measure.get_results()["sm"]),
        e_measure_mean=float(e_results["curve"].mean()),
        e_measure_max=float(e_results["curve"].max()),
        e_measure_adaptive=float(e_results["adp"]),
        weighted_f_measure=float(wf_measure.get_results()["wfm"]),
        mae=float(mae.get_results()["mae"]),
    )
    return scores


def assert_close(ours: dict[str, float], ref: dict[str, float], context: str) -> None:
    differences = {name: abs(ours[name] - ref[name]) for name in SUITE_KEYS}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, f"{context}: {worst} {ours[worst]} vs pysodmetrics {ref[worst]}"


@pytest.mark.parametrize("kind", ["blurred", "perturbed"])
def test_suite_matches_pysodmetrics_on_real_masks(kind):
    for index, gt in enumerate(kvasir_masks()):
        pred = blurred_map(gt, index) if kind == "blurred" else perturbed_mask(gt, index)
        assert_close(compute_polyp_metrics(pred, gt), reference(pred, gt), f"{kind} map {index} {gt.shape}")


def test_eight_bit_maps_match_pysodmetrics_reading_images():
    # what the papers' scripts do: PNG maps (uint8) and masks (0/255) read from disk, normalize=True
    for index, gt in enumerate(kvasir_masks()[:4]):
        grey = (blurred_map(gt, index) * 255).round().astype(np.uint8)
        grey[0, 0], grey[-1, -1] = 0, 255  # full range: the reference's min-max normalisation is then the identity
        ref = reference(grey, gt.astype(np.uint8) * 255, normalize=True)
        assert_close(compute_polyp_metrics(grey, gt), ref, f"8-bit map {index}")


@pytest.mark.parametrize("gt_kind", ["empty", "full", "real"])
@pytest.mark.parametrize("pred_kind", ["empty", "full", "blurred"])
def test_empty_and_full_masks_and_predictions_match_pysodmetrics(gt_kind, pred_kind):
    mask = kvasir_masks()[1]
    gt = {"empty": np.zeros_like(mask), "full": np.ones_like(mask), "real": mask}[gt_kind]
    pred = {"empty": np.zeros(mask.shape), "full": np.ones(mask.shape), "blurred": blurred_map(mask, 3)}[pred_kind]
    assert_close(compute_polyp_metrics(pred, gt), reference(pred, gt), f"gt {gt_kind}, pred {pred_kind}")


def test_perfect_prediction_scores_one_and_no_error():
    gt = kvasir_masks()[2]
    scores = compute_polyp_metrics(gt.astype(np.float32), gt)
    for name in ("dice", "iou", "precision", "recall", "s_measure", "e_measure_max", "weighted_f_measure"):
        # E-phi divides by (pixels - 1), as the reference and the original MATLAB code do: 1 + 1 / pixels at best
        assert scores[name] == pytest.approx(1.0, abs=1e-5), name
    assert scores["mae"] == 0.0


@pytest.mark.parametrize("metric_name", ["dice", "iou"])
@pytest.mark.parametrize("mode", ["adaptive", "mean", "max"])
def test_threshold_modes_match_pysodmetrics_curves(metric_name, mode):
    handler = {"dice": psm.DICEHandler, "iou": psm.IOUHandler}[metric_name]
    for index, gt in enumerate(kvasir_masks()[:4]):
        pred = blurred_map(gt, index)
        ref = psm.FmeasureV2({metric_name: handler(with_dynamic=True, with_adaptive=True)})
        ref.step(pred, gt, normalize=False)
        result = ref.get_results()[metric_name]
        expected = {"adaptive": result["adaptive"], "mean": result["dynamic"].mean(), "max": result["dynamic"].max()}
        ours = compute_overlap(
            torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], metric_name, 0.5, mode
        )
        assert float(ours) == pytest.approx(float(expected[mode]), abs=TOLERANCE), f"map {index}"


def test_metric_classes_score_images_of_different_sizes_like_the_suite():
    masks = kvasir_masks()[:4]
    preds = [torch.from_numpy(blurred_map(gt, i))[None] for i, gt in enumerate(masks)]
    labels = [torch.from_numpy(gt.astype(np.float32))[None] for gt in masks]
    assert len({p.shape for p in preds}) > 1, "the sample must mix image sizes"
    metrics = {
        "dice": PolypOverlapMetric("dice"),
        "iou": PolypOverlapMetric("iou"),
        "precision": PolypOverlapMetric("precision"),
        "recall": PolypOverlapMetric("recall"),
        "s_measure": SMeasureMetric(),
        "e_measure_mean": EMeasureMetric("mean"),
        "e_measure_max": EMeasureMetric("max"),
        "e_measure_adaptive": EMeasureMetric("adaptive"),
        "weighted_f_measure": WeightedFMeasureMetric(),
        "mae": MAEMetric(),
    }
    for start in (0, 2):  # two iterations of a batch of two, as an evaluator with decollated outputs calls them
        for metric in metrics.values():
            metric(preds[start : start + 2], labels[start : start + 2])
    expected = [polyp_metric_suite(p[None], y[None]) for p, y in zip(preds, labels)]
    for p, y, scores in zip(preds, labels, expected):
        assert float(compute_mae(p[None], y[None])) == pytest.approx(float(scores["mae"][0]), abs=1e-7)
    for name, metric in metrics.items():
        per_image = torch.stack([scores[name][0] for scores in expected]).float()
        assert torch.allclose(metric.aggregate("none").view(-1).float(), per_image, atol=1e-6), name
        if name != "e_measure_max":  # a dataset's max E-phi is the max of the mean curve: see the test below
            assert float(metric.aggregate()) == pytest.approx(float(per_image.mean()), abs=1e-6), name
        metric.reset()
        assert metric.get_buffer() is None, f"{name}: reset must empty the buffer between evaluations"


def test_dataset_scores_of_threshold_curves_match_pysodmetrics_over_several_images():
    # the papers' max E-phi (and max Dice) of a dataset: the maximum of the curve averaged over the images
    masks = kvasir_masks()[:4]
    # maps whose best thresholds differ (a dim map peaks low), so that the two definitions of the max differ
    pairs = [(blurred_map(gt, i) * (0.3 if i % 2 else 1.0), gt) for i, gt in enumerate(masks)]
    e_ref = psm.Emeasure()
    dice_ref = psm.FmeasureV2({"dice": psm.DICEHandler(with_dynamic=True, with_adaptive=False)})
    ours = {mode: EMeasureMetric(mode) for mode in ("mean", "max")}
    ours.update({f"dice_{mode}": PolypOverlapMetric("dice", mode=mode) for mode in ("mean", "max")})
    for pred, gt in pairs:
        e_ref.step(pred, gt, normalize=False)
        dice_ref.step(pred, gt, normalize=False)
        for metric in ours.values():
            metric(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None])
    e_curve, dice_curve = e_ref.get_results()["em"]["curve"], dice_ref.get_results()["dice"]["dynamic"]
    expected = {"mean": e_curve.mean(), "max": e_curve.max(), "dice_mean": dice_curve.mean()}
    expected["dice_max"] = dice_curve.max()
    per_image_max = float(ours["max"].aggregate("none").mean())
    assert per_image_max > e_curve.max() + 1e-3, "the sample must tell the two definitions of max E-phi apart"
    for name, metric in ours.items():
        assert float(metric.aggregate()) == pytest.approx(float(expected[name]), abs=TOLERANCE), name


def test_batched_images_score_as_one_by_one():
    gt = kvasir_masks()[0]
    preds = torch.stack([torch.from_numpy(blurred_map(gt, seed)) for seed in range(3)])[:, None]
    labels = torch.from_numpy(gt.astype(np.float32))[None, None].expand(3, -1, -1, -1)
    batched = polyp_metric_suite(preds, labels)
    for index in range(3):
        single = polyp_metric_suite(preds[index : index + 1], labels[index : index + 1])
        for name in SUITE_KEYS:
            assert float(batched[name][index]) == pytest.approx(float(single[name][0]), abs=1e-9), name


def test_torch_kernels_equal_the_numpy_fast_path(monkeypatch):
    # GPUs run the torch kernels; make sure they give the CPU's numbers
    masks = kvasir_masks()[:2]
    pairs = [(blurred_map(gt, i), gt) for i, gt in enumerate(masks)] + [(perturbed_mask(masks[0], 1), masks[0])]
    fast = [compute_polyp_metrics(pred, gt) for pred, gt in pairs]
    monkeypatch.setattr(functional, "_NUMPY_ON_CPU", False)
    for (pred, gt), expected in zip(pairs, fast):
        assert_close(compute_polyp_metrics(pred, gt), expected, "torch kernels")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_give_the_cpu_scores_on_the_same_device():
    gt = kvasir_masks()[0]
    pred = torch.from_numpy(blurred_map(gt, 0))[None, None]
    label = torch.from_numpy(gt.astype(np.float32))[None, None]
    on_gpu = polyp_metric_suite(pred.cuda(), label.cuda())
    on_cpu = polyp_metric_suite(pred, label)
    for name in SUITE_KEYS:
        assert on_gpu[name].device.type == "cuda", "results stay on the inputs' device (distributed gathering)"
        assert float(on_gpu[name][0]) == pytest.approx(float(on_cpu[name][0]), abs=TOLERANCE), name


def test_inputs_that_are_not_probability_maps_are_refused():
    label = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="sigmoid"):
        polyp_metric_suite(torch.randn(1, 1, 8, 8) * 5, label)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        polyp_metric_suite(torch.full((1, 1, 8, 8), float("nan")), label)
    with pytest.raises(ValueError, match="one foreground channel"):
        polyp_metric_suite(torch.rand(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        polyp_metric_suite(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="mode"):
        EMeasureMetric(mode="median")


def small_mask(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    """A small polyp-like ellipse, off centre."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    centre_r, centre_c = height * rng.uniform(0.3, 0.6), width * rng.uniform(0.3, 0.6)
    return ((rows - centre_r) / (height / 5)) ** 2 + ((cols - centre_c) / (width / 4)) ** 2 <= 1


def unstretched_map(kind: str, mask: np.ndarray) -> np.ndarray:
    """A prediction map whose range is not [0, 1]: what min-max normalisation changes (or leaves, if constant)."""
    blurred = ndimage.gaussian_filter(np.roll(mask, 4, axis=1).astype(np.float64), 3)
    blurred /= blurred.max()
    if kind == "dim":  # a Gaussian-blurred mask peaking at 0.6
        return (0.6 * blurred).astype(np.float32)
    if kind == "band":  # a map in [0.2, 0.7]
        return (0.2 + 0.5 * blurred).astype(np.float32)
    if kind == "band_uint8":  # an 8-bit map saved without normalisation, 40..180
        return np.round(40 + 140 * blurred).astype(np.uint8)
    return np.full(mask.shape, {"constant_0.3": 0.3, "constant_0": 0.0, "constant_1": 1.0}[kind], np.float32)


@pytest.mark.parametrize("gt_kind", ["mask", "empty", "full"])
@pytest.mark.parametrize("pred_kind", ["dim", "band", "band_uint8", "constant_0.3", "constant_0", "constant_1"])
def test_minmax_normalize_equals_pysodmetrics_on_maps_that_do_not_span_0_1(pred_kind, gt_kind):
    """The papers' numbers (pysodmetrics, normalize=True) on maps that are dim, squeezed, 8-bit or constant."""
    mask = small_mask()
    gt = {"mask": mask, "empty": np.zeros_like(mask), "full": np.ones_like(mask)}[gt_kind]
    pred = unstretched_map(pred_kind, mask)
    # pysodmetrics reads 8-bit maps (divided by 255) and 0/255 masks (above 128) when it normalises
    ref = reference(pred if pred.dtype == np.uint8 else pred.astype(np.float64) * 255, gt.astype(np.uint8) * 255, True)
    context = f"{pred_kind} map, {gt_kind} mask"
    assert_close(compute_polyp_metrics(pred, gt, normalize="minmax"), ref, context)
    assert_close(score_pair(pred, gt, normalize="minmax"), ref, f"score_pair, {context}")
    if pred_kind in ("dim", "band"):
        as_given = compute_polyp_metrics(pred, gt)
        assert_close(as_given, reference(pred, gt), f"default, {context}")
        assert abs(as_given["s_measure"] - ref["s_measure"]) > 1e-3, "the default scores the map as given"


def test_metric_classes_min_max_normalize_like_pysodmetrics():
    masks = [small_mask(60, 80, 1), small_mask(48, 64, 2), small_mask(52, 52, 3)]
    pairs = [(unstretched_map(kind, gt), gt) for kind, gt in zip(("dim", "band", "dim"), masks)]
    metrics = {
        "dice": PolypOverlapMetric("dice", normalize="minmax"),
        "iou": PolypOverlapMetric("iou", normalize="minmax"),
        "s_measure": SMeasureMetric(normalize="minmax"),
        "e_measure_mean": EMeasureMetric("mean", normalize="minmax"),
        "e_measure_max": EMeasureMetric("max", normalize="minmax"),
        "e_measure_adaptive": EMeasureMetric("adaptive", normalize="minmax"),
        "weighted_f_measure": WeightedFMeasureMetric(normalize="minmax"),
    }
    for pred, gt in pairs:
        for metric in metrics.values():
            metric(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None])
    expected = [reference(pred.astype(np.float64) * 255, gt.astype(np.uint8) * 255, True) for pred, gt in pairs]
    for name, metric in metrics.items():
        ours = metric.aggregate("none").view(-1).tolist()
        assert ours == pytest.approx([scores[name] for scores in expected], abs=TOLERANCE), name
    with pytest.raises(ValueError, match="normalize"):
        SMeasureMetric(normalize="zscore")
