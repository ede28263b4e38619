"""Names of the training cases the ECRM memory records, set from the training list so that they travel with the
weights of every checkpoint, not only of a refreshed model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.handlers.aux_supervision import without_memory
from monai_ecrm.handlers.memory_bank import find_memory_bank, resolve_event
from monai_ecrm.handlers.memory_refresh import refresh_set_names

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["CaseNamesHandler", "case_names"]


def case_names(datalist: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[str]:
    """The name of every item of a datalist, in its order: the image path relative to the folder common to all of
    them, with ``#frame`` for a frame of a multi-frame file (:func:`~monai_ecrm.handlers.refresh_set_names`'s
    convention, which ``monai-ecrm-infer --explain`` looks pictures up by).

    A slot holds the prototypes of one picture, so it is named by that picture, not by the ``"case"`` key that
    :func:`~monai_ecrm.data.split_by_case` groups items by (all the frames of one video would share it; the datalist
    gives it back from the path).

    Raises:
        ValueError: an item without a file path under ``image_key``.
    """
    names = refresh_set_names(list(datalist), image_key)
    if names is None:
        raise ValueError(f"case_names: every item needs a file path under {image_key!r} to be named")
    return names


class CaseNamesHandler:
    """Sets the ECRM memory's names table (``MemoryBank.source_names``) to the names of the training list, so that
    every checkpoint says which cases its memory holds: the training batches write each slot with the item's
    ``case_index`` (:func:`~monai_ecrm.data.with_case_index`: its position in the same list, passed to the network as
    ``sources=`` by ``PrepareBatchExtraInput``), and this table turns those indices into names
    (:func:`case_names`). One index space serves training and the bundle's memory refresh: its refresh sets are
    slices of the same indexed list, and :func:`~monai_ecrm.handlers.refresh_memory` keeps this table for items that
    carry a ``case_index``.

    At every ``event`` (``EPOCH_STARTED`` by default: after a ``CheckpointLoader`` at ``STARTED``, so a resumed run
    is checked too) the table is compared with the training list's names; where it differs (a fresh network, a
    checkpoint trained on another list or saved before names existed) every slot is carried over by name
    (``MemoryBank.remap_sources``): a slot whose case is not in this list, or was never named, becomes unknown (a
    warning counts them) rather than taking another case's name. Under ``torch.distributed`` attach it on every rank:
    the list, hence the table, is the same on each, and so are the indices the sampler's shards carry.

    Events used: ``event``. Written to ``engine.state``: nothing.

    Args:
        datalist: the training items in the order ``case_index`` counts them (the list given to
            :func:`~monai_ecrm.data.with_case_index`).
        module_name: dotted path of the ECRM module.
        image_key: key of the image path in the items.
        event: an ignite event or its name.
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        datalist: Sequence[Mapping[str, Any]],
        module_name: str = "ecrm",
        image_key: str = "image",
        event: Any = "EPOCH_STARTED",
        name: str | None = None,
    ) -> None:
        self.names = case_names(datalist, image_key)
        self.module_name = module_name
        self.event = resolve_event(event)
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """Register :meth:`__call__` at ``event``.

        Args:
            engine: a MONAI engine with a ``network``.
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        """Make the training list's names the table of the memory of ``engine.network``.

        Args:
            engine: the engine this handler is attached to.
        """
        if without_memory(engine.network, self.module_name):
            return  # a network without ECRM (FlexibleUNet, ECRMUNet(use_ecrm=False)): nothing to name
        bank = find_memory_bank(engine.network, self.module_name)
        if list(bank.source_names) == self.names:
            return
        lost = bank.remap_sources(self.names)
        if lost:
            self.logger.warning(
                f"ECRM memory: {lost} slot(s) hold cases that are not in the training list (or were never named); "
                "their source is now unknown"
            )
        self.logger.info(f"ECRM memory cases named after the {len(self.names)} training items")
