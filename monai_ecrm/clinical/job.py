""":class:`ClinicalInference`: segment input files one by one and say what happened to each.

A job goes through every input and reports each one (:class:`~monai_ecrm.clinical.report.InputResult`: written,
skipped because its outputs exist, skipped because it is no image, failed, or partial when some frames could not be
decoded), so a bad file never stops the rest. Outputs appear under their final names only when complete (a SEG of
some of its source's frames under ``<stem>_seg.partial.dcm``), and a rerun skips the inputs whose outputs are done:
an interrupted job is resumed by running it again. Two inputs never share an output: :meth:`ClinicalInference.run`
names the outputs of all its inputs before it writes anything (:func:`~monai_ecrm.writing.output_stems`, from
each input's own file name), and an input whose outputs another input of the job already has (a frame of a
multi-frame file, ``a_frame0001_seg.png``, and a file ``a_frame0001.png``) fails without writing.

What a rerun takes for done. When the job knows its model (``model_columns``, as the command gives it), an input is
skipped only when each of its outputs exists, is complete, and was made for this input by this model (the same
SHA-256 of the model file): a DICOM SEG says so itself (its algorithm parameters name the model's SHA-256, it
references its source instance, and it has a frame per source frame; :func:`~monai_ecrm.clinical.seg.read_seg_origin`),
every other output through the output folder's ``report.csv`` row that lists it
(:class:`~monai_ecrm.clinical.report.OutputRecords`; the command merges each job's rows into it). Outputs that exist
but were made by another model, for another input, are incomplete, or that no record names, are not skipped: the
input is segmented again, its outputs replaced in one rename each, and its ``detail`` says what was replaced
(``replaced-other-model: a_seg.png made by /models/A.pt (sha256 0123456789ab)``, ``replaced-other-input``,
``replaced-partial``, ``replaced-unknown-origin``). Outputs named as earlier versions named inputs that shared a stem
(``a_png_seg.png``; :func:`~monai_ecrm.writing.legacy_output_stem`) are found through the report row that
lists them, and skipped under the same rule. A job that does not know its model (``model_columns=None``, a Python
caller's network) cannot tell models apart: it skips every input whose outputs all exist, as before.

Each input's header is read once (:class:`~monai_ecrm.clinical.sources.InputFile`); for DICOM it serves the decoding of
the frames and the SEG. While the network runs on a frame, a background thread reads, decodes and pre-processes the next
ones (two ahead, of the same file or the next files; ``prefetch``). The model runner and the writing stay in the calling
thread (but for the explanation pictures' encoding, below), in input order, so outputs, reports and interruption behave
as when each frame is processed in turn. The prefetch thread hands over a stream of events: an
:class:`~monai_ecrm.clinical.report.InputResult` for an input settled before decoding, else a ``_FileJob``, then each
frame's network input (or the ``DataError`` of a frame that cannot be decoded), then a ``_FileEnd``.

With ``case_pictures`` (``--explain K``) every explained frame also gets ``<stem>_explain.png`` beside its mask
(:class:`~monai_ecrm.clinical.explain.ExplanationWriter`), an output of its input like the mask: named, claimed and
checked on a rerun with it. The picture is composed in the calling thread and written (PNG encoding, atomic rename:
most of its cost, and zlib releases the GIL) by one background thread while the network runs on the next frame, at
most ``_WRITES_AHEAD`` pictures waiting; an input is reported once its pictures are in place, a picture that could
not be written fails its input as a mask would, and a job returns (or is interrupted) only when the thread is done.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_ecrm.clinical.explain import CasePictures, ExplanationWriter
from monai_ecrm.clinical.pipeline import clinical_postprocessing, clinical_preprocessing
from monai_ecrm.clinical.prefetch import prefetched
from monai_ecrm.clinical.report import DONE_STATUSES, InputResult, OutputRecords, describe_problem, same_model
from monai_ecrm.clinical.runner import ModelRunner, TorchRunner
from monai_ecrm.clinical.save import SaveDicomSegd
from monai_ecrm.clinical.seg import read_seg_origin
from monai_ecrm.clinical.sources import DicomSource, InputFile, NotAnImageError
from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import picture_format
from monai_ecrm.writing import (
    expected_outputs,
    legacy_output_stem,
    output_stem,
    output_stems,
    prediction_path,
    source_key,
)

__all__ = ["ClinicalInference"]

_INPUT_ERRORS = (DataError, ValueError, RuntimeError, OSError)
"""What reading, decoding, running or writing an input may raise: reported for that input, the job goes on."""
_LISTED = 3
"""Outputs named in a ``replaced-...`` detail; the others are counted."""
_WRITES_AHEAD = 2
"""Explanation pictures composed and not yet written: the calling thread waits for the oldest beyond this, so memory
stays flat when writing is slower than the network."""


@dataclass
class _FileJob:
    """An input being segmented: what :meth:`ClinicalInference._finish` needs to report it."""

    path: Path
    fmt: str
    expected: list[Path]
    num_frames: int = 0
    dicom: DicomSource | None = None
    problems: list[str] = field(default_factory=list)
    segmented: int = 0
    columns: dict[str, list[str]] = field(default_factory=dict)
    error: Exception | None = None
    writes: list[Future] = field(default_factory=list)
    replacing: dict[Path, tuple[str, str]] = field(default_factory=dict)
    """Its existing outputs that were not done, and why (:meth:`ClinicalInference._origin`): the report's detail
    names those its run replaced."""

    def add_frame(self, columns: dict[str, str]) -> None:
        """Count a segmented frame and keep its report values."""
        self.segmented += 1
        for name, value in columns.items():
            self.columns.setdefault(name, []).append(str(value))


@dataclass
class _FileEnd:
    """The last event of an input: every frame was handed over, or ``error`` stopped it."""

    job: _FileJob
    error: Exception | None


class ClinicalInference:
    """Segment input files one by one with the bundle's pre- and post-processing and write what
    :class:`~monai_ecrm.clinical.save.SaveDicomSegd` writes; DICOM images are decoded frame by frame from the file.

    Args:
        model: the model: a PyTorch module (eval mode, logits ``[B, 1, H, W]`` for images ``[B, 3, H, W]``), run by a
            :class:`~monai_ecrm.clinical.runner.TorchRunner` on ``device``, or any
            :class:`~monai_ecrm.clinical.runner.ModelRunner`.
        output_dir: the output folder.
        spatial_size: network input size.
        normalization: input normalisation name (see :func:`~monai_ecrm.clinical.pipeline.clinical_preprocessing`).
        threshold: foreground probability threshold.
        probabilities: write probabilities rather than masks (FRACTIONAL SEG, 0..255 PNG, float NIfTI).
        dicom_png: also write PNG masks for DICOM inputs.
        overwrite: process every input again, whatever exists (otherwise inputs whose outputs are done are skipped,
            see the module docstring); outputs are replaced in one rename each.
        data_root_dir: keep the inputs' sub-folders below this folder in the output.
        device: where a PyTorch ``model`` runs.
        progress: show progress bars (files, and frames of multi-frame files).
        bundle_root: the bundle whose version names the algorithm in the SEGs.
        algorithm_parameters: parameters listed in the SEGs' algorithm identification.
        prefetch: frames decoded and pre-processed ahead, in a background thread, while the network runs on the
            current one (across the frames of a file and across files); 0 decodes each frame when it is needed.
            Each frame ahead holds one decoded frame and its network input, so memory does not grow with the video.
        case_pictures: write ``<stem>_explain.png`` beside each mask (for DICOM sources too; an output of the input,
            like its mask) for the frames the runner explains (an
            :class:`~monai_ecrm.clinical.explain.ExplainingRunner`), the memory cases' pictures found here
            (:class:`~monai_ecrm.clinical.explain.ExplanationWriter`; written by a background thread, see the module
            docstring); ``None``: no explanation pictures.
        model_columns: the model that makes the outputs, as the report names it (``{"model": "/.../model.pt",
            "model_sha256": "0123456789ab"}``, :data:`~monai_ecrm.clinical.report.MODEL_COLUMNS`): an existing output
            is skipped only when made by this model for its input (see the module docstring); ``None``: the model is
            not known, and every input whose outputs all exist is skipped.
    """

    def __init__(
        self,
        model: torch.nn.Module | ModelRunner,
        output_dir: str | os.PathLike,
        spatial_size: int | Sequence[int] = 352,
        normalization: str = "imagenet",
        threshold: float = 0.5,
        probabilities: bool = False,
        dicom_png: bool = False,
        overwrite: bool = False,
        data_root_dir: str | os.PathLike = "",
        device: str | torch.device = "cpu",
        progress: bool = True,
        bundle_root: str | os.PathLike | None = None,
        algorithm_parameters: dict[str, Any] | None = None,
        prefetch: int = 2,
        case_pictures: CasePictures | None = None,
        model_columns: dict[str, str] | None = None,
    ) -> None:
        self.runner: ModelRunner = TorchRunner(model, device) if isinstance(model, torch.nn.Module) else model
        self.output_dir = Path(output_dir)
        self.prefetch = prefetch
        self.dicom_png = dicom_png
        self.overwrite = overwrite
        self.data_root_dir = data_root_dir
        self.progress = progress
        parameters = {"input_size": spatial_size, "normalization": normalization, **(algorithm_parameters or {})}
        self.preprocessing = clinical_preprocessing(spatial_size, normalization)
        self.postprocessing = clinical_postprocessing(
            self.preprocessing,
            output_dir,
            threshold=threshold,
            probabilities=probabilities,
            dicom_png=dicom_png,
            data_root_dir=data_root_dir,
            bundle_root=bundle_root,
            algorithm_parameters=parameters,
        )
        self.writer: SaveDicomSegd = self.postprocessing.transforms[-1]
        self.explanations = None
        if case_pictures is not None:
            self.explanations = ExplanationWriter(
                output_dir,
                case_pictures,
                normalization,
                threshold,
                probabilities,
                data_root_dir,
                partial=self.writer.partial,
                output_stems=self.writer.output_stems,
            )
        self.model_columns = dict(model_columns or {})
        self.records = OutputRecords()
        self._job_outputs: set[str] = set()
        self._owners: dict[str, Path] = {}
        self._background: ThreadPoolExecutor | None = None
        self._writing: deque[Future] = deque()

    def process(self, path: str | os.PathLike) -> InputResult:
        """Segment one input file and say what happened (errors are reported, not raised).

        Args:
            path: the input file.
        """
        self.records = OutputRecords.read(self.output_dir)
        try:
            with prefetched(self._events([path]), self.prefetch) as events:
                return next(self._results(events))
        finally:
            self._stop_writing()

    def run(self, inputs: Sequence[str | os.PathLike], results: list[InputResult] | None = None) -> list[InputResult]:
        """Process every input (a progress bar over the files) and return what happened to each.

        The next frames (of this file or the next ones) are decoded in a background thread while the network runs
        (``prefetch``); results, outputs and their order are those of processing one frame after the other.

        Args:
            inputs: input files (see :func:`~monai_ecrm.clinical.sources.find_inputs`).
            results: list to append the results to as they come (what is done when the job is interrupted).

        Raises:
            OutputCollisionError: two inputs would share an output (nothing is written; see
                :func:`~monai_ecrm.writing.output_stems`).
        """
        results = [] if results is None else results
        png_for_dicom = self.dicom_png or self.explanations is not None
        self.writer.output_stems = output_stems(inputs, self.output_dir, self.data_root_dir, dicom_png=png_for_dicom)
        if self.explanations is not None:
            self.explanations.output_stems = self.writer.output_stems
        self.records = OutputRecords.read(self.output_dir)
        self._job_outputs = self._first_outputs(inputs)
        try:
            with prefetched(self._events(inputs), self.prefetch) as events:
                for result in _progress(self._results(events), len(inputs), self.progress, "inputs", unit="file"):
                    results.append(result)
        finally:
            self._stop_writing()
            self.writer.close()
        return results

    # ------------------------------------------------------------------------------- prefetch thread: reading
    def _outputs(self, path: Path, fmt: str, num_frames: int | None) -> list[Path]:
        stem = self.writer.output_stems.get(source_key(path))
        outputs = expected_outputs(path, fmt, num_frames, self.output_dir, self.data_root_dir, self.dicom_png, stem)
        if self.explanations is not None and num_frames is not None:
            outputs += self.explanations.expected(path, num_frames)
        return outputs

    def _taken(self, path: Path, outputs: list[Path]) -> InputResult | None:
        """Claim ``outputs`` for ``path``; the failed result of ``path`` when another input of the job has one."""
        for output in outputs:
            owner = self._owners.get(str(output).casefold(), path)
            if owner != path:
                detail = f"its output {output} is also the output of {owner}; rename one of them"
                return InputResult(str(path), "failed", detail=detail)
        self._owners.update((str(output).casefold(), path) for output in outputs)
        return None

    def _first_outputs(self, inputs: Sequence[str | os.PathLike]) -> set[str]:
        """The keys (:meth:`~monai_ecrm.clinical.report.OutputRecords.key`) of the outputs every input of the job
        gets whatever its frames (its SEG, its single-frame mask): names an earlier version's output must not have to
        be taken for another input's (:meth:`_legacy`)."""
        keys = set()
        for source in inputs:
            stem = self.writer.output_stems.get(source_key(source))
            for dicom_seg in (True, False):
                try:
                    output = prediction_path(source, self.output_dir, None, self.data_root_dir, dicom_seg=dicom_seg,
                                             stem=stem)  # fmt: skip
                except DataError:  # not an image: no output
                    continue
                keys.add(OutputRecords.key(output))
        return keys

    @property
    def _sha256(self) -> str | None:
        """The short SHA-256 of the job's model, ``None`` when the job does not know its model."""
        return self.model_columns.get("model_sha256") or None

    def _skip(
        self, path: Path, expected: list[Path], dicom: DicomSource | None = None
    ) -> tuple[InputResult | None, dict[Path, tuple[str, str]]]:
        """The result of an input that is not run (its outputs belong to another input, or are done: see the module
        docstring), else ``None`` and its existing outputs that are not done, with why (what running it replaces)."""
        taken = self._taken(path, expected)
        if taken is not None:
            return taken, {}
        if self._sha256 is None:  # a model the job cannot name: complete outputs are taken as they are
            if self._done(expected):
                return InputResult(str(path), "skipped-existing", [str(output) for output in expected]), {}
            return None, {}
        origins = {output: self._origin(path, output, dicom) for output in expected if output.is_file()}
        if not self.overwrite and expected and len(origins) == len(expected) and not any(origins.values()):
            return InputResult(str(path), "skipped-existing", [str(output) for output in expected]), {}
        legacy = None if self.overwrite else self._legacy(path, expected)
        if legacy is not None:
            taken = self._taken(path, legacy)
            if taken is not None:
                return taken, {}
            names = ", ".join(output.name for output in legacy[:_LISTED])
            detail = f"found under the names an earlier version gave it ({names}; report.csv)"
            return InputResult(str(path), "skipped-existing", [str(output) for output in legacy], detail), {}
        return None, {output: origin for output, origin in origins.items() if origin is not None}

    def _done(self, outputs: list[Path]) -> bool:
        return bool(outputs) and not self.overwrite and all(output.is_file() for output in outputs)

    def _origin(self, path: Path, output: Path, dicom: DicomSource | None) -> tuple[str, str] | None:
        """Why the existing ``output`` of ``path`` is not done, as ``(kind, why)`` (kind ``other-model``,
        ``other-input``, ``partial`` or ``unknown-origin``); ``None`` when this job's model made it, complete, for
        ``path``."""
        if output.suffix.lower() == ".dcm" and output.name.lower().endswith(f"_{self.writer.output_postfix}.dcm"):
            return self._seg_origin(path, output, dicom)
        row = self.records.of_output(output)
        if row is None:
            return "unknown-origin", "no row of report.csv lists it"
        if not OutputRecords.same_input(row, path):
            return "other-input", f"the output of {row.input} in report.csv"
        if row.status not in DONE_STATUSES:
            return "partial", f"{row.status} in report.csv"
        sha256 = row.columns.get("model_sha256", "")
        if not same_model(sha256, self._sha256):
            return "other-model", f"made by {row.columns.get('model') or 'an unnamed model'} (sha256 {sha256 or '?'})"
        return None

    def _seg_origin(self, path: Path, output: Path, dicom: DicomSource | None) -> tuple[str, str] | None:
        """:meth:`_origin` of a SEG, from what the SEG says (its model, its source, its frames)."""
        try:
            origin = read_seg_origin(output)
        except DataError as error:
            return "unknown-origin", describe_problem(error)
        sha256 = origin.parameters.get("model_sha256", "")
        if not sha256:
            return "unknown-origin", "the SEG names no model"
        instance, frames = _source_identity(path, dicom)
        if instance is not None and instance not in origin.sources:
            return "other-input", "the SEG references another image"
        if not same_model(sha256, self._sha256):
            return "other-model", f"made by {origin.parameters.get('model') or 'a model'} (sha256 {sha256})"
        if frames is not None and origin.num_frames < frames:
            return "partial", f"the SEG holds {origin.num_frames} of {frames} frames"
        return None

    def _legacy(self, path: Path, expected: list[Path]) -> list[Path] | None:
        """The outputs of ``path`` under the names an earlier version gave it (``a_png_seg.png``), when its
        ``report.csv`` row lists them all, done by this job's model, and no input of this job is named so now."""
        row = self.records.of_input(path)
        old = legacy_output_stem(path)
        stem = self.writer.output_stems.get(source_key(path)) or output_stem(path)
        if row is None or old is None or old == stem or not expected or row.status not in DONE_STATUSES:
            return None
        if not same_model(row.columns.get("model_sha256"), self._sha256):
            return None
        if not all(output.name.startswith(stem) for output in expected):
            return None
        legacy = [output.with_name(old + output.name[len(stem) :]) for output in expected]
        listed = {OutputRecords.key(output) for output in row.outputs}
        for output in legacy:
            key = OutputRecords.key(output)
            if key not in listed or key in self._job_outputs or not output.is_file():
                return None
        return legacy

    def _preprocess(self, item: dict[str, Any]) -> dict[str, Any] | DataError:
        """The network input of a frame, or the error that names the frame."""
        try:
            return self.preprocessing(item)
        except DataError as error:
            return error

    def _events(self, paths: Iterable[str | os.PathLike]) -> Iterator[Any]:
        """What the prefetch thread hands over, in input order (see the module docstring)."""
        for path in map(Path, paths):
            try:
                fmt = picture_format(path)
            except DataError as error:
                yield InputResult(str(path), "skipped", detail=describe_problem(error))
                continue
            expected: list[Path] = []
            replacing: dict[Path, tuple[str, str]] = {}
            # a SEG's name needs no header; PNG outputs (masks, explanations) are named per frame
            named_without_header = fmt == "dicom" and not self.dicom_png and self.explanations is None
            if named_without_header:
                expected = self._outputs(path, fmt, None)
                skipped, replacing = self._skip(path, expected)
                if skipped is not None:
                    yield skipped
                    continue
            try:
                source = InputFile.read(path, fmt)
            except _INPUT_ERRORS as error:  # NotAnImageError included
                yield _FileEnd(_FileJob(path, fmt, expected), error)
                continue
            if not named_without_header:
                expected = self._outputs(path, fmt, source.num_frames)
                skipped, replacing = self._skip(path, expected, source.dicom)
                if skipped is not None:
                    yield skipped
                    continue
            job = _FileJob(path, fmt, expected, source.num_frames, source.dicom, replacing=replacing)
            yield job
            try:
                for item in source.items():
                    yield item if isinstance(item, DataError) else self._preprocess(item)
            except _INPUT_ERRORS as error:
                yield _FileEnd(job, error)
            else:
                yield _FileEnd(job, None)

    # --------------------------------------------------------------------- calling thread: network and writing
    def _segment(self, data: dict[str, Any], job: _FileJob) -> dict[str, str]:
        """Run the model on a frame's network input and write its outputs (its explanation picture in the
        background, awaited by :meth:`_finish`); the frame's report values."""
        output = self.runner(data["image"].as_tensor())
        data["pred"] = output.logits
        written = self.postprocessing(data)
        if self.explanations is not None and output.explanation is not None:
            job.writes.append(self._write_later(self.explanations.compose(written, output.explanation)))
        return output.columns

    def _write_later(self, write: Callable[[], Path]) -> Future:
        """Run ``write`` in the background thread, after the writes before it (waiting first for the oldest when
        :data:`_WRITES_AHEAD` are waiting)."""
        while self._writing and self._writing[0].done():
            self._writing.popleft()
        if len(self._writing) >= _WRITES_AHEAD:
            wait([self._writing.popleft()])
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="monai-ecrm-explain")
        future = self._background.submit(write)
        self._writing.append(future)
        return future

    def _stop_writing(self) -> None:
        """Wait for the background writes (those not started yet are dropped: after an interruption, their input is
        not reported) and end the thread."""
        if self._background is not None:
            self._background.shutdown(wait=True, cancel_futures=True)
            self._background = None
        self._writing.clear()

    def _results(self, events: Iterable[Any]) -> Iterator[InputResult]:
        """Segment the frames of :meth:`_events` and say what happened to each input, in order."""
        job: _FileJob | None = None
        bar = None
        for event in events:
            if isinstance(event, InputResult):
                yield event
            elif isinstance(event, _FileJob):
                job = event
                self.writer.partial.published.clear()
                if job.dicom is not None:
                    self.writer.use_source(job.dicom)
                if self.progress and job.num_frames > 1:
                    bar = _progress(None, job.num_frames, True, job.path.name)
            elif isinstance(event, _FileEnd):
                if bar is not None:
                    bar.close()
                    bar = None
                yield self._finish(event.job, event.error)
                job = None
            elif job is not None and job.error is None:  # a frame of the current file, unless the file failed
                if bar is not None:
                    bar.update()
                if isinstance(event, DataError):
                    job.problems.append(describe_problem(event))
                    continue
                try:
                    job.add_frame(self._segment(event, job))
                except DataError as error:
                    job.problems.append(describe_problem(error))
                except (ValueError, RuntimeError, OSError) as error:
                    job.error = error

    def _finish(self, job: _FileJob, error: Exception | None) -> InputResult:
        """The result of an input whose frames were all segmented, reported or given up."""
        path = job.path
        for write in job.writes:  # its explanation pictures, written in the background
            try:
                write.result()
            except DataError as problem:
                job.problems.append(describe_problem(problem))
            except (ValueError, RuntimeError, OSError) as write_error:
                job.error = job.error or write_error
        error = job.error or error
        if error is None and job.fmt == "dicom":
            try:
                self.writer.flush(path)
            except _INPUT_ERRORS as flush_error:
                error = flush_error
        if isinstance(error, NotAnImageError):
            return InputResult(str(path), "skipped", detail=describe_problem(error))
        problems, segmented = job.problems, job.segmented
        if error is not None:
            self.writer.discard(path)
            problems.append(describe_problem(error))
            segmented = 0
        # what this input published, not files of the same names already there
        published = list(dict.fromkeys(self.writer.partial.published))
        self.writer.partial.published.clear()
        written = [str(output) for output in job.expected if output in published]
        written += [str(output) for output in published if output not in job.expected]
        if not problems and len(written) < len(job.expected):
            problems.append(f"not written: {', '.join(str(o) for o in job.expected if str(o) not in written)}")
        columns = {name: ";".join(values) for name, values in job.columns.items()}
        replaced = _replacing({output: why for output, why in job.replacing.items() if output in published})
        if not problems:
            return InputResult(str(path), "written", written, "; ".join(replaced), columns)
        status = "partial" if segmented and written else "failed"
        if status == "partial":
            problems.insert(0, f"{segmented} of {job.num_frames} frames segmented")
            held = [output for output in published if output not in job.expected]
            if held:
                problems.append(
                    f"the frames segmented are in {', '.join(output.name for output in held)}, not under the final "
                    "name: a rerun segments the file again"
                )
            problems += replaced
        return InputResult(str(path), status, written, "; ".join(problems), columns)


def _replacing(origins: dict[Path, tuple[str, str]]) -> list[str]:
    """The ``replaced-<kind>: <outputs> (<why>)`` details of the existing outputs a run replaced, one per kind."""
    kinds: dict[str, list[tuple[Path, str]]] = {}
    for output, (kind, why) in origins.items():
        kinds.setdefault(kind, []).append((output, why))
    details = []
    for kind, outputs in kinds.items():
        names = ", ".join(output.name for output, _ in outputs[:_LISTED])
        if len(outputs) > _LISTED:
            names += f" and {len(outputs) - _LISTED} more"
        details.append(f"replaced-{kind}: {names} ({outputs[0][1]})")
    return details


def _source_identity(path: Path, dicom: DicomSource | None) -> tuple[str | None, int | None]:
    """The SOP Instance UID and number of frames of a DICOM source (from its header when read, else from the file);
    ``None`` for what cannot be read (the input is then read, and reported, when it is run)."""
    if dicom is not None:
        return str(dicom.dataset.get("SOPInstanceUID", "")) or None, dicom.num_frames
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "NumberOfFrames"])
    except Exception:  # pydicom raises many types on damaged files: the run reports the file
        return None, None
    instance = str(dataset.get("SOPInstanceUID", "")) or None
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = None
    return instance, frames


def _progress(items: Iterable[Any] | None, total: int, enabled: bool, description: str, unit: str = "frame"):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=description, unit=unit, leave=unit == "file", file=sys.stderr)
