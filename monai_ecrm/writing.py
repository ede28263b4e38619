"""Where outputs go and how they get there: output names, and files that appear only when complete.

:func:`prediction_path` names the output of a source file (or of one frame of it); :func:`expected_outputs` lists every
output a finished input has, which is how a rerun knows what is already there. :class:`PartialFolder` is a private
folder inside the output folder where files are written before they are renamed into place (an atomic rename on one
file system), so an interrupted job leaves no half-written output; the folders of killed jobs are removed by the next
job writing there. A result that is complete as a file but not as an output (a SEG holding some of its source's
frames) is published under :func:`partial_output_path` (``video_seg.partial.dcm``), never under its final name, so
that a rerun does not take it for done.

An output's name depends on its input's own file name only, never on the other files of the folder or job
(:func:`output_stem`: the file stem, ``a.jpg -> a_seg.png``, ``a.nii.gz -> a_seg.nii.gz``, ``IM0001 ->
IM0001_seg.dcm``), so adding or removing a file never renames another file's output. Two inputs of one output folder
whose outputs would meet (``a.png`` and ``a.jpg``: ``a_seg.png``, compared ignoring case) are an
:class:`OutputCollisionError` of :func:`output_stems` before anything is written. Jobs of earlier versions named such
inputs ``a_png_seg.png`` and ``a_jpg_seg.png``; their ``report.csv`` rows still say so, and a rerun finds those files
through them (:mod:`~monai_ecrm.clinical.report`).
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

from monai_ecrm.data.errors import DataError
from monai_ecrm.data.image_io import file_stem, picture_format

__all__ = [
    "PARTIAL_DIR",
    "OutputCollisionError",
    "PartialFolder",
    "expected_outputs",
    "legacy_output_stem",
    "output_stem",
    "output_stems",
    "partial_output_path",
    "prediction_path",
    "source_key",
]

PARTIAL_DIR = ".monai-ecrm-partial"
"""Folder inside the output folder where files are written before they are renamed into place."""

PARTIAL_OUTPUT = ".partial"
"""Inserted before the extension of a result published incomplete (:func:`partial_output_path`)."""


class OutputCollisionError(ValueError):
    """Two inputs of a job would be written to the same output."""


def source_key(source: str | os.PathLike) -> str:
    """The key of a source file in the mapping of :func:`output_stems`: its absolute path."""
    return os.path.abspath(os.fspath(source))


def _output_folder(source: Path, output_dir: str | os.PathLike, data_root_dir: str | os.PathLike) -> Path:
    folder = Path(output_dir)
    if data_root_dir:
        try:
            folder = folder / source.resolve().parent.relative_to(Path(data_root_dir).resolve())
        except ValueError:  # not below data_root_dir: flat
            pass
    return folder


def output_stem(source: str | os.PathLike) -> str:
    """The output stem of a source file, from its own name alone: its file stem (``a.jpg -> a``, ``a.nii.gz -> a``,
    ``IM0001 -> IM0001``; see :func:`~monai_ecrm.data.image_io.file_stem`).

    Args:
        source: the source file.
    """
    return file_stem(source)


def legacy_output_stem(source: str | os.PathLike) -> str | None:
    """The output stem jobs of earlier versions gave a source when another input of its folder shared its file stem:
    the file stem, ``_`` and the extension with dots as underscores (``a.png -> a_png``, ``a.nii.gz -> a_nii_gz``);
    ``None`` for a file without an extension (it kept its plain stem). A rerun finds such outputs through the
    ``report.csv`` rows that list them.

    Args:
        source: the source file.
    """
    source = Path(source)
    stem = file_stem(source)
    suffix = source.name[len(stem) :].lstrip(".").replace(".", "_")
    return f"{stem}_{suffix}" if suffix else None


def _output_kinds(source: Path, dicom_png: bool) -> tuple[str, ...]:
    """The extensions of the outputs of a source (what two stems must not share); none for a file that is no image."""
    try:
        fmt = picture_format(source)
    except DataError:
        return ()
    if fmt == "dicom":
        return (".dcm", ".png") if dicom_png else (".dcm",)
    return (".nii.gz",) if fmt == "nifti" else (".png",)


def output_stems(
    sources: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    data_root_dir: str | os.PathLike = "",
    output_postfix: str = "seg",
    dicom_png: bool = False,
) -> dict[str, str]:
    """The output stem of each source of a job, by :func:`source_key`: :func:`output_stem`, a function of the source's
    own file name, checked here so that no two sources of one output folder get one output (compared ignoring case, as
    a case-insensitive file system would; ``a.dcm`` and ``a.png`` may share a stem: ``a_seg.dcm``, ``a_seg.png``, unless
    ``dicom_png``).

    The stems do not depend on which other files the job has, so every rerun, with files added or removed, gives each
    source the same name.

    Args:
        sources: the job's input files.
        output_dir: the output folder.
        data_root_dir: folder whose sub-folder layout is kept in the output.
        output_postfix: appended to the stems (named in the error).
        dicom_png: DICOM sources also get PNG outputs (masks or explanation pictures: ``a.dcm``'s ``a_seg.png`` then
            meets ``a.png``'s).

    Raises:
        OutputCollisionError: two sources would get one output (``a.png`` and ``a.jpg``: ``a_seg.png``), naming both
            and the output.
    """
    stems: dict[str, str] = {}
    owners: dict[tuple[Path, str], Path] = {}
    for source in map(Path, sources):
        folder = _output_folder(source, output_dir, data_root_dir)
        stem = output_stem(source)
        for kind in _output_kinds(source, dicom_png):
            name = f"{stem}_{output_postfix}{kind}"
            owner = owners.setdefault((folder, name.casefold()), source)
            if owner != source:
                raise OutputCollisionError(
                    f"{owner} and {source} would both be written as {folder / name}; rename one of them"
                )
        stems[source_key(source)] = stem
    return stems


def partial_output_path(final: str | os.PathLike) -> Path:
    """Where a result that is not the complete output is published: its final name with ``.partial`` before the
    extension (``video_seg.dcm -> video_seg.partial.dcm``; ``.nii.gz`` counts as one extension). A rerun does not take
    it for the output, and writing the complete output removes it.

    Args:
        final: the output's final path.
    """
    final = Path(final)
    name = final.name
    extension = ".nii.gz" if name.lower().endswith(".nii.gz") else final.suffix
    return final.with_name(f"{name[: len(name) - len(extension)]}{PARTIAL_OUTPUT}{extension}")


def prediction_path(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    frame: int | None = None,
    data_root_dir: str | os.PathLike = "",
    output_postfix: str = "seg",
    dicom_seg: bool = True,
    stem: str | None = None,
) -> Path:
    """Where the prediction for a source file (or one frame of it) is written.

    ``<output_dir>/<stem>_<postfix>.dcm`` for DICOM sources (one SEG per instance, all frames in it),
    ``<stem>_<postfix>.nii.gz`` for NIfTI, ``<stem>_<postfix>.png`` (``<stem>_frame0003_<postfix>.png`` for a frame of
    a multi-frame file) otherwise. Sources below ``data_root_dir`` keep their sub-folders under ``output_dir``.

    Args:
        source: the source file.
        output_dir: the output folder.
        frame: frame index of a multi-frame file (ignored for the DICOM SEG, which holds every frame).
        data_root_dir: folder whose sub-folder layout is kept in the output.
        output_postfix: appended to the stem.
        dicom_seg: the DICOM SEG path for DICOM sources; ``False`` gives their PNG path.
        stem: the output stem (see :func:`output_stems`); :func:`output_stem` of the source when not given.
    """
    source = Path(source)
    folder = _output_folder(source, output_dir, data_root_dir)
    stem = output_stem(source) if stem is None else stem
    fmt = picture_format(source)
    if fmt == "dicom" and dicom_seg:
        return folder / f"{stem}_{output_postfix}.dcm"
    if fmt == "nifti":
        return folder / f"{stem}_{output_postfix}.nii.gz"
    if frame is not None:
        stem = f"{stem}_frame{int(frame):04d}"
    return folder / f"{stem}_{output_postfix}.png"


def expected_outputs(
    source: str | os.PathLike,
    fmt: str,
    num_frames: int | None,
    output_dir: str | os.PathLike,
    data_root_dir: str | os.PathLike = "",
    dicom_png: bool = False,
    stem: str | None = None,
) -> list[Path]:
    """The files a finished input has: the SEG of a DICOM source (and with ``dicom_png`` its PNG masks), the mask of
    a picture, a PNG per frame of a multi-frame picture.

    Args:
        source: the source file.
        fmt: its :func:`~monai_ecrm.data.picture_format`.
        num_frames: its frames; only needed for PNG outputs (``None`` is enough for a DICOM source without them).
        output_dir: the output folder.
        data_root_dir: folder whose sub-folder layout is kept in the output.
        dicom_png: DICOM sources also get PNG masks.
        stem: the output stem (see :func:`output_stems`); :func:`output_stem` of the source when not given.
    """
    outputs = []
    if fmt == "dicom":
        outputs.append(prediction_path(source, output_dir, None, data_root_dir, stem=stem))
        if not dicom_png:
            return outputs
    if num_frames is None:
        raise ValueError(f"{source}: the number of frames is needed to name its PNG outputs")
    for frame in [None] if num_frames == 1 else range(num_frames):
        outputs.append(prediction_path(source, output_dir, frame, data_root_dir, dicom_seg=False, stem=stem))
    return outputs


class PartialFolder:
    """A private folder inside ``output_dir`` where files are written before :meth:`publish` renames them into place.

    Created on first use (then the leftovers of killed jobs, whose process is gone, are removed); removed by
    :meth:`close`, or at exit. :attr:`published` lists what was renamed into place, so that a job reports the files
    its input wrote, not files of the same names already there.

    Args:
        output_dir: the output folder (the rename stays on its file system).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.published: list[Path] = []
        """The final paths of the files published since the job last cleared it (what an input wrote)."""
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        """The private folder (created when first asked for)."""
        if self._folder is None:
            root = self.output_dir / PARTIAL_DIR
            if root.is_dir():  # leftovers of killed jobs: their files were never renamed into place
                for leftover in root.iterdir():
                    pid = leftover.name.split("-", 1)[0]
                    if not pid.isdigit() or not _pid_alive(int(pid)):
                        shutil.rmtree(leftover, ignore_errors=True)
            self._folder = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._folder.mkdir(parents=True)
            weakref.finalize(self, _remove_partial, self._folder)
        return self._folder

    def publish(self, written: Path, final: Path) -> Path:
        """Rename a complete file of the private folder to its final path (its folder created if needed), replacing
        the file there in one step, and add ``final`` to :attr:`published`."""
        final.parent.mkdir(parents=True, exist_ok=True)
        _replace(written, final)
        self.published.append(final)
        return final

    def close(self) -> None:
        """Remove the private folder and whatever was never published."""
        if self._folder is not None:
            _remove_partial(self._folder)
            self._folder = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(source: Path, destination: Path) -> None:
    """Atomic rename (both in the output folder, so on one file system)."""
    os.replace(source, destination)


def _remove_partial(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the shared partial folder, when no other job uses it
    except OSError:
        pass
