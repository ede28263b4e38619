"""The ``monai-ecrm-infer`` command (also ``python -m monai_ecrm.infer``): its options, and what it prints.

What a run prints on stderr, besides the progress bars (``--no-progress`` leaves them out), is a line per event, once
each, after the job, every line starting with ``monai-ecrm-infer:`` (logger ``monai_ecrm.clinical.cli``, at the level
given)::

    monai-ecrm-infer: skipped: <input>: <why it holds no image>               INFO, an input skipped as no image
    monai-ecrm-infer: partial: <input>: <n> of <m> frames segmented; <why>    WARNING, some frames not decoded
    monai-ecrm-infer: failed: <input>: <problem>                              ERROR, an input that failed
    monai-ecrm-infer: <w> written, <d> already done, <s> skipped, <f> failed; report: <output>/report.csv   INFO

The inputs written or already done have no line of their own: they are counted in the last line and listed in
``report.csv`` with every other input. An interrupted job prints, instead of those lines,
``monai-ecrm-infer: interrupted after <n> of <m> inputs`` (WARNING, exit status 130); a run that cannot start
``monai-ecrm-infer: error: <problem>`` (ERROR, exit status 2: no usable model, no input found; a bad command line gets
argparse's usage and error lines).

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
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_ecrm.clinical.job import ClinicalInference
from monai_ecrm.clinical.report import REPORT_NAME, InputResult, write_report
from monai_ecrm.clinical.runner import bundle_settings, load_model
from monai_ecrm.clinical.sources import find_inputs
from monai_ecrm.transforms import normalization_for_backbone

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
output on stderr: progress bars, then a line per input skipped, partly segmented or failed, and a summary line.

exit status: 0 every input written, already done, or skipped as no image; 1 some inputs failed or were only partly
segmented (all others were processed; see report.csv); 2 bad command line, no usable model or no input found;
130 interrupted (rerun to resume)."""


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
    """The model a command line names, and where its settings come from."""

    network: torch.nn.Module
    file: Path
    backbone: str
    bundle_root: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _load(args: argparse.Namespace, device: str) -> _Model:
    """The model of ``--checkpoint``, ``--torchscript`` or ``--bundle`` (the installed bundle when none is given),
    with the bundle's settings.

    Raises:
        ValueError: no usable model.
    """
    bundle_root = None
    settings: dict[str, Any] = {}
    checkpoint, torchscript = args.checkpoint, args.torchscript
    if not (checkpoint or torchscript):
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
    network = load_model(
        checkpoint=checkpoint,
        torchscript=torchscript,
        backbone=backbone,
        bank_size=args.bank_size if args.bank_size is not None else settings.get("bank_size", 20),
        use_icrm=args.use_icrm if args.use_icrm is not None else settings.get("use_icrm", False),
        device=device,
    )
    return _Model(network, Path(checkpoint or torchscript), backbone, bundle_root, settings)


def _summary(results: Sequence[InputResult], report: Path) -> int:
    """Log a line per input skipped, partial or failed and the summary line; the exit status."""
    for result in results:
        if result.status in _EVENT_LEVELS:
            logger.log(_EVENT_LEVELS[result.status], "%s: %s: %s", result.status, result.input, result.detail)
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
    given = [name for name in ("checkpoint", "torchscript", "bundle") if getattr(args, name)]
    if len(given) > 1:
        parser.error(f"give one model: --{' and --'.join(given)} given")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output)
    with _command_logging():
        try:
            model = _load(args, device)
            inputs = find_inputs(args.input, exclude=[output_dir])
            if not inputs:
                raise ValueError(f"{args.input}: no file found")
        except (ValueError, FileNotFoundError) as error:
            logger.error("error: %s", error)
            return EXIT_USAGE
        job = ClinicalInference(
            model.network,
            output_dir,
            spatial_size=args.spatial_size or model.settings.get("spatial_size", 352),
            normalization=normalization_for_backbone(model.backbone),
            threshold=args.threshold if args.threshold is not None else model.settings.get("threshold", 0.5),
            probabilities=args.probabilities,
            dicom_png=args.dicom_png,
            overwrite=args.overwrite,
            data_root_dir=args.input if Path(args.input).is_dir() else "",
            device=device,
            progress=not args.no_progress,
            bundle_root=model.bundle_root,
            algorithm_parameters={"model": model.file.name, "backbone": model.backbone},
        )
        results: list[InputResult] = []
        try:
            job.run(inputs, results)
        except KeyboardInterrupt:
            write_report(results, output_dir / REPORT_NAME)
            logger.warning("interrupted after %d of %d inputs", len(results), len(inputs))
            return EXIT_INTERRUPTED
        return _summary(results, write_report(results, output_dir / REPORT_NAME))
