"""Rebuild the ECRM memory with the final weights: after training, or from a site's own cases before deployment."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn
from torch.utils.data import DataLoader

from monai_ecrm.handlers.aux_supervision import find_module, unwrap_network, without_memory
from monai_ecrm.handlers.memory_bank import find_memory_bank, memory_stats, resolve_event
from monai_ecrm.networks.blocks.memory_bank import _check_names

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["MemoryRefreshHandler", "REFRESH_MODES", "case_prototypes", "refresh_memory", "refresh_set_names"]


#: accepted values of ``refresh_memory(distributed=...)``
REFRESH_MODES = ("auto", "replicated", "sharded")


class _StopAfterMemoryWrite(Exception):
    """Raised by the forward hook once ECRM has written its prototypes: the rest of the network is not needed."""


def _batches(
    source: Iterable, image_key: str, label_key: str | None = None, source_key: str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """``(image, label or None, case ids or None)`` batches from a DataLoader (batches) or from a dataset/sequence
    (single items, one per batch); the label only when ``label_key`` is given (dicts: that key; tuples: the second
    element), the case ids when dict items carry ``source_key``."""
    batched = isinstance(source, DataLoader)
    for item in source:
        label = None
        ids = None
        if isinstance(item, Mapping) and source_key is not None and source_key in item:
            ids = torch.as_tensor(item[source_key]).reshape(-1).long()
        if isinstance(item, Mapping):
            image = item[image_key]
            if label_key is not None:
                if label_key not in item:
                    raise ValueError(
                        f"refresh_memory: the memory is written from labels (ECRM prototypes='label') but an item "
                        f"has no {label_key!r} (keys: {sorted(item)})."
                    )
                label = item[label_key]
        elif isinstance(item, (list, tuple)):
            image = item[0]
            if label_key is not None:
                if len(item) < 2:
                    raise ValueError("refresh_memory: label prototypes need (image, label) items.")
                label = item[1]
        else:
            if label_key is not None:
                raise ValueError("refresh_memory: label prototypes need dict or (image, label) items, got a tensor.")
            image = item
        image = torch.as_tensor(image)
        if label is not None:
            label = torch.as_tensor(label)
        if not batched:
            image = image.unsqueeze(0)
            label = None if label is None else label.unsqueeze(0)
        yield image, label, ids


def refresh_memory(
    network: nn.Module,
    loader_or_dataset: Iterable,
    device: str | torch.device | None = None,
    module_name: str = "ecrm",
    image_key: str = "image",
    reset: bool = True,
    distributed: str = "auto",
    label_key: str = "label",
    source_names: Sequence[str] | None = None,
) -> int:
    """Rebuild the ECRM memory from a set of images with the network's current weights.

    At the end of training the memory holds prototypes written by the weights of the last iterations, each one by a
    slightly older network. This writes them again with the final weights, exactly as training writes them (the
    softmax over space of the model's own coarse mask weighting the embedded features,
    :func:`~monai_ecrm.networks.blocks.class_prototypes`), but with every BatchNorm in eval mode, no gradient and no
    change to any weight or running statistic. It also fills the memory from a site's own cases before deployment.

    Labels: with DCRNet's coarse-mask prototypes (``ECRM(prototypes="coarse")``) they are not used, any
    representative set of images works and a label in the items is ignored. With label prototypes
    (``prototypes="label"``) every item must carry its label (``label_key``), as in training.

    Order: items are written in the order the loader yields them (use an unshuffled loader, or a dataset/list, for
    dataset order), batch by batch, in ring order. With more images than slots the last ``bank_size`` remain
    (``MemoryBank.slots()`` returns them oldest first). Non-finite prototypes are refused and counted as in training.

    Under ``torch.distributed`` with several ranks, call it on every rank (it is collective); every rank ends with
    the same memory. ``distributed`` says what the ranks pass:

    - ``"replicated"``: every rank passes the same images. Rank 0 writes them, its writes not gathered
      (:meth:`~monai_ecrm.networks.blocks.MemoryBank.local_writes`), so the memory is exactly what one process
      writes; then it broadcasts the memory buffers (and the count) to the other ranks, which run no forward pass.
      This also makes the result independent of the BatchNorm running statistics, which DDP leaves slightly
      different on each rank after the last training step.
    - ``"sharded"``: each rank passes its own shard (a ``DistributedSampler``); every batch's prototypes are gathered
      in rank order (step ``k`` writes the ``k``-th batch of rank 0, then of rank 1, ...). All ranks must yield the
      same number of batches: checked beforehand when the loader has a length (an error, not a hang). MONAI's
      ``DistributedSampler(even_divisible=True)`` pads a shard by repeating images, which are then written twice.
    - ``"auto"`` (default): ``"sharded"`` when ``loader_or_dataset`` is a loader whose sampler is a
      ``torch.utils.data.DistributedSampler`` (MONAI's included), else ``"replicated"``.

    The global random generators (torch, numpy, random) are left as they were: iterating a ``DataLoader`` draws a
    seed from torch's, which would otherwise shift the training run that follows (or a resume from a checkpoint
    saved after the refresh).

    Only the encoder and ECRM run: the forward pass is stopped once ECRM has written (the decoder is skipped). The
    training/eval flags of all modules are restored afterwards.

    Args:
        network: an ECRM network (DDP/compile wrappers are unwrapped).
        loader_or_dataset: a ``DataLoader`` (its batches are used as they come) or any iterable of single items (a
            dataset, a list): dicts with ``image_key``, ``(image, ...)`` tuples or image tensors ``[C, *spatial]``.
        device: where to run; ``None`` uses the device of the network's parameters.
        module_name: dotted path of the ECRM module.
        image_key: key of the image in dict items.
        reset: empty the memory first (default); ``False`` appends to what is there.
        distributed: ``"auto"``, ``"replicated"`` or ``"sharded"`` (see above); ignored without several ranks.
        label_key: key of the label in dict items (read only for label prototypes).
        source_names: the names the slots' sources index (see below).

    Provenance: every slot records which case wrote it (``MemoryBank.sources``): the item's ``case_index`` when dict
    items carry one, else its position in ``loader_or_dataset`` (0, 1, ... in the order yielded), so that
    ``sources`` indexes the refresh set (under ``"sharded"`` each rank counts its own shard). The names of the
    cases (``MemoryBank.source_names``) are, with ``reset``:

    - ``source_names`` when given;
    - else, when every item of the refresh set carries a ``case_index`` (read from the items before any transform:
      a MONAI ``Dataset``'s ``data``, a list), the names table the memory already holds: ``case_index`` is an index
      into that table. The bundle's refresh sets are slices of its training list, whose items carry their position
      in that list (:func:`monai_ecrm.data.with_case_index`), and training sets the table to that list's names
      (:class:`~monai_ecrm.handlers.case_names.CaseNamesHandler`): the refresh writes in the same index space as the
      training batches and keeps the same table, in every mode;
    - else the refresh set's image paths relative to their common folder when its items are dicts of file paths, as
      :func:`refresh_set_names` reads them (not under ``"sharded"``).

    A names table that does not cover every recorded source is refused (``ValueError``): the saved model would not
    load.

    Returns:
        The number of prototypes written (one per image, over all ranks when sharded; refused ones not counted); the
        same on every rank.
    """
    if distributed not in REFRESH_MODES:
        raise ValueError(f"refresh_memory: distributed must be one of {REFRESH_MODES}, got {distributed!r}.")
    # the plain module: a DDP wrapper would synchronise buffers in its forward
    network = unwrap_network(network)
    ecrm = find_module(network, module_name)
    bank = find_memory_bank(network, module_name)
    if device is None:
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    mode = _distributed_mode(loader_or_dataset, distributed)
    if mode == "sharded":
        _check_equal_batch_counts(loader_or_dataset, bank.memory.device)
    rejected_before = int(bank.rejected)
    images = 0
    names = list(source_names) if source_names is not None else None
    if names is None and reset and _carries_case_index(loader_or_dataset):
        names = list(bank.source_names)  # the table the items' case_index values index, kept through the reset
    elif names is None and mode != "sharded":
        names = refresh_set_names(loader_or_dataset, image_key)
    with untouched_random_state():
        images = _refresh(network, ecrm, bank, loader_or_dataset, device, image_key, reset, mode, label_key)
    if names is not None and reset:
        bank._store_names(names)  # every rank derives the same names: equal buffers before the broadcast
    written = torch.tensor([images - (int(bank.rejected) - rejected_before)], dtype=torch.long)
    if mode == "replicated":
        written = written.to(bank.memory.device)
        for buffer in bank.buffers():
            torch.distributed.broadcast(buffer, src=0)
        torch.distributed.broadcast(written, src=0)
    # after the broadcast, so that every rank raises alike: a table that does not cover the slots would make the
    # saved model refuse to load
    _check_names(bank.sources, bank.source_names, "refresh_memory")
    return int(written.item())


def case_prototypes(
    network: nn.Module,
    loader_or_dataset: Iterable,
    device: str | torch.device | None = None,
    module_name: str = "ecrm",
    image_key: str = "image",
    label_key: str = "label",
) -> torch.Tensor:
    """The prototypes each case would write to the ECRM memory with the network's current weights, one row per item:
    ``[N, K * C]`` (float32, CPU), row ``i`` for the ``i``-th image ``loader_or_dataset`` yields.

    The vectors :func:`monai_ecrm.data.select_memory_cases` takes for ``policy="kcenter"``. They are computed by the
    memory refresh's own pass (:func:`refresh_memory`: encoder and ECRM only, BatchNorm in eval, no gradient, labels
    for label prototypes), with the writes caught before they reach the memory: the memory, its names, every weight and
    running statistic, the modules' training flags and the global random state are left as they were. A case that
    writes no prototype (label prototypes of a picture without a polyp: training would not write it either) gets a row
    of NaN, which ``"kcenter"`` never chooses.

    Local to the calling process: nothing is gathered under ``torch.distributed`` (run it on one rank, or on each rank
    over the same items). Use a dataset, a list or an unshuffled loader, so that rows follow the items' order.

    Args:
        network: an ECRM network (DDP/compile wrappers are unwrapped).
        loader_or_dataset: the candidate cases, as :func:`refresh_memory` takes them.
        device: where to run; ``None`` uses the device of the network's parameters.
        module_name: dotted path of the ECRM module.
        image_key: key of the image in dict items.
        label_key: key of the label in dict items (read only for label prototypes).
    """
    network = unwrap_network(network)
    ecrm = find_module(network, module_name)
    bank = find_memory_bank(network, module_name)
    if device is None:
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    rows: dict[int, torch.Tensor] = {}
    written = [0]

    def _catch(prototypes: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        # instead of MemoryBank.enqueue: keep each case's prototypes by its position, write nothing
        flat = prototypes.detach().to(device="cpu", dtype=torch.float32).flatten(1)
        if sources is None:
            ids = list(range(written[0], written[0] + flat.shape[0]))
        else:
            ids = [int(i) for i in sources.reshape(-1).tolist()]
        written[0] += flat.shape[0]
        for index, row in zip(ids, flat):
            rows[index] = row

    bank.enqueue = _catch  # an instance attribute: ECRM.write calls it instead of the method
    try:
        with untouched_random_state():
            labels = label_key if getattr(ecrm, "label_prototypes", False) else None
            # source_key=None: the ids are the items' positions in the pass, whatever case_index they carry
            count = _write_memory(network, ecrm, bank, loader_or_dataset, device, image_key, False, labels, None)
    finally:
        del bank.enqueue
    width = int(bank.num_classes) * int(bank.channels)
    features = torch.full((count, width), float("nan"), dtype=torch.float32)
    for index, row in rows.items():
        if 0 <= index < count:
            features[index] = row
    return features


def refresh_set_names(source: Iterable, image_key: str = "image") -> list[str] | None:
    """The case names of a refresh set in the order it is yielded: each item's image path relative to the folder
    common to all of them (``kvasir_seg/images/cju0qkwl35piu0993l0dewei2.jpg``), read from the items of a MONAI
    ``Dataset`` (its ``data``, behind a ``DataLoader`` and ``Subset`` too) or a list; a multi-frame item gets its
    frame (``video.dcm#12``). ``None`` when the items carry no path (tensors), or when a shuffling or distributed
    sampler makes the order unknown."""
    if isinstance(source, DataLoader) and not isinstance(source.sampler, torch.utils.data.SequentialSampler):
        return None
    chosen = _dataset_items(source)
    if not chosen:
        return None
    paths = []
    for item in chosen:
        path = item.get(image_key) if isinstance(item, Mapping) else None
        if not isinstance(path, (str, os.PathLike)):
            return None
        frame = item.get("frame") if isinstance(item, Mapping) else None
        paths.append((Path(path).resolve(), frame))
    root = Path(os.path.commonpath([str(path.parent) for path, _ in paths]))
    names = []
    for path, frame in paths:
        name = path.relative_to(root).as_posix()
        names.append(f"{name}#{int(frame)}" if frame is not None else name)
    return names


def _dataset_items(source: Iterable) -> list[Any] | None:
    """The items of a refresh set before any transform, in dataset order (a ``DataLoader``'s dataset, through
    ``Subset`` wrappers, a MONAI ``Dataset``'s ``data``, or a list); ``None`` when they cannot be read without
    iterating."""
    items: Any = source.dataset if isinstance(source, DataLoader) else source
    indices: list[int] | None = None
    while isinstance(items, torch.utils.data.Subset):
        indices = [int(items.indices[i]) for i in indices] if indices is not None else [int(i) for i in items.indices]
        items = items.dataset
    data = getattr(items, "data", items)
    if not isinstance(data, (list, tuple)):
        return None
    return [data[i] for i in indices] if indices is not None else list(data)


def _carries_case_index(source: Iterable, source_key: str = "case_index") -> bool:
    """Whether every item of a refresh set carries its own case index (``source_key``), read from the items as
    :func:`_dataset_items` finds them, so that every rank decides alike without iterating."""
    items = _dataset_items(source)
    return bool(items) and all(isinstance(item, Mapping) and source_key in item for item in items)


def _refresh(
    network: nn.Module,
    ecrm: nn.Module,
    bank: Any,
    loader_or_dataset: Iterable,
    device: Any,
    image_key: str,
    reset: bool,
    mode: str,
    label_key: str,
) -> int:
    images = 0
    if mode != "replicated" or torch.distributed.get_rank() == 0:
        with bank.local_writes() if mode == "replicated" else nullcontext():
            labels = label_key if getattr(ecrm, "label_prototypes", False) else None
            images = _write_memory(network, ecrm, bank, loader_or_dataset, device, image_key, reset, labels)
    if mode == "sharded":
        total = torch.tensor([images], dtype=torch.long, device=bank.memory.device)
        torch.distributed.all_reduce(total)
        images = int(total.item())
    return images


@contextmanager
def untouched_random_state() -> Iterator[None]:
    """Run a block without changing torch's, numpy's and Python's global random state (``RandomState``)."""
    from monai_ecrm.handlers.resume import RandomState

    state = RandomState()
    saved = state.state_dict()
    try:
        yield
    finally:
        state.load_state_dict(saved)


def _distributed_mode(source: Iterable, distributed: str) -> str:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return "local"
    if distributed != "auto":
        return distributed
    sampler = getattr(source, "sampler", None)
    return "sharded" if isinstance(sampler, torch.utils.data.distributed.DistributedSampler) else "replicated"


def _check_equal_batch_counts(source: Iterable, device: torch.device) -> None:
    """Raise on every rank (instead of hanging in a gather) when the ranks' loaders yield different batch counts."""
    try:
        count = len(source)  # type: ignore[arg-type]
    except TypeError:
        return
    extremes = torch.tensor([count, -count], dtype=torch.long, device=device)
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    largest, smallest = int(extremes[0]), -int(extremes[1])
    if largest != smallest:
        raise ValueError(
            f"refresh_memory(distributed='sharded'): the ranks' loaders yield between {smallest} and {largest} "
            "batches; every write is collective, so they must yield the same number (use a DistributedSampler that "
            "gives equal shards, e.g. MONAI's with even_divisible=True, or pass the same images on every rank with "
            "distributed='replicated')."
        )


def _write_memory(
    network: nn.Module,
    ecrm: nn.Module,
    bank: Any,
    source: Iterable,
    device: Any,
    image_key: str,
    reset: bool,
    label_key: str | None = None,
    source_key: str | None = "case_index",
) -> int:
    """Run the encoder and ECRM over ``source`` with the memory writes on; the number of images seen."""
    modes = {module: module.training for module in network.modules()}
    try:
        takes_sources = "sources" in inspect.signature(network.forward).parameters
    except (TypeError, ValueError):
        takes_sources = False
    if reset:
        bank.reset()
    images = 0

    def _stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _StopAfterMemoryWrite

    handle = ecrm.register_forward_hook(_stop)
    try:
        network.eval()
        # only the flags that gate the memory write: ECRM's own layers (BatchNorm included) stay in eval mode
        ecrm.training = True
        bank.training = True
        with torch.no_grad():
            for image, label, ids in _batches(source, image_key, label_key, source_key):
                if ids is None:  # the item's position in the refresh set
                    ids = torch.arange(images, images + image.shape[0])
                images += image.shape[0]
                kwargs = {"sources": ids.to(device)} if takes_sources else {}
                if label is not None:
                    kwargs["labels"] = label.to(device)
                try:
                    network(image.to(device), **kwargs)
                except _StopAfterMemoryWrite:
                    pass
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    return images


class MemoryRefreshHandler:
    """Runs :func:`refresh_memory` on ``engine.network`` at an event (by default when training completes), so the
    memory saved with the final weights was written by those weights.

    List it before the ``CheckpointSaver`` that writes the final model at ``COMPLETED`` so the saved memory is the
    refreshed one (handlers of one event run in the order they were attached).

    Events used: ``event`` (default ``COMPLETED``). Written to ``engine.state``: ``ecrm_refreshed``, the number of
    prototypes written.

    Args:
        loader: the images to write (a ``DataLoader``, unshuffled for dataset order, or a dataset/list); see
            :func:`refresh_memory` for order and what is read.
        event: an ignite event or its name.
        module_name: dotted path of the ECRM module.
        image_key: key of the image in the items.
        label_key: key of the label in the items (read only when ECRM writes label prototypes).
        reset: empty the memory first.
        distributed: ``"auto"``, ``"replicated"`` or ``"sharded"``: what the ranks' loaders hold under
            ``torch.distributed`` (see :func:`refresh_memory`; the handler must run on every rank).
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        loader: Iterable,
        event: Any = "COMPLETED",
        module_name: str = "ecrm",
        image_key: str = "image",
        reset: bool = True,
        distributed: str = "auto",
        name: str | None = None,
        label_key: str = "label",
    ) -> None:
        if distributed not in REFRESH_MODES:
            raise ValueError(f"MemoryRefreshHandler: distributed must be one of {REFRESH_MODES}, got {distributed!r}.")
        self.loader = loader
        self.event = resolve_event(event)
        self.module_name = module_name
        self.image_key = image_key
        self.label_key = label_key
        self.reset = reset
        self.distributed = distributed
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
        """Rebuild the memory of ``engine.network`` from ``loader``.

        Args:
            engine: the engine this handler is attached to.
        """
        if without_memory(engine.network, self.module_name):
            engine.state.ecrm_refreshed = 0
            return  # a network without ECRM (FlexibleUNet, ECRMUNet(use_ecrm=False)): nothing to refresh
        device = getattr(engine.state, "device", None)
        written = refresh_memory(
            engine.network,
            self.loader,
            device=device,
            module_name=self.module_name,
            image_key=self.image_key,
            label_key=self.label_key,
            reset=self.reset,
            distributed=self.distributed,
        )
        engine.state.ecrm_refreshed = written
        stats = memory_stats(find_memory_bank(engine.network, self.module_name))
        self.logger.info(
            f"ECRM memory refreshed with the current weights: {written} prototype(s) written, "
            f"{stats['filled']}/{stats['slots']} slots filled."
        )
