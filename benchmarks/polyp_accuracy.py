"""Polyp segmentation accuracy on the PraNet split: ECRMUNet against the same network without ECRM and FlexibleUNet.

Protocol (issue #11)
    Data: the PraNet split read from ``--data`` (default ``../shared/data``, layout ``kvasir_seg/{images,masks}``,
    ``cvc_clinicdb/{images,masks}``, ``pranet_split/{train,test}_{kvasir,clinicdb}.txt``): 900 Kvasir-SEG + 550
    CVC-ClinicDB training pairs, 100 + 62 test pairs. ``--val-fraction`` (default 0.1) of the training pairs is held
    out as a validation split (drawn once with a fixed seed, the same for every run): the models train on the rest
    (1305 pairs by default; ``--val-fraction 0`` trains on all 1450, the published protocol, but then
    ``--save-best`` has nothing to select with). The validation split only selects the model ``--save-best``
    writes; the test sets never select anything.

    Training: a fixed number of optimizer steps (``--steps``, not wall-clock), batch ``--batch-size`` at
    ``--size`` px, AdamW (lr ``--lr``, weight decay 0.01) with cosine decay to 0 over the steps, DiceCE loss
    (sigmoid). ECRMUNet also gets the ECRM coarse-mask loss (the same DiceCE on the coarse logits, taken by a forward
    hook on ``net.ecrm`` and upsampled to the label size) with weight ``--aux-weight`` (0.4). Augmentation: the
    package's train preset with random vertical and horizontal flips only (``--augment full`` adds its rotation,
    zoom and intensity jitter). The data order and every augmentation are functions of (seed, step) alone: all
    models of a seed see the same batches, and a resumed run sees what an uninterrupted one would have seen.

    Models (``--models``), all with the ``--backbone`` encoder (efficientnet-lite0), ImageNet weights or random
    init (``--init pretrained,random``), seeded by the run's seed:

    - ``ecrm``: ``ECRMUNet(backbone, bank_size, ecrm_channels, <ECRM options>)``, every option passed explicitly:
      the command line's, DCRNet's block by default (``DCRNET_ECRM_OPTIONS``; ECRMUNet's own defaults, the study's
      choice, are ``--memory-stride 16 --prototypes label --background-tokens --supervise-attention``); after
      training its memory is rebuilt with the final weights from the last ``--bank-size`` training images
      (``monai_ecrm.handlers.refresh_memory``);
    - ``no_ecrm``: the same network (same construction, hence the same initial encoder and decoder weights for a
      seed) with ``net.ecrm`` replaced by an identity stand-in, so the deepest encoder map goes straight to the
      decoder; ``--ecrm-channels`` defaults to the encoder's deepest channels (320) so both decoders are identical;
    - ``flexunet``: MONAI's ``FlexibleUNet`` with the same encoder and decoder channels.

    Evaluation: every test image at its ORIGINAL size (the sigmoid map resized back bilinearly with
    ``full_size_eval_postprocessing``, the mask never resized) with the polyp metric suite (Dice, IoU, weighted
    F, S-alpha, E-phi mean/max/adaptive, MAE, precision, recall), on Kvasir (100), ClinicDB (62), every
    ``--extra NAME=PATH`` folder (``images/`` and ``masks/``), and the validation split (reported apart).
    Tables give the mean and sample standard deviation (n - 1) over seeds of each per-run dataset mean, and say
    which differences between models are within one standard deviation (|difference of means| <= the larger SD).

Work directory (``--work-dir``)
    One folder per run, ``<model>-<init>-seed<k>``: ``checkpoint.pt`` every ``--ckpt-every`` steps and at the end
    (model, optimizer, scheduler, step, RNG states, loss log, timings), ``train.log``, ``final_model.pt`` (weights
    after the memory refresh) and ``result.json`` once evaluated. A rerun continues from the checkpoint; a run
    whose ``result.json`` has the requested steps is not trained again (missing test sets are evaluated from
    ``final_model.pt``); a larger ``--steps`` continues a finished run (its cosine schedule is stretched to the new
    end, recorded as ``resumed_from_step``). Runs are independent: run one model/seed per invocation
    (``--models ecrm --seeds 1``) and gather them with ``--merge-only``, which trains nothing and writes the JSON
    and markdown from every ``result.json`` in the work directory.

Examples::

    OMP_NUM_THREADS=2 python benchmarks/polyp_accuracy.py --steps 2000 --work-dir ~/polyp_runs
    python benchmarks/polyp_accuracy.py --models ecrm --init pretrained --seeds 1 --work-dir ~/polyp_runs
    python benchmarks/polyp_accuracy.py --merge-only --work-dir ~/polyp_runs --save-best model.pt
    python benchmarks/polyp_accuracy.py --steps 8 --size 64 --seeds 0 --max-train 32 --max-test 4   # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from monai.transforms import Compose, NormalizeIntensity, Randomizable
from torch import nn

import monai_ecrm  # noqa: F401  (registers efficientnet-lite0 and its offline ImageNet weights)
from monai_ecrm.data import folder_datalist, split_datalist
from monai_ecrm.handlers import refresh_batchnorm, refresh_memory
from monai_ecrm.handlers.aux_supervision import aux_to_label_size
from monai_ecrm.metrics.evaluation import TABLE_HEADERS, score_pair, summarize
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
from monai_ecrm.networks.nets.ecrm_unet import NoECRM
from monai_ecrm.record import read_record, write_record
from monai_ecrm.transforms import (
    NORMALIZATIONS,
    full_size_eval_postprocessing,
    full_size_eval_transforms,
    normalization_for_backbone,
    train_transforms,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODELS = ("ecrm", "no_ecrm", "flexunet")
INITS = ("pretrained", "random")
#: training and test sets of the PraNet split: name -> (folder under --data, id list under pranet_split/)
TRAIN_SETS = {"kvasir": ("kvasir_seg", "train_kvasir.txt"), "clinicdb": ("cvc_clinicdb", "train_clinicdb.txt")}
TEST_SETS = {"kvasir": ("kvasir_seg", "test_kvasir.txt"), "clinicdb": ("cvc_clinicdb", "test_clinicdb.txt")}
VAL = "val"
VAL_SPLIT_SEED = 20240611  # the validation split is the same for every run and seed
WEIGHT_DECAY = 0.01
KEY_CHANNELS = 256
#: version of the memory-use and BatchNorm diagnostics (2: the Dice of both sides computed from logits);
#: --rediagnose recomputes runs with an older one
DIAGNOSTICS_VERSION = 2
#: the command line's ECRM options, DCRNet's block (ECRMUNet's defaults when the protocol was written, not its defaults
#: now): a run's configuration records only the options that differ from them, so earlier runs keep their configuration
DEFAULT_ECRM_OPTIONS = dict(DCRNET_ECRM_OPTIONS)
SUITE = tuple(TABLE_HEADERS)  # metric keys in the papers' column order
#: the ECRM options the bundle's configs state as top-level values (``--memory_stride`` ...; ``attend_first`` follows
#: ``prototypes`` there)
BUNDLE_ECRM_KEYS = ("memory_stride", "context_start", "prototypes", "background_tokens", "supervise_attention")


# ---------------------------------------------------------------------------------------------------------- networks
def network_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ECRMUNet`` arguments of the ``ecrm`` model (what a bundle's ``network_def`` needs to load it)."""
    return {
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 1,
        "backbone": args.backbone,
        "bank_size": args.bank_size,
        "use_icrm": False,
        "ecrm_channels": args.ecrm_channels,
        "key_channels": KEY_CHANNELS,
        **ecrm_options(args),
    }


def ecrm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ECRM variant options (``ECRMUNet`` arguments) given on the command line."""
    return {
        "memory_stride": args.memory_stride,
        "context_start": args.context_start,
        "prototypes": args.prototypes,
        "background_tokens": args.background_tokens,
        "attend_first": args.attend_first,
        "supervise_attention": args.supervise_attention,
    }


def model_name(model: str, args: argparse.Namespace) -> str:
    """The run's model name: ``ecrm`` or ``ecrm/<variant>`` (``--variant``), the others as they are."""
    return f"ecrm/{args.variant}" if model == "ecrm" and args.variant else model


def build_network(model: str, init: str, seed: int, args: argparse.Namespace) -> nn.Module:
    """The network of a run, its random parts initialised from ``seed``."""
    torch.manual_seed(seed)
    pretrained = init == "pretrained"
    if model == "flexunet":
        return FlexibleUNet(in_channels=3, out_channels=1, backbone=args.backbone, pretrained=pretrained)
    kwargs = network_kwargs(args)
    if model == "no_ecrm":
        # the DCRNet block (the variants change nothing once ECRM is replaced), at the deepest level
        kwargs.update(memory_stride=None, context_start="full", prototypes="coarse", background_tokens=False)
        kwargs.update(attend_first=None, supervise_attention=False, ecrm_channels=deepest_channels(args.backbone))
    net = ECRMUNet(pretrained=pretrained, **kwargs)
    if model == "no_ecrm":
        net.ecrm = NoECRM()  # replaced after construction: the same initial weights as the ecrm model
    return net


def deepest_channels(backbone: str, memory_stride: int | None = None) -> int:
    """Channels of the encoder level at ``memory_stride`` (the deepest level by default)."""
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    entry = FLEXUNET_BACKBONE.register_dict[backbone]
    channels = entry["feature_channel"]
    if memory_stride is None:
        return int(channels[-1])
    return int(channels[int(math.log2(memory_stride)) - 1])


# -------------------------------------------------------------------------------------------------------------- data
def _ids(items: Iterable[dict[str, Any]]) -> list[str]:
    return [f"{Path(item['image']).parent.parent.name}/{Path(item['image']).stem}" for item in items]


def load_datalists(args: argparse.Namespace) -> dict[str, Any]:
    """``{"train": items, "val": items, "test": {name: items}}`` from ``--data``, ``--extra`` and the split options."""
    data, lists = Path(args.data).expanduser(), Path(args.data).expanduser() / "pranet_split"
    if not data.is_dir():
        sys.exit(f"data folder {data} not found (see ../shared/data/SOURCES.md, or pass --data)")
    train = split_datalist([data / d for d, _ in TRAIN_SETS.values()], [lists / f for _, f in TRAIN_SETS.values()])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    val_count = int(round(args.val_fraction * len(train)))
    val_index = set(order[:val_count])
    val = [item for index, item in enumerate(train) if index in val_index]
    train = [item for index, item in enumerate(train) if index not in val_index]
    tests = {name: split_datalist(data / folder, lists / ids) for name, (folder, ids) in TEST_SETS.items()}
    for spec in args.extra:
        name, _, path = spec.partition("=")
        if not name or not path or name in tests or name == VAL:
            sys.exit(f"--extra expects NAME=PATH with a new name, got {spec!r}")
        tests[name] = folder_datalist(path, require_masks=True)
    if args.max_train:
        train = train[: args.max_train]
    if args.max_test:
        val = val[: args.max_test]
        tests = {name: items[: args.max_test] for name, items in tests.items()}
    return {"train": train, "val": val, "test": tests}


def fingerprint(items: Sequence[dict[str, Any]]) -> str:
    """A short hash of the items' ids (folder/stem), so a run never resumes on other training data."""
    return hashlib.sha256("\n".join(_ids(items)).encode()).hexdigest()[:16]


class TrainingData:
    """The training pairs resized once and cached; batches that depend only on (seed, step).

    The train preset is split at its first random transform: the deterministic head (load, resize, compact cast)
    runs once per image, the random tail per sample with a random state seeded from (seed, sample position), and
    the sample order is one fresh permutation of the training set per epoch, drawn from (seed, epoch).
    """

    def __init__(self, items: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
        extra = {} if args.augment == "full" else {"affine_prob": 0.0, "intensity_prob": 0.0}
        preset = train_transforms(args.size, normalization=args.normalization, **extra)
        first_random = next(i for i, t in enumerate(preset.transforms) if isinstance(t, Randomizable))
        head = Compose(preset.transforms[:first_random])
        self.augment = Compose(preset.transforms[first_random:])
        start = time.perf_counter()
        self.cache = [head(dict(item)) for item in items]
        self.cache_seconds = time.perf_counter() - start
        self._orders: dict[tuple[int, int], list[int]] = {}
        mean, std = NORMALIZATIONS[args.normalization]
        self._normalize = NormalizeIntensity(subtrahend=np.array(mean), divisor=np.array(std), channel_wise=True)

    def __len__(self) -> int:
        return len(self.cache)

    def _index(self, seed: int, position: int) -> int:
        epoch, offset = divmod(position, len(self.cache))
        if (seed, epoch) not in self._orders:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
            self._orders[(seed, epoch)] = torch.randperm(len(self.cache), generator=generator).tolist()
        return self._orders[(seed, epoch)][offset]

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, S, S]`` and labels ``[B, 1, S, S]`` of optimizer step ``step`` (counted from 0)."""
        images, labels = [], []
        for position in range(step * batch_size, (step + 1) * batch_size):
            cached = self.cache[self._index(seed, position)]
            self.augment.set_random_state(seed=int(np.random.SeedSequence([seed, position, 1]).generate_state(1)[0]))
            sample = self.augment({key: value.clone() for key, value in cached.items()})
            images.append(torch.as_tensor(sample["image"]))
            labels.append(torch.as_tensor(sample["label"]))
        return torch.stack(images), torch.stack(labels)

    def plain_batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Every pair in dataset order, resized and normalised, not augmented: ``(images, labels)`` batches."""
        for start in range(0, len(self.cache), batch_size):
            chunk = self.cache[start : start + batch_size]
            images = torch.stack([torch.as_tensor(self._normalize(item["image"].float())) for item in chunk])
            yield images, torch.stack([torch.as_tensor(item["label"]).float() for item in chunk])

    def memory_images(self) -> torch.utils.data.Dataset:
        """The training images in dataset order, resized and normalised, not augmented (for the memory refresh)."""
        return _MemoryImages(self.cache, self._normalize)


class _MemoryImages(torch.utils.data.Dataset):
    def __init__(self, cache: Sequence[dict[str, Any]], normalize: NormalizeIntensity) -> None:
        self.cache, self.normalize = cache, normalize

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.cache[index]
        image = torch.as_tensor(self.normalize(item["image"].float()))
        return {"image": image, "label": torch.as_tensor(item["label"]).float()}


# ---------------------------------------------------------------------------------------------------------- training
def run_config(model: str, init: str, seed: int, args: argparse.Namespace, train_fp: str) -> dict[str, Any]:
    """What must match for a checkpoint or result to be continued or reused (everything but the step count).

    Keys added after the first protocol (``amp``, ``bn_refresh``, ``ecrm_options``) are left out at their old
    defaults, so earlier runs keep their configuration."""
    config = {
        "model": model_name(model, args),
        "init": init,
        "seed": seed,
        "backbone": args.backbone,
        "bank_size": args.bank_size,
        "ecrm_channels": args.ecrm_channels,
        "size": args.size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": WEIGHT_DECAY,
        "aux_weight": args.aux_weight if model == "ecrm" else 0.0,
        "augment": args.augment,
        "normalization": args.normalization,
        "val_fraction": args.val_fraction,
        "train_fingerprint": train_fp,
    }
    if args.amp != "fp32":
        config["amp"] = args.amp
    if args.bn_refresh:
        config["bn_refresh"] = True
    options = {k: v for k, v in ecrm_options(args).items() if v != DEFAULT_ECRM_OPTIONS[k]}
    if model == "ecrm" and options:
        config["ecrm_options"] = options
    if model != "ecrm":
        config["ecrm_channels"] = deepest_channels(args.backbone)
    return config


def cosine(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _log(run_dir: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {run_dir.name}: {message}"
    print(line, flush=True)
    with open(run_dir / "train.log", "a") as handle:
        handle.write(line + "\n")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def validation_loss(net: nn.Module, val_data: TrainingData, device: torch.device) -> float:
    """Mean DiceCE of the segmentation output over the validation pairs at the training size (eval mode: ECRM attends
    to its memory as it stands, without writing); the network is left in training mode."""
    loss_fn = DiceCELoss(sigmoid=True)
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in val_data.plain_batches(16):
            images, labels = images.to(device), labels.to(device)
            # the batch mean of per-sample Dice loss + mean CE, over equal-sized samples: weighting by the batch size
            # gives the mean over the whole split, whatever the batching
            total += float(loss_fn(net(images), labels)) * len(images)
            count += len(images)
    net.train()
    return total / max(count, 1)


def plateau(curve: Sequence[Sequence[float]], fraction: float = 0.25) -> dict[str, Any] | None:
    """How much the validation loss still moved over the last ``fraction`` of the steps: the loss at the last point,
    its best over that stretch, and the relative change from the start of the stretch (the last point at or before
    ``(1 - fraction)`` of the steps) to the end."""
    if len(curve) < 3:
        return None
    last_step = curve[-1][0]
    start = [point for point in curve if point[0] <= last_step * (1 - fraction)][-1]
    tail = [loss for step, loss in curve if step >= start[0]]
    return {
        "from_step": start[0],
        "to_step": last_step,
        "loss_from": start[1],
        "loss_to": curve[-1][1],
        "best_in_stretch": min(tail),
        "relative_change": (curve[-1][1] - start[1]) / max(abs(start[1]), 1e-12),
    }


def train(
    net: nn.Module,
    run_dir: Path,
    config: dict[str, Any],
    data: TrainingData,
    args: argparse.Namespace,
    val_data: TrainingData | None = None,
) -> dict[str, Any] | None:
    """Train to ``args.steps`` from the run's checkpoint (if any); the final checkpoint's run state, or ``None`` when
    stopped early by ``--stop-after``. With ``val_data`` and ``--val-every N``, the validation loss at step 0, every
    N steps and at the end is kept in the run state as ``val_loss`` (``[step, loss]`` pairs); it changes nothing in
    the training itself (no random state is drawn, eval mode writes no memory and updates no BatchNorm statistics)."""
    wall_start = time.perf_counter()
    seed, device = config["seed"], torch.device(args.device)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(args.steps))
    state: dict[str, Any] = {
        "step": 0,
        "resumed_from_step": None,
        "losses": [],
        "val_loss": [],
        "segments": [],
        "wall_seconds": 0.0,
    }
    path = run_dir / "checkpoint.pt"
    if path.is_file():
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        if checkpoint["config"] != config:
            sys.exit(f"{path}: made with another configuration; use another --work-dir\n{checkpoint['config']}")
        if checkpoint["step"] > args.steps:
            sys.exit(f"{path}: already at step {checkpoint['step']} > --steps {args.steps}; use another --work-dir")
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"])
        state = checkpoint["state"]
        if state["step"] < args.steps:
            state["resumed_from_step"] = state["step"]
            _log(run_dir, f"resuming from step {state['step']} of {args.steps}")
    loss_fn = DiceCELoss(sigmoid=True)
    aux_weight = config["aux_weight"]
    captured: list[torch.Tensor] = []
    hook = net.ecrm.register_forward_hook(lambda m, a, out: captured.append(out[1])) if aux_weight else None
    start_step, earlier_wall, seconds = state["step"], state["wall_seconds"], 0.0

    def save() -> dict[str, Any]:
        """Checkpoint the run, with this invocation's share of steps and seconds added to the run state."""
        segment = {"start": start_step, "end": state["step"], "train_seconds": round(seconds, 3)}
        saved = {
            **state,
            "segments": state["segments"] + ([segment] if state["step"] > start_step else []),
            "wall_seconds": earlier_wall + time.perf_counter() - wall_start,
        }
        checkpoint = {
            "config": config,
            "step": state["step"],
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "state": saved,
        }
        _atomic_save(checkpoint, path)
        return saved

    track_val = val_data is not None and len(val_data) > 0 and args.val_every > 0
    state.setdefault("val_loss", [])  # checkpoints written before the curve was recorded

    def record_val_loss() -> None:
        if track_val and (not state["val_loss"] or state["val_loss"][-1][0] != state["step"]):
            state["val_loss"].append([state["step"], round(validation_loss(net, val_data, device), 5)])
            _log(run_dir, f"step {state['step']} validation loss {state['val_loss'][-1][1]:.4f}")

    net.train()
    if state["step"] == 0:
        record_val_loss()
    try:
        while state["step"] < args.steps:
            if args.stop_after and state["step"] - start_step >= args.stop_after:
                break
            images, labels = data.batch(seed, state["step"], args.batch_size)
            tic = time.perf_counter()
            images, labels = images.to(device), labels.to(device)
            captured.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.get("amp") == "bf16"):
                logits = net(images, labels=labels) if isinstance(net, ECRMUNet) else net(images)
            loss = loss_fn(logits.float(), labels)
            if hook is not None:
                stride = getattr(net, "memory_stride", net.stride)
                aux = aux_to_label_size(captured.pop().float(), labels.shape[2:], stride)
                loss = loss + aux_weight * loss_fn(aux, labels)
            if not torch.isfinite(loss):
                sys.exit(f"{run_dir.name}: non-finite loss at step {state['step']}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seconds += time.perf_counter() - tic  # batch assembly left out: the same for every model
            state["step"] += 1
            state["losses"].append(round(loss.item(), 5))
            if state["step"] % args.log_every == 0 or state["step"] == args.steps:
                rate = (state["step"] - start_step) * args.batch_size / max(seconds, 1e-9)
                _log(run_dir, f"step {state['step']}/{args.steps} loss {state['losses'][-1]:.4f} ({rate:.2f} img/s)")
            if track_val and (state["step"] % args.val_every == 0 or state["step"] == args.steps):
                record_val_loss()
            if state["step"] % args.ckpt_every == 0 and state["step"] < args.steps:
                save()
    finally:
        if hook is not None:
            hook.remove()
    saved = save()
    if state["step"] < args.steps:
        _log(run_dir, f"stopped at step {state['step']} (--stop-after {args.stop_after}); rerun to continue")
        return None
    return saved


# -------------------------------------------------------------------------------------------------------- evaluation
def evaluate(net: nn.Module, datasets: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """The metric suite of every image at its original size; ``{"summary": {name: row}, "per_image": {...}}``."""
    preprocessing = full_size_eval_transforms(args.size, normalization=args.normalization)
    postprocessing = full_size_eval_postprocessing(preprocessing)
    device = torch.device(args.device)
    net.to(device).eval()
    summary, per_image = {}, {}
    with torch.no_grad():
        for name, items in datasets.items():
            rows = []
            for item, image_id in zip(items, _ids(items)):
                sample = preprocessing(dict(item))
                sample["pred"] = net(sample["image"][None].to(device))[0].cpu()
                sample = postprocessing(sample)
                # back from MONAI's reader layout [1, W, H] to [H, W]
                pred, gt = (torch.as_tensor(sample[key])[0].T.contiguous() for key in ("pred", "gt"))
                row = {"dataset": name, "id": image_id, "height": gt.shape[0], "width": gt.shape[1]}
                rows.append({**row, **score_pair(pred, gt)})
            summary[name] = {key: value for key, value in summarize(rows)[0].items() if key != "dataset"}
            per_image[name] = [
                {k: v for k, v in row.items() if k not in ("dataset", "e_measure_curve")} for row in rows
            ]
    return {"summary": summary, "per_image": per_image}


def light_dice(
    nets: Sequence[nn.Module], datasets: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Mean Dice of the 0.5-thresholded map at original size for each of ``nets`` on every set (cheaper than the
    suite, computed the same way for all), and the mean absolute difference of the first two nets' probabilities at
    the input size (empty when there is one net)."""
    preprocessing = full_size_eval_transforms(args.size, normalization=args.normalization)
    postprocessing = full_size_eval_postprocessing(preprocessing)
    device = torch.device(args.device)
    for net in nets:
        net.to(device).eval()

    def dice(sample: dict[str, Any], logits: torch.Tensor) -> float:
        # the postprocessing applies the sigmoid itself: it takes the logits
        sample = postprocessing({**sample, "pred": logits})
        pred, gt = (torch.as_tensor(sample[key])[0] > 0.5 for key in ("pred", "gt"))
        total = int(pred.sum()) + int(gt.sum())
        return 2.0 * int((pred & gt).sum()) / total if total else 0.0

    dices: list[dict[str, float]] = [{} for _ in nets]
    changes: dict[str, float] = {}
    with torch.no_grad():
        for name, items in datasets.items():
            per_net: list[list[float]] = [[] for _ in nets]
            diffs = []
            for item in items:
                sample = preprocessing(dict(item))
                image = sample["image"][None].to(device)
                logits = [net(image)[0].float().cpu() for net in nets]
                if len(logits) > 1:
                    diffs.append(float((torch.sigmoid(logits[0]) - torch.sigmoid(logits[1])).abs().mean()))
                for scores, logit in zip(per_net, logits):
                    scores.append(dice(sample, logit))
            for index, scores in enumerate(per_net):
                dices[index][name] = float(np.mean(scores)) if scores else float("nan")
            if diffs:
                changes[name] = float(np.mean(diffs))
    return dices, changes


def memory_use(
    net: nn.Module, datasets: dict[str, list[dict[str, Any]]], evaluation: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Whether the network uses its memory: the learned context gate (``context_start="gate"``), the size of the
    context's fusion weights, and what changes when the memory is emptied at test time: mean Dice of the
    0.5-thresholded map at original size with and without the memory (both computed here the same way), and the
    mean absolute change of the probabilities at the network's input size."""
    import copy

    ecrm = net.ecrm
    emptied = copy.deepcopy(net).eval()
    emptied.ecrm.memory.reset()
    (full, empty), changes = light_dice([net, emptied], datasets, args)
    return {
        "context_gate": float(ecrm.context_gate.detach().reshape(-1)[0]) if getattr(ecrm, "gated", False) else None,
        "fuse_context_weight_norm": float(ecrm.fuse_context.weight.detach().norm()),
        "fuse_features_weight_norm": float(ecrm.fuse_features.weight.detach().norm()),
        "dice": full,
        "dice_memory_emptied": empty,
        "mean_abs_prob_change": changes,
    }


# ------------------------------------------------------------------------------------------------------------- runs
def run_one(
    model: str,
    init: str,
    seed: int,
    args: argparse.Namespace,
    datalists: dict[str, Any],
    get_data: Callable[[], TrainingData],
    get_val_data: Callable[[], TrainingData | None] = lambda: None,
) -> dict[str, Any] | None:
    """Train (or continue, or reuse) and evaluate one run; its result, or ``None`` when stopped early."""
    train_fp = fingerprint(datalists["train"])
    config = run_config(model, init, seed, args, train_fp)
    run_dir = Path(args.work_dir) / f"{config['model'].replace('/', '-')}-{init}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, weights_path = run_dir / "result.json", run_dir / "final_model.pt"
    datasets = {VAL: datalists["val"], **datalists["test"]} if datalists["val"] else dict(datalists["test"])
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["config"] == config and result["steps"] == args.steps:
            evaluated = result.get("eval_fingerprints", {})
            missing = {name: items for name, items in datasets.items() if evaluated.get(name) != fingerprint(items)}
            if missing:
                _log(run_dir, f"finished run reused; evaluating the new or changed set(s) {sorted(missing)}")
                net = build_network(model, "random", seed, args)
                net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
                evaluation = evaluate(net, missing, args)
                result["summary"].update(evaluation["summary"])
                result["per_image"].update(evaluation["per_image"])
                result["eval_fingerprints"].update({name: fingerprint(items) for name, items in missing.items()})
                _atomic_save(result, result_path)
            else:
                _log(run_dir, "finished run reused (result.json)")
            return result
    data = get_data()
    net = build_network(model, init, seed, args)
    state = train(net, run_dir, config, data, args, get_val_data())
    if state is None:
        return None
    tic = time.perf_counter()
    refreshed, bn_images = None, None
    bn_effect = None
    if args.bn_refresh:
        # BatchNorm statistics recomputed with the final weights (memory frozen), before the memory refresh; the
        # light Dice before and after it is kept (the random-init before/after table)
        before = None
        if args.bn_effect:
            (before,), _ = light_dice([net], datasets, args)
            net.train()
        loader = torch.utils.data.DataLoader(data.memory_images(), batch_size=16, shuffle=False)
        bn_images = refresh_batchnorm(net, loader, device=torch.device(args.device))
        _log(run_dir, f"BatchNorm statistics recomputed over {bn_images} training images")
        if before is not None:
            bn_effect = {"dice_before": before}
    if model == "ecrm":
        # the ring keeps only the last bank_size prototypes: forwarding the other training images would change nothing
        images = data.memory_images()
        last = torch.utils.data.Subset(images, range(max(0, len(images) - args.bank_size), len(images)))
        loader = torch.utils.data.DataLoader(last, batch_size=16, shuffle=False)
        names = _ids([datalists["train"][index] for index in last.indices])  # folder/stem of each memory case
        refreshed = refresh_memory(net, loader, device=torch.device(args.device), source_names=names)
        _log(run_dir, f"memory refreshed with the final weights from {refreshed} training images")
    _atomic_save(net.state_dict(), weights_path)
    refresh_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    evaluation = evaluate(net, datasets, args)
    eval_seconds = time.perf_counter() - tic
    usage = memory_use(net, datasets, evaluation, args) if model == "ecrm" else None
    if bn_effect is not None:
        (bn_effect["dice_after"],), _ = light_dice([net], datasets, args)
    train_seconds = sum(segment["train_seconds"] for segment in state["segments"])
    losses = state["losses"]
    result = {
        "run": run_dir.name,
        "config": config,
        **{key: config[key] for key in ("model", "init", "seed", "size", "batch_size")},
        "steps": args.steps,
        "resumed_from_step": state["resumed_from_step"],
        "segments": state["segments"],
        "train_images": len(datalists["train"]),
        "val_images": len(datalists["val"]),
        "train_seconds": round(train_seconds, 3),
        "train_images_per_s": round(state["step"] * args.batch_size / max(train_seconds, 1e-9), 3),
        "eval_seconds": round(eval_seconds, 3),
        # every invocation's training (network build, batches, steps, checkpoints), then refresh and evaluation;
        # the data cache, built once per invocation and shared by its runs, is not included
        "wall_seconds": round(state["wall_seconds"] + refresh_seconds + eval_seconds, 3),
        "data_cache_seconds": round(data.cache_seconds, 3),
        "memory_refreshed_images": refreshed,
        "bn_refreshed_images": bn_images,
        "bn_refresh_effect": bn_effect,
        "diagnostics_version": DIAGNOSTICS_VERSION,
        "memory_use": usage,
        "final_loss_mean_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "val_loss": state["val_loss"],
        "val_loss_plateau": plateau(state["val_loss"]),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "network": network_kwargs(args) if model != "flexunet" else {"backbone": args.backbone},
        "summary": evaluation["summary"],
        "eval_fingerprints": {name: fingerprint(items) for name, items in datasets.items()},
        "per_image": evaluation["per_image"],
    }
    _atomic_save(result, result_path)
    dice = ", ".join(f"{name} {row['dice']:.3f}" for name, row in evaluation["summary"].items())
    _log(run_dir, f"done: mDice {dice}; {result['train_images_per_s']:.2f} train img/s")
    return result


# ------------------------------------------------------------------------------------------------------ aggregation
def _mean_sd(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """``[step, mean loss]`` at the steps every curve has (the runs of a group share their validation steps)."""
    if not curves or not all(curves):
        return []
    common = sorted(set.intersection(*({step for step, _ in curve} for curve in curves)))
    losses = [dict((step, loss) for step, loss in curve) for curve in curves]
    return [[step, statistics.fmean(curve[step] for curve in losses)] for step in common]


#: configuration keys that belong to a model rather than to the protocol shared by the compared models
PER_MODEL_KEYS = ("seed", "model", "init", "aux_weight", "bank_size", "ecrm_channels", "ecrm_options")


def _memory_use_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    uses = [run.get("memory_use") for run in runs if run.get("memory_use")]
    if not uses:
        return None
    names = list(uses[0]["dice"])
    gates = [use["context_gate"] for use in uses if use.get("context_gate") is not None]
    return {
        "context_gate": _mean_sd(gates) if gates else None,
        "dice_change_memory_emptied": {
            name: _mean_sd([use["dice_memory_emptied"][name] - use["dice"][name] for use in uses]) for name in names
        },
        "mean_abs_prob_change": {name: _mean_sd([use["mean_abs_prob_change"][name] for use in uses]) for name in names},
    }


def _bn_effect_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    effects = [run.get("bn_refresh_effect") for run in runs if run.get("bn_refresh_effect")]
    if not effects:
        return None
    names = list(effects[0]["dice_before"])
    return {
        when: {name: _mean_sd([effect[when][name] for effect in effects]) for name in names}
        for when in ("dice_before", "dice_after")
    }


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, init, steps, size, ...) with the mean and SD over seeds of every per-run figure."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        protocol = {k: v for k, v in result["config"].items() if k not in PER_MODEL_KEYS}
        own = {k: v for k, v in result["config"].items() if k in PER_MODEL_KEYS and k not in ("seed", "init")}
        key = (result["model"], result["init"], result["steps"], json.dumps(protocol, sort_keys=True), json.dumps(own))
        groups.setdefault(key, []).append(result)
    entries = []
    for (model, init, steps, protocol, _), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        names = list(dict.fromkeys(name for run in runs for name in run["summary"]))
        entries.append(
            {
                "model": model,
                "init": init,
                "steps": steps,
                "protocol": json.loads(protocol),
                "seeds": [run["seed"] for run in runs],
                "train_images": runs[0]["train_images"],
                "aux_weight": runs[0]["config"]["aux_weight"],
                "bank_size": runs[0]["config"]["bank_size"],
                "ecrm_options": runs[0]["config"].get("ecrm_options", {}),
                "memory_use": _memory_use_summary(runs),
                "bn_refresh_effect": _bn_effect_summary(runs),
                "summary": {
                    name: {
                        "images": runs[0]["summary"].get(name, {}).get("images"),
                        **{
                            key: _mean_sd([run["summary"][name][key] for run in runs if name in run["summary"]])
                            for key in SUITE
                        },
                    }
                    for name in names
                },
                "train_images_per_s": _mean_sd([run["train_images_per_s"] for run in runs]),
                "wall_seconds": _mean_sd([run["wall_seconds"] for run in runs]),
                "val_loss": _mean_curve([run.get("val_loss", []) for run in runs]),
                "val_loss_relative_change": _mean_sd(
                    [(run.get("val_loss_plateau") or {}).get("relative_change") for run in runs]
                ),
                "val_dice": _mean_curve([run.get("val_dice", []) for run in runs]),
                "val_dice_relative_change": _mean_sd(
                    [(run.get("val_dice_plateau") or {}).get("relative_change") for run in runs]
                ),
            }
        )
    order = {name: index for index, name in enumerate(MODELS)}

    def rank(entry: dict[str, Any]) -> tuple:
        base = entry["model"].split("/")[0]
        return (order.get(base, len(order)), entry["model"])

    entries.sort(key=lambda e: (json.dumps(e["protocol"], sort_keys=True), e["steps"], e["init"], rank(e)))
    return entries


def compare(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of models trained with the same init and protocol, per test set: the difference of the means
    (first minus second) and whether it is within one SD (|difference| <= the larger of the two SDs)."""
    comparisons = []
    for i, first in enumerate(entries):
        for second in entries[i + 1 :]:
            if (first["init"], first["steps"], first["protocol"]) != (
                second["init"],
                second["steps"],
                second["protocol"],
            ):
                continue
            for name in first["summary"]:
                if name == VAL or name not in second["summary"]:
                    continue
                metrics = {}
                for key in SUITE:
                    a, b = first["summary"][name][key], second["summary"][name][key]
                    if a["mean"] is None or b["mean"] is None:
                        continue
                    sds = [sd for sd in (a["sd"], b["sd"]) if sd is not None]
                    diff = a["mean"] - b["mean"]
                    within = abs(diff) <= max(sds) if len(sds) == 2 else None
                    metrics[key] = {"difference": diff, "within_one_sd": within}
                comparisons.append(
                    {
                        "first": first["model"],
                        "second": second["model"],
                        "init": first["init"],
                        "steps": first["steps"],
                        "dataset": name,
                        "metrics": metrics,
                    }
                )
    return comparisons


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "n/a"
    sd = f" ± {stats['sd']:.{digits}f}" if stats["sd"] is not None else ""
    return f"{stats['mean']:.{digits}f}{sd}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def markdown(entries: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]) -> str:
    lines = [
        "# Polyp segmentation accuracy: ECRMUNet vs no ECRM vs FlexibleUNet (PraNet split)",
        "",
        "Produced by `benchmarks/polyp_accuracy.py` (its `--help` states the protocol). Scores at each test image's "
        "original size; mean ± sample SD over seeds of the per-run dataset means (no ± with one seed).",
        "",
    ]
    if not entries:
        return "\n".join(lines + ["No finished run.", ""])
    protocols = {json.dumps(entry["protocol"], sort_keys=True) for entry in entries}
    for protocol in sorted(protocols):
        p = json.loads(protocol)
        aux = {e["aux_weight"] for e in entries if e["model"].startswith("ecrm") and e["protocol"] == p}
        aux_text = f" + {'/'.join(f'{w:g}' for w in sorted(aux))} x ECRM coarse-mask DiceCE for `ecrm`" if aux else ""
        lines.append(
            f"- Protocol: {p['backbone']} encoder, {p['size']} px, batch {p['batch_size']}, AdamW {p['lr']:g} "
            f"(weight decay {p['weight_decay']:g}) with cosine decay, DiceCE{aux_text}, augmentation "
            f"`{p['augment']}`, normalisation `{p['normalization']}`, validation fraction {p['val_fraction']} of "
            f"the training split, training precision {p.get('amp', 'fp32')}, BatchNorm statistics "
            f"{'recomputed after training' if p.get('bn_refresh') else 'as trained'}."
        )
    variants = [e for e in entries if e["model"].startswith("ecrm")]
    if variants:
        lines += ["", "ECRM models (options that differ from the DCRNet block; memory refreshed after training):", ""]
        for entry in {e["model"]: e for e in variants}.values():
            options = ", ".join(f"{k}={v}" for k, v in entry["ecrm_options"].items()) or "DCRNet block"
            lines.append(f"- `{entry['model']}`: {options}; {entry['bank_size']} slots.")
    lines.append("")
    names = list(dict.fromkeys(name for entry in entries for name in entry["summary"] if name != VAL))
    headers = [TABLE_HEADERS[key] for key in SUITE]
    for name in names:
        images = sorted({e["summary"][name]["images"] for e in entries if name in e["summary"]})
        lines += [f"## {name} ({'/'.join(str(n) for n in images)} images)", ""]
        lines.append("| Model | Init | Steps | Seeds | " + " | ".join(headers) + " |")
        lines.append("|---|---|---:|---|" + "---:|" * len(headers))
        for entry in entries:
            if name in entry["summary"]:
                cells = [_cell(entry["summary"][name][key]) for key in SUITE]
                seeds = ",".join(str(s) for s in entry["seeds"])
                row = [entry["model"], entry["init"], str(entry["steps"]), seeds, *cells]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "## Training cost and validation",
        "",
        "Training images/s: optimizer steps x batch / seconds in forward, loss, backward and step (batch assembly "
        "excluded), per run. Wall time per run: building the network, batches, steps and checkpoints of every "
        "invocation, memory refresh and evaluation (not the data cache, built once per invocation).",
        "",
        "| Model | Init | Steps | Train images | Train img/s | Wall time per run | Val mDice |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        rate = _cell(entry["train_images_per_s"], 2)
        wall = entry["wall_seconds"]
        wall_text = _duration(wall["mean"]) + (f" ± {_duration(wall['sd'])}" if wall["sd"] is not None else "")
        val = _cell(entry["summary"][VAL]["dice"]) if VAL in entry["summary"] else "n/a"
        row = [entry["model"], entry["init"], str(entry["steps"]), str(entry["train_images"]), rate, wall_text, val]
        lines.append("| " + " | ".join(row) + " |")
    lines += _curve_table(
        entries,
        "val_loss",
        "Validation loss (plateau check)",
        "DiceCE of the segmentation output on the validation split at the training size, eval mode, mean over "
        "seeds, at the steps shown. Last column: relative change of the loss over the last quarter of the "
        "steps (mean ± SD over seeds); near 0 means the run had stopped improving.",
        9,
    )
    lines += _curve_table(
        entries,
        "val_dice",
        "Validation mean Dice (plateau check)",
        "The bundle's `val_mean_dice` (`PolypOverlap`, validation split at the training size, eval mode, after "
        "the BatchNorm and memory refreshes) at the end of each epoch, mean over seeds. Last column: relative "
        "change over the last quarter of the steps (mean ± SD over seeds); near 0 means the run had stopped "
        "improving.",
        10,
    )
    used = [entry for entry in entries if entry.get("memory_use")]
    if used:
        names = [n for n in used[0]["memory_use"]["dice_change_memory_emptied"]]
        lines += [
            "",
            "## Does the network use its memory?",
            "",
            "Learned context gate (`context_start=gate` only), and what emptying the memory at test time does: change "
            "of mean Dice (0.5 threshold, original size) and mean absolute change of the probabilities, per set "
            "(mean over seeds). A memory the network ignores changes nothing.",
            "",
            "| Model | Init | Gate | "
            + " | ".join(f"ΔDice {n}" for n in names)
            + " | "
            + " | ".join(f"Δprob {n}" for n in names)
            + " |",
            "|---|---|---:|" + "---:|" * (2 * len(names)),
        ]
        for entry in used:
            use = entry["memory_use"]
            gate = _cell(use["context_gate"], 4) if use["context_gate"] else "n/a"
            deltas = [_cell(use["dice_change_memory_emptied"][n], 3) for n in names]
            probs = [_cell(use["mean_abs_prob_change"][n], 4) for n in names]
            lines.append("| " + " | ".join([entry["model"], entry["init"], gate, *deltas, *probs]) + " |")
    refreshed = [entry for entry in entries if entry.get("bn_refresh_effect")]
    if refreshed:
        names = list(refreshed[0]["bn_refresh_effect"]["dice_before"])
        lines += [
            "",
            "## BatchNorm refresh: mean Dice before -> after",
            "",
            "Mean Dice (0.5 threshold, original size) of the weights as trained (BatchNorm running statistics from "
            "training) and after recomputing the statistics with the final weights over the training images.",
            "",
            "| Model | Init | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for entry in refreshed:
            effect = entry["bn_refresh_effect"]
            cells = [f"{effect['dice_before'][n]['mean']:.3f} -> {effect['dice_after'][n]['mean']:.3f}" for n in names]
            lines.append("| " + " | ".join([entry["model"], entry["init"], *cells]) + " |")
    lines += [
        "",
        "## Differences within one standard deviation",
        "",
        "A difference of means is *within one SD* when its size is at most the larger of the two models' SDs over "
        "seeds: at this number of seeds such a difference is not distinguishable from seed noise. Delta = first "
        "model minus second; MAE is lower-is-better.",
        "",
        "| Init | Steps | Test set | First vs second | Delta mDice | mDice within 1 SD? | Suite metrics within 1 SD |",
        "|---|---:|---|---|---:|---|---|",
    ]
    for comparison in comparisons:
        pair, delta, within_dice, count = comparison_cells(comparison)
        row = [comparison["init"], str(comparison["steps"]), comparison["dataset"], pair, delta, within_dice, count]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _curve_table(entries: Sequence[dict[str, Any]], key: str, title: str, text: str, columns: int) -> list[str]:
    """The markdown lines of a validation curve table (``key``: ``val_loss`` or ``val_dice``, with its
    ``<key>_relative_change``) at up to ``columns`` evenly spread steps; nothing when no entry has the curve."""
    curves = [entry for entry in entries if entry.get(key)]
    if not curves:
        return []
    steps = sorted({step for entry in curves for step, _ in entry[key]})
    shown = (
        steps if len(steps) <= columns else [steps[round(i * (len(steps) - 1) / (columns - 1))] for i in range(columns)]
    )
    lines = [
        "",
        f"## {title}",
        "",
        text,
        "",
        "| Model | Init | " + " | ".join(f"step {step}" for step in shown) + " | Change, last quarter |",
        "|---|---|" + "---:|" * (len(shown) + 1),
    ]
    for entry in curves:
        at = dict((step, value) for step, value in entry[key])
        cells = [f"{at[step]:.3f}" if step in at else "n/a" for step in shown]
        change = entry[f"{key}_relative_change"]
        change_text = "n/a" if change["mean"] is None else f"{100 * change['mean']:+.1f} %"
        if change["sd"] is not None:
            change_text += f" ± {100 * change['sd']:.1f}"
        lines.append("| " + " | ".join([entry["model"], entry["init"], *cells, change_text]) + " |")
    return lines


def comparison_cells(comparison: dict[str, Any]) -> tuple[str, str, str, str]:
    """A comparison's table cells: the pair, the mean Dice difference, whether it is within one SD, and how many
    suite metrics are (naming those beyond)."""
    metrics = comparison["metrics"]
    dice = metrics.get("dice")
    verdicts = [m["within_one_sd"] for m in metrics.values()]
    if not dice or None in verdicts:
        within_dice, count = "n/a (one seed)", "n/a"
    else:
        within_dice = "yes" if dice["within_one_sd"] else "**no**"
        outside = [TABLE_HEADERS[k] for k, m in metrics.items() if not m["within_one_sd"]]
        count = f"{sum(verdicts)}/{len(verdicts)}" + (f" (beyond: {', '.join(outside)})" if outside else "")
    delta = f"{dice['difference']:+.3f}" if dice else "n/a"
    return f"{comparison['first']} vs {comparison['second']}", delta, within_dice, count


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run`` (an accuracy-protocol run folder) or ``--model`` (any model file with its record), for the scripts
    that evaluate trained weights; :func:`model_file` resolves them."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="an accuracy-protocol run folder (its final_model.pt)")
    source.add_argument("--model", type=Path, help="a model file with its record, e.g. a bundle's models/model.pt")


def model_file(args: argparse.Namespace) -> Path:
    """The model file of :func:`add_model_arguments`' options."""
    return args.model or args.run / "final_model.pt"


def gather(work_dir: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(work_dir.glob("*/result.json")):
        results.append(json.loads(path.read_text()))
    return results


def save_best(results: Sequence[dict[str, Any]], path: Path, work_dir: Path) -> dict[str, Any]:
    """Write the ECRMUNet run with the best validation mDice as a flat state dict; its description. A bundle-study
    run (``benchmarks/bundle_study.py``) gives its bundle's ``models/model.pt`` as it is. The model record is written
    beside ``path`` (``<stem>.json``, :func:`monai_ecrm.record.write_record`)."""
    candidates = [r for r in results if r["model"].startswith("ecrm") and VAL in r["summary"]]
    if not candidates:
        sys.exit("--save-best: no finished ecrm run with a validation split (--val-fraction > 0) in the work dir")
    best = max(candidates, key=lambda r: (r["summary"][VAL]["dice"], -r["seed"]))
    run_dir = work_dir / best["run"]
    bundle_model = run_dir / "polyp_ecrm" / "models" / "model.pt"
    source = run_dir / "final_model.pt"
    if not source.is_file() and bundle_model.is_file():  # a run of benchmarks/bundle_study.py
        source = bundle_model
    record = read_record(source)
    if record is None:
        sys.exit(f"--save-best: {source} has no model record (model.json or the run's result.json)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if source == bundle_model:
        shutil.copyfile(source, path)
    else:
        torch.save(torch.load(source, map_location="cpu", weights_only=True), path)
    write_record(path, record)  # self-describing, and no stale record of another network left beside it
    network = record["network"]["kwargs"]  # every construction argument, resolved
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {
        "path": str(path),
        "sha256": digest,
        "bytes": path.stat().st_size,
        "run": best["run"],
        "selected_by": f"best validation mDice over {len(candidates)} ecrm run(s) ({best['val_images']} images held "
        "out of the training split; the test sets played no part)",
        "val_dice": best["summary"][VAL]["dice"],
        "steps": best["steps"],
        "network": network,
        "spatial_size": best["size"],
        "normalization": best["config"]["normalization"],
        # what `python -m monai.bundle run` with the bundle's configs needs to build this network and preprocess for it
        "bundle_override_values": {
            "backbone": network["backbone"],
            "bank_size": network["bank_size"],
            "use_icrm": network["use_icrm"],
            "network_def#ecrm_channels": network["ecrm_channels"],
            "network_def#key_channels": network["key_channels"],
            # the bundle's ECRM options are its defaults' (the study's variant): the run's are stated, whatever they are
            **{key: network[key] for key in BUNDLE_ECRM_KEYS},
            "spatial_size": best["size"],
        },
    }
    info["bundle_overrides"] = " ".join(f"--{key} {value}" for key, value in info["bundle_override_values"].items())
    print(f"best ECRMUNet ({best['run']}, val mDice {info['val_dice']:.4f}) written to {path}")
    print(f"  {info['bytes']} bytes, sha256 {digest}")
    print(f"  network: {json.dumps(network)}; bundle overrides: {info['bundle_overrides']}")
    return info


def rediagnose(args: argparse.Namespace) -> None:
    """Recompute every finished run's diagnostics (``memory_use`` from ``final_model.pt``; ``bn_refresh_effect``
    from the end-of-training ``checkpoint.pt``, written before the refreshes, against ``final_model.pt``) with the
    current code, and rewrite their ``result.json``. The scores and training are untouched."""
    work_dir = Path(args.work_dir)
    datalists = load_datalists(args)
    datasets = {VAL: datalists["val"], **datalists["test"]} if datalists["val"] else dict(datalists["test"])
    for path in sorted(work_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        if result.get("diagnostics_version") == DIAGNOSTICS_VERSION:
            continue
        config = result["config"]
        run_args = argparse.Namespace(**vars(args))
        options = {**DEFAULT_ECRM_OPTIONS, **config.get("ecrm_options", {})}
        for key, value in options.items():
            setattr(run_args, key, value)
        run_args.bank_size, run_args.ecrm_channels = config["bank_size"], config["ecrm_channels"]
        run_args.size, run_args.backbone = config["size"], config["backbone"]
        base = config["model"].split("/")[0]
        final = build_network(base, "random", config["seed"], run_args)
        final.load_state_dict(torch.load(path.parent / "final_model.pt", map_location="cpu", weights_only=True))
        if base == "ecrm":
            result["memory_use"] = memory_use(final, datasets, {}, run_args)
        if config.get("bn_refresh") and (path.parent / "checkpoint.pt").is_file():
            trained = build_network(base, "random", config["seed"], run_args)
            checkpoint = torch.load(path.parent / "checkpoint.pt", map_location="cpu", weights_only=False)
            trained.load_state_dict(checkpoint["model"])
            (before, after), _ = light_dice([trained, final], datasets, run_args)
            result["bn_refresh_effect"] = {"dice_before": before, "dice_after": after}
        result["diagnostics_version"] = DIAGNOSTICS_VERSION
        _atomic_save(result, path)
        _log(path.parent, "diagnostics recomputed")


def write_outputs(args: argparse.Namespace) -> None:
    work_dir = Path(args.work_dir)
    results = gather(work_dir)
    entries = aggregate(results)
    comparisons = compare(entries)
    report = {
        "work_dir": str(work_dir.resolve()),
        "runs": [{k: v for k, v in r.items() if k != "per_image"} for r in results],
        "aggregate": entries,
        "comparisons": comparisons,
    }
    if args.save_best:
        report["best_model"] = save_best(results, Path(args.save_best), work_dir)
    out = Path(args.out) if args.out else work_dir / "results.json"
    out_md = Path(args.out_md) if args.out_md else work_dir / "results.md"
    for path in (out, out_md):
        path.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out_md.write_text(markdown(entries, comparisons))
    print(f"{len(results)} finished run(s) merged: {out}, {out_md}")


# -------------------------------------------------------------------------------------------------------------- CLI
def _list(kind: type, choices: Sequence[str] | None = None):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if choices is not None and any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}, got {text!r}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", type=Path, default=DEFAULT_DATA, help="data root in the ../shared/data layout (default: %(default)s)")
    add("--extra", action="append", default=[], metavar="NAME=PATH", help="extra test set (images/, masks/); repeat")
    add(
        "--models",
        type=_list(str, MODELS),
        default=list(MODELS),
        help="models, comma list (default: ecrm,no_ecrm,flexunet)",
    )
    add(
        "--init",
        type=_list(str, INITS),
        default=list(INITS),
        help="encoder init, comma list (default: pretrained,random)",
    )
    add("--seeds", type=_list(int), default=[0, 1, 2], help="seeds, comma list (default: 0,1,2; >= 3 for a SD)")
    add("--steps", type=int, default=2000, help="optimizer steps per run (default %(default)s)")
    add("--size", type=int, default=256, help="training and network input size in px (default %(default)s)")
    add("--batch-size", type=int, default=8, help="training batch (default %(default)s)")
    add("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine decay to 0 (default %(default)s)")
    add("--aux-weight", type=float, default=0.4, help="weight of the ECRM coarse-mask loss (default %(default)s)")
    add(
        "--augment",
        choices=("flips", "full"),
        default="flips",
        help="train preset: flips only (default), or all its jitter",
    )
    add("--backbone", default="efficientnet-lite0", help="encoder of every model (default %(default)s)")
    add("--bank-size", type=int, default=20, help="ECRM memory slots (default %(default)s)")
    add(
        "--ecrm-channels",
        type=int,
        default=None,
        help="ECRM output channels (default: the channels of the encoder level ECRM works on)",
    )
    add("--variant", default="", help="name of the ECRM variant: run folder and model name `ecrm/<variant>`")
    add("--memory-stride", type=int, default=None, help="ECRM level by its stride (default: deepest, 32)")
    add("--context-start", choices=("full", "gate", "zero"), default="full", help="ECRM context start (default full)")
    add("--prototypes", choices=("coarse", "label"), default="coarse", help="ECRM prototypes (default coarse)")
    add("--background-tokens", action="store_true", help="ECRM: background prototype in every slot")
    add(
        "--attend-first",
        choices=("auto", "yes", "no"),
        default="auto",
        help="ECRM: attend before writing in training (auto: yes for label prototypes)",
    )
    add(
        "--bn-effect",
        action="store_true",
        help="with --bn-refresh: also record the 0.5-threshold mDice before and after the BatchNorm refresh",
    )
    add(
        "--supervise-attention",
        action="store_true",
        help="ECRM: the coarse-mask loss trains the attention's foreground log-odds (needs label prototypes and "
        "background tokens)",
    )
    add("--amp", choices=("fp32", "bf16"), default="fp32", help="training precision: bf16 autocast (CPU AMX) or fp32")
    add(
        "--bn-refresh",
        action="store_true",
        help="recompute BatchNorm statistics with the final weights before the memory refresh and evaluation",
    )
    add("--val-fraction", type=float, default=0.1, help="training pairs held out for --save-best (default 0.1)")
    add("--work-dir", type=Path, default=Path("polyp_accuracy_runs"), help="run folders (default ./%(default)s)")
    add("--ckpt-every", type=int, default=100, help="checkpoint every N steps, and at the end (default %(default)s)")
    add(
        "--stop-after",
        type=int,
        default=0,
        help="stop each run after N steps in this invocation, checkpointed (time slices; 0: to the end)",
    )
    add("--log-every", type=int, default=25, help="log every N steps (default %(default)s)")
    add(
        "--val-every",
        type=int,
        default=50,
        help="validation loss every N steps, at step 0 and at the end, for the plateau check (0: never; default "
        "%(default)s)",
    )
    add("--merge-only", action="store_true", help="train nothing: merge every result.json of the work dir")
    add(
        "--rediagnose",
        action="store_true",
        help="train nothing: recompute every finished run's memory-use and BatchNorm-refresh diagnostics, then merge",
    )
    add("--out", default=None, help="merged JSON (default <work-dir>/results.json)")
    add("--out-md", default=None, help="markdown table (default <work-dir>/results.md)")
    add("--save-best", default=None, metavar="PATH", help="write the best ecrm run (validation mDice) as model.pt")
    add("--max-train", type=int, default=0, help="smoke runs: use the first N training pairs (0: all)")
    add("--max-test", type=int, default=0, help="smoke runs: the first N pairs of each test set and val (0: all)")
    add("--device", default="cpu", help="torch device (default %(default)s)")
    add(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "2")),
        help="torch threads (default: $OMP_NUM_THREADS or 2)",
    )
    args = parser.parse_args(argv)
    args.attend_first = {"auto": None, "yes": True, "no": False}[args.attend_first]
    if args.ecrm_channels is None:
        args.ecrm_channels = deepest_channels(args.backbone, args.memory_stride)
    args.normalization = normalization_for_backbone(args.backbone)
    if min(args.steps, args.size, args.batch_size, args.ckpt_every, args.log_every) < 1:
        parser.error("--steps, --size, --batch-size, --ckpt-every and --log-every must be >= 1")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rediagnose:
        rediagnose(args)
    elif not args.merge_only:
        datalists = load_datalists(args)
        sizes = {name: len(items) for name, items in datalists["test"].items()}
        print(f"train {len(datalists['train'])}, val {len(datalists['val'])}, test {sizes}", flush=True)
        cache: list[TrainingData] = []

        def get_data() -> TrainingData:
            if not cache:
                cache.append(TrainingData(datalists["train"], args))
                print(f"training pairs cached at {args.size} px in {cache[0].cache_seconds:.1f} s", flush=True)
            return cache[0]

        val_cache: list[TrainingData] = []

        def get_val_data() -> TrainingData | None:
            if not datalists["val"] or args.val_every < 1:
                return None
            if not val_cache:
                val_cache.append(TrainingData(datalists["val"], args))
            return val_cache[0]

        for seed in args.seeds:
            for init in args.init:
                for model in args.models:
                    run_one(model, init, seed, args, datalists, get_data, get_val_data)
    write_outputs(args)


if __name__ == "__main__":
    main()
