"""``monai-ecrm-infer`` (also ``python -m monai_ecrm.infer``): polyp masks for a file, a folder or a DICOM study.

DICOM images give a DICOM Segmentation per source instance (:mod:`monai_ecrm.dicom_seg`), decoded and segmented
frame by frame; PNG, JPEG, BMP, TIFF and NIfTI pictures give the bundle's PNG/NIfTI masks. Pre- and post-processing
are the bundle's (:func:`monai_ecrm.transforms.infer_transforms`, sigmoid, ``Invertd`` back to the source's size,
threshold), so a mask is the same whatever the input format and whether it comes from this command or from
``python -m monai.bundle run --config_file configs/inference.json``. The bundle's ``postprocessing`` can use
:func:`clinical_postprocessing` to write DICOM SEGs too.

A job goes through every input and reports each one in ``<output_dir>/report.csv`` (written, skipped because its
outputs exist, skipped because it is no image, failed, or partial when some frames could not be decoded), so a bad
file never stops the rest. Outputs appear under their final names only when complete, and a rerun skips the inputs
whose outputs exist: an interrupted job is resumed by running it again.

While the network runs on a frame, a background thread decodes and pre-processes the next ones (two ahead, of the
same file or the next files; :class:`ClinicalInference` ``prefetch``), so decoding leaves the critical path where the
decoder releases the GIL (imagecodecs' JPEG 2000 decoder, see :func:`monai_ecrm.data.image_io.dicom_decoding_plugin`;
pydicom's pylibjpeg and Pillow plugins hold it). The network and the writing stay in the calling thread, in input
order, so outputs, reports and interruption behave as when each frame is processed in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import queue
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import picture_format, probe_picture
from monai_ecrm.dicom_seg import (
    LoadFramed,
    NotAnImageError,
    SaveDicomSegd,
    bundle_version,
    iter_dicom_frames,
    prediction_path,
)
from monai_ecrm.transforms import LoadPolypImaged, infer_postprocessing, infer_transforms, normalization_for_backbone

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "InputResult",
    "ClinicalInference",
    "bundle_settings",
    "clinical_postprocessing",
    "clinical_preprocessing",
    "find_inputs",
    "load_model",
    "main",
    "write_report",
]

logger = logging.getLogger("monai_ecrm.infer")

EXIT_OK = 0
"""Exit status: every input was written, already done, or skipped as no image."""
EXIT_FAILED = 1
"""Exit status: at least one input failed (or was only partly segmented); all the others were processed."""
EXIT_USAGE = 2
"""Exit status: bad command line, no usable model, or no input found (nothing was processed)."""

REPORT_NAME = "report.csv"
BUNDLE_SETTINGS = {"backbone": str, "bank_size": int, "use_icrm": bool, "spatial_size": int, "threshold": float}


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
    """

    input: str
    status: str
    outputs: list[str] = field(default_factory=list)
    detail: str = ""


def _problem(error: Exception) -> str:
    if isinstance(error, DataError) and error.problems:
        return "; ".join(problem for _, problem in error.problems)
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------------- model
def bundle_settings(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The architecture and inference settings a bundle's ``configs/inference.json`` states as plain top-level values:
    ``backbone``, ``bank_size``, ``use_icrm``, ``spatial_size``, ``threshold`` (expressions are ignored).

    Args:
        bundle_dir: the bundle folder.
    """
    path = Path(bundle_dir) / "configs" / "inference.json"
    try:
        with open(path, encoding="utf-8") as stream:
            config = json.load(stream)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the bundle's inference config: {error}") from None
    settings = {}
    for key, kind in BUNDLE_SETTINGS.items():
        value = config.get(key)
        if isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
            settings[key] = value
    return settings


def load_model(
    checkpoint: str | os.PathLike | None = None,
    torchscript: str | os.PathLike | None = None,
    backbone: str = "resnet34",
    bank_size: int = 20,
    use_icrm: bool = False,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The network in eval mode, from a flat state dict (a bundle's ``models/model.pt``) or a TorchScript export.

    Args:
        checkpoint: a state dict of ``ECRMUNet(backbone=backbone, bank_size=bank_size, use_icrm=use_icrm)``, memory
            bank included, loaded with ``torch.load(weights_only=True)``.
        torchscript: a TorchScript file (``models/model.ts`` of ``python -m monai.bundle ckpt_export``).
        backbone: encoder of the checkpoint's network.
        bank_size: ECRM memory slots of the checkpoint's network.
        use_icrm: whether the checkpoint's network has the ICRM branch.
        device: where to run it.

    Raises:
        ValueError: naming the file, when it cannot be read or does not fit the network.
    """
    if (checkpoint is None) == (torchscript is None):
        raise ValueError("give exactly one of checkpoint (a model.pt state dict) and torchscript (a model.ts file)")
    if torchscript is not None:
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates it, but it is how ckpt_export's files load
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning)
                model = torch.jit.load(str(torchscript), map_location=device)
        except Exception as error:  # RuntimeError, ValueError, OSError from the TorchScript loader
            raise ValueError(f"{torchscript}: not a loadable TorchScript model: {error}") from None
        return model.eval()
    from monai_ecrm.networks.nets import ECRMUNet

    architecture = f"ECRMUNet(backbone={backbone!r}, bank_size={bank_size}, use_icrm={use_icrm})"
    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as error:  # OSError, UnpicklingError, RuntimeError
        raise ValueError(f"{checkpoint}: not a loadable state dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        keys = ", ".join(list(state)[:5]) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{checkpoint}: not a flat network state dict (found {keys}); give the bundle's models/model.pt, "
            "not a training checkpoint"
        )
    network = ECRMUNet(
        spatial_dims=2, in_channels=3, out_channels=1, backbone=backbone, bank_size=bank_size, use_icrm=use_icrm
    )
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        lines = str(error).strip().splitlines()
        summary = " ".join(line.strip() for line in lines[:4])[:600]
        raise ValueError(
            f"{checkpoint}: does not fit {architecture} (give --backbone, --bank-size, --use-icrm as trained): "
            f"{summary}"
        ) from None
    return network.to(device).eval()


# ------------------------------------------------------------------------------------------------ transforms
def clinical_preprocessing(spatial_size: int | Sequence[int] = 352, normalization: str = "imagenet") -> Compose:
    """The bundle's inference preprocessing (:func:`~monai_ecrm.transforms.infer_transforms`) with a loader that
    also takes DICOM frames decoded one at a time (:class:`~monai_ecrm.dicom_seg.LoadFramed`).

    Args:
        spatial_size: network input size.
        normalization: ``"imagenet"`` or ``"lite"`` (see :func:`~monai_ecrm.transforms.normalization_for_backbone`).
    """
    preset = infer_transforms(spatial_size=spatial_size, normalization=normalization)
    if not preset.transforms or not isinstance(preset.transforms[0], LoadPolypImaged):
        raise RuntimeError("infer_transforms no longer starts with LoadPolypImaged: update clinical_preprocessing")
    return Compose([LoadFramed(keys="image"), *preset.transforms[1:]])


def clinical_postprocessing(
    preprocessing: Compose,
    output_dir: str | os.PathLike,
    threshold: float = 0.5,
    probabilities: bool = False,
    dicom_png: bool = False,
    data_root_dir: str | os.PathLike = "",
    bundle_root: str | os.PathLike | None = None,
    algorithm_parameters: dict[str, Any] | None = None,
) -> Compose:
    """The bundle's inference post-processing (:func:`~monai_ecrm.transforms.infer_postprocessing`: sigmoid,
    ``Invertd``, threshold) ending in :class:`~monai_ecrm.dicom_seg.SaveDicomSegd`: a DICOM SEG per DICOM source, the
    bundle's PNG/NIfTI masks for the other formats, written atomically.

    Args:
        preprocessing: the transforms that produced the network input (inverted to the source's size).
        output_dir: the output folder.
        threshold: foreground probability threshold.
        probabilities: write probabilities (FRACTIONAL SEG, 0..255 PNG) rather than masks.
        dicom_png: also write PNG masks for DICOM sources.
        data_root_dir: keep the sources' sub-folders below this folder in the output.
        bundle_root: the bundle whose ``configs/metadata.json`` version names the algorithm in the SEG.
        algorithm_parameters: parameters listed in the SEG's algorithm identification (threshold added).
    """
    steps = infer_postprocessing(preprocessing, output_dir=None, threshold=threshold, probabilities=probabilities)
    parameters = {"threshold": threshold, **(algorithm_parameters or {})}
    if probabilities:
        parameters["threshold"] = "none (probabilities)"
    writer = SaveDicomSegd(
        keys="pred",
        output_dir=output_dir,
        probabilities=probabilities,
        dicom_png=dicom_png,
        data_root_dir=data_root_dir,
        algorithm_version=bundle_version(bundle_root),
        algorithm_parameters=parameters,
    )
    return Compose([*steps.transforms, writer])


# ------------------------------------------------------------------------------------------------------ inputs
def find_inputs(source: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The files to segment: ``source`` itself, or every file below the folder ``source`` (a DICOM study folder with
    its series sub-folders, a folder of pictures), in name order, hidden files and the ``exclude`` folders left out.

    Args:
        source: a file or a folder.
        exclude: folders not to look into (the output folder when it is inside ``source``).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.is_file():
        return [source]
    excluded = {Path(folder).resolve() for folder in exclude}
    files = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = sorted(
            name for name in subfolders if not name.startswith(".") and (Path(folder) / name).resolve() not in excluded
        )
        files += [Path(folder) / name for name in sorted(names) if not name.startswith(".")]
    return files


# --------------------------------------------------------------------------------------------------------- job
class ClinicalInference:
    """Segment input files one by one with the bundle's pre- and post-processing and write what
    :class:`~monai_ecrm.dicom_seg.SaveDicomSegd` writes; DICOM images are decoded frame by frame from the file.

    Args:
        model: the network (eval mode), logits ``[B, 1, H, W]`` for images ``[B, 3, H, W]``.
        output_dir: the output folder.
        spatial_size: network input size.
        normalization: input normalisation name (see :func:`clinical_preprocessing`).
        threshold: foreground probability threshold.
        probabilities: write probabilities rather than masks (FRACTIONAL SEG, 0..255 PNG, float NIfTI).
        dicom_png: also write PNG masks for DICOM inputs.
        overwrite: process inputs whose outputs exist (otherwise they are skipped).
        data_root_dir: keep the inputs' sub-folders below this folder in the output.
        device: where the network runs.
        progress: show progress bars (files, and frames of multi-frame files).
        bundle_root: the bundle whose version names the algorithm in the SEGs.
        algorithm_parameters: parameters listed in the SEGs' algorithm identification.
        prefetch: frames decoded and pre-processed ahead, in a background thread, while the network runs on the
            current one (across the frames of a file and across files); 0 decodes each frame when it is needed.
            Each frame ahead holds one decoded frame and its network input, so memory does not grow with the video.
    """

    def __init__(
        self,
        model: torch.nn.Module,
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
    ) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.prefetch = prefetch
        self.dicom_png = dicom_png
        self.overwrite = overwrite
        self.data_root_dir = data_root_dir
        self.device = torch.device(device)
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

    def _preprocess(self, item: dict[str, Any]) -> dict[str, Any] | DataError:
        """The network input of a frame, or the error that names the frame (run ahead, in the prefetch thread)."""
        try:
            return self.preprocessing(item)
        except DataError as error:
            return error

    def _segment(self, data: dict[str, Any]) -> None:
        image = data["image"]
        with torch.no_grad():
            logits = self.model(image.as_tensor().unsqueeze(0).to(self.device))
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(
                f"the model gives logits of shape {tuple(logits.shape)}; one channel [B, 1, H, W] expected"
            )
        data["pred"] = logits[0]
        self.postprocessing(data)

    def _outputs(self, path: Path, fmt: str) -> list[Path]:
        """The files a finished input has (probing the header for the frames of PNG outputs)."""
        outputs = []
        if fmt == "dicom":
            outputs.append(prediction_path(path, self.output_dir, None, self.data_root_dir))
            if not self.dicom_png:
                return outputs
        frames = probe_picture(path).frames
        for frame in [None] if frames == 1 else range(frames):
            outputs.append(prediction_path(path, self.output_dir, frame, self.data_root_dir, dicom_seg=False))
        return outputs

    def _frames(self, path: Path, fmt: str) -> tuple[Iterable[Any], int]:
        if fmt == "dicom":
            header = self.writer.source_header(path)
            info = probe_picture(path)
            frames = iter_dicom_frames(path, header, info)
            return ({"image": frame} if not isinstance(frame, DataError) else frame for frame in frames), info.frames
        info = probe_picture(path)
        if info.frames == 1:
            return [{"image": str(path)}], 1
        return ({"image": str(path), "frame": frame} for frame in range(info.frames)), info.frames

    def _events(self, paths: Iterable[str | os.PathLike]) -> Iterator[Any]:
        """What the prefetch thread hands over, in input order: an :class:`InputResult` for an input that is skipped
        before decoding; for the others a :class:`_FileJob`, then per frame its network input (or the ``DataError``
        of a frame that cannot be decoded or loaded), then a :class:`_FileEnd` (with the error that stopped the file,
        if any)."""
        for path in map(Path, paths):
            try:
                fmt = picture_format(path)
            except DataError as error:
                yield InputResult(str(path), "skipped", detail=_problem(error))
                continue
            try:
                expected = self._outputs(path, fmt)
            except DataError:  # unreadable header: reported when processed
                expected = []
            if expected and not self.overwrite and all(output.is_file() for output in expected):
                yield InputResult(str(path), "skipped-existing", [str(output) for output in expected])
                continue
            job = _FileJob(path, fmt, expected)
            try:
                items, job.num_frames = self._frames(path, fmt)
                yield job
                for item in items:
                    yield item if isinstance(item, DataError) else self._preprocess(item)
            except (DataError, ValueError, RuntimeError, OSError) as error:  # NotAnImageError included
                yield _FileEnd(job, error)
            else:
                yield _FileEnd(job, None)

    def _results(self, events: Iterable[Any]) -> Iterator[InputResult]:
        """Segment the frames of :meth:`_events` (network and writing, in this thread) and say what happened to each
        input, in order."""
        job: _FileJob | None = None
        bar = None
        for event in events:
            if isinstance(event, InputResult):
                yield event
            elif isinstance(event, _FileJob):
                job = event
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
                    job.problems.append(_problem(event))
                    continue
                try:
                    self._segment(event)
                    job.segmented += 1
                except DataError as error:
                    job.problems.append(_problem(error))
                except (ValueError, RuntimeError, OSError) as error:
                    job.error = error

    def _finish(self, job: _FileJob, error: Exception | None) -> InputResult:
        """The result of an input whose frames were all segmented, reported or given up."""
        path = job.path
        error = job.error or error
        if error is None and job.fmt == "dicom":
            try:
                self.writer.flush(path)
            except (DataError, ValueError, RuntimeError, OSError) as flush_error:
                error = flush_error
        if isinstance(error, NotAnImageError):
            return InputResult(str(path), "skipped", detail=_problem(error))
        problems, segmented = job.problems, job.segmented
        if error is not None:
            self.writer.discard(path)
            problems.append(_problem(error))
            segmented = 0
        written = [str(output) for output in job.expected if output.is_file()]
        if not problems and len(written) < len(job.expected):
            problems.append(f"not written: {', '.join(str(o) for o in job.expected if str(o) not in written)}")
        if not problems:
            return InputResult(str(path), "written", written)
        status = "partial" if segmented and written else "failed"
        if status == "partial":
            problems.insert(0, f"{segmented} of {job.num_frames} frames segmented")
        return InputResult(str(path), status, written, "; ".join(problems))

    def process(self, path: str | os.PathLike) -> InputResult:
        """Segment one input file and say what happened (errors are reported, not raised).

        Args:
            path: the input file.
        """
        with _prefetched(self._events([path]), self.prefetch) as events:
            return next(self._results(events))

    def run(self, inputs: Sequence[str | os.PathLike], results: list[InputResult] | None = None) -> list[InputResult]:
        """Process every input (a progress bar over the files) and return what happened to each.

        The next frames (of this file or the next ones) are decoded in a background thread while the network runs
        (``prefetch``); results, outputs and their order are those of processing one frame after the other.

        Args:
            inputs: input files (see :func:`find_inputs`).
            results: list to append the results to as they come (what is done when the job is interrupted).
        """
        results = [] if results is None else results
        try:
            with _prefetched(self._events(inputs), self.prefetch) as events:
                for result in _progress(self._results(events), len(inputs), self.progress, "inputs", unit="file"):
                    results.append(result)
        finally:
            self.writer.close()
        return results


@dataclass
class _FileJob:
    """An input being segmented: what :meth:`ClinicalInference._finish` needs to report it."""

    path: Path
    fmt: str
    expected: list[Path]
    num_frames: int = 0
    problems: list[str] = field(default_factory=list)
    segmented: int = 0
    error: Exception | None = None


@dataclass
class _FileEnd:
    """The last event of an input: every frame was handed over, or ``error`` stopped it."""

    job: _FileJob
    error: Exception | None


class _Prefetch:
    """Iterate in a background thread, at most ``depth`` items ahead of the consumer, in order.

    An exception raised by the iterable is raised by ``next`` where the iterable raised it. A bounded queue, so the
    items ahead never hold more than ``depth`` frames. The decoders (imagecodecs) and torch release the GIL, so the
    thread decodes while the network runs. MONAI's ``monai.data.ThreadBuffer`` does the same queueing but ends the
    iteration silently when its source raises, which would cut a job short without a report: hence this class.
    """

    _END = object()

    def __init__(self, iterable: Iterable[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), name="monai-ecrm-prefetch")
        self._thread.daemon = True  # an interrupted job does not wait for it at exit
        self._thread.start()

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # raised again in the consumer's thread, in order
            self._put((None, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # closes the files of an abandoned generator in this thread

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if error is not None:
            self._done = True
            raise error
        if item is self._END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is preparing) and wait for it."""
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _prefetched(iterable: Iterable[Any], depth: int) -> Iterator[Iterable[Any]]:
    """The items of ``iterable``, prepared ``depth`` ahead in a background thread (as they are, for ``depth`` 0)."""
    if depth <= 0:
        yield iterable
        return
    prefetch = _Prefetch(iterable, depth)
    try:
        yield prefetch
    finally:
        prefetch.close()


def _progress(items: Iterable[Any] | None, total: int, enabled: bool, description: str, unit: str = "frame"):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=description, unit=unit, leave=unit == "file", file=sys.stderr)


def write_report(results: Sequence[InputResult], path: str | os.PathLike) -> Path:
    """Write the job's report as CSV (columns ``input, status, outputs, detail``; outputs separated by ``;``),
    under a temporary name first.

    Args:
        results: what happened to each input.
        path: the report file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["input", "status", "outputs", "detail"])
        for result in results:
            writer.writerow([result.input, result.status, ";".join(result.outputs), result.detail])
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------------------------------------------- CLI
_DESCRIPTION = """\
Segment polyps in colonoscopy pictures with the polyp_ecrm bundle's network.

INPUT is a picture file, a folder of pictures, or a DICOM study folder (searched with its sub-folders; DICOM files
need no extension). DICOM images give one DICOM Segmentation per source instance, <stem>_seg.dcm, referencing the
source's study, series, instance and frames, with a frame per source frame for multi-frame files (decoded one frame
at a time). PNG, JPEG, BMP and TIFF pictures give <stem>_seg.png masks (0/255), NIfTI pictures <stem>_seg.nii.gz
masks (uint8, 0/255) with the source's affine and its shape without the colour axis ((549, 530) or (549, 530, 3) in:
(549, 530) out): the bundle's outputs. Sub-folders of a folder INPUT are kept in OUTPUT.

NIfTI pictures, voxel axis x along the columns: grey (x, y), (x, y, 1) or (x, y, 1, 1); colour as uint8 data
(x, y, 3) (an RGB picture array saved as it is), RGB24 voxels or a vector (x, y, 1, 1, 3). (x, y, 3) data of any
other type (float, int16) is a volume of 3 slices, not a picture, and is reported as such.

Non-image DICOM objects (structured reports, presentation states, DICOMDIR, segmentations) and files of other kinds
are skipped; an unreadable file or frame is reported and the job goes on. Every input is listed with its status in
OUTPUT/report.csv. Files are written under a temporary name and renamed when complete; a rerun skips the inputs
whose outputs exist, so an interrupted job is resumed by running it again.

The model: --checkpoint (a bundle's models/model.pt state dict, with --backbone/--bank-size/--use-icrm as trained),
--torchscript (a bundle's models/model.ts), or --bundle (DIR/models/model.ts, else DIR/models/model.pt with the
architecture of DIR/configs/inference.json); the installed bundle when none is given.

Research use only: not a medical device, not for diagnosis."""

_EPILOG = """\
exit status: 0 every input written, already done, or skipped as no image; 1 some inputs failed or were only partly
segmented (all others were processed; see report.csv); 2 bad command line, no usable model or no input found;
130 interrupted (rerun to resume)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-ecrm-infer",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="a picture file, a folder of pictures, or a DICOM study folder")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--checkpoint", metavar="MODEL_PT", help="flat network state dict (a bundle's models/model.pt)")
    model.add_argument("--torchscript", metavar="MODEL_TS", help="TorchScript export (a bundle's models/model.ts)")
    model.add_argument(
        "--bundle",
        metavar="DIR",
        help="bundle folder: DIR/models/model.ts if present, else DIR/models/model.pt; architecture, input size and "
        "threshold from DIR/configs/inference.json (default: the installed polyp_ecrm bundle)",
    )
    arch = parser.add_argument_group("architecture of --checkpoint (default: the bundle's, else as shown)")
    arch.add_argument(
        "--backbone",
        help="encoder name, e.g. resnet34 (default) or efficientnet-lite0; also selects the input normalisation "
        "(EfficientNet-Lite: (x-127)/128, others: ImageNet mean/std)",
    )
    arch.add_argument("--bank-size", type=int, help="ECRM memory slots (default 20)")
    arch.add_argument(
        "--use-icrm", action=argparse.BooleanOptionalAction, default=None, help="network with the ICRM branch"
    )
    options = parser.add_argument_group("inference")
    options.add_argument("--spatial-size", type=int, help="network input size in pixels (default 352 or the bundle's)")
    options.add_argument(
        "--threshold", type=float, help="foreground probability threshold of the masks (default 0.5 or the bundle's)"
    )
    options.add_argument(
        "--probabilities",
        action="store_true",
        help="write foreground probabilities instead of masks: FRACTIONAL DICOM SEG (0..255), 0..255 PNG, float NIfTI",
    )
    options.add_argument("--dicom-png", action="store_true", help="also write PNG masks for DICOM inputs")
    options.add_argument("--overwrite", action="store_true", help="process inputs whose outputs exist again")
    options.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    options.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monai-ecrm-infer`` (see ``--help``); returns the exit status.

    Args:
        argv: command line arguments (``sys.argv[1:]`` when not given).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    sources = [name for name in ("checkpoint", "torchscript", "bundle") if getattr(args, name)]
    if len(sources) > 1:
        parser.error(f"give one model: --{' and --'.join(sources)} given")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output)
    try:
        bundle_root = None
        settings: dict[str, Any] = {}
        checkpoint, torchscript = args.checkpoint, args.torchscript
        if not sources or args.bundle:
            from monai_ecrm.bundle import bundle_path

            bundle_root = Path(args.bundle) if args.bundle else bundle_path()
            settings = bundle_settings(bundle_root)
            models = bundle_root / "models"
            if (models / "model.ts").is_file():
                torchscript = models / "model.ts"
            elif (models / "model.pt").is_file():
                checkpoint = models / "model.pt"
            else:
                raise ValueError(f"{models}: neither model.ts nor model.pt (train or export the bundle first)")
        backbone = args.backbone or settings.get("backbone", "resnet34")
        model = load_model(
            checkpoint=checkpoint,
            torchscript=torchscript,
            backbone=backbone,
            bank_size=args.bank_size if args.bank_size is not None else settings.get("bank_size", 20),
            use_icrm=args.use_icrm if args.use_icrm is not None else settings.get("use_icrm", False),
            device=device,
        )
        inputs = find_inputs(args.input, exclude=[output_dir])
        if not inputs:
            raise ValueError(f"{args.input}: no file found")
    except (ValueError, FileNotFoundError) as error:
        print(f"monai-ecrm-infer: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    job = ClinicalInference(
        model,
        output_dir,
        spatial_size=args.spatial_size or settings.get("spatial_size", 352),
        normalization=normalization_for_backbone(backbone),
        threshold=args.threshold if args.threshold is not None else settings.get("threshold", 0.5),
        probabilities=args.probabilities,
        dicom_png=args.dicom_png,
        overwrite=args.overwrite,
        data_root_dir=args.input if Path(args.input).is_dir() else "",
        device=device,
        progress=not args.no_progress,
        bundle_root=bundle_root,
        algorithm_parameters={"model": Path(checkpoint or torchscript).name, "backbone": backbone},
    )
    results: list[InputResult] = []
    try:
        job.run(inputs, results)
    except KeyboardInterrupt:
        write_report(results, output_dir / REPORT_NAME)
        print(f"monai-ecrm-infer: interrupted after {len(results)} of {len(inputs)} inputs", file=sys.stderr)
        return 130
    report = write_report(results, output_dir / REPORT_NAME)
    counts = {status: sum(r.status == status for r in results) for status in ("written", "skipped-existing")}
    noted = [r for r in results if r.status in ("skipped", "failed", "partial")]
    for result in noted:
        print(f"{result.status}: {result.input}: {result.detail}", file=sys.stderr)
    failed = sum(r.status in ("failed", "partial") for r in results)
    print(
        f"monai-ecrm-infer: {counts['written']} written, {counts['skipped-existing']} already done, "
        f"{len(noted) - failed} skipped, {failed} failed; report: {report}",
        file=sys.stderr,
    )
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
