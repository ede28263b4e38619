"""The bundle's pre- and post-processing for clinical inputs and outputs.

:func:`clinical_preprocessing` is the bundle's inference preprocessing
(:func:`~monai_ecrm.transforms.infer_transforms`) with a loader that also takes DICOM frames decoded one at a time
(:class:`LoadFramed`); :func:`clinical_postprocessing` is the bundle's post-processing (sigmoid, ``Invertd`` back to
the source's size, threshold) ending in :class:`~monai_ecrm.clinical.save.SaveDicomSegd`. A mask is therefore the same
whatever the input format and whether it comes from ``monai-ecrm-infer`` or from ``python -m monai.bundle run
--config_file configs/inference.json`` (whose ``postprocessing`` can be :func:`clinical_postprocessing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_ecrm.clinical.save import SaveDicomSegd
from monai_ecrm.clinical.seg import bundle_version
from monai_ecrm.clinical.sources import DecodedFrame
from monai_ecrm.data.image_io import picture_meta, swap_xy_affine
from monai_ecrm.transforms import LoadPolypImaged, infer_postprocessing, infer_transforms
from monai_ecrm.transforms.io import LoadPolypImage

__all__ = ["LoadFramed", "clinical_postprocessing", "clinical_preprocessing"]


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
    """:class:`~monai_ecrm.transforms.LoadPolypImaged` for images that also takes a
    :class:`~monai_ecrm.clinical.sources.DecodedFrame` in place of a file path: the same tensor, metadata and
    invertible trace as loading that frame from its file.

    Args:
        keys: keys of the images (file paths or decoded frames).
        frame_key: item key holding the frame index of a multi-frame file given by path.
        allow_missing_keys: do not raise for keys missing from an item.
    """

    def __init__(self, keys: KeysCollection = "image", frame_key: str = "frame", allow_missing_keys: bool = False):
        super().__init__(keys, label_keys=[], frame_key=frame_key, allow_missing_keys=allow_missing_keys)
        self.image_loader = _FrameLoader(as_label=False)


def clinical_preprocessing(spatial_size: int | Sequence[int] = 352, normalization: str = "imagenet") -> Compose:
    """The bundle's inference preprocessing (:func:`~monai_ecrm.transforms.infer_transforms`) with a loader that
    also takes DICOM frames decoded one at a time (:class:`LoadFramed`).

    Args:
        spatial_size: network input size.
        normalization: ``"imagenet"`` or ``"lite"`` (see :func:`~monai_ecrm.transforms.normalization_for_backbone`).
    """
    preset = infer_transforms(spatial_size=spatial_size, normalization=normalization)
    if not preset.transforms or not isinstance(preset.transforms[0], LoadPolypImaged):
        raise RuntimeError("infer_transforms no longer starts with LoadPolypImaged: update clinical_preprocessing")
    return Compose([LoadFramed(keys="image"), *preset.transforms[1:]])


def clinical_postprocessing(
    preprocessing: Compose,
    output_dir: str | os.PathLike,
    threshold: float = 0.5,
    probabilities: bool = False,
    dicom_png: bool = False,
    data_root_dir: str | os.PathLike = "",
    bundle_root: str | os.PathLike | None = None,
    algorithm_parameters: dict[str, Any] | None = None,
) -> Compose:
    """The bundle's inference post-processing (:func:`~monai_ecrm.transforms.infer_postprocessing`: sigmoid,
    ``Invertd``, threshold) ending in :class:`~monai_ecrm.clinical.save.SaveDicomSegd`: a DICOM SEG per DICOM source,
    the bundle's PNG/NIfTI masks for the other formats, written atomically.

    Args:
        preprocessing: the transforms that produced the network input (inverted to the source's size).
        output_dir: the output folder.
        threshold: foreground probability threshold.
        probabilities: write probabilities (FRACTIONAL SEG, 0..255 PNG) rather than masks.
        dicom_png: also write PNG masks for DICOM sources.
        data_root_dir: keep the sources' sub-folders below this folder in the output.
        bundle_root: the bundle whose ``configs/metadata.json`` version names the algorithm in the SEG.
        algorithm_parameters: parameters listed in the SEG's algorithm identification (threshold added).
    """
    steps = infer_postprocessing(preprocessing, output_dir=None, threshold=threshold, probabilities=probabilities)
    parameters = {"threshold": threshold, **(algorithm_parameters or {})}
    if probabilities:
        parameters["threshold"] = "none (probabilities)"
    writer = SaveDicomSegd(
        keys="pred",
        output_dir=output_dir,
        probabilities=probabilities,
        dicom_png=dicom_png,
        data_root_dir=data_root_dir,
        algorithm_version=bundle_version(bundle_root),
        algorithm_parameters=parameters,
    )
    return Compose([*steps.transforms, writer])
