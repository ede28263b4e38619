"""A progress bar for long runs (ignite's tqdm ``ProgressBar``) that a config can switch off."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.handlers.aux_supervision import loss_terms

ProgressBar, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "ProgressBar")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ProgressBarHandler"]


class ProgressBarHandler:
    """ignite's ``ProgressBar`` (tqdm) behind an ``enabled`` switch, so a bundle config turns it off with an override
    (``--progress false``) for logs written to files, instead of editing the handler list.

    By default the bar shows the loss terms of :func:`~monai_ecrm.handlers.aux_supervision.loss_terms` (total, and
    main/aux/weight when ``AuxSupervisionHandler`` is attached); on an evaluator, whose output has no loss, only the
    count.

    While the bar runs, log lines printed to the console (the root logger's stream handlers on ``sys.stdout`` or
    ``sys.stderr``) go through ``tqdm.write``, which clears the bar, prints the line and redraws the bar below it:
    without that the two overwrite each other in a terminal.

    Events used (when enabled): those of ignite's ``ProgressBar`` (``ITERATION_COMPLETED`` to advance,
    ``EPOCH_COMPLETED`` to close), ``COMPLETED`` and ``EXCEPTION_RAISED`` (console streams restored). Writes nothing
    to ``engine.state``.

    Args:
        enabled: attach the bar at all.
        persist: keep each epoch's finished bar on screen.
        output_transform: ``engine.state.output -> dict`` of values to show; default :func:`loss_terms`.
        metric_names: names of ``engine.state.metrics`` entries to show, or ``"all"``.
        desc: description in front of the bar.
        tqdm_kwargs: more arguments for tqdm (e.g. ``{"mininterval": 10}``, ``{"ncols": 100}``).
    """

    def __init__(
        self,
        enabled: bool = True,
        persist: bool = False,
        output_transform: Callable[[Any], Any] | None = None,
        metric_names: str | list[str] | None = None,
        desc: str | None = None,
        tqdm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = bool(enabled)
        self.persist = persist
        self.output_transform = output_transform or loss_terms
        self.metric_names = metric_names
        self.desc = desc
        self.tqdm_kwargs = dict(tqdm_kwargs or {})
        self.bar: Any = None

    def attach(self, engine: Engine) -> None:
        """Attach ignite's ``ProgressBar`` to ``engine`` unless disabled.

        Args:
            engine: any ignite engine.
        """
        if not self.enabled:
            return
        kwargs = dict(self.tqdm_kwargs)
        if self.desc is not None:
            kwargs["desc"] = self.desc
        self.bar = ProgressBar(persist=self.persist, **kwargs)
        self.bar.attach(engine, metric_names=self.metric_names, output_transform=self._values)
        from ignite.engine import Events

        self.route_log_lines()
        engine.add_event_handler(Events.COMPLETED, self.restore_log_lines)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.restore_log_lines)

    def route_log_lines(self, engine: Engine | None = None) -> None:
        """Send the console log handlers' lines through ``tqdm.write`` (see the class docstring)."""
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream in (sys.stdout, sys.stderr):
                handler.setStream(_TqdmStream(stream))

    def restore_log_lines(self, engine: Engine | None = None, *args: Any) -> None:
        """Give the console log handlers their own streams back."""
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(stream, _TqdmStream):
                handler.setStream(stream.stream)

    def _values(self, output: Any) -> dict[str, Any]:
        return self.output_transform(output) or {}


class _TqdmStream:
    """A console stream whose lines are written with ``tqdm.write`` (above any running bar)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text:
            tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()
