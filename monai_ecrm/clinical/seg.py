"""DICOM Segmentation of polyp masks, built with ``highdicom``.

:func:`build_dicom_seg` makes a BINARY segmentation (FRACTIONAL, probability 0..255, when probabilities are asked for)
with one segment "Polyp" (category SCT 49755003 "Morphologically Abnormal Structure", type SCT 41329004 "Polyp",
algorithm type AUTOMATIC, algorithm family DCM 123110 "Artificial Intelligence", algorithm name and version of the
bundle, and as parameters how it ran: threshold, input size, the model file and a short SHA-256 of it, what the model
was trained on), the source's patient and study, a new series, and per frame a Derivation Image reference to the source
instance (and its frame) so that a viewer overlays it.

highdicom (0.28) builds segmentations of single-frame sources without a frame of reference (secondary captures, VL
endoscopic images), but refuses multi-frame sources without one (multi-frame secondary captures, endoscopic video:
highdicom issue #284). For those, highdicom builds the segmentation (every module, the segment, the references) from a
single-frame view of the source, then the frames are laid out the way highdicom references the frames of a
multi-frame source: one per-frame functional group per source frame whose Source Image Sequence names the source
instance, its true SOP class and the Referenced Frame Number, and a second dimension (Temporal Position Index in the
Frame Content Sequence) beside the Referenced Segment Number. ``highdicom.seg.segread(...).get_pixels_by_source_frame``
reads them back.

Frames of a long video are kept bit-packed (:func:`encode_frame`) until the last one arrives, and the SEG is built from
them (:func:`derive_seg`) without unpacking.

:func:`read_seg_origin` reads back, from a SEG already written, what a rerun needs to know before it takes the file
for done: the algorithm parameters (the model file and its short SHA-256), the source instances it references and its
number of frames.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_ecrm.clinical.sources import DicomSource, fail, sop_class_name

__all__ = [
    "ALGORITHM_NAME",
    "ARTIFICIAL_INTELLIGENCE",
    "POLYP_CATEGORY",
    "POLYP_TYPE",
    "SEG_SERIES_NUMBER",
    "SegOrigin",
    "build_dicom_seg",
    "bundle_version",
    "derive_seg",
    "encode_frame",
    "read_seg_origin",
]

ALGORITHM_NAME = "monai-ecrm polyp_ecrm"
"""Algorithm Name of every segment written here (the package and its bundle)."""

SEG_SERIES_NUMBER = 900
"""Series Number of the segmentation series."""

POLYP_CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
"""Segmented Property Category of the polyp segment (code value, scheme, meaning)."""

POLYP_TYPE = ("41329004", "SCT", "Polyp")
"""Segmented Property Type of the polyp segment (SNOMED CT morphologic abnormality "Polyp")."""

ARTIFICIAL_INTELLIGENCE = ("123110", "DCM", "Artificial Intelligence")
"""Algorithm Family of the algorithm identification (CID 7162)."""

# Type 2 attributes of the patient and study modules that highdicom copies from the source (empty when absent).
_TYPE2_SOURCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_TEMPORAL_POSITION_INDEX = 0x00209128
_FRAME_CONTENT_SEQUENCE = 0x00209111


def bundle_version(bundle_root: str | os.PathLike | None = None) -> str:
    """The ``version`` of a bundle's ``configs/metadata.json`` (the installed ``polyp_ecrm`` bundle when not given),
    or the package version when there is none.

    Args:
        bundle_root: a bundle folder.
    """
    from monai_ecrm.version import __version__

    try:
        if bundle_root is None:
            from monai_ecrm.bundle import bundle_path

            bundle_root = bundle_path()
        with open(Path(bundle_root) / "configs" / "metadata.json", encoding="utf-8") as stream:
            return str(json.load(stream)["version"])
    except (OSError, KeyError, ValueError):
        return __version__


def _is_multiframe_iod(dataset) -> bool:
    """Whether highdicom takes the source for a multi-frame image (its IOD has Number of Frames), which it can only
    segment with a frame of reference."""
    return _is_multiframe_class(str(dataset.SOPClassUID), "NumberOfFrames" in dataset)


@functools.lru_cache(maxsize=64)
def _is_multiframe_class(sop_class_uid: str, has_number_of_frames: bool) -> bool:
    from pydicom.dataset import Dataset

    probe = Dataset()
    probe.SOPClassUID = sop_class_uid
    try:
        from highdicom._standard_utils import is_multiframe_image  # the test highdicom itself applies

        return bool(is_multiframe_image(probe))
    except (ImportError, KeyError, AttributeError):  # another highdicom, or a SOP class it does not know
        return has_number_of_frames


def _prepared_source(header):
    """A copy of the source header with what highdicom needs: no pixel data, the type 2 patient/study attributes."""
    source = copy.deepcopy(header)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in source:
            delattr(source, keyword)
    for keyword in _TYPE2_SOURCE_KEYWORDS:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _software_versions() -> str:
    import highdicom

    from monai_ecrm.version import __version__

    return f"monai-ecrm {__version__}, highdicom {highdicom.__version__}"


def _parameter_value(value: Any) -> str:
    """A value of Algorithm Parameters, which highdicom writes as ``key=value,key=value``: a square size as one number
    (``352``), another size as ``HxW``, commas of free text (a training description) as semicolons, so that the list
    splits back into its parameters."""
    if isinstance(value, (list, tuple)):
        sizes = [str(item) for item in value]
        value = sizes[0] if len(set(sizes)) == 1 else "x".join(sizes)
    return str(value).replace(",", ";")


def _highdicom_seg(
    source,
    pixel_array: np.ndarray,
    fractional: bool,
    series_instance_uid: str | None,
    series_number: int,
    algorithm_version: str | None,
    algorithm_parameters: Mapping[str, Any] | None,
):
    import highdicom as hd
    from pydicom.uid import generate_uid

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=hd.sr.CodedConcept(*ARTIFICIAL_INTELLIGENCE),
        version=algorithm_version or bundle_version(),
        parameters={str(k): _parameter_value(v) for k, v in (algorithm_parameters or {}).items()} or None,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Polyp",
        segmented_property_category=hd.sr.CodedConcept(*POLYP_CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*POLYP_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="monai-ecrm",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=_software_versions(),
        device_serial_number=socket.gethostname() or "unknown",
        content_label="POLYP",
        content_description="Polyp segmentation (research use only)",
        series_description=f"Polyp segmentation ({ALGORITHM_NAME})",
        omit_empty_frames=False,
    )
    _set_patient_orientation(seg, source)
    return seg


def _set_patient_orientation(seg, source) -> None:
    """Patient Orientation (General Image module, type 2C: required, possibly empty, where the frames have no Plane
    Orientation, as without a frame of reference), which highdicom leaves out: the source's, since the segmentation's
    rows and columns are the source's."""
    shared = seg.get("SharedFunctionalGroupsSequence")
    per_frame = seg.get("PerFrameFunctionalGroupsSequence")
    groups = [*(shared or []), *(per_frame[:1] if per_frame else [])]
    if "PatientOrientation" in seg or any("PlaneOrientationSequence" in group for group in groups):
        return
    seg.PatientOrientation = source.get("PatientOrientation") or ""


def encode_frame(mask: np.ndarray, fractional: bool) -> np.ndarray:
    """One frame as stored: fractional values 0..255 as uint8, binary masks bit-packed (first pixel in the LSB)."""
    if fractional:
        return np.around(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8).ravel()
    return np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little")


def _pixel_data(encoded: Sequence[np.ndarray], pixels: int, fractional: bool) -> bytes:
    """Concatenate encoded frames into Pixel Data: binary frames follow each other bit by bit (DICOM packs them
    without padding between frames), so groups of 8 frames are repacked when a frame is not a whole number of bytes."""
    if fractional or pixels % 8 == 0:
        data = b"".join(frame.tobytes() for frame in encoded)
    else:
        chunks = []
        for start in range(0, len(encoded), 8):
            bits = [np.unpackbits(frame, count=pixels, bitorder="little") for frame in encoded[start : start + 8]]
            chunks.append(np.packbits(np.concatenate(bits), bitorder="little").tobytes())
        data = b"".join(chunks)
    return data + b"\0" * (len(data) % 2)


def _set_source_class(dataset, sop_instance_uid: str, sop_class_uid: str) -> None:
    """Give every reference to the source instance its true SOP class (the single-frame view had another one)."""
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("ReferencedSOPInstanceUID") == sop_instance_uid and "ReferencedSOPClassUID" in item:
                item.ReferencedSOPClassUID = sop_class_uid
            _set_source_class(item, sop_instance_uid, sop_class_uid)


def _multiframe_seg(
    source,
    encoded: Sequence[np.ndarray],
    frame_numbers: Sequence[int],
    fractional: bool,
    **identification: Any,
):
    """A SEG with one frame per listed source frame of a multi-frame source without a coordinate system."""
    from pydicom.dataset import Dataset

    rows, columns = int(source.Rows), int(source.Columns)
    view = copy.deepcopy(source)
    view.SOPClassUID = _SECONDARY_CAPTURE
    for keyword in ("NumberOfFrames", "FrameIncrementPointer", "FrameOfReferenceUID"):
        if keyword in view:
            delattr(view, keyword)
    seg = _highdicom_seg(view, np.zeros((rows, columns), dtype=bool), fractional, **identification)
    _set_source_class(seg, str(source.SOPInstanceUID), str(source.SOPClassUID))
    frame_dimension = Dataset()
    frame_dimension.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    frame_dimension.DimensionIndexPointer = _TEMPORAL_POSITION_INDEX
    frame_dimension.FunctionalGroupPointer = _FRAME_CONTENT_SEQUENCE
    frame_dimension.DimensionDescriptionLabel = "Source Frame"
    seg.DimensionIndexSequence.append(frame_dimension)
    template = seg.PerFrameFunctionalGroupsSequence[0]
    items = []
    for frame_number in frame_numbers:
        item = copy.deepcopy(template)
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber = int(frame_number)
        content = item.FrameContentSequence[0]
        # Temporal Position Index is an index itself: its dimension index value must equal it (dciodvfy checks)
        content.DimensionIndexValues = [1, int(frame_number)]
        content.TemporalPositionIndex = int(frame_number)
        items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    seg.NumberOfFrames = len(items)
    seg.PixelData = _pixel_data(encoded, rows * columns, fractional)
    return seg


def build_dicom_seg(
    source,
    masks: np.ndarray,
    frame_numbers: Sequence[int] | None = None,
    fractional: bool = False,
    series_instance_uid: str | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    algorithm_version: str | None = None,
    algorithm_parameters: Mapping[str, Any] | None = None,
):
    """The DICOM Segmentation of polyp masks of a DICOM image (see the module docstring for its content).

    Args:
        source: the source image's :class:`~monai_ecrm.clinical.sources.DicomSource`, or its header (any dataset;
            pixel data is not used).
        masks: ``[H, W]`` for a single-frame source, ``[F, H, W]`` for frames of a multi-frame source, at the source's
            rows and columns: booleans (or 0/1) for a binary segmentation, probabilities in ``[0, 1]`` with
            ``fractional``.
        frame_numbers: the source frames (1-based) the ``F`` masks belong to; all frames ``1 .. F`` when not given.
        fractional: write a FRACTIONAL (probability) segmentation rather than a BINARY one.
        series_instance_uid: the segmentation series (a new one when not given).
        series_number: its Series Number.
        algorithm_version: version in the algorithm identification (the bundle's version when not given).
        algorithm_parameters: parameters named in the algorithm identification (threshold, input size, model);
            a size list is written as one number (square) or ``HxW``, commas in values as semicolons.

    Returns:
        A ``highdicom.seg.Segmentation`` (a ``pydicom`` dataset), to ``save_as``.

    Raises:
        DataError: the masks do not match the source's size or frames, or highdicom refuses the source.
    """
    if isinstance(source, DicomSource):
        source = source.dataset
    source_path = str(getattr(source, "filename", "") or "source")
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    rows, columns = int(source.Rows), int(source.Columns)
    if masks.ndim != 3 or masks.shape[1:] != (rows, columns):
        raise fail(source_path, f"masks of shape {masks.shape} for a source of {rows} rows x {columns} columns")
    frame_numbers = list(range(1, masks.shape[0] + 1)) if frame_numbers is None else [int(n) for n in frame_numbers]
    num_frames = int(source.get("NumberOfFrames", 1) or 1)
    if len(frame_numbers) != masks.shape[0] or not all(1 <= n <= num_frames for n in frame_numbers):
        raise fail(source_path, f"{masks.shape[0]} masks for frames {frame_numbers} of a {num_frames}-frame source")
    identification = dict(
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        algorithm_version=algorithm_version,
        algorithm_parameters=algorithm_parameters,
    )
    return derive_seg(source, masks, None, frame_numbers, fractional, identification)


def derive_seg(
    source,
    masks: np.ndarray | None,
    encoded: Sequence[np.ndarray] | None,
    frame_numbers: Sequence[int],
    fractional: bool,
    identification: dict[str, Any],
):
    """highdicom's segmentation of a single-frame source, or the multi-frame one of :func:`_multiframe_seg`.

    Args:
        source: the source's header (a dataset).
        masks: ``[F, H, W]`` (what :func:`build_dicom_seg` checked), or ``None`` with ``encoded``.
        encoded: the frames as :func:`encode_frame` stores them (a multi-frame source only), or ``None``.
        frame_numbers: the source frames (1-based) of the masks or encoded frames.
        fractional: a FRACTIONAL segmentation rather than a BINARY one.
        identification: ``series_instance_uid``, ``series_number``, ``algorithm_version``, ``algorithm_parameters``.

    Raises:
        DataError: highdicom refuses the source.
    """
    prepared = _prepared_source(source)
    try:
        if not _is_multiframe_iod(prepared):
            if masks is None:
                raise ValueError("a single-frame source needs its mask, not encoded frames")
            array = masks[0].astype(np.float32) if fractional else masks[0].astype(bool)
            return _highdicom_seg(prepared, array, fractional, **identification)
        if encoded is None:
            encoded = [encode_frame(mask, fractional) for mask in masks]
        return _multiframe_seg(prepared, encoded, frame_numbers, fractional, **identification)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        source_path = str(getattr(source, "filename", "") or "source")
        raise fail(
            source_path, f"highdicom cannot derive a segmentation from this image ({sop_class_name(source)}): {error}"
        ) from None


@dataclass
class SegOrigin:
    """What a SEG written here says about how it was made (:func:`read_seg_origin`).

    Args:
        parameters: the algorithm parameters of its segment (``model``, ``model_sha256``, ``threshold``, ...), empty
            for a SEG of another algorithm or without parameters.
        algorithm: the segment's Algorithm Name (:data:`ALGORITHM_NAME` for a SEG of this package).
        sources: the SOP Instance UIDs of the source images it references.
        num_frames: its frames (one per segmented source frame).
    """

    parameters: dict[str, str] = field(default_factory=dict)
    algorithm: str = ""
    sources: set[str] = field(default_factory=set)
    num_frames: int = 0


def read_seg_origin(path: str | os.PathLike) -> SegOrigin:
    """Read, without its pixel data, how a SEG was made: its algorithm parameters (``model_sha256`` names the model, see
    :func:`build_dicom_seg`), the source instances it references and its number of frames.

    Args:
        path: a SEG file.

    Raises:
        DataError: the file cannot be read as DICOM, or is no Segmentation.
    """
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types on damaged files
        raise fail(path, f"unreadable DICOM file: {error}") from None
    if dataset.get("Modality") != "SEG" or "SegmentSequence" not in dataset:
        raise fail(path, "not a DICOM Segmentation")
    origin = SegOrigin(num_frames=int(dataset.get("NumberOfFrames", 1) or 1))
    segments = dataset.SegmentSequence
    algorithms = segments[0].get("SegmentationAlgorithmIdentificationSequence") if len(segments) else None
    if algorithms:
        origin.algorithm = str(algorithms[0].get("AlgorithmName", ""))
        text = str(algorithms[0].get("AlgorithmParameters", "") or "")
        # _parameter_value wrote commas in values as semicolons: "key=value,key=value" splits back into its parameters
        origin.parameters = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    for series in dataset.get("ReferencedSeriesSequence", []):
        for instance in series.get("ReferencedInstanceSequence", []):
            if instance.get("ReferencedSOPInstanceUID"):
                origin.sources.add(str(instance.ReferencedSOPInstanceUID))
    return origin
