"""An exported ECRM-UNet run by ONNX Runtime as a clinical job's model (``monai-ecrm-infer --onnx``).

An ONNX file written by ``python -m monai_ecrm.onnx export`` (float32) or ``quantize`` (INT8) carries the record of the
model (:mod:`monai_ecrm.onnx`): the network input size, the normalisation and the threshold it was made for, which the
export takes from the record of the checkpoint it exports (``models/model.json``, with what the model was trained on
and its memory's case names) and the checkpoint it was exported from (``exported_from``).
:class:`OnnxRunner` reads them into :attr:`OnnxRunner.settings`, the values a
:class:`~monai_ecrm.clinical.job.ClinicalInference` takes, so the frames go through the very transforms of the PyTorch
path (:func:`~monai_ecrm.clinical.pipeline.clinical_preprocessing`, the bundle's ``infer_transforms``) with the
record's values, and the logits through the same post-processing: only the runtime differs. What a user states beside
the file (``--spatial-size``, ``--backbone``, ...) is held against the record as for a PyTorch model
(:func:`~monai_ecrm.record.merge_record`): a contradiction is an error, the threshold may differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monai_ecrm.clinical.runner import FrameOutput, ModelRunner
from monai_ecrm.onnx import OnnxModelError, OnnxNetwork, record_preprocessing
from monai_ecrm.record import merge_record

__all__ = ["OnnxRunner"]


class OnnxRunner(ModelRunner):
    """A float32 or INT8 ONNX export of ECRM-UNet as a :class:`~monai_ecrm.clinical.runner.ModelRunner`, run by an
    ONNX Runtime CPU session (:class:`~monai_ecrm.onnx.OnnxNetwork`).

    Args:
        path: the ONNX file (``models/model.onnx``, ``models/model.int8.onnx``).
        threads: ONNX Runtime intra-op threads (one inter-op thread).
        flags: what the user states (``ECRMUNet`` arguments, ``spatial_size``, ``normalization``, ``threshold``;
            ``None`` values are not given), checked against the file's record; only the threshold may differ.
        labels: how errors name the sources (see :func:`~monai_ecrm.record.merge_record`), e.g. ``{"flags": "the
            command line"}``.

    Raises:
        OnnxModelError: naming the file and what was expected, when it is not ONNX, takes another input layout than
            float32 ``[N, 3, H, W]``, has no model record (or one whose preprocessing the bundle's transforms do not
            apply), gives more than one output channel, or is an INT8 model without its calibration record.
        RecordConflictError: a flag contradicts the record, naming both values.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int = 2,
        flags: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.network = OnnxNetwork(self.path, threads=threads)
        written = self.network.record
        channels = (written.get("output") or {}).get("channels", 1)
        if channels != 1:
            raise OnnxModelError(
                f"{self.path}: the model gives {channels} output channels; expected one (foreground logits of a "
                "polyp segmentation)."
            )
        record_preprocessing(written, self.path)  # the file's own mean/std, before the merge restates them by name
        self.record: dict[str, Any] = merge_record(
            None, written, flags, labels={"written": f"the record in {self.path}", **(labels or {})}
        )
        """The file's record merged with ``flags`` (:func:`~monai_ecrm.record.merge_record`)."""
        self.settings: dict[str, Any] = {
            "spatial_size": self.record["preprocessing"]["spatial_size"],
            "normalization": self.record["preprocessing"]["normalization"],
            "threshold": self.record["threshold"],
        }
        """The network input size ``[H, W]``, normalisation name and threshold to run with, by the names of
        :class:`~monai_ecrm.clinical.job.ClinicalInference`'s arguments."""
        self.backbone: str = self.record["network"]["kwargs"]["backbone"]
        self.precision: str = written.get("precision", "float32")

    def __call__(self, image: torch.Tensor) -> FrameOutput:
        logits = self.network(image.unsqueeze(0))
        if logits.ndim != 4 or logits.shape[:2] != (1, 1):
            raise ValueError(
                f"{self.path}: the model gives logits of shape {tuple(logits.shape)}; one channel [1, 1, H, W] expected"
            )
        return FrameOutput(logits[0])
