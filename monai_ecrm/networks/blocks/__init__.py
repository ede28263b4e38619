from __future__ import annotations

from .ecrm import ECRM, class_prototypes
from .icrm import ICRM
from .memory_bank import SIZE_MISMATCH_POLICIES, MemoryBank, MemorySizeMismatchError

__all__ = ["ECRM", "ICRM", "MemoryBank", "MemorySizeMismatchError", "SIZE_MISMATCH_POLICIES", "class_prototypes"]
