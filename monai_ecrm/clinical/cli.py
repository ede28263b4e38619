"""The ``monai-ecrm-infer`` command (also ``python -m monai_ecrm.infer``): its options, and what it prints.

What a run prints on stderr, besides the progress bars (``--no-progress`` leaves them out), is a line per event, once
each, after the job, every line starting with ``monai-ecrm-infer:`` (logger ``monai_ecrm.clinical.cli``, at the level
given)::

    monai-ecrm-infer: model: <file> (sha256 <12 hex>): trained on <data> at <H>x<W> px   INFO, the model used
    monai-ecrm-infer: model: assumed <size, normalisation, threshold>: ...     WARNING, what the model does not state
    monai-ecrm-infer: explain: <why the frames cannot be explained>; ...       WARNING, --explain on such a model
    monai-ecrm-infer: explain: --explain <K>: the memory holds <n> cases: ...  INFO, K above the filled slots
    monai-ecrm-infer: explain: pictures of <n> of <m> memory cases found ...   INFO, where the case pictures come from
    monai-ecrm-infer: skipped: <input>: <why it holds no image>               INFO, an input skipped as no image
    monai-ecrm-infer: partial: <input>: <n> of <m> frames segmented; <why>    WARNING, some frames not decoded
    monai-ecrm-infer: failed: <input>: <problem>                              ERROR, an input that failed
    monai-ecrm-infer: replaced the outputs of <n> inputs made by another model ... WARNING, see report.csv's detail
    monai-ecrm-infer: <w> written, <d> already done, <s> skipped, <f> failed; report: <output>/report.csv   INFO

The model line names the model file used, a short SHA-256 of it, and what its record (:mod:`monai_ecrm.record`) says it
was trained on and at which input size (``no model record: ...`` for a file without one; ``(the installed bundle's: no
model option given)`` after the hash when no model option was given); the same file and hash are the ``model`` and
``model_sha256`` columns of ``report.csv`` and parameters of each SEG's algorithm identification. The ``assumed`` line
lists the package defaults used for what neither the model nor the command line states. The ``explain`` lines
(``--explain K``, :mod:`~monai_ecrm.clinical.explain`) come after them, once each. The inputs written or
already done have no line of their own: they are counted in the last line and listed in
``report.csv`` with every other input. An interrupted job prints, instead of those lines,
``monai-ecrm-infer: interrupted after <n> of <m> inputs`` (WARNING, exit status 130); a run that cannot start
``monai-ecrm-infer: error: <problem>`` (ERROR, exit status 2: no usable model, an option that contradicts the model, no
input found, two inputs that would share an output; a bad command line gets argparse's usage and error lines). A model
file given to the wrong option, or that is no model at all (``--checkpoint model.onnx``, ``--torchscript model.pt``, a
JSON record, an empty file), is one such line naming the file, what it is and the option to use
(:func:`_model_file_problem`), before torch reads it; torch's own advice (``weights_only=False``, which would run
code from the file) is never printed.

Nothing else is printed, whatever logging the calling program has set up: the command's lines go to its own stderr
handler and no further (so a root handler does not print them twice), and highdicom's INFO lines (nine per SEG it
builds, "copy attributes of module ...") are silenced by setting the ``highdicom`` logger to WARNING for the run;
highdicom's warnings still show. The model is loaded without MONAI's bundle parser (``--bundle`` reads
``configs/inference.json`` as plain JSON), so MONAI's warning about parsing a config ("... from a source you trust",
which ``monai.bundle run`` gives) has no cause here; the deprecation warning of ``torch.jit.load`` is filtered where the
TorchScript model is loaded. Logger levels and handlers are restored when :func:`main` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_ecrm.clinical.explain import NOTE_COLUMN, CasePictures, ExplainingRunner, explain_messages
from monai_ecrm.clinical.job import ClinicalInference
from monai_ecrm.clinical.report import REPORT_NAME, InputResult, write_report
from monai_ecrm.clinical.runner import (
    ModelRunner,
    TorchRunner,
    bundle_settings,
    load_model_and_record,
    model_sha256,
    trained_on,
)
from monai_ecrm.clinical.sources import find_inputs
from monai_ecrm.record import read_record
from monai_ecrm.transforms import normalization_for_backbone
from monai_ecrm.writing import output_stems

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

PROG = "monai-ecrm-infer"

logger = logging.getLogger(__name__)

EXIT_OK = 0
"""Exit status: every input was written, already done, or skipped as no image."""
EXIT_FAILED = 1
"""Exit status: at least one input failed (or was only partly segmented); all the others were processed."""
EXIT_USAGE = 2
"""Exit status: bad command line, no usable model, or no input found (nothing was processed)."""
EXIT_INTERRUPTED = 130
"""Exit status: interrupted (Ctrl-C); a rerun resumes the job."""

_EVENT_LEVELS = {"skipped": logging.INFO, "partial": logging.WARNING, "failed": logging.ERROR}
"""The statuses that get a line of their own, and its level."""

_DESCRIPTION = """\
Segment polyps in colonoscopy pictures with the polyp_ecrm bundle's network.

INPUT is a picture file, a folder of pictures, or a DICOM study folder (searched with its sub-folders; DICOM files
need no extension). DICOM images give one DICOM Segmentation per source instance, <stem>_seg.dcm, referencing the
source's study, series, instance and frames, with a frame per source frame for multi-frame files (decoded one frame
at a time). PNG, JPEG, BMP and TIFF pictures give <stem>_seg.png masks (0/255), NIfTI pictures <stem>_seg.nii.gz
masks (uint8, 0/255) with the source's affine and its shape without the colour axis ((549, 530) or (549, 530, 3) in:
(549, 530) out): the bundle's outputs. Sub-folders of a folder INPUT are kept in OUTPUT.

Output names: an output is named after its input's own file name alone, never after the other files of the folder:
<stem>_seg.png, <stem>_seg.nii.gz or <stem>_seg.dcm (a.jpg: a_seg.png; a.nii.gz: a_seg.nii.gz), so adding or
removing a file never renames another file's output. Two inputs of one folder whose outputs would share a name (a.png
and a.jpg: both a_seg.png, compared ignoring case; a.dcm and a.png with --dicom-png or --explain) stop the job before
anything is written (exit status 2), naming both: rename one of them. Outputs an earlier version named a_png_seg.png
and a_jpg_seg.png are found again through the report.csv rows that list them.

NIfTI pictures, voxel axis x along the columns: grey (x, y), (x, y, 1) or (x, y, 1, 1); colour as uint8 data
(x, y, 3) (an RGB picture array saved as it is), RGB24 voxels or a vector (x, y, 1, 1, 3). (x, y, 3) data of any
other type (float, int16) is a volume of 3 slices, not a picture, and is reported as such.

Non-image DICOM objects (structured reports, presentation states, DICOMDIR, segmentations) and files of other kinds
are skipped; an unreadable file or frame is reported and the job goes on. Every input is listed with its status in
OUTPUT/report.csv. Files are written under a temporary name and renamed when complete, so an interrupted job is
resumed by running it again. A multi-frame DICOM file with frames that cannot be decoded gets
<stem>_seg.partial.dcm holding the others (status partial), never <stem>_seg.dcm, so a rerun tries it again.

Reruns: an input is skipped (skipped-existing) only when each of its outputs is complete and was made by the same
model (the SHA-256 of the model file) for that input. A DICOM SEG says so itself (its algorithm parameters name the
model, it references its source and has a frame per source frame); every other output through its row in
OUTPUT/report.csv, which each job merges: the rows of inputs the job does not touch stay, each naming the model that
made its outputs. An input whose outputs exist but were made by another model, for another input, are incomplete or
are named by no record is segmented again with this model and its outputs replaced (each in one atomic rename); its
row says so in its detail (replaced-other-model: a_seg.png (made by A.pt (sha256 ...)), replaced-other-input,
replaced-partial, replaced-unknown-origin) and a warning line counts them. --overwrite segments every input again.

The model: --checkpoint (a bundle's models/model.pt), --torchscript (a bundle's models/model.ts), or --bundle
(DIR/models/model.ts, else DIR/models/model.pt); the installed bundle's when none is given. The model runs as it was
trained: the network from its weights, the input size, normalisation and threshold from its record (the
models/model.json the bundle writes beside model.pt, or the record embedded in a TorchScript file). An option that
contradicts the model is an error naming both values; options only state what the model does not (--threshold may
differ: it is an operating point). A bundle trained before records gives its configs/inference.json's spatial_size
and threshold. The model used is named in the log, in report.csv and in each SEG. --onnx runs an ONNX export
(float32, or INT8 from `python -m monai_ecrm.onnx quantize`) with ONNX Runtime on the CPU, its input size,
normalisation and threshold read from the file's model record; --bf16 runs a PyTorch model under bfloat16 autocast.

--explain K names, for every image (and every frame of a video), the K cases of the model's ECRM memory (the training
cases whose prototypes every pixel attends to) that the image drew on most: their share of the attention over the
predicted polyp, from the same forward as the mask. report.csv gets the columns explain_cases (names joined with |,
largest share first) and explain_shares (the shares, 3 decimals; the frames of a video joined with ;), and every
image and frame a picture beside its mask, <stem>_explain.png (<stem>_frame0003_explain.png for a frame of a video,
DICOM included): the input with the predicted contour, then the K cases with their names and shares. The cases'
pictures are read on this machine, from --explain-root or from the training folder the model record names, where
they are; a case not found is a grey tile with its name (a model carries the names of its memory's cases, never
their pictures). It needs the PyTorch network (--checkpoint, or a bundle's models/model.pt, taken before its
model.ts); a model whose memory is empty or does not record its cases gets its masks and a report column
explain_note saying why.

Research use only: not a medical device, not for diagnosis."""

_EPILOG = """\
output on stderr: the model line (file, SHA-256, what it was trained on and at which size), a line of what was
assumed where the model does not say, progress bars, then a line per input skipped, partly segmented or failed, and a
summary line.

exit status: 0 every input written, already done, or skipped as no image; 1 some inputs failed or were only partly
segmented (all others were processed; see report.csv); 2 bad command line, no usable model, an option that
contradicts the model, no input found, or inputs that would share an output (nothing written); 130 interrupted (rerun
to resume)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="a picture file, a folder of pictures, or a DICOM study folder")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    model = parser.add_argument_group("model (one of)")
    model.add_argument(
        "--checkpoint",
        metavar="MODEL_PT",
        help="network weights (a bundle's models/model.pt, or a training checkpoint), with the model.json beside it",
    )
    model.add_argument(
        "--torchscript", metavar="MODEL_TS", help="TorchScript export (a bundle's models/model.ts), its record embedded"
    )
    model.add_argument(
        "--bundle",
        metavar="DIR",
        help="bundle folder: DIR/models/model.ts if present, else DIR/models/model.pt, with DIR/models/model.json "
        "(default: the installed polyp_ecrm bundle)",
    )
    model.add_argument(
        "--onnx",
        metavar="MODEL_ONNX",
        help="ONNX export with its model record (models/model.onnx, or an INT8 models/model.int8.onnx), run by ONNX "
        "Runtime on the CPU; input size, normalisation and threshold from the record",
    )
    model.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of --onnx (default 2)")
    arch = parser.add_argument_group(
        "architecture (the model's weights show it: these only check it, or name the encoder of a TorchScript model "
        "that is no ECRM-UNet)"
    )
    arch.add_argument(
        "--backbone",
        help="encoder name, e.g. resnet34 or efficientnet-lite0; for a model without a record it also selects the "
        "input normalisation (EfficientNet-Lite: (x-127)/128, others: ImageNet mean/std)",
    )
    arch.add_argument("--bank-size", type=int, help="ECRM memory slots")
    arch.add_argument(
        "--use-icrm", action=argparse.BooleanOptionalAction, default=None, help="network with the ICRM branch"
    )
    options = parser.add_argument_group("inference")
    options.add_argument(
        "--spatial-size",
        type=int,
        help="network input size in pixels, for a model whose record does not state it (default 352, or a bundle's "
        "configs/inference.json for a bundle trained before records)",
    )
    options.add_argument(
        "--threshold",
        type=float,
        help="foreground probability threshold of the masks (default: the model record's, else the bundle's or 0.5)",
    )
    options.add_argument(
        "--probabilities",
        action="store_true",
        help="write foreground probabilities instead of masks: FRACTIONAL DICOM SEG (0..255), 0..255 PNG, float NIfTI",
    )
    options.add_argument("--dicom-png", action="store_true", help="also write PNG masks for DICOM inputs")
    options.add_argument(
        "--overwrite",
        action="store_true",
        help="segment every input again and replace its outputs, even those this model already made (without it, "
        "only outputs made by this model for that input are skipped; others are replaced and reported as such)",
    )
    options.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    options.add_argument(
        "--bf16",
        action="store_true",
        help="run the PyTorch model under bfloat16 autocast (CPUs with AVX-512 BF16 or AMX, recent GPUs); logits "
        "back to float32 before the threshold",
    )
    options.add_argument("--no-progress", action="store_true", help="no progress bars")
    explain = parser.add_argument_group("memory provenance")
    explain.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="K",
        help="name the K memory cases each image drew on most, with their shares: report.csv columns explain_cases "
        "and explain_shares, and <stem>_explain.png beside each mask (PyTorch models only; default 0: none)",
    )
    explain.add_argument(
        "--explain-root",
        action="append",
        metavar="DIR",
        help="folder holding the memory cases' pictures (repeatable; looked in before the training folder the model "
        "record names)",
    )
    return parser


@contextlib.contextmanager
def _command_logging() -> Iterator[None]:
    """The command's lines on stderr, once each; highdicom's INFO lines silenced; all restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    highdicom = logging.getLogger("highdicom")
    saved = logger.level, logger.propagate, highdicom.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    highdicom.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        highdicom.setLevel(saved[2])


@dataclass
class _Model:
    """The model a command line names, the settings it runs with (``spatial_size``, ``normalization``,
    ``threshold``), its record (``recorded``: the file has one) and what identifies it in the outputs."""

    network: torch.nn.Module | ModelRunner
    file: Path
    backbone: str
    bundle_root: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False
    installed: bool = False

    @functools.cached_property
    def sha256(self) -> str:
        """The model file's SHA-256, first 12 hex digits."""
        return model_sha256(self.file)[:12]

    def columns(self) -> dict[str, str]:
        """The report's model columns."""
        return {"model": str(self.file), "model_sha256": self.sha256}

    def algorithm_parameters(self) -> dict[str, Any]:
        """The model's parameters in the SEGs' algorithm identification."""
        trained = trained_on(self.record) if self.recorded else "unknown (no model record)"
        return {"model": self.file.name, "model_sha256": self.sha256, "backbone": self.backbone, "trained_on": trained}


def _no_model(bundle_root: Path) -> str:
    return (
        f"no trained model: {bundle_root / 'models'} holds neither model.ts nor model.pt; train one (python -m "
        f"monai.bundle run --config_file {bundle_root / 'configs' / 'train.json'} --bundle_root {bundle_root} "
        "--dataset_dir DATA) or give --checkpoint, --torchscript or --bundle"
    )


def _load(args: argparse.Namespace, device: str) -> _Model:
    """The model of the command line (the installed bundle's when none is given), run as its record says.

    A bundle (``--bundle DIR``, or the installed one) runs ``models/model.pt``, or its TorchScript export
    ``models/model.ts`` when that names ``model.pt``'s SHA-256 as the weights it was exported from (its embedded
    record's ``exported_from``, which ``python -m monai_ecrm.record embed`` writes) and ``--explain`` is not asked for.
    An export that does not is stale, or may be: ``model.pt`` runs, and a warning names the export and how to
    re-export it. Without ``model.pt``, ``model.ts`` runs as it is.

    Raises:
        ValueError: no usable model, or an option that contradicts it (:class:`~monai_ecrm.record.RecordConflictError`).
    """
    if args.onnx:
        from monai_ecrm.clinical.onnx_runner import OnnxRunner

        names = ("backbone", "bank_size", "use_icrm", "spatial_size", "threshold")
        stated = {name: getattr(args, name) for name in names}
        runner = OnnxRunner(args.onnx, threads=args.threads, flags=stated, labels={"flags": "the command line"})
        return _Model(
            runner, Path(args.onnx), runner.backbone, settings=runner.settings, record=runner.record, recorded=True
        )
    bundle_root = None
    checkpoint, torchscript = args.checkpoint, args.torchscript
    if not (checkpoint or torchscript):
        from monai_ecrm.bundle import bundle_path
        from monai_ecrm.record import file_sha256

        bundle_root = Path(args.bundle) if args.bundle else bundle_path()
        models = bundle_root / "models"
        exported, weights = models / "model.ts", models / "model.pt"
        # --explain needs the PyTorch network's memory attention, which a TorchScript file does not have
        if weights.is_file() and (args.explain or not exported.is_file()):
            checkpoint = weights
        elif exported.is_file() and not weights.is_file():
            torchscript = exported
        elif exported.is_file():
            origin = (read_record(exported) or {}).get("exported_from") or {}
            digest = file_sha256(weights)
            if origin.get("sha256") == digest:
                torchscript = exported
            else:
                checkpoint = weights
                why = (
                    f"is stale: it was exported from {origin.get('file', 'weights')} sha256 {origin['sha256'][:12]}, "
                    f"{weights.name} is sha256 {digest[:12]}"
                    if origin.get("sha256")
                    else "does not name the weights it was exported from (no exported_from in its record)"
                )
                logger.warning(
                    "model: %s %s; running %s instead. Re-export it: python -m monai.bundle ckpt_export network_def "
                    "--filepath %s --ckpt_file %s --config_file %s --bundle_root %s, then python -m monai_ecrm.record "
                    "embed %s",
                    exported,
                    why,
                    weights,
                    exported,
                    weights,
                    bundle_root / "configs" / "inference.json",
                    bundle_root,
                    exported,
                )
        else:
            raise ValueError(_no_model(bundle_root))
    file = Path(checkpoint or torchscript)
    _check_model_file(file, "checkpoint" if checkpoint else "torchscript", bundle_root)
    recorded = read_record(file) is not None
    flags: dict[str, Any] = {}
    if bundle_root is not None and not recorded:  # a bundle trained before records: its config's values, below ours
        settings = bundle_settings(bundle_root)
        flags = {key: settings[key] for key in ("spatial_size", "threshold") if key in settings}
    given = {
        "backbone": args.backbone,
        "bank_size": args.bank_size,
        "use_icrm": args.use_icrm,
        "spatial_size": args.spatial_size,
        "threshold": args.threshold,
    }
    flags.update((key, value) for key, value in given.items() if value is not None)
    labels = {"flags": "the command line"}
    try:
        network, record = load_model_and_record(checkpoint, torchscript, flags, device, labels)
    except ValueError as error:
        if "weights_only" not in str(error):
            raise
        # torch's advice (weights_only=False) would run code from the file: say what the file holds instead
        raise ValueError(
            f"{file}: holds Python objects besides tensors (a pickled network or training state?), which are not "
            "loaded since unpickling them could run code from the file: give the network's state dict "
            "(torch.save(network.state_dict(), ...)) or its TorchScript export (--torchscript)"
        ) from None
    settings = {key: record["preprocessing"][key] for key in ("spatial_size", "normalization")}
    settings["threshold"] = record["threshold"]
    backbone = record["network"]["kwargs"]["backbone"]
    installed = not (args.checkpoint or args.torchscript or args.bundle)
    return _Model(network, file, backbone, bundle_root, settings, record, recorded, installed)


_MODEL_OPTIONS = {
    "checkpoint": "PyTorch weights (a state dict or training checkpoint)",
    "torchscript": "a TorchScript file",
    "onnx": "an ONNX file",
}
"""What each model option takes, by the kind :func:`_model_file_kind` gives."""


def _model_file_kind(path: Path) -> str:
    """What a model file is, from its first bytes and (for a zip archive) its members: ``"checkpoint"`` (a
    ``torch.save`` archive or a legacy pickle), ``"torchscript"``, ``"onnx"``, ``"json"``, ``"zip"`` (another zip
    archive), ``"empty"`` or ``"other"``; nothing in it is unpickled or run."""
    with open(path, "rb") as stream:
        head = stream.read(512)
    if not head:
        return "empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        return "checkpoint" if any(name.endswith("data.pkl") for name in names) else "zip"
    if head[:1] == b"\x80":  # a pickle (protocol 2+): torch.save's format before PyTorch 1.6
        return "checkpoint"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    # an ONNX ModelProto starts with ir_version (field 1, varint) and names its producer (field 2) or graph
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"\x12" in head[2:4]):
        return "onnx"
    return "other"


def _model_file_problem(path: Path, option: str) -> str | None:
    """One line naming ``path`` and why ``--<option>`` cannot take it (another option's kind of file, or no model at
    all), or ``None`` when it is the option's kind of file (whether it loads is for the loader to say)."""
    if not path.exists():
        return f"{path}: no such file"
    if path.is_dir():
        return f"{path}: a folder, not a model file (a bundle folder is given with --bundle)"
    try:
        kind = _model_file_kind(path)
    except OSError as error:
        return f"{path}: cannot be read: {error}"
    if kind == option:
        return None
    if kind in _MODEL_OPTIONS:
        return f"{path} is {_MODEL_OPTIONS[kind]}, not {_MODEL_OPTIONS[option]}: use --{kind} {path}"
    what = {
        "empty": "an empty file (0 bytes)",
        "json": "a JSON file (a model record?), not the model: give the weights file it describes",
        "zip": "a zip archive that is no PyTorch file",
    }.get(kind, "not a model file (neither PyTorch, TorchScript nor ONNX)")
    return f"{path} is {what}" if kind != "other" else f"{path}: {what}"


def _check_model_file(path: Path, option: str, bundle_root: Path | None = None) -> None:
    """Raise the one-line error of :func:`_model_file_problem` (for a model a bundle folder holds, naming
    ``--bundle``).

    Raises:
        ValueError: ``path`` is not the kind of file ``--<option>`` takes.
    """
    problem = _model_file_problem(path, option)
    if problem is not None:
        if bundle_root is not None:
            problem += f" (the model of --bundle {bundle_root})"
        raise ValueError(problem)


def _log_model(model: _Model) -> None:
    """The model line, and the line of what was assumed for it."""
    spatial_size = model.settings["spatial_size"]
    sizes = spatial_size if isinstance(spatial_size, (list, tuple)) else [spatial_size] * 2
    size = "x".join(map(str, sizes))
    if model.recorded:
        about = f"trained on {trained_on(model.record)} at {size} px"
    else:
        about = "no model record: what it was trained on, and at which input size, is unknown"
    installed = " (the installed bundle's: no model option given)" if model.installed else ""
    logger.info("model: %s (sha256 %s)%s: %s", model.file, model.sha256, installed, about)
    assumed = {
        "preprocessing.spatial_size": f"input size {size} px",
        "preprocessing.normalization": f"normalisation {model.settings['normalization']!r}",
        "threshold": f"threshold {model.settings['threshold']:g}",
    }
    defaulted = [text for name, text in assumed.items() if name in model.record.get("assumed", ())]
    if defaulted:
        logger.warning(
            "model: assumed %s: the model does not state them (a model record does; --spatial-size, --backbone and "
            "--threshold state them here)",
            ", ".join(defaulted),
        )


def _onnx_conflict(args: argparse.Namespace) -> str | None:
    """What an ``--onnx`` command line also asks for that an ONNX model cannot do, if anything."""
    if args.explain:
        return (
            "--explain needs the PyTorch network's memory attention, which an ONNX model does not give: use the "
            "--checkpoint (models/model.pt) it was exported from"
        )
    if args.bf16:
        return "--bf16 is for a PyTorch model: an ONNX model runs in its file's precision (float32 or INT8)"
    if args.device and args.device.split(":")[0] != "cpu":
        return f"--device {args.device}: an ONNX model runs on the CPU (ONNX Runtime's CPU provider)"
    return None


def _explaining(args: argparse.Namespace, model: _Model, device: str) -> tuple[ExplainingRunner, CasePictures | None]:
    """The runner of ``--explain K`` and the memory cases' pictures (``None`` when nothing can be explained); logs
    the ``explain`` lines."""
    runner = ExplainingRunner(model.network, args.explain, device, "bf16" if args.bf16 else None, model.record)
    if runner.problem:
        logger.warning("explain: %s; masks written without explanations (report.csv: %s)", runner.problem, NOTE_COLUMN)
        return runner, None
    dataset_dir = (model.record.get("training") or {}).get("dataset_dir")
    pictures = CasePictures([*(args.explain_root or []), dataset_dir])
    for message in explain_messages(runner.names, args.explain, pictures, "--explain", "--explain-root"):
        logger.info(message)
    return runner, pictures


def _summary(results: Sequence[InputResult], report: Path) -> int:
    """Log a line per input skipped, partial or failed and the summary line; the exit status."""
    for result in results:
        if result.status in _EVENT_LEVELS:
            logger.log(_EVENT_LEVELS[result.status], "%s: %s: %s", result.status, result.input, result.detail)
    replaced = sum(result.status != "failed" and "replaced-" in result.detail for result in results)
    if replaced:
        logger.warning(
            "replaced the outputs of %d inputs made by another model, for another input, incomplete or of unknown "
            "origin (report.csv: detail)",
            replaced,
        )
    counts = {status: sum(result.status == status for result in results) for status in ("written", "skipped-existing")}
    skipped = sum(result.status == "skipped" for result in results)
    failed = sum(result.status in ("failed", "partial") for result in results)
    logger.info(
        "%d written, %d already done, %d skipped, %d failed; report: %s",
        counts["written"],
        counts["skipped-existing"],
        skipped,
        failed,
        report,
    )
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monai-ecrm-infer`` (see ``--help``); returns the exit status.

    Args:
        argv: command line arguments (``sys.argv[1:]`` when not given).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    given = [name for name in ("checkpoint", "torchscript", "bundle", "onnx") if getattr(args, name)]
    if len(given) > 1:
        parser.error(f"give one model: --{' and --'.join(given)} given")
    if args.explain < 0:
        parser.error(f"--explain {args.explain}: give the number of memory cases to name (0: none)")
    if args.explain_root and not args.explain:
        parser.error("--explain-root is for --explain K")
    conflict = _onnx_conflict(args) if args.onnx else None
    if conflict:
        parser.error(conflict)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output)
    data_root_dir = args.input if Path(args.input).is_dir() else ""
    with _command_logging():
        try:
            model = _load(args, device)
            inputs = find_inputs(args.input, exclude=[output_dir])
            if not inputs:
                raise ValueError(f"{args.input}: no file found")
            # two inputs sharing an output: before anything is written
            output_stems(inputs, output_dir, data_root_dir, dicom_png=args.dicom_png or bool(args.explain))
            if args.explain and not callable(getattr(model.network, "forward_with_shares", None)):
                raise ValueError(
                    f"--explain needs the network's memory attention, which a TorchScript model does not have "
                    f"({model.file}): give the checkpoint it was exported from (--checkpoint models/model.pt)"
                )
        except (ValueError, FileNotFoundError, ImportError) as error:  # ImportError: --onnx without onnxruntime
            logger.error("error: %s", error)
            return EXIT_USAGE
        _log_model(model)
        runner: torch.nn.Module | ModelRunner = model.network
        pictures = None
        columns = model.columns()
        if args.explain:
            runner, pictures = _explaining(args, model, device)
            if runner.problem:
                columns[NOTE_COLUMN] = runner.problem
        elif args.bf16:
            runner = TorchRunner(model.network, device, autocast="bf16")
        job = ClinicalInference(
            runner,
            output_dir,
            spatial_size=args.spatial_size or model.settings.get("spatial_size", 352),
            normalization=model.settings.get("normalization") or normalization_for_backbone(model.backbone),
            threshold=args.threshold if args.threshold is not None else model.settings.get("threshold", 0.5),
            probabilities=args.probabilities,
            dicom_png=args.dicom_png,
            overwrite=args.overwrite,
            data_root_dir=data_root_dir,
            device=device,
            progress=not args.no_progress,
            bundle_root=model.bundle_root,
            algorithm_parameters=model.algorithm_parameters(),
            case_pictures=pictures,
            model_columns=model.columns(),
        )
        results: list[InputResult] = []
        try:
            job.run(inputs, results)
        except KeyboardInterrupt:
            write_report(results, output_dir / REPORT_NAME, columns)
            logger.warning("interrupted after %d of %d inputs", len(results), len(inputs))
            return EXIT_INTERRUPTED
        return _summary(results, write_report(results, output_dir / REPORT_NAME, columns))
