"""What happened to each input of a job, and the job's ``report.csv``.

The report has the columns ``input, status, outputs, detail`` (outputs separated by ``;``), then the model that made
the outputs (:data:`MODEL_COLUMNS`: its file and a short SHA-256 of it, the same on every row) where the job names it,
then any columns a model runner adds (:attr:`~monai_ecrm.clinical.runner.FrameOutput.columns`), in the order they first
appear.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai_ecrm.data.errors import DataError

__all__ = ["MODEL_COLUMNS", "REPORT_COLUMNS", "REPORT_NAME", "InputResult", "describe_problem", "write_report"]

REPORT_NAME = "report.csv"
"""File name of the report in the output folder."""

REPORT_COLUMNS = ("input", "status", "outputs", "detail")
"""The columns every report has."""

MODEL_COLUMNS = ("model", "model_sha256")
"""The columns naming the model of a job: its file, and the first 12 hex digits of the file's SHA-256."""


@dataclass
class InputResult:
    """What happened to one input file.

    Args:
        input: the input file.
        status: ``"written"``, ``"skipped-existing"`` (its outputs exist), ``"skipped"`` (no image: a structured
            report, a presentation state, a file of another kind), ``"partial"`` (some frames could not be decoded;
            the others were written) or ``"failed"``.
        outputs: the files written (or found) for it.
        detail: why it was skipped or failed.
        columns: extra report columns given by the model runner for its frames (values of several frames joined with
            ``;``).
    """

    input: str
    status: str
    outputs: list[str] = field(default_factory=list)
    detail: str = ""
    columns: dict[str, str] = field(default_factory=dict)


def describe_problem(error: Exception) -> str:
    """The problem an error names, for a report's ``detail`` (without the file name a ``DataError`` repeats)."""
    if isinstance(error, DataError) and error.problems:
        return "; ".join(problem for _, problem in error.problems)
    return f"{type(error).__name__}: {error}"


def write_report(
    results: Sequence[InputResult], path: str | os.PathLike, model: Mapping[str, str] | None = None
) -> Path:
    """Write the job's report as CSV (columns ``input, status, outputs, detail``, the model's columns and the runner's
    extra columns; outputs separated by ``;``), under a temporary name first.

    Args:
        results: what happened to each input.
        path: the report file.
        model: the model that made the outputs, by :data:`MODEL_COLUMNS` name (``{"model": "/.../model.pt",
            "model_sha256": "0123456789ab"}``): a column each, the same value on every row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = dict(model or {})
    runner_columns = (name for result in results for name in result.columns if name not in model)
    extra = list(dict.fromkeys([*model, *runner_columns]))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([*REPORT_COLUMNS, *extra])
        for result in results:
            row = [result.input, result.status, ";".join(result.outputs), result.detail]
            writer.writerow(row + [model.get(name, result.columns.get(name, "")) for name in extra])
    os.replace(partial, path)
    return path
