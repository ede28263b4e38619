"""Load a local state dict into a MONAI encoder and report what did not match.

Pretrained encoders are never downloaded: their weights are files on disk (or inside an installed package), and
:func:`load_encoder_weights` is the one function that loads them. It accepts the layouts such files come in:

- a plain state dict, or one wrapped as ``{"state_dict": ...}``, ``{"model": ...}``, ``{"network": ...}``,
  ``{"net": ...}`` or ``{"model_state_dict": ...}`` (training checkpoints);
- any common key prefix (``module.`` from DataParallel/DDP, ``encoder.`` or ``backbone.`` from a whole network),
  found automatically as the prefix under which most keys match the encoder;
- torchvision ResNet keys (``conv1``, ``bn1``, ``layer1..4``, ``fc``: the same names as MONAI's ``ResNet``);
- EfficientNet keys in the flat ``_blocks.<i>`` numbering of lukemelas' EfficientNet-PyTorch (and its forks), which
  MONAI's EfficientNet nests as ``_blocks.<stack>.<i>``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch import nn

__all__ = ["EncoderWeightsReport", "load_encoder_weights", "CLASSIFIER_PREFIXES", "CHECKPOINT_WRAPPER_KEYS"]

logger = logging.getLogger(__name__)

StateDictSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.", "_fc.", "classifier.")
"""Key prefixes of ImageNet classification heads; optional on both sides (see :func:`load_encoder_weights`)."""

CHECKPOINT_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "network", "net")
"""Keys under which training checkpoints commonly keep the network's state dict."""

_NESTED_BLOCK_KEY = re.compile(r"^_blocks\.\d+\.(\d+\..+)$")
_MAX_LISTED_KEYS = 20


class EncoderWeightsReport(NamedTuple):
    """What :func:`load_encoder_weights` did.

    Attributes:
        loaded_keys: encoder keys that received a tensor from the checkpoint.
        missing_keys: encoder keys (BatchNorm's ``num_batches_tracked`` and classifier keys aside) that the
            checkpoint does not provide; they keep their current values.
        unexpected_keys: checkpoint keys (as stored, prefix included) that went nowhere. Classifier keys dropped
            because the encoder has no classifier are not listed.
        mismatched_keys: ``"key: checkpoint shape (...) vs encoder shape (...)"`` for tensors present on both sides
            with incompatible shapes; those encoder tensors keep their current values.
    """

    loaded_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]


def _is_classifier_key(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def _read_state_dict(path_or_state_dict: StateDictSource) -> tuple[dict[str, torch.Tensor], str]:
    """Return the tensors of a state dict (file or mapping), unwrapped from a training checkpoint, and a label."""
    if isinstance(path_or_state_dict, Mapping):
        content: object = path_or_state_dict
        label = "the given state dict"
    else:
        path = Path(path_or_state_dict)
        label = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained encoder weights file not found: {path}")
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"could not read {path} as a state dict with torch.load(weights_only=True) "
                f"(a file of tensors is required; pickled modules are refused): {err}"
            ) from err
    while isinstance(content, Mapping):
        wrapped = [key for key in CHECKPOINT_WRAPPER_KEYS if isinstance(content.get(key), Mapping)]
        if not wrapped or all(isinstance(value, torch.Tensor) for value in content.values()):
            break
        content = content[wrapped[0]]
    if not isinstance(content, Mapping):
        raise TypeError(f"{label} holds a {type(content).__name__}, not a state dict (a mapping of tensors)")
    tensors = {str(key): value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{label} holds no tensors; its keys are {list(content)[:_MAX_LISTED_KEYS]}")
    return tensors, label


def _aliases(encoder_keys: list[str]) -> dict[str, str]:
    """Map every name a checkpoint may use for an encoder key (its own, the flat EfficientNet one) to that key."""
    aliases: dict[str, str] = {}
    for key in encoder_keys:
        aliases[key] = key
        flat = _NESTED_BLOCK_KEY.sub(r"_blocks.\1", key)
        aliases.setdefault(flat, key)
    return aliases


def _detect_prefix(source_keys: list[str], aliases: Mapping[str, str]) -> str:
    """The key prefix under which the most checkpoint keys name encoder keys (the shortest on a tie)."""
    counts: Counter[str] = Counter()
    for key in source_keys:
        starts = [0] + [match.end() for match in re.finditer(r"\.", key)]
        for start in starts:
            if key[start:] in aliases:
                counts[key[:start]] += 1
                break
    if not counts:
        return ""
    return min(counts, key=lambda prefix: (-counts[prefix], len(prefix)))


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a first-convolution weight ``[out, c, *k]`` to ``in_channels`` inputs.

    One input channel takes the sum over the checkpoint's channels (a grey picture repeated as RGB gives the same
    response); more channels repeat the checkpoint's channels cyclically, scaled so the response to a constant input
    keeps its size. This is the rule timm uses for ImageNet stems.
    """
    source_channels = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / source_channels)
    tiled = weight.repeat(1, repeats, *([1] * (weight.dim() - 2)))[:, :in_channels]
    return tiled * (source_channels / in_channels)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def load_encoder_weights(
    encoder: nn.Module, path_or_state_dict: StateDictSource, strict: bool = True
) -> EncoderWeightsReport:
    """Load a local state dict into ``encoder`` and report missing, unexpected and mismatched keys.

    Keys are matched after unwrapping a training checkpoint and removing the prefix under which most keys name
    encoder keys (see the module docstring for the layouts understood). Classification heads (keys starting with
    ``fc.``, ``_fc.`` or ``classifier.``) are optional on both sides: dropped when the encoder has none, loaded when
    the shapes agree, skipped otherwise (another ``num_classes``). The first convolution is adapted when only its
    number of input channels differs (e.g. RGB weights for a one-channel encoder, see :func:`_adapt_input_conv`).
    Nothing is loaded when the call raises.

    Args:
        encoder: the module to load into (for example MONAI's ``ResNetEncoder`` or ``EfficientNetEncoder``).
        path_or_state_dict: a file written by ``torch.save`` (read with ``torch.load(..., weights_only=True)``, so
            only tensors and plain containers are accepted), or a state dict already in memory.
        strict: raise ``RuntimeError`` when encoder keys are missing or shapes mismatch. With ``False`` the
            matching tensors are loaded and the rest is reported by a warning. Unexpected keys only ever warn.

    Returns:
        an :class:`EncoderWeightsReport` listing loaded, missing, unexpected and mismatched keys.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the file cannot be read as a state dict, or ``strict`` and keys are missing or mismatched.
    """
    source, label = _read_state_dict(path_or_state_dict)
    target = encoder.state_dict()
    encoder_has_classifier = any(_is_classifier_key(key) for key in target)
    aliases = _aliases(list(target))
    prefix = _detect_prefix(list(source), aliases)
    first_conv = next((key for key, value in target.items() if value.dim() >= 3), None)

    to_load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    adapted: list[str] = []
    for source_key, value in source.items():
        name = source_key[len(prefix) :] if source_key.startswith(prefix) else None
        target_key = aliases.get(name) if name is not None else None
        if target_key is None:
            if name is not None and _is_classifier_key(name) and not encoder_has_classifier:
                continue
            unexpected.append(source_key)
            continue
        expected_shape = target[target_key].shape
        if value.shape == expected_shape:
            to_load[target_key] = value
        elif (
            target_key == first_conv
            and value.dim() == len(expected_shape)
            and value.shape[:1] + value.shape[2:] == expected_shape[:1] + expected_shape[2:]
        ):
            to_load[target_key] = _adapt_input_conv(value, expected_shape[1])
            adapted.append(f"{target_key}: {value.shape[1]} -> {expected_shape[1]} input channels")
        elif _is_classifier_key(target_key):
            logger.info("skipping classifier %s: checkpoint %s vs encoder %s", target_key, value.shape, expected_shape)
        else:
            mismatched.append(
                f"{target_key}: checkpoint shape {tuple(value.shape)} vs encoder shape {tuple(expected_shape)}"
            )

    missing = [
        key
        for key in target
        if key not in to_load
        and not key.endswith("num_batches_tracked")
        and not _is_classifier_key(key)
        and not any(entry.startswith(f"{key}:") for entry in mismatched)
    ]
    report = EncoderWeightsReport(list(to_load), missing, unexpected, mismatched)

    problems = []
    if missing:
        problems.append(f"{len(missing)} encoder keys missing from the checkpoint: {_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if problems and strict:
        hint = "" if to_load else f" (no key matched; the checkpoint's keys start {_listing(list(source)[:5])})"
        raise RuntimeError(
            f"cannot load {label} into {type(encoder).__name__}{hint}: "
            + "; ".join(problems)
            + ". Pass strict=False to load the matching tensors anyway."
        )
    if problems:
        warnings.warn(f"loading {label} into {type(encoder).__name__}: " + "; ".join(problems), stacklevel=2)
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} keys of {label} are not used by {type(encoder).__name__}: {_listing(unexpected)}",
            stacklevel=2,
        )
    for entry in adapted:
        logger.info("adapted the first convolution %s", entry)

    encoder.load_state_dict(to_load, strict=False)
    logger.info("loaded %d of %d encoder tensors from %s (key prefix %r)", len(to_load), len(target), label, prefix)
    return report
