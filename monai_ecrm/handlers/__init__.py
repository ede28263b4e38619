"""ignite handlers for MONAI engines: ECRM aux supervision, the memory bank, memory refresh, exact resume, polyp
metrics and the evaluation report."""

from __future__ import annotations

from .aux_supervision import AuxSupervisionHandler
from .evaluation_report import EvaluationReport, render_overlay
from .memory_bank import MemoryBankHandler
from .memory_refresh import MemoryRefreshHandler, refresh_memory
from .polyp_metric_handlers import EMeasure, PolypOverlap, SMeasure, WeightedFMeasure
from .progress import ProgressBarHandler
from .resume import PreserveRandomState, RandomState, latest_checkpoint

__all__ = [
    "AuxSupervisionHandler",
    "EMeasure",
    "EvaluationReport",
    "MemoryBankHandler",
    "MemoryRefreshHandler",
    "PolypOverlap",
    "PreserveRandomState",
    "ProgressBarHandler",
    "RandomState",
    "SMeasure",
    "WeightedFMeasure",
    "latest_checkpoint",
    "refresh_memory",
    "render_overlay",
]
