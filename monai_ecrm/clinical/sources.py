"""Reading the inputs of a clinical job: which files, what each one holds, and its frames one at a time.

:func:`find_inputs` lists the files of a folder or a DICOM study. :class:`InputFile` reads a file's header once and
hands out the loader items of its frames. For DICOM that header is a :class:`DicomSource`: the dataset without its
pixel data (what the SEG references), the picture's :class:`~monai_ecrm.data.PictureInfo` and where the pixel data
starts in the file, so that deciding whether the file is an image, checking that it can be decoded, decoding its
frames (``Decoder.iter_array`` from that offset, a frame's bytes at a time, so a long video is never held in memory
at once) and building its SEG all use one parse of the header. Each decoded frame follows the conventions of
:func:`monai_ecrm.data.read_picture` (YBR as RGB, palette expanded, MONOCHROME1 inverted).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import PictureInfo, _probe_dicom_dataset, dicom_decoding_plugin, probe_picture

__all__ = [
    "DecodedFrame",
    "DicomSource",
    "InputFile",
    "NotAnImageError",
    "find_inputs",
    "iter_dicom_frames",
    "read_dicom_source",
]

_SEGMENTATION_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}
_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_PIXEL_DATA = 0x7FE00010


class NotAnImageError(DataError):
    """A DICOM file that holds no picture to segment (structured report, presentation state, DICOMDIR, segmentation):
    batch jobs skip it rather than count it as a failure."""


def fail(path: str | os.PathLike, problem: str) -> DataError:
    """The :class:`~monai_ecrm.data.DataError` of one file and its problem."""
    return DataError([(str(path), problem)])


def sop_class_name(dataset) -> str:
    """``SOP class '<name>'`` of a DICOM dataset, for messages."""
    sop_class = dataset.get("SOPClassUID")
    return f"SOP class '{sop_class.name}'" if sop_class is not None else "unknown SOP class"


def find_inputs(source: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The files to segment: ``source`` itself, or every file below the folder ``source`` (a DICOM study folder with
    its series sub-folders, a folder of pictures), in name order, hidden files and the ``exclude`` folders left out.

    Args:
        source: a file or a folder.
        exclude: folders not to look into (the output folder when it is inside ``source``).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.is_file():
        return [source]
    excluded = {Path(folder).resolve() for folder in exclude}
    files = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = sorted(
            name for name in subfolders if not name.startswith(".") and (Path(folder) / name).resolve() not in excluded
        )
        files += [Path(folder) / name for name in sorted(names) if not name.startswith(".")]
    return files


# ------------------------------------------------------------------------------------------------------- DICOM
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


@dataclass
class DicomSource:
    """A DICOM image to segment, its header parsed once (:meth:`read`) and shared by every step that needs it.

    Args:
        path: the file.
        dataset: the ``pydicom`` dataset without Pixel Data (what :func:`~monai_ecrm.clinical.seg.build_dicom_seg`
            references).
        info: the picture's :class:`~monai_ecrm.data.PictureInfo` (size, frames, bit depth, identifiers).
        pixel_offset: where the Pixel Data value starts in the file; ``None`` where the dataset is not the file's bytes
            as stored (deflated transfer syntax), in which case :meth:`frames` lets pydicom read the file again.
        pixel_options: pydicom's decoding options for the Pixel Data (image pixel attributes, transfer syntax).
    """

    path: Path
    dataset: Any
    info: PictureInfo
    pixel_offset: int | None = None
    pixel_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> DicomSource:
        """Read the header of a DICOM image to segment, without its pixel data, and check that it can be decoded.

        Args:
            path: a DICOM file.

        Raises:
            NotAnImageError: the file holds no picture (no Pixel Data: SR, presentation state, DICOMDIR, ...) or is a
                segmentation itself.
            DataError: unreadable file, a transfer syntax no installed decoder handles, or no Study/Series/SOP
                Instance UID to reference.
        """
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import as_pixel_options

        try:
            # defer_size leaves the pixel data on disk: only the header is read
            dataset = pydicom.dcmread(path, defer_size="4 KB")
        except InvalidDicomError:
            raise fail(path, "not a DICOM file (no 'DICM' preamble)") from None
        except Exception as error:  # pydicom raises many types on damaged files
            raise fail(path, f"unreadable DICOM file: {error}") from None
        if "SOPClassUID" not in dataset:  # pydicom reads damaged files leniently: a real DICOM object names its class
            raise fail(path, "unreadable DICOM file: no SOP Class UID")
        if "PixelData" not in dataset:
            kind = "float pixel data" if "FloatPixelData" in dataset else "no Pixel Data"
            raise NotAnImageError([(str(path), f"not an image: {sop_class_name(dataset)}, {kind}")])
        if str(dataset.get("SOPClassUID", "")) in _SEGMENTATION_SOP_CLASSES or dataset.get("Modality") == "SEG":
            raise NotAnImageError([(str(path), "a segmentation, not an image to segment")])
        missing = [keyword for keyword in _REFERENCE_KEYWORDS if not dataset.get(keyword)]
        if missing:
            raise fail(path, f"DICOM image without {', '.join(missing)}: a segmentation could not reference it")
        info = _probe_dicom_dataset(path, dataset)  # decodability: transfer syntax and decoder, rows, columns, samples
        syntax = dataset.file_meta.TransferSyntaxUID
        element = dataset.get_item(_PIXEL_DATA, keep_deferred=True)  # its position in the file, its value unread
        offset = getattr(element, "value_tell", getattr(element, "file_tell", None))
        options = {**as_pixel_options(dataset), "transfer_syntax_uid": syntax, "pixel_keyword": "PixelData"}
        if not syntax.is_implicit_VR:
            options["pixel_vr"] = element.VR
        del dataset.PixelData
        return cls(Path(path), dataset, info, None if syntax.is_deflated else offset, options)

    @property
    def num_frames(self) -> int:
        """Frames in the file (1 for a single-frame image)."""
        return self.info.frames

    def frames(self) -> Iterator[DecodedFrame | DataError]:
        """Decode the frames one at a time, reading only that frame's bytes from the file.

        A frame that cannot be decoded is yielded as a :class:`~monai_ecrm.data.DataError` naming the file and the
        frame, and the frames after it are still decoded.
        """
        from pydicom.pixels import get_decoder, iter_pixels, pixel_array

        plugin = dicom_decoding_plugin(self.dataset.file_meta.TransferSyntaxUID)
        if self.pixel_offset is None:
            yield from self._decoded(
                iter_pixels(self.path, decoding_plugin=plugin),
                lambda index: pixel_array(self.path, index=index, decoding_plugin=plugin),
            )
            return
        decoder = get_decoder(self.pixel_options["transfer_syntax_uid"])
        with open(self.path, "rb") as stream:

            def all_frames() -> Iterator[np.ndarray]:
                stream.seek(self.pixel_offset)
                for data, _ in decoder.iter_array(stream, decoding_plugin=plugin, **self.pixel_options):
                    yield data

            def one_frame(index: int | None) -> np.ndarray:
                stream.seek(self.pixel_offset)  # where a failed frame left it is anyone's guess
                return decoder.as_array(stream, index=index, decoding_plugin=plugin, **self.pixel_options)[0]

            yield from self._decoded(all_frames(), one_frame)

    def _decoded(self, frames: Iterator[np.ndarray], decode_one) -> Iterator[DecodedFrame | DataError]:
        """The frames of ``frames`` with the reader's conventions; after a frame that fails, each later one decoded
        on its own (``decode_one(index)``; ``None`` for a single-frame file)."""
        multi = self.info.frames > 1
        index = 0
        try:
            for data in frames:
                yield self._frame(index, data)
                index += 1
        except Exception as error:  # decoders raise RuntimeError, ValueError, ...: report this frame, go on
            if index >= self.info.frames:
                return
            yield self._undecodable(index, error)
            index += 1
        for later in range(index, self.info.frames):
            try:
                data = decode_one(later if multi else None)
            except Exception as error:  # each frame is reported on its own
                yield self._undecodable(later, error)
                continue
            yield self._frame(later, data)

    def _frame(self, index: int, data: np.ndarray) -> DecodedFrame | DataError:
        try:
            picture, bit_depth = self._as_picture(data)
        except DataError as error:
            return fail(self.path, f"frame {index}: {error.problems[0][1]}")
        frame_info = replace(self.info, bit_depth=bit_depth, channels=picture.shape[-1])
        return DecodedFrame(picture, frame_info, index if self.info.frames > 1 else None)

    def _undecodable(self, index: int, error: Exception) -> DataError:
        where = f"frame {index}: " if self.info.frames > 1 else ""
        return fail(self.path, f"{where}cannot decode DICOM pixel data: {error}")

    def _as_picture(self, data: np.ndarray) -> tuple[np.ndarray, int]:
        """A decoded frame with :func:`monai_ecrm.data.read_picture`'s conventions, and its bit depth."""
        from pydicom.pixels import apply_color_lut

        bit_depth = self.info.bit_depth
        photometric = str(self.pixel_options.get("photometric_interpretation", "MONOCHROME2"))
        if photometric == "PALETTE COLOR":
            data = apply_color_lut(data, self.dataset)
            bit_depth = 8 if data.dtype == np.uint8 else 16
        if data.dtype.kind == "i":
            if data.size and data.min() < 0:
                problem = f"signed DICOM pixel data with negative values (minimum {data.min()}): not a picture"
                raise fail(self.path, problem)
            data = data.astype(np.uint16 if bit_depth > 8 else np.uint8)
        if photometric == "MONOCHROME1":  # low values are white: invert so that the picture looks as displayed
            data = (2**bit_depth - 1) - data
        return (data[..., None] if data.ndim == 2 else data), bit_depth


def read_dicom_source(path: str | os.PathLike):
    """Read the header of a DICOM image to segment, without its pixel data (:meth:`DicomSource.read`).

    Args:
        path: a DICOM file.

    Returns:
        The ``pydicom`` dataset without Pixel Data (what :func:`~monai_ecrm.clinical.seg.build_dicom_seg` references).

    Raises:
        NotAnImageError: the file holds no picture (no Pixel Data: SR, presentation state, DICOMDIR, ...) or is a
            segmentation itself.
        DataError: unreadable file, a transfer syntax no installed decoder handles, or no Study/Series/SOP Instance
            UID to reference.
    """
    return DicomSource.read(path).dataset


def iter_dicom_frames(source: str | os.PathLike | DicomSource) -> Iterator[DecodedFrame | DataError]:
    """Decode the frames of a DICOM image one at a time, reading only that frame's bytes from the file.

    A frame that cannot be decoded is yielded as a :class:`~monai_ecrm.data.DataError` naming the file and the frame,
    and the frames after it are still decoded.

    Args:
        source: a DICOM image file, or its :class:`DicomSource` (header already read).

    Yields:
        A :class:`DecodedFrame` per frame in order, or a ``DataError`` in place of a frame that cannot be decoded.
    """
    if not isinstance(source, DicomSource):
        source = DicomSource.read(source)
    yield from source.frames()


# ------------------------------------------------------------------------------------------------ any format
@dataclass
class InputFile:
    """An input file to segment, its header read once (:meth:`read`): its format, its frames, and for DICOM the
    :class:`DicomSource` its frames are decoded from and its SEG is built from.

    Args:
        path: the file.
        format: its :func:`~monai_ecrm.data.picture_format`.
        num_frames: its frames (1 for a single picture).
        dicom: the DICOM header, for DICOM files.
    """

    path: Path
    format: str
    num_frames: int
    dicom: DicomSource | None = None

    @classmethod
    def read(cls, path: str | os.PathLike, fmt: str) -> InputFile:
        """Read the header of an input file of format ``fmt`` and check that it can be decoded.

        Raises:
            NotAnImageError: a DICOM file without a picture to segment.
            DataError: the file cannot be read or decoded.
        """
        if fmt == "dicom":
            source = DicomSource.read(path)
            return cls(Path(path), fmt, source.num_frames, source)
        return cls(Path(path), fmt, probe_picture(path).frames)

    def items(self) -> Iterator[dict[str, Any] | DataError]:
        """The loader items of the frames in order: ``{"image": DecodedFrame}`` for DICOM (decoded here, a
        ``DataError`` in place of a frame that cannot be decoded), ``{"image": path}`` or ``{"image": path, "frame":
        index}`` for the other formats (decoded by the loader)."""
        if self.dicom is not None:
            for frame in self.dicom.frames():
                yield frame if isinstance(frame, DataError) else {"image": frame}
        elif self.num_frames == 1:
            yield {"image": str(self.path)}
        else:
            for index in range(self.num_frames):
                yield {"image": str(self.path), "frame": index}
