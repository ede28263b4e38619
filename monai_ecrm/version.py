"""The one version of monai-ecrm: the package, the bundle's ``metadata.json`` (a test holds them equal), model records
and DICOM Segmentations all state it. Kept in a module of its own that imports nothing, so that any layer can read it
without importing the package."""

__version__ = "0.3.0"
