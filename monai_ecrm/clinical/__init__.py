"""Clinical inference: polyp masks for picture files, folders and DICOM studies, DICOM Segmentations out.

One concern per module:

- :mod:`~monai_ecrm.clinical.sources`: the inputs: which files, each file's header read once, its frames one at a
  time (DICOM decoded straight from the file).
- :mod:`~monai_ecrm.clinical.pipeline`: the bundle's pre- and post-processing for these inputs and outputs.
- :mod:`~monai_ecrm.clinical.runner`: the model: loaded from a state dict, a TorchScript file or a bundle, run on one
  frame at a time by a replaceable runner.
- :mod:`~monai_ecrm.clinical.seg`: the DICOM Segmentation of the masks (highdicom).
- :mod:`~monai_ecrm.writing`: output names and atomic writing.
- :mod:`~monai_ecrm.clinical.save`: the post-processing step writing SEGs and PNG/NIfTI masks.
- :mod:`~monai_ecrm.clinical.prefetch`: the next frames prepared in a background thread.
- :mod:`~monai_ecrm.clinical.report`: what happened to each input, ``report.csv``.
- :mod:`~monai_ecrm.clinical.explain`: which memory cases each image drew on (``--explain K``): report columns and
  ``<stem>_explain.png`` pictures.
- :mod:`~monai_ecrm.clinical.job`: the job that ties them together, :class:`ClinicalInference`.
- :mod:`~monai_ecrm.clinical.cli`: the ``monai-ecrm-infer`` command and what it prints.

:mod:`monai_ecrm.infer` and :mod:`monai_ecrm.dicom_seg` re-export these names where they were first published.
"""

from __future__ import annotations

from monai_ecrm.clinical.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from monai_ecrm.clinical.explain import (
    CasePictures,
    ExplainingRunner,
    Explanation,
    ExplanationWriter,
    MemoryCase,
    explain_problem,
    memory_case_names,
)
from monai_ecrm.clinical.job import ClinicalInference
from monai_ecrm.clinical.pipeline import LoadFramed, clinical_postprocessing, clinical_preprocessing
from monai_ecrm.clinical.prefetch import Prefetch, prefetched
from monai_ecrm.clinical.report import REPORT_COLUMNS, REPORT_NAME, InputResult, describe_problem, write_report
from monai_ecrm.clinical.runner import (
    BUNDLE_SETTINGS,
    FrameOutput,
    ModelRunner,
    TorchRunner,
    bundle_settings,
    load_model,
)
from monai_ecrm.clinical.save import SaveDicomSegd
from monai_ecrm.clinical.seg import (
    ALGORITHM_NAME,
    ARTIFICIAL_INTELLIGENCE,
    POLYP_CATEGORY,
    POLYP_TYPE,
    SEG_SERIES_NUMBER,
    build_dicom_seg,
    bundle_version,
)
from monai_ecrm.clinical.sources import (
    DecodedFrame,
    DicomSource,
    InputFile,
    NotAnImageError,
    find_inputs,
    iter_dicom_frames,
    read_dicom_source,
)
from monai_ecrm.writing import PARTIAL_DIR, PartialFolder, expected_outputs, prediction_path

__all__ = [
    "ALGORITHM_NAME",
    "ARTIFICIAL_INTELLIGENCE",
    "BUNDLE_SETTINGS",
    "CasePictures",
    "ClinicalInference",
    "DecodedFrame",
    "DicomSource",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ExplainingRunner",
    "Explanation",
    "ExplanationWriter",
    "FrameOutput",
    "InputFile",
    "InputResult",
    "LoadFramed",
    "MemoryCase",
    "ModelRunner",
    "NotAnImageError",
    "PARTIAL_DIR",
    "POLYP_CATEGORY",
    "POLYP_TYPE",
    "PartialFolder",
    "Prefetch",
    "REPORT_COLUMNS",
    "REPORT_NAME",
    "SEG_SERIES_NUMBER",
    "SaveDicomSegd",
    "TorchRunner",
    "build_dicom_seg",
    "bundle_settings",
    "bundle_version",
    "clinical_postprocessing",
    "clinical_preprocessing",
    "describe_problem",
    "expected_outputs",
    "explain_problem",
    "find_inputs",
    "iter_dicom_frames",
    "load_model",
    "main",
    "memory_case_names",
    "prediction_path",
    "prefetched",
    "read_dicom_source",
    "write_report",
]
