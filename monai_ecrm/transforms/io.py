"""Load pictures of every supported format as pipeline tensors, and save predictions beside their sources' format.

Tensor convention
    Images load as float32 ``[3, H, W]`` with intensities in ``[0, 1]`` (divided by ``2**bit_depth - 1``: 255 for
    8-bit, 65535 for 16-bit PNG/TIFF, ``2**BitsStored - 1`` for DICOM); labels as float32 ``[1, H, W]``, in ``{0, 1}``
    for binary segmentation or class indices ``0 .. num_classes - 1``. ``H`` runs over rows from top to bottom and
    ``W`` over columns from left to right: the array of the picture as displayed, whatever the file format (see
    :mod:`monai_ecrm.data.image_io`). The metadata ``affine`` is kept true to that layout.

Channel policy (documented and tested conversions, never silent guesses about content)
    - RGB: as is. Grayscale and monochrome DICOM: replicated to three channels.
    - RGBA and grayscale+alpha: the alpha channel is dropped (the colour values are kept as stored).
    - Any other channel count is a :class:`~monai_ecrm.data.DataError`.
    - Masks: the channel maximum is thresholded (so a red-on-black RGB mask works), at half the intensity range
      (128 of 255) unless ``label_threshold`` is given; a mask whose values are all 0 or 1 is taken as is. Multi-class
      masks come from ``label_mapping``: each pixel takes the class of the nearest listed value or colour, which
      tolerates JPEG noise.

The transposition from MONAI's reader layout ``[C, W, H]`` (first spatial axis = x, as ``PILReader``,
``NibabelReader`` and ``SaveImage``'s writers use) to ``[C, H, W]`` is recorded as an invertible operation:
``Invertd`` with a preset undoes it together with the resize, so ``SaveImage`` writes predictions aligned with their
sources.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.folder_layout import FolderLayout, default_name_formatter
from monai.transforms import InvertibleTransform, MapTransform, SaveImage

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import PictureInfo, picture_meta, read_picture, swap_xy_affine

__all__ = ["LoadPolypImage", "LoadPolypImaged", "SavePredictiond", "parse_label_mapping"]

logger = logging.getLogger(__name__)

LabelMapping = Union[Mapping[Any, int], Sequence[Sequence[Any]]]


def parse_label_mapping(label_mapping: LabelMapping) -> tuple[np.ndarray, np.ndarray]:
    """Reference values or colours and their classes, from a JSON-friendly mapping.

    Args:
        label_mapping: ``{value_or_colour: class}`` or ``[[value_or_colour, class], ...]``. A value is a number
            (``0``, ``"128"``); a colour is ``[r, g, b]``, ``"r,g,b"`` or ``"#rrggbb"``. All keys must be values or
            all colours.

    Returns:
        ``references`` of shape ``[N, 1]`` (values) or ``[N, 3]`` (colours), and ``classes`` of shape ``[N]``.
    """
    pairs = list(label_mapping.items()) if isinstance(label_mapping, Mapping) else [tuple(p) for p in label_mapping]
    if not pairs:
        raise ValueError("label_mapping is empty")
    references = []
    for key, _ in pairs:
        if isinstance(key, str) and key.startswith("#") and len(key) == 7:
            references.append([int(key[i : i + 2], 16) for i in (1, 3, 5)])
        elif isinstance(key, str):
            references.append([float(part) for part in key.split(",")])
        elif isinstance(key, (int, float, np.number)):
            references.append([float(key)])
        else:
            references.append([float(part) for part in key])
    if len({len(reference) for reference in references}) != 1 or len(references[0]) not in (1, 3):
        raise ValueError(f"label_mapping keys must all be values or all be RGB colours, got {[k for k, _ in pairs]}")
    classes = np.array([int(cls) for _, cls in pairs], dtype=np.int64)
    if classes.min() < 0:
        raise ValueError(f"label_mapping classes must be >= 0, got {classes.tolist()}")
    return np.asarray(references, dtype=np.float64), classes


def _unit_intensities(data: np.ndarray, info: PictureInfo) -> np.ndarray:
    """Intensities scaled to ``[0, 1]`` by the bit depth (float data: taken as ``[0, 1]`` or ``[0, 255]``)."""
    values = data.astype(np.float32)
    if info.bit_depth > 0:
        return values / float(2**info.bit_depth - 1)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(low + high) or low < 0:
        raise DataError([(info.path, f"floating point intensities in [{low}, {high}] are not a picture's values")])
    if high <= 1.0:
        return values
    if high <= 255.0:
        return values / 255.0
    raise DataError(
        [
            (
                info.path,
                f"floating point intensities up to {high}: cannot tell the intensity range (expected 0..1, 0..255)",
            )
        ]
    )


def _without_alpha(data: np.ndarray) -> np.ndarray:
    return data[..., :-1] if data.shape[-1] in (2, 4) else data


def _channel_max(data: np.ndarray) -> np.ndarray:
    """``data.max(axis=-1, keepdims=True)``, several times faster for a handful of channels."""
    result = data[..., 0]
    for channel in range(1, data.shape[-1]):
        result = np.maximum(result, data[..., channel])
    return result[..., None]


class LoadPolypImage(InvertibleTransform):
    """Load one picture file as a float32 ``MetaTensor`` ``[3, H, W]`` (image) or ``[1, H, W]`` (label).

    Reads every format of :func:`monai_ecrm.data.image_io.read_picture` and applies the channel, intensity and mask
    rules of this module. Bad files raise :class:`~monai_ecrm.data.DataError` naming the file and the problem.

    Args:
        as_label: load a segmentation mask (``[1, H, W]``) rather than an image (``[3, H, W]``).
        num_classes: classes of the masks: 1 for binary polyp masks (thresholded to ``{0, 1}``); more for multi-class
            masks, whose values are class indices unless ``label_mapping`` is given.
        label_mapping: for masks, ``{value_or_colour: class}`` (see :func:`parse_label_mapping`); each pixel takes the
            class of the nearest listed value or colour.
        label_threshold: for binary masks, the stored value above which a pixel is foreground; half the intensity
            range (127.5 for 8-bit) when not given.
    """

    def __init__(
        self,
        as_label: bool = False,
        num_classes: int = 1,
        label_mapping: LabelMapping | None = None,
        label_threshold: float | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.as_label = as_label
        self.num_classes = num_classes
        self.label_threshold = label_threshold
        self.mapping = parse_label_mapping(label_mapping) if label_mapping is not None else None
        if self.mapping is not None and self.mapping[1].max() >= max(num_classes, 2):
            raise ValueError(f"label_mapping has classes {self.mapping[1].tolist()} beyond num_classes={num_classes}")

    def __call__(self, filename: str | os.PathLike, frame: int | None = None) -> MetaTensor:
        """Load ``filename`` (frame ``frame`` of a multi-frame file).

        Args:
            filename: a picture file.
            frame: frame index for multi-frame DICOM and multi-page TIFF files.
        """
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"{type(self).__name__} expects a file path, got {type(filename).__name__}")
        frame = None if frame is None or int(frame) < 0 else int(frame)
        data, info = read_picture(filename, frame=frame)
        array = self._label(data, info) if self.as_label else self._image(data, info)
        meta = picture_meta(info, frame)
        affine = torch.as_tensor(swap_xy_affine(meta.pop("affine")), dtype=torch.float64)
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))), affine=affine, meta=meta)
        return self.push_transform(image, extra_info={"layout": "[C, H, W] from [C, W, H]"})

    def _image(self, data: np.ndarray, info: PictureInfo) -> np.ndarray:
        values = _unit_intensities(_without_alpha(data), info)
        return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values

    def _label(self, data: np.ndarray, info: PictureInfo) -> np.ndarray:
        data = _without_alpha(data)
        if self.mapping is not None:
            references, classes = self.mapping
            pixels = data.astype(np.float64)
            if references.shape[1] == 1:
                pixels = _channel_max(pixels)
            elif pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            distances = ((pixels[..., None, :] - references) ** 2).sum(axis=-1)
            return classes[distances.argmin(axis=-1)][..., None].astype(np.float32)
        values = _channel_max(data)
        if self.num_classes > 1:
            if data.shape[-1] != 1:
                raise DataError(
                    [(info.path, "colour mask for multi-class labels: give label_mapping (colour -> class)")]
                )
            if values.size and (values.max() >= self.num_classes or values.min() < 0):
                raise DataError(
                    [
                        (
                            info.path,
                            f"mask values {int(values.min())}..{int(values.max())} are not class indices "
                            f"0..{self.num_classes - 1}: give label_mapping",
                        )
                    ]
                )
            return values.astype(np.float32)
        if self.label_threshold is not None:
            threshold = float(self.label_threshold)
        elif values.size and values.max() <= 1:
            threshold = 0.5
        else:
            threshold = (2**info.bit_depth - 1) / 2 if info.bit_depth > 0 else (0.5 if values.max() <= 1 else 127.5)
        return (values > threshold).astype(np.float32)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Give ``data`` ``[C, H, W]`` back MONAI's reader layout ``[C, W, H]`` and its reader affine.

        Args:
            data: a tensor this transform produced, or one carrying its trace (what ``Invertd`` passes).
        """
        self.pop_transform(data)
        inverted = data.transpose(-2, -1).contiguous()
        if isinstance(inverted, MetaTensor):
            inverted.affine = torch.as_tensor(swap_xy_affine(inverted.affine.cpu().numpy()), dtype=torch.float64)
        return inverted


class LoadPolypImaged(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`LoadPolypImage`: images and labels of a datalist item, with a size check.

    Usable from bundle configs: ``{"_target_": "monai_ecrm.transforms.LoadPolypImaged", "keys": ["image", "label"]}``.

    Args:
        keys: keys of the file paths to load.
        label_keys: which of the keys are segmentation masks (the others are images).
        num_classes: see :class:`LoadPolypImage`.
        label_mapping: see :class:`LoadPolypImage`.
        label_threshold: see :class:`LoadPolypImage`.
        frame_key: item key holding the frame index of a multi-frame file (``folder_datalist`` writes it).
        check_same_size: raise a :class:`~monai_ecrm.data.DataError` naming the files when the loaded pictures of one
            item differ in size (an image and a mask that do not belong together).
        allow_missing_keys: do not raise for keys missing from an item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = ("label",),
        num_classes: int = 1,
        label_mapping: LabelMapping | None = None,
        label_threshold: float | None = None,
        frame_key: str = "frame",
        check_same_size: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.frame_key = frame_key
        self.check_same_size = check_same_size
        self.image_loader = LoadPolypImage(as_label=False)
        self.label_loader = LoadPolypImage(True, num_classes, label_mapping, label_threshold)

    def _loader(self, key: Hashable) -> LoadPolypImage:
        return self.label_loader if key in self.label_keys else self.image_loader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = d.get(self.frame_key)
        loaded = []
        for key in self.key_iterator(d):
            d[key] = self._loader(key)(d[key], frame)
            loaded.append(key)
        if self.check_same_size and len({tuple(d[key].shape[1:]) for key in loaded}) > 1:
            raise DataError(
                [(d[key].meta["source_path"], f"{key} of size {d[key].shape[2]}x{d[key].shape[1]}") for key in loaded],
                header="image/mask size mismatch (width x height)",
            )
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the layout change for every key present (see :meth:`LoadPolypImage.inverse`).

        Args:
            data: a dictionary this transform produced (or ``Invertd``'s stand-in for it).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._loader(key).inverse(d[key])
        return d


class SavePredictiond(MapTransform):
    """Save predictions at their source's size in the source's format family.

    PNG (MONAI's ``SaveImage``) for 2D pictures (PNG, JPEG, BMP, TIFF, DICOM sources). NIfTI (nibabel) for NIfTI
    sources, in the source's own voxel layout: the source's affine, and the source's shape without its channel axis
    (``(549, 530)`` for a ``(549, 530)`` or an RGB ``(549, 530, 3)`` source, ``(x, y, 1, 1)`` for ``(x, y, 1, 1)`` or
    ``(x, y, 1, 1, 3)``; ``stored_spatial_ndim`` of :func:`monai_ecrm.data.picture_meta`).
    Binary masks are ``uint8`` 0/255 in both formats; probabilities 0..255 PNGs or float32 NIfTI in ``[0, 1]``;
    multi-class maps ``uint8`` class indices. The input must be in MONAI's reader layout, which ``Invertd`` with a
    preset gives (see :func:`monai_ecrm.transforms.infer_postprocessing`).
    Outputs are named as ``SaveImage`` names them; a frame of a multi-frame file is written as
    ``<stem>_frame0003_<postfix>.png``.

    Args:
        keys: keys of the predictions, ``[C, W, H]`` MetaTensors carrying their source's metadata.
        output_dir: folder to write to.
        output_postfix: appended to the source's file stem.
        output_ext: ``"auto"`` (by the source's format, as above) or a fixed extension such as ``".png"``.
        num_classes: 1 for binary masks (written as 0/255), more for class-index maps (written as is).
        separate_folder: one folder per source file, as ``SaveImage`` does.
        data_root_dir: keep the source's sub-folders below this folder in the output (see ``SaveImage``).
        print_log: log every written file.
        probabilities: the predictions are foreground probabilities in ``[0, 1]`` (binary segmentation), written as
            0..255 PNGs or float32 NIfTI rather than as masks.
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./output",
        output_postfix: str = "seg",
        output_ext: str = "auto",
        num_classes: int = 1,
        separate_folder: bool = False,
        data_root_dir: str | os.PathLike = "",
        print_log: bool = False,
        probabilities: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_ext = output_ext
        self.num_classes = num_classes
        self.probabilities = probabilities
        self.options = dict(
            output_dir=output_dir,
            output_postfix=output_postfix,
            resample=False,
            separate_folder=separate_folder,
            data_root_dir=data_root_dir,
            print_log=print_log,
        )
        self._savers: dict[str, SaveImage] = {}

    def _saver(self, ext: str) -> SaveImage:
        if ext not in self._savers:
            binary_png = self.num_classes == 1 and ext.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
            self._savers[ext] = SaveImage(
                output_ext=ext, output_dtype=np.uint8, scale=255 if binary_png else None, **self.options
            )
        return self._savers[ext]

    def _save_nifti(self, prediction: Any, ext: str) -> None:
        """Write with nibabel: MONAI 1.6's ``NibabelWriter`` fails on 2D data without singleton axes
        (``SpatialResample`` gets ``spatial_size`` None), and the shape must be the source's."""
        import nibabel

        meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
        array = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
        if array.ndim != 3 or array.shape[0] != 1:
            raise ValueError(f"expected a one-channel prediction [1, W, H] to write as NIfTI, got {array.shape}")
        spatial_ndim = int(meta.get("stored_spatial_ndim", 2))
        voxels = array[0].reshape(array.shape[1:] + (1,) * (spatial_ndim - 2))
        if self.probabilities:
            voxels = voxels.astype(np.float32)
        elif self.num_classes == 1:
            voxels = np.where(voxels > 0.5, 255, 0).astype(np.uint8)
        else:
            voxels = np.around(voxels).astype(np.uint8)
        affine = prediction.affine if isinstance(prediction, MetaTensor) else meta.get("affine", np.eye(4))
        affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
        image = nibabel.Nifti1Image(voxels, affine)
        image.set_sform(affine, code=1)  # scanner coordinates, as MONAI's NibabelWriter writes them
        image.set_qform(affine, code=1)
        options = self.options
        layout = FolderLayout(  # the names SaveImage gives
            output_dir=options["output_dir"],
            postfix=options["output_postfix"],
            extension=ext,
            parent=options["separate_folder"],
            makedirs=True,
            data_root_dir=options["data_root_dir"],
        )
        filename = layout.filename(**default_name_formatter(meta, self))
        nibabel.save(image, filename)
        if options["print_log"]:
            logger.info("file written: %s", filename)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
            ext = self.output_ext
            if ext == "auto":
                ext = ".nii.gz" if meta.get("source_format") == "nifti" else ".png"
            if ext.lower() in (".nii", ".nii.gz"):
                self._save_nifti(prediction, ext)
            else:
                d[key] = self._saver(ext)(prediction)
        return d
