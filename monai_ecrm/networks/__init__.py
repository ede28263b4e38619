from __future__ import annotations

from . import blocks, nets
from .blocks import ECRM, ICRM, MemoryBank
from .nets import DCRNET_ECRM_OPTIONS, ECRMUNet, dcrnet

__all__ = ["blocks", "nets", "ECRM", "ICRM", "MemoryBank", "ECRMUNet", "dcrnet", "DCRNET_ECRM_OPTIONS"]
