"""DICOM in, DICOM Segmentation out: stream the frames of a DICOM image and write the polyp masks as a DICOM SEG.

Reading
    :func:`read_dicom_source` reads a file's header and says whether it is an image this package can segment (a
    structured report, a presentation state, a DICOMDIR or a segmentation is not). :func:`iter_dicom_frames` decodes
    the frames one at a time straight from the file (``pydicom.pixels.iter_pixels``), so a long multi-frame video is
    never held in memory at once; each frame gets the conventions of :func:`monai_ecrm.data.read_picture` (YBR as RGB,
    palette expanded, MONOCHROME1 inverted). :class:`LoadFramed` turns such a frame into the same tensor, with the
    same invertible trace, as :class:`monai_ecrm.transforms.LoadPolypImaged` gives for the file.

Writing
    :func:`build_dicom_seg` makes the Segmentation with ``highdicom``: a BINARY segmentation (FRACTIONAL, probability
    0..255, when probabilities are asked for) with one segment "Polyp" (category SCT 49755003 "Morphologically
    Abnormal Structure", type SCT 41329004 "Polyp", algorithm type AUTOMATIC, algorithm family DCM 123110 "Artificial
    Intelligence", algorithm name and version of the bundle), the source's patient and study, a new series, and per
    frame a Derivation Image reference to the source instance (and its frame) so that a viewer overlays it.

    highdicom (0.28) builds segmentations of single-frame sources without a frame of reference (secondary captures,
    VL endoscopic images), but refuses multi-frame sources without one (multi-frame secondary captures, endoscopic
    video: highdicom issue #284). For those, highdicom builds the segmentation (every module, the segment, the
    references) from a single-frame view of the source, then the frames are laid out the way highdicom references
    the frames of a multi-frame source: one per-frame functional group per source frame whose Source Image Sequence
    names the source instance, its true SOP class and the Referenced Frame Number, and a second dimension (Temporal
    Position Index in the Frame Content Sequence) beside the Referenced Segment Number.
    ``highdicom.seg.segread(...).get_pixels_by_source_frame`` reads them back.

:class:`SaveDicomSegd` is the post-processing step that writes every prediction: a SEG per DICOM source instance
(frames of a multi-frame source are collected, bit-packed, until the last one arrives), the bundle's PNG/NIfTI masks
for every other format. Every file is written under a temporary name in the output folder and renamed when complete,
so an interrupted job leaves no half-written output.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import socket
import uuid
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import (
    PictureInfo,
    dicom_decoding_plugin,
    file_stem,
    frame_filename,
    picture_format,
    picture_meta,
    probe_picture,
    swap_xy_affine,
)
from monai_ecrm.transforms.io import LoadPolypImage, LoadPolypImaged, SavePredictiond

__all__ = [
    "ALGORITHM_NAME",
    "DecodedFrame",
    "LoadFramed",
    "NotAnImageError",
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

ALGORITHM_NAME = "monai-ecrm polyp_ecrm"
"""Algorithm Name of every segment written here (the package and its bundle)."""

SEG_SERIES_NUMBER = 900
"""Series Number of the segmentation series."""

_HEADERS_KEPT = 4
"""Source headers :meth:`SaveDicomSegd.source_header` keeps: the file being written and those being decoded ahead."""


def _read_source_header(path: str, mtime_ns: int):
    """:func:`read_dicom_source`, with the file's modification time as part of the cache key (a rewritten file is
    read again)."""
    return read_dicom_source(path)


PARTIAL_DIR = ".monai-ecrm-partial"
"""Folder inside the output folder where files are written before they are renamed into place."""

_SEGMENTATION_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}
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
_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_TEMPORAL_POSITION_INDEX = 0x00209128
_FRAME_CONTENT_SEQUENCE = 0x00209111


POLYP_CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
"""Segmented Property Category of the polyp segment (code value, scheme, meaning)."""

POLYP_TYPE = ("41329004", "SCT", "Polyp")
"""Segmented Property Type of the polyp segment (SNOMED CT morphologic abnormality "Polyp")."""

ARTIFICIAL_INTELLIGENCE = ("123110", "DCM", "Artificial Intelligence")
"""Algorithm Family of the algorithm identification (CID 7162)."""


class NotAnImageError(DataError):
    """A DICOM file that holds no picture to segment (structured report, presentation state, DICOMDIR, segmentation):
    batch jobs skip it rather than count it as a failure."""


def _fail(path: str | os.PathLike, problem: str) -> DataError:
    return DataError([(str(path), problem)])


def _sop_class_name(dataset) -> str:
    sop_class = dataset.get("SOPClassUID")
    return f"SOP class '{sop_class.name}'" if sop_class is not None else "unknown SOP class"


def read_dicom_source(path: str | os.PathLike):
    """Read the header of a DICOM image to segment, without its pixel data.

    Args:
        path: a DICOM file.

    Returns:
        The ``pydicom`` dataset without Pixel Data (what :func:`build_dicom_seg` references).

    Raises:
        NotAnImageError: the file holds no picture (no Pixel Data: SR, presentation state, DICOMDIR, ...) or is a
            segmentation itself.
        DataError: unreadable file, a transfer syntax no installed decoder handles, or no Study/Series/SOP Instance
            UID to reference.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # defer_size leaves the pixel data on disk: only the header is read
        dataset = pydicom.dcmread(path, defer_size="4 KB")
    except InvalidDicomError:
        raise _fail(path, "not a DICOM file (no 'DICM' preamble)") from None
    except Exception as error:  # pydicom raises many types on damaged files
        raise _fail(path, f"unreadable DICOM file: {error}") from None
    if "SOPClassUID" not in dataset:  # pydicom reads damaged files leniently: a real DICOM object names its class
        raise _fail(path, "unreadable DICOM file: no SOP Class UID")
    if "PixelData" not in dataset:
        kind = "float pixel data" if "FloatPixelData" in dataset else "no Pixel Data"
        raise NotAnImageError([(str(path), f"not an image: {_sop_class_name(dataset)}, {kind}")])
    if str(dataset.get("SOPClassUID", "")) in _SEGMENTATION_SOP_CLASSES or dataset.get("Modality") == "SEG":
        raise NotAnImageError([(str(path), "a segmentation, not an image to segment")])
    missing = [keyword for keyword in _REFERENCE_KEYWORDS if not dataset.get(keyword)]
    if missing:
        raise _fail(path, f"DICOM image without {', '.join(missing)}: a segmentation could not reference it")
    del dataset.PixelData
    probe_picture(path)  # decodability: transfer syntax and decoder, rows, columns, samples per pixel
    return dataset


# ------------------------------------------------------------------------------------------------------ frames in
@dataclass
class DecodedFrame:
    """One decoded frame of a picture file, as :func:`monai_ecrm.data.read_picture` returns it.

    Args:
        data: pixel array ``[H, W, C]`` in its stored type.
        info: the file's header information (``bit_depth`` and ``channels`` of this frame).
        index: the frame's index in a multi-frame file; ``None`` for a single-frame file.
    """

    data: np.ndarray
    info: PictureInfo
    index: int | None = None


def _as_picture(path: str | os.PathLike, data: np.ndarray, header, info: PictureInfo) -> tuple[np.ndarray, int]:
    """A decoded DICOM frame with :func:`monai_ecrm.data.read_picture`'s conventions, and its bit depth."""
    from pydicom.pixels import apply_color_lut

    bit_depth = info.bit_depth
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        data = apply_color_lut(data, header)
        bit_depth = 8 if data.dtype == np.uint8 else 16
    if data.dtype.kind == "i":
        if data.size and data.min() < 0:
            raise _fail(path, f"signed DICOM pixel data with negative values (minimum {data.min()}): not a picture")
        data = data.astype(np.uint16 if bit_depth > 8 else np.uint8)
    if photometric == "MONOCHROME1":  # low values are white: invert so that the picture looks as displayed
        data = (2**bit_depth - 1) - data
    return (data[..., None] if data.ndim == 2 else data), bit_depth


def iter_dicom_frames(
    path: str | os.PathLike, header=None, info: PictureInfo | None = None
) -> Iterator[DecodedFrame | DataError]:
    """Decode the frames of a DICOM image one at a time, reading only that frame's bytes from the file.

    A frame that cannot be decoded is yielded as a :class:`~monai_ecrm.data.DataError` naming the file and the frame,
    and the frames after it are still decoded.

    Args:
        path: a DICOM image file.
        header: its header (:func:`read_dicom_source`); read when not given.
        info: its :class:`~monai_ecrm.data.PictureInfo` (:func:`~monai_ecrm.data.probe_picture`); read when not given.

    Yields:
        A :class:`DecodedFrame` per frame in order, or a ``DataError`` in place of a frame that cannot be decoded.
    """
    from pydicom.pixels import iter_pixels, pixel_array

    header = read_dicom_source(path) if header is None else header
    info = probe_picture(path) if info is None else info
    multi = info.frames > 1
    plugin = dicom_decoding_plugin(header.file_meta.TransferSyntaxUID)

    def frame(index: int, data: np.ndarray) -> DecodedFrame | DataError:
        try:
            picture, bit_depth = _as_picture(path, data, header, info)
        except DataError as error:
            return _fail(path, f"frame {index}: {error.problems[0][1]}")
        frame_info = replace(info, bit_depth=bit_depth, channels=picture.shape[-1])
        return DecodedFrame(picture, frame_info, index if multi else None)

    def undecodable(index: int, error: Exception) -> DataError:
        where = f"frame {index}: " if multi else ""
        return _fail(path, f"{where}cannot decode DICOM pixel data: {error}")

    index = 0
    try:
        for data in iter_pixels(path, decoding_plugin=plugin):
            yield frame(index, data)
            index += 1
    except Exception as error:  # decoders raise RuntimeError, ValueError, ...: report this frame, go on with the next
        if index >= info.frames:
            return
        yield undecodable(index, error)
        index += 1
    for later in range(index, info.frames):
        try:
            data = pixel_array(path, index=later if multi else None, decoding_plugin=plugin)
        except Exception as error:  # each frame is reported on its own
            yield undecodable(later, error)
            continue
        yield frame(later, data)


class _FrameLoader(LoadPolypImage):
    """:class:`LoadPolypImage` that also takes an already decoded :class:`DecodedFrame`."""

    def __call__(self, filename: str | os.PathLike | DecodedFrame, frame: int | None = None) -> MetaTensor:
        if not isinstance(filename, DecodedFrame):
            return super().__call__(filename, frame)
        decoded = filename
        array = self._image(decoded.data, decoded.info)
        meta = picture_meta(decoded.info, decoded.index)
        affine = torch.as_tensor(swap_xy_affine(meta.pop("affine")), dtype=torch.float64)
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))), affine=affine, meta=meta)
        return self.push_transform(image, extra_info={"layout": "[C, H, W] from [C, W, H]"})


class LoadFramed(LoadPolypImaged):
    """:class:`~monai_ecrm.transforms.LoadPolypImaged` for images that also takes a :class:`DecodedFrame` in place of
    a file path: the same tensor, metadata and invertible trace as loading that frame from its file.

    Args:
        keys: keys of the images (file paths or decoded frames).
        frame_key: item key holding the frame index of a multi-frame file given by path.
        allow_missing_keys: do not raise for keys missing from an item.
    """

    def __init__(self, keys: KeysCollection = "image", frame_key: str = "frame", allow_missing_keys: bool = False):
        super().__init__(keys, label_keys=[], frame_key=frame_key, allow_missing_keys=allow_missing_keys)
        self.image_loader = _FrameLoader(as_label=False)


# ----------------------------------------------------------------------------------------------------- SEG out
def bundle_version(bundle_root: str | os.PathLike | None = None) -> str:
    """The ``version`` of a bundle's ``configs/metadata.json`` (the installed ``polyp_ecrm`` bundle when not given),
    or the package version when there is none.

    Args:
        bundle_root: a bundle folder.
    """
    from monai_ecrm import __version__

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

    from monai_ecrm import __version__

    return f"monai-ecrm {__version__}, highdicom {highdicom.__version__}"


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
        parameters={str(k): str(v) for k, v in (algorithm_parameters or {}).items()} or None,
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


def _encode_frame(mask: np.ndarray, fractional: bool) -> np.ndarray:
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
        source: the source image's header (:func:`read_dicom_source`, or any dataset; pixel data is not used).
        masks: ``[H, W]`` for a single-frame source, ``[F, H, W]`` for frames of a multi-frame source, at the source's
            rows and columns: booleans (or 0/1) for a binary segmentation, probabilities in ``[0, 1]`` with
            ``fractional``.
        frame_numbers: the source frames (1-based) the ``F`` masks belong to; all frames ``1 .. F`` when not given.
        fractional: write a FRACTIONAL (probability) segmentation rather than a BINARY one.
        series_instance_uid: the segmentation series (a new one when not given).
        series_number: its Series Number.
        algorithm_version: version in the algorithm identification (the bundle's version when not given).
        algorithm_parameters: parameters named in the algorithm identification (threshold, input size, model).

    Returns:
        A ``highdicom.seg.Segmentation`` (a ``pydicom`` dataset), to ``save_as``.

    Raises:
        DataError: the masks do not match the source's size or frames, or highdicom refuses the source.
    """
    source_path = str(getattr(source, "filename", "") or "source")
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    rows, columns = int(source.Rows), int(source.Columns)
    if masks.ndim != 3 or masks.shape[1:] != (rows, columns):
        raise _fail(source_path, f"masks of shape {masks.shape} for a source of {rows} rows x {columns} columns")
    frame_numbers = list(range(1, masks.shape[0] + 1)) if frame_numbers is None else [int(n) for n in frame_numbers]
    num_frames = int(source.get("NumberOfFrames", 1) or 1)
    if len(frame_numbers) != masks.shape[0] or not all(1 <= n <= num_frames for n in frame_numbers):
        raise _fail(source_path, f"{masks.shape[0]} masks for frames {frame_numbers} of a {num_frames}-frame source")
    identification = dict(
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        algorithm_version=algorithm_version,
        algorithm_parameters=algorithm_parameters,
    )
    return _derive_seg(source, masks, None, frame_numbers, fractional, identification)


def _derive_seg(
    source,
    masks: np.ndarray | None,
    encoded: Sequence[np.ndarray] | None,
    frame_numbers: Sequence[int],
    fractional: bool,
    identification: dict[str, Any],
):
    """highdicom's segmentation of a single-frame source, or the multi-frame one of :func:`_multiframe_seg`; from
    masks ``[F, H, W]`` or from frames already encoded by :func:`_encode_frame`."""
    prepared = _prepared_source(source)
    try:
        if not _is_multiframe_iod(prepared):
            if masks is None:
                raise ValueError("a single-frame source needs its mask, not encoded frames")
            array = masks[0].astype(np.float32) if fractional else masks[0].astype(bool)
            return _highdicom_seg(prepared, array, fractional, **identification)
        if encoded is None:
            encoded = [_encode_frame(mask, fractional) for mask in masks]
        return _multiframe_seg(prepared, encoded, frame_numbers, fractional, **identification)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        source_path = str(getattr(source, "filename", "") or "source")
        raise _fail(
            source_path, f"highdicom cannot derive a segmentation from this image ({_sop_class_name(source)}): {error}"
        ) from None


def prediction_path(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    frame: int | None = None,
    data_root_dir: str | os.PathLike = "",
    output_postfix: str = "seg",
    dicom_seg: bool = True,
) -> Path:
    """Where the prediction for a source file (or one frame of it) is written.

    ``<output_dir>/<stem>_<postfix>.dcm`` for DICOM sources (one SEG per instance, all frames in it),
    ``<stem>_<postfix>.nii.gz`` for NIfTI, ``<stem>_<postfix>.png`` (``<stem>_frame0003_<postfix>.png`` for a frame of
    a multi-frame file) otherwise. Sources below ``data_root_dir`` keep their sub-folders under ``output_dir``.

    Args:
        source: the source file.
        output_dir: the output folder.
        frame: frame index of a multi-frame file (ignored for the DICOM SEG, which holds every frame).
        data_root_dir: folder whose sub-folder layout is kept in the output.
        output_postfix: appended to the source's file stem.
        dicom_seg: the DICOM SEG path for DICOM sources; ``False`` gives their PNG path.
    """
    source = Path(source)
    folder = Path(output_dir)
    if data_root_dir:
        try:
            folder = folder / source.resolve().parent.relative_to(Path(data_root_dir).resolve())
        except ValueError:  # not below data_root_dir: flat
            pass
    fmt = picture_format(source)
    if fmt == "dicom" and dicom_seg:
        return folder / f"{file_stem(source)}_{output_postfix}.dcm"
    if fmt == "nifti":
        return folder / f"{file_stem(source)}_{output_postfix}.nii.gz"
    return folder / f"{file_stem(frame_filename(source, frame))}_{output_postfix}.png"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _PendingSeg:
    """Frames of a multi-frame DICOM source collected until the last one arrives."""

    num_frames: int
    frames: dict[int, np.ndarray] = field(default_factory=dict)


class SaveDicomSegd(MapTransform):
    """Write predictions as a clinical pipeline needs them: a DICOM SEG per DICOM source instance (see
    :func:`build_dicom_seg`), the bundle's PNG/NIfTI masks (:class:`~monai_ecrm.transforms.SavePredictiond`) for
    every other source, at the paths of :func:`prediction_path`.

    Predictions come as ``Invertd`` gives them (``[1, W, H]`` at the source's size, carrying the source's metadata):
    0/1 masks, or foreground probabilities with ``probabilities=True`` (a FRACTIONAL SEG, 0..255 PNGs, float
    NIfTI). A frame of a multi-frame DICOM source is kept, bit-packed, until every frame of that source has come; then
    its SEG is written. :meth:`flush` writes a SEG with the frames that came (a job whose other frames could not be
    decoded). Every file is written in a private folder inside ``output_dir`` and renamed into place when complete.

    Args:
        keys: keys of the predictions.
        output_dir: the output folder.
        probabilities: the predictions are probabilities (FRACTIONAL SEG) rather than masks (BINARY SEG).
        dicom_png: also write the PNG masks of DICOM sources.
        data_root_dir: keep the sources' sub-folders below this folder in the output.
        output_postfix: appended to the sources' file stems.
        algorithm_version: version in the SEG's algorithm identification (the installed bundle's when not given).
        algorithm_parameters: parameters named in the algorithm identification.
        series_number: Series Number of the segmentation series (one new series per source series and job).
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./output",
        probabilities: bool = False,
        dicom_png: bool = False,
        data_root_dir: str | os.PathLike = "",
        output_postfix: str = "seg",
        algorithm_version: str | None = None,
        algorithm_parameters: Mapping[str, Any] | None = None,
        series_number: int = SEG_SERIES_NUMBER,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.probabilities = probabilities
        self.dicom_png = dicom_png
        self.data_root_dir = data_root_dir
        self.output_postfix = output_postfix
        self.algorithm_version = algorithm_version or bundle_version()
        self.algorithm_parameters = dict(algorithm_parameters or {})
        self.series_number = series_number
        self._series_uids: dict[str, str] = {}
        self._pending: dict[str, _PendingSeg] = {}
        self._partial: Path | None = None
        self._png_writer: SavePredictiond | None = None
        # keyed by (path, modification time); functools' cache is safe to share with the decoding thread
        self._cached_header = functools.lru_cache(maxsize=_HEADERS_KEPT)(_read_source_header)

    # ---------------------------------------------------------------------------------------------- atomic files
    def _partial_dir(self) -> Path:
        if self._partial is None:
            root = self.output_dir / PARTIAL_DIR
            if root.is_dir():  # leftovers of killed jobs: their files were never renamed into place
                for leftover in root.iterdir():
                    pid = leftover.name.split("-", 1)[0]
                    if not pid.isdigit() or not _pid_alive(int(pid)):
                        shutil.rmtree(leftover, ignore_errors=True)
            self._partial = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._partial.mkdir(parents=True)
            weakref.finalize(self, _remove_partial, self._partial)
        return self._partial

    def close(self) -> None:
        """Remove the private folder of partial files (called at the end of a job; also done at exit)."""
        if self._partial is not None:
            _remove_partial(self._partial)
            self._partial = None
            self._png_writer = None  # it writes into the folder just removed

    def _publish(self, written: Path, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        _replace(written, final)
        return final

    def _save_png(self, prediction: Any) -> Path:
        meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
        partial = self._partial_dir()
        if self._png_writer is None:
            self._png_writer = SavePredictiond(keys="pred", output_dir=partial, probabilities=self.probabilities)
        for stale in partial.iterdir():
            stale.unlink()
        self._png_writer({"pred": prediction})
        written = [path for path in partial.iterdir() if path.is_file()]
        if len(written) != 1:
            raise RuntimeError(f"expected one file from SavePredictiond in {partial}, found {written}")
        frame = meta.get("frame_index", -1)
        final = prediction_path(
            meta["source_path"],
            self.output_dir,
            None if frame is None or int(frame) < 0 else int(frame),
            self.data_root_dir,
            self.output_postfix,
            dicom_seg=False,
        )
        return self._publish(written[0], final)

    # ------------------------------------------------------------------------------------------------- SEG
    def _identification(self, header) -> dict[str, Any]:
        from pydicom.uid import generate_uid

        series = str(header.SeriesInstanceUID)
        if series not in self._series_uids:
            self._series_uids[series] = generate_uid()
        return dict(
            series_instance_uid=self._series_uids[series],
            series_number=self.series_number,
            algorithm_version=self.algorithm_version,
            algorithm_parameters=self.algorithm_parameters,
        )

    def source_header(self, source_path: str | os.PathLike):
        """The header of a DICOM source (:func:`read_dicom_source`), read once: the last few read are kept, so a job
        that reads it before segmenting the frames does not read it again to write the SEG, even when the frames of
        the next files are already being decoded (thread-safe: the decoding thread reads them too).

        Args:
            source_path: the DICOM source file.
        """
        key = str(source_path)
        return self._cached_header(key, os.stat(key).st_mtime_ns)

    def _write_seg(self, source_path: str, masks: np.ndarray | None, pending: _PendingSeg | None) -> Path:
        header = self.source_header(source_path)
        identification = self._identification(header)
        if pending is None:
            seg = build_dicom_seg(header, masks, fractional=self.probabilities, **identification)
        else:
            numbers = sorted(pending.frames)
            encoded = [pending.frames[n] for n in numbers]
            seg = _derive_seg(header, None, encoded, [n + 1 for n in numbers], self.probabilities, identification)
        final = prediction_path(source_path, self.output_dir, None, self.data_root_dir, self.output_postfix)
        written = self._partial_dir() / final.name
        seg.save_as(written)
        return self._publish(written, final)

    def _collect(self, prediction: Any) -> None:
        meta = prediction.meta
        source_path = str(meta["source_path"])
        array = _as_rows_columns(prediction)
        values = array if self.probabilities else array > 0.5
        num_frames = int(meta.get("num_frames", 1))
        if num_frames == 1:
            self._write_seg(source_path, values, None)
            return
        pending = self._pending.setdefault(source_path, _PendingSeg(num_frames))
        pending.frames[int(meta["frame_index"])] = _encode_frame(values, self.probabilities)
        if len(pending.frames) == pending.num_frames:
            del self._pending[source_path]
            self._write_seg(source_path, None, pending)

    def flush(self, source_path: str | os.PathLike | None = None) -> list[Path]:
        """Write the SEGs of multi-frame sources still waiting for frames, with the frames that came.

        Args:
            source_path: only this source; all when not given.

        Returns:
            The files written.
        """
        sources = list(self._pending) if source_path is None else [str(source_path)]
        written = []
        for source in sources:
            pending = self._pending.pop(source, None)
            if pending is not None and pending.frames:
                written.append(self._write_seg(source, None, pending))
        return written

    def discard(self, source_path: str | os.PathLike) -> None:
        """Forget the frames collected for a source (a job that gives it up).

        Args:
            source_path: the source file.
        """
        self._pending.pop(str(source_path), None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
            if meta.get("source_format") == "dicom":
                self._collect(prediction)
                if self.dicom_png:
                    self._save_png(prediction)
            else:
                self._save_png(prediction)
        return d


def _as_rows_columns(prediction: Any) -> np.ndarray:
    """A ``[1, W, H]`` prediction (MONAI's reader layout) as a ``[H, W]`` float array."""
    array = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"expected a one-channel prediction [1, W, H], got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array[0].T.astype(np.float32))


def _replace(source: Path, destination: Path) -> None:
    """Atomic rename (both in the output folder, so on one file system)."""
    os.replace(source, destination)


def _remove_partial(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the shared partial folder, when no other job uses it
    except OSError:
        pass
