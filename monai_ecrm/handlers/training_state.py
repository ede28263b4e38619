"""Training semantics the bundle relies on: a learning-rate schedule that a longer resume rebuilds, validation that
gives training its own state back, and a checkpoint folder that keeps the stated number of files across resumes."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_ecrm.handlers.aux_supervision import unwrap_network

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["CosineScheduleHandler", "PreserveNetworkState", "PruneCheckpoints", "cosine_factor"]


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, end_factor: float = 0.0) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) of a run of ``total_steps``: a linear warmup
    from ``1 / (warmup_steps + 1)`` over ``warmup_steps``, then cosine decay from 1 to ``end_factor`` at the last step
    and after it."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineScheduleHandler:
    """Per-iteration cosine learning rate computed from the trainer's state, so that "train longer" means one thing.

    Before every iteration the rate of each parameter group is set to ``initial_lr * cosine_factor(step, total)``
    where ``step`` is the number of optimizer steps already taken (``engine.state.iteration - 1``) and ``total`` the
    run's length, ``max_epochs * epoch_length`` *as the run is configured now*. ``initial_lr`` is the group's
    learning rate when the handler first sees it, kept in the optimizer's param group (``initial_lr``, as torch's
    schedulers do), so it travels in the optimizer's checkpoint.

    Resuming (``CheckpointLoader`` restores the trainer's iteration and the optimizer):

    - with the same ``max_epochs``: the run continues on its curve exactly (nothing of the schedule is stored, so
      nothing can be stale);
    - with a larger ``max_epochs`` (an interrupted run, or a finished one whose rate has already decayed to its end
      value): the schedule is rebuilt for the new length and continues from where the run is on it: the rate jumps to
      the new curve's value at the current step and decays to ``end_factor * initial_lr`` at the new last step, so it
      never ends higher than where the extension started.

    Why not torch's ``CosineAnnealingLR`` with MONAI's ``LrScheduleHandler``: a torch scheduler stores its length
    (``T_max``) in the checkpoint, so a run resumed with more epochs kept the old length, trained its extra epochs at
    rate 0 and then re-warmed (the recursive cosine formula climbs back after ``T_max``).

    Events used: ``ITERATION_STARTED`` (set the rate), ``EPOCH_STARTED`` (log it when ``print_lr``). Written to
    ``engine.state``: nothing.

    Args:
        optimizer: the optimizer; ``None`` uses ``engine.optimizer``.
        warmup_steps: linear warmup iterations.
        end_factor: final rate as a fraction of the initial one.
        print_lr: log the rate at the start of every epoch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        warmup_steps: int = 0,
        end_factor: float = 0.0,
        print_lr: bool = True,
    ) -> None:
        if warmup_steps < 0 or not 0.0 <= end_factor <= 1.0:
            raise ValueError(
                f"CosineScheduleHandler: warmup_steps must be >= 0 and end_factor in [0, 1], got {warmup_steps}, "
                f"{end_factor}."
            )
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.end_factor = float(end_factor)
        self.print_lr = print_lr
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Set the rate before every iteration (and log it per epoch when ``print_lr``)."""
        self.logger = engine.logger
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        if self.print_lr:
            engine.add_event_handler(Events.EPOCH_STARTED, self._log)

    def total_steps(self, engine: Engine) -> int:
        """The run's length as configured now: ``max_epochs * epoch_length``."""
        return int(engine.state.max_epochs) * int(engine.state.epoch_length)

    def factor(self, engine: Engine) -> float:
        """The rate factor of the coming iteration (:func:`cosine_factor` at ``iteration - 1``)."""
        return cosine_factor(engine.state.iteration - 1, self.total_steps(engine), self.warmup_steps, self.end_factor)

    def _groups(self, engine: Engine) -> list[dict[str, Any]]:
        optimizer = self.optimizer if self.optimizer is not None else engine.optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer.param_groups

    def __call__(self, engine: Engine) -> None:
        factor = self.factor(engine)
        for group in self._groups(engine):
            group["lr"] = group["initial_lr"] * factor

    def _log(self, engine: Engine) -> None:
        rate = self._groups(engine)[0]["initial_lr"] * cosine_factor(
            engine.state.iteration, self.total_steps(engine), self.warmup_steps, self.end_factor
        )
        self.logger.info(f"Epoch {engine.state.epoch}: learning rate {rate:.3g}")


class PreserveNetworkState:
    """Gives training its own network state back after validation: attach it to the evaluator a
    ``ValidationHandler`` runs, first among its handlers.

    Validation refreshes the ECRM memory (and optionally the BatchNorm statistics) so that it scores the network as
    it would be saved; without this handler the next training steps would attend to the refreshed memory and the
    trained weights would depend on ``val_interval``. Every buffer of the network (memory, fill counters, BatchNorm
    running statistics) is copied at ``STARTED`` and written back at ``COMPLETED``. Parameters are never touched
    (validation does not change them). A ``CheckpointSaver`` of the evaluator (``model.pt`` on a new best metric)
    runs before ``COMPLETED``, so it saves the validated state.

    Events used: ``STARTED`` (copy), ``COMPLETED`` (restore).

    Args:
        network: the network; ``None`` uses ``engine.network``.
    """

    def __init__(self, network: nn.Module | None = None) -> None:
        self.network = network
        self._saved: dict[str, torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        """Copy the buffers at ``STARTED``, write them back at ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self.capture)
        engine.add_event_handler(Events.COMPLETED, self)

    def _network(self, engine: Engine | None) -> nn.Module:
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("PreserveNetworkState: no network given and the engine has none.")
        return unwrap_network(network)

    def capture(self, engine: Engine | None = None) -> None:
        """Copy every buffer of the network."""
        self._saved = {name: buffer.detach().clone() for name, buffer in self._network(engine).named_buffers()}

    def __call__(self, engine: Engine | None = None) -> None:
        if self._saved is None:
            return
        from monai_ecrm.networks.blocks.memory_bank import MemoryBank

        network = self._network(engine)
        with torch.no_grad():
            for module_name, module in network.named_modules():
                for name, buffer in list(module._buffers.items()):
                    key = f"{module_name}.{name}" if module_name else name
                    if buffer is None or key not in self._saved:
                        continue
                    saved = self._saved[key]
                    if buffer.shape == saved.shape:
                        buffer.copy_(saved)
                    else:  # a buffer whose length follows its content (the memory's case names)
                        module._buffers[name] = saved.to(buffer.device)
                if isinstance(module, MemoryBank):
                    module.sync_names()  # the Python-side names follow the restored buffer
        self._saved = None


_EPOCH_FILE = re.compile(r"^(?P<prefix>.+?)_epoch=(?P<epoch>\d+)\.pt$")


class PruneCheckpoints:
    """Keeps at most ``keep`` epoch checkpoints in ``save_dir`` across runs and resumes.

    ``CheckpointSaver(n_saved=N)`` deletes only the files it wrote itself in this process: each resume leaves the
    previous run's files behind (two resumes of a toy run left six files of 327 MB). This handler deletes the oldest
    ``<prefix>_epoch=<n>.pt`` files beyond ``keep`` (by epoch number) after every epoch and at the end. Attach it
    after the ``CheckpointSaver`` (``monai_ecrm.bundle.attach_handlers`` keeps the order) so the newest file exists
    when it prunes. ``checkpoint_final.pt`` and ``model.pt`` are never touched.

    Events used: ``EPOCH_COMPLETED``, ``COMPLETED``.

    Args:
        save_dir: the ``CheckpointSaver``'s folder.
        keep: epoch checkpoints to keep (``None`` or < 1: keep all).
        prefix: the saver's file prefix (``checkpoint``).
    """

    def __init__(self, save_dir: str, keep: int | None = 2, prefix: str = "checkpoint") -> None:
        self.save_dir = Path(save_dir)
        self.keep = keep
        self.prefix = prefix
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Prune after every epoch and at the end (attach after the ``CheckpointSaver``)."""
        self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> list[Path]:
        if not self.keep or self.keep < 1 or not self.save_dir.is_dir():
            return []
        found = []
        for path in self.save_dir.glob(f"{self.prefix}_epoch=*.pt"):
            match = _EPOCH_FILE.match(path.name)
            if match and match.group("prefix") == self.prefix:
                found.append((int(match.group("epoch")), path))
        found.sort()
        removed = [path for _, path in found[: max(0, len(found) - self.keep)]]
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            self.logger.debug(f"PruneCheckpoints: removed {', '.join(p.name for p in removed)}")
        return removed
