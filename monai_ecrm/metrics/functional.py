"""The polyp metric suite as torch functions: Dice, IoU, precision, recall, S-, E- and weighted F-measure, MAE.

Conventions shared by every function here (they are those of PraNet's evaluation and of ``pysodmetrics``,
the reference implementation these functions equal within 1e-4):

- ``y_pred`` is the foreground *probability map* (for example the sigmoid of the logits) with values in [0, 1],
  shape ``(B, 1, H, W)``; it is not binarised by the caller. The structure and alignment measures
  (S-measure, E-measure, weighted F-measure) and MAE use the map itself; Dice, IoU, precision and recall
  binarise it (``y_pred > threshold``, or over 256 thresholds, see ``mode``).
  Maps saved as 8-bit images (PraNet's test scripts save min-max normalised maps) are divided by 255 first.
- ``y`` is the binary ground truth, values in {0, 1} (bool or float), shape ``(B, 1, H, W)``.
- Every score is per image, at the image's own size: batch images only when they share a size; images of
  different sizes go one per call (MONAI's metrics do this when given lists of channel-first tensors).
- An empty denominator gives 0 (a Dice of 0 when both the mask and the prediction are empty), as in
  ``pysodmetrics``.
- ``normalize``: ``None`` (the default) scores each map as given. ``"minmax"`` first stretches each map to span
  [0, 1], ``(map - min) / (max - min)``, and leaves a constant map as it is (:func:`minmax_normalize`): what
  ``pysodmetrics`` (``normalize=True``) and the polyp papers' test scripts do to every map (MATLAB's ``mapminmax``),
  so with it the suite equals theirs on maps that do not span [0, 1]. It is not the default because it changes what
  a map says: the map of a frame without a polyp, low everywhere, would be stretched into a confident detection, and
  a hesitant map of a polyp scored as a confident one. With ``"minmax"`` a map of any finite range is accepted; a
  constant map must still lie in [0, 1].

The passes over the pixels run on the device of ``y_pred``; the weighted F-measure's distance transform always
runs on the CPU through ``scipy.ndimage`` (its nearest-foreground indices, ties included, must be those of the
reference); the closing per-image formulas (a few numbers per image) run in float64 on the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

__all__ = [
    "OVERLAP_METRICS",
    "OVERLAP_MODES",
    "E_MEASURE_MODES",
    "SUITE_KEYS",
    "NORMALIZATIONS",
    "compute_overlap",
    "compute_overlap_curve",
    "compute_e_measure_curve",
    "compute_s_measure",
    "compute_e_measure",
    "compute_weighted_f_measure",
    "compute_mae",
    "polyp_metric_suite",
    "compute_polyp_metrics",
    "minmax_normalize",
]

EPS = float(np.spacing(1))  # MATLAB's eps, the constant the reference formulas use
OVERLAP_METRICS = ("dice", "iou", "precision", "recall")
OVERLAP_MODES = ("binary", "adaptive", "mean", "max")
E_MEASURE_MODES = ("mean", "max", "adaptive")
SUITE_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "s_measure",
    "e_measure_mean",
    "e_measure_max",
    "e_measure_adaptive",
    "weighted_f_measure",
    "mae",
)
NORMALIZATIONS = (None, "minmax")
"""Values of the ``normalize`` argument: score each map as given, or min-max normalise it first."""
_LEVELS = 256  # thresholds k / 255, k = 0..255, of the dynamic curves
_GAUSS_SIZE, _GAUSS_SIGMA = 7, 5.0  # MATLAB fspecial('gaussian', 7, 5) of the weighted F-measure
_NUMPY_ON_CPU = True  # see _use_numpy; the tests switch it off to check the torch kernels against it


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Each map stretched to span [0, 1] over its last two axes, ``(map - min) / (max - min)``; a constant map is
    returned as it is. The operations of ``pysodmetrics``' ``prepare_data``, so float64 maps give its values bit for
    bit.

    Args:
        maps: floating maps ``(..., H, W)``.
    """
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    varies = span > 0
    stretched = (maps - low) / torch.where(varies, span, torch.ones_like(span))
    return torch.where(varies, stretched, maps)


def _prepare(y_pred: torch.Tensor, y: torch.Tensor, normalize: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the inputs and returns ``(pred, gt)`` as ``(B, H, W)`` tensors of one floating dtype, ``pred``
    min-max normalised with ``normalize="minmax"``."""
    _check_normalize(normalize)
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"y_pred and y must be torch tensors, got {type(y_pred).__name__} and {type(y).__name__}.")
    if y_pred.ndim != 4 or y_pred.shape[1] != 1:
        raise ValueError(f"y_pred must have shape (B, 1, H, W) (one foreground channel), got {tuple(y_pred.shape)}.")
    if tuple(y.shape) != tuple(y_pred.shape):
        raise ValueError(f"y_pred and y shapes differ: {tuple(y_pred.shape)} and {tuple(y.shape)}.")
    if not y_pred.is_floating_point():
        raise TypeError(f"y_pred must be a floating probability map in [0, 1], got dtype {y_pred.dtype}.")
    if isinstance(y_pred, MetaTensor):  # metadata tracking slows every operation down
        y_pred = y_pred.as_tensor()
    if isinstance(y, MetaTensor):
        y = y.as_tensor()
    pred = y_pred.detach()[:, 0]
    if pred.dtype not in (torch.float32, torch.float64):
        pred = pred.float()
    if normalize == "minmax":
        pred = minmax_normalize(pred)
    low, high = torch.aminmax(pred)
    low, high = float(low), float(high)
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN
        raise ValueError(
            f"y_pred must hold probabilities in [0, 1] (apply a sigmoid to logits first), got range [{low}, {high}]."
        )
    gt = y.detach()[:, 0].to(device=pred.device, dtype=pred.dtype)
    return pred, gt


def _use_numpy(tensor: torch.Tensor) -> bool:
    """Threshold counts run through numpy on the CPU: its boolean masks are several times faster than torch's."""
    return _NUMPY_ON_CPU and tensor.device.type == "cpu"


def _as_host(values: torch.Tensor) -> np.ndarray:
    return values.detach().to("cpu", torch.float64).numpy()


def _to_result(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-image host values as a ``(B, 1)`` float64 tensor on the device of ``like`` (MONAI's metric layout)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=like.device).reshape(-1, 1)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with 0 where the denominator is 0 (the reference's convention)."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64), np.asarray(denominator, np.float64))
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _count_above(pred: torch.Tensor, gt: torch.Tensor, threshold: float | None) -> np.ndarray:
    """Per image, ``(true positives, predicted positives, foreground pixels)`` of the binarised map: ``(3, B)``.

    ``threshold`` binarises with ``pred > threshold``; ``None`` with the adaptive ``pred >= min(2 * mean, 1)``
    (Achanta et al., CVPR 2009), the mean taken in the dtype of ``pred`` as the reference does.
    """
    if _use_numpy(pred):
        counts = np.zeros((3, pred.shape[0]), dtype=np.float64)
        pred_np, gt_np = pred.numpy(), gt.numpy() != 0
        for index in range(pred.shape[0]):
            if threshold is None:
                binary = pred_np[index] >= min(2 * pred_np[index].mean(), 1)
            else:
                binary = pred_np[index] > threshold
            counts[1:, index] = np.count_nonzero(binary), np.count_nonzero(gt_np[index])
            counts[0, index] = np.count_nonzero(np.logical_and(binary, gt_np[index], out=binary))
        return counts
    if threshold is None:
        binary = pred >= (2 * _flat(pred).mean(1)).clamp_(max=1).view(-1, 1, 1)
    else:
        binary = pred > threshold
    foreground = gt != 0
    return _as_host(torch.stack([_flat(binary & foreground).sum(1), _flat(binary).sum(1), _flat(foreground).sum(1)]))


def _histogram(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Per image, the pixel counts of ``floor(255 * pred)`` (the reference's ``uint8`` cast) over the background
    and over the foreground: ``(B, 2, 256)`` on the host. The product is taken in the dtype of ``pred``, as the
    reference does, so that maps at a bin edge fall in the same bin."""
    batch = pred.shape[0]
    key = (pred * 255).floor_().add_(gt, alpha=_LEVELS).to(torch.int32)
    if batch > 1:
        offsets = torch.arange(batch, device=pred.device, dtype=torch.int32) * (2 * _LEVELS)
        key = key.add_(offsets.view(-1, 1, 1))
    counts = torch.bincount(key.reshape(-1), minlength=2 * _LEVELS * batch)
    return counts.view(batch, 2, _LEVELS).cpu().numpy()


def _curves(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ``(true positives, false positives)`` of ``pred >= k / 255`` for k = 255 down to 0: ``(B, 256)``."""
    flipped = histogram[:, :, ::-1]
    return np.cumsum(flipped[:, 1], axis=1), np.cumsum(flipped[:, 0], axis=1)


def _overlap_from_counts(metric_name: str, tp: np.ndarray, pred_pos: np.ndarray, gt_pos: np.ndarray) -> np.ndarray:
    if metric_name == "dice":
        return _divide(2 * tp, pred_pos + gt_pos)
    if metric_name == "iou":
        return _divide(tp, pred_pos + gt_pos - tp)
    if metric_name == "precision":
        return _divide(tp, pred_pos)
    return _divide(tp, gt_pos)


def _e_measure_from_counts(tp: np.ndarray, fp: np.ndarray, gt_pos: np.ndarray, size: int) -> np.ndarray:
    """E-measure of binarised maps from their counts (any shape; ``gt_pos`` broadcasts).

    The enhanced-alignment matrix takes one value per (prediction, ground truth) pixel class, so its sum is a
    weighted count of the four classes (Fan et al., IJCAI 2018).
    """
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    gt_pos = np.broadcast_to(np.asarray(gt_pos, np.float64), tp.shape)
    pred_pos = tp + fp
    pred_neg = size - pred_pos
    fn = gt_pos - tp
    tn = pred_neg - fn
    mean_pred, mean_gt = pred_pos / size, gt_pos / size

    def enhanced(demeaned_pred: np.ndarray, demeaned_gt: np.ndarray) -> np.ndarray:
        align = 2 * (demeaned_pred * demeaned_gt) / (demeaned_pred**2 + demeaned_gt**2 + EPS)
        return (align + 1) ** 2 / 4

    total = (
        enhanced(1 - mean_pred, 1 - mean_gt) * tp
        + enhanced(1 - mean_pred, -mean_gt) * fp
        + enhanced(-mean_pred, 1 - mean_gt) * fn
        + enhanced(-mean_pred, -mean_gt) * tn
    )
    total = np.where(gt_pos == 0, pred_neg, np.where(gt_pos == size, pred_pos, total))
    return total / (size - 1 + EPS)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def _check_normalize(normalize: str | None) -> str | None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}.")
    return normalize


def compute_overlap(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    metric_name: str = "dice",
    threshold: float = 0.5,
    mode: str = "binary",
    normalize: str | None = None,
) -> torch.Tensor:
    """Dice, IoU, precision or recall of binarised probability maps, per image.

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        metric_name: ``"dice"``, ``"iou"``, ``"precision"`` or ``"recall"``.
        threshold: the binarisation of ``mode="binary"``: foreground where ``y_pred > threshold``.
        mode: ``"binary"`` (one threshold; what PraNet's and Polyp-PVT's Python evaluations report),
            ``"adaptive"`` (``y_pred >= min(2 * mean(y_pred), 1)``), or ``"mean"`` / ``"max"`` over the 256
            thresholds k / 255 (``"mean"`` is the "meanDic" of PraNet's MATLAB evaluation).
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 1)`` float64 scores; 0 where the denominator is 0.
    """
    _check_choice("metric_name", metric_name, OVERLAP_METRICS)
    _check_choice("mode", mode, OVERLAP_MODES)
    pred, gt = _prepare(y_pred, y, normalize)
    if mode in ("mean", "max"):
        tp, fp = _curves(_histogram(pred, gt))
        scores = _overlap_from_counts(metric_name, tp, tp + fp, tp[:, -1:])  # threshold 0 keeps every pixel
        values = scores.mean(1) if mode == "mean" else scores.max(1)
    else:
        tp, pred_pos, gt_pos = _count_above(pred, gt, float(threshold) if mode == "binary" else None)
        values = _overlap_from_counts(metric_name, tp, pred_pos, gt_pos)
    return _to_result(values, y_pred)


def compute_e_measure(
    y_pred: torch.Tensor, y: torch.Tensor, mode: str = "mean", normalize: str | None = None
) -> torch.Tensor:
    """Enhanced-alignment measure E-phi per image (Fan et al., "Enhanced-alignment Measure for Binary Foreground
    Map Evaluation", IJCAI 2018).

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        mode: ``"mean"`` or ``"max"`` over the 256 thresholds k / 255 (the mean and max E-phi of PraNet's and
            Polyp-PVT's tables), or ``"adaptive"`` (threshold ``min(2 * mean(y_pred), 1)``).
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 1)`` float64 scores in [0, 1].
    """
    _check_choice("mode", mode, E_MEASURE_MODES)
    pred, gt = _prepare(y_pred, y, normalize)
    size = pred.shape[1] * pred.shape[2]
    if mode == "adaptive":
        tp, pred_pos, gt_pos = _count_above(pred, gt, None)
        values = _e_measure_from_counts(tp, pred_pos - tp, gt_pos, size)
    else:
        tp, fp = _curves(_histogram(pred, gt))
        curve = _e_measure_from_counts(tp, fp, tp[:, -1:], size)  # threshold 0 keeps every pixel
        values = curve.mean(1) if mode == "mean" else curve.max(1)
    return _to_result(values, y_pred)


def compute_overlap_curve(
    y_pred: torch.Tensor, y: torch.Tensor, metric_name: str = "dice", normalize: str | None = None
) -> torch.Tensor:
    """Dice, IoU, precision or recall of ``y_pred >= k / 255`` for k = 0..255, per image.

    PraNet's MATLAB evaluation reports the mean of this curve ("meanDic"); a dataset's max score is the maximum
    of the curve averaged over its images (see :class:`~monai_ecrm.metrics.PolypOverlapMetric`).

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        metric_name: ``"dice"``, ``"iou"``, ``"precision"`` or ``"recall"``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 256)`` float64, thresholds ascending.
    """
    _check_choice("metric_name", metric_name, OVERLAP_METRICS)
    pred, gt = _prepare(y_pred, y, normalize)
    tp, fp = _curves(_histogram(pred, gt))
    scores = _overlap_from_counts(metric_name, tp, tp + fp, tp[:, -1:])  # threshold 0 keeps every pixel
    return torch.as_tensor(scores[:, ::-1].copy(), device=y_pred.device)


def compute_e_measure_curve(y_pred: torch.Tensor, y: torch.Tensor, normalize: str | None = None) -> torch.Tensor:
    """E-phi of ``y_pred >= k / 255`` for k = 0..255, per image (Fan et al., IJCAI 2018).

    The polyp papers' mean and max E-phi of a dataset are the mean and the maximum of this curve averaged over
    the dataset's images (see :class:`~monai_ecrm.metrics.EMeasureMetric`).

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 256)`` float64, thresholds ascending.
    """
    pred, gt = _prepare(y_pred, y, normalize)
    tp, fp = _curves(_histogram(pred, gt))
    curve = _e_measure_from_counts(tp, fp, tp[:, -1:], pred.shape[1] * pred.shape[2])
    return torch.as_tensor(curve[:, ::-1].copy(), device=y_pred.device)


class _Moments(NamedTuple):
    """The sums of one image that the S-measure and MAE are made of (float64, see ``_moments``)."""

    blocks: list[list[float]]  # top-left, top-right, bottom-left, bottom-right: [sum q, sum q**2, sum q*gt, sum gt]
    fg_square_sum: float  # sum of q**2 over the foreground
    cut: tuple[int, int]  # (cy, cx): rows < cy are the top blocks, columns < cx the left ones

    def totals(self) -> list[float]:
        return [sum(block[k] for block in self.blocks) for k in range(4)]


def _moments(pred: torch.Tensor, gt: torch.Tensor) -> list[_Moments]:
    """Per image, the sums of the S-measure's object and region terms, and of MAE.

    They are sums of the error map ``q = pred - gt`` rather than of ``pred``: ``q`` is near zero wherever the
    prediction is good, so the variances lose no digits to cancellation although the pixel sums are float32
    (row sums, added up in float64); the counts of ``gt`` are exact. The blocks are those the foreground
    centroid cuts (rounded half to even, plus one, as the reference).
    """
    batch, height, width = pred.shape
    planes = torch.empty((4, height, width), device=pred.device, dtype=pred.dtype)
    error, square, fg_error, fg_square = planes
    moments = []
    for index in range(batch):
        mask = gt[index]
        torch.sub(pred[index], mask, out=error)
        torch.mul(error, error, out=square)
        torch.mul(error, mask, out=fg_error)
        torch.mul(fg_error, fg_error, out=fg_square)
        # per row: sums of q, q**2, q * gt, q**2 * gt and gt
        row_sums = _as_host(torch.cat([planes.sum(2), mask.sum(1)[None]]))
        fg_cols, fg_rows = _as_host(mask.sum(0)), row_sums[4]
        fg_count = fg_rows.sum()
        if fg_count > 0:  # exact integer sums; np.round rounds half to even, as the reference's centroid does
            cy = int(np.round(fg_rows @ np.arange(height) / fg_count))
            cx = int(np.round(fg_cols @ np.arange(width) / fg_count))
        else:
            cy, cx = int(np.round(height / 2)), int(np.round(width / 2))
        cy, cx = min(cy + 1, height), min(cx + 1, width)
        left = _as_host(torch.cat([planes[:3, :, :cx].sum(2), mask[None, :, :cx].sum(2)]))  # (4, H)
        whole = row_sums[[0, 1, 2, 4]]
        top_left, bottom_left = left[:, :cy].sum(1), left[:, cy:].sum(1)
        top_right, bottom_right = whole[:, :cy].sum(1) - top_left, whole[:, cy:].sum(1) - bottom_left
        blocks = [top_left.tolist(), top_right.tolist(), bottom_left.tolist(), bottom_right.tolist()]
        moments.append(_Moments(blocks, float(row_sums[3].sum()), (cy, cx)))
    return moments


def _s_object(count: float, mean: float, error_sum: float, error_square_sum: float) -> float:
    """``2 * mean / (mean**2 + 1 + std + eps)`` of a region (``std`` with ``ddof=1``, from the error sums)."""
    std = math.sqrt(max(error_square_sum - error_sum**2 / count, 0.0) / (count - 1)) if count > 1 else 0.0
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _ssim(count: float, error_sum: float, error_square_sum: float, fg_error_sum: float, fg_count: float) -> float:
    """The region term's SSIM of one block from its pixel count and its sums (see ``_moments``).

    An empty block scores 0: its weight is 0 (the reference gives NaN there).
    """
    if count == 0:
        return 0.0
    mean_error, y = error_sum / count, fg_count / count
    x = mean_error + y
    # centred sums of q and gt; a block whose ground truth is constant has exactly zero gt variance and
    # covariance, and the "alpha == 0" branch below depends on it
    gt_constant = fg_count in (0, count)
    centred_gg = 0.0 if gt_constant else fg_count - fg_count * y
    centred_qg = 0.0 if gt_constant else fg_error_sum - error_sum * y
    centred_qq = max(error_square_sum - error_sum * mean_error, 0.0)
    sigma_x = max(centred_qq + 2 * centred_qg + centred_gg, 0.0) / (count - 1 + EPS)
    sigma_y = centred_gg / (count - 1 + EPS)
    sigma_xy = (centred_qg + centred_gg) / (count - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x**2 + y**2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _s_measure_one(moments: _Moments, height: int, width: int, alpha: float) -> float:
    size = height * width
    error_sum, error_square_sum, fg_error_sum, fg_count = moments.totals()
    mean_pred = (error_sum + fg_count) / size
    if fg_count == 0:
        return 1 - mean_pred
    if fg_count == size:
        return mean_pred
    bg_count, bg_error_sum = size - fg_count, error_sum - fg_error_sum
    # the object term scores pred over the foreground (pred = 1 + q) and 1 - pred over the background (1 - q)
    fg_score = _s_object(fg_count, 1 + fg_error_sum / fg_count, fg_error_sum, moments.fg_square_sum)
    bg_score = _s_object(bg_count, 1 - bg_error_sum / bg_count, bg_error_sum, error_square_sum - moments.fg_square_sum)
    fg_ratio = fg_count / size
    object_score = fg_score * fg_ratio + bg_score * (1 - fg_ratio)
    cy, cx = moments.cut
    counts = [cy * cx, cy * (width - cx), (height - cy) * cx, (height - cy) * (width - cx)]
    weights = [count / size for count in counts[:3]]
    weights.append(1 - sum(weights))
    region_score = sum(weight * _ssim(count, *block) for weight, count, block in zip(weights, counts, moments.blocks))
    return max(0.0, alpha * object_score + (1 - alpha) * region_score)


def compute_s_measure(
    y_pred: torch.Tensor, y: torch.Tensor, alpha: float = 0.5, normalize: str | None = None
) -> torch.Tensor:
    """Structure measure S-alpha per image (Fan et al., "Structure-measure: A New Way to Evaluate Foreground
    Maps", ICCV 2017): ``alpha * object + (1 - alpha) * region`` structural similarity.

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        alpha: weight of the object-aware term (0.5 in the polyp papers).
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 1)`` float64 scores in [0, 1]. An empty mask scores ``1 - mean(y_pred)``, a full one ``mean(y_pred)``.
    """
    pred, gt = _prepare(y_pred, y, normalize)
    values = [_s_measure_one(moments, *pred.shape[1:], alpha) for moments in _moments(pred, gt)]
    return _to_result(np.array(values), y_pred)


def _gaussian_taps() -> list[float]:
    """1-D factor of MATLAB's ``fspecial('gaussian', 7, 5)`` (the 2-D kernel is its outer product)."""
    half = (_GAUSS_SIZE - 1) / 2
    offsets = np.arange(-half, half + 1)
    taps = np.exp(-(offsets**2) / (2 * _GAUSS_SIGMA**2))
    return (taps / taps.sum()).tolist()


def _weighted_errors(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    """``(weighted error summed over the foreground, weighted false positives FPw)`` of one ``(H, W)`` map.

    Margolin et al., CVPR 2014: a background pixel's error is weighted by ``2 - 0.5 ** (d / 5)``, ``d`` its
    distance to the foreground; a foreground pixel's error is the smaller of its own and of the 7x7 Gaussian
    blur of the error map in which each background pixel takes the error of its nearest foreground pixel.
    The blur is needed on the foreground only, so it runs on the foreground's bounding box grown by the
    kernel radius (zero outside the image, as MATLAB's ``imfilter``). Requires a non-empty foreground.
    """
    height, width = pred.shape
    background = gt.cpu().numpy() == 0
    nearest = ndimage.distance_transform_edt(background, return_distances=False, return_indices=True)
    nearest = torch.from_numpy(nearest).to(pred.device)
    rows = torch.arange(height, device=pred.device, dtype=pred.dtype).view(-1, 1)
    cols = torch.arange(width, device=pred.device, dtype=pred.dtype)
    row_offset, col_offset = nearest[0].to(pred.dtype).sub_(rows), nearest[1].to(pred.dtype).sub_(cols)
    distance = row_offset.mul_(row_offset).addcmul_(col_offset, col_offset).sqrt_()  # exact: integer squares
    # importance 2 - 0.5 ** (d / 5) on the background; minus gt, so that it is 0 on the foreground (d = 0 there)
    importance = distance.mul_(math.log(0.5) / 5).exp_().neg_().add_(2).sub_(gt)
    fp_weighted = float(torch.mul(pred, importance).sum())  # non-negative terms, summed pairwise: no cancellation

    radius = _GAUSS_SIZE // 2
    fg_rows, fg_cols = np.flatnonzero(~background.all(1)), np.flatnonzero(~background.all(0))
    top, bottom = max(fg_rows[0] - radius, 0), min(fg_rows[-1] + radius + 1, height)
    left, right = max(fg_cols[0] - radius, 0), min(fg_cols[-1] + radius + 1, width)
    box = nearest[:, top:bottom, left:right]
    error_at_nearest = 1 - pred.reshape(-1)[(box[0] * width + box[1]).long()]  # nearest pixels are foreground
    box_height, box_width = error_at_nearest.shape
    padded = torch.nn.functional.pad(error_at_nearest, (radius, radius, radius, radius))
    taps = _gaussian_taps()
    blurred_rows = torch.zeros((box_height + 2 * radius, box_width), device=pred.device, dtype=pred.dtype)
    for shift, tap in enumerate(taps):
        blurred_rows.add_(padded[:, shift : shift + box_width], alpha=tap)
    blurred = torch.zeros((box_height, box_width), device=pred.device, dtype=pred.dtype)
    for shift, tap in enumerate(taps):
        blurred.add_(blurred_rows[shift : shift + box_height], alpha=tap)
    own_error = 1 - pred[top:bottom, left:right]
    fg_box = gt[top:bottom, left:right]
    fg_error = float(torch.minimum(own_error, blurred).mul_(fg_box).sum())  # non-negative terms
    return fg_error, fp_weighted


def _weighted_f_per_image(pred: torch.Tensor, gt: torch.Tensor, fg_counts: np.ndarray, beta: float) -> np.ndarray:
    fg_error, fp_weighted = np.zeros(len(fg_counts)), np.zeros(len(fg_counts))
    for index, count in enumerate(fg_counts):
        if count > 0:
            fg_error[index], fp_weighted[index] = _weighted_errors(pred[index], gt[index])
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = 1 - fg_error / fg_counts
        tp_weighted = fg_counts - fg_error
        precision = tp_weighted / (tp_weighted + fp_weighted + EPS)
        score = (1 + beta) * recall * precision / (recall + beta * precision + EPS)
    return np.where(fg_counts > 0, score, 0.0)


def compute_weighted_f_measure(
    y_pred: torch.Tensor, y: torch.Tensor, beta: float = 1.0, normalize: str | None = None
) -> torch.Tensor:
    """Weighted F-measure F-beta-w per image (Margolin et al., "How to Evaluate Foreground Maps?", CVPR 2014).

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        beta: the weight of precision against recall, ``beta**2`` in the usual notation (1 in the polyp papers).
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 1)`` float64 scores in [0, 1]; 0 for an empty mask.
    """
    pred, gt = _prepare(y_pred, y, normalize)
    fg_counts = _as_host(_flat(gt).sum(1))
    return _to_result(_weighted_f_per_image(pred, gt, fg_counts, beta), y_pred)


def compute_mae(y_pred: torch.Tensor, y: torch.Tensor, normalize: str | None = None) -> torch.Tensor:
    """Mean absolute error between the probability map and the mask per image (Perazzi et al., "Saliency Filters:
    Contrast Based Filtering for Salient Region Detection", CVPR 2012).

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``(B, 1)`` float64 errors in [0, 1].
    """
    pred, gt = _prepare(y_pred, y, normalize)
    return _to_result(_as_host(_flat((pred - gt).abs_()).sum(1)) / gt[0].numel(), y_pred)


def polyp_metric_suite(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    threshold: float = 0.5,
    return_curve: bool = False,
    normalize: str | None = None,
) -> dict[str, torch.Tensor]:
    """The whole suite at once, sharing the passes over the pixels: the columns of the polyp papers' tables.

    Args:
        y_pred: foreground probabilities in [0, 1], ``(B, 1, H, W)``.
        y: binary ground truth, ``(B, 1, H, W)``.
        threshold: binarisation of Dice, IoU, precision and recall (``y_pred > threshold``).
        return_curve: also return ``"e_measure_curve"``, ``(B, 256)`` (see ``compute_e_measure_curve``): a
            dataset's max E-phi is the maximum of the mean curve, not the mean of the images' maxima.
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``{name: (B,) float64 tensor}`` for the names in ``SUITE_KEYS``: ``dice``, ``iou``, ``precision``,
        ``recall`` (binary), ``s_measure`` (alpha 0.5), ``e_measure_mean``, ``e_measure_max``,
        ``e_measure_adaptive`` (per image), ``weighted_f_measure`` (beta 1) and ``mae``.
    """
    pred, gt = _prepare(y_pred, y, normalize)
    height, width = pred.shape[1:]
    size = height * width
    moments = _moments(pred, gt)
    error_sum, _, fg_error_sum, fg_counts = np.array([image.totals() for image in moments]).T
    tp, pred_pos, _ = _count_above(pred, gt, float(threshold))
    tp_adaptive, pred_pos_adaptive, _ = _count_above(pred, gt, None)
    tp_curve, fp_curve = _curves(_histogram(pred, gt))
    e_curve = _e_measure_from_counts(tp_curve, fp_curve, fg_counts[:, None], size)
    results = {name: _overlap_from_counts(name, tp, pred_pos, fg_counts) for name in OVERLAP_METRICS}
    results["s_measure"] = np.array([_s_measure_one(image, height, width, 0.5) for image in moments])
    results["e_measure_mean"] = e_curve.mean(1)
    results["e_measure_max"] = e_curve.max(1)
    results["e_measure_adaptive"] = _e_measure_from_counts(
        tp_adaptive, pred_pos_adaptive - tp_adaptive, fg_counts, size
    )
    results["weighted_f_measure"] = _weighted_f_per_image(pred, gt, fg_counts, 1.0)
    # |pred - gt| = q over the background, -q over the foreground
    results["mae"] = (error_sum - 2 * fg_error_sum) / size
    scores = {name: _to_result(results[name], y_pred).view(-1) for name in SUITE_KEYS}
    if return_curve:
        scores["e_measure_curve"] = torch.as_tensor(e_curve[:, ::-1].copy(), device=y_pred.device)
    return scores


def _as_map(array: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be one 2-D map (H, W) or (1, H, W), got shape {tuple(tensor.shape)}.")
    return tensor


def compute_polyp_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    threshold: float = 0.5,
    normalize: str | None = None,
) -> dict[str, float]:
    """The suite for one prediction and mask pair, usable outside an engine.

    Args:
        pred: the prediction, ``(H, W)`` or ``(1, H, W)``: a float probability map in [0, 1], or an 8-bit
            grey map (``uint8``, divided by 255).
        gt: the mask, same shape: ``bool``; ``uint8`` (foreground above 128, as the reference reads mask
            images); or float (foreground above 0.5).
        threshold: binarisation of Dice, IoU, precision and recall (``pred > threshold``).
        normalize: ``"minmax"`` stretches each map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given (see the module docstring).

    Returns:
        ``{name: float}`` for the names in ``SUITE_KEYS``.
    """
    scores = polyp_metric_suite(*_pair_tensors(pred, gt), threshold=threshold, normalize=normalize)
    return {name: float(value[0]) for name, value in scores.items()}


def _pair_tensors(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair as ``(1, 1, H, W)`` tensors: ``uint8`` maps divided by 255, masks binarised (see
    ``compute_polyp_metrics``)."""
    pred_map, gt_map = _as_map(pred, "pred"), _as_map(gt, "gt")
    if pred_map.dtype == torch.uint8:
        pred_map = pred_map.double() / 255
    if gt_map.dtype == torch.uint8:
        gt_map = gt_map > 128
    elif gt_map.is_floating_point():
        gt_map = gt_map > 0.5
    return pred_map[None, None], gt_map[None, None]
