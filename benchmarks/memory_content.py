"""Does the network read WHAT is in its ECRM memory, or only THAT there is one? (issue "A memory worth having", item 0)

For each trained model (default: the shared 352 px ECRM models ``../shared/models/ecrm-seed{0,1}``, their fp16 weights
converted back to float32 in a temporary copy beside their ``model.json`` and loaded with
``monai_ecrm.record.load_network``), the mean Dice of three evaluation sets under several memories:

- ``as_shipped``: the memory in the model file (the first 20 training items of the bundle's list, all Kvasir-SEG);
- ``emptied``: the memory reset (``MemoryBank.reset``), as ``polyp_accuracy.memory_use`` does;
- ``shipped_cases_rewritten``: a control, the same 20 cases as ``as_shipped`` written again with
  ``refresh_memory`` from the original files here (the shipped memory was written from the study's compacted JPEG
  copies, at the end of training): how far a rewrite of the SAME content moves the scores;
- ``kvasir_random``: 20 random Kvasir-SEG training cases (the shipped 20 excluded), written with ``refresh_memory``;
- ``clinicdb_random``: 20 random CVC-ClinicDB training cases;
- ``own_test_set``: each frame scored with a memory of its own dataset's TRAINING cases: the Kvasir test set with
  the ``kvasir_random`` memories, the ClinicDB test set with the ``clinicdb_random`` ones, and each validation frame
  with the memory of the dataset it comes from (the same draws: no extra forward pass);
- ``shuffled_labels``: the 20 cases of ``kvasir_random``, written with their masks shuffled among them (a
  derangement: every case gets another case's mask), i.e. prototypes from wrong labels.

The random memories are drawn ``--draws`` times (seeded by ``--seed`` and the draw number; the same cases for every
model); tables give the mean and sample SD over draws.

Data: the PraNet split of ``--data`` (``../shared/data``) through ``monai_ecrm.data.pranet_datalist``: the Kvasir
test set (100), the CVC-ClinicDB test set (62) and the held-out validation split (145); memory cases come from its
training part (1305). Every frame is preprocessed from its ORIGINAL file as at evaluation
(``full_size_eval_transforms`` at the model's input size, 352 px, with its normalisation), the sigmoid map resized
back to the original size (``full_size_eval_postprocessing``) and scored there against the original mask: Dice of
the map min-max normalised then thresholded at 0.5 (``monai_ecrm.metrics.functional.compute_overlap(...,
"dice", normalize="minmax")``, what ``PolypOverlap(metric_name="dice", normalize="minmax")`` computes in
``evaluate.json`` with the study's ``normalize=minmax``). float32 on the CPU (the study scored in bf16 on the
compacted copies, so ``as_shipped`` differs slightly from the models' README table).

Also per condition and set: the mean absolute change of the foreground probability at the input size against
``as_shipped`` (output sensitivity below the Dice threshold), and how many frames' Dice moved by more than 0.01.

The content-sensitivity figure of the issue: "replacing the memory with another dataset's cases changes mean Dice on
that dataset's frames by X": the ClinicDB test set scored with ClinicDB memories (``own_test_set``) against the
shipped Kvasir memory, and the draw-matched own-minus-other difference (ClinicDB memory minus Kvasir memory on
ClinicDB frames, and the reverse on Kvasir frames). Target 0.02.

Resumable: each (model, memory, draw) is saved in ``--work-dir`` as soon as it is scored (per-image Dice), and
skipped on a rerun. Prints JSON; ``--out X.json`` also writes it there and a markdown table to ``X.md``.

    OMP_NUM_THREADS=1 python benchmarks/memory_content.py \\
        --out benchmarks/results/memory_content_352px_shared_models.json
    python benchmarks/memory_content.py --max-images 4 --draws 1     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_MODELS = [REPO.parent / "shared" / "models" / "ecrm-seed0", REPO.parent / "shared" / "models" / "ecrm-seed1"]
#: the evaluation sets, in table order
SETS = ("kvasir", "clinicdb", "validation")
#: the memories that need forward passes; ``own_test_set`` is assembled from the random ones
SCORED = ("as_shipped", "emptied", "shipped_cases_rewritten", "kvasir_random", "clinicdb_random", "shuffled_labels")
CONDITIONS = SCORED[:5] + ("own_test_set",) + SCORED[5:]
RANDOM = ("kvasir_random", "clinicdb_random", "own_test_set", "shuffled_labels")
DATASET_OF_FOLDER = {"kvasir_seg": "kvasir", "cvc_clinicdb": "clinicdb"}
TARGET = 0.02
BIG_CHANGE = 0.01  # a frame "moved" when its Dice changed by more than this


# ------------------------------------------------------------------------------------------------------------ models
def load_model_folder(folder: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """The network of a shared model folder (``model_fp16.pt`` converted back to float32, or ``model.pt``) loaded with
    its ``model.json`` from a temporary float32 copy; its record; the SHA-256 of the weights file read."""
    from monai_ecrm.record import file_sha256, load_network

    folder = Path(folder)
    source = folder / "model_fp16.pt" if (folder / "model_fp16.pt").is_file() else folder / "model.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{folder}: neither model_fp16.pt nor model.pt")
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory(prefix="memory_content_") as tmp:
        torch.save(state, Path(tmp) / "model.pt")
        if (folder / "model.json").is_file():
            shutil.copy(folder / "model.json", Path(tmp) / "model.json")
        net, record = load_network(Path(tmp) / "model.pt")
    return net.eval(), record, file_sha256(source)


# -------------------------------------------------------------------------------------------------------------- data
def case_id(item: Mapping[str, Any]) -> str:
    """``kvasir_seg/<stem>`` or ``cvc_clinicdb/<stem>``."""
    path = Path(item["image"])
    return f"{path.parent.parent.name}/{path.stem}"


def dataset_of(item: Mapping[str, Any]) -> str:
    return DATASET_OF_FOLDER.get(Path(item["image"]).parent.parent.name, "other")


def evaluation_sets(datalist: Mapping[str, Any], max_images: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{"kvasir", "clinicdb", "validation"}`` items of a ``pranet_datalist``."""
    sets = {name: [item for item in datalist["test"] if item["dataset"] == name] for name in SETS[:2]}
    sets["validation"] = list(datalist["validation"])
    if max_images:
        sets = {name: items[:max_images] for name, items in sets.items()}
    return sets


def derangement(count: int, rng: random.Random) -> list[int]:
    """A permutation of ``range(count)`` with no fixed point (``count >= 2``)."""
    while True:
        order = list(range(count))
        rng.shuffle(order)
        if all(index != value for index, value in enumerate(order)):
            return order


def draw_memories(
    training: Sequence[Mapping[str, Any]], shipped: Sequence[str], bank: int, draws: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """The case lists of every written memory: ``{condition: [{"cases": [item], "masks_of": [item]} per draw]}``.

    ``shipped_cases_rewritten``: the training items named by the shipped memory (one "draw"); ``kvasir_random`` and
    ``clinicdb_random``: ``bank`` cases of each dataset's training part per draw (the shipped cases excluded);
    ``shuffled_labels``: the ``kvasir_random`` cases of the same draw, each with another one's mask."""
    by_id = {case_id(item): item for item in training}
    shipped_ids = [name for name in shipped if name in by_id]
    pools = {
        name: [item for item in training if dataset_of(item) == name and case_id(item) not in set(shipped_ids)]
        for name in ("kvasir", "clinicdb")
    }
    out: dict[str, list[dict[str, Any]]] = {
        "shipped_cases_rewritten": [
            {"cases": [by_id[n] for n in shipped_ids], "masks_of": [by_id[n] for n in shipped_ids]}
        ]
    }
    for condition in ("kvasir_random", "clinicdb_random", "shuffled_labels"):
        out[condition] = []
    for draw in range(draws):
        rng = random.Random(seed * 1000 + draw)
        chosen = {name: rng.sample(pool, min(bank, len(pool))) for name, pool in pools.items()}
        order = derangement(len(chosen["kvasir"]), rng)
        out["kvasir_random"].append({"cases": chosen["kvasir"], "masks_of": chosen["kvasir"]})
        out["clinicdb_random"].append({"cases": chosen["clinicdb"], "masks_of": chosen["clinicdb"]})
        shuffled = [chosen["kvasir"][index] for index in order]
        out["shuffled_labels"].append({"cases": chosen["kvasir"], "masks_of": shuffled})
    return out


def _plain(value: Any) -> torch.Tensor:
    value = torch.as_tensor(value)
    return value.as_tensor() if hasattr(value, "as_tensor") else value


# ----------------------------------------------------------------------------------------------------------- scoring
class Scorer:
    """Scores a network on cached preprocessed frames; writes memories from cached memory cases."""

    def __init__(self, size: int, normalization: str) -> None:
        from monai_ecrm.transforms import full_size_eval_postprocessing, full_size_eval_transforms

        self.preprocessing = full_size_eval_transforms(size, normalization=normalization)
        self.postprocessing = full_size_eval_postprocessing(self.preprocessing)
        self._cache: dict[str, dict[str, Any]] = {}

    def sample(self, item: Mapping[str, Any]) -> dict[str, Any]:
        key = str(item["image"])
        if key not in self._cache:
            self._cache[key] = self.preprocessing({"image": item["image"], "label": item["label"]})
        return self._cache[key]

    def write(self, net: nn.Module, spec: Mapping[str, Any]) -> int:
        """Fill ``net``'s memory from ``spec`` (``cases`` with the masks of ``masks_of``, at the input size)."""
        from monai_ecrm.handlers import refresh_memory

        items, names = [], []
        for case, mask_of in zip(spec["cases"], spec["masks_of"]):
            label = self.sample(mask_of)["label"]
            items.append({"image": _plain(self.sample(case)["image"]), "label": _plain(label)})
            same = case_id(case) == case_id(mask_of)
            names.append(case_id(case) if same else f"{case_id(case)} (mask of {case_id(mask_of)})")
        return refresh_memory(net, items, source_names=names)

    def score(
        self, net: nn.Module, items: Sequence[Mapping[str, Any]], reference: Sequence[torch.Tensor] | None = None
    ) -> tuple[list[float], list[float], list[torch.Tensor]]:
        """Per frame: the min-max Dice at the original size, the mean |probability change| against ``reference``
        (the input-size probabilities of ``as_shipped``; NaN without one), and the input-size probabilities (fp16)."""
        from monai_ecrm.metrics.functional import compute_overlap

        net.eval()
        dices, changes, probs = [], [], []
        with torch.no_grad():
            for index, item in enumerate(items):
                sample = self.sample(item)
                logits = net(_plain(sample["image"])[None])[0].float()
                prob = torch.sigmoid(logits)
                probs.append(prob.half())
                changes.append(float((prob - reference[index].float()).abs().mean()) if reference else float("nan"))
                out = self.postprocessing({**sample, "pred": logits})
                pred, gt = _plain(out["pred"]).float(), (_plain(out["gt"]) > 0.5).float()
                dices.append(float(compute_overlap(pred[None], gt[None], "dice", 0.5, "binary", "minmax")[0, 0]))
        return dices, changes, probs


def run_model(
    net: nn.Module,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    memories: Mapping[str, Sequence[Mapping[str, Any]]],
    scorer: Scorer,
    store: Callable[[str], dict[str, Any] | None] = lambda key: None,
    save: Callable[[str, dict[str, Any]], None] = lambda key, value: None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, list[dict[str, Any]]]:
    """Score ``net`` on every set under every scored memory: ``{condition: [per draw: {"dice": {set: [per frame]},
    "prob_change": {...}, "written": n, "seconds": s}]}``. ``store``/``save`` read and keep finished units (resume).
    The network itself is not changed (each memory is written into a copy)."""
    everything = [item for items in sets.values() for item in items]
    reference: list[torch.Tensor] | None = None
    results: dict[str, list[dict[str, Any]]] = {}
    units: list[tuple[str, int, Any]] = [("as_shipped", 0, None), ("emptied", 0, "empty")]
    for condition in SCORED[2:]:
        units += [(condition, draw, spec) for draw, spec in enumerate(memories.get(condition, []))]
    for condition, draw, spec in units:
        key = f"{condition}-{draw}"
        done = store(key)
        if done is not None and done.get("probs") is None and condition == "as_shipped":
            done = None  # the reference probabilities are needed: score again
        if done is None:
            start = time.perf_counter()
            model = copy.deepcopy(net).eval()
            written = None
            if spec == "empty":
                model.ecrm.memory.reset()
            elif spec is not None:
                written = scorer.write(model, spec)
            dices, changes, probs = scorer.score(model, everything, reference)
            done = {"dice": {}, "prob_change": {}, "written": written, "seconds": time.perf_counter() - start}
            done["slots"] = model.ecrm.memory.slot_names() if spec != "empty" else []
            offset = 0
            for name, items in sets.items():
                done["dice"][name] = dices[offset : offset + len(items)]
                done["prob_change"][name] = changes[offset : offset + len(items)]
                offset += len(items)
            if condition == "as_shipped":
                done["probs"] = probs
            save(key, done)
            log(
                f"{key}: {done['seconds']:.0f} s, "
                + ", ".join(f"{n} {np.mean(d):.4f}" for n, d in done["dice"].items())
            )
        if condition == "as_shipped":
            reference = done["probs"]
        results.setdefault(condition, []).append({k: v for k, v in done.items() if k != "probs"})
    return results


# ---------------------------------------------------------------------------------------------------- summarising
def _mean_sd(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "sd": sd, "draws": len(values)}


def per_frame(
    results: Mapping[str, Sequence[Mapping[str, Any]]], sets: Mapping[str, Sequence[Mapping[str, Any]]]
) -> dict[str, list[dict[str, list[float]]]]:
    """``{condition: [per draw: {set: per-frame Dice}]}``, ``own_test_set`` assembled: the Kvasir test set from the
    Kvasir memories, ClinicDB's from ClinicDB's, each validation frame from its own dataset's memory of that draw."""
    table = {condition: [dict(draw["dice"]) for draw in draws] for condition, draws in results.items()}
    own = []
    for kvasir, clinicdb in zip(table.get("kvasir_random", []), table.get("clinicdb_random", [])):
        draw = {}
        for name, items in sets.items():
            draw[name] = [
                (clinicdb if dataset_of(item) == "clinicdb" else kvasir)[name][index]
                for index, item in enumerate(items)
            ]
        own.append(draw)
    if own:
        table["own_test_set"] = own
    return table


def summarise(
    results: Mapping[str, Sequence[Mapping[str, Any]]], sets: Mapping[str, Sequence[Mapping[str, Any]]]
) -> dict[str, Any]:
    """Mean Dice per condition and set (mean and SD over draws), deltas against ``as_shipped`` and ``emptied``
    (computed per draw, then mean and SD), frames moved by more than 0.01, probability change, and the
    content-sensitivity figures."""
    frames = per_frame(results, sets)
    conditions = [c for c in CONDITIONS if c in frames]
    mean_dice = {c: {n: _mean_sd([np.mean(d[n]) for d in frames[c]]) for n in sets} for c in conditions}
    deltas: dict[str, Any] = {}
    for base in ("as_shipped", "emptied"):
        reference = frames[base][0]
        deltas[base] = {
            c: {n: _mean_sd([np.mean(d[n]) - np.mean(reference[n]) for d in frames[c]]) for n in sets}
            for c in conditions
            if c != base
        }
    shipped = frames["as_shipped"][0]
    moved = {
        c: {
            n: _mean_sd([int(np.sum(np.abs(np.array(d[n]) - np.array(shipped[n])) > BIG_CHANGE)) for d in frames[c]])
            for n in sets
        }
        for c in conditions
        if c != "as_shipped"
    }
    prob_change = {
        c: {n: _mean_sd([np.mean(d["prob_change"][n]) for d in results[c]]) for n in sets}
        for c in SCORED
        if c in results and c != "as_shipped"
    }
    # by origin inside the validation split (Kvasir and ClinicDB frames apart)
    origin = {
        name: [index for index, item in enumerate(sets.get("validation", [])) if dataset_of(item) == name]
        for name in ("kvasir", "clinicdb")
    }
    validation_by_origin = {
        c: {
            name: _mean_sd([np.mean([d["validation"][i] for i in idx]) for d in frames[c]])
            for name, idx in origin.items()
            if idx
        }
        for c in conditions
        if "validation" in sets
    }
    sensitivity = content_sensitivity(frames, sets, origin)
    return {
        "mean_dice": mean_dice,
        "delta_vs_as_shipped": deltas["as_shipped"],
        "delta_vs_emptied": deltas["emptied"],
        "frames_moved_vs_as_shipped": moved,
        "mean_abs_prob_change_vs_as_shipped": prob_change,
        "validation_by_origin": validation_by_origin,
        "validation_origin_counts": {name: len(idx) for name, idx in origin.items()},
        "content_sensitivity": sensitivity,
    }


def content_sensitivity(
    frames: Mapping[str, Sequence[Mapping[str, list[float]]]],
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    origin: Mapping[str, list[int]],
) -> dict[str, Any]:
    """The issue's figure and its draw-matched forms (per draw, then mean and SD over draws):

    - ``clinicdb_frames_own_minus_shipped``: ClinicDB test Dice with ClinicDB memories minus with the shipped (Kvasir)
      memory: "replacing the memory with another dataset's cases changes mean Dice on that dataset's frames by X";
    - ``own_minus_other``: per set, Dice with a memory of the frames' own dataset minus with the other dataset's
      memory of the same draw (Kvasir test: Kvasir - ClinicDB memory; ClinicDB test: ClinicDB - Kvasir; validation:
      each frame's own minus other);
    - ``max_abs_change_vs_shipped``: per set, the largest |mean Dice change| of any content memory (not ``emptied``,
      draws averaged) against ``as_shipped``.
    """
    out: dict[str, Any] = {"target": TARGET}
    if "own_test_set" not in frames:
        return out
    shipped = frames["as_shipped"][0]
    if "clinicdb" in sets:
        out["clinicdb_frames_own_minus_shipped"] = _mean_sd(
            [np.mean(d["clinicdb"]) - np.mean(shipped["clinicdb"]) for d in frames["own_test_set"]]
        )
    own_minus_other = {}
    for name, items in sets.items():
        values = []
        for kvasir, clinicdb in zip(frames["kvasir_random"], frames["clinicdb_random"]):
            diffs = [
                (clinicdb[name][i] - kvasir[name][i]) * (1 if dataset_of(item) == "clinicdb" else -1)
                for i, item in enumerate(items)
            ]
            values.append(float(np.mean(diffs)))
        own_minus_other[name] = _mean_sd(values)
    out["own_minus_other"] = own_minus_other
    content = [
        c
        for c in ("shipped_cases_rewritten", "kvasir_random", "clinicdb_random", "own_test_set", "shuffled_labels")
        if c in frames
    ]
    out["max_abs_change_vs_shipped"] = {
        name: max(abs(float(np.mean([np.mean(d[name]) for d in frames[c]]) - np.mean(shipped[name]))) for c in content)
        for name in sets
    }
    headline = out.get("clinicdb_frames_own_minus_shipped", {}).get("mean")
    out["headline"] = headline
    out["meets_target"] = headline is not None and abs(headline) >= TARGET
    return out


def _cell(entry: Mapping[str, Any] | None, digits: int = 4, sign: bool = False) -> str:
    if not entry:
        return "n/a"
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    text = fmt.format(entry["mean"])
    if entry.get("sd") is not None:
        text += f" ± {entry['sd']:.{digits}f}"
    return text


def markdown(report: Mapping[str, Any]) -> str:
    lines = [
        '# Memory content sensitivity (issue "A memory worth having", item 0)',
        "",
        f"Mean Dice (min-max map, threshold 0.5) scored at each frame's original size; network input "
        f"{report['spatial_size']} px; float32, CPU, {report['threads']} thread(s); random memories: "
        f"{report['draws']} seeded draw(s) of 20 cases (mean ± SD over draws). Command: `{report['command']}`.",
        "",
        "own_test_set = each set scored with a memory of its own dataset's training cases (validation: each frame with "
        "its own dataset's); shipped_cases_rewritten = the shipped 20 cases written again from the original files "
        "(control for rewrite noise).",
        "",
    ]
    sets = report["sets"]
    for title, key, sign in (
        ("Mean Dice", "mean_dice", False),
        ("Δ mean Dice vs as_shipped", "delta_vs_as_shipped", True),
        ("Δ mean Dice vs emptied", "delta_vs_emptied", True),
    ):
        lines += [f"## {title}", "", "| model | memory | " + " | ".join(f"{n} ({sets[n]})" for n in sets) + " |"]
        lines.append("|---|---|" + "---:|" * len(sets))
        for model in report["models"]:
            table = model["summary"][key]
            for condition in CONDITIONS:
                if condition in table:
                    cells = [_cell(table[condition].get(n), 4, sign) for n in sets]
                    lines.append(f"| {model['name']} | {condition} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Content sensitivity",
        "",
        f"Target: |X| >= {TARGET}. X = ClinicDB test Dice with ClinicDB memories (own_test_set) minus with the shipped "
        "Kvasir memory. own − other: Dice with a memory of the frames' own dataset minus with the other dataset's "
        "(same draw). max |Δ|: largest change of mean Dice of any content memory (not emptied) vs as_shipped.",
        "",
        "| model | X (ClinicDB, own − shipped) | own − other: "
        + " | ".join(sets)
        + " | max abs Δ: "
        + " | ".join(sets)
        + " | emptied Δ: "
        + " | ".join(sets)
        + " |",
        "|---|---:|" + "---:|" * (3 * len(sets)),
    ]
    for model in report["models"]:
        s = model["summary"]["content_sensitivity"]
        cells = [_cell(s.get("clinicdb_frames_own_minus_shipped"), 4, True)]
        cells += [_cell(s["own_minus_other"].get(n), 4, True) for n in sets]
        cells += [f"{s['max_abs_change_vs_shipped'][n]:.4f}" for n in sets]
        cells += [_cell(model["summary"]["delta_vs_as_shipped"]["emptied"][n], 4, True) for n in sets]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Frames whose Dice moved by more than 0.01 vs as_shipped (count, mean over draws); mean |Δp| (input size)",
        "",
        "| model | memory | "
        + " | ".join(f"{n} moved" for n in sets)
        + " | "
        + " | ".join(f"{n} mean abs Δp" for n in sets)
        + " |",
        "|---|---|" + "---:|" * (2 * len(sets)),
    ]
    for model in report["models"]:
        moved, change = (
            model["summary"]["frames_moved_vs_as_shipped"],
            model["summary"]["mean_abs_prob_change_vs_as_shipped"],
        )
        for condition in CONDITIONS:
            if condition in moved:
                cells = [f"{moved[condition][n]['mean']:.1f}" for n in sets]
                cells += [f"{change[condition][n]['mean']:.4f}" if condition in change else "–" for n in sets]
                lines.append(f"| {model['name']} | {condition} | " + " | ".join(cells) + " |")
    if report["models"] and report["models"][0]["summary"]["validation_by_origin"]:
        lines += ["", "## Validation split by origin (mean Dice)", ""]
        counts = report["models"][0]["summary"]["validation_origin_counts"]
        kvasir, clinicdb = counts.get("kvasir", 0), counts.get("clinicdb", 0)
        lines += [f"| model | memory | Kvasir frames ({kvasir}) | ClinicDB frames ({clinicdb}) |"]
        lines.append("|---|---|---:|---:|")
        for model in report["models"]:
            table = model["summary"]["validation_by_origin"]
            for condition in CONDITIONS:
                if condition in table:
                    cells = [_cell(table[condition].get(n), 4) for n in ("kvasir", "clinicdb")]
                    lines.append(f"| {model['name']} | {condition} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Wall time: {report['wall_seconds'] / 60:.1f} min this invocation; scoring time of all units "
        f"{report['scoring_seconds_total'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------- CLI
def _store(work: Path | None) -> tuple[Callable, Callable]:
    def path(key: str) -> Path:
        return work / f"{key}.pt"

    def store(key: str) -> dict[str, Any] | None:
        if work is None or not path(key).is_file():
            return None
        return torch.load(path(key), map_location="cpu", weights_only=False)

    def save(key: str, value: dict[str, Any]) -> None:
        if work is None:
            return
        work.mkdir(parents=True, exist_ok=True)
        partial = path(key).with_suffix(".partial")
        torch.save(value, partial)
        os.replace(partial, path(key))

    return store, save


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--models",
        type=Path,
        nargs="+",
        default=DEFAULT_MODELS,
        help="model folders (model_fp16.pt or model.pt + model.json)",
    )
    add("--data", type=Path, default=DEFAULT_DATA, help="data root in the ../shared/data layout (default: %(default)s)")
    add("--draws", type=int, default=3, help="draws of each random memory (default %(default)s)")
    add("--seed", type=int, default=0, help="seed of the draws (default %(default)s)")
    add("--max-images", type=int, default=0, help="smoke runs: the first N frames of each set (0: all)")
    add("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "memory_content_work", help="resume folder")
    add("--out", type=Path, default=None, help="also write the JSON here and the markdown beside it (.md)")
    add("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from monai_ecrm.data import pranet_datalist

    if not args.data.is_dir():
        sys.exit(f"data folder {args.data} not found (see ../shared/data/SOURCES.md, or pass --data)")
    started = time.perf_counter()
    datalist = pranet_datalist(args.data)
    sets = evaluation_sets(datalist, args.max_images)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/memory_content.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": str(args.data.resolve()),
        "sets": {name: len(items) for name, items in sets.items()},
        "draws": args.draws,
        "seed": args.seed,
        "threads": args.threads,
        "scoring": "original size: frame resized to the input size, sigmoid map resized back bilinearly "
        "(full_size_eval_postprocessing), Dice of the min-max normalised map > 0.5 against the original mask",
        "precision": "float32 (weights converted from the fp16 copies), CPU",
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "models": [],
    }
    scorers: dict[tuple[int, str], Scorer] = {}
    for folder in args.models:
        net, record, sha = load_model_folder(folder)
        size = int(record["preprocessing"]["spatial_size"][0])
        normalization = record["preprocessing"]["normalization"]
        report["spatial_size"] = size
        scorer = scorers.setdefault((size, normalization), Scorer(size, normalization))
        bank = net.ecrm.memory.num_slots
        shipped = [name.replace("/images/", "/").rsplit(".", 1)[0] for name in net.ecrm.memory.slot_names() if name]
        first = [case_id(item) for item in datalist["training"][:bank]]
        memories = draw_memories(datalist["training"], shipped, bank, args.draws, args.seed)
        store, save = _store(args.work_dir / f"{Path(folder).name}-{sha[:12]}-{args.max_images}-{args.seed}")
        log(f"{folder}: {size} px, {normalization}, bank {bank}, shipped memory {len(shipped)} cases")
        results = run_model(net, sets, memories, scorer, store, save, lambda m, f=folder: log(f"{Path(f).name} {m}"))
        report["models"].append(
            {
                "name": Path(folder).name,
                "folder": str(Path(folder).resolve()),
                "weights_sha256": sha,
                "shipped_memory_cases": shipped,
                "shipped_memory_is_first_training_items": shipped == first,
                "memory_cases": {
                    condition: [
                        [
                            case_id(c) if case_id(c) == case_id(m) else f"{case_id(c)}<-mask {case_id(m)}"
                            for c, m in zip(s["cases"], s["masks_of"])
                        ]
                        for s in specs
                    ]
                    for condition, specs in memories.items()
                },
                "seconds": {
                    f"{c}-{i}": round(d["seconds"], 1) for c, draws in results.items() for i, d in enumerate(draws)
                },
                "summary": summarise(results, sets),
            }
        )
    report["wall_seconds"] = time.perf_counter() - started  # this invocation (units resumed from --work-dir are free)
    report["scoring_seconds_total"] = sum(sum(m["seconds"].values()) for m in report["models"])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
