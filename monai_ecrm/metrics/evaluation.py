"""Evaluation outside an engine, and the tables of an evaluation: per-image rows, per-dataset summaries, files.

``evaluate_folder`` scores a folder of saved prediction maps against a folder of masks, the way PraNet's and the
later polyp papers' evaluation reads them (8-bit maps divided by 255 and min-max normalised, masks above 128);
``score_pair`` scores one pair, as given unless ``normalize="minmax"``; ``summarize`` and ``write_tables`` turn
per-image rows into the per-dataset table the papers print. The evaluation report handler writes its files with the
same functions.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from monai_ecrm.metrics.functional import SUITE_KEYS, _check_normalize, _pair_tensors, polyp_metric_suite

__all__ = [
    "IMAGE_SUFFIXES",
    "POLYP_FREE_FIELDS",
    "ROW_FIELDS",
    "foreground_counts",
    "TABLE_HEADERS",
    "evaluate_folder",
    "read_grey",
    "score_pair",
    "summarize",
    "markdown_table",
    "write_tables",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# column headers of the polyp papers' tables (PraNet, DCRNet, Polyp-PVT), in their order
TABLE_HEADERS = {
    "dice": "mDice",
    "iou": "mIoU",
    "weighted_f_measure": "F^w_beta",
    "s_measure": "S_alpha",
    "e_measure_mean": "mean E_phi",
    "e_measure_max": "max E_phi",
    "e_measure_adaptive": "adp E_phi",
    "mae": "MAE",
    "precision": "Precision",
    "recall": "Recall",
}
ROW_FIELDS = ("dataset", "filename", "height", "width", *SUITE_KEYS, "gt_pixels", "pred_pixels")
#: summary columns about frames without a polyp (their Dice is 0 by the papers' convention whatever the prediction,
#: so a false positive on them is invisible in the mean Dice: it is reported here)
POLYP_FREE_FIELDS = ("polyp_free_images", "polyp_free_false_positive_rate")


def foreground_counts(pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.5) -> dict[str, int]:
    """``{"gt_pixels", "pred_pixels"}``: foreground pixels of the mask (``> 0.5``) and of the prediction
    (``> threshold``), for the polyp-free rows of :func:`summarize`."""
    return {"gt_pixels": int((gt > 0.5).sum()), "pred_pixels": int((pred > threshold).sum())}


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as one ``uint8`` grey channel (``(H, W)``, rows first).

    Pillow reads PNG, JPEG, BMP and most TIFFs (RGB converted to luma; masks have three equal channels); TIFFs
    Pillow cannot open (CVC-ClinicDB's 3-sample BlackIsZero files) are read with ``tifffile``, first channel.

    Args:
        path: the image file.

    Raises:
        ValueError: naming the file, when it cannot be read or is not 8-bit.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("1", "L", "P", "RGB", "RGBA", "LA"):
                raise ValueError(f"{path}: expected an 8-bit image, got Pillow mode {image.mode!r}.")
            return np.asarray(image.convert("L"))
    except (OSError, SyntaxError) as error:
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise ValueError(f"{path}: cannot read the image ({error}).") from error
    try:
        import tifffile

        array = np.asarray(tifffile.imread(path))
    except Exception as error:  # tifffile raises several types for bad files
        raise ValueError(f"{path}: cannot read the image ({error}).") from error
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {array.dtype}.")
    return array


def _mask(grey: np.ndarray) -> np.ndarray:
    """Foreground above 128 of 255 (JPEG masks carry noise); a mask holding only 0 and 1 is taken as it is."""
    return grey > 0 if grey.max() <= 1 else grey > 128


def _images_by_stem(folder: Path, suffix: str = "") -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            stem = path.stem[: len(path.stem) - len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
            files.setdefault(stem, path)
    return files


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    threshold: float = 0.5,
    normalize: str | None = "minmax",
    pred_suffix: str = "",
    strict: bool = True,
) -> dict[str, Any]:
    """Scores every mask of ``gt_dir`` against the prediction map of the same name in ``pred_dir``.

    Args:
        pred_dir: folder of 8-bit prediction maps (PNG, JPEG, BMP, TIFF), named like the masks (any extension).
        gt_dir: folder of masks.
        output_dir: where to write ``per_image.csv``, ``summary.csv`` and ``summary.md``; ``None`` writes nothing.
        dataset: the dataset's name in the tables; the name of ``gt_dir`` (or of its parent when it is called
            ``masks``) by default.
        threshold: binarisation of Dice, IoU, precision and recall (``map > threshold``).
        normalize: ``"minmax"`` (the default here: this function reproduces the papers' evaluation of saved maps)
            stretches each map to span [0, 1], as the reference evaluation does (MATLAB's
            ``mapminmax(im2double(...))``; PraNet's test scripts save normalised maps, so this changes nothing for
            them); ``None`` scores the maps as saved.
        pred_suffix: a suffix the prediction names carry after the mask's name (``"_seg"`` for ``x_seg.png``).
        strict: raise when any mask has no readable prediction of its size; otherwise skip those, with a warning.

    Returns:
        ``{"per_image": rows, "summary": rows, "errors": messages}``: one row per scored pair (see ``ROW_FIELDS``),
        one summary row per dataset (``summarize``), one message per skipped file.

    Raises:
        ValueError: listing every missing, unreadable or mismatched file, when ``strict``; or when ``gt_dir`` holds
            no mask.
    """
    _check_normalize(normalize)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder.")
    masks = _images_by_stem(gt_dir)
    if not masks:
        raise ValueError(f"{gt_dir}: no mask images ({', '.join(IMAGE_SUFFIXES)}).")
    preds = _images_by_stem(pred_dir, pred_suffix)
    name = dataset or (gt_dir.parent.name if gt_dir.name.lower() in ("masks", "mask", "gt") else gt_dir.name)
    rows, errors = [], []
    for stem, mask_path in masks.items():
        if stem not in preds:
            errors.append(f"{mask_path}: no prediction named {stem}{pred_suffix}.* in {pred_dir}.")
            continue
        try:
            gt, grey = _mask(read_grey(mask_path)), read_grey(preds[stem])
        except ValueError as error:
            errors.append(str(error))
            continue
        if grey.shape != gt.shape:
            errors.append(f"{preds[stem]}: size {grey.shape} differs from the mask's {gt.shape} ({mask_path}).")
            continue
        rows.append({"dataset": name, "filename": str(mask_path), "height": gt.shape[0], "width": gt.shape[1]})
        rows[-1].update(score_pair(grey, gt, threshold, normalize))
    if errors and strict:
        raise ValueError(f"{len(errors)} of {len(masks)} masks cannot be scored:\n" + "\n".join(errors))
    for message in errors:
        warnings.warn(message, stacklevel=2)
    summary = summarize(rows)
    if output_dir is not None:
        write_tables(rows, output_dir)
    return {"per_image": rows, "summary": summary, "errors": errors}


def score_pair(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    threshold: float = 0.5,
    normalize: str | None = None,
) -> dict:
    """The suite of one pair as a row: the scores of ``SUITE_KEYS`` (floats) and ``"e_measure_curve"`` (the
    image's E-phi over the 256 thresholds, a numpy array, for ``summarize``).

    Args:
        pred: ``(H, W)`` or ``(1, H, W)`` foreground probabilities in [0, 1] (``uint8``: divided by 255).
        gt: the mask, same shape (see :func:`~monai_ecrm.metrics.compute_polyp_metrics`).
        threshold: binarisation of Dice, IoU, precision and recall.
        normalize: ``"minmax"`` stretches the map to span [0, 1] first, as ``pysodmetrics`` and the polyp papers'
            evaluation do; ``None`` (default) scores it as given, so that the map of a frame without a polyp is not
            stretched into one (see :mod:`monai_ecrm.metrics.functional`).
    """
    pred_map, gt_map = _pair_tensors(pred, gt)
    scores = polyp_metric_suite(pred_map, gt_map, threshold=threshold, return_curve=True, normalize=normalize)
    row: dict[str, Any] = {name: float(scores[name][0]) for name in SUITE_KEYS}
    row["e_measure_curve"] = scores["e_measure_curve"][0].cpu().numpy()
    if normalize == "minmax":
        from monai_ecrm.metrics.functional import minmax_normalize

        pred_map = minmax_normalize(pred_map)
    row.update(foreground_counts(pred_map, gt_map, threshold))
    return row


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Means per dataset of the per-image scores: the table the polyp papers print.

    Max E-phi is, as in the reference and the papers, the maximum over the thresholds of the E-phi curve averaged
    over the dataset's images, when every row carries its ``"e_measure_curve"`` (``score_pair``, the evaluation
    report); rows without curves (read back from a CSV file) give the mean of the images' maxima instead, which
    is larger.

    Args:
        rows: per-image rows with a ``"dataset"`` entry and the scores of ``SUITE_KEYS``.

    Polyp-free frames (rows whose ``gt_pixels`` is 0): every one scores Dice 0 by the papers' convention (as in
    ``pysodmetrics``), whether the prediction is empty or not, so they are also counted apart:
    ``polyp_free_images`` and ``polyp_free_false_positive_rate``, the share of them with any predicted foreground
    (1 - specificity at the frame level; NaN when there is none, or when the rows carry no pixel counts).

    Returns:
        One row per dataset, in order of first appearance, ``{"dataset", "images", <score means>,
        "polyp_free_images", "polyp_free_false_positive_rate"}``, and an ``"overall"`` row (over all images) when
        there are several datasets. NaN scores are left out of a mean.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["dataset"]), []).append(row)
    if len(groups) > 1:
        groups["overall"] = [row for group in list(groups.values()) for row in group]
    summary = []
    for name, group in groups.items():
        entry: dict[str, Any] = {"dataset": name, "images": len(group)}
        for key in SUITE_KEYS:
            values = [float(row[key]) for row in group if key in row and not math.isnan(float(row[key]))]
            entry[key] = float(np.mean(values)) if values else float("nan")
        curves = [row["e_measure_curve"] for row in group if row.get("e_measure_curve") is not None]
        if curves and len(curves) == len(group):
            entry["e_measure_max"] = float(np.mean(curves, axis=0).max())
        counted = [row for row in group if _known(row.get("gt_pixels")) and _known(row.get("pred_pixels"))]
        free = [row for row in counted if int(float(row["gt_pixels"])) == 0]
        entry["polyp_free_images"] = len(free)
        entry["polyp_free_false_positive_rate"] = (
            float(np.mean([int(float(row["pred_pixels"])) > 0 for row in free])) if free else float("nan")
        )
        summary.append(entry)
    return summary


def _known(value: Any) -> bool:
    try:
        return value is not None and value != "" and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def markdown_table(summary: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """The summary as a Markdown table with the papers' column names.

    Args:
        summary: rows from ``summarize``.
        digits: decimals of the scores.
    """
    header = ["Dataset", "Images", *TABLE_HEADERS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in summary:
        cells = [str(row["dataset"]), str(row["images"])] + [f"{row[key]:.{digits}f}" for key in TABLE_HEADERS]
        lines.append("| " + " | ".join(cells) + " |")
    free = [row for row in summary if row.get("polyp_free_images")]
    if free:
        lines += [
            "",
            "Frames without a polyp (Dice 0 whatever the prediction, so counted apart): share with a false positive.",
            "",
            "| Dataset | Polyp-free frames | With a false positive |",
            "|---|---:|---:|",
        ]
        for row in free:
            rate = row["polyp_free_false_positive_rate"]
            lines.append(f"| {row['dataset']} | {row['polyp_free_images']} | {rate:.{digits}f} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``per_image.csv`` (one row per image), ``summary.csv`` and ``summary.md`` (one row per dataset).

    Args:
        rows: per-image rows (``ROW_FIELDS``).
        output_dir: the folder, created when missing.

    Returns:
        The paths written, by kind: ``per_image``, ``summary_csv``, ``summary_md``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "per_image": output_dir / "per_image.csv",
        "summary_csv": output_dir / "summary.csv",
        "summary_md": output_dir / "summary.md",
    }
    summary = summarize(rows)
    with open(paths["per_image"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["summary_csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("dataset", "images", *SUITE_KEYS, *POLYP_FREE_FIELDS))
        writer.writeheader()
        writer.writerows(summary)
    paths["summary_md"].write_text(markdown_table(summary))
    return paths
