"""Polyp metric suite as MONAI metrics: Dice, IoU, precision, recall, S-measure, E-measure, weighted F-measure, MAE.

Numerically equal (within 1e-4) to ``pysodmetrics``, the reference implementation of the evaluation used by the polyp
segmentation papers (PraNet, DCRNet, Polyp-PVT). ``y_pred`` is the foreground probability map in [0, 1], ``y`` the
binary mask; see :mod:`monai_ecrm.metrics.functional`. ``pysodmetrics`` min-max normalises every map before scoring;
``normalize="minmax"`` does the same, the default ``None`` scores the maps as given. MAE is MONAI's ``MAEMetric``
(maps as given), exported here.
"""

from __future__ import annotations

from monai.metrics import MAEMetric

from monai_ecrm.metrics.evaluation import (
    ROW_FIELDS,
    TABLE_HEADERS,
    evaluate_folder,
    markdown_table,
    read_grey,
    score_pair,
    summarize,
    write_tables,
)
from monai_ecrm.metrics.functional import (
    E_MEASURE_MODES,
    NORMALIZATIONS,
    OVERLAP_METRICS,
    OVERLAP_MODES,
    SUITE_KEYS,
    compute_e_measure,
    compute_e_measure_curve,
    compute_mae,
    compute_overlap,
    compute_overlap_curve,
    compute_polyp_metrics,
    compute_s_measure,
    compute_weighted_f_measure,
    minmax_normalize,
    polyp_metric_suite,
)
from monai_ecrm.metrics.polyp_metrics import EMeasureMetric, PolypOverlapMetric, SMeasureMetric, WeightedFMeasureMetric

__all__ = [
    "E_MEASURE_MODES",
    "NORMALIZATIONS",
    "OVERLAP_METRICS",
    "OVERLAP_MODES",
    "ROW_FIELDS",
    "SUITE_KEYS",
    "TABLE_HEADERS",
    "EMeasureMetric",
    "MAEMetric",
    "PolypOverlapMetric",
    "SMeasureMetric",
    "WeightedFMeasureMetric",
    "compute_e_measure",
    "compute_e_measure_curve",
    "compute_mae",
    "compute_overlap",
    "compute_overlap_curve",
    "compute_polyp_metrics",
    "compute_s_measure",
    "compute_weighted_f_measure",
    "evaluate_folder",
    "markdown_table",
    "minmax_normalize",
    "polyp_metric_suite",
    "read_grey",
    "score_pair",
    "summarize",
    "write_tables",
]
