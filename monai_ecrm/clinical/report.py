"""What happened to each input of a job, and the output folder's ``report.csv``.

The report has the columns ``input, status, outputs, detail`` (outputs separated by ``;``), then the model that made
the outputs (:data:`MODEL_COLUMNS`: its file and a short SHA-256 of it) where the job names it, then any columns a model
runner adds (:attr:`~monai_ecrm.clinical.runner.FrameOutput.columns`), in the order they first appear.

The report is the output folder's record of which input and which model made each output: :func:`write_report`
merges a job's rows into the report already there (the rows of inputs the job did not touch are kept, with their own
model columns), and :class:`OutputRecords` reads it back, so that a rerun skips an output only when this report (or,
for a DICOM SEG, the SEG itself) says the same model made it for the same input (see
:class:`~monai_ecrm.clinical.job.ClinicalInference`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from monai_ecrm.data.errors import DataError

__all__ = [
    "DONE_STATUSES",
    "MODEL_COLUMNS",
    "REPORT_COLUMNS",
    "REPORT_NAME",
    "InputResult",
    "OutputRecords",
    "describe_problem",
    "read_report",
    "same_model",
    "write_report",
]

REPORT_NAME = "report.csv"
"""File name of the report in the output folder."""

REPORT_COLUMNS = ("input", "status", "outputs", "detail")
"""The columns every report has."""

MODEL_COLUMNS = ("model", "model_sha256")
"""The columns naming the model of a job: its file, and the first 12 hex digits of the file's SHA-256."""

DONE_STATUSES = ("written", "skipped-existing")
"""The statuses of a row whose outputs are complete (``partial`` and ``failed`` rows may list some outputs)."""


@dataclass
class InputResult:
    """What happened to one input file.

    Args:
        input: the input file.
        status: ``"written"``, ``"skipped-existing"`` (its outputs exist, made by the same model for this input),
            ``"skipped"`` (no image: a structured report, a presentation state, a file of another kind), ``"partial"``
            (some frames could not be decoded; the others were written, a SEG under a ``.partial`` name) or
            ``"failed"``.
        outputs: the files written (or found) for it.
        detail: why it was skipped or failed; for a ``written`` input whose outputs replaced files made by another
            model, for another input, incomplete or of unknown origin, what was replaced (``replaced-other-model:
            ...``, ``replaced-other-input: ...``, ``replaced-partial: ...``, ``replaced-unknown-origin: ...``).
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


def _key(path: str | os.PathLike) -> str:
    """How report paths are compared: absolute (relative paths are taken from the current folder), case as the file
    system has it."""
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def same_model(first: str | None, second: str | None) -> bool:
    """Whether two SHA-256 digests (hex, full or the report's first 12 digits) name the same model file; an empty or
    missing digest names no model."""
    first, second = (first or "").strip().lower(), (second or "").strip().lower()
    if len(first) < 12 or len(second) < 12:
        return False
    return first.startswith(second) or second.startswith(first)


def read_report(path: str | os.PathLike) -> list[InputResult]:
    """The rows of an existing report, each as an :class:`InputResult` whose ``columns`` hold every column but
    :data:`REPORT_COLUMNS` (the model's included); none when there is no report or it is not one (no ``input`` and
    ``status`` columns, or unreadable).

    Args:
        path: the report file.
    """
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if not reader.fieldnames or not {"input", "status"} <= set(reader.fieldnames):
                return []
            rows = []
            for row in reader:
                outputs = [output for output in (row.get("outputs") or "").split(";") if output]
                columns = {
                    name: value or "" for name, value in row.items() if name not in REPORT_COLUMNS and name is not None
                }
                result = InputResult(row["input"] or "", row["status"] or "", outputs, row.get("detail") or "", columns)
                rows.append(result)
            return rows
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


class OutputRecords:
    """Which input, with which model, made each output listed in an output folder's report: what a rerun checks before
    it takes an existing output for done.

    Args:
        rows: the report's rows (:func:`read_report`).
    """

    def __init__(self, rows: Sequence[InputResult] = ()) -> None:
        self.rows = list(rows)
        self._by_output: dict[str, InputResult] = {}
        self._by_input: dict[str, InputResult] = {}
        for row in self.rows:
            self._by_input[_key(row.input)] = row
            for output in row.outputs:
                self._by_output[_key(output)] = row

    @classmethod
    def read(cls, output_dir: str | os.PathLike) -> OutputRecords:
        """The records of ``output_dir/report.csv`` (none when there is no report).

        Args:
            output_dir: the output folder.
        """
        return cls(read_report(Path(output_dir) / REPORT_NAME))

    def of_output(self, output: str | os.PathLike) -> InputResult | None:
        """The row that lists ``output``, if any."""
        return self._by_output.get(_key(output))

    def of_input(self, source: str | os.PathLike) -> InputResult | None:
        """The row of the input ``source``, if any."""
        return self._by_input.get(_key(source))

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        """How paths of the report are compared: absolute (a relative path from the current folder, as the job that
        wrote it was given it), in the file system's case."""
        return _key(path)

    @staticmethod
    def same_input(row: InputResult, source: str | os.PathLike) -> bool:
        """Whether ``row`` is the row of the input ``source``."""
        return _key(row.input) == _key(source)


def _merged(results: Sequence[InputResult], previous: Iterable[InputResult]) -> list[InputResult]:
    """The previous rows a job's results leave standing: those of inputs the job did not touch, less the outputs a
    result of the job now lists (a row left with none of the outputs it had is dropped)."""
    touched = {_key(result.input) for result in results}
    taken = {_key(output) for result in results for output in result.outputs}
    kept = []
    for row in previous:
        if _key(row.input) in touched:
            continue
        outputs = [output for output in row.outputs if _key(output) not in taken]
        if row.outputs and not outputs:
            continue
        kept.append(replace(row, outputs=outputs))
    return kept


def write_report(
    results: Sequence[InputResult],
    path: str | os.PathLike,
    model: Mapping[str, str] | None = None,
    merge: bool = True,
) -> Path:
    """Write the job's report as CSV (columns ``input, status, outputs, detail``, the model's columns and the runner's
    extra columns; outputs separated by ``;``), under a temporary name first.

    With ``merge``, the rows of the report already at ``path`` whose input is not among ``results`` come after the
    job's rows, with their own values (their model is the one that made their outputs, not this job's): a rerun over
    some of the inputs, or an interrupted one, keeps the record of every other output of the folder.

    Args:
        results: what happened to each input.
        path: the report file.
        model: the model that made the outputs of ``results``, by :data:`MODEL_COLUMNS` name (``{"model":
            "/.../model.pt", "model_sha256": "0123456789ab"}``) and any other column with one value for the job
            (the same on each of its rows).
        merge: keep the rows of the existing report that ``results`` do not replace; ``False`` writes ``results``
            alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = dict(model or {})
    kept = _merged(results, read_report(path)) if merge else []
    runner_columns = (name for result in results for name in result.columns if name not in model)
    kept_columns = (name for row in kept for name in row.columns)
    extra = list(dict.fromkeys([*model, *runner_columns, *kept_columns]))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([*REPORT_COLUMNS, *extra])
        for result in results:
            row = [result.input, result.status, ";".join(result.outputs), result.detail]
            writer.writerow(row + [model.get(name, result.columns.get(name, "")) for name in extra])
        for result in kept:
            row = [result.input, result.status, ";".join(result.outputs), result.detail]
            writer.writerow(row + [result.columns.get(name, "") for name in extra])
    os.replace(partial, path)
    return path
