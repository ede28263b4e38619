"""Transforms MONAI lacks (loading every input format, saving predictions) and train/eval/infer presets."""

from __future__ import annotations

from monai_ecrm.transforms.io import LoadPolypImage, LoadPolypImaged, SavePredictiond, parse_label_mapping
from monai_ecrm.transforms.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    eval_postprocessing,
    eval_transforms,
    full_size_eval_postprocessing,
    full_size_eval_transforms,
    infer_postprocessing,
    infer_transforms,
    normalization_for_backbone,
    train_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "normalization_for_backbone",
    "LoadPolypImage",
    "LoadPolypImaged",
    "SavePredictiond",
    "eval_postprocessing",
    "eval_transforms",
    "full_size_eval_postprocessing",
    "full_size_eval_transforms",
    "infer_postprocessing",
    "infer_transforms",
    "parse_label_mapping",
    "train_transforms",
]
