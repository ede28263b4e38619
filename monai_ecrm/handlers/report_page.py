"""``report.html``: the evaluation report as one static page that opens from disk, no server and nothing embedded.

:class:`~monai_ecrm.handlers.EvaluationReport` (``html=True``) writes it beside its tables: the summary table per
dataset, then per dataset the worst cases, each with its overlay (a relative ``<img src>`` to ``overlays/...``) and,
when the evaluator explained its images (:class:`~monai_ecrm.handlers.MemoryExplanationHandler`), the ECRM memory
cases it drew on most with their shares. The memory cases' pictures are read on this machine (the training folder the
model record names) and written as small PNG files in ``memory_cases/`` next to the page: the page links them, it
never embeds them, and a case whose picture is not here is shown by its name alone. Every name is HTML-escaped.
"""

from __future__ import annotations

import datetime
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from monai_ecrm.explanations import CasePictures, Explanation
from monai_ecrm.metrics.evaluation import TABLE_HEADERS

__all__ = ["MEMORY_CASES_DIR", "REPORT_PAGE", "model_identity", "model_identity_html", "write_report_page"]

REPORT_PAGE = "report.html"
MEMORY_CASES_DIR = "memory_cases"
"""The folder of the memory cases' thumbnails, next to the page (rewritten with the page)."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 24px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f0f0f0; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img.overlay { max-width: 320px; display: block; }
ol.cases { margin: 0; padding: 0; list-style: none; display: flex; flex-wrap: wrap; gap: 8px; }
ol.cases li { width: 128px; }
img.case { max-width: 128px; max-height: 128px; display: block; margin-bottom: 2px; }
.name { font-family: monospace; font-size: 90%; word-break: break-all; }
.note { background: #fff6d5; border: 1px solid #e6d48a; padding: 6px 10px; max-width: 900px; }
"""


def model_identity(
    path: str | os.PathLike, threshold: float | str | None = None, when: datetime.datetime | None = None
) -> dict[str, Any]:
    """What names a model file in a report: ``file`` (its name), ``sha256`` (of the file, hex), ``bytes`` (its size),
    ``threshold`` (the operating point used) and ``date`` (of the run, ISO 8601, local time with its offset).

    Args:
        path: the model file (``models/model.pt``, ``model.ts``, ``model.onnx``).
        threshold: the mask threshold the run used.
        when: the date of the run (now when not given).
    """
    from monai_ecrm.record import file_sha256

    path = Path(path)
    when = when or datetime.datetime.now().astimezone()
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "threshold": threshold,
        "date": when.isoformat(timespec="seconds"),
    }


def model_identity_html(identity: Mapping[str, Any]) -> str:
    """A model's :func:`model_identity` as an HTML table (every value escaped), for a report page.

    Args:
        identity: what :func:`model_identity` returns.
    """
    labels = {"file": "Model file", "sha256": "SHA-256", "bytes": "Size (bytes)", "threshold": "Threshold",
              "date": "Date of the run"}  # fmt: skip
    rows = []
    for key, label in labels.items():
        value = identity.get(key)
        shown = "n/a" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        rows.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(shown)}</td></tr>")
    return '<table class="model">\n' + "\n".join(rows) + "\n</table>"


def write_report_page(
    output_dir: str | os.PathLike,
    summary: Sequence[Mapping[str, Any]],
    worst: Mapping[str, Sequence[Mapping[str, Any]]],
    memory_note: str | None = None,
    pictures: CasePictures | None = None,
    thumbnail: int = 128,
    digits: int = 3,
    model: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``report.html`` (and the memory cases' thumbnails) in ``output_dir``; returns the page's path.

    Args:
        output_dir: the report folder (the overlays' paths are relative to it).
        summary: the per-dataset rows (:func:`~monai_ecrm.metrics.evaluation.summarize`).
        worst: per dataset, its worst cases, worst first, each a mapping: ``place`` (1 = worst), ``filename``, ``dice``,
            ``iou``, ``overlay`` (the overlay's path relative to ``output_dir``, ``None`` when none was written) and
            ``explanation`` (an :class:`~monai_ecrm.clinical.explain.Explanation`, or ``None``).
        memory_note: why the worst cases have no memory cases, when none has an explanation.
        pictures: the memory cases' pictures; ``None``: names and shares only.
        thumbnail: the thumbnails' longest side in pixels.
        digits: decimals of the scores.
        model: the model scored (:func:`model_identity`: file, sha256, size, threshold, date), shown under the title.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    explained = any(case.get("explanation") is not None for cases in worst.values() for case in cases)
    thumbnails = _write_thumbnails(output_dir, worst, pictures, thumbnail) if explained else {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Evaluation report</h1>",
        *(["<h2>Model</h2>", model_identity_html(model)] if model else []),
        "<p>Scores at each image's original size. Tables: "
        + ", ".join(f'<a href="{name}">{name}</a>' for name in ("summary.csv", "summary.md", "per_image.csv"))
        + ".</p>",
        "<h2>Summary</h2>",
        _summary_table(summary, digits),
        *_polyp_free_table(summary, digits),
        "<h2>Worst cases</h2>",
        "<p>The lowest Dice of each dataset, worst first. Overlay contours: green the ground truth, magenta the "
        "prediction.</p>",
    ]
    if explained:
        parts.append(
            '<p class="note">Memory cases (experimental): the training cases whose ECRM memory slots the image '
            "attended to most over its predicted polyp, with their share of that attention. They say which kind of "
            "prototype the prediction leaned on more than which case.</p>"
        )
    else:
        note = memory_note or "the evaluation did not explain its images"
        parts.append(f'<p class="note">No memory cases shown: {html.escape(note)}.</p>')
    for dataset, cases in worst.items():
        parts.append(f"<h3>{html.escape(dataset)}</h3>")
        parts.append(_worst_table(dataset, cases, explained, thumbnails, digits))
    parts.append("</body></html>")
    page = output_dir / REPORT_PAGE
    partial = page.with_name(f".{REPORT_PAGE}.partial")
    partial.write_text("\n".join(parts) + "\n", encoding="utf-8")
    os.replace(partial, page)
    return page


def _number(value: Any, digits: int) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _summary_table(summary: Sequence[Mapping[str, Any]], digits: int) -> str:
    header = "".join(f"<th>{html.escape(name)}</th>" for name in ("Dataset", "Images", *TABLE_HEADERS.values()))
    rows = []
    for row in summary:
        cells = [f"<td>{html.escape(str(row['dataset']))}</td>", f'<td class="number">{int(row["images"])}</td>']
        cells += [f'<td class="number">{_number(row[key], digits)}</td>' for key in TABLE_HEADERS]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = "\n".join(rows)
    return f'<table class="summary"><thead><tr>{header}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _polyp_free_table(summary: Sequence[Mapping[str, Any]], digits: int) -> list[str]:
    free = [row for row in summary if row.get("polyp_free_images")]
    if not free:
        return []
    rows = "".join(
        f'<tr><td>{html.escape(str(row["dataset"]))}</td><td class="number">{int(row["polyp_free_images"])}</td>'
        f'<td class="number">{_number(row["polyp_free_false_positive_rate"], digits)}</td></tr>'
        for row in free
    )
    return [
        "<p>Frames without a polyp (Dice 0 whatever the prediction, so counted apart): share with a false "
        "positive.</p>",
        '<table class="polyp-free"><thead><tr><th>Dataset</th><th>Polyp-free frames</th>'
        f"<th>With a false positive</th></tr></thead><tbody>{rows}</tbody></table>",
    ]


def _worst_table(
    dataset: str, cases: Sequence[Mapping[str, Any]], explained: bool, thumbnails: Mapping[str, str], digits: int
) -> str:
    header = ["#", "Overlay", "Image", "Dice", "IoU", *(["Memory cases it drew on (share)"] if explained else [])]
    rows = []
    for case in cases:
        name = Path(str(case["filename"])).name
        overlay = case.get("overlay")
        picture = (
            f'<img class="overlay" src="{_href(overlay)}" alt="overlay of {html.escape(name, quote=True)}">'
            if overlay
            else "(not written)"
        )
        cells = [
            f'<td class="number">{int(case["place"])}</td>',
            f"<td>{picture}</td>",
            f'<td><span class="name" title="{html.escape(str(case["filename"]), quote=True)}">'
            f"{html.escape(name)}</span></td>",
            f'<td class="number">{_number(case["dice"], digits)}</td>',
            f'<td class="number">{_number(case["iou"], digits)}</td>',
        ]
        if explained:
            cells.append(f"<td>{_cases_list(case.get('explanation'), thumbnails)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(text)}</th>" for text in header)
    body = "\n".join(rows)
    return (
        f'<table class="worst" data-dataset="{html.escape(dataset, quote=True)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table>"
    )


def _cases_list(explanation: Explanation | None, thumbnails: Mapping[str, str]) -> str:
    if explanation is None:
        return "(not explained)"
    items = []
    for rank, case in enumerate(explanation.cases, start=1):
        source = thumbnails.get(case.name) if case.name else None
        picture = (
            f'<img class="case" src="{_href(source)}" alt="{html.escape(case.label, quote=True)}">'
            if source
            else '<span class="missing">(picture not found)</span><br>'
        )
        items.append(
            f'<li>{picture}{rank}. <span class="name">{html.escape(case.label)}</span><br>'
            f'share <span class="share">{case.share:.3f}</span></li>'
        )
    return f'<ol class="cases">{"".join(items)}</ol>'


def _href(relative: str) -> str:
    """A relative path as a URL (``%``-quoted, ``/`` kept), safe in a double-quoted attribute."""
    return html.escape(quote(relative.replace(os.sep, "/")), quote=True)


def _write_thumbnails(
    output_dir: Path,
    worst: Mapping[str, Sequence[Mapping[str, Any]]],
    pictures: CasePictures | None,
    size: int,
) -> dict[str, str]:
    """The thumbnails of the memory cases shown (each once), ``{case name: path relative to the page}``; earlier
    thumbnails are removed."""
    folder = output_dir / MEMORY_CASES_DIR
    if folder.is_dir():
        for stale in folder.glob("*.png"):
            stale.unlink(missing_ok=True)
    if pictures is None:
        return {}
    names = []
    for cases in worst.values():
        for case in cases:
            explanation = case.get("explanation")
            for memory_case in explanation.cases if explanation is not None else ():
                if memory_case.name and memory_case.name not in names:
                    names.append(memory_case.name)
    written = {}
    for index, name in enumerate(names):
        picture = pictures.thumbnail(name)
        if picture is None:
            continue
        small = picture.copy()
        small.thumbnail((size, size), Image.Resampling.BILINEAR)
        folder.mkdir(parents=True, exist_ok=True)
        file_name = f"{index:03d}.png"  # the page names the case
        small.save(folder / file_name, format="PNG")
        written[name] = f"{MEMORY_CASES_DIR}/{file_name}"
    return written
