"""The model record: everything a model file says about how to run it, in one JSON-able dict.

A trained ECRM-UNet is more than its weights: the network's construction arguments, the input size and
normalisation it was trained with, the mask threshold, what it was trained on. The record holds all of it, in one
layout (schema version :data:`SCHEMA_VERSION`) whatever carries it:

- ``models/model.json`` beside ``models/model.pt`` (the bundle's :class:`~monai_ecrm.handlers.ModelRecordHandler`
  writes it with the configuration's resolved values, command-line overrides included), read by :func:`read_record`;
- a TorchScript file, as the extra file :data:`TORCHSCRIPT_EXTRA_FILE` (:func:`record_for_torchscript`,
  :func:`embed_record`, :func:`load_torchscript`);
- an ONNX file's metadata (:mod:`monai_ecrm.onnx`, same layout).

Layout (``make_record``)::

    {
      "schema_version": 1,
      "precision": "float32",
      "network": {"target": "monai_ecrm.networks.nets.ECRMUNet", "kwargs": {...every architecture argument, resolved}},
      "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "channels": 3},
      "output": {"name": "pred", "kind": "logits", "channels": 1, "activation": "sigmoid"},
      "preprocessing": {"spatial_size": [352, 352], "resize": "bilinear", "intensity_range": [0.0, 1.0],
                        "normalization": "imagenet", "mean": [...], "std": [...]},
      "threshold": 0.5,
      "memory": {"slots": 20, "filled": 20, "sources": null},
      "training": {"dataset_dir": ..., "train_images": ..., "epochs": ..., "steps": ..., "completed": true, ...},
      "source": {"monai_ecrm": "0.3.0", "monai": "...", "torch": "..."},
      "weights": {"file": "model.pt", "sha256": "...", "bytes": ...}
    }

What the weights determine (backbone, channels, memory size and classes, ICRM, memory level, decoder) is derived from
any state dict by :func:`record_from_state_dict`, so a model file without a record still builds the right network.
:func:`merge_record` joins the derived record, the written one and the user's options: an option that contradicts the
model is a :class:`RecordConflictError` naming both values, never a silent change; what nobody states is filled with
a default and listed under ``"assumed"``. An ``ECRMUNet`` argument a model file does not state (a file without a
record, a record written without it) is read with the value such files were written with, DCRNet's block
(:data:`UNSTATED_DEFAULTS`), never with ``ECRMUNet``'s current defaults: every model saved so far keeps its meaning.
:func:`load_network` (and :func:`load_model`, ``monai_ecrm.load_model``) builds the
network and loads the weights strictly; :func:`check_bundle_config` holds a bundle config's values against the record
of the model it runs.

``python -m monai_ecrm.record show PATH`` prints the record of a model file; ``python -m monai_ecrm.record embed
models/model.ts`` copies ``models/model.json`` into a TorchScript export (``ckpt_export`` embeds only the config files
as written, not the overrides of the run).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
from monai_ecrm.networks.utils import unwrap_network
from monai_ecrm.transforms import NORMALIZATIONS, normalization_for_backbone

__all__ = [
    "SCHEMA_VERSION",
    "RECORD_NAME",
    "TORCHSCRIPT_EXTRA_FILE",
    "ONNX_METADATA_KEY",
    "read_onnx_metadata",
    "write_onnx_metadata",
    "versions",
    "NETWORK_TARGET",
    "ARCHITECTURE_KEYS",
    "PREPROCESSING_KEYS",
    "DEFAULT_SPATIAL_SIZE",
    "DEFAULT_THRESHOLD",
    "UNSTATED_DEFAULTS",
    "RecordConflictError",
    "RecordMismatchError",
    "make_record",
    "describe_weights",
    "verify_weights",
    "resolve_network_kwargs",
    "record_from_state_dict",
    "record_from_network",
    "merge_record",
    "record_path",
    "read_record",
    "write_record",
    "checkpoint_state_dict",
    "load_network",
    "load_model",
    "check_bundle_config",
    "record_for_torchscript",
    "embed_record",
    "load_torchscript",
    "main",
]

#: version of the record's layout; a reader refuses a newer one
SCHEMA_VERSION = 1
#: the record's file name beside the weights (``models/model.json`` beside ``models/model.pt``)
RECORD_NAME = "model.json"
#: key of the record in an ONNX file's ``metadata_props``
ONNX_METADATA_KEY = "monai_ecrm.record"
#: the record's name among a TorchScript file's extra files
TORCHSCRIPT_EXTRA_FILE = "monai_ecrm_record.json"
#: the network class a record builds
NETWORK_TARGET = "monai_ecrm.networks.nets.ECRMUNet"
#: ``ECRMUNet`` arguments that initialise or load weights rather than shape the network: never recorded
_INIT_KEYS = ("pretrained", "pretrained_weights", "bank_size_mismatch")
#: the ``ECRMUNet`` arguments a record holds (every constructor argument but :data:`_INIT_KEYS`)
ARCHITECTURE_KEYS = tuple(name for name in inspect.signature(ECRMUNet).parameters if name not in _INIT_KEYS)
#: arguments only the ECRM block uses: meaningless (and dropped) for ``use_ecrm=False``
_ECRM_KEYS = (
    "bank_size",
    "key_channels",
    "ecrm_classes",
    "context_start",
    "prototypes",
    "background_tokens",
    "attend_first",
    "supervise_attention",
)
#: what a model file that does not state an ``ECRMUNet`` argument was built with: the DCRNet block
#: (:data:`~monai_ecrm.networks.nets.DCRNET_ECRM_OPTIONS`, ECRMUNet's ECRM defaults until the accuracy study chose
#: others) and 512 ECRM channels (the default before ``ecrm_channels`` followed the memory level). For model files only
#: (:func:`merge_record`), never for a configuration, whose network is built with ECRMUNet's own defaults.
UNSTATED_DEFAULTS: dict[str, Any] = {**DCRNET_ECRM_OPTIONS, "ecrm_channels": 512}
#: arguments that change training or initialisation only: a model computes the same at inference whatever they were
_TRAINING_ONLY_KEYS = ("prototypes", "attend_first", "context_start", "dropout", "supervise_attention")
#: options of :func:`merge_record` that are not network arguments
PREPROCESSING_KEYS = ("spatial_size", "normalization")
DEFAULT_SPATIAL_SIZE = 352
DEFAULT_THRESHOLD = 0.5
#: graph input and output names (those of ``configs/onnx_export.json`` and of the bundle's data keys)
_INPUT_NAME, _OUTPUT_NAME = "image", "pred"


class RecordConflictError(ValueError):
    """Statements about a model disagree: options against the model's record or weights, or a record against the
    weights it sits beside. ``conflicts`` lists every disagreement found, ``(field, {source: value, ...})``; ``key``
    and ``values`` are the first one's."""

    def __init__(self, conflicts: Sequence[tuple[str, Mapping[str, Any]]], hint: str = "") -> None:
        self.conflicts = [(key, dict(values)) for key, values in conflicts]
        self.key, self.values = self.conflicts[0]
        described = [
            f"{key}: " + " against ".join(f"{_show(value)} ({origin})" for origin, value in values.items())
            for key, values in self.conflicts
        ]
        super().__init__("; ".join(described) + hint)


class RecordMismatchError(ValueError):
    """A record names other weights than the file it sits beside (its ``weights.sha256`` is not the file's): the
    record describes another model, e.g. weights replaced after the record was written, or a crash between writing
    the two. Names both files."""


def _show(value: Any) -> str:
    return json.dumps(_plain(value)) if not isinstance(value, str) else repr(value)


# ------------------------------------------------------------------------------------------------- the record
def _plain(value: Any) -> Any:
    """``value`` as JSON data (tuples to lists, tensors and numpy values to numbers, paths to strings)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _same(first: Any, second: Any) -> bool:
    """Equality of JSON data, numbers compared as numbers (``0.5 == 0.5000000001``, ``64 == 64.0``)."""
    first, second = _plain(first), _plain(second)
    if isinstance(first, bool) or isinstance(second, bool):
        return first is second
    if isinstance(first, (int, float)) and isinstance(second, (int, float)):
        return math.isclose(float(first), float(second), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_same(first[key], second[key]) for key in first)
    return first == second


def _spatial_size(size: int | Sequence[int], spatial_dims: int) -> list[int]:
    if isinstance(size, (int, np.integer)):
        return [int(size)] * spatial_dims
    return [int(item) for item in size]


def _backbone_entry(backbone: str) -> dict[str, Any]:
    if backbone not in FLEXUNET_BACKBONE.register_dict:
        raise ValueError(f"unknown backbone {backbone!r}; registered: {sorted(FLEXUNET_BACKBONE.register_dict)}.")
    return FLEXUNET_BACKBONE.register_dict[backbone]


def _resolve_nones(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the ``None`` values that ``ECRMUNet`` resolves (``memory_stride``, ``ecrm_channels``,
    ``ecrm_classes``, ``attend_first``) replaced by what it resolves them to, and ECRM-only arguments dropped without
    ECRM. Keys that are absent stay absent (``ecrm_channels=None`` stays ``None`` without a ``memory_stride``)."""
    kwargs = dict(kwargs)
    backbone = kwargs.get("backbone")
    entry = _backbone_entry(backbone) if backbone is not None else None
    if kwargs.get("use_ecrm", True) is False:
        for key in _ECRM_KEYS:
            kwargs.pop(key, None)
        if entry is not None:
            # without ECRM the level is passed through unchanged, so the deepest level stands for every choice
            kwargs["memory_stride"] = 2 ** int(entry["feature_number"])
            kwargs["ecrm_channels"] = int(entry["feature_channel"][-1])
        return kwargs
    if kwargs.get("memory_stride", 0) is None and entry is not None:
        kwargs["memory_stride"] = 2 ** int(entry["feature_number"])
    if "ecrm_channels" in kwargs and kwargs["ecrm_channels"] is None and entry is not None:
        channels = _level_channels(entry, kwargs.get("memory_stride"))
        if channels is not None:
            kwargs["ecrm_channels"] = channels
    if "ecrm_classes" in kwargs and kwargs["ecrm_classes"] is None and "out_channels" in kwargs:
        kwargs["ecrm_classes"] = int(kwargs["out_channels"])
    if "attend_first" in kwargs and kwargs["attend_first"] is None and "prototypes" in kwargs:
        kwargs["attend_first"] = kwargs["prototypes"] == "label"
    if "decoder_channels" in kwargs and entry is not None:
        kwargs["decoder_channels"] = list(kwargs["decoder_channels"])[: int(entry["feature_number"])]
    return kwargs


def _level_channels(entry: Mapping[str, Any], stride: Any) -> int | None:
    """Channels of a backbone's encoder level of stride ``stride`` (``None`` for a stride it has no level of)."""
    strides = [2 ** (level + 1) for level in range(int(entry["feature_number"]))]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in strides:
        return None
    return int(entry["feature_channel"][strides.index(stride)])


def resolve_network_kwargs(network_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``ECRMUNet`` architecture argument (:data:`ARCHITECTURE_KEYS`), ``network_kwargs`` over the class
    defaults, with the values the class resolves itself made explicit: ``memory_stride=None`` is the deepest level's
    stride, ``ecrm_channels=None`` the channels of the memory level, ``ecrm_classes=None`` is ``out_channels``,
    ``attend_first=None`` follows ``prototypes``, and a network without ECRM has no ECRM options. The defaults are the
    class's current ones: this describes a network built from these arguments now (a configuration), not a model
    file (:func:`merge_record` reads what a model file leaves out as :data:`UNSTATED_DEFAULTS`). Initialisation
    arguments (``pretrained``, ``pretrained_weights``, ``bank_size_mismatch``) are dropped: the weights come from the
    model file.

    Raises:
        ValueError: an argument ``ECRMUNet`` does not take, or an unknown backbone.
    """
    unknown = set(network_kwargs) - set(ARCHITECTURE_KEYS) - set(_INIT_KEYS) - {"_target_"}
    if unknown:
        raise ValueError(f"not ECRMUNet arguments: {sorted(unknown)}; known: {list(ARCHITECTURE_KEYS)}.")
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(ECRMUNet).parameters.items()
        if name in ARCHITECTURE_KEYS
    }
    given = {key: value for key, value in network_kwargs.items() if key in ARCHITECTURE_KEYS}
    return _plain(_resolve_nones({**defaults, **given}))


def versions() -> dict[str, str]:
    """The versions a record's ``source`` states: monai-ecrm, MONAI, torch."""
    import monai

    from monai_ecrm.version import __version__

    return {"monai_ecrm": __version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0]}


def make_record(
    network_kwargs: Mapping[str, Any],
    spatial_size: int | Sequence[int],
    normalization: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    network_target: str = NETWORK_TARGET,
    memory: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    memory_sources: Sequence[str] | None = None,
    weights: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete model record (see the module's docstring for the layout), as JSON data.

    Args:
        network_kwargs: ``ECRMUNet`` arguments (a bundle's ``network_def`` without ``_target_``); resolved with
            :func:`resolve_network_kwargs`, so the record states every architecture argument.
        spatial_size: the network input size of the preprocessing: an int (a square, a cube in 3D) or the sizes.
        normalization: a name of :data:`monai_ecrm.transforms.NORMALIZATIONS`; ``None`` follows the backbone
            (:func:`~monai_ecrm.transforms.normalization_for_backbone`, as the bundle does).
        threshold: probability threshold of the mask.
        network_target: the network's class.
        memory: ``{"slots", "filled"}`` of the ECRM memory (slots default to ``bank_size``; ``filled`` is the
            checkpoint's, ``None`` when the record describes a run rather than one checkpoint).
        source: where the model comes from (versions are added).
        training: what the model was trained on and for how long: ``dataset_dir``, ``description``,
            ``train_images``, ``val_images``, ``epochs``, ``steps``, ``batch_size``, ``completed``, ...
        memory_sources: names of the cases the memory was written from, if known (``memory.sources``; its layout is
            the memory-provenance work's: the names the bank's integer ``sources`` refer to).
        weights: ``{"file", "sha256", "bytes"}`` of the exact weights file the record describes
            (:func:`describe_weights`); every reader of a record beside a file checks it (:func:`verify_weights`).
    """
    kwargs = (
        resolve_network_kwargs(network_kwargs) if network_target == NETWORK_TARGET else _plain(dict(network_kwargs))
    )
    if normalization is None:
        normalization = normalization_for_backbone(kwargs["backbone"])
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}.")
    mean, std = NORMALIZATIONS[normalization]
    spatial_dims = int(kwargs.get("spatial_dims", 2))
    out_channels = int(kwargs.get("out_channels", 1))
    memory_entry = None
    if network_target != NETWORK_TARGET:
        memory_entry = dict(memory) if memory is not None else None
    elif kwargs["use_ecrm"]:
        memory_entry = {"slots": int(kwargs["bank_size"]), "filled": None, **dict(memory or {})}
        memory_entry["sources"] = list(memory_sources) if memory_sources is not None else memory_entry.get("sources")
    return _plain(
        {
            "schema_version": SCHEMA_VERSION,
            "precision": "float32",
            "network": {"target": network_target, "kwargs": kwargs},
            "input": {
                "name": _INPUT_NAME,
                "layout": "NCHW" if spatial_dims == 2 else "NCDHW",
                "dtype": "float32",
                "channels": int(kwargs.get("in_channels", 3)),
            },
            "output": {
                "name": _OUTPUT_NAME,
                "kind": "logits",
                "channels": out_channels,
                "activation": "sigmoid" if out_channels == 1 else "softmax",
            },
            "preprocessing": {
                "spatial_size": _spatial_size(spatial_size, spatial_dims),
                "resize": "bilinear" if spatial_dims == 2 else "trilinear",
                "intensity_range": [0.0, 1.0],
                "normalization": normalization,
                "mean": list(mean),
                "std": list(std),
            },
            "threshold": float(threshold),
            "memory": memory_entry,
            "training": dict(training) if training is not None else None,
            "source": {**versions(), **dict(source or {})},
            **({"weights": dict(weights)} if weights else {}),
        }
    )


# ---------------------------------------------------------------------------------------- derivation from weights
def _layout(state: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {key: tuple(item.shape) for key, item in state.items() if key.startswith(prefix) and torch.is_tensor(item)}


@functools.cache
def _encoder_layout(backbone: str, spatial_dims: int, in_channels: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Keys and shapes of the ``encoder.*`` entries of ``ECRMUNet(backbone=...)``'s state dict (built on the meta
    device: no memory, no initialisation)."""
    with torch.device("meta"):
        network = ECRMUNet(spatial_dims=spatial_dims, in_channels=in_channels, backbone=backbone, use_ecrm=False)
    return tuple(sorted(_layout(network.state_dict(), "encoder.").items()))


def _matching_backbones(state: Mapping[str, Any], spatial_dims: int, in_channels: int) -> list[str]:
    """The registered backbones whose encoder has exactly the keys and shapes of ``state``'s ``encoder.*``."""
    layout = tuple(sorted(_layout(state, "encoder.").items()))
    resnet_layout = any(key.startswith("encoder.layer1.") for key, _ in layout)
    # a backbone's feature channels are output channels of its encoder's layers: a cheap test before building one
    outputs = {shape[0] for _, shape in layout if len(shape) >= 2}
    names = [
        name
        for name, entry in FLEXUNET_BACKBONE.register_dict.items()
        if name.startswith("resnet") == resnet_layout and set(map(int, entry["feature_channel"])) <= outputs
    ]
    return [name for name in names if _encoder_layout(name, spatial_dims, in_channels) == layout]


def _network_layout(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # the options the weights leave open (prototypes, supervise_attention, ...) do not change the layout; DCRNet's
    # values are valid whatever the derived background_tokens
    with torch.device("meta"):
        network = ECRMUNet(**{**DCRNET_ECRM_OPTIONS, **kwargs})
    return _layout(network.state_dict())


_DECODER_BLOCK = re.compile(r"decoder\.blocks\.(\d+)\.convs\.conv_1\.conv\.weight")


def _derive(state: Mapping[str, Any], backbone: str | None = None) -> dict[str, Any]:
    """The ``ECRMUNet`` arguments and memory state that ``state`` determines (see :func:`record_from_state_dict`)."""
    tensors = {key: value for key, value in state.items() if torch.is_tensor(value)}
    if "segmentation_head.0.weight" not in tensors or not any(key.startswith("decoder.blocks.") for key in tensors):
        raise ValueError(
            "not an ECRMUNet state dict (no segmentation_head.0.weight or decoder.blocks.*; first keys: "
            f"{', '.join(list(state)[:5])})."
        )
    stem = next((value for key, value in tensors.items() if key.startswith("encoder.") and value.dim() >= 3), None)
    if stem is None:
        raise ValueError("not an ECRMUNet state dict: no encoder convolution (encoder.*).")
    spatial_dims, in_channels = stem.dim() - 2, int(stem.shape[1])
    kwargs: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": int(tensors["segmentation_head.0.weight"].shape[0]),
    }
    if backbone is None:
        matches = _matching_backbones(tensors, spatial_dims, in_channels)
        if not matches:
            raise ValueError(
                "the encoder's keys and shapes match no registered backbone (MONAI's FLEXUNET_BACKBONE, "
                f"{sorted(FLEXUNET_BACKBONE.register_dict)}): not an ECRMUNet state dict, or its encoder is unknown."
            )
        backbone = matches[0] if len(matches) == 1 else None
    if backbone is not None:
        kwargs["backbone"] = backbone
    blocks = sorted((int(match.group(1)), key) for key in tensors if (match := _DECODER_BLOCK.fullmatch(key)))
    kwargs["decoder_channels"] = [int(tensors[key].shape[0]) for _, key in blocks]
    if any(".upsample.deconv." in key for key in tensors):
        kwargs["upsample"] = "deconv"
    elif any(".upsample.pixelshuffle." in key for key in tensors):
        kwargs["upsample"] = "pixelshuffle"
    else:
        kwargs["upsample"] = "nontrainable"
    kwargs["use_icrm"] = any(key.startswith("icrm.") for key in tensors)
    kwargs["use_ecrm"] = "ecrm.memory.memory" in tensors
    memory = None
    if kwargs["use_ecrm"]:
        missing = [key for key in ("ecrm.coarse.conv.weight", "ecrm.query.conv.weight") if key not in tensors]
        if missing:
            raise ValueError(f"an ECRM memory without the ECRM layers {missing}: not an ECRMUNet state dict.")
        slots, classes, channels = (int(size) for size in tensors["ecrm.memory.memory"].shape)
        ecrm_classes = int(tensors["ecrm.coarse.conv.weight"].shape[0])
        kwargs.update(
            bank_size=slots,
            ecrm_channels=channels,
            key_channels=int(tensors["ecrm.query.conv.weight"].shape[0]),
            ecrm_classes=ecrm_classes,
            background_tokens=classes > ecrm_classes,
        )
        if "ecrm.context_gate" in tensors:
            kwargs["context_start"] = "gate"
        filled = tensors.get("ecrm.memory.filled")
        memory = {"slots": slots, "filled": int(filled) if filled is not None else None}
        if backbone is not None:
            stride = _memory_stride(tensors, kwargs)
            if stride is not None:
                kwargs["memory_stride"] = stride
    elif backbone is not None:
        kwargs = _resolve_nones(kwargs)
    return {"kwargs": kwargs, "memory": memory}


def _memory_stride(tensors: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]) -> int | None:
    """The stride of the encoder level ECRM works on: the level whose channel count the ECRM input convolution takes;
    where several levels have that count, the one whose network has the state's layout (``None`` if still open)."""
    entry = _backbone_entry(kwargs["backbone"])
    levels = int(entry["feature_number"])
    seen = int(tensors["ecrm.coarse.conv.weight"].shape[1])
    strides = [2 ** (level + 1) for level, channels in enumerate(entry["feature_channel"]) if int(channels) == seen]
    if kwargs.get("use_icrm"):
        strides = [stride for stride in strides if stride == 2**levels]
    if len(strides) <= 1:
        return strides[0] if strides else None
    layout = _layout(tensors)
    fitting = [stride for stride in strides if _network_layout({**kwargs, "memory_stride": stride}) == layout]
    return fitting[0] if len(fitting) == 1 else None


def record_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The partial record a network state dict determines: ``{"schema_version", "network": {"target", "kwargs"},
    "memory": {"slots", "filled"} or None}``.

    Derived: ``spatial_dims`` and ``in_channels`` (the encoder's first convolution), ``out_channels`` (the head),
    ``backbone`` (the registered backbone whose encoder has exactly these keys and shapes: resnet10..200 in the
    torchvision layout, efficientnet-b0..b8/l2 and efficientnet-lite0), ``decoder_channels`` and ``upsample`` (the
    decoder), ``use_icrm``, ``use_ecrm``, and with ECRM ``bank_size``, ``ecrm_channels``, ``key_channels``,
    ``ecrm_classes``, ``background_tokens`` (memory classes beyond the coarse classes), ``memory_stride`` (the encoder
    level whose channels the ECRM input convolution takes) and ``context_start="gate"`` (a gate parameter). Not
    derivable, because the weights have the same keys and shapes either way: ``prototypes``, ``attend_first`` and
    ``supervise_attention`` (training only), ``context_start`` ``"full"`` vs ``"zero"`` (initialisation only),
    ``norm``, ``act``, ``dropout``, ``interp_mode``. A value the weights leave open (two backbones with one layout)
    is left out.

    Raises:
        ValueError: not an ECRM-UNet state dict (naming what was found).
    """
    derived = _derive(state_dict)
    return {
        "schema_version": SCHEMA_VERSION,
        "network": {"target": NETWORK_TARGET, "kwargs": _plain(derived["kwargs"])},
        "memory": derived["memory"],
    }


def record_from_network(
    network: nn.Module, network_kwargs: Mapping[str, Any] | None = None, check: bool = True
) -> dict[str, Any]:
    """The partial record of a built network (DDP/compile wrappers unwrapped), like :func:`record_from_state_dict`
    but with every architecture argument resolved: what the state dict determines, the module's own attributes
    (``backbone``, ``memory_stride``, the ECRM options its block keeps: ``context_start``, ``prototypes``, ...; the
    decoder's upsampling mode, ``interp_mode``), and ``network_kwargs`` for what none of them shows (``norm``, ``act``,
    ``dropout``; ECRMUNet's defaults otherwise).

    Args:
        network: an ``ECRMUNet``, possibly wrapped.
        network_kwargs: construction arguments known to the caller; they must agree with the network.
        check: verify that ``ECRMUNet(**kwargs)`` has the network's modules and layer settings (its ``repr``).

    Raises:
        RecordConflictError: ``network_kwargs`` contradicts the network.
        ValueError: not an ECRMUNet, or (``check``) one that the arguments do not rebuild, naming the first difference.
    """
    plain = unwrap_network(network)
    if not isinstance(plain, ECRMUNet):
        raise ValueError(f"not an ECRMUNet: {type(plain).__name__}.")
    derived = _derive(plain.state_dict(), backbone=plain.backbone)
    shown = dict(derived["kwargs"], memory_stride=plain.memory_stride)
    # the decoder's non-trainable upsampling shows its interpolation (a bilinear model rebuilt as nearest differs)
    modes = {module.mode for module in plain.modules() if isinstance(module, nn.Upsample)}
    if len(modes) == 1:
        shown["interp_mode"] = modes.pop()
    if plain.use_ecrm:
        # the ECRM options the block keeps as attributes of the same name (context_start, prototypes, ...)
        shown.update({key: getattr(plain.ecrm, key) for key in _ECRM_KEYS if hasattr(plain.ecrm, key)})
    shown = _resolve_nones(shown)
    given = _resolve_nones({"backbone": plain.backbone, **(network_kwargs or {})})
    given = {key: value for key, value in given.items() if value is not None}  # None: "as the class resolves it"
    for key in shown.keys() & given.keys():
        if not _same(shown[key], given[key]):
            raise RecordConflictError([(key, {"the network": shown[key], "network_kwargs": given[key]})])
    kwargs = resolve_network_kwargs({**given, **shown})
    if check:
        with torch.device("meta"):
            rebuilt = repr(ECRMUNet(**kwargs)).splitlines()
        built = repr(plain).splitlines()
        if rebuilt != built:
            difference = next(
                (f"{a.strip()!r} instead of {b.strip()!r}" for a, b in zip(rebuilt, built) if a != b), "module count"
            )
            raise ValueError(
                f"ECRMUNet(**{kwargs}) does not rebuild this network ({difference}); state the arguments the module "
                "does not show (norm, act, dropout, interp_mode) in network_kwargs."
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "network": {"target": NETWORK_TARGET, "kwargs": kwargs},
        "memory": derived["memory"],
    }


# ------------------------------------------------------------------------------------------------------ merging
def merge_record(
    derived: Mapping[str, Any] | None,
    written: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overridable: Sequence[str] = ("threshold",),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The complete record to run a model with: what its weights determine, what its record says, what the user
    states, checked against each other.

    Precedence: a value the weights determine (``derived``, :func:`record_from_state_dict`) or the record states
    (``written``, :func:`read_record`) cannot be changed by a flag; a flag only states what neither says. Values nobody
    states get the defaults model files were written with (:data:`UNSTATED_DEFAULTS`, the DCRNet block, for the ECRM
    options and ``ecrm_channels``; ``ECRMUNet``'s other arguments; input size :data:`DEFAULT_SPATIAL_SIZE`, the
    backbone's normalisation, threshold :data:`DEFAULT_THRESHOLD`) and the record lists their paths under
    ``"assumed"`` (``"preprocessing.spatial_size"``, ``"network.kwargs.norm"``, ...) so that a command can say so. A
    record that leaves out an argument the weights do not show states its :data:`UNSTATED_DEFAULTS` value (a flag
    cannot change it either).

    Args:
        derived: the record the weights determine (or ``None``).
        written: the record stored with the model (or ``None``).
        flags: user options, flat: ``ECRMUNet`` argument names, ``spatial_size``, ``normalization``, ``threshold``;
            ``None`` values are not given.
        overridable: flags that may differ from the record (the flag wins): by default the threshold, an operating
            point of the output rather than a property of the model.
        labels: how to name each source in errors: keys ``"derived"``, ``"written"``, ``"flags"``.

    Raises:
        RecordConflictError: a flag contradicts the model (its weights or its record), or the record contradicts the
            weights, naming the field and both values.
        ValueError: an unknown flag.
    """
    names = {"derived": "the weights", "written": "the model's record", "flags": "the options given"}
    names.update(labels or {})
    derived, written = dict(derived or {}), dict(written or {})
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    unknown = set(flags) - set(ARCHITECTURE_KEYS) - set(PREPROCESSING_KEYS) - {"threshold"}
    if unknown:
        known_options = [*ARCHITECTURE_KEYS, *PREPROCESSING_KEYS, "threshold"]
        raise ValueError(f"unknown model options {sorted(unknown)}; known: {known_options}.")
    if written:
        _check(written, names["written"])
    derived_kwargs = dict((derived.get("network") or {}).get("kwargs") or {})
    written_kwargs = dict((written.get("network") or {}).get("kwargs") or {})
    # a record without an argument was written before it existed (or from a partial configuration): it had the value of
    # that time, DCRNet's, not ECRMUNet's current default; what the weights show needs no such reading
    unstated = {
        key: value
        for key, value in UNSTATED_DEFAULTS.items()
        if written_kwargs and key not in written_kwargs and key not in derived_kwargs
    }
    written_kwargs.update(unstated)
    flag_kwargs = {key: value for key, value in flags.items() if key in ARCHITECTURE_KEYS}
    backbone = derived_kwargs.get("backbone") or written_kwargs.get("backbone") or flag_kwargs.get("backbone")
    # None values resolved as ECRMUNet resolves them (with the model's backbone), so that null and 32 compare equal
    written_kwargs = _resolve_nones({**({"backbone": backbone} if backbone else {}), **written_kwargs})
    flag_kwargs = {
        key: value
        for key, value in _resolve_nones({**({"backbone": backbone} if backbone else {}), **flag_kwargs}).items()
        if key in flags
    }
    order = {key: index for index, key in enumerate(ARCHITECTURE_KEYS)}
    mismatched = [
        (key, {names["derived"]: derived_kwargs[key], names["written"]: written_kwargs[key]})
        for key in sorted(derived_kwargs.keys() & written_kwargs.keys(), key=order.get)
        if not _same(derived_kwargs[key], written_kwargs[key])
    ]
    if mismatched:
        raise RecordConflictError(mismatched, " (the two must agree: is the record another model's?)")
    known = {**written_kwargs, **derived_kwargs}
    refused = [
        (key, {names["derived" if key in derived_kwargs else "written"]: known[key], names["flags"]: flags[key]})
        for key in sorted(flag_kwargs.keys() & known.keys(), key=order.get)
        if not _same(flag_kwargs[key], known[key])
    ]
    stated = {**flag_kwargs, **known}
    kwargs = resolve_network_kwargs({**UNSTATED_DEFAULTS, **stated})
    assumed = [
        f"network.kwargs.{key}"
        for key in kwargs
        if (key not in stated or (key in unstated and key not in flag_kwargs)) and key not in _TRAINING_ONLY_KEYS
    ]
    spatial_dims = int(kwargs["spatial_dims"])

    preprocessing = dict(written.get("preprocessing") or {})
    values: dict[str, Any] = {}
    for key, default in (
        ("spatial_size", DEFAULT_SPATIAL_SIZE),
        ("normalization", normalization_for_backbone(kwargs["backbone"])),
        ("threshold", DEFAULT_THRESHOLD),
    ):
        recorded = written.get("threshold") if key == "threshold" else preprocessing.get(key)
        given = flags.get(key)
        if key == "spatial_size":
            recorded = _spatial_size(recorded, spatial_dims) if recorded is not None else None
            given = _spatial_size(given, spatial_dims) if given is not None else None
        if recorded is not None and given is not None and not _same(recorded, given) and key not in overridable:
            refused.append((key, {names["written"]: recorded, names["flags"]: flags[key]}))
        values[key] = given if given is not None else recorded
        if values[key] is None:
            values[key] = default
            assumed.append(key if key == "threshold" else f"preprocessing.{key}")
    if refused:
        raise RecordConflictError(refused, " (an option may only state what the model does not say itself)")
    memory = dict(written.get("memory") or {})
    memory.update({key: value for key, value in (derived.get("memory") or {}).items() if value is not None})
    merged = {
        **written,
        **make_record(
            kwargs,
            spatial_size=values["spatial_size"],
            normalization=values["normalization"],
            threshold=values["threshold"],
            network_target=(written.get("network") or {}).get("target", NETWORK_TARGET),
            memory={key: memory[key] for key in ("slots", "filled", "selection") if key in memory},
            source=written.get("source"),
            training=written.get("training"),
            memory_sources=memory.get("sources"),
        ),
    }
    merged["precision"] = written.get("precision", "float32")
    merged["assumed"] = assumed
    return merged


# ------------------------------------------------------------------------------------------------------ files
def record_path(path: str | os.PathLike) -> Path:
    """Where the JSON record of ``path`` is: ``path/model.json`` for a folder (or a path without a suffix, a folder
    still to be made), the file itself for a ``.json``, ``<stem>.json`` beside any other file (``models/model.json``
    for ``models/model.pt`` and ``models/model.ts``)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path / RECORD_NAME
    return path if path.suffix == ".json" else path.with_suffix(".json")


def _check(record: Any, where: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(record, dict) or "schema_version" not in record:
        raise ValueError(f"{where}: not a model record (a JSON object with a 'schema_version').")
    if int(record["schema_version"]) > SCHEMA_VERSION:
        raise ValueError(
            f"{where}: a model record of schema version {record['schema_version']}; this monai-ecrm reads up to "
            f"{SCHEMA_VERSION} (upgrade monai-ecrm)."
        )
    return record


def _read_json_record(path: Path) -> dict[str, Any]:
    try:
        return _check(json.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable model record: {error}") from None


def _accuracy_record(result_path: Path) -> dict[str, Any] | None:
    """The record of a ``benchmarks/polyp_accuracy.py`` run (its ``result.json`` beside ``final_model.pt``), or
    ``None`` for a model that is no ECRMUNet (``flexunet``)."""
    result = json.loads(result_path.read_text(encoding="utf-8"))
    network = dict(result.get("network") or {})
    if not str(result.get("model", "")).startswith(("ecrm", "no_ecrm")) or "backbone" not in network:
        return None
    if result["model"] == "no_ecrm":
        network.update(use_ecrm=False, memory_stride=None)
    # the protocol's command line defaults to the DCRNet options; a result written before an option existed lacks it
    network = {**UNSTATED_DEFAULTS, **network}
    config = result.get("config") or {}
    training = {
        "protocol": "benchmarks/polyp_accuracy.py",
        "run": result.get("run"),
        "train_images": result.get("train_images"),
        "val_images": result.get("val_images"),
        "steps": result.get("steps"),
        "batch_size": result.get("batch_size"),
        "train_fingerprint": config.get("train_fingerprint"),
        "completed": True,
    }
    return make_record(
        network,
        spatial_size=result["size"],
        normalization=config.get("normalization"),
        training=training,
        source={"run_dir": str(result_path.parent)},
    )


def describe_weights(path: str | os.PathLike) -> dict[str, Any]:
    """``{"file", "sha256", "bytes"}`` of a weights file: what a record names to say which weights it describes."""
    path = Path(path)
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def verify_weights(record: Mapping[str, Any], path: str | os.PathLike, where: str | os.PathLike) -> None:
    """Check that ``record`` (read from ``where``) describes the weights file ``path``: its ``weights.sha256`` is the
    file's. A record without a ``weights`` entry (written before records named their weights) is accepted as it is.

    Raises:
        RecordMismatchError: naming both files and both digests.
    """
    named = (record.get("weights") or {}) if isinstance(record, Mapping) else {}
    expected = named.get("sha256")
    if not expected:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise RecordMismatchError(
            f"{where} describes other weights than {path} (the record names {named.get('file')} sha256 "
            f"{expected[:12]}..., the file is {actual[:12]}...): the record is another model's; retrain, or put the "
            "record written with these weights beside them."
        )


def _checkpoint_record(path: Path) -> dict[str, Any] | None:
    """The record a training checkpoint carries in its ``"run"`` entry (:class:`monai_ecrm.handlers.TrainingRun`),
    or ``None``."""
    if path.suffix != ".pt" or not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch.save archive, or unreadable: the weights loader says so
        return None
    run = checkpoint.get("run") if isinstance(checkpoint, Mapping) else None
    record = run.get("record") if isinstance(run, Mapping) else None
    if isinstance(record, str):
        return _check(json.loads(record), f"{path} (its run record)")
    return None


def _find_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The record stored with the model at ``path`` and where it was found (see :func:`read_record`).

    A JSON record that names its weights (``weights.file``, ``weights.sha256``) is the record of that file only: it
    is checked against ``path`` when it names ``path`` (:func:`verify_weights`), and not used for another file of the
    folder (``checkpoint_final.pt`` beside ``model.pt``), which has its own record inside (a training checkpoint's
    ``"run"`` entry) or none."""
    if path.suffix == ".onnx":
        metadata = read_onnx_metadata(path)
        return (_check(metadata, path) if metadata else None), f"the record in {path}"
    if _is_torchscript(path):
        embedded = _embedded_record(path)
        if embedded is not None:
            return embedded, f"the record in {path}"
    candidates = [record_path(path)]
    if path.is_file() and path.suffix != ".json":
        candidates.append(path.parent / RECORD_NAME)
    for candidate in candidates:
        if candidate.is_file():
            record = _read_json_record(candidate)
            named = record.get("weights") or {}
            if path.is_file() and path.suffix != ".json" and named.get("sha256"):
                if named.get("file") != path.name:
                    continue  # the record of another file of this folder
                verify_weights(record, path, candidate)
            return record, str(candidate)
    embedded = _checkpoint_record(path)
    if embedded is not None:
        return embedded, f"the run record in {path}"
    result = path.parent / "result.json"
    if path.name == "final_model.pt" and result.is_file():
        return _accuracy_record(result), str(result)
    return None, str(record_path(path))


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record stored with a model, or ``None`` when it has none.

    ``path``: a record ``.json``; a folder (its ``model.json``); a weights file (the ``<stem>.json`` beside it, else
    ``model.json`` in its folder; for an accuracy-protocol ``final_model.pt`` the run's ``result.json``); a
    TorchScript file (its embedded :data:`TORCHSCRIPT_EXTRA_FILE`, else the JSON beside it); an ``.onnx`` file (its
    metadata, :func:`read_onnx_metadata`).

    Raises:
        ValueError: the record is unreadable, not a record, or of a newer schema (naming the file).
    """
    return _find_record(Path(path))[0]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a reader sees the old
    file or the new one, never a part (several ranks writing the same record are safe too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files: give the record the mode any new file gets (0644 under the usual umask), so that
        # whoever can read the weights can read their record
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _stored(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as it is stored: JSON data with a ``schema_version``, without a merged record's ``"assumed"``."""
    stored = {"schema_version": SCHEMA_VERSION, **_plain(dict(record))}
    stored.pop("assumed", None)
    return stored


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``record`` where :func:`read_record` finds it, atomically; returns the file written.

    ``path``: a folder (``model.json`` in it), a ``.json`` file, a weights file (the ``<stem>.json`` beside it), a
    TorchScript file (embedded, :func:`embed_record`) or an ``.onnx`` file (:func:`write_onnx_metadata`).
    A record without ``schema_version`` gets the current one; ``"assumed"`` (a merged record's note) is not written.
    """
    record = _check(_stored(record), path)
    path = Path(path)
    if path.suffix == ".onnx":
        write_onnx_metadata(path, record)
        return path
    if _is_torchscript(path):
        return embed_record(path, record)
    target = record_path(path)
    _atomic_write(target, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return target


# ------------------------------------------------------------------------------------------------------ ONNX
def _onnx_model(path: Path) -> Any:
    try:
        import onnx
    except ImportError:
        raise ValueError(
            f"{path}: reading an ONNX model needs the onnx package (pip install 'monai-ecrm[onnx]')."
        ) from None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, onnx's own errors, OSError
        raise ValueError(f"{path}: not an ONNX model ({type(error).__name__}: {error}).") from None


def read_onnx_metadata(path: str | os.PathLike, model: Any = None) -> dict[str, Any]:
    """The record in an ONNX file's ``metadata_props`` under :data:`ONNX_METADATA_KEY` (``{}`` when it has none, e.g.
    straight from ``onnx_export``). ``model``: the file's ``onnx.ModelProto`` when already loaded.

    The record's layout is this module's (:func:`make_record`); :mod:`monai_ecrm.onnx` exports and checks the model
    and uses these two functions for its record, so that the record layer never imports the export layer."""
    model = model if model is not None else _onnx_model(Path(path))
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    return {}


def write_onnx_metadata(path: str | os.PathLike, record: Mapping[str, Any], model: Any = None) -> None:
    """Write ``record`` into the ONNX file ``path`` under :data:`ONNX_METADATA_KEY`, replacing an older one; the rest
    of the file is unchanged. A record without ``schema_version`` gets the current one."""
    import onnx

    model = model if model is not None else _onnx_model(Path(path))
    stored = {"schema_version": SCHEMA_VERSION, **_plain(dict(record))}
    kept = [prop for prop in model.metadata_props if prop.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(stored, sort_keys=True))
    onnx.save(model, str(path))


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_state_dict(checkpoint: Any, path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The network state dict in a loaded checkpoint: a flat state dict (a bundle's ``models/model.pt``, the accuracy
    protocol's ``final_model.pt``), or the ``"network"``/``"model"``/``"state_dict"`` entry of a training checkpoint
    (the bundle's ``checkpoint_*.pt``); a ``module.`` prefix (DataParallel) is removed.

    Raises:
        ValueError: naming ``path`` and the keys found when there is no state dict.
    """

    def flat(candidate: Any) -> bool:
        return isinstance(candidate, Mapping) and bool(candidate) and all(map(torch.is_tensor, candidate.values()))

    state = checkpoint if flat(checkpoint) else None
    if state is None and isinstance(checkpoint, Mapping):
        state = next((checkpoint[key] for key in ("network", "model", "state_dict") if flat(checkpoint.get(key))), None)
    if state is None:
        found = list(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path}: no network state dict (found {found}); expected a flat state dict (models/model.pt) or a "
            "checkpoint with a 'network' or 'model' entry."
        )
    # wrappers' prefixes: DataParallel/DDP (``module.``), torch.compile (``_orig_mod.``), in either order
    for prefix in ("module.", "_orig_mod.", "module."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a model.pt, a final_model.pt or a checkpoint_*.pt).")
    if _is_torchscript(path):
        return _script_state_dict(_jit_load(path, "cpu"))
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # OSError, UnpicklingError, RuntimeError from the loader
        raise ValueError(f"{path}: not a loadable checkpoint: {error}") from None
    return checkpoint_state_dict(checkpoint, path)


def load_network(
    path: str | os.PathLike,
    flags: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    network_class: type[ECRMUNet] = ECRMUNet,
    labels: Mapping[str, str] | None = None,
) -> tuple[ECRMUNet, dict[str, Any]]:
    """The network of a checkpoint, built from what its weights and its record say, weights loaded strictly, in eval
    mode on ``device``; and the merged record (:func:`merge_record`: preprocessing, threshold, ``"assumed"``).

    Args:
        path: a flat state dict (``models/model.pt``, ``final_model.pt``), a training checkpoint (``network`` or
            ``model`` entry) or a TorchScript file (its weights).
        flags: user options (``ECRMUNet`` arguments, ``spatial_size``, ``normalization``, ``threshold``), checked
            against the model.
        device: where the network goes.
        network_class: the class to build (``ECRMUNet`` or a subclass).
        labels: names of the sources in errors (see :func:`merge_record`); the flags are "the options given" unless
            ``labels["flags"]`` says otherwise (e.g. "the command line").

    Raises:
        RecordConflictError: an option or the record contradicts the model.
        ValueError: the file is unreadable, not an ECRMUNet, or its weights do not load (naming the file).
    """
    path = Path(path)
    state = _load_state(path)
    try:
        derived = record_from_state_dict(state)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    written, where = _find_record(path)
    names = {"derived": f"the weights in {path}", "written": where, **(labels or {})}
    record = merge_record(derived, written, flags, labels=names)
    network = network_class(**record["network"]["kwargs"])
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        summary = " ".join(line.strip() for line in str(error).strip().splitlines()[:4])[:600]
        raise ValueError(
            f"{path}: the weights do not load into ECRMUNet(**{record['network']['kwargs']}): {summary}"
        ) from None
    return network.to(device).eval(), record


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> ECRMUNet:
    """The network of a model file, in eval mode on ``device``: built from what its weights determine and the record
    that names them (:func:`load_network`), weights loaded strictly. Also ``monai_ecrm.load_model``.

    ``path``: a flat state dict (a bundle's ``models/model.pt``, the accuracy protocol's ``final_model.pt``; a
    ``torch.compile`` or DataParallel prefix is removed) or a training checkpoint (``checkpoint_*.pt``, described by
    the record inside it). ``overrides``: construction arguments the model does not state; one that contradicts it
    raises :class:`RecordConflictError` naming both values.

    Raises:
        RecordMismatchError: the record beside the file names other weights (naming both files).
        RecordConflictError: an override contradicts the model.
        ValueError: the file is unreadable or not an ECRMUNet (naming it).
    """
    return load_network(path, flags=overrides, device=device)[0]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (hex), read in 1 MiB blocks: what tells two model files apart whatever their names."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_bundle_config(
    path: str | os.PathLike,
    network: nn.Module | None = None,
    spatial_size: int | Sequence[int] | None = None,
    normalization: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any] | None:
    """Check a bundle configuration's values against the record of the model it runs (``models/model.json``), for a
    config's ``initialize`` list: running a model trained at 64 px at the config's 352 px, or with another network
    definition, is an error instead of a silent change. Returns the merged record, ``None`` when there is no record
    (a model trained before records; nothing to check).

    Args:
        path: the model (``@ckpt_path``) or its folder (``@ckpt_dir``).
        network: the config's network (``@network_def``), checked argument by argument.
        spatial_size: the config's ``@spatial_size``.
        normalization: the config's ``@normalization``.
        threshold: the config's ``@threshold`` (it may differ: an operating point, see :func:`merge_record`).

    Raises:
        RecordConflictError: naming the value, the record's and the config's.
    """
    written, where = _find_record(Path(path))
    if written is None:
        return None
    derived = record_from_network(network, check=False) if network is not None else None
    flags = {"spatial_size": spatial_size, "normalization": normalization, "threshold": threshold}
    names = {"derived": "the config's network_def", "written": where, "flags": "the config (or its overrides)"}
    return merge_record(derived, written, flags, labels=names)


# ------------------------------------------------------------------------------------------------- TorchScript
def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``<name>/constants.pkl``; ``torch.save`` zips have
    none)."""
    if path.suffix in (".json", ".onnx") or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _extra_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [name.split("/extra/", 1)[1] for name in archive.namelist() if "/extra/" in name]


def _jit_load(path: Path, device: str | torch.device, extra: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # deprecated in torch 2.13, but it is how MONAI's ckpt_export files load
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning)
        try:
            return torch.jit.load(str(path), map_location=device, _extra_files=extra if extra is not None else {})
        except Exception as error:  # RuntimeError, ValueError, OSError from the TorchScript loader
            raise ValueError(f"{path}: not a loadable TorchScript model: {error}") from None


def _parse_embedded(data: bytes | str, path: Path) -> dict[str, Any]:
    where = f"{path} ({TORCHSCRIPT_EXTRA_FILE})"
    try:
        return _check(json.loads(data), where)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: unreadable model record: {error}") from None


def _embedded_record(path: Path) -> dict[str, Any] | None:
    """The record embedded in a TorchScript file, read from the archive without loading the model."""
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith(f"/extra/{TORCHSCRIPT_EXTRA_FILE}")]
        return _parse_embedded(archive.read(names[0]), path) if names else None


def record_for_torchscript(record: Mapping[str, Any]) -> dict[str, bytes]:
    """``{TORCHSCRIPT_EXTRA_FILE: JSON}``: the ``_extra_files`` of ``torch.jit.save`` (or ``more_extra_files`` of
    MONAI's ``save_net_with_metadata``) that carry ``record`` in a TorchScript file."""
    return {TORCHSCRIPT_EXTRA_FILE: json.dumps(_stored(record), sort_keys=True).encode("utf-8")}


def _script_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A scripted ECRMUNet's state dict as the eager network's: TorchScript keeps non-persistent buffers in it (ECRM's
    ``context_gate`` of an ungated network, which is a parameter only with ``context_start="gate"``)."""
    parameters = dict(module.named_parameters())
    return {
        key: value
        for key, value in module.state_dict().items()
        if not (key.rsplit(".", 1)[-1] == "context_gate" and key not in parameters)
    }


def _derived_or_none(module: nn.Module) -> dict[str, Any] | None:
    """What a scripted network's weights determine, or ``None`` for a scripted network that is no ECRMUNet."""
    try:
        return record_from_state_dict(_script_state_dict(module))
    except ValueError:
        return None


def _holds_weights(module: nn.Module, weights: Path) -> bool:
    """Whether a scripted network holds exactly the weights of the file ``weights`` (same keys, equal tensors): an
    export of that file (``ckpt_export`` copies the weights as they are)."""
    try:
        state = _load_state(weights)
    except ValueError:
        return False
    scripted = _script_state_dict(module)
    return scripted.keys() == state.keys() and all(
        scripted[key].shape == state[key].shape and torch.equal(scripted[key].detach().cpu(), state[key].cpu())
        for key in state
    )


def _reexport_hint(path: Path, weights: Path) -> str:
    return (
        f"re-export it: python -m monai.bundle ckpt_export network_def --filepath {path} --ckpt_file {weights} "
        f"--config_file configs/inference.json (with the overrides the model needs), then python -m "
        f"monai_ecrm.record embed {path}"
    )


def embed_record(
    path: str | os.PathLike, record: Mapping[str, Any] | None = None, weights: str | os.PathLike | None = None
) -> Path:
    """Put ``record`` into the TorchScript file ``path`` (e.g. ``models/model.ts`` of ``python -m monai.bundle
    ckpt_export``), keeping its other extra files (MONAI's ``metadata.json`` and config copies); atomic. ``record``
    defaults to the JSON record beside the file (``models/model.json``).

    The weights the export was made from, ``weights`` (default: the file the record names, ``weights.file``, in the
    export's folder: ``models/model.pt``), are checked: the record must describe them
    (:func:`verify_weights`) and the export must hold exactly them, so a stale export (one of earlier weights) never
    gets the record of newer ones. The embedded record then names them, ``"exported_from": {"file", "sha256",
    "bytes"}`` (:func:`describe_weights`), in place of the ``weights`` entry of the record beside them. A record that
    names no weights, without ``weights``, is embedded as it is (without ``exported_from``).

    Raises:
        ValueError: no record given or found, not a TorchScript file, or the weights to check are missing.
        RecordMismatchError: the record describes other weights than ``weights``, or the export holds other weights.
        RecordConflictError: the record does not describe the file's weights.
    """
    path = Path(path)
    where = "the record given"
    if record is None:
        source = record_path(path)
        if not source.is_file():
            raise ValueError(f"{path}: no record given and no {source.name} beside it.")
        record, where = _read_json_record(source), str(source)
    if not _is_torchscript(path):
        raise ValueError(f"{path}: not a TorchScript file.")
    extra: dict[str, Any] = dict.fromkeys(_extra_names(path), "")
    module = _jit_load(path, "cpu", extra)
    stored = dict(record)
    named = (stored.pop("weights", None) or {}).get("file")
    if weights is None and named and named != path.name:
        weights = path.parent / named
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ValueError(
                f"{path}: {where} describes {weights}, which is not there to check that {path.name} was exported "
                "from it; give the weights it was exported from (--weights)."
            )
        verify_weights(record, weights, where)
        if not _holds_weights(module, weights):
            raise RecordMismatchError(
                f"{path} holds other weights than {weights} ({where} describes {weights.name}): a stale export, or "
                f"another model's; {_reexport_hint(path, weights)}."
            )
        stored["exported_from"] = describe_weights(weights)
    derived = _derived_or_none(module)
    if derived is not None:
        merge_record(derived, stored, labels={"derived": f"the weights in {path}", "written": "the record"})
    extra.update(record_for_torchscript(stored))
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        temporary = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`torch.jit.save` is deprecated", category=DeprecationWarning)
            torch.jit.save(module, str(temporary), _extra_files=extra)
        os.replace(temporary, path)
    return path


def load_torchscript(
    path: str | os.PathLike,
    flags: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    labels: Mapping[str, str] | None = None,
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript model in eval mode and its merged record: the embedded record (read with ``torch.jit.load``'s
    ``_extra_files``), else the JSON beside the file, checked against what the weights determine
    (:func:`record_from_state_dict`; a scripted network that is no ECRMUNet has only its record) and ``flags``.

    The embedded record is trusted as it is: it travels inside the file. A JSON record beside the file that names
    other weights (``models/model.json`` describing ``models/model.pt``) is the export's only when the export holds
    exactly those weights; otherwise the export is stale (or another model's), an error rather than a model labelled
    with another model's record.

    Raises:
        ValueError: not a loadable TorchScript file.
        RecordConflictError: an option or the record contradicts the model.
        RecordMismatchError: the JSON record beside the file describes other weights than the export's.
    """
    path = Path(path)
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    module = _jit_load(path, device, extra)
    if extra[TORCHSCRIPT_EXTRA_FILE]:
        written, where = _parse_embedded(extra[TORCHSCRIPT_EXTRA_FILE], path), f"the record in {path}"
    else:
        source = record_path(path)
        written, where = (_read_json_record(source) if source.is_file() else None), str(source)
        named = ((written or {}).get("weights") or {}).get("file")
        if named == path.name:
            verify_weights(written, path, source)
        elif named:
            weights = path.parent / named
            if not weights.is_file():
                raise RecordMismatchError(
                    f"{source} describes {weights}, which is not there to check that {path} holds its weights: "
                    f"embed the record when exporting (python -m monai_ecrm.record embed {path} --weights WEIGHTS)."
                )
            verify_weights(written, weights, source)
            if not _holds_weights(module, weights):
                raise RecordMismatchError(
                    f"{source} describes {weights}, whose weights are not those of {path}: a stale export, or "
                    f"another model's; {_reexport_hint(path, weights)}."
                )
    names = {"derived": f"the weights in {path}", "written": where, **(labels or {})}
    return module.eval(), merge_record(_derived_or_none(module), written, flags, labels=names)


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``show PATH``: print the merged record of a model file (what running it would use; ``assumed`` lists the
    defaults nobody stated). ``embed MODEL_TS [--record JSON] [--weights PT]``: put a record (default: the JSON beside
    the file) into a TorchScript file, after checking that the file holds the weights the record describes (default:
    the file the record names, ``models/model.pt``); the embedded record names them under ``exported_from``."""
    parser = argparse.ArgumentParser(prog="python -m monai_ecrm.record", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the record of a model file (.pt, .ts, .onnx, .json or a folder)")
    show.add_argument("path")
    embed = sub.add_parser("embed", help="put the record into a TorchScript file")
    embed.add_argument("model", help="the TorchScript file (e.g. models/model.ts)")
    embed.add_argument("--record", help="the record JSON (default: the .json beside the model)")
    embed.add_argument(
        "--weights", help="the weights the model was exported from (default: the file the record names: model.pt)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "embed":
            record = None
            if args.record:
                record = _read_json_record(Path(args.record))
            print(embed_record(args.model, record, weights=args.weights))
            return 0
        path = Path(args.path)
        if path.is_dir() or path.suffix in (".json", ".onnx"):
            record = read_record(path)
            if record is None:
                raise ValueError(f"{path}: no model record")
        elif _is_torchscript(path):
            record = load_torchscript(path)[1]
        else:
            record = load_network(path)[1]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
