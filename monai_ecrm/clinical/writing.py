"""Where outputs go and how they get there: output names, and files that appear only when complete.

:func:`prediction_path` names the output of a source file (or of one frame of it); :func:`expected_outputs` lists every
output a finished input has, which is how a rerun knows what is already done. :class:`PartialFolder` is a private
folder inside the output folder where files are written before they are renamed into place (an atomic rename on one
file system), so an interrupted job leaves no half-written output; the folders of killed jobs are removed by the next
job writing there.

Two inputs never share an output. :func:`output_stems` names a job's outputs: an input's output stem is its file stem
(``a.png -> a_seg.png``), except where several inputs of one output folder share a file stem (ignoring case): each of
those keeps its suffix in the stem (``a.png -> a_png_seg.png``, ``a.jpg -> a_jpg_seg.png``, ``a.nii.gz ->
a_nii_gz_seg.nii.gz``; a DICOM file without an extension keeps its plain stem). The rule depends only on the file
names, so a rerun gives the same names and skips the inputs whose outputs exist. Names that would still meet
(``a_png.bmp`` beside ``a.png`` and ``a.jpg``) are an :class:`OutputCollisionError` before anything is written.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

from monai_ecrm.data.image_io import file_stem, picture_format

__all__ = [
    "PARTIAL_DIR",
    "OutputCollisionError",
    "PartialFolder",
    "expected_outputs",
    "output_stems",
    "prediction_path",
    "source_key",
]

PARTIAL_DIR = ".monai-ecrm-partial"
"""Folder inside the output folder where files are written before they are renamed into place."""


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


def output_stems(
    sources: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    data_root_dir: str | os.PathLike = "",
    output_postfix: str = "seg",
) -> dict[str, str]:
    """The output stem of each source of a job, by :func:`source_key`: its file stem, or, where several sources of one
    output folder share a file stem (compared ignoring case, as a case-insensitive file system would), the file stem
    and the source's suffix (``a.png -> a_png``, ``a.nii.gz -> a_nii_gz``; a file without a suffix keeps its stem).

    The stems depend only on the sources' names, so every rerun of a job gives the same ones.

    Args:
        sources: the job's input files.
        output_dir: the output folder.
        data_root_dir: folder whose sub-folder layout is kept in the output.
        output_postfix: appended to the stems (named in the error).

    Raises:
        OutputCollisionError: two sources would still get one output stem (``a.png``, ``a.jpg`` and ``a_png.bmp``),
            naming both.
    """
    groups: dict[tuple[Path, str], list[Path]] = {}
    for source in map(Path, sources):
        key = (_output_folder(source, output_dir, data_root_dir), file_stem(source).casefold())
        groups.setdefault(key, []).append(source)
    stems: dict[str, str] = {}
    owners: dict[tuple[Path, str], Path] = {}
    for (folder, _), members in groups.items():
        for source in members:
            stem = file_stem(source)
            suffix = source.name[len(stem) :].lstrip(".").replace(".", "_")
            if len(members) > 1 and suffix:
                stem = f"{stem}_{suffix}"
            owner = owners.setdefault((folder, stem.casefold()), source)
            if owner != source:
                raise OutputCollisionError(
                    f"{owner} and {source} would both be written as {folder / stem}_{output_postfix}.*; rename one "
                    "of them"
                )
            stems[source_key(source)] = stem
    return stems


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
        stem: the output stem (see :func:`output_stems`); the source's file stem when not given.
    """
    source = Path(source)
    folder = _output_folder(source, output_dir, data_root_dir)
    stem = file_stem(source) if stem is None else stem
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
        stem: the output stem (see :func:`output_stems`); the source's file stem when not given.
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
    :meth:`close`, or at exit.

    Args:
        output_dir: the output folder (the rename stays on its file system).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
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
        """Rename a complete file of the private folder to its final path (its folder created if needed)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        _replace(written, final)
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
