from __future__ import annotations

from .ecrm_unet import DCRNET_ECRM_OPTIONS, OFFLINE_PRETRAINED_BACKBONES, ECRMUNet, dcrnet
from .efficientnet_lite import EfficientNetLiteEncoder, lite0_weights_path
from .pretrained import load_encoder_weights
from .resnet_encoder import TorchvisionResNetEncoder

__all__ = [
    "ECRMUNet",
    "dcrnet",
    "DCRNET_ECRM_OPTIONS",
    "OFFLINE_PRETRAINED_BACKBONES",
    "EfficientNetLiteEncoder",
    "lite0_weights_path",
    "load_encoder_weights",
    "TorchvisionResNetEncoder",
]
