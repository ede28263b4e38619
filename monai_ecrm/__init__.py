"""monai-ecrm: polyp segmentation with the Exterior Contextual-Relation Module (ECRM) of DCRNet, for MONAI."""

from __future__ import annotations

__version__ = "0.1.0"
