"""One training run owns its checkpoint folder: a resume continues that run (same data, same best score), a new run
never deletes, resumes or overwrites another run's files."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.handlers.model_record import ModelRecordHandler, training_data

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["TrainingRun", "ResumeMismatchError", "RUN_KEY", "PREVIOUS_RUNS"]

#: the ``save_dict`` key of the run's state in a training checkpoint
RUN_KEY = "run"
#: where a new run moves the files of an earlier run it finds in its folder (``models/previous/<run>/``)
PREVIOUS_RUNS = "previous"


class ResumeMismatchError(ValueError):
    """A resume with other settings than the run it continues (other training data, the demo fallback included, or
    another input size); the message names the option, both values and how to start a new run instead."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


class TrainingRun:
    """Identity and continuity of one training run in a bundle's ``models/`` folder.

    MONAI's ``CheckpointSaver``/``CheckpointLoader`` restore the network, optimizer and trainer, but neither knows
    which run a folder's files belong to, which data the run trained on, or the best validation score so far (the
    evaluator's best-model saver starts empty after a resume, so its first validation always replaced
    ``model.pt``). This handler adds that state to the training checkpoint (as ``save_dict["run"]``, a plain dict
    loadable with ``torch.load(weights_only=True)``) and acts on it when training starts:

    - **resume** (``resume_path`` given): the checkpoint's run entry is read *before* ``CheckpointLoader`` restores
      anything; a run trained on other data (its training and validation paths' fingerprint) or at another input
      size stops with one line naming the option, both values and how to start a new run
      (:class:`ResumeMismatchError`). The best-model saver's state (its kept score) and the evaluator's best metric
      are restored, so ``model.pt`` is replaced only by a better model; the run id is kept.
    - **new run** (no ``resume_path``): a fresh run id; when ``ckpt_dir`` holds files of an earlier run (training
      checkpoints, ``model.pt`` and its record, exports), they are moved to ``ckpt_dir/previous/<run>/`` (one log
      line says so), so that pruning and ``latest`` see only this run's files and the earlier model is kept.

    Checkpoints written before this handler existed carry no run entry: they resume as before, with a warning that
    their data and best score cannot be checked.

    Attach it to the trainer before the ``CheckpointLoader`` (the bundle attaches the loader after the
    ``train_handlers``). Under ``torch.distributed`` attach it on every rank: rank 0 moves files, the others wait.

    Events used: ``STARTED``. Written to ``engine.state``: ``run_id``.

    Args:
        ckpt_dir: the folder of the training checkpoints and ``model.pt``.
        datalist: the training datalist (``{"training": [...], "validation": [...]}``).
        dataset_dir: the ``dataset_dir`` option, named in messages.
        demo_dir: the synthetic demo folder (a run on it is described as such).
        spatial_size: the training input size (a resume must keep it).
        resume_path: the checkpoint being resumed (the ``CheckpointLoader``'s ``load_path``), ``None`` for a new run.
        best_model_saver: the evaluator's ``CheckpointSaver`` of ``model.pt`` (``save_key_metric``), whose state is
            saved and restored; ``None`` when there is none (e.g. a rank that does not save).
        evaluator: the evaluator whose ``best_metric`` is saved and restored.
        record_handler: the evaluator's :class:`~monai_ecrm.handlers.ModelRecordHandler`, told the run id and length.
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        datalist: Mapping[str, Sequence[Any]] | None = None,
        dataset_dir: str | os.PathLike | None = None,
        demo_dir: str | os.PathLike | None = None,
        spatial_size: int | Sequence[int] | None = None,
        resume_path: str | os.PathLike | None = None,
        best_model_saver: Any = None,
        evaluator: Any = None,
        record_handler: ModelRecordHandler | None = None,
        name: str | None = None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.data = training_data(datalist, dataset_dir, demo_dir) if datalist is not None else {}
        self.spatial_size = list(spatial_size) if isinstance(spatial_size, Sequence) else spatial_size
        self.resume_path = Path(resume_path) if resume_path else None
        self.best_model_saver = best_model_saver
        self.evaluator = evaluator
        self.record_handler = record_handler
        self._name = name
        self.logger = logging.getLogger(name)
        self.run_id: str | None = None
        self.started_at: str | None = None
        self.resumed_from: str | None = None
        self.record: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register :meth:`started` at ``STARTED`` (attach before the ``CheckpointLoader``)."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.started)

    # ------------------------------------------------------------------------------------------- checkpoint state
    def _saver_checkpoint(self) -> Any:
        return getattr(self.best_model_saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict[str, Any]:
        """The run's entry of a training checkpoint: id, data fingerprint, input size, best-model state."""
        saver = self._saver_checkpoint()
        state = getattr(self.evaluator, "state", None)
        best_metric = getattr(state, "best_metric", None)
        return {
            "run_id": self.run_id,
            "started": self.started_at,
            "data": dict(self.data),
            "spatial_size": self.spatial_size,
            "best_saved": [[float(p), str(f)] for p, f in saver.state_dict()["_saved"]] if saver is not None else [],
            "best_metric": float(best_metric) if isinstance(best_metric, (int, float)) else None,
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1) or -1) if state is not None else -1,
            # the record of the network being trained (JSON), so that a training checkpoint describes itself
            **({"record": self.record} if self.record else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run of ``state`` (see :meth:`check`): its id, the best-model saver's kept score and the
        evaluator's best metric."""
        self.run_id = state.get("run_id") or self.run_id
        self.started_at = state.get("started") or self.started_at
        saver = self._saver_checkpoint()
        if saver is not None and state.get("best_saved") is not None:
            saver.load_state_dict({"_saved": [(float(p), str(f)) for p, f in state["best_saved"]]})
        if self.evaluator is not None and state.get("best_metric") is not None:
            self.evaluator.state.best_metric = float(state["best_metric"])
            self.evaluator.state.best_metric_epoch = int(state.get("best_metric_epoch", -1))

    def check(self, state: Mapping[str, Any], where: str | os.PathLike) -> None:
        """Refuse to continue a run trained on other data or at another size (one line: option, both values, fix).

        Raises:
            ResumeMismatchError: naming the checkpoint, the option and both values.
        """
        fix = (
            f"pass the run's own value to resume it, or leave out --resume_from to start a new run (the files of the "
            f"old run are then moved to {self.ckpt_dir / PREVIOUS_RUNS}/)"
        )
        old, new = dict(state.get("data") or {}), self.data
        if old.get("split_sha256") and new.get("split_sha256") and old["split_sha256"] != new["split_sha256"]:

            def show(data: Mapping[str, Any]) -> str:
                described = f", {data['description']}" if data.get("description") else ""
                return (
                    f"{data.get('dataset_dir', '?')} ({data.get('train_images')} training and "
                    f"{data.get('val_images')} validation images{described})"
                )

            raise ResumeMismatchError(
                f"--resume_from {where}: that run trained on --dataset_dir {show(old)}, this command's data is "
                f"{show(new)}: {fix}."
            )
        if state.get("spatial_size") is not None and self.spatial_size is not None:
            if json.dumps(state["spatial_size"]) != json.dumps(self.spatial_size):
                raise ResumeMismatchError(
                    f"--resume_from {where}: that run trained with --spatial_size {state['spatial_size']}, this "
                    f"command gives {self.spatial_size}: {fix}."
                )

    # ---------------------------------------------------------------------------------------------------- events
    def started(self, engine: Engine) -> None:
        """Check and continue a resumed run, or start a new one in a folder of its own (see the class docstring).

        Args:
            engine: the trainer.
        """
        if self.resume_path is not None:
            self._resume(engine)
        else:
            self.run_id = uuid.uuid4().hex[:12]
            self.started_at = _now()
            self._move_previous_runs()
        engine.state.run_id = self.run_id
        if self.record_handler is not None:
            self.record_handler.run = {
                "run_id": self.run_id,
                "run_started": self.started_at,
                **({"resumed_from": self.resumed_from} if self.resumed_from else {}),
            }
            self.record_handler.max_epochs = engine.state.max_epochs
            record = self.record_handler.run_record(engine)
            self.record = json.dumps(record, sort_keys=True) if record is not None else None

    def _resume(self, engine: Engine) -> None:
        path = self.resume_path
        if path is None or not path.is_file():
            raise FileNotFoundError(f"--resume_from: no checkpoint {path} to resume (is --bundle_root right?).")
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        state = checkpoint.get(RUN_KEY) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping):
            self.run_id = uuid.uuid4().hex[:12]
            self.started_at = _now()
            self.logger.warning(
                f"TrainingRun: {path} was written before checkpoints named their run: its data and best validation "
                "score cannot be checked; model.pt may be replaced by the first validation of this resume."
            )
            return
        self.check(state, path)
        self.load_state_dict(state)
        self.resumed_from = path.name
        best = state.get("best_metric")
        self.logger.info(
            f"TrainingRun: resuming run {self.run_id} from {path.name}"
            + (f" (best validation score so far {best:.4f}, kept unless beaten)" if best is not None else "")
        )

    def _previous_files(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(path for path in self.ckpt_dir.iterdir() if path.is_file() and not path.name.startswith("."))

    def _move_previous_runs(self) -> None:
        """Move an earlier run's files out of the way (rank 0; the other ranks wait at a barrier)."""
        if _rank() == 0:
            files = self._previous_files()
            if files:
                target = self.ckpt_dir / PREVIOUS_RUNS / self._previous_name(files)
                target.mkdir(parents=True, exist_ok=True)
                for path in files:
                    shutil.move(str(path), str(target / path.name))
                self.logger.warning(
                    f"TrainingRun: {self.ckpt_dir} held the files of an earlier run ({len(files)} files: "
                    f"{', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''}); moved to {target} "
                    "so that this new run neither prunes, resumes nor overwrites them (to continue that run instead, "
                    "move them back and pass --resume_from latest)."
                )
        self._barrier()

    def _barrier(self) -> None:
        if _distributed():
            torch.distributed.barrier()

    def _previous_name(self, files: Sequence[Path]) -> str:
        """``<run id>`` of the earlier run when its checkpoints name it, else ``run-<time of its newest file>``;
        never an existing folder's name."""
        run_id = None
        for path in files:
            if path.suffix != ".pt":
                continue
            try:
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a flat model.pt read elsewhere, a truncated file: no run id there
                continue
            state = checkpoint.get(RUN_KEY) if isinstance(checkpoint, Mapping) else None
            if isinstance(state, Mapping) and state.get("run_id"):
                run_id = str(state["run_id"])
                break
        newest = max(path.stat().st_mtime for path in files)
        base = run_id or "run-" + datetime.datetime.fromtimestamp(newest).strftime("%Y%m%d-%H%M%S")
        name, index = base, 1
        while (self.ckpt_dir / PREVIOUS_RUNS / name).exists():
            index += 1
            name = f"{base}-{index}"
        return name
