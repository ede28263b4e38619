"""ICRM: the Interior Contextual-Relation Module of DCRNet (position self-attention within one image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

__all__ = ["ICRM"]


class ICRM(nn.Module):
    """Interior Contextual-Relation Module: every position attends to every other position of the same image.

    The position-attention form used by DCRNet's interior branch (as in DANet's position attention module):
    1x1 convolutions give queries and keys with ``in_channels // reduction`` channels and values with
    ``in_channels``; the softmax runs over the image's positions; the attended values are added to the input with
    a learnable scale ``gamma`` that starts at zero, so a fresh module is the identity.
    ``scaled_dot_product_attention`` (4-D layout) keeps the positions x positions matrix out of memory; unlike the
    original, the dot product is scaled by ``1/sqrt(key channels)``.

    Yin, Liang, Ma, Guo, "Duplex Contextual Relation Network for Polyp Segmentation", ISBI 2022;
    Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (and output) feature map.
        reduction: channel reduction of queries and keys.
    """

    def __init__(self, spatial_dims: int, in_channels: int, reduction: int = 8) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ICRM: spatial_dims must be 2 or 3, got {spatial_dims}.")
        conv = Conv[Conv.CONV, spatial_dims]
        key_channels = max(1, in_channels // reduction)
        self.query = conv(in_channels, key_channels, kernel_size=1)
        self.key = conv(in_channels, key_channels, kernel_size=1)
        self.value = conv(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, *spatial]`` -> ``[B, C, *spatial]``."""
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(x.shape)
        return x + self.gamma * attended
