"""Evaluation report of a MONAI evaluator: per-image scores, the per-dataset table, overlays of the worst cases, and
optionally all of it on one static page (``report.html``) with the memory cases the worst cases drew on."""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor, decollate_batch
from monai.handlers import from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from PIL import Image, ImageDraw

from monai_ecrm.explanations import CasePictures
from monai_ecrm.handlers.report_page import model_identity, write_report_page
from monai_ecrm.metrics.evaluation import foreground_counts, summarize, write_tables
from monai_ecrm.metrics.functional import SUITE_KEYS, _check_normalize, minmax_normalize, polyp_metric_suite

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EvaluationReport", "render_overlay"]

GT_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 0, 255)
IMAGE_FOLDER_NAMES = ("images", "image", "imgs", "img")
"""Folder names of images inside a dataset folder (``<dataset>/images/``), see ``EvaluationReport``'s dataset names."""


class EvaluationReport:
    """Writes, when an evaluator's epoch completes, the per-image scores, the per-dataset table and overlays of the
    worst cases, so that a person can read the numbers and look at the failures.

    Every image is scored with the whole suite (:func:`monai_ecrm.metrics.polyp_metric_suite`) at the size it has
    in the output: feed it predictions inverted to the original size and masks at the original size. Files, in
    ``output_dir`` (rewritten at every evaluation):

    - ``per_image.csv``: dataset, file name, height, width and every score;
    - ``summary.csv`` and ``summary.md``: the mean scores per dataset (and overall when there are several), with
      the polyp papers' column names in the Markdown table;
    - ``overlays/<dataset>/NN_dice<score>_<name>.png``: for the ``worst_k`` lowest Dice of each dataset, the image
      with the ground-truth contour (green) and the predicted contour (magenta, ``pred > threshold``). Ties, the
      usual case among the worst (every image at Dice 0), are broken by the order the images were seen (on several
      ranks: rank by rank), so ``NN`` is the place in ``per_image.csv`` sorted by Dice with a stable sort;
    - ``report.html`` (``html=True``, :func:`~monai_ecrm.handlers.report_page.write_report_page`): the summary table
      and, per dataset, the worst cases with their overlays (relative links: it opens from disk) and, for the images
      a :class:`~monai_ecrm.handlers.MemoryExplanationHandler` attached before this report explained (their output
      item's ``explanation_key``), the memory cases each drew on, with their shares and, when ``case_pictures`` finds
      them, thumbnails written to ``memory_cases/`` beside the page. Without explanations the page says why (the
      handler's ``engine.state.explain_problem``).

    A dataset is named by ``dataset_key``, else ``default_dataset``, else after the folder its image comes from: the
    folder above the images folder (``Kvasir/images/12.png``: ``Kvasir``; see :data:`IMAGE_FOLDER_NAMES`), or the
    folder holding the image (a flat folder of pictures); ``"dataset"`` when the file name is unknown.

    Events: ``EPOCH_STARTED`` clears the rows, ``ITERATION_COMPLETED`` scores the batch, ``EPOCH_COMPLETED`` writes.
    Nothing is written to ``engine.state``; the rows and the summary stay in ``rows`` and ``summary``. Under
    ``torch.distributed`` the rows of all ranks are gathered, rank 0 writes the tables and every rank writes the
    overlays of the global worst cases it holds.

    Args:
        output_dir: the report folder.
        output_transform: maps one decollated output item (a dict) to ``(pred, label)``, ``(1, H, W)`` each:
            the foreground probability map and the binary mask.
        image_key: key of the image (``(C, h, w)``, any size and intensity range) in the output or batch item,
            the overlay's background; ``None`` draws on black.
        dataset_key: key of the dataset name in the batch or output item (for example a datalist field); items
            without it belong to ``default_dataset``.
        default_dataset: the dataset name of items without ``dataset_key``; ``None`` names them after their dataset
            folder (see above).
        worst_k: overlays per dataset; 0 writes none.
        threshold: binarisation of Dice, IoU, precision, recall and of the predicted contour (``pred > threshold``).
        spatial_layout: layout of ``pred`` and ``label``: ``"HW"`` when their spatial axes are rows then columns
            (this project's pipeline layout), ``"WH"`` for MONAI's reader and writer layout (a prediction inverted
            to the source's size): the overlays are drawn as the picture is displayed.
        image_layout: layout of the image; ``None``: that of ``pred`` (an image inverted with the prediction).
            ``"HW"`` for this project's network input when the prediction alone is inverted to ``"WH"``.
        contour_width: contour thickness in pixels.
        normalize: ``"minmax"`` stretches each map to span [0, 1] before it is scored and drawn, as ``pysodmetrics``
            and the polyp papers' evaluation do; ``None`` (default) scores it as given, so that the map of a frame
            without a polyp is not stretched into one (see :mod:`monai_ecrm.metrics.functional`).
        html: also write ``report.html``.
        explanation_key: key of an item's :class:`~monai_ecrm.clinical.explain.Explanation` in the output item (kept
            in the item's row as ``"explanation"``, not in the CSV files); ``None`` reads none.
        case_pictures: the memory cases' pictures for the page's thumbnails; ``None``: names and shares only.
        model_file: the model scored: ``report.html`` names it (file, sha256, size, threshold, date of the run).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_transform: Callable[[Mapping[str, Any]], Any] = from_engine(["pred", "label"]),
        image_key: str | None = "image",
        dataset_key: str | None = "dataset",
        default_dataset: str | None = None,
        worst_k: int = 8,
        threshold: float = 0.5,
        spatial_layout: str = "HW",
        contour_width: int = 2,
        image_layout: str | None = None,
        normalize: str | None = None,
        html: bool = False,
        explanation_key: str | None = "explanation",
        case_pictures: CasePictures | None = None,
        model_file: str | os.PathLike | None = None,
    ) -> None:
        image_layout = image_layout or spatial_layout
        for name, layout in (("spatial_layout", spatial_layout), ("image_layout", image_layout)):
            if layout not in ("HW", "WH"):
                raise ValueError(f"{name} must be 'HW' or 'WH', got {layout!r}.")
        self.output_dir = Path(output_dir)
        self.output_transform = output_transform
        self.image_key = image_key
        self.dataset_key = dataset_key
        self.default_dataset = default_dataset
        self.worst_k = worst_k
        self.threshold = threshold
        self.spatial_layout = spatial_layout
        self.contour_width = contour_width
        self.image_layout = image_layout
        self.normalize = _check_normalize(normalize)
        self.html = html
        self.model_file = model_file
        self.explanation_key = explanation_key
        self.case_pictures = case_pictures
        self.rows: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []
        # per dataset, a heap of (-dice, -position in rows, overlay) of the worst cases kept (see _keep_if_worst)
        self._worst: dict[str, list[tuple[float, int, np.ndarray]]] = {}

    def attach(self, engine: Engine) -> None:
        """Registers the report on the evaluator's epoch and iteration events."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forgets the rows and overlays of a previous evaluation."""
        self.rows, self.summary, self._worst = [], [], {}

    def collect(self, engine: Engine) -> None:
        """Scores the images of the current iteration (``engine.state.output``, with ``engine.state.batch``)."""
        outputs, batches = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):
            outputs = decollate_batch(outputs)
        if isinstance(batches, Mapping):
            batches = decollate_batch(batches)
        if not isinstance(batches, list) or len(batches) != len(outputs):
            batches = [{} for _ in outputs]
        for output, batch in zip(outputs, batches):
            self.add(output, batch)

    def add(self, output: Mapping[str, Any], batch: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Scores one item and keeps its overlay if it is among the worst so far.

        Args:
            output: one decollated output item.
            batch: the matching batch item (its file name, dataset and image are used when the output lacks them).

        Returns:
            The item's row.
        """
        batch = batch or {}
        pred, label = (_plain(x) for x in self.output_transform(output))
        if pred.ndim != 3 or pred.shape[0] != 1 or pred.shape != label.shape:
            raise ValueError(
                f"EvaluationReport expects pred and label of shape (1, H, W) each, got {tuple(pred.shape)} and "
                f"{tuple(label.shape)}."
            )
        pred = pred if pred.is_floating_point() else pred.float()
        if self.normalize == "minmax":  # the overlay draws the contour of the map that is scored
            pred = minmax_normalize(pred)
        scores = polyp_metric_suite(pred[None], label[None].to(pred.device), self.threshold, return_curve=True)
        filename = _filename(output, batch, self.image_key, fallback=f"item_{len(self.rows)}")
        dataset = self._dataset(output, batch, filename)
        height, width = pred.shape[1:] if self.spatial_layout == "HW" else (pred.shape[2], pred.shape[1])
        row: dict[str, Any] = {"dataset": dataset, "filename": filename, "height": height, "width": width}
        row.update({name: float(scores[name][0]) for name in SUITE_KEYS})
        row["e_measure_curve"] = scores["e_measure_curve"][0].cpu().numpy()  # for the dataset's max E-phi
        row.update(foreground_counts(pred, label, self.threshold))  # polyp-free frames, counted apart
        if self.explanation_key and output.get(self.explanation_key) is not None:
            row["explanation"] = output[self.explanation_key]
        self.rows.append(row)
        if self.worst_k > 0:
            self._keep_if_worst(row, len(self.rows) - 1, pred, label, self._image(output, batch))
        return row

    def __call__(self, engine: Engine | None = None) -> None:
        """Gathers the rows of all ranks and writes the tables, the overlays and the page."""
        parts = _gather(self.rows)
        rows = [row for part in parts for row in part]
        self.summary = summarize(rows)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0 and rows:
            write_tables(rows, self.output_dir)
        if self.worst_k > 0:
            self._write_overlays(rows, offset=sum(len(part) for part in parts[:rank]))
        if rank == 0 and rows and self.html:
            self._write_page(rows, getattr(getattr(engine, "state", None), "explain_problem", None))

    def _dataset(self, output: Mapping[str, Any], batch: Mapping[str, Any], filename: str) -> str:
        for item in (batch, output):
            if self.dataset_key and self.dataset_key in item:
                value = item[self.dataset_key]
                return str(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        if self.default_dataset is not None:
            return self.default_dataset
        return _dataset_folder(filename) or "dataset"

    def _image(self, output: Mapping[str, Any], batch: Mapping[str, Any]) -> torch.Tensor | None:
        for item in (output, batch):
            if self.image_key and isinstance(item.get(self.image_key), torch.Tensor):
                return _plain(item[self.image_key])
        return None

    def _keep_if_worst(
        self,
        row: Mapping[str, Any],
        position: int,
        pred: torch.Tensor,
        label: torch.Tensor,
        image: torch.Tensor | None,
    ) -> None:
        # Worse means a lower Dice, or the same Dice and seen earlier: the order _write_overlays ranks by. The heap
        # has the least bad kept item on top (highest Dice, last seen among equals), the one a worse item replaces.
        kept = self._worst.setdefault(row["dataset"], [])
        key = (-row["dice"], -position)
        if len(kept) >= self.worst_k and key <= kept[0][:2]:
            return
        overlay = render_overlay(
            image,
            pred,
            label,
            self.threshold,
            self.spatial_layout,
            self.contour_width,
            _caption(row),
            self.image_layout,
        )
        entry = (*key, overlay)
        if len(kept) < self.worst_k:
            heapq.heappush(kept, entry)
        else:
            heapq.heapreplace(kept, entry)

    def _write_overlays(self, rows: list[dict[str, Any]], offset: int) -> None:
        """Writes the overlays this rank kept that are among the worst of all ranks' ``rows``, in which this rank's
        rows start at ``offset``."""
        ranked = self._ranked(rows)
        for dataset, kept in self._worst.items():
            names = dict(ranked.get(dataset, []))
            folder = self.output_dir / "overlays" / _safe(dataset)
            folder.mkdir(parents=True, exist_ok=True)
            # overlays of an earlier evaluation that are no longer among the worst; every rank computes the same names
            for stale in folder.glob("[0-9][0-9]_dice*.png"):
                if stale.name not in names.values():
                    stale.unlink(missing_ok=True)
            for _, negative_position, overlay in kept:
                name = names.get(offset - negative_position)
                if name is not None:
                    Image.fromarray(overlay).save(folder / name)

    def _ranked(self, rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, str]]]:
        """Per dataset, its ``worst_k`` worst rows, worst first: ``(index in rows, overlay file name)``."""
        by_dataset: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            by_dataset.setdefault(row["dataset"], []).append(index)
        ranked = {}
        for dataset, indices in by_dataset.items():
            # a stable sort: equal Dice in the order seen, as _keep_if_worst keeps them
            worst = sorted(indices, key=lambda index: rows[index]["dice"])[: self.worst_k]
            ranked[dataset] = [
                (index, f"{place:02d}_dice{rows[index]['dice']:.3f}_{_safe(Path(rows[index]['filename']).stem)}.png")
                for place, index in enumerate(worst, start=1)
            ]
        return ranked

    def _write_page(self, rows: list[dict[str, Any]], explain_problem: str | None) -> None:
        """Writes ``report.html`` from all ranks' ``rows`` (after the overlays)."""
        worst = {}
        for dataset, ranked in self._ranked(rows).items():
            cases = []
            for place, (index, name) in enumerate(ranked, start=1):
                overlay = f"overlays/{_safe(dataset)}/{name}"
                row = rows[index]
                cases.append(
                    {
                        "place": place,
                        "filename": row["filename"],
                        "dice": row["dice"],
                        "iou": row["iou"],
                        "overlay": overlay if (self.output_dir / overlay).is_file() else None,
                        "explanation": row.get("explanation"),
                    }
                )
            worst[dataset] = cases
        note = explain_problem or "no MemoryExplanationHandler explained the images (the bundle's explain is 0)"
        model = None
        if self.model_file is not None and Path(self.model_file).is_file():
            model = model_identity(self.model_file, self.threshold)
        write_report_page(self.output_dir, self.summary, worst, note, self.case_pictures, model=model)


def render_overlay(
    image: torch.Tensor | None,
    pred: torch.Tensor,
    label: torch.Tensor,
    threshold: float = 0.5,
    spatial_layout: str = "HW",
    contour_width: int = 2,
    caption: str = "",
    image_layout: str | None = None,
) -> np.ndarray:
    """Draws the ground-truth contour (green) and the predicted contour (magenta) on the image, upright.

    Args:
        image: ``(C, h, w)`` (1 or 3 channels used, any size: resized to the prediction's, any intensity range:
            min-max scaled), or ``None`` for a black background.
        pred: ``(1, H, W)`` foreground probabilities; the contour is that of ``pred > threshold``.
        label: ``(1, H, W)`` binary mask.
        threshold: binarisation of the prediction.
        spatial_layout: layout of ``pred`` and ``label``: ``"HW"`` (rows first) or ``"WH"`` (MONAI's reader
            layout), see :class:`EvaluationReport`.
        contour_width: contour thickness in pixels.
        caption: text written on a strip below the image; none when empty.
        image_layout: layout of ``image``, ``"HW"`` or ``"WH"``; ``None``: ``spatial_layout``.

    Returns:
        An RGB ``uint8`` array ``(rows, columns, 3)`` (with the caption strip below when given).
    """
    pred, label = (_upright(x.detach().float().cpu(), spatial_layout) for x in (pred, label))
    height, width = pred.shape[1:]
    if image is None:
        background = torch.zeros((3, height, width))
    else:
        background = _upright(torch.as_tensor(image).detach().float().cpu(), image_layout or spatial_layout)
        background = background[:3] if background.shape[0] >= 3 else background[:1].expand(3, -1, -1)
        if background.shape[1:] != pred.shape[1:]:
            background = torch.nn.functional.interpolate(
                background[None], size=(height, width), mode="bilinear", align_corners=False
            )[0]
        low, high = background.amin(), background.amax()
        background = (background - low) / (high - low) if high > low else torch.zeros_like(background)
    canvas = (background * 255).round().to(torch.uint8)
    for mask, colour in ((label > 0.5, GT_COLOUR), (pred > threshold, PRED_COLOUR)):
        edge = _contour(mask[0], contour_width)
        canvas[:, edge] = torch.tensor(colour, dtype=torch.uint8).view(3, 1)
    picture = np.ascontiguousarray(canvas.permute(1, 2, 0).numpy())
    if not caption:
        return picture
    strip = Image.new("RGB", (picture.shape[1], 14), (0, 0, 0))
    ImageDraw.Draw(strip).text((2, 1), caption, fill=(255, 255, 255))
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def _upright(data: torch.Tensor, layout: str) -> torch.Tensor:
    """``(C, H, W)`` rows first, from either layout."""
    if layout not in ("HW", "WH"):
        raise ValueError(f"a spatial layout is 'HW' or 'WH', got {layout!r}.")
    return data if layout == "HW" else data.transpose(1, 2)


def _contour(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels of ``mask`` within ``width`` of its border (the image border counts as outside)."""
    outside = torch.nn.functional.pad((~mask).float()[None, None], (width,) * 4, value=1.0)
    near_outside = torch.nn.functional.max_pool2d(outside, 2 * width + 1, stride=1)[0, 0] > 0
    return mask & near_outside


def _plain(data: Any) -> torch.Tensor:
    """A plain tensor (a MetaTensor's metadata tracking makes every operation slower)."""
    return data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)


def _caption(row: Mapping[str, Any]) -> str:
    return f"Dice {row['dice']:.3f}  IoU {row['iou']:.3f}  green: ground truth  magenta: prediction"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


def _filename(output: Mapping[str, Any], batch: Mapping[str, Any], image_key: str | None, fallback: str) -> str:
    """The source file of an item: ``filename_or_obj`` of a MetaTensor's meta or of a ``<key>_meta_dict``."""
    keys = [key for key in (image_key, "pred", "label") if key]
    for item in (output, batch):
        for key in keys:
            for meta in (getattr(item.get(key), "meta", None), item.get(f"{key}_meta_dict")):
                if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
                    return str(meta["filename_or_obj"])
    return fallback


def _dataset_folder(filename: str) -> str:
    """The name of the dataset folder of an image file: the folder above its images folder, else its folder."""
    folder = Path(filename).parent
    if folder.name.lower() in IMAGE_FOLDER_NAMES:
        folder = folder.parent
    return folder.name


def _gather(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows of every rank, rank by rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(rows)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return gathered
