"""A progress bar for long runs (ignite's tqdm ``ProgressBar``) that a config can switch off."""

from __future__ import annotations

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

    Events used (when enabled): those of ignite's ``ProgressBar`` (``ITERATION_COMPLETED`` to advance,
    ``EPOCH_COMPLETED`` to close). Writes nothing to ``engine.state``.

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

    def _values(self, output: Any) -> dict[str, Any]:
        return self.output_transform(output) or {}
