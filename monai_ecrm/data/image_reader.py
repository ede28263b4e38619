"""A MONAI ``ImageReader`` for 2D pictures in every format the package reads (see :mod:`monai_ecrm.data.image_io`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ImageReader

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import PictureInfo, picture_format, picture_meta, read_picture

__all__ = ["PolypImageReader"]


class PolypImageReader(ImageReader):
    """Read PNG, JPEG, BMP, TIFF, DICOM and NIfTI pictures for MONAI's ``LoadImage``/``LoadImaged``.

    ``LoadImaged(keys, reader=PolypImageReader(), ensure_channel_first=True)`` gives ``[C, W, H]`` tensors in
    MONAI's reader convention (first spatial axis x = column, as ``PILReader``, ``NibabelReader`` and
    ``PydicomReader`` give), with the stored intensities and the same metadata keys for every format. The presets use
    :class:`monai_ecrm.transforms.LoadPolypImaged` instead, which adds intensity scaling, channel handling, mask
    binarisation and the pipeline's ``[C, H, W]`` layout. Why MONAI's own readers are not enough is said in
    :mod:`monai_ecrm.data.image_io`.

    Args:
        frame: the frame to read from multi-frame DICOM and multi-page TIFF files (0-based); files with more than one
            frame are an error when it is not given.
    """

    def __init__(self, frame: int | None = None) -> None:
        super().__init__()
        self.frame = frame

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Whether every file has an extension this reader handles (or is a DICOM file without one).

        Args:
            filename: a file or a list of files.
        """
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        try:
            for name in names:
                picture_format(name)
        except DataError:
            return False
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> Any:
        """Decode one file (or several of the same size, stacked along the channels by ``get_data``).

        Args:
            data: a file or a list of files.
            kwargs: ``frame`` overrides the reader's frame index.
        """
        frame = kwargs.get("frame", self.frame)
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        pictures = [read_picture(name, frame=frame) + (frame,) for name in names]
        return pictures[0] if len(pictures) == 1 else pictures

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """The pixel array ``[W, H, C]`` (MONAI's spatial-first layout) and the metadata of :func:`picture_meta`.

        Args:
            img: what :meth:`read` returned.
        """
        pictures: list[tuple[np.ndarray, PictureInfo, int | None]] = [img] if isinstance(img, tuple) else list(img)
        shapes = {picture[0].shape[:2] for picture in pictures}
        if len(shapes) > 1:
            raise DataError(
                [(info.path, f"size {info.width}x{info.height}") for _, info, _ in pictures],
                header="pictures read together differ in size",
            )
        data = np.concatenate([picture[0] for picture in pictures], axis=-1)
        _, info, frame = pictures[0]
        return np.ascontiguousarray(np.transpose(data, (1, 0, 2))), picture_meta(info, frame)
