"""A tiny ECRM network and labelled items shared by the engine-handler tests."""

from __future__ import annotations

import torch

from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet

SIZE = 32


def tiny_net(**options) -> ECRMUNet:
    """A tiny ECRMUNet with DCRNet's ECRM block (the handlers' tests train it without passing labels); ``options``
    override any argument."""
    kwargs = {"backbone": "resnet10", "bank_size": 4, "ecrm_channels": 16, "key_channels": 8, **DCRNET_ECRM_OPTIONS}
    return ECRMUNet(**{**kwargs, "decoder_channels": (16,) * 5, **options})


def items(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` images of ``SIZE`` pixels with a square polyp-like label each, deterministic for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        label = torch.zeros(1, SIZE, SIZE)
        top, left = torch.randint(0, SIZE // 2, (2,), generator=generator).tolist()
        label[:, top : top + SIZE // 2, left : left + SIZE // 2] = 1.0
        data.append({"image": torch.randn(3, SIZE, SIZE, generator=generator) + label, "label": label})
    return data
