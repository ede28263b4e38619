"""The model record of the best model (``models/model.json``), written with the weights it describes."""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.data.memory_selection import MEMORY_POLICIES
from monai_ecrm.handlers.case_names import case_names
from monai_ecrm.record import (
    DEFAULT_THRESHOLD,
    RecordConflictError,
    describe_weights,
    make_record,
    record_from_network,
    write_record,
)

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ModelRecordHandler", "datalist_summary", "selection_record", "training_data"]


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _world_size() -> int:
    """Processes training together (``torch.distributed``), 1 without it: ``batch_size`` and ``steps`` are per rank."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def _image_paths(items: Sequence[Any]) -> list[str]:
    paths = []
    for item in items:
        image = item.get("image", "") if isinstance(item, Mapping) else item
        frame = item.get("frame") if isinstance(item, Mapping) else None
        paths.append(f"{image}#{frame}" if frame is not None else str(image))
    return paths


def datalist_summary(datalist: Mapping[str, Sequence[Any]] | Sequence[Any]) -> dict[str, Any]:
    """``{"train_images", "val_images", "datalist_sha256", "split_sha256"}`` of a bundle datalist (``{"training": [...],
    "validation": [...]}``, or one list of training items): the counts, and a SHA-256 of the training images' paths
    (frames included) in order, which tells two training sets apart without storing them, and one of the training and
    validation pictures together, named relative to their common folder (what a resume must find unchanged,
    wherever the data now lie)."""
    training = datalist.get("training", []) if isinstance(datalist, Mapping) else datalist
    validation = datalist.get("validation", []) if isinstance(datalist, Mapping) else []
    digest = hashlib.sha256("\n".join(_image_paths(training)).encode("utf-8")).hexdigest()
    # the split's fingerprint names each picture relative to the folder common to all of them: the same data moved or
    # copied elsewhere (a bundle copied with its demo set) is the same split, other data is not
    train_names, val_names = _image_paths(training), _image_paths(validation)
    everything = [name for name in train_names + val_names if name]
    common = os.path.commonpath([os.path.dirname(name) for name in everything]) if everything else ""
    relative = [os.path.relpath(name, common) if common else name for name in train_names + ["|"] + val_names]
    relative[len(train_names)] = ""
    both = hashlib.sha256("\n".join(relative).encode("utf-8"))
    return {
        "train_images": len(training),
        "val_images": len(validation),
        "datalist_sha256": digest,
        "split_sha256": both.hexdigest(),
    }


class ModelRecordHandler:
    """Writes the model record (:mod:`monai_ecrm.record`) of ``models/model.pt`` each time the best-model saver writes
    it, in the same event and the same process, so that ``models/model.json`` always describes the weights beside it:
    the record names their SHA-256 (``weights``), and every reader refuses a record whose digest is not the file's.

    Attach it to the **evaluator**, after the ``CheckpointSaver`` that writes ``model.pt`` (``save_key_metric``), so
    that it runs once that saver is done. At every ``EPOCH_COMPLETED`` it looks at ``model.pt``: when the file is not
    the one it last described (another inode, size or modification time: a new save is an atomic rename), it hashes
    it and writes the record atomically (0644). ``model.pt`` is written first and the record second; a reader that
    comes between the two renames (or after a crash there) finds a record naming other weights and stops with one
    line instead of running a model under the wrong description.

    The record holds: every construction argument of the network, read from the built network
    (:func:`~monai_ecrm.record.record_from_network`, with ``network_kwargs`` for those it does not show), the
    configuration's evaluated input size and normalisation (command-line overrides included), the threshold, the
    memory's size, fill and case names at the moment of the save, the training data's fingerprint and size
    (:func:`datalist_summary`), the epoch and key metric of the weights, the run they belong to (set by
    :class:`~monai_ecrm.handlers.TrainingRun`), and the weights' ``{"file", "sha256", "bytes"}``. A network that is not
    an ``ECRMUNet`` (MONAI's ``FlexibleUNet`` as ``network_def``) gets no record: one log line says so. Under
    ``torch.distributed`` attach it on rank 0 only (where ``model.pt`` is written).

    Events used: ``EPOCH_COMPLETED`` of the evaluator. Written to ``engine.state``: ``model_record``, the record last
    written.

    Args:
        path: the folder of the weights (the bundle's ``@ckpt_dir``) or the weights file (``models/model.pt``).
        spatial_size: the network input size of the preprocessing (``@spatial_size``).
        normalization: the input normalisation's name (``@normalization``); ``None`` follows the backbone.
        threshold: the probability threshold of the masks.
        network_kwargs: construction arguments the network does not show (``norm``, ``act``, ``dropout``) when they
            are not ECRMUNet's defaults; checked against the network.
        datalist: the training datalist (``@datalist``: ``{"training": [...], "validation": [...]}``), for the counts
            and a fingerprint of the training images.
        dataset_dir: where the training data came from (``@dataset_dir``).
        demo_dir: the bundle's synthetic demo folder (``@demo_dir``): a run on it is described as such.
        description: free text about the training data (e.g. ``"Kvasir-SEG + CVC-ClinicDB, PraNet split"``).
        weights_name: the weights file's name in ``path`` (the saver's ``key_metric_filename``).
        module_name: dotted path of the ECRM module (for the memory's fill and names).
        name: logger name; ``None`` uses ``engine.logger``.
        memory_selection: how the cases the memory refresh writes were chosen, ``{"policy", "seed", "cases"}``
            (:func:`monai_ecrm.data.select_memory_cases`; the bundle passes ``@memory_policy``, ``@memory_seed`` and
            ``@memory_cases``, the very list its refresh set is made of). Written as ``record["memory"]["selection"]``:
            ``{"policy", "seed", "cases": [names]}``, the seed ``None`` for ``"first"`` (no draw), each case named as
            the memory's names table names it (:func:`~monai_ecrm.handlers.case_names.case_names` of the training
            list, looked up by the item's ``case_index``; items without one are named relative to their own common
            folder; names given as strings are kept). ``memory.sources`` says which case each slot of the saved
            memory holds; the selection says which cases the refresh was asked to write, and by what rule.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        spatial_size: int | Sequence[int],
        normalization: str | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        network_kwargs: Mapping[str, Any] | None = None,
        datalist: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None,
        dataset_dir: str | os.PathLike | None = None,
        demo_dir: str | os.PathLike | None = None,
        description: str | None = None,
        weights_name: str = "model.pt",
        module_name: str = "ecrm",
        name: str | None = None,
        memory_selection: Mapping[str, Any] | None = None,
    ) -> None:
        path = Path(path)
        self.weights = path if path.suffix else path / weights_name
        self.spatial_size = spatial_size
        self.normalization = normalization
        self.threshold = threshold
        self.network_kwargs = dict(network_kwargs or {})
        self.datalist = datalist
        self.dataset_dir = dataset_dir
        self.demo_dir = demo_dir
        self.description = description
        self.memory_selection = selection_record(memory_selection, datalist) if memory_selection is not None else None
        self.module_name = module_name
        self._name = name
        self.logger = logging.getLogger(name)
        #: the run the weights belong to (``{"run_id", ...}``), set by :class:`~monai_ecrm.handlers.TrainingRun`
        self.run: dict[str, Any] = {}
        self.max_epochs: int | None = None
        self._seen: tuple[int, int, int] | None = self._stat()
        self._skipped = False

    def attach(self, engine: Engine) -> None:
        """Register :meth:`__call__` at the evaluator's ``EPOCH_COMPLETED`` (attach after the best-model saver).

        Args:
            engine: the MONAI evaluator whose ``CheckpointSaver`` writes the weights.
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.weights.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _describes(self, engine: Engine) -> bool:
        """Whether the network is one a record describes (an ``ECRMUNet``); says once when it is not."""
        from monai_ecrm.networks.nets import ECRMUNet
        from monai_ecrm.networks.utils import unwrap_network

        plain = unwrap_network(engine.network)
        if isinstance(plain, ECRMUNet):
            return True
        if not self._skipped:
            self.logger.info(
                f"ModelRecordHandler: the network is a {type(plain).__name__}, not an ECRMUNet: no model record "
                "written (the record describes ECRMUNet models)."
            )
            self._skipped = True
        return False

    def _network_kwargs(self, engine: Engine) -> dict[str, Any]:
        try:
            record = record_from_network(engine.network, self.network_kwargs)
        except RecordConflictError:
            raise
        except ValueError as error:
            # e.g. BatchNorm converted to SyncBatchNorm for several GPUs: same weights and inference, another repr
            self.logger.warning(f"ModelRecordHandler: {error} The record is written with the arguments found.")
            record = record_from_network(engine.network, self.network_kwargs, check=False)
        return record["network"]["kwargs"]

    def _data(self) -> dict[str, Any]:
        return training_data(self.datalist, self.dataset_dir, self.demo_dir, self.description)

    def _memory(self, engine: Engine) -> tuple[dict[str, Any], list[str | None] | None]:
        from monai_ecrm.handlers.memory_bank import find_memory_bank

        try:
            bank = find_memory_bank(engine.network, self.module_name)
        except AttributeError:
            return {}, None
        memory: dict[str, Any] = {"slots": int(bank.num_slots), "filled": int(bank.filled)}
        if self.memory_selection is not None:
            memory["selection"] = self.memory_selection
        return memory, bank.slot_names()

    def run_record(self, engine: Engine) -> dict[str, Any] | None:
        """The record of the network ``engine`` trains, without weights (what a training checkpoint carries), or
        ``None`` for a network that is no ECRMUNet."""
        if not self._describes(engine):
            return None
        training = {**self._data(), **self.run, "max_epochs": self.max_epochs, "world_size": _world_size()}
        return make_record(
            self._network_kwargs(engine),
            spatial_size=self.spatial_size,
            normalization=self.normalization,
            threshold=self.threshold,
            training=training,
        )

    def __call__(self, engine: Engine) -> None:
        """Write the record when the weights file changed since it was last described.

        Args:
            engine: the evaluator.
        """
        stat = self._stat()
        if stat is None or stat == self._seen or not self._describes(engine):
            return
        memory, names = self._memory(engine)
        metrics = {key: float(value) for key, value in (engine.state.metrics or {}).items() if _is_number(value)}
        training = {
            **self._data(),
            **self.run,
            "epoch": int(engine.state.epoch),
            "max_epochs": self.max_epochs,
            "metrics": metrics,
            "saved": _now(),
            "world_size": _world_size(),
        }
        record = make_record(
            self._network_kwargs(engine),
            spatial_size=self.spatial_size,
            normalization=self.normalization,
            threshold=self.threshold,
            training=training,
            memory=memory,
            memory_sources=names,
            weights=describe_weights(self.weights),
        )
        engine.state.model_record = record
        written = write_record(self.weights, record)
        self._seen = stat
        self.logger.info(f"model record written: {written} (describes {self.weights.name}, epoch {training['epoch']})")


def selection_record(
    selection: Mapping[str, Any], datalist: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None
) -> dict[str, Any]:
    """``{"policy", "seed", "cases": [names]}``: what a record says about how its memory cases were chosen (see
    :class:`ModelRecordHandler`'s ``memory_selection``), with ``cases`` (datalist items or names) named as the memory's
    names table names them, from the training list of ``datalist`` when the items carry their ``case_index``."""
    if not isinstance(selection, Mapping) or not {"policy", "cases"} <= selection.keys():
        raise ValueError(
            f"ModelRecordHandler: memory_selection must be {{'policy', 'seed', 'cases'}}, got {selection!r:.200}."
        )
    policy = selection["policy"]
    if policy not in MEMORY_POLICIES:
        raise ValueError(
            f"ModelRecordHandler: memory_selection policy must be one of {MEMORY_POLICIES}, got {policy!r}."
        )
    cases = list(selection["cases"] or [])
    seed = selection.get("seed")
    if all(isinstance(case, str) for case in cases):
        names = cases
    else:
        training = datalist.get("training", []) if isinstance(datalist, Mapping) else (datalist or [])
        table = case_names(training) if training else []
        indices = [case.get("case_index") if isinstance(case, Mapping) else None for case in cases]
        if table and all(isinstance(index, int) and 0 <= index < len(table) for index in indices):
            names = [table[index] for index in indices]
        else:
            names = case_names(cases)
    return {"policy": str(policy), "seed": None if policy == "first" or seed is None else int(seed), "cases": names}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def training_data(
    datalist: Mapping[str, Sequence[Any]] | Sequence[Any] | None,
    dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """What a record and a training checkpoint say about the training data: ``dataset_dir`` (resolved), a
    ``description`` (the synthetic demo set says so), and :func:`datalist_summary`'s counts and fingerprint."""
    data: dict[str, Any] = {"description": description}
    if dataset_dir is not None:
        dataset = Path(dataset_dir).expanduser().resolve()
        data["dataset_dir"] = str(dataset)
        if demo_dir is not None and dataset == Path(demo_dir).expanduser().resolve():
            data["description"] = description or (
                "SYNTHETIC demo set (monai_ecrm.data.make_demo_dataset: drawn blobs, not polyps)"
            )
    if datalist is not None:
        data.update(datalist_summary(datalist))
    return data
