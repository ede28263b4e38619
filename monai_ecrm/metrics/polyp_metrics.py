"""The polyp metric suite as MONAI cumulative metrics: call per batch, ``aggregate()`` at the end, ``reset()``.

Each metric takes ``y_pred``, the foreground *probability map* in [0, 1] (the sigmoid of the logits, not a thresholded
mask: the structure and alignment measures score the map itself), and ``y``, the binary mask, both ``(B, 1, H, W)``
or lists of ``(1, H, W)`` tensors of different sizes (one image per entry, MONAI's ``decollate`` layout). Scores are
computed per image at the size they are given, then reduced like MONAI's metrics. MAE is MONAI's own
``monai.metrics.MAEMetric``, exported here beside the others.

The numbers equal those of ``pysodmetrics`` (the reference implementation of the salient-object and polyp papers'
evaluation) within 1e-4; see :mod:`monai_ecrm.metrics.functional` for the conventions. ``pysodmetrics`` min-max
normalises every map first: ``normalize="minmax"`` does the same (the default, ``None``, scores the maps as given).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from monai_ecrm.metrics.functional import (
    E_MEASURE_MODES,
    OVERLAP_METRICS,
    OVERLAP_MODES,
    _check_choice,
    _check_normalize,
    compute_e_measure,
    compute_e_measure_curve,
    compute_overlap,
    compute_overlap_curve,
    compute_s_measure,
    compute_weighted_f_measure,
)

__all__ = ["PolypOverlapMetric", "SMeasureMetric", "EMeasureMetric", "WeightedFMeasureMetric"]


class _PerImageMetric(CumulativeIterationMetric):
    """Buffers one score per image, ``(B, 1)`` per call, and reduces them like MONAI's regression metrics.

    Args:
        reduction: MONAI's reduction of the buffered ``(N, 1)`` scores, ``"mean"`` by default; ``"none"`` returns them.
        get_not_nans: also return the count of non-NaN scores.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """

    def __init__(
        self,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        normalize: str | None = None,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans
        self.normalize = _check_normalize(normalize)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduces the buffered per-image scores.

        Args:
            reduction: overrides the reduction given at construction.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no scores to aggregate: call it on a batch first.")
        scores, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (scores, not_nans) if self.get_not_nans else scores


class _CurveMetric(_PerImageMetric):
    """Buffers, in the ``"mean"`` and ``"max"`` modes, each image's curve over the 256 thresholds ``(B, 256)``, and
    reduces a dataset as the reference and the papers do: the mean or the maximum of the curve averaged over the
    images (the maximum of the mean curve is not the mean of the images' maxima). ``reduction="none"`` gives
    each image's own mean or maximum; only ``"mean"`` (or ``"mean_batch"``) and ``"none"`` apply to curves.
    """

    mode: str

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.mode not in ("mean", "max"):
            return super().aggregate(reduction)
        curves = self.get_buffer()
        if not isinstance(curves, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no scores to aggregate: call it on a batch first.")
        reduction = MetricReduction(reduction or self.reduction)
        valid = ~curves.isnan().any(1)
        if reduction == MetricReduction.NONE:
            scores = curves.mean(1, keepdim=True) if self.mode == "mean" else curves.amax(1, keepdim=True)
        elif reduction in (MetricReduction.MEAN, MetricReduction.MEAN_BATCH):
            mean_curve = curves[valid].mean(0)
            scores = mean_curve.mean() if self.mode == "mean" else mean_curve.amax()
        else:
            raise ValueError(
                f"{type(self).__name__} in mode {self.mode!r} reduces with 'mean' or 'none', not {reduction}."
            )
        not_nans = valid.sum().to(scores.dtype)
        return (scores, not_nans) if self.get_not_nans else scores


class PolypOverlapMetric(_CurveMetric):
    """Dice, IoU, precision or recall of the thresholded probability map, per image.

    Dice (Dice, Ecology 1945) and IoU (Jaccard, 1912) as the polyp papers report them (PraNet, Fan et al.,
    MICCAI 2020; DCRNet, Yin et al., ISBI 2022; Polyp-PVT, Dong et al., CAAI AIR 2023). Unlike MONAI's
    ``DiceMetric`` it takes the probability map, offers the 256-threshold curve of PraNet's MATLAB evaluation and
    the adaptive threshold, and scores 0 where the denominator is empty (an empty mask predicted empty), as
    ``pysodmetrics`` does.

    Args:
        metric_name: ``"dice"``, ``"iou"``, ``"precision"`` or ``"recall"``.
        threshold: foreground where ``y_pred > threshold`` (``mode="binary"``).
        mode: ``"binary"`` (one threshold), ``"adaptive"`` (``y_pred >= min(2 * mean(y_pred), 1)``), or
            ``"mean"`` / ``"max"`` of the curve over the 256 thresholds k / 255 averaged over the images.
        reduction: MONAI's reduction of the per-image scores (``"mean"``; ``"none"`` keeps them).
        get_not_nans: also return the count of non-NaN scores.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """

    def __init__(
        self,
        metric_name: str = "dice",
        threshold: float = 0.5,
        mode: str = "binary",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        normalize: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans, normalize=normalize)
        self.metric_name = _check_choice("metric_name", metric_name, OVERLAP_METRICS)
        self.threshold = threshold
        self.mode = _check_choice("mode", mode, OVERLAP_MODES)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if self.mode in ("mean", "max"):
            return compute_overlap_curve(_require(y_pred, y), y, self.metric_name, self.normalize)
        return compute_overlap(_require(y_pred, y), y, self.metric_name, self.threshold, self.mode, self.normalize)


class SMeasureMetric(_PerImageMetric):
    """Structure measure S-alpha per image (Fan et al., "Structure-measure: A New Way to Evaluate Foreground
    Maps", ICCV 2017).

    Args:
        alpha: weight of the object-aware term against the region-aware one (0.5 in the polyp papers).
        reduction: MONAI's reduction of the per-image scores (``"mean"``; ``"none"`` keeps them).
        get_not_nans: also return the count of non-NaN scores.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        normalize: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans, normalize=normalize)
        self.alpha = alpha

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return compute_s_measure(_require(y_pred, y), y, self.alpha, self.normalize)


class EMeasureMetric(_CurveMetric):
    """Enhanced-alignment measure E-phi per image (Fan et al., "Enhanced-alignment Measure for Binary Foreground
    Map Evaluation", IJCAI 2018).

    Args:
        mode: ``"mean"`` or ``"max"`` of the curve over the 256 thresholds k / 255 averaged over the images (mean
            and max E-phi of the polyp papers' tables), or ``"adaptive"`` (threshold ``min(2 * mean(y_pred), 1)``).
        reduction: MONAI's reduction of the per-image scores (``"mean"``; ``"none"`` keeps them).
        get_not_nans: also return the count of non-NaN scores.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """

    def __init__(
        self,
        mode: str = "mean",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        normalize: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans, normalize=normalize)
        self.mode = _check_choice("mode", mode, E_MEASURE_MODES)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if self.mode in ("mean", "max"):
            return compute_e_measure_curve(_require(y_pred, y), y, self.normalize)
        return compute_e_measure(_require(y_pred, y), y, self.mode, self.normalize)


class WeightedFMeasureMetric(_PerImageMetric):
    """Weighted F-measure F-beta-w per image (Margolin et al., "How to Evaluate Foreground Maps?", CVPR 2014).

    Its distance transform runs on the CPU through ``scipy.ndimage`` whatever the device of the inputs.

    Args:
        beta: the weight of precision against recall, ``beta**2`` in the usual notation (1 in the polyp papers).
        reduction: MONAI's reduction of the per-image scores (``"mean"``; ``"none"`` keeps them).
        get_not_nans: also return the count of non-NaN scores.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """

    def __init__(
        self,
        beta: float = 1.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        normalize: str | None = None,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans, normalize=normalize)
        self.beta = beta

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return compute_weighted_f_measure(_require(y_pred, y), y, self.beta, self.normalize)


def _require(y_pred: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ValueError("polyp metrics need the ground truth y.")
    return y_pred
