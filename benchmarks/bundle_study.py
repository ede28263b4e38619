"""The accuracy study's confirmation runs *through the bundle* (issue #15): ``train.json`` via ``monai.bundle run``
with overrides (network, length, size, seed, bf16), then ``evaluate.json`` on the PraNet test sets at original size
and on the validation split; the numbers are those of the artefact a user trains.

Models (one recipe for all three, stated in ``RECIPE``; the ECRM variant's bundle overrides by ``--ecrm``):

- ``ecrm``: ``ECRMUNet`` with the selected ECRM options;
- ``no_ecrm``: the same network without ECRM (``--use_ecrm False``);
- ``flexunet``: MONAI's ``FlexibleUNet`` with the same encoder (the bundle's ECRM handlers do nothing for it).

Data: one fixed datalist JSON (``monai_ecrm.data.pranet_datalist``: the PraNet training lists with a fixed 10 %
held out, the test lists under ``test``), written once into the work directory, so the seed changes initialisation
and order, never the split. The bundle's seeded determinism replaces the accuracy script's step-level batch identity
across models (each model sees the same shuffling for a seed only as far as its random draws coincide).

Length: ``--epochs`` epochs of ``floor(training pairs / batch)`` iterations (at batch 8, 163 per epoch: 10 epochs =
1630 steps); the cosine schedule runs per iteration over the whole run.

Each run is a folder ``<model>-seed<k>`` holding a copy of the bundle (its ``models/``, ``logs/``, ``eval/``), the
commands run, their logs and ``result.json`` (the schema of ``polyp_accuracy.py``'s results, so that
``python benchmarks/polyp_accuracy.py --merge-only --work-dir DIR`` tables them). Reruns resume an interrupted
training (``--resume_from latest``) and skip finished steps.

Example (the study's confirmation)::

    OMP_NUM_THREADS=2 python benchmarks/bundle_study.py --work-dir /work/runs/bundle256 \\
        --models ecrm,no_ecrm,flexunet \\
        --seeds 0,1,2 --size 256 --epochs 10 --bf16 --ecrm "memory_stride=16,prototypes=label,background_tokens=True"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "polyp_ecrm"
DEFAULT_DATA = REPO.parent / "shared" / "data"
#: one training recipe for every model: the accuracy protocol's (AdamW 1e-3, weight decay 0.01, flips only); they are
#: train.json's defaults since bundle 0.2.0, stated here all the same so that a study run never depends on those
RECIPE = {
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "batch_size": 8,
    "val_batch_size": 16,
    "backbone": "efficientnet-lite0",
    "aux_weight": 0.4,
    "train#preprocessing#affine_prob": 0.0,
    "train#preprocessing#intensity_prob": 0.0,
    "progress_bar": False,
    "num_workers": 0,
}
SUITE_COLUMNS = None  # read from summary.csv


def _overrides(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def _model_overrides(model: str, ecrm: dict[str, Any], size: int) -> dict[str, Any]:
    if model == "ecrm":
        # the channels of the encoder level ECRM works on, as in the screening (320 at 1/32, 112 at 1/16 for Lite0)
        return {"ecrm_channels": _level_channels(ecrm.get("memory_stride")), **ecrm}
    if model == "no_ecrm":
        return {"use_ecrm": False}
    if model == "flexunet":
        network = {
            "_target_": "FlexibleUNet",
            "in_channels": 3,
            "out_channels": 1,
            "backbone": "@backbone",
            "pretrained": "@pretrained",
        }
        return {"use_ecrm": False, "network_def": network}
    raise ValueError(model)


def _level_channels(memory_stride: int | None) -> int:
    import math

    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    import monai_ecrm  # noqa: F401  (registers efficientnet-lite0)

    channels = FLEXUNET_BACKBONE.register_dict[RECIPE["backbone"]]["feature_channel"]
    return int(channels[-1] if not memory_stride else channels[int(math.log2(memory_stride)) - 1])


def _run(command: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}), see {log}: {' '.join(command)}")


def _summary(report_dir: Path) -> dict[str, dict[str, Any]]:
    rows = list(csv.DictReader(open(report_dir / "summary.csv")))
    out = {}
    for row in rows:
        name = row.pop("dataset")
        out[name] = {key: (int(value) if key == "images" else float(value)) for key, value in row.items() if value}
    return out


def run_one(model: str, seed: int, args: argparse.Namespace, datalist: Path) -> dict[str, Any]:
    name = f"{model}-seed{seed}"
    run_dir = args.work_dir / name
    result_path = run_dir / "result.json"
    ecrm = dict(args.ecrm) if model == "ecrm" else {}
    config = {
        "model": f"ecrm/{args.variant}" if model == "ecrm" and args.variant else model,
        "init": "pretrained",
        "seed": seed,
        "size": args.size,
        "epochs": args.epochs,
        "bf16": args.bf16,
        "recipe": RECIPE,
        "ecrm_options": ecrm,
        "datalist": str(datalist),
    }
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("bundle_config") == config:
            if _add_diagnostics(result, run_dir, model, args, datalist):
                result_path.write_text(json.dumps(result, indent=1))
            print(f"[bundle-study] {name}: finished run reused", flush=True)
            return result
    bundle = run_dir / "polyp_ecrm"
    if not bundle.is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "runs"))
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    elif json.loads((run_dir / "config.json").read_text()) != config:
        sys.exit(f"{run_dir}: made with another configuration; use another --work-dir")
    values = {
        **RECIPE,
        "dataset_dir": str(datalist),
        "spatial_size": args.size,
        "max_epochs": args.epochs,
        "seed": seed,
        "bf16": args.bf16,
        **_model_overrides(model, ecrm, args.size),
    }
    configs = bundle / "configs"
    base = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(bundle)]
    log = run_dir / "run.log"
    tic = time.perf_counter()
    if not (bundle / "models" / "checkpoint_final.pt").is_file():
        resume = ["--resume_from", "latest"] if any((bundle / "models").glob("checkpoint_epoch=*.pt")) else []
        _run([*base, "--config_file", str(configs / "train.json"), *_overrides(values), *resume], log, args.threads)
    train_seconds = time.perf_counter() - tic
    both = str([str(configs / "train.json"), str(configs / "evaluate.json")])
    summaries = {}
    for eval_list, out in (("test", "eval_test"), ("validation", "eval_val")):
        report = bundle / out / "report"
        if not (report / "summary.csv").is_file():
            # the papers' convention (min-max normalised maps): these tables stand beside published numbers
            extra = {"output_dir": str(bundle / out), "eval_list": eval_list, "normalize": "minmax"}
            _run([*base, "--config_file", both, *_overrides({**values, **extra})], log, args.threads)
        summaries.update(_summary(report))
    summary = {("val" if key == "validation" else key): value for key, value in summaries.items() if key != "overall"}
    checkpoint_trainer = _trainer_state(bundle / "models" / "checkpoint_final.pt")
    result = {
        "run": name,
        "bundle_config": config,
        "config": {
            "model": config["model"],
            "init": "pretrained",
            "seed": seed,
            "backbone": RECIPE["backbone"],
            "size": args.size,
            "batch_size": RECIPE["batch_size"],
            "lr": RECIPE["learning_rate"],
            "weight_decay": RECIPE["weight_decay"],
            "aux_weight": RECIPE["aux_weight"] if model == "ecrm" else 0.0,
            "augment": "flips",
            "amp": "bf16" if args.bf16 else "fp32",
            "bn_refresh": True,
            "protocol": "bundle",
            "metrics_normalize": "minmax",
            **_protocol_keys(),
            "bank_size": ecrm.get("bank_size", 20),
            "ecrm_channels": _level_channels(ecrm.get("memory_stride")) if model == "ecrm" else 320,
            **({"ecrm_options": ecrm} if ecrm else {}),
        },
        "model": config["model"],
        "init": "pretrained",
        "seed": seed,
        "size": args.size,
        "batch_size": RECIPE["batch_size"],
        "steps": checkpoint_trainer.get("iteration"),
        "train_images": None,
        "val_images": summary.get("val", {}).get("images"),
        "train_images_per_s": None,
        "wall_seconds": round(train_seconds, 1),
        "summary": summary,
        "val_loss": [],
        "per_image": {},
    }
    _add_diagnostics(result, run_dir, model, args, datalist)
    result_path.write_text(json.dumps(result, indent=1))
    print(f"[bundle-study] {name}: done, " + ", ".join(f"{k} {v['dice']:.3f}" for k, v in summary.items()), flush=True)
    return result


def validation_curve(log: Path, epoch_length: int) -> list[list[float]]:
    """``[step, val_mean_dice]`` at the end of every epoch, read from the training log (the evaluator's
    ``Epoch[N] Metrics -- ... val_mean_dice: X`` lines; a resumed run's repeated epochs keep their last value)."""
    import re

    values: dict[int, float] = {}
    if log.is_file():
        for match in re.finditer(r"Epoch\[(\d+)\] Metrics -- [^\n]*?val_mean_dice: ([0-9.]+)", log.read_text()):
            values[int(match.group(1))] = float(match.group(2))
    return [[epoch * epoch_length, value] for epoch, value in sorted(values.items())]


def training_seconds(log: Path) -> float | None:
    """Seconds the trainer's epochs took (validation included), summed over epochs from the training log (a resumed
    run's repeated epochs count once, their last time): the whole training even when it ran in several sittings."""
    import re

    pattern = r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([0-9.]+)"
    epochs: dict[int, float] = {}
    if log.is_file():
        for match in re.finditer(pattern, log.read_text()):
            hours, minutes, seconds = (float(value) for value in match.groups()[1:])
            epochs[int(match.group(1))] = 3600 * hours + 60 * minutes + seconds
    return round(sum(epochs.values()), 1) if epochs else None


def _protocol_keys() -> dict[str, Any]:
    """What the merged tables state about every protocol: the input normalisation and the held-out fraction."""
    from monai_ecrm.transforms import normalization_for_backbone

    return {"normalization": normalization_for_backbone(RECIPE["backbone"]), "val_fraction": 0.1}


def _add_diagnostics(
    result: dict[str, Any], run_dir: Path, model: str, args: argparse.Namespace, datalist: Path
) -> bool:
    """Adds what a finished run lacks: the validation mDice per epoch with its plateau (all models) and, for ECRM,
    whether the network uses its memory (``polyp_accuracy.memory_use`` on the validation split at the training size:
    mean Dice with the memory and with it emptied, float32). True when something was added."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import polyp_accuracy

    added = False
    for key, value in _protocol_keys().items():
        if key not in result["config"]:
            result["config"][key] = value
            added = True
    if not result.get("wall_seconds_epochs"):
        # every epoch of the run (wall_seconds is only the last sitting's)
        result["wall_seconds_epochs"] = training_seconds(run_dir / "run.log")
        result["wall_seconds"] = result["wall_seconds_epochs"] or result.get("wall_seconds")
        added = True
    if not result.get("val_dice"):
        steps = result.get("steps") or 0
        epoch_length = steps // max(args.epochs, 1) if steps else 0
        curve = validation_curve(run_dir / "run.log", epoch_length)
        # a falling loss and a rising Dice both plateau at 0 relative change; the sign says which way it moved
        result["val_dice"] = curve
        result["val_dice_plateau"] = polyp_accuracy.plateau(curve)
        added = True
    if model == "ecrm" and "memory_use" not in result:
        import torch

        from monai_ecrm import load_model
        from monai_ecrm.transforms import normalization_for_backbone

        torch.set_num_threads(args.threads)
        net = load_model(run_dir / "polyp_ecrm" / "models" / "model.pt")
        items = json.loads(datalist.read_text())["validation"]
        options = argparse.Namespace(
            size=args.size, normalization=normalization_for_backbone(RECIPE["backbone"]), device="cpu"
        )
        result["memory_use"] = polyp_accuracy.memory_use(net, {"val": items}, {}, options)
        added = True
    return added


def _trainer_state(path: Path) -> dict[str, Any]:
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True).get("trainer", {}))


def restrict_training(datalist: Path, sets: list[str]) -> Path:
    """A copy of the PraNet datalist whose training and validation items come from ``sets`` only (an item's set is
    the PraNet folder its image lies in); the test sets are kept whole. Written once beside ``datalist``."""
    from monai_ecrm.data.datalist import PRANET_SETS

    unknown = sorted(set(sets) - set(PRANET_SETS))
    if unknown:
        sys.exit(f"--train-sets: unknown set(s) {unknown}; choose from {sorted(PRANET_SETS)}")
    out = datalist.with_name(f"{datalist.stem}_{'_'.join(sorted(sets))}.json")
    if out.is_file():
        return out
    data = json.loads(datalist.read_text())
    folders = {PRANET_SETS[name] for name in sets}

    def keep(item: dict[str, Any]) -> bool:
        return Path(item["image"]).parent.parent.name in folders

    for key in ("training", "validation"):
        data[key] = [item for item in data[key] if keep(item)]
    data["description"] = f"{data.get('description', '')} (training and validation restricted to {sorted(sets)})"
    out.write_text(json.dumps(data, indent=1))
    return out


def _parse_options(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        options[key] = (
            json.loads(value.lower())
            if value.lower() in ("true", "false", "null")
            else (int(value) if value.isdigit() else value)
        )
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--models", default="ecrm,no_ecrm,flexunet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU AMX)")
    parser.add_argument("--ecrm", default="", help="ECRM bundle overrides, e.g. 'memory_stride=16,prototypes=label'")
    parser.add_argument("--variant", default="", help="name of the ECRM variant in the tables")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument(
        "--train-sets",
        default="",
        help="train and validate on these PraNet sets only (comma-separated of kvasir, clinicdb; default all); the "
        "test sets stay both, e.g. 'kvasir' for the memory issue's site-adaptation protocol",
    )
    args = parser.parse_args()
    args.ecrm = _parse_options(args.ecrm)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    datalist = args.work_dir / "pranet.json"
    if not datalist.is_file():
        from monai_ecrm.bundle import write_pranet_datalist

        write_pranet_datalist(args.data, datalist)
    if args.train_sets:
        datalist = restrict_training(datalist, [s.strip() for s in args.train_sets.split(",") if s.strip()])
    for seed in [int(s) for s in args.seeds.split(",")]:
        for model in args.models.split(","):
            run_one(model, seed, args, datalist)


if __name__ == "__main__":
    main()
