"""The clinical command's memory provenance: :class:`ExplainingRunner`, a runner that says which memory cases each
frame drew on. The explanation itself (cases, shares, pictures, report columns) lives in
:mod:`monai_ecrm.explanations`, below the command and the engine handlers alike; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monai_ecrm.clinical.runner import FrameOutput, TorchRunner
from monai_ecrm.explanations import (
    CASE_SEPARATOR,
    EXPLAIN_COLUMNS,
    EXPLAIN_POSTFIX,
    NOTE_COLUMN,
    CasePictures,
    Explanation,
    ExplanationWriter,
    MemoryCase,
    compose_explanation,
    explain_messages,
    explain_problem,
    explanation_from_shares,
    memory_case_names,
)

__all__ = [
    "CASE_SEPARATOR",
    "EXPLAIN_COLUMNS",
    "EXPLAIN_POSTFIX",
    "NOTE_COLUMN",
    "CasePictures",
    "Explanation",
    "ExplainingRunner",
    "ExplanationWriter",
    "MemoryCase",
    "compose_explanation",
    "explain_messages",
    "explain_problem",
    "explanation_from_shares",
    "memory_case_names",
]


class ExplainingRunner(TorchRunner):
    """A :class:`~monai_ecrm.clinical.runner.TorchRunner` that also says which memory cases each frame drew on, from
    the same forward as its logits (:meth:`~monai_ecrm.networks.nets.ECRMUNet.forward_with_shares`; the logits equal
    ``forward``'s up to floating-point rounding).

    Each :class:`~monai_ecrm.clinical.runner.FrameOutput` carries the frame's :class:`Explanation` (``explanation``)
    and its report columns (:data:`EXPLAIN_COLUMNS`). A model that cannot be explained (:func:`explain_problem`,
    :attr:`problem`) runs its plain forward: its frames have no explanation.

    Args:
        model: an ECRM network in eval mode (any other model is run plainly, see above).
        top_k: cases per frame; at most the filled slots (:attr:`shown`).
        device: where it runs.
        autocast: see :class:`~monai_ecrm.clinical.runner.TorchRunner`.
        record: the model's record (case names it may hold, see :func:`memory_case_names`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        top_k: int,
        device: str | torch.device = "cpu",
        autocast: str | torch.dtype | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"ExplainingRunner: top_k must be at least 1, got {top_k}")
        super().__init__(model, device, autocast)
        self.top_k = top_k
        self.problem = explain_problem(model, record)
        self.names = [] if self.problem else memory_case_names(model, record)
        self.shown = min(top_k, len(self.names))

    def __call__(self, image: torch.Tensor) -> FrameOutput:
        if self.problem:
            return super().__call__(image)
        with torch.no_grad():
            logits, shares = self.inferer(image.unsqueeze(0).to(self.device), self.model.forward_with_shares)
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(
                f"the model gives logits of shape {tuple(logits.shape)}; one channel [B, 1, H, W] expected"
            )
        explanation = explanation_from_shares(shares[0], self.names, self.top_k)
        return FrameOutput(logits[0].float(), explanation.columns(), explanation)
