"""ECRM: the Exterior Contextual-Relation Module of DCRNet.

Yin, Liang, Ma, Guo, "Duplex Contextual Relation Network for Polyp Segmentation", ISBI 2022.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers.factories import Conv
from torch import nn

from monai_ecrm.networks.blocks.memory_bank import MemoryBank

__all__ = ["ECRM", "class_prototypes"]


def class_prototypes(aux_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-class prototypes: the spatial softmax of each coarse-mask channel weights the features.

    Args:
        aux_logits: coarse mask logits ``[B, K, *spatial]``.
        features: embedded features ``[B, C, *spatial]``.

    Returns:
        ``[B, K, C]``: for every image and class, the softmax-over-positions weighted mean of the features.
    """
    weights = torch.softmax(aux_logits.flatten(2).float(), dim=-1).to(features.dtype)
    return torch.bmm(weights, features.flatten(2).transpose(1, 2))


class ECRM(nn.Module):
    """Exterior Contextual-Relation Module: every position of an image attends to a memory of class prototypes
    taken from earlier training images (DCRNet, ISBI 2022).

    Steps, for input features ``x`` ``[B, in_channels, *spatial]``:

    1. a 1x1 convolution gives the coarse mask ``aux_logits`` ``[B, num_classes, *spatial]`` (the auxiliary
       output, which needs its own supervision: see ``monai_ecrm.handlers.AuxSupervisionHandler``);
    2. a 3x3 convolution (norm, activation) embeds ``x`` into ``feat_channels`` features;
    3. the softmax of each coarse-mask channel over all positions weights the features into one prototype per class
       per image (:func:`class_prototypes`);
    4. in training mode the batch's prototypes are written into the :class:`MemoryBank` (no gradient), then every
       position attends over the filled memory; in eval mode the memory is frozen and only read;
    5. attention: queries are projected positions, keys and values are projected memory prototypes (every slot and
       class of the memory is one token); scaled dot product with the softmax over the memory tokens
       (``scaled_dot_product_attention``, so the positions x slots matrix is never kept for backward). A sample's
       output depends only on itself and the memory, never on the rest of the batch;
    6. the attended context is projected back to ``feat_channels`` and fused with the embedded features
       (a 1x1 convolution of their concatenation, computed as a sum of two 1x1 convolutions; norm, activation).

    Empty memory (a freshly initialised model in eval mode, or a training step whose prototypes were all refused):
    there is nothing to relate to, so the attended context is zero and the output is the fusion of the embedded
    features with a zero context. No error, no NaN.

    The memory projections are linear layers without normalisation: the seed listing used BatchNorm1d over the
    memory slots, which fails with one slot and makes the memory's keys depend on which slots are filled.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input feature map.
        num_classes: coarse-mask channels ``K`` (1 for binary polyp segmentation).
        bank_size: memory slots ``S`` (images remembered).
        feat_channels: channels of the embedded features and of the output.
        key_channels: channels of queries, keys and values in the attention.
        norm: normalisation of the convolutional layers (MONAI factory name or tuple).
        act: activation of the convolutional layers (MONAI factory name or tuple; in-place ReLU by default, which
            is safe after a norm layer and saves one activation per layer).
        bank_size_mismatch: policy when a checkpoint's memory has another slot count (see :class:`MemoryBank`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int = 1,
        bank_size: int = 20,
        feat_channels: int = 512,
        key_channels: int = 256,
        norm: str | tuple = "batch",
        act: str | tuple = ("relu", {"inplace": True}),
        bank_size_mismatch: str = "error",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ECRM: spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.feat_channels = feat_channels
        self.key_channels = key_channels
        self.coarse = Convolution(spatial_dims, in_channels, num_classes, kernel_size=1, conv_only=True, bias=True)
        self.embed = Convolution(
            spatial_dims, in_channels, feat_channels, kernel_size=3, norm=norm, act=act, bias=False
        )
        self.query = Convolution(
            spatial_dims, feat_channels, key_channels, kernel_size=1, norm=norm, act=act, bias=False
        )
        self.memory_key = nn.Sequential(nn.Linear(feat_channels, key_channels), nn.ReLU())
        self.memory_value = nn.Sequential(nn.Linear(feat_channels, key_channels), nn.ReLU())
        self.project = Convolution(
            spatial_dims, key_channels, feat_channels, kernel_size=1, norm=norm, act=act, bias=False
        )
        # fuse = conv1x1(concat(features, context)), written as the sum of two 1x1 convolutions so that the
        # 2 * feat_channels concatenation is never materialised (and never kept for backward)
        self.fuse_features = Conv[Conv.CONV, spatial_dims](feat_channels, feat_channels, kernel_size=1, bias=False)
        self.fuse_context = Conv[Conv.CONV, spatial_dims](feat_channels, feat_channels, kernel_size=1, bias=False)
        self.fuse_norm_act = ADN(ordering="NA", in_channels=feat_channels, act=act, norm=norm, norm_dim=spatial_dims)
        self.memory = MemoryBank(bank_size, num_classes, feat_channels, on_size_mismatch=bank_size_mismatch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(features, aux_logits)``: ``[B, feat_channels, *spatial]`` and ``[B, num_classes, *spatial]``."""
        aux_logits = self.coarse(x)
        features = self.embed(x)
        if self.training:
            self.memory.enqueue(class_prototypes(aux_logits, features))
        context = self.attend(features)
        fused = self.fuse_features(features) + self.fuse_context(self.project(context))
        return self.fuse_norm_act(fused), aux_logits

    def attend(self, features: torch.Tensor) -> torch.Tensor:
        """Cross attention of every position over the filled memory; ``[B, key_channels, *spatial]``.

        With an empty memory the context is zero (see the class docstring).
        """
        queries = self.query(features)
        batch = queries.shape[0]
        if self.memory.is_empty():
            return torch.zeros_like(queries)
        tokens = self.memory.filled_memory().reshape(-1, self.feat_channels)
        # autocast may run the projections in a lower precision; the memory itself stays float32
        keys = self.memory_key(tokens).to(queries.dtype)
        values = self.memory_value(tokens).to(queries.dtype)
        # 4-D (batch, heads, length, dim) inputs: the layout for which the CPU memory-efficient kernel is taken
        q = queries.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        k = keys.unsqueeze(0).unsqueeze(0).expand(batch, 1, keys.shape[0], keys.shape[1])
        v = values.unsqueeze(0).unsqueeze(0).expand(batch, 1, values.shape[0], values.shape[1])
        attended = F.scaled_dot_product_attention(q, k, v)
        return attended.squeeze(1).transpose(1, 2).reshape(queries.shape)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        _convert_seed_memory(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _convert_seed_memory(state_dict: Any, prefix: str) -> None:
    """Translate a memory saved by the seed listing (``bank`` ``[S, C, K]``, ``bank_ptr`` ``[1]``, no fill
    counter) into this module's layout, in place.

    The rule for the missing fill counter: the seed starts from zeros and writes slots in order, so if every slot
    from the pointer on is still exactly zero the memory never wrapped and holds ``pointer`` slots; otherwise it is
    full and the pointer marks the oldest slot. (A real prototype, the weighted mean of post-ReLU features, is
    exactly zero only if all features are: that ambiguity is accepted.) ``rejected`` starts at 0.
    """
    bank_key, pointer_key = prefix + "bank", prefix + "bank_ptr"
    if bank_key not in state_dict or prefix + "memory.memory" in state_dict:
        return
    bank = torch.as_tensor(state_dict.pop(bank_key))
    pointer = int(torch.as_tensor(state_dict.pop(pointer_key, torch.zeros(1))).reshape(-1)[0])
    num_slots = bank.shape[0]
    wrapped = bool(bank[pointer:].abs().sum() > 0) if pointer < num_slots else True
    filled = num_slots if wrapped else pointer
    state_dict[prefix + "memory.memory"] = bank.permute(0, 2, 1).contiguous().float()
    state_dict[prefix + "memory.pointer"] = torch.tensor(pointer % num_slots, dtype=torch.long)
    state_dict[prefix + "memory.filled"] = torch.tensor(filled, dtype=torch.long)
    state_dict[prefix + "memory.rejected"] = torch.tensor(0, dtype=torch.long)
