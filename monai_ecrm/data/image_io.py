"""Read 2D pictures from PNG, JPEG, BMP, TIFF, DICOM and NIfTI files into one layout, with one clear error per bad file.

Orientation convention
    :func:`read_picture` returns a picture as it is displayed: an array ``[H, W, C]`` whose first axis runs over the
    rows from top to bottom and whose second axis runs over the columns from left to right. That is what
    ``numpy.asarray(PIL.Image.open(path))``, ``tifffile.imread`` and pydicom's ``pixel_array`` give, so PNG, JPEG, BMP,
    TIFF and DICOM need no reordering. NIfTI stores a 2D picture with voxel axis ``i`` along the columns (x) and
    ``j`` along the rows (y): this is how ITK, SimpleITK and MONAI's ``SaveImage`` write a picture, and how MONAI's
    ``NibabelReader`` and ``PILReader`` (``reverse_indexing=True``) agree to index it. NIfTI data are transposed to the
    same ``[H, W, C]`` layout; the affine is not applied (no reorientation), it travels with the picture so that a
    prediction written as NIfTI overlays its source voxel for voxel in any viewer.

NIfTI layouts (voxel axes ``x`` = columns, ``y`` = rows; see :func:`read_picture`)
    A grey picture is ``(x, y)``, ``(x, y, 1)`` or ``(x, y, 1, 1)``; a colour picture is RGB24 or RGBA32 voxels
    (NIfTI's colour datatypes, a numpy dtype with fields) of one of those shapes, a NIfTI vector ``(x, y, 1, 1, C)``,
    or ``uint8`` data of shape ``(x, y, 3)`` or ``(x, y, 4)`` (RGB or RGBA, what ``nibabel.Nifti1Image`` makes of an
    ``[H, W, 3]`` picture array). By shape alone ``(x, y, 3)`` could also be a volume of 3 slices: only ``uint8``
    data, the type of a colour picture, is taken for colour; 3D data of any other type with more than one slice
    (``float32``, ``int16``: a scan) is refused as a volume. An array saved straight from ``numpy.asarray`` of a
    picture has its rows along ``x``: it is read transposed (the picture mirrored about its diagonal), and the
    prediction is still written voxel for voxel over it.

    :class:`monai_ecrm.data.PolypImageReader` gives MONAI the usual "spatial first" ``[W, H, C]`` layout of its own
    readers and writers; :class:`monai_ecrm.transforms.LoadPolypImaged` gives the pipeline ``[C, H, W]`` through an
    invertible transposition, which ``Invertd`` undoes before ``SaveImage`` writes a prediction.

Why not MONAI's readers alone
    - ``PILReader`` cannot read the 3-sample, BlackIsZero TIFFs of CVC-ClinicDB (Pillow cannot), does not normalise
      Pillow modes (palette, CMYK, 1-bit), and reports a truncated file as Pillow's bare ``OSError``.
    - ``PydicomReader`` takes the samples-per-pixel axis of an RGB frame for a third spatial axis (an RGB frame loads
      as ``[1, W, H, 3]``), reads a multi-frame file as one volume rather than a sequence of frames, ignores
      MONOCHROME1 inversion and warns about missing patient orientation on every secondary-capture frame.
    - Each MONAI reader writes its own metadata keys (``NibabelReader`` the whole NIfTI header), so a batch that mixes
      formats does not collate. Every picture here carries the same keys (:func:`picture_meta`).

Intensities are returned as stored (uint8, uint16, float), with ``bit_depth`` saying how to scale them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_ecrm.data.errors import DataError

__all__ = [
    "DICOM_ID_KEYWORDS",
    "PictureInfo",
    "SUPPORTED_SUFFIXES",
    "dicom_decoding_plugin",
    "file_stem",
    "frame_filename",
    "picture_format",
    "picture_meta",
    "probe_picture",
    "read_picture",
    "swap_xy_affine",
]

SUFFIX_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}
SUPPORTED_SUFFIXES = tuple(SUFFIX_FORMATS)
"""File name endings read by :func:`read_picture` (any case); files without an extension are read if they are DICOM."""

DICOM_ID_KEYWORDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "Modality",
)
"""DICOM identifiers kept in every picture's metadata (empty strings for other formats)."""

_SWAP_XY = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


@dataclass
class PictureInfo:
    """What the header of a picture file says.

    Args:
        path: the file.
        format: ``"png"``, ``"jpeg"``, ``"bmp"``, ``"tiff"``, ``"dicom"`` or ``"nifti"``.
        height: rows.
        width: columns.
        channels: samples per pixel as stored: 1 (grayscale), 2 (grayscale and alpha), 3 (RGB) or 4 (RGBA).
        frames: number of frames (multi-frame DICOM, multi-page TIFF); 1 for a single picture.
        bit_depth: bits per sample of integer data (intensities run over ``0 .. 2**bit_depth - 1``); 0 for floating
            point data.
        affine: 4x4 matrix from the voxel index ``(x = column, y = row)`` to world coordinates (NIfTI's affine,
            DICOM's pixel spacing, identity otherwise).
        dicom_ids: the identifiers of :data:`DICOM_ID_KEYWORDS` for DICOM files.
        stored_spatial_ndim: axes of the stored data without its channel axis: 2 for the other formats; for NIfTI 2
            (``(x, y)``, ``(x, y, 3)``), 3 (``(x, y, 1)``) or 4 (``(x, y, 1, 1)``, ``(x, y, 1, 1, C)``). A NIfTI
            prediction is written with this many axes, so its shape is the source's spatial shape.
    """

    path: str
    format: str
    height: int
    width: int
    channels: int
    frames: int = 1
    bit_depth: int = 8
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    dicom_ids: dict[str, str] = field(default_factory=dict)
    stored_spatial_ndim: int = 2


def _fail(path: str | os.PathLike, problem: str) -> DataError:
    return DataError([(str(path), problem)])


def file_stem(path: str | os.PathLike) -> str:
    """The file name without its extension (``.nii.gz`` counts as one extension).

    Args:
        path: a file path.
    """
    name = Path(path).name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return Path(name).stem if Path(name).suffix.lower() in SUFFIX_FORMATS else name


def _is_dicom_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def picture_format(path: str | os.PathLike) -> str:
    """The format of a picture file, from its extension (DICOM files without an extension are recognised by content).

    Args:
        path: a file path.

    Raises:
        DataError: unknown extension, or no extension and not a DICOM file.
    """
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    suffix = Path(name).suffix
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    if not suffix and _is_dicom_file(path):
        return "dicom"
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if not suffix:
        raise _fail(path, f"no file extension and not a DICOM file; supported extensions: {supported}")
    raise _fail(path, f"unknown extension '{Path(path).suffix}'; supported extensions: {supported}")


def _check_file(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        raise _fail(path, "is a folder, not a picture file")
    if os.path.getsize(path) == 0:
        raise _fail(path, "empty file (0 bytes)")


def _tail(path: str | os.PathLike, size: int = 64) -> bytes:
    with open(path, "rb") as stream:
        stream.seek(max(os.path.getsize(path) - size, 0))
        return stream.read()


def _bit_depth_of_dtype(dtype: np.dtype) -> int | None:
    if dtype == np.bool_:
        return 1
    if dtype.kind == "f":
        return 0
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return dtype.itemsize * 8
    return None


def _bit_depth_of_values(path: str | os.PathLike, data: np.ndarray) -> int:
    """Bit depth for integer data whose dtype does not tell (NIfTI int16, Pillow mode ``I``)."""
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low < 0:
        raise _fail(path, f"negative intensities (minimum {low}): not a picture's pixel values")
    if high <= 255:
        return 8
    if high <= 65535:
        return 16
    raise _fail(path, f"intensities up to {high} exceed 16 bits: not a picture's pixel values")


def _check_channels(path: str | os.PathLike, channels: int) -> None:
    if channels not in (1, 2, 3, 4):
        raise _fail(
            path, f"{channels} samples per pixel; expected 1 (grayscale), 2 (grayscale+alpha), 3 (RGB) or 4 (RGBA)"
        )


def _as_hwc(data: np.ndarray) -> np.ndarray:
    return data[..., None] if data.ndim == 2 else data


# ----------------------------------------------------------------------------------------------------------- Pillow
_PIL_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 2, "La": 2, "RGB": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "P": 3, "PA": 4}
_PIL_MODE_BITS = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "F": 0}


def _open_pil(path: str | os.PathLike, fmt: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise _fail(path, f"not a readable {fmt.upper()} file: Pillow cannot identify its contents") from None
    except OSError as error:
        problem = "truncated" if "truncated" in str(error).lower() else "unreadable"
        raise _fail(path, f"{problem} {fmt.upper()} file, Pillow cannot open it: {error}") from None


def _probe_pil(path: str | os.PathLike, fmt: str) -> PictureInfo:
    image = _open_pil(path, fmt)
    with image:
        width, height = image.size
        mode = image.mode
    # Pillow reads headers lazily; a missing end marker is the cheap sign of a truncated file.
    tail = _tail(path)
    if fmt == "png" and b"IEND" not in tail:
        raise _fail(path, "truncated PNG file (no IEND chunk at the end)")
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        raise _fail(path, "truncated JPEG file (no end-of-image marker at the end)")
    channels = _PIL_MODE_CHANNELS.get(mode, 1 if mode.startswith("I") or mode == "F" else 3)
    return PictureInfo(str(path), fmt, height, width, channels, bit_depth=_PIL_MODE_BITS.get(mode, 8))


def _read_pil(path: str | os.PathLike, fmt: str) -> tuple[np.ndarray, PictureInfo]:
    image = _open_pil(path, fmt)
    with image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            problem = "truncated" if "truncated" in str(error) else "corrupt"
            raise _fail(path, f"{problem} {fmt.upper()} file, Pillow cannot decode it: {error}") from None
        mode = image.mode
        if mode == "1":
            image = image.convert("L")
        elif mode in ("P", "PA"):
            image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        data = np.asarray(image)
    bit_depth = _bit_depth_of_dtype(data.dtype)
    if bit_depth is None:
        bit_depth = _bit_depth_of_values(path, data)
        data = data.astype(np.uint8 if bit_depth == 8 else np.uint16)
    data = _as_hwc(data)
    info = PictureInfo(str(path), fmt, data.shape[0], data.shape[1], data.shape[2], bit_depth=bit_depth)
    _check_channels(path, info.channels)
    return data, info


# ---------------------------------------------------------------------------------------------------------- tifffile
def _tiff_layout(path: str | os.PathLike, axes: str, shape: Sequence[int]) -> tuple[list[int], int, int, int, int]:
    """Axis order ``(frames..., Y, X, samples)`` for a tifffile series, with frames, height, width and channels."""
    if "Y" not in axes or "X" not in axes:
        raise _fail(path, f"TIFF series with axes '{axes}' has no 2D picture (Y and X axes)")
    sample_axes = [index for index, axis in enumerate(axes) if axis in "SC"]
    if len(sample_axes) > 1:
        raise _fail(path, f"TIFF series with axes '{axes}' has more than one channel axis")
    y_axis, x_axis = axes.index("Y"), axes.index("X")
    frame_axes = [index for index in range(len(axes)) if index not in (y_axis, x_axis, *sample_axes)]
    frames = int(np.prod([shape[index] for index in frame_axes])) if frame_axes else 1
    channels = shape[sample_axes[0]] if sample_axes else 1
    return frame_axes + [y_axis, x_axis] + sample_axes, frames, shape[y_axis], shape[x_axis], channels


def _probe_tiff(path: str | os.PathLike) -> PictureInfo:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape, dtype = series.axes, series.shape, series.dtype
    except Exception as error:  # tifffile raises TiffFileError, ValueError, struct.error, ... on bad files
        return _probe_tiff_with_pillow(path, error)
    _, frames, height, width, channels = _tiff_layout(path, axes, shape)
    bit_depth = _bit_depth_of_dtype(dtype)
    if bit_depth is None:
        raise _fail(path, f"TIFF samples of type {dtype} are not supported (expected 8- or 16-bit unsigned or float)")
    _check_channels(path, channels)
    return PictureInfo(str(path), "tiff", height, width, channels, frames=frames, bit_depth=bit_depth)


def _probe_tiff_with_pillow(path: str | os.PathLike, tifffile_error: Exception) -> PictureInfo:
    try:
        return _probe_pil(path, "tiff")
    except DataError:
        raise _fail(path, f"unreadable TIFF file: {tifffile_error}") from None


def _read_tiff(path: str | os.PathLike, frame: int | None) -> tuple[np.ndarray, PictureInfo]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            data = series.asarray()
    except Exception as error:  # e.g. a compression tifffile cannot decode without imagecodecs: try Pillow
        try:
            return _read_pil(path, "tiff")
        except DataError:
            raise _fail(path, f"unreadable TIFF file: {error}") from None
    order, frames, height, width, channels = _tiff_layout(path, axes, shape)
    data = np.transpose(data, order).reshape(frames, height, width, channels)
    bit_depth = _bit_depth_of_dtype(data.dtype)
    if bit_depth is None:
        raise _fail(
            path, f"TIFF samples of type {data.dtype} are not supported (expected 8- or 16-bit unsigned or float)"
        )
    _check_channels(path, channels)
    info = PictureInfo(str(path), "tiff", height, width, channels, frames=frames, bit_depth=bit_depth)
    data = data[_frame_index(info, frame)]
    return (data.astype(np.uint8) if bit_depth == 1 else data), info


# ----------------------------------------------------------------------------------------------------------- pydicom
def _dicom_dataset(path: str | os.PathLike):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # defer_size leaves the pixel data on disk until it is decoded, so probing reads headers only
        return pydicom.dcmread(path, defer_size="4 KB")
    except InvalidDicomError:
        raise _fail(path, "not a DICOM file (no 'DICM' preamble)") from None
    except Exception as error:  # pydicom raises many types on damaged files
        raise _fail(path, f"unreadable DICOM file: {error}") from None


IMAGECODECS_PLUGIN = "imagecodecs"
"""Label of the imagecodecs JPEG 2000 decoding plugin (:mod:`monai_ecrm.data.imagecodecs_plugin`) added to pydicom."""
_PLUGIN_LOCK = threading.Lock()


def dicom_decoding_plugin(transfer_syntax: str) -> str:
    """The pydicom decoding plugin to decode frames of this transfer syntax with: :data:`IMAGECODECS_PLUGIN` for JPEG
    2000 where imagecodecs is installed (added to pydicom's decoder on first use), else ``""`` (pydicom's choice).

    Args:
        transfer_syntax: the file's Transfer Syntax UID.
    """
    from monai_ecrm.data import imagecodecs_plugin

    if not imagecodecs_plugin.is_available(str(transfer_syntax)):
        return ""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(transfer_syntax)
    with _PLUGIN_LOCK:  # pydicom's add_plugin is not thread-safe; frames are decoded in a background thread
        if IMAGECODECS_PLUGIN not in decoder.available_plugins:
            decoder.add_plugin(IMAGECODECS_PLUGIN, (imagecodecs_plugin.__name__, "decode_frame"))
    return IMAGECODECS_PLUGIN


def _probe_dicom_dataset(path: str | os.PathLike, dataset) -> PictureInfo:
    from pydicom.pixels import get_decoder

    if "PixelData" not in dataset:
        kind = "float pixel data, not a picture" if "FloatPixelData" in dataset else "no Pixel Data (7FE0,0010)"
        sop_class = dataset.get("SOPClassUID")
        sop_name = f", SOP class '{sop_class.name}'" if sop_class is not None else ""
        raise _fail(path, f"DICOM without pixel data ({kind}{sop_name})")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is None:
        raise _fail(path, "DICOM without a transfer syntax in its file meta information")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _fail(
            path, f"DICOM transfer syntax '{syntax.name}' ({syntax}) cannot be decoded: pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies.items())
        raise _fail(
            path, f"DICOM transfer syntax '{syntax.name}' ({syntax}) cannot be decoded here (missing: {missing})"
        )
    missing_tags = [keyword for keyword in ("Rows", "Columns", "BitsStored") if keyword not in dataset]
    if missing_tags:
        raise _fail(path, f"DICOM image without {', '.join(missing_tags)}")
    channels = int(dataset.get("SamplesPerPixel", 1))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        channels = 3
    _check_channels(path, channels)
    spacing = dataset.get("PixelSpacing")
    affine = np.eye(4)
    if spacing is not None and len(spacing) == 2:
        affine[0, 0], affine[1, 1] = float(spacing[1]), float(spacing[0])  # PixelSpacing is (row, column) spacing
    return PictureInfo(
        str(path),
        "dicom",
        int(dataset.Rows),
        int(dataset.Columns),
        channels,
        frames=int(dataset.get("NumberOfFrames", 1) or 1),
        bit_depth=int(dataset.BitsStored),
        affine=affine,
        dicom_ids={keyword: str(dataset.get(keyword, "")) for keyword in DICOM_ID_KEYWORDS},
    )


def _probe_dicom(path: str | os.PathLike) -> PictureInfo:
    return _probe_dicom_dataset(path, _dicom_dataset(path))


def _read_dicom(path: str | os.PathLike, frame: int | None) -> tuple[np.ndarray, PictureInfo]:
    from pydicom.pixels import apply_color_lut, pixel_array

    dataset = _dicom_dataset(path)
    info = _probe_dicom_dataset(path, dataset)
    index = _frame_index(info, frame)
    plugin = dicom_decoding_plugin(dataset.file_meta.TransferSyntaxUID)
    try:
        # pydicom converts YBR_FULL and YBR_FULL_422 to RGB; the JPEG 2000 decoders undo YBR_RCT and YBR_ICT.
        if info.frames > 1:
            # from the path, pydicom reads and decodes this frame only, not the whole video
            data = pixel_array(os.fspath(path), index=index, decoding_plugin=plugin)
        else:
            data = pixel_array(dataset, decoding_plugin=plugin)
    except Exception as error:  # decoders raise RuntimeError, ValueError, NotImplementedError, ...
        syntax = dataset.file_meta.TransferSyntaxUID
        raise _fail(path, f"cannot decode DICOM pixel data ({syntax.name}): {error}") from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        data = apply_color_lut(data, dataset)
        info.bit_depth = _bit_depth_of_dtype(data.dtype) or 16
    if data.dtype.kind == "i":
        if data.size and data.min() < 0:
            raise _fail(path, f"signed DICOM pixel data with negative values (minimum {data.min()}): not a picture")
        data = data.astype(np.uint16 if info.bit_depth > 8 else np.uint8)
    if photometric == "MONOCHROME1":  # low values are white: invert so that the picture looks as displayed
        data = (2**info.bit_depth - 1) - data
    data = _as_hwc(data)
    info.channels = data.shape[-1]
    return data, info


# ----------------------------------------------------------------------------------------------------------- nibabel
def _nifti_image(path: str | os.PathLike):
    import nibabel

    try:
        return nibabel.load(path)
    except Exception as error:  # ImageFileError, HeaderDataError, gzip errors, ...
        raise _fail(path, f"unreadable NIfTI file: {error}") from None


_NIFTI_COLOUR_HINT = (
    "a colour picture is uint8 data (x, y, 3), RGB24 voxels or a vector (x, y, 1, 1, 3) (see monai_ecrm.data.image_io)"
)


def _nifti_layout(path: str | os.PathLike, shape: Sequence[int], dtype: np.dtype) -> tuple[int, int]:
    """Check that NIfTI data hold one 2D picture (the layouts of the module docstring); returns its channel count and
    its number of axes without the channel axis."""
    shape = tuple(int(size) for size in shape)
    if len(shape) < 2 or len(shape) > 5:
        raise _fail(path, f"NIfTI data of shape {shape}: a 2D picture (x, y) is expected")
    if dtype.names:  # RGB24 / RGBA32: the channels are the fields of each voxel
        channels = len(dtype.names)
    elif len(shape) == 3 and shape[2] in (3, 4) and dtype == np.uint8:
        return shape[2], 2  # an RGB(A) picture array saved as it is
    else:
        channels = shape[4] if len(shape) == 5 else 1
    if len(shape) >= 3 and shape[2] > 1:
        raise _fail(
            path,
            f"3D NIfTI volume of shape {shape} ({shape[2]} slices of type {dtype}) where a 2D frame is expected; "
            + _NIFTI_COLOUR_HINT,
        )
    if len(shape) >= 4 and shape[3] > 1:
        raise _fail(path, f"NIfTI time series of shape {shape} ({shape[3]} time points) where a 2D frame is expected")
    if dtype.names and len(shape) == 5:
        raise _fail(path, f"NIfTI {dtype} voxels with a vector axis, shape {shape}: a 2D picture is expected")
    return channels, min(len(shape), 4)


def _probe_nifti(path: str | os.PathLike) -> PictureInfo:
    image = _nifti_image(path)
    dtype = image.get_data_dtype()
    channels, spatial_ndim = _nifti_layout(path, image.shape, dtype)
    _check_channels(path, channels)
    bit_depth = 8 if dtype.names else _bit_depth_of_dtype(dtype)
    return PictureInfo(
        str(path),
        "nifti",
        int(image.shape[1]),
        int(image.shape[0]),
        channels,
        bit_depth=8 if bit_depth is None else bit_depth,
        affine=np.asarray(image.affine, dtype=np.float64),
        stored_spatial_ndim=spatial_ndim,
    )


def _read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, PictureInfo]:
    image = _nifti_image(path)
    info = _probe_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # truncated or damaged data block
        raise _fail(path, f"cannot read NIfTI data: {error}") from None
    if data.dtype.names:  # RGB24 / RGBA32 structured voxels
        data = np.stack([data[name] for name in data.dtype.names], axis=-1)
    data = data.reshape(info.width, info.height, -1)
    data = np.ascontiguousarray(np.transpose(data, (1, 0, 2)))  # voxel (x, y) -> picture (row, column)
    bit_depth = _bit_depth_of_dtype(data.dtype)
    if bit_depth is None:  # e.g. int16 or int32 voxels: the values tell the range
        bit_depth = _bit_depth_of_values(path, data)
        data = data.astype(np.uint8 if bit_depth == 8 else np.uint16)
    info.bit_depth = bit_depth
    info.channels = data.shape[-1]
    return (data.astype(np.uint8) if bit_depth == 1 else data), info


# ------------------------------------------------------------------------------------------------------------ public
def _frame_index(info: PictureInfo, frame: int | None) -> int:
    if frame is None:
        if info.frames > 1:
            raise _fail(
                info.path,
                f"{info.frames} frames where one 2D frame is expected: give a frame index "
                "(folder_datalist lists one item per frame)",
            )
        return 0
    if not 0 <= int(frame) < info.frames:
        raise _fail(info.path, f"frame {frame} requested but the file has {info.frames} frame(s)")
    return int(frame)


def probe_picture(path: str | os.PathLike) -> PictureInfo:
    """Read a picture file's header and check it can be decoded, without decoding the pixels.

    Checks: the file exists and is not empty, the extension is known, the header is readable, the picture is 2D
    with 1 to 4 channels, PNG and JPEG files end with their end marker (a truncated file does not), DICOM files
    have pixel data in a transfer syntax an installed decoder handles. A damaged compressed stream is only found by
    :func:`read_picture`.

    Args:
        path: a picture file.

    Raises:
        DataError: naming the file and its problem.
    """
    _check_file(path)
    fmt = picture_format(path)
    if fmt == "tiff":
        return _probe_tiff(path)
    if fmt == "dicom":
        return _probe_dicom(path)
    if fmt == "nifti":
        return _probe_nifti(path)
    return _probe_pil(path, fmt)


def read_picture(path: str | os.PathLike, frame: int | None = None) -> tuple[np.ndarray, PictureInfo]:
    """Decode a picture file to an array ``[H, W, C]`` (rows top to bottom, columns left to right) in its stored type.

    Args:
        path: a PNG, JPEG, BMP, TIFF, DICOM or NIfTI file (see :data:`SUPPORTED_SUFFIXES`).
        frame: which frame of a multi-frame DICOM or multi-page TIFF to read (0-based); required for those files.

    NIfTI files hold a grey picture as ``(x, y)``, ``(x, y, 1)`` or ``(x, y, 1, 1)`` and a colour one as ``uint8``
    ``(x, y, 3)`` (or ``(x, y, 4)``, RGBA), as RGB24/RGBA32 voxels or as a vector ``(x, y, 1, 1, C)``, with ``x`` along
    the columns. ``(x, y, 3)`` data of another type than ``uint8`` is a volume of 3 slices, refused (see the module
    docstring for why the type decides).

    Returns:
        The pixel array (uint8, uint16 or float; C = 1, 2, 3 or 4 as stored; YBR DICOM converted to RGB, palette
        pictures expanded to RGB, MONOCHROME1 inverted) and the :class:`PictureInfo`.

    Raises:
        DataError: naming the file and its problem.
    """
    _check_file(path)
    fmt = picture_format(path)
    if fmt == "tiff":
        return _read_tiff(path, frame)
    if fmt == "dicom":
        return _read_dicom(path, frame)
    if frame not in (None, 0):
        raise _fail(path, f"frame {frame} requested but a {fmt.upper()} file holds one picture")
    if fmt == "nifti":
        return _read_nifti(path)
    return _read_pil(path, fmt)


def picture_meta(info: PictureInfo, frame: int | None = None) -> dict[str, Any]:
    """The metadata every loaded picture carries, with the same keys for every format so mixed batches collate.

    Spatial entries follow MONAI's reader convention (first spatial axis x = column): ``spatial_shape`` is
    ``[W, H]`` and ``affine`` maps ``(x, y)`` voxel indices to world coordinates; ``stored_spatial_ndim`` is
    :attr:`PictureInfo.stored_spatial_ndim` (what a NIfTI prediction's shape follows).

    Args:
        info: the picture's header information.
        frame: the frame read from a multi-frame file, if any.
    """
    meta: dict[str, Any] = {
        "filename_or_obj": frame_filename(info.path, frame) if info.frames > 1 else info.path,
        "source_path": info.path,
        "source_format": info.format,
        "frame_index": -1 if frame is None or info.frames == 1 else int(frame),
        "num_frames": info.frames,
        "bit_depth": info.bit_depth,
        "original_channels": info.channels,
        "spatial_shape": np.array([info.width, info.height]),
        "original_channel_dim": -1,
        "affine": info.affine.copy(),
        "original_affine": info.affine.copy(),
        "space": "RAS",
        "stored_spatial_ndim": info.stored_spatial_ndim,
    }
    meta.update({keyword: info.dicom_ids.get(keyword, "") for keyword in DICOM_ID_KEYWORDS})
    return meta


def frame_filename(path: str | os.PathLike, frame: int | None) -> str:
    """The name that stands for one frame of a multi-frame file, ``<stem>_frame0003<ext>`` beside it.

    Writers name outputs after ``filename_or_obj``; this name gives each frame's prediction its own file.

    Args:
        path: the multi-frame file.
        frame: the frame index.
    """
    path = str(path)
    if frame is None:
        return path
    stem = file_stem(path)
    name = Path(path).name
    return str(Path(path).with_name(f"{stem}_frame{int(frame):04d}{name[len(stem) :]}"))


def swap_xy_affine(affine: np.ndarray) -> np.ndarray:
    """The affine for the same grid with its first two voxel axes exchanged (its own inverse).

    Args:
        affine: a 4x4 voxel-to-world matrix.
    """
    return np.asarray(affine) @ _SWAP_XY
