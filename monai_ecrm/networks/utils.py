"""Small helpers about built networks, below every layer that handles them (handlers, inferers, model files)."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module inside ``DistributedDataParallel``/``DataParallel`` (``.module``) or ``torch.compile``
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        else:
            return network
