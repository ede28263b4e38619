"""Memory provenance in a MONAI evaluator: which training cases of the ECRM memory each image drew on (the bundle's
``explain`` switch, experimental, like ``monai-ecrm-infer --explain K``)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from monai.data import decollate_batch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_ecrm.explanations import (
    EXPLAIN_COLUMNS,
    NOTE_COLUMN,
    CasePictures,
    ExplanationWriter,
    explain_messages,
    explain_problem,
    explanation_from_shares,
    memory_case_names,
)
from monai_ecrm.handlers.aux_supervision import unwrap_network
from monai_ecrm.inferers import ExplainingInferer
from monai_ecrm.record import read_record
from monai_ecrm.writing import PartialFolder

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EXPLAIN_CSV", "MemoryExplanationHandler", "memory_case_pictures"]

EXPLAIN_CSV = "explain.csv"
"""The table of the explained images: ``image``, ``frame`` (empty for a single picture), then the command report's
:data:`~monai_ecrm.clinical.explain.EXPLAIN_COLUMNS` (or its :data:`~monai_ecrm.clinical.explain.NOTE_COLUMN` when
the model cannot be explained)."""


def memory_case_pictures(
    model_path: str | os.PathLike | None, roots: str | os.PathLike | Iterable[str | os.PathLike] | None = None
) -> CasePictures:
    """The memory cases' pictures as the user's machine has them: looked for in ``roots`` (the bundle's
    ``explain_root``), then in the training folder the model's record names (``training.dataset_dir``).

    Args:
        model_path: the model file (its record, ``model.json`` beside it, is read when there is one).
        roots: a folder or folders to look in first.
    """
    record = read_record(model_path) if model_path and Path(model_path).is_file() else None
    dataset_dir = ((record or {}).get("training") or {}).get("dataset_dir")
    first = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots or [])
    return CasePictures([*first, dataset_dir])


class MemoryExplanationHandler:
    """Names, for every image an evaluator runs, the ``top_k`` ECRM memory cases (the training cases that wrote the
    slots) the image drew on most, with their share of the attention over the predicted polyp, from the forward that
    gave its prediction: the evaluator's inferer must be an :class:`~monai_ecrm.inferers.ExplainingInferer` with
    ``explain`` on, which keeps the batch's shares (its docstring says why they travel there and not in ``pred``).

    Events (attach it after the ``CheckpointLoader``, and before the handlers that read the explanations):

    - ``STARTED``: the inferer checked (a clear error when it keeps no shares); whether the loaded network can be
      explained (:func:`~monai_ecrm.clinical.explain.explain_problem`);
      its case names (:func:`~monai_ecrm.clinical.explain.memory_case_names`, with the model record's); one log line
      each, once: why it cannot be explained (WARNING: the predictions are still written, without explanations),
      ``top_k`` above the filled slots (all are shown), where the case pictures were found. Writes
      ``engine.state.explain_problem`` (``None`` when it can be explained).
    - ``ITERATION_COMPLETED``: pairs the inferer's shares of the batch with the post-processed output items (same
      order): each item gets its :class:`~monai_ecrm.clinical.explain.Explanation` under ``explanation_key`` (what
      :class:`~monai_ecrm.handlers.EvaluationReport` puts on its page), a row of the table and, with
      ``write_pictures``, ``<stem>_explain.png`` beside its mask
      (:class:`~monai_ecrm.clinical.explain.ExplanationWriter`; the output items need the clinical post-processing's
      ``image`` and ``pred``, see there).
    - ``COMPLETED``: :data:`EXPLAIN_CSV` in ``output_dir``, written atomically (under ``torch.distributed`` the rows of
      every rank, by rank 0).

    Case pictures are never part of a model: they are read on the user's side (:func:`memory_case_pictures`), a case
    not found is a grey tile with its name.

    Args:
        top_k: memory cases per image (at least 1).
        output_dir: the folder of the table and the pictures; ``None`` writes nothing.
        model_path: the model file, whose record may name the cases of an older memory.
        pictures: the memory cases' pictures; ``None``: none looked for (no ``<stem>_explain.png`` either).
        write_pictures: write ``<stem>_explain.png`` beside each mask (needs ``output_dir`` and ``pictures``).
        csv_name: the table's file name; ``None`` writes no table.
        normalization: the network input's normalisation (undone to draw the picture).
        threshold: the masks' threshold, for ``probabilities`` predictions.
        probabilities: the post-processed predictions are probabilities rather than 0/1 masks.
        data_root_dir: keep the sources' sub-folders below this folder (as the mask writer's ``data_root_dir``).
        inferer: the inferer that keeps the shares; ``None``: the engine's (``engine.inferer``).
        explanation_key: the output items' key of their explanation.
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        top_k: int,
        output_dir: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        pictures: CasePictures | None = None,
        write_pictures: bool = True,
        csv_name: str | None = EXPLAIN_CSV,
        normalization: str = "imagenet",
        threshold: float = 0.5,
        probabilities: bool = False,
        data_root_dir: str | os.PathLike = "",
        inferer: ExplainingInferer | None = None,
        explanation_key: str = "explanation",
        name: str | None = None,
    ) -> None:
        if int(top_k) < 1:
            raise ValueError(f"MemoryExplanationHandler: top_k must be at least 1, got {top_k}")
        self.top_k = int(top_k)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.model_path = model_path
        self.pictures = pictures
        self.csv_name = csv_name
        self.inferer = inferer
        self.explanation_key = explanation_key
        self.logger = logging.getLogger(name)
        self._name = name
        self.partial = PartialFolder(self.output_dir) if self.output_dir is not None else None
        self.writer = None
        if write_pictures and self.output_dir is not None and pictures is not None:
            self.writer = ExplanationWriter(
                self.output_dir, pictures, normalization, threshold, probabilities, data_root_dir, self.partial
            )
        self.problem: str | None = None
        self.names: list[str | None] = []
        self.rows: list[dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Registers the handler on the evaluator's ``STARTED``, ``ITERATION_COMPLETED`` and ``COMPLETED`` events."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write_table)

    def start(self, engine: Engine) -> None:
        """Checks the loaded network, reads its case names and logs the ``explain`` lines (once per run)."""
        inferer = self.inferer if self.inferer is not None else getattr(engine, "inferer", None)
        if not isinstance(inferer, ExplainingInferer) or not inferer.explain:
            raise ValueError(
                "MemoryExplanationHandler needs the evaluator's inferer to be monai_ecrm.inferers.ExplainingInferer "
                f"with explain=True (it keeps the memory's shares of each batch), got {inferer!r}"
            )
        self.inferer = inferer
        network = unwrap_network(engine.network)
        record = read_record(self.model_path) if self.model_path and Path(self.model_path).is_file() else None
        self.rows = []
        self.problem = explain_problem(network, record)
        engine.state.explain_problem = self.problem
        if self.problem:
            self.names = []
            self.logger.warning(f"explain: {self.problem}; predictions written without explanations")
            return
        self.names = memory_case_names(network, record)
        for message in explain_messages(self.names, self.top_k, self.pictures, "explain", "--explain_root"):
            self.logger.info(message)

    def __call__(self, engine: Engine) -> None:
        """Explains the items of the current iteration (``engine.state.output``, post-processed)."""
        outputs = engine.state.output
        items = decollate_batch(outputs) if isinstance(outputs, Mapping) else outputs
        if self.problem:
            self.rows += [{**_source_columns(item), NOTE_COLUMN: self.problem} for item in items]
            return
        shares = self.inferer.shares if self.inferer is not None else None
        if shares is None or shares.shape[0] != len(items):
            raise RuntimeError(
                f"MemoryExplanationHandler: {len(items)} output items but the inferer kept "
                f"{'no shares' if shares is None else f'shares of {shares.shape[0]} images'} for this iteration"
            )
        for item, row in zip(items, shares):
            explanation = explanation_from_shares(row, self.names, self.top_k)
            if isinstance(item, dict):
                item[self.explanation_key] = explanation
            self.rows.append({**_source_columns(item), **explanation.columns()})
            if self.writer is not None:
                self.writer(item, explanation)

    def write_table(self, engine: Engine | None = None) -> Path | None:
        """Writes :data:`EXPLAIN_CSV` (atomically) with the rows of every rank; returns its path (rank 0)."""
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
            if dist.get_rank() != 0:
                return None
        if self.output_dir is None or self.partial is None or not self.csv_name:
            return None
        columns = ["image", "frame", *([NOTE_COLUMN] if self.problem else EXPLAIN_COLUMNS)]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = self.partial.folder / self.csv_name
        with open(written, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        final = self.partial.publish(written, self.output_dir / self.csv_name)
        self.partial.close()
        return final


def _source_columns(item: Any) -> dict[str, str]:
    """The ``image`` and ``frame`` columns of an output item: its source file (and frame of a multi-frame file)."""
    for key in ("pred", "image"):
        meta = getattr(item.get(key), "meta", None) if isinstance(item, Mapping) else None
        if isinstance(meta, Mapping) and (meta.get("source_path") or meta.get("filename_or_obj")):
            frame = int(meta.get("frame_index", -1))
            source = str(meta.get("source_path") or meta.get("filename_or_obj"))
            return {"image": source, "frame": str(frame) if frame >= 0 else ""}
    return {"image": "", "frame": ""}
