"""The model of a clinical job: loading it, and running it on one frame at a time.

A job talks to its model through a :class:`ModelRunner`: a callable that takes one pre-processed frame and gives a
:class:`FrameOutput`, the foreground logits and, where a runner has more to say about the frame, extra values for the
job's report (one column each). :class:`TorchRunner` runs a PyTorch module (a network or a TorchScript export, see
:func:`load_model`); another runtime (an ONNX Runtime session) is another runner, and the job does not change.
:class:`~monai_ecrm.clinical.explain.ExplainingRunner` also says which memory cases each frame drew on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from monai_ecrm.inferers import AutocastInferer

__all__ = [
    "BUNDLE_SETTINGS",
    "FrameOutput",
    "ModelRunner",
    "TorchRunner",
    "bundle_settings",
    "load_model",
    "load_model_and_record",
    "model_sha256",
    "trained_on",
]

BUNDLE_SETTINGS = {"backbone": str, "bank_size": int, "use_icrm": bool, "spatial_size": int, "threshold": float}
"""The plain top-level values of a bundle's ``configs/inference.json`` that :func:`bundle_settings` reads, and their
types."""


@dataclass
class FrameOutput:
    """What a model runner gives for one frame.

    Args:
        logits: foreground logits ``[1, H, W]`` at the network input's size (on any device).
        columns: values for the job's report, by column name (the values of the frames of one input are joined with
            ``;`` in its row); empty for a plain segmentation.
        explanation: the memory cases the frame drew on (an :class:`~monai_ecrm.clinical.explain.Explanation`, from
            an :class:`~monai_ecrm.clinical.explain.ExplainingRunner`), which the job draws beside the mask; ``None``
            for a plain segmentation.
    """

    logits: torch.Tensor
    columns: dict[str, str] = field(default_factory=dict)
    #: an ``Explanation`` (typed ``Any``: explain.py builds on this module, not the other way round)
    explanation: Any = None


class ModelRunner(Protocol):
    """Runs the model on one pre-processed frame ``[3, H, W]`` (float32, on the CPU) and gives its
    :class:`FrameOutput`; raises ``ValueError`` or ``RuntimeError`` when the model cannot (the input is then reported as
    failed)."""

    def __call__(self, image: torch.Tensor) -> FrameOutput: ...


class TorchRunner:
    """A PyTorch module (eval mode, logits ``[B, 1, H, W]`` for images ``[B, 3, H, W]``) as a :class:`ModelRunner`.

    Args:
        model: the network or a TorchScript module (see :func:`load_model`).
        device: where it runs; frames are moved there.
        autocast: run the model under ``torch.autocast`` on ``device`` with this dtype (``"bf16"``, ``"fp16"`` or a
            ``torch.dtype``; see :class:`~monai_ecrm.inferers.AutocastInferer`), its logits returned as float32 for the
            post-processing; ``None``: float32 throughout.
    """

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", autocast: str | torch.dtype | None = None
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.inferer = AutocastInferer(autocast, enabled=autocast is not None)

    def __call__(self, image: torch.Tensor) -> FrameOutput:
        with torch.no_grad():
            logits = self.inferer(image.unsqueeze(0).to(self.device), self.model)
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(
                f"the model gives logits of shape {tuple(logits.shape)}; one channel [B, 1, H, W] expected"
            )
        return FrameOutput(logits[0])


def bundle_settings(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The architecture and inference settings a bundle's ``configs/inference.json`` states as plain top-level values:
    ``backbone``, ``bank_size``, ``use_icrm``, ``spatial_size``, ``threshold`` (expressions are ignored).

    The file is read as JSON, not parsed as a MONAI config: nothing in it is imported or evaluated.

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
    backbone: str | None = None,
    bank_size: int | None = None,
    use_icrm: bool | None = None,
    device: str | torch.device = "cpu",
    ecrm_channels: int | None = None,
) -> torch.nn.Module:
    """The network in eval mode, from a checkpoint (a bundle's ``models/model.pt``) or a TorchScript export, built as
    its weights and record say (:func:`load_model_and_record`, which also gives the record).

    Args:
        checkpoint: a network state dict (``models/model.pt``, memory bank included) or a training checkpoint.
        torchscript: a TorchScript file (``models/model.ts`` of ``python -m monai.bundle ckpt_export``).
        backbone: encoder of the network, for a file that does not show it (``None``: as the model says).
        bank_size: ECRM memory slots (``None``: as the model says).
        use_icrm: whether the network has the ICRM branch (``None``: as the model says).
        device: where to run it.
        ecrm_channels: channels of the ECRM features (``None``: as the model says).

    Raises:
        RecordConflictError: a given value contradicts the model's weights or record, naming both values.
        ValueError: naming the file, when it cannot be read or is no model of this package.
    """
    flags = {"backbone": backbone, "bank_size": bank_size, "use_icrm": use_icrm, "ecrm_channels": ecrm_channels}
    return load_model_and_record(checkpoint, torchscript, flags, device)[0]


def load_model_and_record(
    checkpoint: str | os.PathLike | None = None,
    torchscript: str | os.PathLike | None = None,
    flags: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    labels: Mapping[str, str] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode and its merged record (:func:`monai_ecrm.record.merge_record`: architecture,
    ``preprocessing`` with ``spatial_size`` and ``normalization``, ``threshold``, ``training``, and under
    ``"assumed"`` what nobody stated and the package defaults filled in).

    A checkpoint's network is built from what its weights determine and its record (``model.json`` beside it) says
    (:func:`monai_ecrm.record.load_network`); a TorchScript file comes with its embedded record or the JSON beside it
    (:func:`monai_ecrm.record.load_torchscript`).

    Args:
        checkpoint: a network state dict (``models/model.pt``, ``final_model.pt``) or a training checkpoint (its
            ``network`` entry).
        torchscript: a TorchScript file (``models/model.ts``).
        flags: what the user states (``ECRMUNet`` arguments, ``spatial_size``, ``normalization``, ``threshold``;
            ``None`` values are not given): each fills only what the model does not say; the threshold may differ
            from the record's (an operating point).
        device: where to run it.
        labels: how errors name the sources (see :func:`~monai_ecrm.record.merge_record`), e.g. ``{"flags": "the
            command line"}``.

    Raises:
        RecordConflictError: a flag contradicts the model's weights or record, naming both values.
        ValueError: naming the file, when it cannot be read or is no model of this package.
    """
    from monai_ecrm.record import load_network, load_torchscript

    if (checkpoint is None) == (torchscript is None):
        raise ValueError("give exactly one of checkpoint (a model.pt state dict) and torchscript (a model.ts file)")
    if torchscript is not None:
        return load_torchscript(torchscript, flags=flags, device=device, labels=labels)
    return load_network(checkpoint, flags=flags, device=device, labels=labels)


def model_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a model file (hex), which tells two models apart whatever their file names."""
    from monai_ecrm.record import file_sha256

    return file_sha256(path)


def trained_on(record: Mapping[str, Any] | None) -> str:
    """What a model record says its model was trained on: the training description (else the dataset folder, else the
    protocol), the number of training images, and whether training was cut short; ``"unknown data"`` when it does not
    say."""
    training = (record or {}).get("training") or {}
    what = str(training.get("description") or training.get("dataset_dir") or training.get("protocol") or "unknown data")
    if training.get("train_images"):
        what += f" ({training['train_images']} training images)"
    if training.get("completed") is False:
        what += ", training not completed"
    return what
