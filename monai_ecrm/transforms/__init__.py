"""Transforms MONAI lacks (loading every input format, saving predictions) and train/eval/infer presets."""

from __future__ import annotations

from monai_ecrm.transforms.io import LoadPolypImage, LoadPolypImaged, SavePredictiond, parse_label_mapping
from monai_ecrm.transforms.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_postprocessing,
    eval_transforms,
    infer_postprocessing,
    infer_transforms,
    train_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadPolypImage",
    "LoadPolypImaged",
    "SavePredictiond",
    "eval_postprocessing",
    "eval_transforms",
    "infer_postprocessing",
    "infer_transforms",
    "parse_label_mapping",
    "train_transforms",
]
