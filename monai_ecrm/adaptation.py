"""Few-shot site adaptation without gradients: write the prototypes of a new site's labelled cases into a trained
model's ECRM memory, leaving every weight and statistic of the model as it is.

ECRM relates every position of a new image to a memory of class prototypes, one slot per remembered image. After
training the memory holds training images; a site with other scopes, light or patients can put its own cases there
instead, with the network's final weights and no training at all (design: "a site's own labelled cases can be written
into it without training"). This module does that on a model file (:func:`adapt_memory`, the command
``monai-ecrm-bundle adapt``) and on a built network (:func:`adapt_network`, for benchmarks that adapt in memory).

The write is the training refresh's (:func:`monai_ecrm.handlers.refresh_memory`): the cases are preprocessed as the
model's record says (``preprocessing.spatial_size`` and ``normalization``, through the bundle's evaluation preset
:func:`monai_ecrm.transforms.eval_transforms`, the transform of the bundle's refresh set), the encoder and ECRM run
with every BatchNorm in eval mode and no gradient, and the prototypes are written in the cases' order. With label
prototypes (``ECRM(prototypes="label")``, the bundle's default) the masks weight the features and are required; a case
whose mask holds no polyp gives no prototype (ECRM writes only images holding every class) and is listed as not
written. With DCRNet's coarse-mask prototypes the masks are not used (cases without masks are accepted).

Modes (:data:`ADAPTATION_MODES`):

- ``"replace"`` (default): the memory is emptied, then the ``k`` cases are written into slots ``0 .. k-1``. With
  ``k`` below the number of slots the remaining slots stay empty: ``filled`` is ``k`` and ECRM attends to the filled
  slots only (``MemoryBank.filled_memory()``, the first ``filled`` slots), so an empty slot is no token of the
  attention at all, not a zero prototype; its contents are zero and its source unknown (-1). The default because the
  result depends on the site's cases alone: the memory then names only them (``MemoryBank.sources``, the record's
  ``memory.sources``), the same cases give the same memory whatever the model's training memory held, and nothing of
  another site's pictures is consulted at the site's inference.
- ``"add"``: the cases are written into the ring buffer after the existing slots, as training would write them: into
  the free slots first, then over the oldest ones when the memory is full (a full memory of ``S`` slots keeps its
  ``S - k`` newest training prototypes). For a site that wants to keep what the memory knew beside its own cases.

Only the memory buffers change (``ecrm.memory.memory``, ``pointer``, ``filled``, ``rejected``, ``sources``,
``source_names_utf8``); every other entry of the state dict is the input file's tensor, bit for bit (checked before
anything is written). The names table of the memory (``MemoryBank.source_names``) becomes the adaptation cases'
names (``"replace"``) or the old table followed by them (``"add"``: the slots kept keep their names).

Output (:func:`adapt_memory`): the adapted weights, a flat state dict at ``out_path``, and its record beside it
(``<stem>.json``, :func:`monai_ecrm.record.write_record`): the input model's record with ``weights`` naming the new
file, ``memory.filled`` and ``memory.sources`` (each slot's case) updated, and an ``"adaptation"`` entry
(a list of them once a model is adapted again)::

    {"site": "hospital_b", "cases": ["images/017.png", ...], "k": 4, "mode": "replace", "seed": 0, "drawn": true,
     "written": 4, "not_written": [], "date": "2025-01-07T10:12:03+01:00",
     "from": {"file": "model.pt", "sha256": "...", "bytes": ...}, "monai_ecrm": "0.3.0"}

Both files are written atomically (a temporary file, then a rename), the weights first and the record second: a reader
that comes between the two finds a record naming other weights and refuses it (the record layer's rule). Every
problem is found before that: bad input raises one :class:`ValueError` (an :class:`AdaptationError`, or a
:class:`~monai_ecrm.data.DataError` naming each bad file) and writes nothing; the input model is never written.

Layer: model files (imports networks, data, transforms, record and the memory refresh function; nothing above).
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from monai.data import Dataset
from torch import nn

from monai_ecrm.data import folder_datalist, validate_datalist
from monai_ecrm.handlers.memory_refresh import refresh_memory, refresh_set_names
from monai_ecrm.networks.utils import unwrap_network
from monai_ecrm.record import (
    _atomic_write,
    _load_state,
    describe_weights,
    load_network,
    read_record,
    record_path,
    write_record,
)
from monai_ecrm.transforms import eval_transforms, infer_transforms

__all__ = [
    "ADAPTATION_MODES",
    "DEFAULT_MODE",
    "AdaptationError",
    "adapt_memory",
    "adapt_network",
    "adaptation_cases",
    "memory_state_keys",
]

PathLike = Union[str, os.PathLike]
#: the memory write modes (see the module docstring)
ADAPTATION_MODES = ("replace", "add")
#: the default mode: the memory then holds the site's cases only
DEFAULT_MODE = "replace"
#: suffixes an adapted weights file may have (a flat state dict, like ``models/model.pt``)
WEIGHTS_SUFFIXES = (".pt", ".pth")
_CASE_INDEX = "case_index"


class AdaptationError(ValueError):
    """A site adaptation that cannot be done as asked (an argument, the model, the cases); nothing was written."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _memory_bank(network: nn.Module, module_name: str = "ecrm") -> tuple[nn.Module, nn.Module, str]:
    """``(ecrm, bank, prefix)``: the ECRM block, its memory bank and the bank's state-dict prefix
    (``"ecrm.memory."``); :class:`AdaptationError` for a network without ECRM memory."""
    plain = unwrap_network(network)
    modules = dict(plain.named_modules())
    ecrm = modules.get(module_name) if getattr(plain, "use_ecrm", True) else None
    bank = getattr(ecrm, "memory", None) if ecrm is not None else None
    if bank is None or not hasattr(bank, "enqueue"):
        raise AdaptationError(
            f"the model has no ECRM memory to adapt ({type(plain).__name__}"
            f"{' with use_ecrm=False' if getattr(plain, 'use_ecrm', True) is False else ''}): site adaptation writes "
            "cases into the ECRM memory."
        )
    prefix = next(name for name, module in modules.items() if module is bank) + "."
    return ecrm, bank, prefix


def memory_state_keys(network: nn.Module, module_name: str = "ecrm") -> list[str]:
    """The state-dict keys of the ECRM memory of ``network`` (``ecrm.memory.memory``, ``.pointer``, ``.filled``,
    ``.rejected``, ``.sources``, ``.source_names_utf8``): the only entries an adaptation changes."""
    _, bank, prefix = _memory_bank(network, module_name)
    return [prefix + key for key in bank.state_dict()]


# ---------------------------------------------------------------------------------------------------- the cases
def _is_file_item(item: Any, key: str = "image") -> bool:
    return isinstance(item, Mapping) and isinstance(item.get(key), (str, os.PathLike))


def adaptation_cases(
    cases: PathLike | Sequence[Mapping[str, Any]],
    k: int | None = None,
    seed: int = 0,
    slots: int | None = None,
    require_labels: bool = True,
) -> tuple[list[dict[str, Any]], list[str], bool]:
    """The cases to write: ``(items, names, drawn)``, checked, in folder (list) order.

    Args:
        cases: a folder with ``images/`` and ``masks/`` (:func:`monai_ecrm.data.folder_datalist`, masks matched by
            stem) or a list of ``{"image": path, "label": path}`` items.
        k: how many to use: a seeded draw of ``k`` of them (``random.Random(seed)``, then put back in folder order),
            or all of them (``None``).
        seed: seed of the draw.
        slots: the memory's slots: more cases than slots is an error (they would overwrite each other).
        require_labels: every case needs its mask (label prototypes).

    Names: each image's path relative to the folder common to all the cases given (``images/017.png`` is
    ``017.png``; a frame of a multi-frame file is ``video.dcm#12``), as the training refresh names its set.

    Every file listed is checked from its header (readable, 2D, channels, image and mask of the same size), the
    chosen ones are decoded in full: one :class:`~monai_ecrm.data.DataError` names every bad file.

    Raises:
        AdaptationError: ``k`` below 1, above the number of cases or above ``slots``; no case; a case without mask.
        DataError: unreadable files, an image and mask of different sizes, unmatched files (naming each).
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise AdaptationError(f"k must be a whole number >= 1 (or None for all the cases), got {k!r}.")
    if isinstance(cases, (str, os.PathLike)):
        source = Path(cases).expanduser()
        items = folder_datalist(source, require_masks=require_labels, verify="header")
        where = str(source)
    else:
        where = "the cases given"
        items = [dict(item) for item in cases]
        bad = [index for index, item in enumerate(items) if not _is_file_item(item)]
        if bad:
            raise AdaptationError(
                f"case {bad[0]} of the list is not an {{'image': path, 'label': path}} item: {items[bad[0]]!r}."
            )
        if not items:
            raise AdaptationError("no cases given: an empty list.")
        items = validate_datalist(items, verify="header", source=where)
    unlabelled = [item["image"] for item in items if "label" not in item]
    if require_labels and unlabelled:
        raise AdaptationError(
            f"{unlabelled[0]}: no mask ({len(unlabelled)} case(s) of {where} without one); the model writes its "
            "memory from the masks (ECRM prototypes='label'), every case needs its mask."
        )
    names = refresh_set_names(items) or [f"case_{index}" for index in range(len(items))]
    count = len(items)
    if k is not None and k > count:
        raise AdaptationError(f"k={k} is more than the {count} case(s) in {where}.")
    wanted = count if k is None else k
    if slots is not None and wanted > slots:
        hint = "pass a smaller k" if k is not None else f"pass k <= {slots} to draw that many of them"
        raise AdaptationError(
            f"{'k=' + str(k) if k is not None else str(count) + ' cases in ' + where} for a memory of {slots} slots: "
            f"the cases would overwrite each other in the memory; {hint}."
        )
    drawn = k is not None and k < count
    chosen = sorted(random.Random(seed).sample(range(count), k)) if drawn else list(range(count))
    items = [items[index] for index in chosen]
    names = [names[index] for index in chosen]
    # the chosen pictures decoded in full (a truncated or undecodable file gets its name now, not mid-way)
    validate_datalist(items, verify="full", expand_frames=False, source=where)
    return items, names, drawn


# ------------------------------------------------------------------------------------------------ the network
def _preprocessing(record: Mapping[str, Any] | None, with_labels: bool) -> Any:
    if record is None:
        raise AdaptationError(
            "adapt_network: file cases need the model's record (record['preprocessing']: spatial_size, "
            "normalization), which says how the model's inputs are prepared."
        )
    preprocessing = record.get("preprocessing") or {}
    missing = [key for key in ("spatial_size", "normalization") if preprocessing.get(key) is None]
    if missing:
        raise AdaptationError(f"adapt_network: the record states no preprocessing {missing} (use load_network's).")
    size, normalization = preprocessing["spatial_size"], preprocessing["normalization"]
    if with_labels:  # the bundle's refresh set: validate#preprocessing
        return eval_transforms(spatial_size=size, normalization=normalization)
    return infer_transforms(spatial_size=size, normalization=normalization)


def adapt_network(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    record: Mapping[str, Any] | None,
    mode: str = DEFAULT_MODE,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    module_name: str = "ecrm",
) -> dict[str, Any]:
    """Write the prototypes of ``items`` into the ECRM memory of a built network, in place; nothing else of it
    changes (weights, BatchNorm statistics, training/eval flags, the global random state).

    Args:
        network: an ``ECRMUNet`` (wrappers unwrapped), e.g. from :func:`monai_ecrm.record.load_network`.
        items: the cases, in write order: ``{"image": path, "label": path}`` file items, preprocessed with the
            record's ``spatial_size`` and ``normalization`` (the bundle's evaluation preset); or items holding
            tensors already prepared that way (``image`` ``[C, H, W]``, ``label`` ``[1, H, W]``), used as they are.
            The label is read only with label prototypes (then required).
        record: the model's merged record (``load_network``'s second value); may be ``None`` for tensor items.
        mode: ``"replace"`` (default) or ``"add"`` (see the module docstring). At most as many items as the memory
            has slots.
        names: the cases' names (the memory's ``source_names``); default: file items' paths relative to their
            common folder, else ``case_0``, ``case_1``, ...
        device: where to run; ``None``: the network's device.
        module_name: dotted path of the ECRM module.

    Returns:
        ``{"mode", "cases", "written", "not_written", "filled", "slots"}``: the names given, how many prototypes were
        written, the names of the cases that gave none (a mask without polyp under label prototypes, a non-finite
        prototype), and the memory's fill afterwards.

    Raises:
        AdaptationError: an unknown mode, no memory, no items or more items than slots, names of another count, no
            case written. On any error (a file that fails to load too) the memory is left as it was.
    """
    if mode not in ADAPTATION_MODES:
        raise AdaptationError(f"mode must be one of {ADAPTATION_MODES}, got {mode!r}.")
    ecrm, bank, _ = _memory_bank(network, module_name)
    items = [dict(item) for item in items]
    slots = int(bank.num_slots)
    if not items:
        raise AdaptationError("adapt_network: no cases to write.")
    if len(items) > slots:
        raise AdaptationError(
            f"adapt_network: {len(items)} cases for a memory of {slots} slots: they would overwrite each other."
        )
    labels = bool(getattr(ecrm, "label_prototypes", False))
    if labels:
        unlabelled = [index for index, item in enumerate(items) if "label" not in item]
        if unlabelled:
            raise AdaptationError(
                f"adapt_network: case {unlabelled[0]} ({items[unlabelled[0]].get('image')!s}) has no 'label'; the "
                "model writes its memory from the masks (ECRM prototypes='label')."
            )
    files = [_is_file_item(item) for item in items]
    if any(files) and not all(files):
        raise AdaptationError("adapt_network: give file items or tensor items, not both.")
    if names is None:
        names = (refresh_set_names(items) if all(files) else None) or [f"case_{i}" for i in range(len(items))]
    names = [str(name) for name in names]
    if len(names) != len(items):
        raise AdaptationError(f"adapt_network: {len(names)} names for {len(items)} cases.")
    if not labels:  # coarse-mask prototypes: the masks are not read (nor loaded)
        items = [{key: value for key, value in item.items() if key != "label"} for item in items]
    transform = _preprocessing(record, labels) if all(files) else None
    before = {key: value.detach().clone() for key, value in bank.state_dict().items()}
    table = [] if mode == "replace" else list(bank.source_names)
    base = len(table)
    for index, item in enumerate(items):
        item[_CASE_INDEX] = base + index  # the slot's source: an index into the names table
    dataset = Dataset(data=items, transform=transform)
    try:
        if mode == "add":
            if not table:
                # sources recorded without their names (an older file) would be read as the new cases' names
                with torch.no_grad():
                    bank.sources.clamp_(max=-1)
            bank.set_source_names(table + names)
        refresh_memory(
            network,
            dataset,
            device=device,
            module_name=module_name,
            reset=mode == "replace",
            source_names=table + names if mode == "replace" else None,
        )
    except BaseException:
        bank.load_state_dict(before)  # the memory as it was: nothing half written
        raise
    # the cases in the memory now (k <= slots: none overwrote another); refresh_memory's count includes the images
    # that gave no prototype (a label prototype needs every class present)
    present = set(bank.sources.tolist())
    not_written = [name for index, name in enumerate(names) if base + index not in present]
    written = len(names) - len(not_written)
    if written == 0:
        bank.load_state_dict(before)
        raise AdaptationError(
            f"none of the {len(names)} case(s) gave a prototype ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): "
            + (
                "with label prototypes a case is written only when its mask holds a polyp."
                if labels
                else "their prototypes were not finite."
            )
            + " The memory is as it was."
        )
    return {
        "mode": mode,
        "cases": names,
        "written": int(written),
        "not_written": not_written,
        "filled": int(bank.filled),
        "slots": slots,
    }


# ------------------------------------------------------------------------------------------------ model files
def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def _check_output(model_path: Path, out_path: Path) -> None:
    if _same_file(out_path, model_path):
        raise AdaptationError(
            f"--out {out_path} is the model itself: the adapted weights go to a new file; the model is left as it is."
        )
    if out_path.suffix not in WEIGHTS_SUFFIXES:
        raise AdaptationError(
            f"--out {out_path}: the adapted weights are a state dict file ending in {' or '.join(WEIGHTS_SUFFIXES)} "
            "(its record is written beside it, <stem>.json)."
        )
    if out_path.is_dir():
        raise AdaptationError(f"--out {out_path} is a folder; give the weights file to write (e.g. adapted.pt).")
    records = {record_path(model_path).resolve(), (model_path.parent / "model.json").resolve()}
    if record_path(out_path).resolve() in records:
        raise AdaptationError(
            f"--out {out_path}: its record would be {record_path(out_path)}, the record of the model {model_path}; "
            "choose another file name or folder."
        )


def adapt_memory(
    model_path: PathLike,
    cases: PathLike | Sequence[Mapping[str, Any]],
    out_path: PathLike,
    mode: str = DEFAULT_MODE,
    site: str | None = None,
    k: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """Write ``k`` labelled cases of a site into the memory of the model ``model_path``; the adapted model goes to
    ``out_path`` (a flat state dict) with its record beside it (``<stem>.json``). Returns ``out_path``.

    The model is built from its file and record (:func:`monai_ecrm.record.load_network`, which checks that the record
    names these weights), the cases are prepared with the record's input size and normalisation and written as the
    training refresh writes (:func:`adapt_network`). Everything but the memory buffers is the input file's, bit for
    bit. The adapted model runs like any model file: ``monai_ecrm.load_model(out_path)``, ``monai-ecrm-infer
    --checkpoint out_path``.

    Args:
        model_path: the trained model (``models/model.pt``; a training checkpoint or TorchScript file is read too, the
            output is a flat state dict). Never written.
        cases: a folder with ``images/`` and ``masks/`` or a list of ``{"image", "label"}`` items
            (:func:`adaptation_cases`).
        out_path: the adapted weights file (``.pt``/``.pth``), not the model; its record is ``<stem>.json``.
        mode: ``"replace"`` (default: the memory holds the site's cases only; slots beyond ``k`` stay empty and are
            not attended) or ``"add"`` (after the existing slots, over the oldest when full); see the module docstring.
        site: the site's name in the record; default: the cases folder's name (``None`` for a list).
        k: use ``k`` of the cases, a draw seeded by ``seed``; ``None``: all of them. At most the memory's slots.
        seed: seed of the draw.
        device: where to run the encoder (``"cpu"``: a few cases take seconds).

    Raises:
        AdaptationError: ``out_path`` is the model (or its record would be the model's), a bad ``mode`` or ``k``,
            a model without ECRM memory, no case written.
        DataError: an unreadable case, an image and mask of different sizes, unmatched files (naming each).
        ValueError: the model file is unreadable or its record is another model's (naming the file).
    """
    model_path, out_path = Path(model_path).expanduser(), Path(out_path).expanduser()
    if mode not in ADAPTATION_MODES:
        raise AdaptationError(f"--mode must be one of {ADAPTATION_MODES}, got {mode!r}.")
    _check_output(model_path, out_path)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise AdaptationError(f"--k must be a whole number >= 1, got {k!r}.")
    network, merged = load_network(model_path, device=device)
    ecrm, bank, _ = _memory_bank(network)
    labels = bool(getattr(ecrm, "label_prototypes", False))
    items, names, drawn = adaptation_cases(cases, k=k, seed=seed, slots=int(bank.num_slots), require_labels=labels)
    if site is None and isinstance(cases, (str, os.PathLike)):
        site = Path(cases).expanduser().resolve().name
    state = _load_state(model_path)
    memory_keys = set(memory_state_keys(network))
    summary = adapt_network(network, items, merged, mode=mode, names=names, device=device)

    adapted = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    changed = [
        key
        for key in state
        if key not in memory_keys
        and (key not in adapted or adapted[key].shape != state[key].shape or not torch.equal(adapted[key], state[key]))
    ]
    if changed:  # the refresh keeps every weight and statistic: this would be a bug, never a silent change
        raise RuntimeError(f"adapt_memory: entries other than the memory changed: {changed[:5]}; nothing written.")
    weights = {key: (adapted[key] if key in memory_keys else state[key]) for key in state}
    weights.update({key: adapted[key] for key in memory_keys})

    written = read_record(model_path)
    base = copy.deepcopy(written) if written is not None else copy.deepcopy(merged)
    assumed = [] if written is not None else list(merged.get("assumed") or [])
    base.pop("assumed", None)
    base["memory"] = {
        **(base.get("memory") or {}),
        "slots": summary["slots"],
        "filled": summary["filled"],
        "sources": bank.slot_names(),
    }
    from monai_ecrm.version import __version__

    entry: dict[str, Any] = {
        "site": site,
        "cases": names,
        "k": len(names),
        "mode": mode,
        "seed": seed,
        "drawn": drawn,
        "written": summary["written"],
        "not_written": summary["not_written"],
        "date": _now(),
        "from": describe_weights(model_path),
        "monai_ecrm": __version__,
    }
    if assumed:
        entry["assumed"] = assumed  # the input model stated no record: what the preprocessing was taken to be
    previous = base.get("adaptation")
    if previous is None:
        base["adaptation"] = entry
    else:
        base["adaptation"] = [*(previous if isinstance(previous, list) else [previous]), entry]

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    _atomic_write(out_path, buffer.getvalue())  # the weights first, then the record that names them
    base["weights"] = describe_weights(out_path)
    write_record(out_path, base)
    return out_path
