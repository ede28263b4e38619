"""Few-shot site adaptation without gradients (memory issue, item 3): a model trained on Kvasir-SEG only, adapted to
CVC-ClinicDB with k labelled frames, scored on CVC-ClinicDB frames of other video sequences than the shots.

Protocol (stated in the README's Accuracy section):

- **Models**: the bundle's recipe trained on Kvasir-SEG only (``benchmarks/bundle_study.py --train-sets kvasir``);
  each ``--models`` file is one training seed.
- **Target cases**: CVC-ClinicDB's 612 frames come from 29 colonoscopy videos whose boundaries are not in the data;
  the frames are numbered in video order, so contiguous blocks of ``--block`` frames (by frame number) stand for
  sequences (31 blocks of 20: a block rarely spans two videos, never splits one into shots and test frames).
- **Draw** ``d`` (seeded): ``--pool-blocks`` blocks are the shot pool, the others the test frames; the k shots are
  drawn from the pool. Every method of a draw is scored on the same test frames, so the comparison is paired.
- **Methods at equal k**: ``none`` (the model as trained); ``memory_replace`` (the memory emptied and rewritten from
  the k shots with their masks: no gradient step, ``monai_ecrm.adaptation``); ``memory_add`` (the k shots written
  after the existing slots); ``bn_k`` (BatchNorm statistics re-estimated on the k shots' images, no labels);
  ``bn_pool`` (on the whole pool's images, unlabelled: what a site has without annotation); ``finetune`` (the
  alternative a user would try: ``--finetune-steps`` AdamW steps, lr ``--finetune-lr``, DiceCE on the k shots with
  flips, BatchNorm and memory frozen).
- **Score**: mean Dice of the 0.5-thresholded map at each frame's original size (``polyp_accuracy.light_dice``).

Output: JSON (``--out``) with every (model, draw, k, method) score and the summary (mean and SD over draws and seeds
of the change against ``none``), plus a markdown table (``--out-md``). Finished entries are kept in ``--work`` and
skipped on a rerun, so the script can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
METHODS = ("none", "memory_replace", "memory_add", "bn_k", "bn_pool", "finetune")


def clinicdb_blocks(data: Path, block: int) -> list[list[dict[str, str]]]:
    """CVC-ClinicDB's frames in frame-number order, cut into contiguous blocks of ``block`` frames."""
    images = data / "cvc_clinicdb" / "images"
    masks = data / "cvc_clinicdb" / "masks"
    if not images.is_dir():
        sys.exit(f"site_adaptation: {images} not found (CVC-ClinicDB, see ../shared/data/SOURCES.md)")
    frames = sorted(images.iterdir(), key=lambda path: int(path.stem) if path.stem.isdigit() else 10**9)
    items = [{"image": str(path), "label": str(masks / path.name)} for path in frames if (masks / path.name).is_file()]
    return [items[start : start + block] for start in range(0, len(items), block)]


def draw_split(
    blocks: Sequence[Sequence[dict[str, str]]], pool_blocks: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(pool, test)``: ``pool_blocks`` blocks drawn with ``seed`` (shots come from them) and the frames of the
    other blocks (scored)."""
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    pool_ids = set(order[:pool_blocks])
    pool = [item for index in sorted(pool_ids) for item in blocks[index]]
    test = [item for index in range(len(blocks)) if index not in pool_ids for item in blocks[index]]
    return pool, test


def shots(pool: Sequence[dict[str, str]], k: int, seed: int) -> list[dict[str, str]]:
    """``k`` frames of the pool, drawn with ``seed`` (the same first frames for a larger k of one draw)."""
    order = list(range(len(pool)))
    random.Random(10_000 + seed).shuffle(order)
    return [pool[index] for index in order[:k]]


def _prepared(items: Sequence[dict[str, str]], record: dict[str, Any], labels: bool = True) -> list[dict[str, Any]]:
    from monai_ecrm.transforms import eval_transforms

    size = record["preprocessing"]["spatial_size"]
    transform = eval_transforms(size, normalization=record["preprocessing"]["normalization"])
    prepared = [transform(dict(item)) for item in items]
    if not labels:
        prepared = [{"image": sample["image"]} for sample in prepared]
    return prepared


def write_memory(net: torch.nn.Module, items: list[dict[str, Any]], record: dict[str, Any], mode: str) -> None:
    """The gradient-free adaptation: the shots' prototypes written into the memory (``replace`` or ``add``) by the
    library call the ``adapt`` command uses (:func:`monai_ecrm.adaptation.adapt_network`)."""
    from monai_ecrm.adaptation import adapt_network

    adapt_network(net, items, record, mode=mode)


def re_estimate_bn(net: torch.nn.Module, items: Sequence[dict[str, str]], record: dict[str, Any]) -> None:
    from monai_ecrm.handlers import refresh_batchnorm

    refresh_batchnorm(net, _prepared(items, record, labels=False))


def finetune(
    net: torch.nn.Module, items: Sequence[dict[str, str]], record: dict[str, Any], steps: int, lr: float, seed: int
) -> None:
    """``steps`` AdamW steps of DiceCE on the shots (all of them each step, random flips), BatchNorm statistics and
    the memory frozen (the network stays in eval mode: few frames make poor batch statistics)."""
    from monai.losses import DiceCELoss

    samples = _prepared(items, record)
    images = torch.stack([sample["image"] for sample in samples]).float()
    labels = torch.stack([sample["label"] for sample in samples]).float()
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    net.eval()
    for _ in range(steps):
        x, y = images, labels
        for dim in (-1, -2):
            if torch.rand((), generator=generator) < 0.5:
                x, y = x.flip(dim), y.flip(dim)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
    net.eval()


def score(net: torch.nn.Module, test: Sequence[dict[str, str]], record: dict[str, Any]) -> float:
    from polyp_accuracy import light_dice

    options = argparse.Namespace(
        size=record["preprocessing"]["spatial_size"][0],
        normalization=record["preprocessing"]["normalization"],
        device="cpu",
    )
    return light_dice([net], {"test": list(test)}, options)[0][0]["test"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from monai_ecrm.record import load_network

    torch.set_num_threads(args.threads)
    blocks = clinicdb_blocks(args.data, args.block)
    work = json.loads(args.work.read_text()) if args.work.is_file() else {}
    for model_path in args.models:
        base, record = load_network(model_path)
        name = f"{Path(model_path).parent.parent.parent.name}"
        for draw in range(args.draws):
            pool, test = draw_split(blocks, args.pool_blocks, draw)
            for k in [0, *args.k]:
                for method in METHODS:
                    if (method in ("none", "bn_pool")) != (k == 0):
                        continue  # none and bn_pool use no shots: once per draw
                    key = f"{name}|draw{draw}|k{k}|{method}"
                    if key in work:
                        continue
                    tic = time.perf_counter()
                    net = copy.deepcopy(base).eval()
                    chosen = shots(pool, k, draw) if k else []
                    if method.startswith("memory_"):
                        write_memory(net, chosen, record, method.split("_", 1)[1])
                    elif method == "bn_k":
                        re_estimate_bn(net, chosen, record)
                    elif method == "bn_pool":
                        re_estimate_bn(net, pool, record)
                    elif method == "finetune":
                        finetune(net, chosen, record, args.finetune_steps, args.finetune_lr, draw)
                    dice = score(net, test, record)
                    work[key] = {
                        "model": name,
                        "draw": draw,
                        "k": k,
                        "pool_frames": len(pool),
                        "method": method,
                        "dice": dice,
                        "test_frames": len(test),
                        "shots": [Path(item["image"]).name for item in chosen],
                        "seconds": round(time.perf_counter() - tic, 1),
                    }
                    args.work.parent.mkdir(parents=True, exist_ok=True)
                    args.work.write_text(json.dumps(work, indent=1))
                    print(f"[site-adaptation] {key}: Dice {dice:.4f} ({work[key]['seconds']} s)", flush=True)
    return summarize(work, args)


def summarize(work: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per method and k: the change of mean Dice against ``none`` of the same model and draw (paired), mean and SD
    over every (model, draw), and the mean Dice itself."""
    none = {(e["model"], e["draw"]): e["dice"] for e in work.values() if e["method"] == "none"}
    for entry in work.values():
        if entry["method"] == "bn_pool":
            entry["k"] = 0  # the whole unlabelled pool (``pool_frames``), no labelled shot
    rows = []
    for method in METHODS[1:]:
        ks = sorted({e["k"] for e in work.values() if e["method"] == method})
        for k in ks:
            entries = [
                e for e in work.values() if e["method"] == method and e["k"] == k and (e["model"], e["draw"]) in none
            ]
            if not entries:
                continue
            deltas = [e["dice"] - none[(e["model"], e["draw"])] for e in entries]
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "n": len(entries),
                    "dice_mean": statistics.fmean(e["dice"] for e in entries),
                    "delta_mean": statistics.fmean(deltas),
                    "delta_sd": statistics.stdev(deltas) if len(deltas) > 1 else None,
                }
            )
    baseline = list(none.values())
    return {
        "protocol": {
            "block": args.block,
            "pool_blocks": args.pool_blocks,
            "draws": args.draws,
            "k": args.k,
            "finetune_steps": args.finetune_steps,
            "finetune_lr": args.finetune_lr,
            "models": [str(path) for path in args.models],
        },
        "none_dice_mean": statistics.fmean(baseline) if baseline else None,
        "none_dice_sd": statistics.stdev(baseline) if len(baseline) > 1 else None,
        "rows": rows,
        "runs": work,
    }


def markdown(summary: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:+.3f}"

    lines = [
        f"No adaptation: mean Dice {summary['none_dice_mean']:.3f} on CVC-ClinicDB frames of other sequences than the "
        "shots (per model and draw, paired below).",
        "",
        "| method | k | runs | mean Dice | change vs none (mean) | SD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        k = "pool, unlabelled" if row["method"] == "bn_pool" else row["k"]
        sd = "" if row["delta_sd"] is None else format(row["delta_sd"], ".3f")
        lines.append(
            f"| {row['method']} | {k} | {row['n']} | {row['dice_mean']:.3f} | {cell(row['delta_mean'])} | {sd} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="Kvasir-only model.pt files (seeds)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--k", type=lambda text: [int(v) for v in text.split(",")], default=[5, 10, 20])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--pool-blocks", type=int, default=10)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, nargs="+", required=True, help="JSON of finished entries (resumable)")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="table the finished entries of every --work file (runs of several processes) without running more",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--out-md", type=Path)
    args = parser.parse_args(argv)
    if args.summarize_only:
        work = {}
        for path in args.work:
            work.update(json.loads(path.read_text()))
        summary = summarize(work, args)
    else:
        if len(args.work) != 1:
            parser.error("--work takes one file unless --summarize-only")
        args.work = args.work[0]
        summary = run(args)
    text = json.dumps({key: value for key, value in summary.items() if key != "runs"}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    if args.out_md:
        args.out_md.write_text(markdown(summary))


if __name__ == "__main__":
    main()
