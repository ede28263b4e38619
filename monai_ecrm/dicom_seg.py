"""DICOM in, DICOM Segmentation out: the names this module published, now in :mod:`monai_ecrm.clinical`.

Reading DICOM sources and their frames is :mod:`monai_ecrm.clinical.sources`, building the SEG
:mod:`monai_ecrm.clinical.seg`, output names and atomic writing :mod:`monai_ecrm.writing`, the writing step
:class:`~monai_ecrm.clinical.save.SaveDicomSegd` :mod:`monai_ecrm.clinical.save`, and the frame loader
:class:`~monai_ecrm.clinical.pipeline.LoadFramed` :mod:`monai_ecrm.clinical.pipeline`.
"""

from __future__ import annotations

from monai_ecrm.clinical.pipeline import LoadFramed
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
from monai_ecrm.clinical.sources import DecodedFrame, DicomSource, NotAnImageError, iter_dicom_frames, read_dicom_source
from monai_ecrm.writing import PARTIAL_DIR, prediction_path

__all__ = [
    "ALGORITHM_NAME",
    "ARTIFICIAL_INTELLIGENCE",
    "DecodedFrame",
    "DicomSource",
    "LoadFramed",
    "NotAnImageError",
    "PARTIAL_DIR",
    "POLYP_CATEGORY",
    "POLYP_TYPE",
    "SEG_SERIES_NUMBER",
    "SaveDicomSegd",
    "build_dicom_seg",
    "bundle_version",
    "iter_dicom_frames",
    "prediction_path",
    "read_dicom_source",
]
