"""monai-ecrm: polyp segmentation with the Exterior Contextual-Relation Module (ECRM) of DCRNet, for MONAI.

Importing the package registers the ``efficientnet-lite0`` backbone in MONAI's FlexibleUNet registry.
``monai_ecrm.load_model(path)`` builds the network of a model file (``models/model.pt``, a training checkpoint)
from its weights and the record that names them.
"""

from __future__ import annotations

from . import data, networks, transforms  # noqa: E402  (networks registers the extra backbones)
from .record import load_model  # noqa: E402
from .version import __version__

__all__ = ["__version__", "data", "networks", "transforms", "load_model"]
