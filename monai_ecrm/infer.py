"""``monai-ecrm-infer`` (also ``python -m monai_ecrm.infer``): polyp masks for a file, a folder or a DICOM study.

The command and the job live in :mod:`monai_ecrm.clinical` (the command in :mod:`monai_ecrm.clinical.cli`, the job in
:mod:`monai_ecrm.clinical.job`); this module keeps the names it published, the console entry point
``monai_ecrm.infer:main`` and ``monai_ecrm.infer.clinical_postprocessing`` of the bundle's ``inference.json``.
"""

from __future__ import annotations

import sys

from monai_ecrm.clinical.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from monai_ecrm.clinical.job import ClinicalInference
from monai_ecrm.clinical.pipeline import clinical_postprocessing, clinical_preprocessing
from monai_ecrm.clinical.report import REPORT_NAME, InputResult, write_report
from monai_ecrm.clinical.runner import BUNDLE_SETTINGS, bundle_settings, load_model
from monai_ecrm.clinical.sources import find_inputs

__all__ = [
    "BUNDLE_SETTINGS",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "REPORT_NAME",
    "InputResult",
    "ClinicalInference",
    "bundle_settings",
    "clinical_postprocessing",
    "clinical_preprocessing",
    "find_inputs",
    "load_model",
    "main",
    "write_report",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
