"""Train, eval and infer transform presets built from MONAI transforms, and the matching post-processing.

Every preset returns a ``monai.transforms.Compose`` and takes JSON-friendly arguments, so bundle configs call them
with ``_target_``. Tensors follow :mod:`monai_ecrm.transforms.io`: image float32 ``[3, H, W]`` normalised with the
ImageNet mean and standard deviation, label float32 ``[1, H, W]``.

Post-processing runs on the CPU (:data:`POSTPROCESSING_DEVICE`): every post-processing preset here starts by moving
the tensors it works on there, so what reaches the metrics and the writers is on one device whatever the device of the
network (GPU, several GPUs, ONNX Runtime) and of the batch keys the engine did not move (the full-size mask).

The training preset puts its deterministic steps (load, resize, a compact cast) first, so ``CacheDataset`` and
``PersistentDataset`` cache them and only the augmentation runs per epoch; all random steps are MONAI
``Randomizable`` transforms, seeded by ``set_determinism`` and ``Compose.set_random_state``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    CastToTyped,
    Compose,
    CopyItemsd,
    EnsureTyped,
    Invertd,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import ensure_tuple_rep

from monai_ecrm.transforms.io import LabelMapping, LoadPolypImaged, SavePredictiond

__all__ = [
    "NORMALIZATIONS",
    "POSTPROCESSING_DEVICE",
    "normalization_for_backbone",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "eval_postprocessing",
    "full_size_eval_postprocessing",
    "full_size_eval_transforms",
    "eval_transforms",
    "infer_postprocessing",
    "infer_transforms",
    "train_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Where the post-processing presets (and so the metrics, reports and writers fed by them) work: the one place that
#: decides it. A MONAI engine moves only ``image`` and ``label`` to its device; the network's output is on the network's
#: device and any other key of the batch (the full-size mask ``label_full``) stays where the data loader left it, on the
#: CPU. Mixing them fails (``Expected all tensors to be on the same device``), so each preset first moves the tensors it
#: uses here. The CPU suits this step: it handles one frame's masks at the original size (resize, sigmoid, threshold
#: and the metrics are cheap, memory-bound passes), the original-size mask is loaded on the CPU anyway, the weighted
#: F-measure's distance transform and the report run on the host regardless, and a long evaluation does not hold
#: original-size maps in GPU memory.
POSTPROCESSING_DEVICE = torch.device("cpu")


def _to_postprocessing_device(keys: Sequence[str], device: str | torch.device | None) -> EnsureTyped:
    """Moves ``keys`` (a missing key or a ``None`` value is left alone) to ``device`` (default
    :data:`POSTPROCESSING_DEVICE`), keeping their metadata and dtype."""
    target = POSTPROCESSING_DEVICE if device is None else torch.device(device)
    return EnsureTyped(keys=list(keys), device=target, allow_missing_keys=True)


def _size(spatial_size: int | Sequence[int]) -> tuple[int, int]:
    return tuple(int(size) for size in ensure_tuple_rep(spatial_size, 2))  # type: ignore[return-value]


#: per-channel (mean, std) on [0, 1] intensities for each ``normalization`` name. "lite": the TensorFlow preprocessing
#: the EfficientNet-Lite ImageNet weights were trained with, ``(x - 127) / 128`` on 0..255.
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}


def normalization_for_backbone(backbone: str) -> str:
    """The input normalisation a backbone's pretrained weights expect: ``"lite"`` for EfficientNet-Lite, else
    ``"imagenet"``."""
    return "lite" if backbone.startswith("efficientnet-lite") else "imagenet"


def _normalize(image_key: str, normalization: str = "imagenet") -> NormalizeIntensityd:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
    mean, std = NORMALIZATIONS[normalization]
    return NormalizeIntensityd(keys=image_key, subtrahend=np.array(mean), divisor=np.array(std), channel_wise=True)


def _resize(keys: Sequence[str], label_keys: Sequence[str], spatial_size: tuple[int, int], anti_aliasing: bool):
    modes = ["nearest" if key in label_keys else "bilinear" for key in keys]
    return Resized(
        keys=list(keys),
        spatial_size=spatial_size,
        mode=modes,
        align_corners=[None if mode == "nearest" else False for mode in modes],
        anti_aliasing=[anti_aliasing and mode != "nearest" for mode in modes],
    )


def train_transforms(
    spatial_size: int | Sequence[int] = 352,
    num_classes: int = 1,
    label_mapping: LabelMapping | None = None,
    image_key: str = "image",
    label_key: str = "label",
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    rotate_range: float = 0.5236,
    zoom_range: float = 0.15,
    intensity_prob: float = 0.5,
    brightness: float = 0.1,
    contrast: float = 0.3,
    colour: float = 0.1,
    anti_aliasing: bool = False,
    compact_cache: bool = True,
    normalization: str = "imagenet",
) -> Compose:
    """Training preset: load, resize, flips, rotation and zoom, colour/brightness/contrast jitter, normalisation.

    Args:
        spatial_size: output size, an int for a square or ``[H, W]``.
        num_classes: see :class:`~monai_ecrm.transforms.LoadPolypImaged`.
        label_mapping: see :class:`~monai_ecrm.transforms.LoadPolypImaged`.
        image_key: item key of the image.
        label_key: item key of the mask.
        flip_prob: probability of each of the vertical and horizontal flips.
        affine_prob: probability of a random rotation and zoom (one resampling).
        rotate_range: largest rotation in radians (default 30 degrees), either way.
        zoom_range: largest relative zoom, in and out (0.15: scale factors 0.85 .. 1.15).
        intensity_prob: probability of each intensity jitter.
        brightness: largest brightness shift, in ``[0, 1]`` intensity units.
        contrast: gamma range ``1 - contrast .. 1 + contrast``.
        colour: largest relative gain of each colour channel separately (a colour cast).
        anti_aliasing: Gaussian-smooth images before downsizing (MONAI's ``Resize`` option; masks are resized by
            nearest neighbour). Off by default: it costs about 0.1 s per Kvasir-SEG image on one CPU core, ten times
            the bilinear resize, and endoscopic pictures are smooth. Use the same setting for training and eval.
        compact_cache: cache float16 images and uint8 masks (about 1.3 GB instead of 2.9 GB for the 1450 training
            pairs at 352 px); they are cast back to float32 after the first random step.
        normalization: ``"imagenet"`` (ImageNet mean/std, for torchvision/MONAI encoders) or ``"lite"`` (the
            EfficientNet-Lite weights' ``(x - 127) / 128``); see :func:`normalization_for_backbone`.
    """
    size = _size(spatial_size)
    keys = [image_key, label_key]
    steps: list[Any] = [
        LoadPolypImaged(keys=keys, label_keys=[label_key], num_classes=num_classes, label_mapping=label_mapping),
        _resize(keys, [label_key], size, anti_aliasing),
    ]
    if compact_cache:
        steps.append(CastToTyped(keys=keys, dtype=[torch.float16, torch.uint8]))
    steps += [
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        EnsureTyped(keys=keys, dtype=torch.float32),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandAffined(
            keys=keys,
            prob=affine_prob,
            rotate_range=rotate_range,
            scale_range=zoom_range,
            mode=["bilinear", "nearest"],
            padding_mode="zeros",
            spatial_size=size,
            cache_grid=True,
        ),
        RandAdjustContrastd(keys=image_key, prob=intensity_prob, gamma=(1.0 - contrast, 1.0 + contrast)),
        RandScaleIntensityd(keys=image_key, prob=intensity_prob, factors=colour, channel_wise=True),
        RandShiftIntensityd(keys=image_key, prob=intensity_prob, offsets=brightness),
        ScaleIntensityRanged(keys=image_key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        _normalize(image_key, normalization),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]
    return Compose(steps)


def eval_transforms(
    spatial_size: int | Sequence[int] = 352,
    num_classes: int = 1,
    label_mapping: LabelMapping | None = None,
    image_key: str = "image",
    label_key: str = "label",
    resize_label: bool = True,
    anti_aliasing: bool = False,
    normalization: str = "imagenet",
) -> Compose:
    """Evaluation preset: load, resize, normalise; metadata kept so ``Invertd`` restores the original size.

    Args:
        spatial_size: network input size, an int for a square or ``[H, W]``.
        num_classes: see :class:`~monai_ecrm.transforms.LoadPolypImaged`.
        label_mapping: see :class:`~monai_ecrm.transforms.LoadPolypImaged`.
        image_key: item key of the image.
        label_key: item key of the mask.
        resize_label: resize the mask too (nearest neighbour) so batches stack; ``False`` keeps it at the original
            size, for metrics on the inverted prediction (batch size 1 where sizes differ).
        anti_aliasing: Gaussian-smooth images before downsizing (see :func:`train_transforms`).
        normalization: ``"imagenet"`` (ImageNet mean/std, for torchvision/MONAI encoders) or ``"lite"`` (the
            EfficientNet-Lite weights' ``(x - 127) / 128``); see :func:`normalization_for_backbone`.
    """
    size = _size(spatial_size)
    keys = [image_key, label_key]
    return Compose(
        [
            LoadPolypImaged(keys=keys, label_keys=[label_key], num_classes=num_classes, label_mapping=label_mapping),
            _resize(keys if resize_label else [image_key], [label_key], size, anti_aliasing),
            _normalize(image_key, normalization),
            EnsureTyped(keys=keys, dtype=torch.float32),
        ]
    )


def infer_transforms(
    spatial_size: int | Sequence[int] = 352,
    image_key: str = "image",
    anti_aliasing: bool = False,
    normalization: str = "imagenet",
) -> Compose:
    """Inference preset: load, resize, normalise; metadata kept so ``Invertd`` restores the original size.

    Args:
        spatial_size: network input size, an int for a square or ``[H, W]``.
        image_key: item key of the image.
        anti_aliasing: Gaussian-smooth images before downsizing (see :func:`train_transforms`).
        normalization: ``"imagenet"`` (ImageNet mean/std, for torchvision/MONAI encoders) or ``"lite"`` (the
            EfficientNet-Lite weights' ``(x - 127) / 128``); see :func:`normalization_for_backbone`.
    """
    return Compose(
        [
            LoadPolypImaged(keys=image_key, label_keys=[]),
            _resize([image_key], [], _size(spatial_size), anti_aliasing),
            _normalize(image_key, normalization),
            EnsureTyped(keys=image_key, dtype=torch.float32),
        ]
    )


def full_size_eval_transforms(
    spatial_size: int | Sequence[int] = 352,
    normalization: str = "imagenet",
    image_key: str = "image",
    label_key: str = "label",
    full_label_key: str = "label_full",
) -> Compose:
    """Evaluation at the original size: :func:`eval_transforms` plus a second, untouched copy of the mask.

    ``label_key`` is resized with the image (for anything scored at the network's size, such as the ECRM aux
    Dice); ``full_label_key`` keeps the mask at its original size so the polyp metrics are computed on the real
    mask, not on a mask resized down and back up. Batches of one image, since original sizes differ. Pair it with
    :func:`full_size_eval_postprocessing`.

    Args:
        spatial_size: network input size.
        normalization: see :func:`eval_transforms`.
        image_key: item key of the image.
        label_key: item key of the mask resized with the image.
        full_label_key: item key of the full-size copy of the mask.
    """
    size = _size(spatial_size)
    return Compose(
        [
            CopyItemsd(keys=label_key, names=full_label_key),
            LoadPolypImaged(keys=[image_key, label_key, full_label_key], label_keys=[label_key, full_label_key]),
            _resize([image_key, label_key], [label_key], size, False),
            _normalize(image_key, normalization),
            EnsureTyped(keys=[image_key, label_key, full_label_key], dtype=torch.float32),
        ]
    )


def full_size_eval_postprocessing(
    preprocessing: Compose,
    pred_key: str = "pred",
    image_key: str = "image",
    full_label_key: str = "label_full",
    output_label_key: str = "gt",
    device: str | torch.device | None = None,
) -> Compose:
    """Logits to foreground probabilities at the original size, with the full-size mask and image beside them.

    The prediction, the full-size mask and the image are first moved to one device, the CPU
    (:data:`POSTPROCESSING_DEVICE`): the network's output is on the network's device (a GPU) while the full-size mask,
    which the engine does not move, is on the CPU. Sigmoid, then ``Invertd`` of the prediction (bilinear), of the
    full-size mask and of the image through ``preprocessing`` (:func:`full_size_eval_transforms`), so all three share
    MONAI's reader layout at the source's size. Thresholding is left to the metrics
    (``monai_ecrm.handlers.PolypOverlap``), which need the probability map for S-measure, E-measure, weighted
    F-measure and MAE.

    Args:
        preprocessing: the :func:`full_size_eval_transforms` instance that made the network input.
        pred_key: item key of the network output.
        image_key: item key of the image.
        full_label_key: item key of the full-size mask.
        output_label_key: the full-size mask is copied to this key, which MONAI engines put in
            ``engine.state.output`` (keys that came with the batch go back to ``engine.state.batch``), so metric
            handlers read it with ``from_engine(["pred", output_label_key])``.
        device: where the post-processing and so the metrics run; ``None`` (default): :data:`POSTPROCESSING_DEVICE`.
    """
    return Compose(
        [
            _to_postprocessing_device([pred_key, full_label_key, image_key], device),
            Activationsd(keys=pred_key, sigmoid=True),
            Invertd(
                keys=[pred_key, full_label_key, image_key],
                transform=preprocessing,
                orig_keys=[image_key, full_label_key, image_key],
                nearest_interp=[False, True, False],
                to_tensor=True,
            ),
            CopyItemsd(keys=full_label_key, names=output_label_key),
        ]
    )


def eval_postprocessing(
    num_classes: int = 1,
    threshold: float = 0.5,
    pred_key: str = "pred",
    label_key: str = "label",
    device: str | torch.device | None = None,
) -> Compose:
    """Logits to discrete predictions for metrics: sigmoid and threshold (binary) or softmax, argmax and one-hot.

    The prediction and the mask are first moved to the CPU (:data:`POSTPROCESSING_DEVICE`), as in every post-processing
    preset, so the metrics run on the CPU whatever the network's device.

    Args:
        num_classes: 1 for binary segmentation (one logit channel), more for softmax over classes.
        threshold: foreground probability threshold of binary segmentation.
        pred_key: item key of the network output.
        label_key: item key of the mask (one-hot encoded for multi-class metrics).
        device: where the post-processing and so the metrics run; ``None`` (default): :data:`POSTPROCESSING_DEVICE`.
    """
    to_device = _to_postprocessing_device([pred_key, label_key], device)
    if num_classes == 1:
        return Compose(
            [to_device, Activationsd(keys=pred_key, sigmoid=True), AsDiscreted(keys=pred_key, threshold=threshold)]
        )
    return Compose(
        [
            to_device,
            Activationsd(keys=pred_key, softmax=True),
            AsDiscreted(keys=[pred_key, label_key], argmax=[True, False], to_onehot=num_classes),
        ]
    )


def infer_postprocessing(
    preprocessing: Compose,
    output_dir: str | os.PathLike | None = None,
    num_classes: int = 1,
    threshold: float = 0.5,
    pred_key: str = "pred",
    image_key: str = "image",
    output_postfix: str = "seg",
    output_ext: str = "auto",
    separate_folder: bool = False,
    data_root_dir: str | os.PathLike = "",
    print_log: bool = False,
    probabilities: bool = False,
    device: str | torch.device | None = None,
) -> Compose:
    """Logits to masks at the source's size and layout, optionally written to files (``Invertd`` + ``SaveImage``).

    The prediction is first moved to the CPU (:data:`POSTPROCESSING_DEVICE`), as in every post-processing preset.
    Activation (sigmoid or softmax), ``Invertd`` through ``preprocessing`` (probabilities resized back bilinearly,
    then the loader's layout change undone), threshold or argmax, then :class:`SavePredictiond` when ``output_dir``
    is given. The inverted prediction is ``[C, W, H]`` in MONAI's reader layout, which MONAI's writers expect.

    Args:
        preprocessing: the preset (or any invertible ``Compose``) that produced the network input.
        output_dir: where to write the masks; ``None`` writes nothing.
        num_classes: 1 for binary segmentation, more for multi-class.
        threshold: foreground probability threshold of binary segmentation.
        pred_key: item key of the network output.
        image_key: item key of the input image, whose transforms are inverted.
        output_postfix: see :class:`SavePredictiond`.
        output_ext: see :class:`SavePredictiond`.
        separate_folder: see :class:`SavePredictiond`.
        data_root_dir: see :class:`SavePredictiond`.
        print_log: see :class:`SavePredictiond`.
        probabilities: keep the foreground probability instead of thresholding it (binary segmentation only): PNGs
            hold it as 0..255, NIfTI files as float32.
        device: where the post-processing runs; ``None`` (default): :data:`POSTPROCESSING_DEVICE`.
    """
    binary = num_classes == 1
    if probabilities and not binary:
        raise ValueError("probabilities=True is for binary segmentation (num_classes=1)")
    steps: list[Any] = [
        _to_postprocessing_device([pred_key], device),
        Activationsd(keys=pred_key, sigmoid=binary, softmax=not binary),
        Invertd(keys=pred_key, transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True),
    ]
    if not probabilities:
        steps.append(
            AsDiscreted(keys=pred_key, threshold=threshold) if binary else AsDiscreted(keys=pred_key, argmax=True)
        )
    if output_dir is not None:
        steps.append(
            SavePredictiond(
                keys=pred_key,
                output_dir=output_dir,
                output_postfix=output_postfix,
                output_ext=output_ext,
                num_classes=num_classes,
                separate_folder=separate_folder,
                data_root_dir=data_root_dir,
                print_log=print_log,
                probabilities=probabilities,
            )
        )
    return Compose(steps)
