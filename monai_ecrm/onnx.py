"""ONNX export of ECRM-UNet with its memory inside, the model record stored in the ONNX file, INT8 quantisation, and
an ONNX Runtime session for CPU inference.

Export goes through MONAI's own ``python -m monai.bundle onnx_export`` with the bundle's ``configs/onnx_export.json``
args file (the TorchScript tracer, ``dynamo: false``, opset 18, dynamic batch, height and width). The network is in
eval mode, so its ECRM memory is frozen: the filled slots become an initializer of the graph, and the attention over
them is part of the model. A network whose memory is empty exports without attention, exactly as it computes in
eval mode; :func:`bundle_record` warns about it.

MONAI writes no metadata into the ONNX file, so what a runtime needs to use the model (construction arguments,
preprocessing, threshold, memory, and for INT8 the calibration) is written afterwards as one JSON record under the
metadata key :data:`METADATA_KEY` (:func:`write_metadata`, :func:`read_metadata`), in the layout of
:mod:`monai_ecrm.record`. For a checkpoint with a model record (``models/model.json`` beside ``models/model.pt``) that
record is the source (:func:`bundle_record`): the input size, normalisation, threshold, memory (fill and case names)
and training come from the model, and a config value that contradicts them stops the export with one line naming the
value, the record's and the config's (pass the record's value as an override, e.g. ``--spatial_size 128``). The
record in the file names the weights it was exported from, ``"exported_from": {"file", "sha256", "bytes"}``
(:func:`monai_ecrm.record.describe_weights` of the checkpoint), so an export can be matched to its ``model.pt``::

    cd bundles/polyp_ecrm
    python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --args_file configs/onnx_export.json
    python -m monai_ecrm.onnx record --model models/model.onnx --config_file configs/inference.json \\
        --meta_file configs/metadata.json --ckpt_file models/model.pt

or both steps at once, with the same arguments (and the same ``--key value`` config overrides) as MONAI's command::

    python -m monai_ecrm.onnx export --filepath models/model.onnx --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --args_file configs/onnx_export.json

INT8 (static quantisation, QDQ format, per-channel weights, calibrated on training images preprocessed as the
record says; the memory attention stays in float)::

    python -m monai_ecrm.onnx quantize --model models/model.onnx --out models/model.int8.onnx \\
        --datalist DATALIST.json --num-images 64

:func:`load_onnx_session` opens either file for inference and refuses what is not such a model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser, update_kwargs
from monai.utils import optional_import
from torch import nn

from monai_ecrm.data import DataError
from monai_ecrm.record import (
    NETWORK_TARGET,
    ONNX_METADATA_KEY,
    SCHEMA_VERSION,
    read_onnx_metadata,
    versions,
    write_onnx_metadata,
)
from monai_ecrm.record import make_record as _make_model_record
from monai_ecrm.transforms import NORMALIZATIONS, infer_transforms

onnx, _has_onnx = optional_import("onnx")
ort, _has_ort = optional_import("onnxruntime")

__all__ = [
    "METADATA_KEY",
    "SCHEMA_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "EXPORT_CONVERTER_KWARGS",
    "OnnxModelError",
    "make_record",
    "bundle_record",
    "export_network",
    "export_bundle",
    "write_metadata",
    "read_metadata",
    "load_onnx_model",
    "is_quantized",
    "attention_nodes",
    "calibration_items",
    "quantize_int8",
    "load_onnx_session",
    "record_preprocessing",
    "OnnxNetwork",
    "main",
]

#: key of the model record in the ONNX file's ``metadata_props`` (the record module's; one layout for every carrier)
METADATA_KEY = ONNX_METADATA_KEY
#: the network class whose construction arguments a record states resolved
_ECRMUNET_TARGET = NETWORK_TARGET
#: graph input and output names (also in ``configs/onnx_export.json``)
INPUT_NAME = "image"
OUTPUT_NAME = "pred"
#: what ``configs/onnx_export.json`` passes to ``monai.networks.utils.convert_to_onnx``: the TorchScript tracer
#: (``torch.export`` stops at the memory bank's fill count, a data-dependent value), opset 18, batch, height and
#: width dynamic (list form: a JSON file cannot hold the integer keys of the named form)
EXPORT_CONVERTER_KWARGS: dict[str, Any] = {
    "dynamo": False,
    "opset_version": 18,
    "input_names": [INPUT_NAME],
    "output_names": [OUTPUT_NAME],
    "dynamic_axes": {INPUT_NAME: [0, 2, 3], OUTPUT_NAME: [0, 2, 3]},
}
#: ops that only a quantised graph holds
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}
#: the ops of the memory attention (projections of the memory, scores, softmax, weighted sum): quantising them
#: gains nothing measurable (a few tokens) and costs the attention's precision
_ATTENTION_OPS = {"Gemm", "MatMul", "Softmax"}
#: modules whose attention ops stay in float (ECRM's memory attention, ICRM's position attention)
_ATTENTION_MODULES = {"ecrm", "icrm"}
#: ops kept in float everywhere: a BatchNormalization left after the graph optimisations (ECRM's norm after the sum
#: of its two fusion convolutions) has one scale per channel, which the quantiser can only quantise per tensor
_FLOAT_OPS = {"BatchNormalization"}


class OnnxModelError(ValueError):
    """A file is not the ONNX model that was expected (not ONNX, another input layout, a record missing)."""


def _require_onnx(runtime: bool = False) -> None:
    if not _has_onnx or (runtime and not _has_ort):
        raise ImportError('monai_ecrm.onnx needs onnx and onnxruntime: pip install "monai-ecrm[onnx]"')


# ---------------------------------------------------------------------------------------------------- the record
def _plain(value: Any) -> Any:
    """``value`` as JSON data (tuples to lists, tensors and numpy scalars to numbers)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def _sha256(path: str | os.PathLike) -> str:
    from monai_ecrm.record import file_sha256

    return file_sha256(path)


def make_record(
    network_kwargs: Mapping[str, Any],
    spatial_size: int | Sequence[int],
    normalization: str,
    threshold: float = 0.5,
    network_target: str = _ECRMUNET_TARGET,
    memory: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model record of an exported float32 model (schema version :data:`SCHEMA_VERSION`).

    Fields: ``schema_version``; ``precision`` (``"float32"``, ``"int8"`` after :func:`quantize_int8`); ``network``
    (``target`` and ``kwargs``: how to build the PyTorch network); ``input`` and ``output`` (names, layout, the
    output's activation); ``preprocessing`` (``spatial_size`` ``[H, W]``, ``normalization`` name and its per-channel
    ``mean``/``std`` on [0, 1] intensities, as :func:`monai_ecrm.transforms.infer_transforms` applies them);
    ``threshold`` (on the sigmoid); ``memory`` (``slots``, ``filled``, optional ``sources``: the names of the cases
    its slots were filled from, the key ``monai_ecrm.record`` uses too); ``source`` (checkpoint, its SHA-256,
    versions, opset); ``calibration`` (INT8 only). This is the record of a model without a record of its own;
    :func:`bundle_record` takes a model's record (with its ``training``) where it has one, and adds ``exported_from``.

    Args:
        network_kwargs: the network's construction arguments (the bundle's ``network_def`` without ``_target_``). For
            an ``ECRMUNet`` they are stored resolved, every architecture argument stated
            (:func:`monai_ecrm.record.resolve_network_kwargs`: what is left out is ``ECRMUNet``'s default, the
            weights' source dropped), so that a reader never has to guess a default.
        spatial_size: the network input size of the preprocessing, an int for a square or ``[H, W]``.
        normalization: a name of :data:`monai_ecrm.transforms.NORMALIZATIONS`.
        threshold: probability threshold of the mask.
        network_target: the network's class or function.
        memory: ``{"slots": S, "filled": F, "sources": [...] or None}``.
        source: where the weights come from (checkpoint path, hash, versions).
    """
    memory = dict(memory) if memory is not None else None
    record = _make_model_record(
        network_kwargs,
        spatial_size=spatial_size,
        normalization=normalization,
        threshold=threshold,
        network_target=network_target,
        memory={key: value for key, value in (memory or {}).items() if key != "sources"} if memory else None,
        memory_sources=(memory or {}).get("sources"),
    )
    record["input"]["dynamic_axes"] = ["batch", "height", "width"]
    record["source"] = _plain(dict(source or {}))  # the exporter states its versions itself
    record.pop("training", None)
    return record


def _versions() -> dict[str, str]:
    return versions()


def _memory_from_state(state: Mapping[str, Any], cases: Sequence[str] | None) -> dict[str, Any] | None:
    """``{"slots", "filled", "sources"}`` of the ECRM memory in a state dict (``None`` for a network without one)."""
    keys = [key for key in state if key.endswith("memory.memory") and torch.is_tensor(state[key])]
    if not keys:
        return None
    prefix = keys[0][: -len("memory")]
    filled = int(torch.as_tensor(state.get(prefix + "filled", 0)))
    if filled == 0:
        warnings.warn(
            "monai_ecrm.onnx: the checkpoint's ECRM memory is empty, so the exported model has no memory attention "
            "(its eval-mode output). Fill it first (training, or monai_ecrm.handlers.refresh_memory).",
            stacklevel=3,
        )
    return {"slots": int(state[keys[0]].shape[0]), "filled": filled, "sources": list(cases) if cases else None}


def _read_cases(cases: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """Memory case names: a list, a JSON list file, or a text file with one name a line."""
    if cases is None or isinstance(cases, (list, tuple)):
        return list(cases) if cases else None
    text = Path(cases).read_text()
    if text.lstrip().startswith("["):
        return [str(name) for name in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _checkpoint_state(ckpt_file: str | os.PathLike, key_in_ckpt: str = "") -> dict[str, Any]:
    """The network state dict of a checkpoint: its ``key_in_ckpt`` entry, else the state dict it is or holds
    (:func:`monai_ecrm.record.checkpoint_state_dict`); a checkpoint holding none is returned as loaded."""
    from monai_ecrm.record import checkpoint_state_dict

    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    if key_in_ckpt:
        return checkpoint[key_in_ckpt]
    try:
        return checkpoint_state_dict(checkpoint, ckpt_file)
    except ValueError:
        return checkpoint


def _record_of_model(
    written: Mapping[str, Any],
    state: Mapping[str, Any],
    ckpt_file: str | os.PathLike,
    network_kwargs: Mapping[str, Any],
    config: Mapping[str, Any],
    cases: Sequence[str] | None,
    override_id: Callable[[str], str] = str,
) -> dict[str, Any]:
    """The export's record from the model's own: ``written`` (the checkpoint's record) merged with what the weights
    determine, the config's network arguments and preprocessing held against both, no value overridable.
    ``override_id`` names the config id that sets a value (``spatial_size``, ``network_def#key_channels``), for the
    error's example override."""
    from monai_ecrm.record import RecordConflictError, merge_record, record_from_state_dict, resolve_network_kwargs

    try:
        derived = record_from_state_dict(state)
    except ValueError as error:
        raise ValueError(f"{ckpt_file}: {error}") from None
    names = {
        "derived": f"the weights in {ckpt_file}",
        "written": f"the record of {ckpt_file}",
        "flags": "the config (or its overrides)",
    }
    # the network MONAI exports is the config's: every argument it is built with is held against the model
    flags = {**resolve_network_kwargs(network_kwargs), **config}
    try:
        record = merge_record(derived, written, flags, overridable=(), labels=names)
    except RecordConflictError as error:
        if not any(names["flags"] in values for _, values in error.conflicts):
            raise  # the record contradicts its own weights: its message says so
        key, values = next((key, values) for key, values in error.conflicts if names["flags"] in values)
        recorded = next(iter(values.values()))
        shown = recorded if isinstance(recorded, str) else json.dumps(recorded, separators=(",", ":"))
        example = f"--{override_id(key)} {shown}"
        hint = (
            f" (an export takes these from the model's record: give the record's values as overrides, e.g. {example})"
        )
        raise RecordConflictError(error.conflicts, hint) from None
    memory = record.get("memory")
    recorded_cases = (memory or {}).get("sources")
    if cases and recorded_cases is not None and list(recorded_cases) != list(cases):
        raise RecordConflictError(
            [("memory.sources", {names["written"]: recorded_cases, "--memory-cases": list(cases)})],
            " (the record names the memory's cases itself: leave out --memory-cases)",
        )
    if cases and memory is not None and recorded_cases is None:
        memory["sources"] = list(cases)
    for key in ("assumed", "weights"):  # the record's weights are the checkpoint's: exported_from names them
        record.pop(key, None)
    record["input"]["dynamic_axes"] = ["batch", "height", "width"]
    return record


def bundle_record(
    config_file: str | os.PathLike | Sequence[str | os.PathLike],
    meta_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ckpt_file: str | os.PathLike | None = None,
    net_id: str = "network_def",
    key_in_ckpt: str = "",
    memory_cases: str | os.PathLike | Sequence[str] | None = None,
    **override: Any,
) -> dict[str, Any]:
    """The model record of a bundle's exported network, the config read as ``onnx_export`` reads it.

    A checkpoint with a model record (``models/model.json`` beside ``models/model.pt``, a training checkpoint's own;
    :func:`monai_ecrm.record.read_record`, which checks that the record describes these weights) gives the record:
    construction arguments, input size, normalisation, threshold, memory (slots and fill from the weights, case names
    from the record) and ``training`` are the model's. The config's values (every argument of the network ``net_id``
    builds, ``spatial_size``, ``normalization``, ``threshold``) are held against it: one that contradicts the model
    is a :class:`~monai_ecrm.record.RecordConflictError` naming the value, the record's and the config's (the
    threshold included: the file states the model). Without a record (a model trained before records, or no
    ``ckpt_file``) the network's arguments come from ``net_id``'s entries resolved (``@backbone`` and the like), the
    preprocessing from the config's ``spatial_size`` and ``normalization``, the threshold from ``threshold`` (0.5 if
    absent) and the memory's fill count from the checkpoint.

    With ``ckpt_file`` the record names it: ``exported_from`` (:func:`monai_ecrm.record.describe_weights`: file name,
    SHA-256, size) and ``source.checkpoint``/``checkpoint_sha256``.

    Args:
        config_file: the config file(s) the network is defined in.
        meta_file: the bundle's ``metadata.json`` (optional).
        ckpt_file: the checkpoint that was exported (hashed, its record and memory state read).
        net_id: the network's id in the config.
        key_in_ckpt: the key of the weights in a nested checkpoint.
        memory_cases: names of the images the memory was filled from (a list, a JSON list file or a text file), for a
            model whose record does not name them; they must agree with a record that does.
        override: config overrides, ``id=value``, as given to ``onnx_export``.

    Raises:
        RecordConflictError: a config value (or ``memory_cases``) contradicts the model's record or weights.
        RecordMismatchError: the record beside the checkpoint describes other weights.
        KeyError: without a record, the config has no ``spatial_size`` or ``normalization``.
    """
    from monai_ecrm.record import describe_weights, read_record

    parser = ConfigParser()
    parser.read_config(f=[str(f) for f in config_file] if isinstance(config_file, (list, tuple)) else str(config_file))
    if meta_file is not None:
        parser.read_meta(f=[str(f) for f in meta_file] if isinstance(meta_file, (list, tuple)) else str(meta_file))
    for key, value in override.items():
        parser[key] = value
    definition = parser[net_id]
    kwargs = {key: parser.get_parsed_content(f"{net_id}#{key}") for key in definition if not str(key).startswith("_")}
    target = definition.get("_target_", _ECRMUNET_TARGET)
    config = {
        key: parser.get_parsed_content(key) for key in ("spatial_size", "normalization", "threshold") if key in parser
    }
    cases = _read_cases(memory_cases)
    source: dict[str, Any] = {"exporter": "torch.onnx (TorchScript tracer)", **_versions()}
    memory, state, written = None, None, None
    if ckpt_file is not None:
        source.update({"checkpoint": Path(ckpt_file).name, "checkpoint_sha256": _sha256(ckpt_file)})
        state = _checkpoint_state(ckpt_file, key_in_ckpt)
        memory = _memory_from_state(state, cases)
        if target == _ECRMUNET_TARGET:
            written = read_record(ckpt_file)
    if written is not None:
        top_level = set(parser.get())

        def override_id(key: str) -> str:
            return key if key in top_level else f"{net_id}#{key}"

        record = _record_of_model(written, state, ckpt_file, kwargs, config, cases, override_id)
        record["source"] = {**(record.get("source") or {}), **source}
    else:
        for needed in ("spatial_size", "normalization"):
            if needed not in config:
                raise KeyError(f"bundle_record: the config has no {needed!r} entry (the preprocessing of the record).")
        record = make_record(
            kwargs,
            spatial_size=config["spatial_size"],
            normalization=config["normalization"],
            threshold=config.get("threshold", 0.5),
            network_target=target,
            memory=memory,
            source=source,
        )
    if ckpt_file is not None:
        record["exported_from"] = describe_weights(ckpt_file)
    return record


# ---------------------------------------------------------------------------------------------- metadata in ONNX
def load_onnx_model(path: str | os.PathLike) -> Any:
    """The ``onnx.ModelProto`` of ``path``, checked to be an ONNX image model with one float32 ``[N, C, H, W]``
    input, ``C`` the record's ``input.channels`` (3, RGB, for a file without a record).

    Raises:
        OnnxModelError: ``path`` is missing, not ONNX, or its input has another layout (naming the file and what was
            expected).
    """
    _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such file (expected an ONNX model, e.g. models/model.onnx).")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf raises its own DecodeError, onnx a few others
        raise OnnxModelError(
            f"{path}: not an ONNX model ({type(error).__name__}: {error}). Expected a .onnx file written by "
            "`python -m monai.bundle onnx_export` with configs/onnx_export.json (a .pt checkpoint is not one)."
        ) from None
    if model.ir_version <= 0 or not model.graph.node:
        raise OnnxModelError(
            f"{path}: not an ONNX model (no graph). Expected a .onnx file written by "
            "`python -m monai.bundle onnx_export` with configs/onnx_export.json."
        )
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    in_channels = (_record_of(model).get("input") or {}).get("channels", 3)
    expected = f"one float32 input [batch, {in_channels}, height, width] (NCHW)"
    if len(inputs) != 1:
        raise OnnxModelError(f"{path}: the model has {len(inputs)} inputs; expected {expected}.")
    tensor_type = inputs[0].type.tensor_type
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    channel_ok = len(dims) == 4 and dims[1] == in_channels
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or not channel_ok:
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        shape = ["?" if dim is None else dim for dim in dims]
        raise OnnxModelError(f"{path}: input {inputs[0].name!r} is {elem} {shape}; expected {expected}.")
    return model


def write_metadata(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``record`` (JSON data) into the ONNX file ``path`` under :data:`METADATA_KEY`, replacing an older one
    (:func:`monai_ecrm.record.write_onnx_metadata`, after checking the file is an ONNX image model).

    A record without ``schema_version`` gets the current one. The rest of the file is unchanged.
    """
    write_onnx_metadata(path, record, model=load_onnx_model(path))


def _record_of(model: Any) -> dict[str, Any]:
    return read_onnx_metadata("", model=model)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The model record of the ONNX file ``path`` (``{}`` when it has none, e.g. straight from ``onnx_export``)."""
    return _record_of(load_onnx_model(path))


def is_quantized(model: Any) -> bool:
    """Whether an ``onnx.ModelProto`` holds quantised operators (an INT8 model)."""
    return any(node.op_type in _QUANTIZED_OPS for node in model.graph.node)


# ------------------------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _expected_export_warnings() -> Iterator[None]:
    """Silence the exporter's notes that are expected here: the memory's fill count is read as a constant (right: the
    memory is frozen in eval mode), the dynamic axes are unnamed (the JSON args file gives them as lists), and the
    legacy exporter is deprecated (it is the one that handles the memory)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"monai_ecrm\.networks\.blocks")
        # MONAI's decoder compares skip and upsampled sizes: always equal here (the network pads to its stride)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"monai\.networks\.nets")
        warnings.filterwarnings("ignore", message=r"No names were found for specified dynamic axes")
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        yield


def export_network(
    network: nn.Module,
    filepath: str | os.PathLike,
    record: Mapping[str, Any] | None = None,
    sample_shape: Sequence[int] = (1, 3, 352, 352),
) -> Path:
    """Export ``network`` (in eval mode, its memory frozen) to ``filepath`` with MONAI's ``convert_to_onnx`` and the
    options of ``configs/onnx_export.json`` (:data:`EXPORT_CONVERTER_KWARGS`), then write ``record`` into it.

    The graph takes any batch and any height and width (the network pads to its stride and crops back inside the
    graph); ``sample_shape`` is only the tracing sample. The record gets the network's ``memory`` when it has
    none, and the exporter's versions and opset in ``source``.
    """
    _require_onnx()
    from monai.networks.utils import convert_to_onnx

    network.eval()
    if record is not None:
        source = {"exporter": "torch.onnx (TorchScript tracer)", **_versions(), **(record.get("source") or {})}
        source.setdefault("opset", EXPORT_CONVERTER_KWARGS["opset_version"])
        record = {**record, "source": source}
        memory = record.get("memory")
        if memory is None or memory.get("filled") is None:
            # the fill is the weights' (a record made from arguments only states the size); given names are kept
            from_state = _memory_from_state(network.state_dict(), (memory or {}).get("sources"))
            record["memory"] = from_state if from_state is not None else memory
    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    with _expected_export_warnings():
        model = convert_to_onnx(
            network, [torch.rand(*sample_shape)], use_trace=True, **copy.deepcopy(EXPORT_CONVERTER_KWARGS)
        )
    onnx.save(model, str(filepath))
    if record is not None:
        write_metadata(filepath, record)
    return filepath


def export_bundle(
    filepath: str | os.PathLike,
    ckpt_file: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike],
    meta_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    args_file: str | os.PathLike | None = None,
    net_id: str | None = None,
    memory_cases: str | os.PathLike | Sequence[str] | None = None,
    **override: Any,
) -> dict[str, Any]:
    """MONAI's ``onnx_export`` of a bundle followed by :func:`write_metadata`: the arguments of
    ``python -m monai.bundle onnx_export`` (``args_file`` defaults included), plus ``memory_cases``. Returns the
    record written (:func:`bundle_record`: the checkpoint's model record, ``exported_from`` naming the checkpoint).

    The record is made, and the config checked against the model, before anything is exported; the file is written
    under a temporary name and renamed once it holds its record, so ``filepath`` is never an export without one.

    Raises:
        RecordConflictError: a config value contradicts the model's record (nothing is written).
    """
    from monai.bundle.scripts import onnx_export

    def paths(value: Any) -> Any:
        return [str(item) for item in value] if isinstance(value, (list, tuple)) else value and str(value)

    arguments = update_kwargs(
        args=str(args_file) if args_file else None,
        net_id=net_id,
        filepath=str(filepath),
        ckpt_file=str(ckpt_file),
        config_file=paths(config_file),
        meta_file=paths(meta_file),
        **override,
    )
    exported = {"net_id", "filepath", "ckpt_file", "config_file", "meta_file", "key_in_ckpt"}
    options = {"use_trace", "input_shape", "converter_kwargs", "args_file"}
    record = bundle_record(
        config_file=arguments["config_file"],
        meta_file=arguments.get("meta_file"),
        ckpt_file=arguments["ckpt_file"],
        net_id=arguments.get("net_id") or "network_def",
        key_in_ckpt=arguments.get("key_in_ckpt") or "",
        memory_cases=memory_cases,
        **{key: value for key, value in arguments.items() if key not in exported | options},
    )
    record["source"]["opset"] = (arguments.get("converter_kwargs") or {}).get("opset_version")
    target = Path(arguments["filepath"])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        temporary = Path(scratch) / target.name
        with _expected_export_warnings():
            onnx_export(**{**arguments, "filepath": str(temporary)})
        write_metadata(temporary, record)
        os.replace(temporary, target)
    return record


# ------------------------------------------------------------------------------------------------------- INT8
def attention_nodes(model: Any) -> list[str]:
    """Names of the attention nodes of an exported ECRM-UNet (ECRM: projections of the memory, scores, softmax,
    weighted sum; ICRM likewise): the nodes :func:`quantize_int8` keeps in float by default."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type in _ATTENTION_OPS and _ATTENTION_MODULES & set(node.name.split("/"))
    ]


def calibration_items(
    datalist: str | os.PathLike, num_images: int, data_list_key: str = "training", seed: int = 0
) -> list[dict[str, Any]]:
    """``num_images`` items drawn without replacement (seeded, then in datalist order) from a datalist JSON's
    ``data_list_key`` list or from a folder (:func:`monai_ecrm.data.load_datalist`)."""
    from monai_ecrm.data import load_datalist

    items = load_datalist(datalist, data_list_key=data_list_key, verify="none")
    if num_images < 1 or num_images > len(items):
        raise ValueError(
            f"calibration: {num_images} images asked for, {datalist} ({data_list_key!r}) holds {len(items)}."
        )
    chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=num_images, replace=False))
    return [items[int(index)] for index in chosen]


def record_preprocessing(record: Mapping[str, Any], path: str | os.PathLike = "the model") -> tuple[list[int], str]:
    """The network input size ``[H, W]`` and the normalisation name of a record's preprocessing, checked to be what
    :func:`monai_ecrm.transforms.infer_transforms` applies with them (bilinear resize of [0, 1] intensities, then the
    mean/std of that name in :data:`monai_ecrm.transforms.NORMALIZATIONS`).

    Raises:
        OnnxModelError: naming ``path``, when the record states no preprocessing or one these transforms do not apply.
    """
    prep = record.get("preprocessing") or {}
    if not prep.get("spatial_size") or not prep.get("normalization"):
        raise OnnxModelError(
            f"{path}: the model record states no preprocessing (spatial_size, normalization); write it with "
            "`python -m monai_ecrm.onnx record --model ...`."
        )
    mean, std = NORMALIZATIONS.get(prep["normalization"], (None, None))
    same_statistics = (
        mean is not None and np.allclose(mean, prep.get("mean", mean)) and np.allclose(std, prep.get("std", std))
    )
    if not same_statistics or prep.get("resize", "bilinear") != "bilinear":
        raise OnnxModelError(
            f"{path}: record preprocessing {prep} is not one of monai_ecrm.transforms.infer_transforms' (bilinear "
            f"resize, a normalisation of {sorted(NORMALIZATIONS)} with its mean/std)."
        )
    size = prep["spatial_size"]
    return ([int(size)] * 2 if isinstance(size, (int, np.integer)) else [int(side) for side in size]), prep[
        "normalization"
    ]


def _preprocessing(record: Mapping[str, Any]) -> Any:
    """The record's preprocessing as the bundle's inference transform (refusing a normalisation it cannot name)."""
    spatial_size, normalization = record_preprocessing(record)
    return infer_transforms(spatial_size=spatial_size, normalization=normalization)


class _CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader``: one preprocessed image ``[1, 3, H, W]`` per call."""

    def __init__(self, items: Sequence[Mapping[str, Any]], record: Mapping[str, Any], input_name: str) -> None:
        self.transform = _preprocessing(record)
        self.input_name = input_name
        self.items = list(items)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.items):
            return None
        image = self.transform(dict(self.items[self.position]))["image"]
        self.position += 1
        return {self.input_name: np.asarray(image, dtype=np.float32)[None]}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(
    model: str | os.PathLike,
    out: str | os.PathLike,
    datalist: str | os.PathLike,
    num_images: int = 64,
    data_list_key: str = "training",
    seed: int = 0,
    quantize_attention: bool = False,
) -> dict[str, Any]:
    """Write an INT8 copy of the float32 ONNX model ``model`` to ``out`` by static quantisation.

    ONNX Runtime's quantiser: QDQ format, per-channel symmetric int8 weights, uint8 activations, min/max
    calibration on ``num_images`` images of ``datalist`` (:func:`calibration_items`) preprocessed as the model's
    record says. The memory attention stays in float unless ``quantize_attention``. The record, with a
    ``calibration`` entry (images, datalist, a SHA-256 of their paths, settings), is written into ``out``.

    Raises:
        OnnxModelError: ``model`` is not an ECRM-UNet ONNX file with its record, or is already quantised.
    """
    _require_onnx(runtime=True)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = load_onnx_model(model)
    record = _record_of(proto)
    if not record.get("preprocessing"):
        raise OnnxModelError(
            f"{model}: no model record (metadata {METADATA_KEY!r}), so its preprocessing is unknown; write it with "
            "`python -m monai_ecrm.onnx record` first."
        )
    if is_quantized(proto):
        raise OnnxModelError(f"{model}: already quantised; expected the float32 export.")
    items = calibration_items(datalist, num_images, data_list_key, seed)
    paths = [f"{item['image']}#{item.get('frame', '')}" if "frame" in item else str(item["image"]) for item in items]
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # shape inference and ORT's graph optimisations (BatchNorm folding) first, as ONNX Runtime recommends
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        prepared_model = onnx.load(str(prepared))
        excluded = [node.name for node in prepared_model.graph.node if node.op_type in _FLOAT_OPS]
        if not quantize_attention:
            excluded += attention_nodes(prepared_model)
        quantize_static(
            str(prepared),
            str(out),
            _CalibrationReader(items, record, proto.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
        )
    record = dict(record)
    record["precision"] = "int8"
    record["calibration"] = {
        "num_images": len(items),
        "datalist": str(datalist),
        "data_list_key": data_list_key,
        "seed": seed,
        "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "method": "MinMax",
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
        "float_nodes": excluded,
        "float_model_sha256": _sha256(model),
        "onnxruntime": ort.__version__,
    }
    write_metadata(out, record)
    return record


# ------------------------------------------------------------------------------------------------------ runtime
def load_onnx_session(
    path: str | os.PathLike, threads: int = 2, require_record: bool = True, profile_prefix: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime CPU session for the model file ``path`` and its record.

    ``threads`` intra-op threads (one inter-op thread), all graph optimisations. ``profile_prefix`` turns on ORT's
    profiler (``session.end_profiling()`` writes the JSON trace).

    Raises:
        OnnxModelError: ``path`` is not ONNX, has another input layout, has no record (with ``require_record``), or
            is an INT8 model without its calibration record.
    """
    _require_onnx(runtime=True)
    model = load_onnx_model(path)
    record = _record_of(model)
    if require_record and not record:
        raise OnnxModelError(
            f"{path}: no model record (metadata {METADATA_KEY!r}): its preprocessing and threshold are unknown. "
            "Write it with `python -m monai_ecrm.onnx record --model ...` (or export with `python -m monai_ecrm.onnx "
            "export`)."
        )
    if is_quantized(model) and not record.get("calibration"):
        raise OnnxModelError(
            f"{path}: an INT8 model without its calibration record (metadata {METADATA_KEY!r} with a 'calibration' "
            "entry); expected a file written by `python -m monai_ecrm.onnx quantize`."
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session, record


class OnnxNetwork(nn.Module):
    """An exported ECRM-UNet run by ONNX Runtime, called like the PyTorch network: images ``[B, 3, H, W]`` in, float32
    logits ``[B, 1, H, W]`` out, on the images' device. A MONAI evaluator, an inferer or
    :class:`~monai_ecrm.clinical.runner.TorchRunner` take it in place of the network (the bundle's ``inference.json``
    with ``--onnx_path``).

    The session runs on the CPU (:func:`load_onnx_session`); the model is frozen, so the module has no parameters and
    ``train()``/``eval()`` change nothing. The images are passed as they are: the preprocessing must be the one the
    record states (:func:`record_preprocessing`), as the bundle's check of its config against the record and
    :class:`~monai_ecrm.clinical.onnx_runner.OnnxRunner` ensure.

    Args:
        path: the float32 or INT8 ONNX file (:func:`export_network`, ``python -m monai_ecrm.onnx export``/``quantize``).
        threads: ONNX Runtime intra-op threads.
        require_record: refuse a file without its model record.

    Raises:
        OnnxModelError: see :func:`load_onnx_session`.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2, require_record: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.session, self.record = load_onnx_session(path, threads=threads, require_record=require_record)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(torch.as_tensor(images).detach().to("cpu", torch.float32).numpy())
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: array})
        except Exception as error:  # onnxruntime's own exception types (Fail, InvalidArgument, ...)
            raise RuntimeError(f"{self.path}: ONNX Runtime failed on input {list(array.shape)}: {error}") from None
        return torch.from_numpy(logits).to(images.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, precision={self.record.get('precision', 'unknown')!r}"


# ---------------------------------------------------------------------------------------------------------- CLI
def _overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs (config overrides, as MONAI's command takes them), values parsed as JSON when they can."""
    overrides: dict[str, Any] = {}
    pending: str | None = None
    for token in extra:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if value:
                overrides[key] = value
            else:
                pending = key
            continue
        if pending is None:
            raise SystemExit(f"unexpected argument {token!r} (config overrides are --id value)")
        overrides[pending], pending = token, None
    if pending is not None:
        raise SystemExit(f"--{pending} needs a value")
    parsed = {}
    for key, value in overrides.items():
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", "--config-file", nargs="+", required=True, help="bundle config(s)")
    parser.add_argument("--meta_file", "--meta-file", nargs="+", help="the bundle's metadata.json")
    parser.add_argument(
        "--ckpt_file", "--ckpt-file", help="the checkpoint exported (models/model.pt): its record, hash and memory"
    )
    parser.add_argument("--key_in_ckpt", "--key-in-ckpt", default="", help="key of the weights in the checkpoint")
    parser.add_argument("--net_id", "--net-id", default=None, help="network id in the config (network_def)")
    parser.add_argument(
        "--memory-cases", help="JSON list or text file of the images the memory was filled from (if no record says)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``export`` (MONAI's onnx_export, then the record), ``record`` (write the record into an exported file),
    ``show`` (print a file's record), ``quantize`` (INT8 copy calibrated on training images). The record of
    ``export`` and ``record`` is the checkpoint's model record (``models/model.json``) where it has one; a config value
    that contradicts it stops the command with one line (exit status 2)."""
    parser = argparse.ArgumentParser(prog="python -m monai_ecrm.onnx", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="onnx_export of a bundle plus the model record; --id value overrides")
    export.add_argument("--filepath", required=True, help="the ONNX file to write")
    export.add_argument("--args_file", "--args-file", help="configs/onnx_export.json")
    _bundle_arguments(export)
    record = sub.add_parser("record", help="write the model record into an exported ONNX file")
    record.add_argument("--model", required=True, help="the ONNX file")
    _bundle_arguments(record)
    show = sub.add_parser("show", help="print the model record of an ONNX file")
    show.add_argument("model")
    quantize = sub.add_parser("quantize", help="INT8 static quantisation calibrated on training images")
    quantize.add_argument("--model", required=True, help="the float32 ONNX file (with its record)")
    quantize.add_argument("--out", required=True, help="the INT8 ONNX file to write")
    quantize.add_argument("--datalist", required=True, help="datalist JSON or image folder of training images")
    quantize.add_argument("--data-list-key", default="training", help="the JSON's list (training)")
    quantize.add_argument("--num-images", type=int, default=64, help="calibration images (64)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the draw of the calibration images (0)")
    quantize.add_argument("--quantize-attention", action="store_true", help="quantise the memory attention too")
    args, extra = parser.parse_known_args(argv)
    overrides = _overrides(extra)
    if overrides and args.command not in ("export", "record"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    from monai_ecrm.record import RecordConflictError, RecordMismatchError

    try:
        _run(args, overrides)
    except (OnnxModelError, DataError, RecordConflictError, RecordMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    if args.command == "export":
        result = export_bundle(
            filepath=args.filepath,
            ckpt_file=args.ckpt_file,
            config_file=args.config_file,
            meta_file=args.meta_file,
            args_file=args.args_file,
            net_id=args.net_id,
            memory_cases=args.memory_cases,
            key_in_ckpt=args.key_in_ckpt or None,
            **overrides,
        )
        print(json.dumps({"model": args.filepath, "record": result}, indent=1))
    elif args.command == "record":
        result = bundle_record(
            config_file=args.config_file,
            meta_file=args.meta_file,
            ckpt_file=args.ckpt_file,
            net_id=args.net_id or "network_def",
            key_in_ckpt=args.key_in_ckpt,
            memory_cases=args.memory_cases,
            **overrides,
        )
        write_metadata(args.model, result)
        print(json.dumps({"model": args.model, "record": result}, indent=1))
    elif args.command == "show":
        print(json.dumps(read_metadata(args.model), indent=1))
    else:
        result = quantize_int8(
            args.model,
            args.out,
            args.datalist,
            num_images=args.num_images,
            data_list_key=args.data_list_key,
            seed=args.seed,
            quantize_attention=args.quantize_attention,
        )
        print(json.dumps({"model": args.out, "calibration": result["calibration"]}, indent=1))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
