"""The ECRM study (issue #15): named ECRM variants run through ``polyp_accuracy.py``'s protocol in one process.

Each variant is a set of ``polyp_accuracy.py`` options (below, ``VARIANTS``); a run is a (variant, seed). The
training pairs are cached once per invocation and shared by every run (the cache depends only on size, augmentation
and normalisation). Runs are resumable and independent exactly as in ``polyp_accuracy.py`` (one folder per run in
``--work-dir``; rerunning continues or reuses), and the merged JSON and markdown are rewritten after every finished
run, so a finished run is never lost.

Screening (128 px, 400 steps, pretrained Lite0, bf16 autocast, BatchNorm refresh, one seed)::

    OMP_NUM_THREADS=1 python benchmarks/ecrm_study.py --work-dir /work/runs/screen128 --seeds 0 \\
        --variants no_ecrm,dcrnet,gate,zero,label,label_bg,attend_first,bg,bank256,bank1024,s16,flexunet

Variants selected by validation mDice then run on more seeds with ``--seeds 1,2``. ``--list`` prints the variants.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polyp_accuracy as pa  # noqa: E402

#: the study's base protocol (``polyp_accuracy.py`` options), shared by every variant unless it overrides them
BASE = ["--size", "128", "--steps", "400", "--init", "pretrained", "--amp", "bf16", "--bn-refresh"]

#: variant name -> extra ``polyp_accuracy.py`` options (``ecrm`` variants get ``--variant <name>``)
VARIANTS: dict[str, list[str]] = {
    "no_ecrm": ["--models", "no_ecrm"],
    "flexunet": ["--models", "flexunet"],
    "dcrnet": ["--models", "ecrm"],
    "gate": ["--models", "ecrm", "--context-start", "gate"],
    "zero": ["--models", "ecrm", "--context-start", "zero"],
    "label": ["--models", "ecrm", "--prototypes", "label"],
    "label_bg": ["--models", "ecrm", "--prototypes", "label", "--background-tokens"],
    "attend_first": ["--models", "ecrm", "--attend-first", "yes"],
    "bg": ["--models", "ecrm", "--background-tokens"],
    "bank256": ["--models", "ecrm", "--bank-size", "256"],
    "bank1024": ["--models", "ecrm", "--bank-size", "1024"],
    "s16": ["--models", "ecrm", "--memory-stride", "16"],
    # combinations (at most four, chosen after the single-option round)
    "s16_label_bg_zero": [
        "--models",
        "ecrm",
        "--memory-stride",
        "16",
        "--prototypes",
        "label",
        "--background-tokens",
        "--context-start",
        "zero",
    ],
    "s16_label_bg": ["--models", "ecrm", "--memory-stride", "16", "--prototypes", "label", "--background-tokens"],
    "label_bg_zero_bank256": [
        "--models",
        "ecrm",
        "--prototypes",
        "label",
        "--background-tokens",
        "--context-start",
        "zero",
        "--bank-size",
        "256",
    ],
    "s16_zero": ["--models", "ecrm", "--memory-stride", "16", "--context-start", "zero"],
    # the attention itself supervised (added after the first round: the label prototypes' attention stayed flat and
    # uncorrelated with the foreground, see the README)
    "attn_sup": ["--models", "ecrm", "--prototypes", "label", "--background-tokens", "--supervise-attention"],
    "s16_attn_sup": [
        "--models",
        "ecrm",
        "--memory-stride",
        "16",
        "--prototypes",
        "label",
        "--background-tokens",
        "--supervise-attention",
    ],
}


def variant_argv(name: str, seeds: str, extra: list[str]) -> list[str]:
    options = VARIANTS[name]
    argv = [*BASE, *options, "--seeds", seeds, *extra]
    if "ecrm" in options[options.index("--models") + 1].split(",") and name != "dcrnet":
        argv += ["--variant", name]
    return argv


def _claim(run_args, model: str, init: str, seed: int) -> Path | None:
    """A lock file for one run, so that two lanes given overlapping lists never train the same run at once; ``None``
    when another lane holds it (a lock left by a killed lane is removed by hand)."""
    name = f"{pa.model_name(model, run_args).replace('/', '-')}-{init}-seed{seed}"
    lock = Path(run_args.work_dir) / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return lock


def top_variants(work_dir: Path, count: int) -> list[str]:
    """The ``count`` ECRM variants with the best validation mDice among the finished seed-0 runs of ``work_dir``
    (selection by the validation split only; the test sets play no part)."""
    import json

    scored = []
    for path in Path(work_dir).glob("ecrm*-pretrained-seed0/result.json"):
        result = json.loads(path.read_text())
        variant = result["model"].split("/", 1)[1] if "/" in result["model"] else "dcrnet"
        if variant in VARIANTS and "val" in result["summary"]:
            scored.append((result["summary"]["val"]["dice"], variant))
    return [variant for _, variant in sorted(scored, reverse=True)[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="", help="comma list of variant names (see --list)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--list", action="store_true", help="print the variants and their options")
    parser.add_argument(
        "--top",
        type=int,
        default=0,
        help="also run the N ECRM variants with the best seed-0 validation mDice in --work-dir (after --variants)",
    )
    args, extra = parser.parse_known_args()
    if args.list:
        for name, options in VARIANTS.items():
            print(f"{name:24s} {' '.join(options)}")
        return
    names = [n for n in args.variants.split(",") if n]
    if args.top:
        names += [n for n in top_variants(args.work_dir, args.top) if n not in names]
        print(f"[study] variants: {', '.join(names)}", flush=True)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    common = ["--work-dir", str(args.work_dir)]
    caches: dict[tuple, tuple] = {}
    for name in names:
        run_args = pa.parse_args(variant_argv(name, args.seeds, [*common, *extra]))
        pa.torch.set_num_threads(run_args.threads)
        key = (run_args.size, run_args.augment, run_args.normalization, run_args.max_train, run_args.max_test)
        if key not in caches:
            datalists = pa.load_datalists(run_args)
            store: dict[str, pa.TrainingData] = {}

            def get_data(datalists=datalists, store=store, run_args=run_args) -> pa.TrainingData:
                if "train" not in store:
                    store["train"] = pa.TrainingData(datalists["train"], run_args)
                return store["train"]

            def get_val(datalists=datalists, store=store, run_args=run_args) -> pa.TrainingData | None:
                if not datalists["val"] or run_args.val_every < 1:
                    return None
                if "val" not in store:
                    store["val"] = pa.TrainingData(datalists["val"], run_args)
                return store["val"]

            caches[key] = (datalists, get_data, get_val)
        datalists, get_data, get_val = caches[key]
        for seed in run_args.seeds:
            for init in run_args.init:
                for model in run_args.models:
                    claim = _claim(run_args, model, init, seed)
                    if claim is None:
                        print(f"[study] {name} seed {seed}: another lane has it, skipped", flush=True)
                        continue
                    try:
                        tic = time.perf_counter()
                        pa.run_one(model, init, seed, run_args, datalists, get_data, get_val)
                        print(f"[study] {name} seed {seed}: {time.perf_counter() - tic:.0f} s", flush=True)
                    finally:
                        claim.unlink(missing_ok=True)
                    pa.write_outputs(run_args)


if __name__ == "__main__":
    main()
