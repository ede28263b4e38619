"""ECRM: the Exterior Contextual-Relation Module of DCRNet.

Yin, Liang, Ma, Guo, "Duplex Contextual Relation Network for Polyp Segmentation", ISBI 2022.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers.factories import Conv
from torch import nn

from monai_ecrm.networks.blocks.memory_bank import MemoryBank

__all__ = ["ECRM", "class_prototypes", "label_prototypes", "CONTEXT_STARTS", "PROTOTYPE_SOURCES"]

#: accepted values of ``ECRM(context_start=...)``
CONTEXT_STARTS = ("full", "gate", "zero")
#: accepted values of ``ECRM(prototypes=...)``
PROTOTYPE_SOURCES = ("coarse", "label")


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


def coarse_weights(aux_logits: torch.Tensor, background: bool = False) -> torch.Tensor:
    """The coarse mask as prototype logits ``[B, K (+1), *spatial]``: each class's logits and, with ``background``,
    the negated largest class logit (the positions no class claims), for :func:`class_prototypes`."""
    if not background:
        return aux_logits
    return torch.cat([aux_logits, -aux_logits.amax(dim=1, keepdim=True)], dim=1)


def label_weights(labels: torch.Tensor, num_classes: int, size: list[int], background: bool = False) -> torch.Tensor:
    """The ground-truth mask area-pooled to the feature grid: class fractions ``[B, K (+1), *size]`` in [0, 1].

    ``labels`` is ``[B, 1, *spatial]`` (binary for ``num_classes == 1``, class indices otherwise) or
    ``[B, num_classes, *spatial]`` (one channel per class, e.g. one-hot); with ``background`` the last channel is the
    fraction of each cell that no class covers.
    """
    labels = labels.float()
    if labels.shape[1] == 1 and num_classes > 1:
        labels = F.one_hot(labels[:, 0].long().clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()
    elif labels.shape[1] != num_classes:
        raise ValueError(
            f"ECRM: labels must have 1 or num_classes={num_classes} channels, got {labels.shape[1]} "
            f"(labels of shape {list(labels.shape)})."
        )
    fractions = F.interpolate(labels.clamp(0.0, 1.0), size=size, mode="area")
    if background:
        fractions = torch.cat([fractions, (1.0 - fractions.sum(dim=1, keepdim=True)).clamp_min(0.0)], dim=1)
    return fractions


def label_prototypes(
    fractions: torch.Tensor, features: torch.Tensor, background: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-weighted means of the features: ``([B, K, C] prototypes, [B] bool: every class present)``.

    ``fractions`` ``[B, K, *spatial]`` (:func:`label_weights`) weight ``features`` ``[B, C, *spatial]``. A class
    absent from an image (zero total weight) has no prototype there, and the image is flagged so that it is not
    written to the memory. With ``background`` the last channel is the background: where the classes cover the
    whole picture it is absent, and its prototype is then the mean of all positions (the image is still written).
    """
    weights = fractions.flatten(2).to(features.dtype)
    if background:
        empty = weights[:, -1:].sum(dim=-1, keepdim=True) <= 0
        weights = torch.cat([weights[:, :-1], torch.where(empty, torch.ones_like(weights[:, -1:]), weights[:, -1:])], 1)
    totals = weights.sum(dim=-1, keepdim=True)
    sums = torch.bmm(weights, features.flatten(2).transpose(1, 2))
    present = (totals.squeeze(-1) > 0).all(dim=1)
    return sums / totals.clamp_min(1e-6), present


if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4

    def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

else:  # pragma: no cover (torch 2.1 - 2.3)

    def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


_compiler = getattr(torch, "compiler", None)
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)


def _collective_buffers() -> bool:
    """Whether a process group of several ranks is up: collectives (``refresh_memory``'s broadcast, DDP's buffer
    broadcast) then overwrite the memory in place without bumping torch's version counters."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

    Variants (constructor options; this block's defaults are the published DCRNet block). ``ECRMUNet``'s defaults are
    another option set, the accuracy study's choice: ``prototypes="label"``, ``background_tokens=True``,
    ``supervise_attention=True`` (on the 1/16 map); ``monai_ecrm.networks.nets.DCRNET_ECRM_OPTIONS`` gives it this
    block's.

    - ``context_start``: how the memory's contribution starts. ``"full"`` (DCRNet): the fusion convolution of the
      context is initialised like every other layer. ``"gate"``: the projected context is multiplied by a learnable
      scalar ``context_gate`` initialised to 0 (DANet's attention modules), so an untrained memory cannot disturb the
      decoder and grows in as it becomes useful. ``"zero"``: the context's 1x1 fusion convolution is initialised to
      zero (the same exact-zero start, with one learnable weight per channel pair instead of one scalar).
    - ``prototypes``: what is written to the memory. ``"coarse"`` (DCRNet): the coarse mask's spatial softmax
      weights the features. ``"label"``: the ground-truth mask, area-pooled to the feature grid, weights them (mask-
      weighted means, :func:`label_prototypes`); the label is passed in training (``forward(x, labels=...)``) and in
      the memory refresh, never at inference, where the memory is frozen. An image lacking one of the classes is not
      written. The coarse mask keeps its own supervision either way.
    - ``background_tokens``: each slot also holds a background prototype (for binary segmentation: the polyp and
      everything else), from the negated coarse mask or from ``1 - label``.
    - ``attend_first``: in training, attend to the memory as it was *before* this batch's write, then write. With
      ``False`` (DCRNet) the batch's own prototypes are in the memory it attends to, which inference never sees; with
      label prototypes that would leak the label into the training prediction, so ``prototypes="label"`` requires
      ``attend_first`` (``None``: ``True`` for label prototypes, ``False`` otherwise).

    - ``supervise_attention``: the coarse mask that ECRM outputs (and the aux supervision trains) becomes the
      attention's own per-class log-odds at every position: ``logsumexp`` of the scores over the class's memory tokens
      minus ``logsumexp`` over the background tokens. The aux loss then teaches each position to attend to the
      memory's polyp prototypes where there is polyp and to its background prototypes elsewhere, so the attended
      context carries what the memory knows (left to itself, the attention stays flat and unrelated to the
      foreground, and the network learns to ignore the memory). Needs ``prototypes="label"`` (the coarse conv then
      feeds nothing) and ``background_tokens``; with an empty memory the coarse conv's mask is output instead. The
      attention is computed explicitly (cheap at the memory level: positions x slots x classes).

    Distributed training: which parameters a training step uses changes with the memory (an empty memory leaves the
    memory projections aside; with ``supervise_attention`` the coarse convolution stands aside once the memory fills),
    so ``DistributedDataParallel`` needs ``find_unused_parameters=True`` for these variants (the bundle's
    ``multi_gpu_train.json`` sets it); DCRNet's block uses every parameter at every step and works with DDP's default
    too. In training the coarse convolution reaches the output with weight 0 (the values are unchanged), so that it
    takes part in every step: the search for unused parameters starts from the output, and the aux loss reaches the
    coarse mask through a hook.

    Eval-time cache of the memory side: with a frozen memory, what depends on the memory alone (the filled-slot
    slice, the ``memory_key`` / ``memory_value`` projections of its tokens, their layouts, the
    ``1 / sqrt(key_channels)`` scaling of the keys, whether the memory is empty) is the same for every frame, so in
    eval mode without gradient (``torch.no_grad()`` / ``torch.inference_mode()``) it is computed once and kept
    (``memory_cache = False`` turns this off). It is recomputed when anything it was computed from may have changed:
    the bank's ``content_version`` (every write, ``reset``, state-dict load, ``MemoryBank.mark_changed()``); torch's
    in-place version counter, storage address, device and dtype of the memory, of its fill counter and of every
    parameter and buffer of the two projections (an optimizer step, ``load_state_dict``, ``.to(...)``); the queries'
    dtype and the autocast state. Training mode, gradient-enabled eval, ``torch.jit.script``, tracing
    (``torch.jit.trace``, ONNX export: the memory stays in the graph, an initializer of the ONNX file),
    ``torch.compile``/``torch.export`` and several-rank process groups (collectives write buffers without bumping the
    version counters) always compute it afresh, as before. A write that no version counter sees (through ``.data`` or
    numpy) needs ``MemoryBank.mark_changed()`` or :meth:`clear_memory_cache`.

    When a sample's output depends on the rest of the batch: in eval mode never (the memory is frozen, BatchNorm uses
    its running statistics). In training it does through BatchNorm's batch statistics, and, with ``attend_first=False``,
    through the other samples' prototypes written before the attention; with ``attend_first=True`` and batch-free
    norms (instance, group, layer) it does not.

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
        context_start: ``"full"``, ``"gate"`` or ``"zero"`` (see above).
        prototypes: ``"coarse"`` or ``"label"`` (see above).
        background_tokens: add a background prototype to every slot (see above).
        attend_first: attend before writing in training (see above); ``None`` follows ``prototypes``.
        supervise_attention: output the attention's log-odds as the coarse mask (see above).
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
        context_start: str = "full",
        prototypes: str = "coarse",
        background_tokens: bool = False,
        attend_first: bool | None = None,
        supervise_attention: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ECRM: spatial_dims must be 2 or 3, got {spatial_dims}.")
        if supervise_attention and not (prototypes == "label" and background_tokens):
            raise ValueError(
                "ECRM: supervise_attention needs prototypes='label' and background_tokens=True (the log-odds compare "
                "each class's memory tokens with the background tokens)."
            )
        if context_start not in CONTEXT_STARTS:
            raise ValueError(f"ECRM: context_start must be one of {CONTEXT_STARTS}, got {context_start!r}.")
        if prototypes not in PROTOTYPE_SOURCES:
            raise ValueError(f"ECRM: prototypes must be one of {PROTOTYPE_SOURCES}, got {prototypes!r}.")
        if attend_first is None:
            attend_first = prototypes == "label"
        if prototypes == "label" and not attend_first:
            raise ValueError(
                "ECRM: prototypes='label' needs attend_first=True: a batch attending to its own ground-truth "
                "prototypes would see its label in training, which inference cannot reproduce."
            )
        self.context_start = context_start
        self.prototypes = prototypes
        self.label_prototypes = prototypes == "label"
        self.background_tokens = bool(background_tokens)
        self.attend_first = bool(attend_first)
        self.gated = context_start == "gate"
        self.supervise_attention = bool(supervise_attention)
        self.memory_classes = num_classes + int(self.background_tokens)
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
        if context_start == "zero":
            nn.init.zeros_(self.fuse_context.weight)
        if self.gated:
            self.context_gate = nn.Parameter(torch.zeros(1))
        else:
            # not a parameter and not saved: DCRNet-layout checkpoints load strictly; never used when not gated
            self.register_buffer("context_gate", torch.ones(1), persistent=False)
        self.memory = MemoryBank(bank_size, self.memory_classes, feat_channels, on_size_mismatch=bank_size_mismatch)
        #: eval-time cache of the memory side (see the class docstring); False computes it at every forward
        self.memory_cache = True
        self._memory_cache: tuple | None = None

    #: Python-side state TorchScript never sees (the scripted forward computes the memory side at every call)
    __jit_ignored_attributes__ = ["memory_cache", "_memory_cache"]

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, sources: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(features, aux_logits)``: ``[B, feat_channels, *spatial]`` and ``[B, num_classes, *spatial]``.

        ``labels`` (training only, for ``prototypes="label"``): the ground truth ``[B, 1 or num_classes, *spatial']``
        at the input size of the network, area-pooled here to ``x``'s grid; ignored otherwise and in eval mode.
        ``sources`` ``[B]`` (training only): integer case identities recorded beside the prototypes written
        (``MemoryBank.sources``, for provenance); ``None`` records them as unknown.
        """
        coarse_logits = self.coarse(x)
        aux_logits = coarse_logits
        features = self.embed(x)
        if self.training and not self.attend_first:
            self.write(aux_logits, features, labels, sources)
        if self.supervise_attention:
            context, odds, attended = self.attend_with_odds(features, self.training and self.attend_first)
            if attended:
                aux_logits = odds
        else:
            context = self.attend(features, self.training and self.attend_first)
        projected = self.fuse_context(self.project(context))
        if self.gated:
            projected = projected * self.context_gate.to(projected.dtype)
        fused = self.fuse_features(features) + projected
        if self.training and self.attend_first:
            self.write(aux_logits, features, labels, sources)
        output = self.fuse_norm_act(fused)
        if self.training:
            # the coarse convolution reaches the output with weight 0 (values unchanged, each sample its own), so
            # that it takes part in every training step: DistributedDataParallel(find_unused_parameters=True) finds a
            # step's parameters from the network's output, and the aux loss, which takes the coarse mask through a
            # forward hook, would otherwise give a gradient to a convolution it took for unused ("marked as ready
            # twice"); and with supervise_attention, where the attention's log-odds replace its mask, the convolution
            # gets a (zero) gradient at every step whether or not the run was resumed, so a resumed run's optimizer
            # treats it as an uninterrupted run's does
            zero = coarse_logits.flatten(1).sum(1) * 0.0
            output = output + zero.reshape([-1] + [1] * (output.dim() - 1)).to(output.dtype)
        return output, aux_logits

    def write(
        self,
        aux_logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        sources: torch.Tensor | None = None,
    ) -> None:
        """Write the batch's prototypes to the memory (training mode only; the memory bank checks it).

        Label prototypes without a label raise: the memory would silently switch to another kind of prototype.
        """
        if self.label_prototypes:
            if labels is None:
                raise ValueError(
                    "ECRM(prototypes='label'): training needs the label, network(images, labels=labels) (in a MONAI "
                    "trainer: prepare_batch=monai_ecrm.bundle.training_prepare_batch(network, labels=True), or MONAI's "
                    "PrepareBatchExtraInput({'labels': 'label'}); for the memory refresh: items with a 'label'). "
                    "ECRMUNet.dcrnet() or ECRMUNet(**DCRNET_ECRM_OPTIONS) write it from the coarse mask instead."
                )
            size = [int(s) for s in features.shape[2:]]
            fractions = label_weights(labels, self.num_classes, size, self.background_tokens)
            prototypes, present = label_prototypes(fractions, features, self.background_tokens)
            if not bool(present.all()):
                prototypes = prototypes[present]
                if sources is not None:
                    sources = sources.reshape(-1)[present]
            self.memory.enqueue(prototypes, sources)
        else:
            self.memory.enqueue(class_prototypes(coarse_weights(aux_logits, self.background_tokens), features), sources)

    def attend(self, features: torch.Tensor, copy_memory: bool = False) -> torch.Tensor:
        """Cross attention of every position over the filled memory; ``[B, key_channels, *spatial]``.

        With an empty memory the context is zero (see the class docstring). ``copy_memory`` attends to a copy of the
        memory, so that it can be written afterwards in the same forward (autograd keeps what was attended).
        """
        queries = self.query(features)
        if not torch.jit.is_scripting():  # (TorchScript compiles none of this block: the scripted path recomputes)
            if self._memory_cache_usable():
                cached = self._cached_memory(queries.dtype)
                if cached is None:
                    return torch.zeros_like(queries)
                return self._sdpa(queries, cached[0], cached[1])
        if self.memory.is_empty():
            return torch.zeros_like(queries)
        keys, values = self._project_memory(queries.dtype, copy_memory)
        return self._sdpa(queries, keys.unsqueeze(0).unsqueeze(0), values.unsqueeze(0).unsqueeze(0))

    def _sdpa(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """:meth:`attend`'s attention of ``queries`` ``[B, D, *spatial]`` over ``keys``, ``values`` ``[1, 1, T, D]``."""
        batch = queries.shape[0]
        # 4-D (batch, heads, length, dim) inputs: the layout for which the CPU memory-efficient kernel is taken
        q = queries.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        k = keys.expand(batch, 1, keys.shape[2], keys.shape[3])
        v = values.expand(batch, 1, values.shape[2], values.shape[3])
        attended = F.scaled_dot_product_attention(q, k, v)
        return attended.squeeze(1).transpose(1, 2).reshape(queries.shape)

    def attend_with_odds(
        self, features: torch.Tensor, copy_memory: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Explicit attention for ``supervise_attention``: ``(context, log-odds [B, num_classes, *spatial],
        attended)``; ``attended`` is ``False`` (context zero, log-odds zero) when the memory is empty."""
        queries = self.query(features)
        if not torch.jit.is_scripting():  # (TorchScript compiles none of this block: the scripted path recomputes)
            if self._memory_cache_usable():
                cached = self._cached_memory(queries.dtype)
                if cached is None:
                    return self._no_attention(queries)
                # the keys transposed once, and scaled once where that is exact (cached[4] False)
                context, odds = self._attention_with_odds(queries, cached[2], cached[3], cached[4])
                return context, odds.to(features.dtype), True
        if self.memory.is_empty():
            return self._no_attention(queries)
        keys, values = self._project_memory(queries.dtype, copy_memory)
        context, odds = self._attention_with_odds(queries, keys.t(), values, True)
        return context, odds.to(features.dtype), True

    def _no_attention(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """:meth:`attend_with_odds` of an empty memory: zero context, zero log-odds, not attended."""
        odds = queries.new_zeros([queries.shape[0], self.num_classes] + [int(size) for size in queries.shape[2:]])
        return torch.zeros_like(queries), odds, False

    def _attention_with_odds(
        self, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scale: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend_with_odds`' attention of ``queries`` ``[B, D, *spatial]`` over the transposed keys ``[D, T]``
        and the values ``[T, D]``; ``scale``: divide the scores by ``sqrt(key_channels)`` (``False``: the keys are)."""
        batch = queries.shape[0]
        spatial = [int(size) for size in queries.shape[2:]]
        q = queries.flatten(2).transpose(1, 2)  # [B, P, D]
        scores = (q @ keys_t).float()  # [B, P, F * K]
        if scale:
            scores = scores / math.sqrt(self.key_channels)
        context = torch.softmax(scores, dim=-1).to(values.dtype) @ values  # [B, P, D]
        per_class = torch.logsumexp(scores.reshape(batch, scores.shape[1], -1, self.memory_classes), dim=2)
        odds = per_class[..., : self.num_classes] - per_class[..., -1:]  # [B, P, num_classes]
        odds = odds.transpose(1, 2).reshape([batch, self.num_classes] + spatial)
        return context.transpose(1, 2).reshape(queries.shape), odds

    def _project_memory(self, dtype: torch.dtype, copy_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[F * K, key_channels]`` of the filled memory's tokens, in ``dtype`` (the memory must not
        be empty). ``copy_memory``: project a copy (see :meth:`attend`)."""
        tokens = self.memory.filled_memory().reshape(-1, self.feat_channels)
        if copy_memory:
            tokens = tokens.clone()
        # autocast may run the projections in a lower precision; the memory itself stays float32
        return self.memory_key(tokens).to(dtype), self.memory_value(tokens).to(dtype)

    def clear_memory_cache(self) -> None:
        """Drop the eval-time cache of the memory side: the next eval forward recomputes it (needed only after a write
        to the memory or projection weights that no version counter sees: through ``.data`` or numpy)."""
        self._memory_cache = None

    def _apply(self, *args: Any, **kwargs: Any) -> ECRM:
        # .to(device/dtype), .cuda(), .half(), ...: the cache would be recomputed anyway (new storage); dropping it
        # here also frees the tensors it keeps on the old device
        self._memory_cache = None
        return super()._apply(*args, **kwargs)

    @torch.jit.unused
    def _memory_cache_usable(self) -> bool:
        """Whether this forward may use the eval-time cache (see the class docstring); training drops it."""
        if self.training:
            self._memory_cache = None
            return False
        return (
            self.memory_cache
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not _is_compiling()
            and not _collective_buffers()
        )

    @torch.jit.unused
    def _memory_signature(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """``(tensors, stamp)``: what the memory side is computed from, compared by identity (kept alive by the cache,
        so that no new tensor can take a freed one's address), and a stamp of plain values: the bank's
        ``content_version``, each tensor's in-place version counter, storage address, device and dtype, the queries'
        dtype and the autocast state."""
        bank = self.memory
        tensors = [bank.memory, bank.filled]
        for projection in (self.memory_key, self.memory_value):
            for module in projection.modules():  # (what .parameters() and .buffers() give, at a third of the cost)
                tensors.extend(t for t in module._parameters.values() if t is not None)
                tensors.extend(t for t in module._buffers.values() if t is not None)
        stamp: list = [bank.content_version, dtype, self.feat_channels, self.key_channels]
        stamp.extend(_autocast_state(bank.memory.device.type))
        for tensor in tensors:
            stamp.extend((tensor._version, tensor.data_ptr(), tensor.device, tensor.dtype))
        return tuple(tensors), tuple(stamp)

    @torch.jit.unused
    def _cached_memory(
        self, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
        """The memory side for queries of ``dtype``, from the cache or computed and cached: ``None`` for an empty
        memory, else ``(keys [1, 1, T, D], values [1, 1, T, D], keys_t [D, T], values [T, D], scale)``: ``keys_t`` is
        ``keys.t() / sqrt(D)`` where that is exact, and then ``scale`` is ``False`` (else ``keys.t()``, ``True``)."""
        tensors, stamp = self._memory_signature(dtype)
        entry = self._memory_cache  # one read: another thread may replace it, never half
        if entry is not None and entry[1] == stamp and all(a is b for a, b in zip(entry[0], tensors)):
            return entry[2]
        payload = None
        if not self.memory.is_empty():
            keys, values = self._project_memory(dtype)
            # scaling the keys by 1 / sqrt(key_channels) instead of the scores: exact (the same bits) when that is a
            # power of two (key_channels 16, 64, 256, ...), so only then; otherwise the scores are divided as before
            root = math.isqrt(self.key_channels)
            exact = root * root == self.key_channels and root & (root - 1) == 0
            keys_t = (keys * (1.0 / root)).t() if exact else keys.t()
            payload = (keys.unsqueeze(0).unsqueeze(0), values.unsqueeze(0).unsqueeze(0), keys_t, values, not exact)
        # the stamp is taken before computing: a change meanwhile makes the next call recompute
        self._memory_cache = (tensors, stamp, payload)
        return payload

    @torch.jit.unused
    def slot_weights(self, features: torch.Tensor) -> torch.Tensor:
        """The attention weights per memory slot of embedded features (the output of ``self.embed`` in
        :meth:`forward`): ``[B, positions, filled slots]``, each position's softmax over the memory tokens summed over
        a slot's class tokens: the attention the forward applies (:meth:`attend`'s SDPA, which never materialises it,
        or :meth:`attend_with_odds`). Only the queries and keys are computed (no values, no context): run beside a
        normal forward, it costs a 1x1 projection and one small product."""
        queries = self.query(features)
        batch, positions = queries.shape[0], int(torch.tensor(queries.shape[2:]).prod())
        filled = int(self.memory.filled)
        if filled == 0:
            return queries.new_zeros(batch, positions, 0)
        tokens = self.memory.filled_memory().reshape(-1, self.feat_channels)
        keys = self.memory_key(tokens).to(queries.dtype)
        q = queries.flatten(2).transpose(1, 2)  # [B, P, D]
        attention = torch.softmax((q @ keys.T).float() / math.sqrt(self.key_channels), dim=-1)  # [B, P, F * K]
        return attention.reshape(batch, positions, filled, self.memory_classes).sum(dim=-1)

    @torch.jit.unused
    def slot_shares(self, weights: torch.Tensor, position_weights: torch.Tensor) -> torch.Tensor:
        """``[B, bank_size]`` shares from :meth:`slot_weights`' ``weights`` ``[B, P, F]`` and per-position
        weights ``[B, 1, *spatial]`` at the memory level: the weighted mean over positions, normalised to sum to 1
        over the filled slots (0 for empty slots, and an all-zero row where the position weights sum to 0)."""
        batch = weights.shape[0]
        w = position_weights.reshape(batch, -1).to(weights.dtype)  # [B, P]
        totals = w.sum(dim=1, keepdim=True)
        mean = torch.bmm(w.unsqueeze(1), weights).squeeze(1) / totals.clamp_min(1e-12)  # [B, F]
        mean = torch.where(totals > 0, mean, torch.zeros_like(mean))
        shares = weights.new_zeros(batch, self.memory.num_slots)
        shares[:, : weights.shape[2]] = mean
        return shares

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
