"""Datalists for the common folder layouts, readers for every input format, and the synthetic demo set."""

from __future__ import annotations

from monai_ecrm.data.datalist import (
    PRANET_SETS,
    PRANET_VAL_SEED,
    folder_datalist,
    item_case,
    load_datalist,
    pranet_datalist,
    split_by_case,
    split_datalist,
    validate_datalist,
    with_case_index,
)
from monai_ecrm.data.demo import make_demo_dataset
from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import (
    DICOM_ID_KEYWORDS,
    SUPPORTED_SUFFIXES,
    PictureInfo,
    file_stem,
    frame_filename,
    picture_format,
    picture_meta,
    probe_picture,
    read_picture,
)
from monai_ecrm.data.image_reader import PolypImageReader
from monai_ecrm.data.memory_selection import (
    MEMORY_POLICIES,
    kcenter_greedy,
    memory_group,
    select_memory_cases,
    stratified_allocation,
)

__all__ = [
    "DICOM_ID_KEYWORDS",
    "DataError",
    "MEMORY_POLICIES",
    "PRANET_SETS",
    "PRANET_VAL_SEED",
    "PictureInfo",
    "PolypImageReader",
    "SUPPORTED_SUFFIXES",
    "file_stem",
    "folder_datalist",
    "frame_filename",
    "item_case",
    "kcenter_greedy",
    "load_datalist",
    "make_demo_dataset",
    "memory_group",
    "picture_format",
    "picture_meta",
    "pranet_datalist",
    "probe_picture",
    "read_picture",
    "select_memory_cases",
    "split_by_case",
    "split_datalist",
    "stratified_allocation",
    "validate_datalist",
    "with_case_index",
]
