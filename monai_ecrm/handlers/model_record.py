"""The model record of a training run (``models/model.json``), written when training starts and updated when it ends."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.record import (
    DEFAULT_THRESHOLD,
    RecordConflictError,
    make_record,
    record_from_network,
    write_record,
)

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ModelRecordHandler", "datalist_summary"]


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
    """``{"train_images", "val_images", "datalist_sha256"}`` of a bundle datalist (``{"training": [...],
    "validation": [...]}``, or one list of training items): the counts, and a SHA-256 of the training images' paths
    (frames included) in order, which tells two training sets apart without storing them."""
    training = datalist.get("training", []) if isinstance(datalist, Mapping) else datalist
    validation = datalist.get("validation", []) if isinstance(datalist, Mapping) else []
    digest = hashlib.sha256("\n".join(_image_paths(training)).encode("utf-8")).hexdigest()
    return {"train_images": len(training), "val_images": len(validation), "datalist_sha256": digest}


class ModelRecordHandler:
    """Writes the model record (:mod:`monai_ecrm.record`) of a training run beside its weights: ``models/model.json``
    beside ``models/model.pt`` and the ``checkpoint_*.pt`` files, so that the command, TorchScript and ONNX exports
    run the model as it was trained.

    The values are the run's own: the network's construction arguments are read from the built network
    (``engine.network``, :func:`~monai_ecrm.record.record_from_network`), and the preprocessing values are the
    configuration's evaluated ones, so command-line overrides (``--spatial_size 256``) are what is written, not the
    config file as written.

    Events used: ``STARTED`` (the record is written before the first iteration, so an interrupted run has one; the
    training entry says ``"completed": false``) and ``COMPLETED`` (the record is rewritten with the epochs and steps
    run and ``"completed": true``). Writes are atomic; under ``torch.distributed`` only rank 0 writes. Written to
    ``engine.state``: ``model_record``, the record last written. A network that is not an ``ECRMUNet`` (MONAI's
    ``FlexibleUNet`` as ``network_def``, the accuracy study's baseline) gets no record: one log line says so.

    Args:
        path: the folder of the weights (the bundle's ``@ckpt_dir``; ``model.json`` in it) or the record's file.
        spatial_size: the network input size of the preprocessing (``@spatial_size``).
        normalization: the input normalisation's name (``@normalization``); ``None`` follows the backbone.
        threshold: the probability threshold of the masks.
        network_kwargs: construction arguments the network does not show (``norm``, ``act``, ``dropout``,
            ``interp_mode``) when they are not ECRMUNet's defaults; checked against the network.
        datalist: the training datalist (``@datalist``: ``{"training": [...], "validation": [...]}``), for the counts
            and a fingerprint of the training images.
        dataset_dir: where the training data came from (``@dataset_dir``).
        demo_dir: the bundle's synthetic demo folder (``@demo_dir``): a run on it is described as such.
        description: free text about the training data (e.g. ``"Kvasir-SEG + CVC-ClinicDB, PraNet split"``).
        memory_sources: names of the cases the memory slots were written from, if known.
        name: logger name; ``None`` uses ``engine.logger``.
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
        memory_sources: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.spatial_size = spatial_size
        self.normalization = normalization
        self.threshold = threshold
        self.network_kwargs = dict(network_kwargs or {})
        self.datalist = datalist
        self.dataset_dir = dataset_dir
        self.demo_dir = demo_dir
        self.description = description
        self.memory_sources = memory_sources
        self._name = name
        self.logger = logging.getLogger(name)
        self._kwargs: dict[str, Any] | None = None
        self._training: dict[str, Any] = {}
        self._skipped = False

    def attach(self, engine: Engine) -> None:
        """Register :meth:`started` at ``STARTED`` and :meth:`completed` at ``COMPLETED``.

        Args:
            engine: a MONAI trainer (its ``network`` is the ECRMUNet trained).
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _describes(self, engine: Engine) -> bool:
        """Whether the trained network is one a record describes (an ``ECRMUNet``); says once when it is not."""
        from monai_ecrm.handlers.aux_supervision import unwrap_network
        from monai_ecrm.networks.nets import ECRMUNet

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
        data: dict[str, Any] = {"description": self.description}
        if self.dataset_dir is not None:
            dataset = Path(self.dataset_dir).expanduser().resolve()
            data["dataset_dir"] = str(dataset)
            if self.demo_dir is not None and dataset == Path(self.demo_dir).expanduser().resolve():
                data["description"] = self.description or (
                    "SYNTHETIC demo set (monai_ecrm.data.make_demo_dataset: drawn blobs, not polyps)"
                )
        if self.datalist is not None:
            data.update(datalist_summary(self.datalist))
        return data

    def _write(self, engine: Engine) -> None:
        record = make_record(
            self._kwargs or {},
            spatial_size=self.spatial_size,
            normalization=self.normalization,
            threshold=self.threshold,
            training=self._training,
            memory_sources=self.memory_sources,
        )
        engine.state.model_record = record
        if _world_size() > 1 and torch.distributed.get_rank() != 0:
            return
        written = write_record(self.path, record)
        self.logger.info(f"model record written: {written}")

    def started(self, engine: Engine) -> None:
        """Write the record with ``"completed": false`` (the run's settings, before any iteration).

        Args:
            engine: the trainer.
        """
        if not self._describes(engine):
            return
        self._kwargs = self._network_kwargs(engine)
        loader = getattr(engine, "data_loader", None)
        self._training = {
            **self._data(),
            "max_epochs": engine.state.max_epochs,
            "epoch_length": engine.state.epoch_length,
            "batch_size": getattr(loader, "batch_size", None),
            "world_size": _world_size(),
            "epochs": None,
            "steps": None,
            "completed": False,
            "started": _now(),
            "finished": None,
        }
        self._write(engine)

    def completed(self, engine: Engine) -> None:
        """Rewrite the record with the epochs and steps run and ``"completed": true``.

        Args:
            engine: the trainer.
        """
        if not self._describes(engine):
            return
        if self._kwargs is None:
            self._kwargs = self._network_kwargs(engine)
        self._training.update(
            epochs=engine.state.epoch,
            steps=engine.state.iteration,
            max_epochs=engine.state.max_epochs,
            completed=True,
            finished=_now(),
        )
        self._write(engine)
