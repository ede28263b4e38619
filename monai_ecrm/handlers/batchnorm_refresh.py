"""Recompute every BatchNorm's running statistics with the current weights (the memory left alone)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from monai_ecrm.handlers.aux_supervision import unwrap_network
from monai_ecrm.handlers.memory_bank import resolve_event

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["BatchNormRefreshHandler", "refresh_batchnorm"]


def refresh_batchnorm(
    network: nn.Module,
    loader_or_dataset: Iterable,
    device: str | torch.device | None = None,
    image_key: str = "image",
    max_batches: int | None = None,
) -> int:
    """Recompute the running mean and variance of every BatchNorm layer with the network's current weights.

    During training the running statistics are an exponential average over batches seen by *earlier* weights; with
    a large learning rate (random-init encoders above all) they lag the weights so far that eval mode collapses.
    This resets them and accumulates an exact average (``momentum=None``) over ``loader_or_dataset``.

    Why not ``torch.optim.swa_utils.update_bn``: it puts the whole model in training mode (ECRM would write its
    memory, dropout would draw), keeps autograd on, and passes dict batches to the model as they are. Here every
    module stays in eval mode except the BatchNorm layers, nothing takes gradient, the memory is never written
    (ECRM's write is gated by its own training flag, which stays off), MONAI dict batches are read by
    ``image_key``, and every flag and momentum is restored afterwards. No random state is drawn by the network
    itself, and the global random generators are restored afterwards (iterating a ``DataLoader`` draws from torch's).

    Under ``torch.distributed`` every rank computes its own statistics from what it passes (pass the same images on
    every rank for identical statistics).

    Args:
        network: any network (DDP/compile wrappers are unwrapped).
        loader_or_dataset: a ``DataLoader`` (batches) or an iterable of single items (dicts with ``image_key``,
            ``(image, ...)`` tuples or image tensors).
        device: where to run; ``None`` uses the device of the network's parameters.
        image_key: key of the image in dict items.
        max_batches: stop after this many batches (``None``: all).

    Returns:
        The number of images forwarded (0 when the network has no BatchNorm layer: nothing is run).
    """
    network = unwrap_network(network)
    norms = [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if device is None:
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    modes = {module: module.training for module in network.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    saved = {
        norm: (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()) for norm in norms
    }
    images = 0
    from monai_ecrm.handlers.memory_refresh import _batches, untouched_random_state

    try:
        network.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches below
            norm.train()
        with torch.no_grad(), untouched_random_state():
            for index, (image, _, _) in enumerate(_batches(loader_or_dataset, image_key)):
                if max_batches is not None and index >= max_batches:
                    break
                network(image.to(device))
                images += image.shape[0]
    except BaseException:
        for norm, (mean, var, count) in saved.items():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
        raise
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    if images == 0:
        for norm, (mean, var, count) in saved.items():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
    return images


class BatchNormRefreshHandler:
    """Runs :func:`refresh_batchnorm` on ``engine.network`` at an event (by default when training completes).

    In the bundle it is listed before the :class:`~monai_ecrm.handlers.MemoryRefreshHandler` (the memory is then
    written by a network whose statistics match its weights) and before the final ``CheckpointSaver``.

    Written to ``engine.state``: ``bn_refreshed``, the number of images forwarded.

    Args:
        loader: the images (unaugmented training images, typically the memory refresh's loader).
        event: an ignite event or its name.
        image_key: key of the image in the items.
        max_batches: stop after this many batches (``None``: all).
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        loader: Iterable,
        event: Any = "COMPLETED",
        image_key: str = "image",
        max_batches: int | None = None,
        name: str | None = None,
    ) -> None:
        self.loader = loader
        self.event = resolve_event(event)
        self.image_key = image_key
        self.max_batches = max_batches
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """Register the refresh at ``event``."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        device = getattr(engine.state, "device", None)
        images = refresh_batchnorm(
            engine.network, self.loader, device=device, image_key=self.image_key, max_batches=self.max_batches
        )
        engine.state.bn_refreshed = images
        self.logger.info(f"BatchNorm running statistics recomputed with the current weights over {images} image(s).")
