"""ignite handlers for MONAI engines: ECRM aux supervision, the memory bank, memory refresh, memory provenance, exact
resume, polyp metrics and the evaluation report."""

from __future__ import annotations

from .aux_supervision import AuxSupervisionHandler
from .batchnorm_refresh import BatchNormRefreshHandler, refresh_batchnorm
from .case_names import CaseNamesHandler, case_names
from .evaluation_report import EvaluationReport, render_overlay
from .memory_bank import MemoryBankHandler
from .memory_explanation import MemoryExplanationHandler, memory_case_pictures
from .memory_refresh import MemoryRefreshHandler, case_prototypes, refresh_memory
from .model_record import ModelRecordHandler
from .polyp_metric_handlers import EMeasure, PolypOverlap, SMeasure, WeightedFMeasure
from .progress import ProgressBarHandler
from .resume import PreserveRandomState, RandomState, latest_checkpoint
from .training_run import ResumeMismatchError, TrainingRun
from .training_state import CosineScheduleHandler, PreserveNetworkState, PruneCheckpoints, cosine_factor

__all__ = [
    "AuxSupervisionHandler",
    "BatchNormRefreshHandler",
    "CaseNamesHandler",
    "CosineScheduleHandler",
    "EMeasure",
    "EvaluationReport",
    "MemoryBankHandler",
    "MemoryExplanationHandler",
    "MemoryRefreshHandler",
    "ModelRecordHandler",
    "PolypOverlap",
    "PreserveNetworkState",
    "PreserveRandomState",
    "PruneCheckpoints",
    "ProgressBarHandler",
    "RandomState",
    "ResumeMismatchError",
    "SMeasure",
    "TrainingRun",
    "WeightedFMeasure",
    "case_names",
    "case_prototypes",
    "cosine_factor",
    "latest_checkpoint",
    "memory_case_pictures",
    "refresh_batchnorm",
    "refresh_memory",
    "render_overlay",
]
