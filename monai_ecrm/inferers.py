"""Inferers for MONAI engines: the network under CPU (or CUDA) autocast, and the same with the ECRM memory's shares of
the forward kept for a handler (memory provenance)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import Inferer

__all__ = ["AutocastInferer", "ExplainingInferer"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class AutocastInferer(Inferer):
    """Calls the network under ``torch.autocast`` on the input's device and returns float32 output.

    MONAI 1.6's engines hard-code CUDA autocast (``amp=True`` on a CPU engine only warns and stays in float32), so
    on a CPU with bfloat16 units (AMX, AVX-512 BF16) the switch has to live in the inferer: the trainer's forward
    (the loss then runs on the float32 logits) and the evaluator's both pass through here. Measured on a 2-core AMX
    CPU: an ECRMUNet training step 1.8-2.95x faster, inference 1.8-2.8x.

    ``enabled=False`` (or ``dtype=None``) is a plain :class:`~monai.inferers.SimpleInferer`. Extra arguments are
    passed on to the network (``PrepareBatchExtraInput`` kwargs such as ``labels=``).

    Args:
        dtype: ``"bf16"`` (default), ``"fp16"``, a ``torch.dtype``, or ``None`` (off).
        enabled: switch; the bundle's ``bf16`` setting.
    """

    def __init__(self, dtype: str | torch.dtype | None = "bf16", enabled: bool = True) -> None:
        super().__init__()
        if isinstance(dtype, str):
            if dtype.lower() not in _DTYPES:
                raise ValueError(
                    f"AutocastInferer: dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}."
                )
            dtype = _DTYPES[dtype.lower()]
        self.dtype = dtype
        self.enabled = bool(enabled) and dtype is not None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return network(inputs, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype):
            output = network(inputs, *args, **kwargs)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.float()
        return output


class ExplainingInferer(AutocastInferer):
    """:class:`AutocastInferer` that, when ``explain`` is on, runs the network's
    :meth:`~monai_ecrm.networks.nets.ECRMUNet.forward_with_shares` instead of its forward: the same logits (bit for
    bit: ECRM runs its own forward there) and, from the same forward, each memory slot's share of ECRM's attention
    over the predicted polyp, kept in :attr:`shares` (``[B, bank_size]``, float32, CPU) until the next batch. It
    returns the logits alone, so the evaluator's post-processing, metrics and writers see what they see with
    :class:`AutocastInferer`.

    Why the shares are kept here, for :class:`~monai_ecrm.handlers.MemoryExplanationHandler` to read at
    ``ITERATION_COMPLETED``, rather than returned or carried in the prediction's metadata: MONAI's
    ``SupervisedEvaluator`` stores what an inferer returns as ``pred`` and post-processes it as one tensor (a tuple
    would break ``Activationsd``), and the post-processing rebuilds ``pred``'s metadata from the image's inverted
    transforms (``Invertd``), so a meta entry would not reach the handlers. ``ITERATION_COMPLETED`` fires after the
    post-processing of the same batch, whose decollated items keep the batch order: item ``i`` is row ``i``.

    A network that cannot give shares (no ``forward_with_shares``: an ONNX or TorchScript model; or
    ``use_ecrm=False``) runs its plain forward and :attr:`shares` is ``None``; the handler says why. With ``explain``
    off this is an :class:`AutocastInferer`.

    Args:
        explain: keep the memory's shares (the bundle's ``explain`` K > 0).
        dtype: see :class:`AutocastInferer`.
        enabled: autocast switch, see :class:`AutocastInferer` (the bundle's ``bf16``).
    """

    def __init__(self, explain: bool = True, dtype: str | torch.dtype | None = "bf16", enabled: bool = True) -> None:
        super().__init__(dtype, enabled)
        self.explain = bool(explain)
        self.shares: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.shares = None
        forward_with_shares = _forward_with_shares(network) if self.explain else None
        if forward_with_shares is None:
            return super().__call__(inputs, network, *args, **kwargs)
        logits, shares = super().__call__(inputs, forward_with_shares, *args, **kwargs)
        self.shares = shares.detach().float().cpu()
        return logits.float()  # as AutocastInferer's output: bfloat16 logits of autocast come back as float32


def _forward_with_shares(network: Any) -> Callable[..., Any] | None:
    """The network's ``forward_with_shares`` (through DDP/compile wrappers), ``None`` when it cannot give shares."""
    from monai_ecrm.networks.utils import unwrap_network

    network = unwrap_network(network)
    method = getattr(network, "forward_with_shares", None)
    if not callable(method) or not getattr(network, "use_ecrm", False):
        return None
    return method
