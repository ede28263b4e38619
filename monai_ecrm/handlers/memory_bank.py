"""Logging of the ECRM memory bank (fill, pointer, rejected writes) and an optional reset at a chosen event."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_ecrm.handlers.aux_supervision import find_module, without_memory
from monai_ecrm.networks.blocks.memory_bank import MemoryBank

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["MemoryBankHandler", "find_memory_bank", "memory_stats", "resolve_event"]


def find_memory_bank(network: nn.Module, module_name: str = "ecrm") -> MemoryBank:
    """The :class:`MemoryBank` at ``module_name`` of ``network`` (DDP/compile wrappers unwrapped): the bank itself, or
    the ``memory`` attribute of the module there (the ECRM module)."""
    module = find_module(network, module_name)
    bank = module if isinstance(module, MemoryBank) else getattr(module, "memory", None)
    if not isinstance(bank, MemoryBank):
        raise AttributeError(f"{module_name!r} of {type(network).__name__} is neither a MemoryBank nor has one.")
    return bank


def memory_stats(bank: MemoryBank) -> dict[str, int]:
    """``{"filled", "pointer", "rejected", "slots"}`` of a memory bank, as ints."""
    return {
        "filled": int(bank.filled),
        "pointer": int(bank.pointer),
        "rejected": int(bank.rejected),
        "slots": int(bank.num_slots),
    }


def resolve_event(event: Any) -> Any:
    """An ignite event from its name (``"EPOCH_STARTED"``, case-insensitive) or the event itself."""
    if isinstance(event, str):
        try:
            return Events[event.upper()]
        except KeyError as error:
            raise ValueError(f"Unknown ignite event {event!r}; one of {[e.name for e in Events]}.") from error
    return event


class MemoryBankHandler:
    """Logs the state of the ECRM memory bank and can reset it at a chosen event; it never writes to the memory
    otherwise (only ECRM's training-mode forward, :func:`~monai_ecrm.handlers.memory_refresh.refresh_memory` and this
    optional reset do).

    Logged: filled slots (and the slot count), write pointer, rejected writes (lifetime count of prototypes refused
    for non-finite values; an increase is logged as a warning, it means the coarse mask or features went non-finite).
    Through ``engine.logger`` (so ``StatsHandler``'s logging configuration applies) and, when a ``summary_writer`` or
    ``log_dir`` is given, as TensorBoard scalars ``<tag_prefix>/filled``, ``/pointer``, ``/rejected``, stepped by epoch
    (``epoch_level``) or iteration. Nothing goes to ``engine.state.metrics`` (which drives best-model selection).

    Events used: ``EPOCH_COMPLETED`` (or ``ITERATION_COMPLETED`` when not ``epoch_level``), every ``interval``, for
    :meth:`__call__`; ``reset_event`` (if given) for :meth:`reset`. Written to ``engine.state``: ``ecrm_memory``, a
    dict of the last logged values (``filled``, ``pointer``, ``rejected``, ``slots``).

    Args:
        module_name: dotted path of the ECRM module (or of the MemoryBank) in the unwrapped ``engine.network``.
        reset_event: ``None``, or an ignite event or its name (e.g. ``"EPOCH_STARTED"``, ``"STARTED"``) at which the
            memory is emptied (``MemoryBank.reset``: contents, pointer and fill; the rejected count is kept).
        summary_writer: a TensorBoard ``SummaryWriter`` to write to (shared with ``TensorBoardStatsHandler``).
        log_dir: where to create a ``SummaryWriter`` when ``summary_writer`` is not given; neither means no TensorBoard.
        tag_prefix: prefix of the TensorBoard tags.
        epoch_level: log at every ``interval`` epochs, else every ``interval`` iterations.
        interval: logging interval.
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        module_name: str = "ecrm",
        reset_event: Any = None,
        summary_writer: Any = None,
        log_dir: str | None = None,
        tag_prefix: str = "ecrm_memory",
        epoch_level: bool = True,
        interval: int = 1,
        name: str | None = None,
    ) -> None:
        self.module_name = module_name
        self.reset_event = resolve_event(reset_event) if reset_event is not None else None
        self._writer = summary_writer
        self._owns_writer = summary_writer is None and log_dir is not None
        self.log_dir = log_dir
        self.tag_prefix = tag_prefix
        self.epoch_level = epoch_level
        self.interval = interval
        self._name = name
        self.logger = logging.getLogger(name)
        self._last_rejected: int | None = None

    def attach(self, engine: Engine) -> None:
        """Register the logging event and, if any, the reset event.

        Args:
            engine: a MONAI engine with a ``network`` holding the ECRM module.
        """
        if self._name is None:
            self.logger = engine.logger
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)
        if self.reset_event is not None:
            engine.add_event_handler(self.reset_event, self.reset)

    @property
    def writer(self) -> Any:
        """The TensorBoard writer (created on first use from ``log_dir``), or ``None``."""
        if self._writer is None and self._owns_writer:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def reset(self, engine: Engine) -> None:
        """Empty the memory of ``engine.network``.

        Args:
            engine: the engine this handler is attached to.
        """
        if without_memory(engine.network, self.module_name):
            return
        bank = find_memory_bank(engine.network, self.module_name)
        bank.reset()
        self.logger.info(f"ECRM memory reset at {engine.last_event_name} (epoch {engine.state.epoch}).")

    def __call__(self, engine: Engine) -> None:
        """Log the memory state and record it in ``engine.state.ecrm_memory``.

        Args:
            engine: the engine this handler is attached to.
        """
        if without_memory(engine.network, self.module_name):
            return  # a network without ECRM (FlexibleUNet, ECRMUNet(use_ecrm=False)): nothing to log
        stats = memory_stats(find_memory_bank(engine.network, self.module_name))
        engine.state.ecrm_memory = stats
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        where = f"Epoch[{engine.state.epoch}]" if self.epoch_level else f"Iteration[{engine.state.iteration}]"
        self.logger.info(
            f"{where} ECRM memory: {stats['filled']}/{stats['slots']} slots filled, pointer {stats['pointer']}, "
            f"rejected writes {stats['rejected']}"
        )
        if self._last_rejected is not None and stats["rejected"] > self._last_rejected:
            self.logger.warning(
                f"{where} ECRM memory refused {stats['rejected'] - self._last_rejected} non-finite prototype(s) "
                "since the last log: the coarse mask or the features went non-finite."
            )
        self._last_rejected = stats["rejected"]
        writer = self.writer
        if writer is not None:
            for key in ("filled", "pointer", "rejected"):
                writer.add_scalar(f"{self.tag_prefix}/{key}", stats[key], step)
            writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer if this handler created it."""
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer = None
