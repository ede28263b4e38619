"""The model of a clinical job: loading it, and running it on one frame at a time.

A job talks to its model through a :class:`ModelRunner`: a callable that takes one pre-processed frame and gives a
:class:`FrameOutput`, the foreground logits and, where a runner has more to say about the frame, extra values for the
job's report (one column each). :class:`TorchRunner` runs a PyTorch module (a network or a TorchScript export, see
:func:`load_model`); another runtime (an ONNX Runtime session) is another runner, and the job does not change.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["BUNDLE_SETTINGS", "FrameOutput", "ModelRunner", "TorchRunner", "bundle_settings", "load_model"]

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
    """

    logits: torch.Tensor
    columns: dict[str, str] = field(default_factory=dict)


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
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)

    def __call__(self, image: torch.Tensor) -> FrameOutput:
        with torch.no_grad():
            logits = self.model(image.unsqueeze(0).to(self.device))
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
