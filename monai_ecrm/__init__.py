"""monai-ecrm: polyp segmentation with the Exterior Contextual-Relation Module (ECRM) of DCRNet, for MONAI.

Importing the package registers the ``efficientnet-lite0`` backbone in MONAI's FlexibleUNet registry.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, networks, transforms  # noqa: E402  (networks registers the extra backbones)

__all__ = ["__version__", "data", "networks", "transforms"]
