"""Ignite handlers of the polyp metric suite, for MONAI evaluators (``key_val_metric`` / ``additional_metrics``).

Like MONAI's ``MeanDice``: each wraps one metric of :mod:`monai_ecrm.metrics`, updates it at every iteration with
``output_transform(engine.state.output)`` (``from_engine(["pred", "label"])`` in a bundle), writes the reduced score
to ``engine.state.metrics[name]`` at the end of the epoch and, with ``save_details``, the per-image scores to
``engine.state.metric_details[name]``. ``pred`` must be the foreground probability map (sigmoid, not thresholded),
``label`` the binary mask. MAE is MONAI's own ``monai.handlers.MeanAbsoluteError``, which scores the maps as given
(``normalize=None``).
"""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.utils import MetricReduction

from monai_ecrm.metrics.polyp_metrics import (
    EMeasureMetric,
    PolypOverlapMetric,
    SMeasureMetric,
    WeightedFMeasureMetric,
)

__all__ = ["PolypOverlap", "SMeasure", "EMeasure", "WeightedFMeasure"]


class PolypOverlap(IgniteMetricHandler):
    """Mean Dice, IoU, precision or recall of the thresholded probability maps (see
    :class:`~monai_ecrm.metrics.PolypOverlapMetric`).

    Args:
        metric_name: ``"dice"``, ``"iou"``, ``"precision"`` or ``"recall"``.
        threshold: foreground where ``pred > threshold`` (``mode="binary"``).
        mode: ``"binary"``, ``"adaptive"``, ``"mean"`` or ``"max"`` (of the 256-threshold curve averaged over the
            images).
        reduction: MONAI's reduction of the per-image scores.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: keep the per-image scores (the per-image curves in the ``"mean"`` and ``"max"`` modes) in
            ``engine.state.metric_details``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one.
    """

    def __init__(
        self,
        metric_name: str = "dice",
        threshold: float = 0.5,
        mode: str = "binary",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        normalize: str | None = None,
    ) -> None:
        metric_fn = PolypOverlapMetric(
            metric_name=metric_name, threshold=threshold, mode=mode, reduction=reduction, normalize=normalize
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class SMeasure(IgniteMetricHandler):
    """Mean structure measure S-alpha (see :class:`~monai_ecrm.metrics.SMeasureMetric`).

    Args:
        alpha: weight of the object-aware term (0.5 in the polyp papers).
        reduction: MONAI's reduction of the per-image scores.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: keep the per-image scores in ``engine.state.metric_details``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        normalize: str | None = None,
    ) -> None:
        metric_fn = SMeasureMetric(alpha=alpha, reduction=reduction, normalize=normalize)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class EMeasure(IgniteMetricHandler):
    """Mean enhanced-alignment measure E-phi (see :class:`~monai_ecrm.metrics.EMeasureMetric`).

    Args:
        mode: ``"mean"`` or ``"max"`` of the 256-threshold curve averaged over the images, or ``"adaptive"``.
        reduction: MONAI's reduction of the per-image scores.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: keep the per-image scores (the per-image curves in the ``"mean"`` and ``"max"`` modes) in
            ``engine.state.metric_details``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one.
    """

    def __init__(
        self,
        mode: str = "mean",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        normalize: str | None = None,
    ) -> None:
        metric_fn = EMeasureMetric(mode=mode, reduction=reduction, normalize=normalize)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class WeightedFMeasure(IgniteMetricHandler):
    """Mean weighted F-measure F-beta-w (see :class:`~monai_ecrm.metrics.WeightedFMeasureMetric`).

    Args:
        beta: the weight of precision against recall (1 in the polyp papers).
        reduction: MONAI's reduction of the per-image scores.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: keep the per-image scores in ``engine.state.metric_details``.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before scoring, as ``pysodmetrics`` and the polyp
            papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp
            is not stretched into one.
    """

    def __init__(
        self,
        beta: float = 1.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        normalize: str | None = None,
    ) -> None:
        metric_fn = WeightedFMeasureMetric(beta=beta, reduction=reduction, normalize=normalize)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
