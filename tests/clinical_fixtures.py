"""A one-convolution model shared by the clinical command's tests: enough to give masks that follow the picture."""

from __future__ import annotations

from pathlib import Path

import torch


class OneConv(torch.nn.Module):
    """Logits from one 3x3 convolution with fixed weights (a bright picture gives foreground)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(0.2)
            self.conv.bias.fill_(-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def save_torchscript(folder: Path) -> Path:
    """The model scripted and saved as ``folder/model.ts``."""
    path = Path(folder) / "model.ts"
    torch.jit.script(OneConv()).save(str(path))
    return path
