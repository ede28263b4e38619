""":class:`SaveDicomSegd`: the post-processing step that writes every prediction as a clinical pipeline needs it.

A SEG per DICOM source instance (:func:`~monai_ecrm.clinical.seg.build_dicom_seg`; the frames of a multi-frame
source are collected, bit-packed, until the last one arrives), the bundle's PNG/NIfTI masks for every other format,
each written in a :class:`~monai_ecrm.writing.PartialFolder` and renamed into place when complete. A SEG with
only some of its source's frames (:meth:`SaveDicomSegd.flush`) is published under
:func:`~monai_ecrm.writing.partial_output_path` (``video_seg.partial.dcm``), never under its final name.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_ecrm.clinical.seg import SEG_SERIES_NUMBER, build_dicom_seg, bundle_version, derive_seg, encode_frame
from monai_ecrm.clinical.sources import DicomSource
from monai_ecrm.transforms.io import SavePredictiond
from monai_ecrm.writing import PartialFolder, partial_output_path, prediction_path, source_key

__all__ = ["SaveDicomSegd"]


@dataclass
class _PendingSeg:
    """Frames of a multi-frame DICOM source collected until the last one arrives."""

    num_frames: int
    frames: dict[int, np.ndarray] = field(default_factory=dict)


class SaveDicomSegd(MapTransform):
    """Write predictions as a clinical pipeline needs them: a DICOM SEG per DICOM source instance (see
    :func:`~monai_ecrm.clinical.seg.build_dicom_seg`), the bundle's PNG/NIfTI masks
    (:class:`~monai_ecrm.transforms.SavePredictiond`) for every other source, at the paths of
    :func:`~monai_ecrm.writing.prediction_path`.

    Predictions come as ``Invertd`` gives them (``[1, W, H]`` at the source's size, carrying the source's metadata):
    0/1 masks, or foreground probabilities with ``probabilities=True`` (a FRACTIONAL SEG, 0..255 PNGs, float
    NIfTI). A frame of a multi-frame DICOM source is kept, bit-packed, until every frame of that source has come; then
    its SEG is written (and a ``.partial`` SEG of an earlier job for it removed). :meth:`flush` writes a SEG with the
    frames that came (a job whose other frames could not be decoded) under
    :func:`~monai_ecrm.writing.partial_output_path` (``video_seg.partial.dcm``): not under the final name,
    which only a SEG of every frame gets, so a rerun does not take it for done. Every file is written in a private
    folder inside ``output_dir`` and renamed into place when complete.

    A SEG is built from its source's header: the one a job handed over with :meth:`use_source` (read once for
    decoding and writing), else read from the file when the SEG is written. Outputs are named with the stems a job sets
    in :attr:`output_stems` (:func:`~monai_ecrm.writing.output_stems`: two inputs never share an output), a
    source's file stem otherwise.

    Args:
        keys: keys of the predictions.
        output_dir: the output folder.
        probabilities: the predictions are probabilities (FRACTIONAL SEG) rather than masks (BINARY SEG).
        dicom_png: also write the PNG masks of DICOM sources.
        data_root_dir: keep the sources' sub-folders below this folder in the output.
        output_postfix: appended to the sources' file stems.
        algorithm_version: version in the SEG's algorithm identification (the installed bundle's when not given).
        algorithm_parameters: parameters named in the algorithm identification.
        series_number: Series Number of the segmentation series (one new series per source series and job).
        allow_missing_keys: do not raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./output",
        probabilities: bool = False,
        dicom_png: bool = False,
        data_root_dir: str | os.PathLike = "",
        output_postfix: str = "seg",
        algorithm_version: str | None = None,
        algorithm_parameters: Mapping[str, Any] | None = None,
        series_number: int = SEG_SERIES_NUMBER,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.probabilities = probabilities
        self.dicom_png = dicom_png
        self.data_root_dir = data_root_dir
        self.output_postfix = output_postfix
        self.algorithm_version = algorithm_version or bundle_version()
        self.algorithm_parameters = dict(algorithm_parameters or {})
        self.series_number = series_number
        self.output_stems: dict[str, str] = {}
        self.partial = PartialFolder(output_dir)
        self._series_uids: dict[str, str] = {}
        self._pending: dict[str, _PendingSeg] = {}
        self._sources: dict[str, DicomSource] = {}
        self._png_writer: SavePredictiond | None = None

    # -------------------------------------------------------------------------------------------------- sources
    def use_source(self, source: DicomSource) -> None:
        """Build the SEG of ``source.path`` from this header rather than read it again (until :meth:`flush` or
        :meth:`discard` of that source).

        Args:
            source: the source's header, as the job read it.
        """
        self._sources[str(source.path)] = source

    def source_header(self, source_path: str | os.PathLike):
        """The header of a DICOM source: the one given to :meth:`use_source`, else read from the file
        (:func:`~monai_ecrm.clinical.sources.read_dicom_source`).

        Args:
            source_path: the DICOM source file.
        """
        source = self._sources.get(str(source_path))
        return (source or DicomSource.read(source_path)).dataset

    # ---------------------------------------------------------------------------------------------------- files
    def close(self) -> None:
        """Remove the private folder of partial files (called at the end of a job; also done at exit)."""
        self.partial.close()
        self._png_writer = None  # it writes into the folder just removed
        self._sources.clear()

    def _save_png(self, prediction: Any) -> Path:
        meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
        folder = self.partial.folder
        if self._png_writer is None:
            self._png_writer = SavePredictiond(keys="pred", output_dir=folder, probabilities=self.probabilities)
        for stale in folder.iterdir():
            stale.unlink()
        self._png_writer({"pred": prediction})
        written = [path for path in folder.iterdir() if path.is_file()]
        if len(written) != 1:
            raise RuntimeError(f"expected one file from SavePredictiond in {folder}, found {written}")
        frame = meta.get("frame_index", -1)
        final = prediction_path(
            meta["source_path"],
            self.output_dir,
            None if frame is None or int(frame) < 0 else int(frame),
            self.data_root_dir,
            self.output_postfix,
            dicom_seg=False,
            stem=self.output_stems.get(source_key(meta["source_path"])),
        )
        return self.partial.publish(written[0], final)

    # ------------------------------------------------------------------------------------------------------ SEG
    def _identification(self, header) -> dict[str, Any]:
        from pydicom.uid import generate_uid

        series = str(header.SeriesInstanceUID)
        if series not in self._series_uids:
            self._series_uids[series] = generate_uid()
        return dict(
            series_instance_uid=self._series_uids[series],
            series_number=self.series_number,
            algorithm_version=self.algorithm_version,
            algorithm_parameters=self.algorithm_parameters,
        )

    def _write_seg(
        self, source_path: str, masks: np.ndarray | None, pending: _PendingSeg | None, incomplete: bool = False
    ) -> Path:
        """Build and publish the SEG of a source: under its final name, or under its ``.partial`` name when
        ``incomplete`` (some frames missing)."""
        header = self.source_header(source_path)
        identification = self._identification(header)
        if pending is None:
            seg = build_dicom_seg(header, masks, fractional=self.probabilities, **identification)
        else:
            numbers = sorted(pending.frames)
            encoded = [pending.frames[n] for n in numbers]
            seg = derive_seg(header, None, encoded, [n + 1 for n in numbers], self.probabilities, identification)
        stem = self.output_stems.get(source_key(source_path))
        final = prediction_path(source_path, self.output_dir, None, self.data_root_dir, self.output_postfix, stem=stem)
        stale = partial_output_path(final)
        if incomplete:
            final, stale = stale, None
        written = self.partial.folder / final.name
        seg.save_as(written)
        published = self.partial.publish(written, final)
        if stale is not None and stale.is_file():  # the partial SEG of an earlier job: this one holds every frame
            stale.unlink()
        return published

    def _collect(self, prediction: Any) -> None:
        meta = prediction.meta
        source_path = str(meta["source_path"])
        array = _as_rows_columns(prediction)
        values = array if self.probabilities else array > 0.5
        num_frames = int(meta.get("num_frames", 1))
        if num_frames == 1:
            self._write_seg(source_path, values, None)
            return
        pending = self._pending.setdefault(source_path, _PendingSeg(num_frames))
        pending.frames[int(meta["frame_index"])] = encode_frame(values, self.probabilities)
        if len(pending.frames) == pending.num_frames:
            del self._pending[source_path]
            self._write_seg(source_path, None, pending)

    def flush(self, source_path: str | os.PathLike | None = None) -> list[Path]:
        """Write the SEGs of multi-frame sources still waiting for frames, with the frames that came, under their
        ``.partial`` names (:func:`~monai_ecrm.writing.partial_output_path`); the headers given to
        :meth:`use_source` for them are then let go.

        Args:
            source_path: only this source; all when not given.

        Returns:
            The files written.
        """
        sources = list(self._pending) if source_path is None else [str(source_path)]
        written = []
        try:
            for source in sources:
                pending = self._pending.pop(source, None)
                if pending is not None and pending.frames:
                    written.append(self._write_seg(source, None, pending, incomplete=True))
        finally:
            for source in list(self._sources) if source_path is None else [str(source_path)]:
                self._sources.pop(source, None)
        return written

    def discard(self, source_path: str | os.PathLike) -> None:
        """Forget the frames collected for a source, and its header (a job that gives it up).

        Args:
            source_path: the source file.
        """
        self._pending.pop(str(source_path), None)
        self._sources.pop(str(source_path), None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            meta = prediction.meta if isinstance(prediction, MetaTensor) else {}
            if meta.get("source_format") == "dicom":
                self._collect(prediction)
                if self.dicom_png:
                    self._save_png(prediction)
            else:
                self._save_png(prediction)
        return d


def _as_rows_columns(prediction: Any) -> np.ndarray:
    """A ``[1, W, H]`` prediction (MONAI's reader layout) as a ``[H, W]`` float array."""
    array = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
    if array.ndim != 3 or array.shape[0] != 1:
        raise ValueError(f"expected a one-channel prediction [1, W, H], got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array[0].T.astype(np.float32))
