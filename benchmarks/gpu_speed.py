"""Whole-network speed on one CUDA GPU (GPU issue #25, item 3), in one run; prints one JSON object.

For each of ``--backbones`` (default ``efficientnet-lite0,resnet34``) two networks side by side:

* ``ecrm_unet``: ``ECRMUNet(backbone=B, bank_size=20)`` with ECRMUNet's default ECRM and a FILLED memory: written
  once in train mode from a random batch of ``bank_size`` images and random labels (``net(x, labels=y)``, one slot
  an image), then eval;
* ``no_ecrm``: ``ECRMUNet(backbone=B, use_ecrm=False)``, the same network with an identity in place of ECRM (same
  encoder, same decoder): the difference is the ECRM block alone.

Measured at ``--size`` (352):

* inference (eval, ``torch.no_grad()``): frames/s at batch 1 and images/s at batch 16 (``--batches``) in fp32, bf16
  autocast and fp16 autocast (``--precisions``), each in the contiguous (NCHW) layout and in channels_last (model and
  input; ``--channels-last off`` skips it), and which layout helps is recorded; then
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) in ``--compile-precision`` (bf16) at ``--compile-batches``,
  in the layout that was faster in eager at that precision and batch; a compile that fails (or runs past
  ``--compile-timeout-s``) is recorded with its reason, and the eager figures stand for it;
* training (train mode): images/s at batch 8 and 16 (``--train-batches``) in bf16 autocast, both layouts: forward
  (ECRM passes the labels: they write its memory), DiceCE(sigmoid) on the logits plus ``--aux-weight`` (0.4) x
  DiceCE on ECRM's coarse mask (captured by a forward hook on ``net.ecrm``, upsampled to the label with
  ``aux_to_label_size``, as ``AuxSupervisionHandler`` does; the network without ECRM has no aux term, as in the
  bundle), backward, AdamW step (lr 1e-3, weight decay 0.01);
* ECRM's overhead: ``100 * (no_ecrm per_s / ecrm_unet per_s - 1)`` for every figure; the issue's targets (within
  10 %) at batch 1 and in training, each network in its faster layout;
* the eval-time memory cache of ECRM (``net.ecrm.memory_cache = True / False``) at batch 1, fp32 and bf16, side by
  side on the one network;
* ``--extra-backbones`` (efficientnet-lite1, efficientnet-lite2): eager inference, both networks, when registered in
  MONAI's ``FLEXUNET_BACKBONE``; the JSON says which were skipped because they are not;
* ``--kvasir DIR --checkpoint MODEL``: mean Dice of the model on the Kvasir test set in fp32, bf16 autocast and
  compiled (``--compile-precision``), the differences to fp32 (target: within 0.005), per frame too. ``DIR`` is a
  PraNet root (``pranet_split/test_kvasir.txt`` and ``kvasir_seg/{images,masks}``, e.g. ``.gpu/data``) or a folder
  of ``images/`` and ``masks/`` pairs; ``MODEL`` a model folder (``model_fp16.pt`` or ``model.pt`` and
  ``model.json``, as in ``../shared/models``) or a model file. Each frame is preprocessed as at evaluation
  (``full_size_eval_transforms`` at the record's size and normalisation) and scored at its own size (Dice of the
  min-max normalised sigmoid map > 0.5, the ``evaluate.json`` convention).

Timing (the side-by-side approach of ``network_speed.py``): the networks compared (ECRM / no ECRM; cache on / off)
are warmed up, then timed in ``--repeats`` rounds, the order rotating each round; in a round each runs one block of
``--inner`` (``--train-inner``) calls between a ``torch.cuda.synchronize()`` and a CUDA event pair (perf_counter on
the CPU). A figure is the median over the rounds of block time / calls (``per_s`` = batch / that), ``min_ms`` the
fastest round. cuDNN autotuning is off by default (torch's default; ``--cudnn-benchmark``); fp32 convolutions may use
TF32 (torch's default, recorded).

Time: everything runs within ``--budget-s`` (270 s from the start of the measurements; what does not fit is skipped
and listed under ``skipped``); the eager figures first, the accuracy check's eager part, then the compiled figures
(batch 1 of every backbone before batch 16; a pair of compiles only with 2 x ``--compile-min-s`` left, each given up
after ``--compile-timeout-s`` or 30 s past the budget), the compiled accuracy last. ``--out`` is rewritten after every
phase, so a run cut short still leaves what it measured. ``--quick``: fewer repeats and compiles (about a minute).

Without CUDA it prints one line to stderr and exits with status 2 (``--allow-cpu`` runs the same code on the CPU,
for tests; those figures are not GPU figures).

Usage (on the GPU machine, see ../shared/tools/gpu/README.md)::

    . .gpu/env.sh && python benchmarks/gpu_speed.py --out $OUT/gpu_speed.json \\
        [--kvasir .gpu/data --checkpoint .gpu/models/ecrm-seed0]
    python benchmarks/gpu_speed.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REFUSAL = "gpu_speed.py: needs a CUDA device (torch.cuda.is_available() is False); nothing measured"
MODELS = ("ecrm_unet", "no_ecrm")
LAYOUTS = ("contiguous", "channels_last")
PRECISIONS = ("fp32", "bf16", "fp16")
OVERHEAD_TARGET_PCT = 10.0
DICE_TARGET = 0.005
ALIASES = {f"lite{i}": f"efficientnet-lite{i}" for i in range(5)}
#: settings that ``--quick`` changes (an option given explicitly wins)
DEFAULTS = {
    "repeats": 10,
    "warmup": 5,
    "inner": 10,
    "train_repeats": 8,
    "train_warmup": 3,
    "train_inner": 2,
    "compile_batches": "1,16",
    "budget_s": 270.0,
}
QUICK = {
    "repeats": 3,
    "warmup": 2,
    "inner": 3,
    "train_repeats": 3,
    "train_warmup": 1,
    "train_inner": 1,
    "compile_batches": "1",
    "budget_s": 120.0,
}


# ---------------------------------------------------------------------------------------------------------- options
def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str]:
    names = []
    for part in text.split(","):
        part = part.strip()
        if part:
            names.append(ALIASES.get(part, part))
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet-lite0,resnet34", help="backbones measured in full")
    parser.add_argument(
        "--extra-backbones",
        default="efficientnet-lite1,efficientnet-lite2",
        help="backbones measured in eager inference only, when registered ('' for none)",
    )
    parser.add_argument("--size", type=int, default=352, help="square input size (352)")
    parser.add_argument("--batches", default="1,16", help="inference batch sizes (1,16)")
    parser.add_argument("--train-batches", default="8,16", help="training batch sizes (8,16)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="eager inference precisions (fp32,bf16,fp16)")
    parser.add_argument(
        "--channels-last", choices=("auto", "off"), default="auto", help="auto: time both layouts; off: NCHW only"
    )
    parser.add_argument(
        "--compile-batches",
        default=None,
        help="compiled inference batches (1,16; quick: 1; '' none: no compile at all, the accuracy check's neither)",
    )
    parser.add_argument("--compile-precision", choices=PRECISIONS, default="bf16", help="autocast of compiled runs")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (reduce-overhead)")
    parser.add_argument(
        "--compile-min-s", type=float, default=60.0, help="start a compiled pair only with 2 x this left (60)"
    )
    parser.add_argument(
        "--compile-timeout-s", type=float, default=150.0, help="give a compile up (SIGALRM) after this (150)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per inference figure (10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed inference calls per network first (5)")
    parser.add_argument("--inner", type=int, default=None, help="inference calls per timed block (10; quick 3)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed rounds per training figure (8)")
    parser.add_argument("--train-warmup", type=int, default=None, help="untimed training steps per network (3)")
    parser.add_argument("--train-inner", type=int, default=None, help="training steps per timed block (2)")
    parser.add_argument("--bank-size", type=int, default=20, help="ECRM memory slots (20)")
    parser.add_argument("--aux-weight", type=float, default=0.4, help="weight of the coarse-mask loss (0.4)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for all measurements (270; quick 120)")
    parser.add_argument("--kvasir", type=Path, default=None, help="Kvasir test set: PraNet root or images/+masks/")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model folder or file for --kvasir")
    parser.add_argument("--max-images", type=int, default=0, help="score only the first N Kvasir frames (0: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (rewritten after each phase)")
    parser.add_argument("--quick", action="store_true", help="short run: fewer repeats, compile at batch 1 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU without CUDA (tests only)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kvasir is not None and args.checkpoint is None:
        parser.error("--kvasir needs --checkpoint (the model whose Dice is compared across precisions)")
    return args


# ------------------------------------------------------------------------------------------------------------ timing
class Budget:
    """The run's deadline."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = float(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(
    entries: Mapping[str, Callable[[], Any]],
    device: Any,
    warmup: int,
    repeats: int,
    inner: int,
    before: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each entry: ``warmup`` untimed calls each, then ``repeats`` rounds, the order rotating
    each round, one timed block of ``inner`` calls per entry and round (``before[name]()`` runs untimed before each
    of that entry's blocks). CUDA: a synchronize, then the block between two CUDA events; CPU: perf_counter."""
    import torch

    names = list(entries)
    before = before or {}
    for name in names:
        if name in before:
            before[name]()
        for _ in range(warmup):
            entries[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cuda = device.type == "cuda"
    for r in range(max(1, repeats)):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in before:
                before[name]()
            fn = entries[name]
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                begin = time.perf_counter()
                for _ in range(inner):
                    fn()
                seconds = time.perf_counter() - begin
            times[name].append(seconds / inner)
    return times


def figure(times: Sequence[float], batch: int, **fields: Any) -> dict[str, Any]:
    """One run's entry: per_s (batch / median seconds per call), median and fastest round in ms, the rounds."""
    median = statistics.median(times)
    return {
        **fields,
        "batch": batch,
        "per_s": round(batch / median, 2),
        "median_ms": round(1000 * median, 4),
        "min_ms": round(1000 * min(times), 4),
        "rounds_ms": [round(1000 * t, 4) for t in times],
    }


def run_key(model: str, backbone: str, mode: str, precision: str, layout: str, batch: int, compiled: bool) -> str:
    return f"{model}/{backbone}/{mode}/{precision}{'+compile' if compiled else ''}/{layout}/b{batch}"


def overhead_pct(ours_per_s: float, base_per_s: float) -> float:
    """Slowdown of ``ours`` against ``base`` in percent, from throughputs (time ratio - 1)."""
    return round(100.0 * (base_per_s / ours_per_s - 1.0), 2)


# ----------------------------------------------------------------------------------------------------------- models
def build(model: str, backbone: str, bank_size: int, size: int, device: Any, seed: int) -> Any:
    """``ecrm_unet`` (memory filled: one train-mode forward of ``bank_size`` random images with random labels) or
    ``no_ecrm``, in eval mode on ``device``."""
    import torch

    from monai_ecrm.networks.nets import ECRMUNet

    torch.manual_seed(seed)
    net = ECRMUNet(backbone=backbone, bank_size=bank_size, use_ecrm=model == "ecrm_unet").to(device)
    if model == "ecrm_unet":
        side = min(size, 128)  # the prototypes are per image: any size writes one slot each
        x = torch.randn(bank_size, 3, side, side, device=device)
        y = (torch.rand(bank_size, 1, side, side, device=device) > 0.5).float()
        net.train()
        with torch.no_grad():
            net(x, labels=y)
    return net.eval()


def memory_filled(net: Any) -> int | None:
    bank = getattr(getattr(net, "ecrm", None), "memory", None)
    return None if bank is None else int(bank.filled)


def _autocast(device: Any, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _layout(net: Any, layout: str) -> Any:
    import torch

    return net.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _input(batch: int, size: int, device: Any, layout: str, seed: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def inference_call(net: Any, x: Any, device: Any, precision: str, compiled: bool = False) -> Callable[[], Any]:
    import torch

    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None) if compiled else None

    def call() -> None:
        if mark is not None:
            mark()
        with torch.no_grad(), _autocast(device, precision):
            net(x)

    return call


def training_call(
    net: Any, batch: int, size: int, device: Any, precision: str, layout: str, aux_weight: float, seed: int
) -> Callable[[], Any]:
    """One training step of ``net`` (train mode; its own AdamW): DiceCE + ``aux_weight`` x DiceCE of ECRM's coarse
    mask (forward hook on ``net.ecrm``) when it has ECRM."""
    import torch
    from monai.losses import DiceCELoss

    from monai_ecrm.handlers.aux_supervision import aux_to_label_size
    from monai_ecrm.networks.blocks import ECRM

    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = DiceCELoss(sigmoid=True)
    x = _input(batch, size, device, layout, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    y = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float().to(device)
    has_ecrm = isinstance(net.ecrm, ECRM)
    stride = getattr(net, "memory_stride", net.stride)  # ECRM's level, as AuxSupervisionHandler's aux_stride="auto"
    captured: list = []
    if has_ecrm:
        net.ecrm.register_forward_hook(lambda module, args, output: captured.append(output[1]))

    def call() -> None:
        captured.clear()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            logits = net(x, labels=y) if has_ecrm else net(x)
            loss = loss_fn(logits.float(), y)
            if has_ecrm:
                aux = aux_to_label_size(captured[-1].float(), y.shape[2:], stride)
                loss = loss + aux_weight * loss_fn(aux, y)
        loss.backward()
        optimizer.step()

    return call


# ------------------------------------------------------------------------------------------------------- compiling
class _CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise :class:`_CompileTimeout` in the main thread after ``seconds`` (POSIX; a no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _CompileTimeout(f"compile gave up after {seconds:g} s (--compile-timeout-s)")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _graph_breaks() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters

        return dict(counters["graph_break"])
    except Exception:  # noqa: BLE001
        return {}


def _cudagraph_skips() -> int:
    """Graphs inductor ran without CUDA graphs so far (its ``cudagraph_skips`` counter; 0 where it has none)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:  # noqa: BLE001
        return 0


def _configure_dynamo() -> None:
    import torch

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # several networks share ECRMUNet.forward's code object
        if hasattr(config, name):
            setattr(config, name, max(64, getattr(config, name)))


def compile_and_warm(net: Any, call_of: Callable[[Any], Callable[[], Any]], mode: str, timeout_s: float) -> dict:
    """``torch.compile(net, mode=mode)``, then three calls (compile, CUDA-graph warm-up and record); returns
    ``{"status": "ok", "call", "compile_s", "graph_breaks", ...}`` or ``{"status": "failed", "reason"}``."""
    import torch

    before, skips = _graph_breaks(), _cudagraph_skips()
    start = time.perf_counter()
    try:
        with _alarm(timeout_s):
            compiled = torch.compile(net, mode=mode)
            call = call_of(compiled)
            call()
            first = time.perf_counter() - start
            call()
            call()
    except Exception as error:  # noqa: BLE001  (any compile failure falls back to eager, recorded)
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return {"status": "failed", "reason": reason[:400], "fallback": "eager (see the eager figures)"}
    after = _graph_breaks()
    new = {reason: count - before.get(reason, 0) for reason, count in after.items() if count > before.get(reason, 0)}
    return {
        "status": "ok",
        "call": call,
        "module": compiled,
        "compile_s": round(first, 2),
        "warm_s": round(time.perf_counter() - start, 2),
        "graph_breaks": sum(new.values()),
        "graph_break_reasons": [reason[:200] for reason in list(new)[:5]],
        "cudagraph_skips": _cudagraph_skips() - skips,
    }


# ---------------------------------------------------------------------------------------------------------- report
def _get(tree: dict, *keys: str) -> dict:
    for key in keys:
        tree = tree.setdefault(key, {})
    return tree


def assemble_report(
    header: Mapping[str, Any],
    runs: Mapping[str, Mapping[str, Any]],
    extras: Mapping[str, Any] | None = None,
    target_pct: float = OVERHEAD_TARGET_PCT,
) -> dict[str, Any]:
    """The JSON object: ``header`` (device, versions, settings), a ``summary`` per backbone built from ``runs`` (the
    flat figures, keyed by :func:`run_key`, each with ``model``, ``backbone``, ``mode``, ``precision``, ``layout``,
    ``batch``, ``compiled``, ``per_s``), ECRM's overheads, the layouts that help, the ``targets``, the ``runs`` and
    ``extras`` (``memory_cache``, ``compile``, ``accuracy``, ``skipped``, ``errors``, ... copied as they are)."""
    summary: dict[str, Any] = {}
    best: dict[tuple, tuple[float, str]] = {}  # (backbone, mode, model, precision+compile, batch) -> (per_s, layout)
    for run in runs.values():
        if run["mode"] not in ("inference", "training"):
            continue
        variant = run["precision"] + ("+compile" if run.get("compiled") else "")
        label = variant + ("/channels_last" if run["layout"] == "channels_last" else "")
        per = "inference_per_s" if run["mode"] == "inference" else "training_images_per_s"
        _get(summary, run["backbone"], per, run["model"], label)[f"b{run['batch']}"] = run["per_s"]
        slot = (run["backbone"], run["mode"], run["model"], variant, run["batch"])
        if slot not in best or run["per_s"] > best[slot][0]:
            best[slot] = (run["per_s"], run["layout"])
    # which layout helps: channels_last per_s against contiguous, same network, precision and batch
    for run in runs.values():
        if run["mode"] not in ("inference", "training") or run["layout"] != "channels_last" or run.get("compiled"):
            continue
        twin = run_key(run["model"], run["backbone"], run["mode"], run["precision"], "contiguous", run["batch"], False)
        if twin in runs:
            gain = round(100.0 * (run["per_s"] / runs[twin]["per_s"] - 1.0), 2)
            gains = _get(summary, run["backbone"], "channels_last_gain_pct", run["mode"], run["model"])
            _get(gains, run["precision"])[f"b{run['batch']}"] = gain
    # ECRM's overhead: same variant, same layout; and each network in its faster layout
    targets: dict[str, Any] = {}
    for run in runs.values():
        if run["model"] != "ecrm_unet" or run["mode"] not in ("inference", "training"):
            continue
        base_key = run_key(
            "no_ecrm",
            run["backbone"],
            run["mode"],
            run["precision"],
            run["layout"],
            run["batch"],
            bool(run.get("compiled")),
        )
        if base_key not in runs:
            continue
        variant = run["precision"] + ("+compile" if run.get("compiled") else "")
        label = variant + ("/channels_last" if run["layout"] == "channels_last" else "")
        entry = _get(summary, run["backbone"], "ecrm_overhead_pct", run["mode"], label)
        entry[f"b{run['batch']}"] = overhead_pct(run["per_s"], runs[base_key]["per_s"])
    for (backbone, mode, model, variant, batch), (per_s, layout) in sorted(best.items()):
        if model != "ecrm_unet" or (backbone, mode, "no_ecrm", variant, batch) not in best:
            continue
        base_per_s, base_layout = best[(backbone, mode, "no_ecrm", variant, batch)]
        pct = overhead_pct(per_s, base_per_s)
        entry = _get(summary, backbone, "ecrm_overhead_pct", f"{mode}_best_layout", variant)
        entry[f"b{batch}"] = pct
        _get(summary, backbone, "best_layout", mode, model, variant)[f"b{batch}"] = layout
        _get(summary, backbone, "best_layout", mode, "no_ecrm", variant)[f"b{batch}"] = base_layout
        if mode == "training" or batch == 1:
            what = f"{backbone} {mode} {variant} batch {batch}: ECRM overhead <= {target_pct:g}% (faster layouts)"
            targets[what] = {"overhead_pct": pct, "met": pct <= target_pct}
    report: dict[str, Any] = dict(header)
    report["summary"] = summary
    report["targets"] = targets
    for key, value in (extras or {}).items():
        report[key] = value
    accuracy = (extras or {}).get("accuracy")
    if isinstance(accuracy, Mapping):
        for mode, diff in accuracy.get("mean_dice_minus_fp32", {}).items():
            targets[f"Kvasir mean Dice {mode} vs fp32 within {DICE_TARGET:g}"] = {
                "difference": diff,
                "met": abs(diff) <= DICE_TARGET,
            }
    report["runs"] = dict(runs)
    return report


def header_of(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info["name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads; --allow-cpu: not GPU figures)"
    tf32 = {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}
    with contextlib.suppress(Exception):
        tf32["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return {
        "benchmark": "benchmarks/gpu_speed.py (GPU issue #25 item 3)",
        "command": " ".join(["python benchmarks/gpu_speed.py", *sys.argv[1:]]),
        "device": info,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(),
        },
        "settings": {
            "size": args.size,
            "backbones": _names(args.backbones),
            "extra_backbones": _names(args.extra_backbones),
            "models": {
                "ecrm_unet": f"ECRMUNet(backbone=B, bank_size={args.bank_size}) (default ECRM), memory filled once "
                "in train mode from random images and labels, then eval",
                "no_ecrm": "ECRMUNet(backbone=B, use_ecrm=False): same encoder and decoder, identity in place of ECRM",
            },
            "inference_batches": _ints(args.batches),
            "train_batches": _ints(args.train_batches),
            "precisions": _names(args.precisions),
            "channels_last": args.channels_last,
            "compile": {
                "mode": args.compile_mode,
                "precision": args.compile_precision,
                "batches": _ints(args.compile_batches),
                "layout": "the faster eager layout at that precision and batch, per network",
            },
            "repeats": args.repeats,
            "warmup": args.warmup,
            "inner": args.inner,
            "train_repeats": args.train_repeats,
            "train_warmup": args.train_warmup,
            "train_inner": args.train_inner,
            "training": f"train mode, bf16 autocast, DiceCE(sigmoid) + {args.aux_weight} x DiceCE(ECRM coarse mask) "
            "(no aux term without ECRM), AdamW lr 1e-3 wd 0.01; ECRM passes the labels (its memory is written)",
            "bank_size": args.bank_size,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "tf32": tf32,
            "budget_s": args.budget_s,
            "quick": args.quick,
            "seed": args.seed,
            "units": "per_s: frames/s at batch 1, images/s otherwise = batch / median over rounds of (block time / "
            "calls; the calls of a block are not synchronised one by one, so batch-1 figures are streaming "
            "throughput, --inner 1 gives per-call latency); overhead_pct = 100 * (no_ecrm per_s / ecrm_unet per_s - 1)",
        },
    }


# -------------------------------------------------------------------------------------------------------- accuracy
def load_checkpoint(path: Path) -> tuple[Any, dict[str, Any], str]:
    """The network of a model folder (``model_fp16.pt`` converted to float32, or ``model.pt``; ``model.json`` beside)
    or of a model file, through ``monai_ecrm.record.load_network``; its record; the file read."""
    import torch

    from monai_ecrm.record import load_network

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model_fp16.pt", path / "model.pt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: neither model_fp16.pt nor model.pt")
        path = found[0]
    state = torch.load(path, map_location="cpu", weights_only=True)
    flat = isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not (flat and any(v.dtype == torch.float16 for v in state.values())):
        net, record = load_network(path)
        return net.eval(), record, str(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory(prefix="gpu_speed_") as tmp:
        torch.save(state, Path(tmp) / "model.pt")
        if (path.parent / "model.json").is_file():
            shutil.copy(path.parent / "model.json", Path(tmp) / "model.json")
        net, record = load_network(Path(tmp) / "model.pt")
    return net.eval(), record, str(path)


def kvasir_pairs(root: Path) -> list[dict[str, str]]:
    """``{"image", "label"}`` pairs: the ids of ``pranet_split/test_kvasir.txt`` under ``kvasir_seg/`` of a PraNet
    root, else every stem present in both ``images/`` and ``masks/``."""
    root = Path(root)

    def by_stem(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}

    listing = root / "pranet_split" / "test_kvasir.txt"
    if listing.is_file():
        images, masks = by_stem(root / "kvasir_seg" / "images"), by_stem(root / "kvasir_seg" / "masks")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        missing = [i for i in ids if i not in images or i not in masks]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} Kvasir test ids without image or mask, e.g. {missing[0]}")
    else:
        images, masks = by_stem(root / "images"), by_stem(root / "masks")
        ids = sorted(set(images) & set(masks))
    if not ids:
        raise FileNotFoundError(f"{root}: no Kvasir test pairs (pranet_split/test_kvasir.txt or images/ + masks/)")
    return [{"image": str(images[i]), "label": str(masks[i]), "id": i} for i in ids]


def kvasir_accuracy(
    net: Any,
    record: Mapping[str, Any],
    pairs: Sequence[Mapping[str, str]],
    device: Any,
    modes: Sequence[tuple[str, Callable[[Any], Any], str]],
    cache: dict | None = None,
) -> dict[str, list[float]]:
    """Per-frame Dice (``evaluate.json``'s min-max convention, at each frame's own size) of ``net`` for each mode
    ``(name, forward, precision)``: ``forward(batch)`` returns logits, run under ``precision`` autocast."""
    import torch

    from monai_ecrm.metrics.functional import compute_overlap
    from monai_ecrm.transforms import full_size_eval_postprocessing, full_size_eval_transforms

    size = int(record["preprocessing"]["spatial_size"][0])
    normalization = record["preprocessing"]["normalization"]
    cache = {} if cache is None else cache
    # the preprocessed frames are kept in ``cache`` with the transforms that made them (Invertd needs those)
    if ("transforms", size, normalization) not in cache:
        preprocessing = full_size_eval_transforms(size, normalization=normalization)
        cache[("transforms", size, normalization)] = (preprocessing, full_size_eval_postprocessing(preprocessing))
    preprocessing, postprocessing = cache[("transforms", size, normalization)]

    def plain(value: Any) -> Any:
        value = torch.as_tensor(value)
        return value.as_tensor() if hasattr(value, "as_tensor") else value

    dices: dict[str, list[float]] = {}
    for name, forward, precision in modes:
        dices[name] = []
        for item in pairs:
            key = (size, normalization, item["image"])
            if key not in cache:
                cache[key] = preprocessing({"image": item["image"], "label": item["label"]})
            sample = cache[key]
            with torch.no_grad(), _autocast(device, precision):
                logits = forward(plain(sample["image"])[None].to(device))
            out = postprocessing({**sample, "pred": logits[0].float().cpu().clone()})
            pred, gt = plain(out["pred"]).float(), (plain(out["gt"]) > 0.5).float()
            dices[name].append(float(compute_overlap(pred[None], gt[None], "dice", 0.5, "binary", "minmax")[0, 0]))
    return dices


def accuracy_summary(checkpoint: str, pairs: Sequence[Mapping[str, str]], dices: Mapping[str, list[float]]) -> dict:
    means = {name: round(statistics.fmean(values), 5) for name, values in dices.items()}
    out: dict[str, Any] = {
        "checkpoint": checkpoint,
        "frames": len(pairs),
        "scoring": "full_size_eval_transforms at the record's size and normalisation; sigmoid map resized back to the "
        "frame's size; Dice of the min-max normalised map > 0.5 (evaluate.json's convention)",
        "mean_dice": means,
        "target_abs_difference": DICE_TARGET,
    }
    if "fp32" in dices:
        out["mean_dice_minus_fp32"] = {n: round(means[n] - means["fp32"], 5) for n in dices if n != "fp32"}
        out["max_abs_frame_difference"] = {
            n: round(max(abs(a - b) for a, b in zip(values, dices["fp32"])), 5)
            for n, values in dices.items()
            if n != "fp32"
        }
    out["per_frame_dice"] = {"ids": [p.get("id", Path(p["image"]).stem) for p in pairs]}
    out["per_frame_dice"].update({n: [round(v, 5) for v in values] for n, values in dices.items()})
    return out


# ------------------------------------------------------------------------------------------------------------- main
def refuse_without_cuda(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(REFUSAL, file=sys.stderr)
        sys.exit(2)


class Run:
    """The measurements of one invocation: ``runs``, ``extras``, the budget and the partial writes."""

    def __init__(self, args: argparse.Namespace, device: Any) -> None:
        self.args, self.device = args, device
        self.budget = Budget(args.budget_s)
        self.runs: dict[str, dict[str, Any]] = {}
        self.extras: dict[str, Any] = {"skipped": [], "errors": [], "memory_filled": {}}
        self.header = header_of(args, device)

    def log(self, message: str) -> None:
        print(f"[gpu_speed {self.budget.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def skip(self, what: str, reason: str) -> None:
        self.extras["skipped"].append({"what": what, "reason": reason})
        self.log(f"skipped {what}: {reason}")

    def error(self, what: str, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}".strip()
        self.extras["errors"].append({"what": what, "error": text[:600]})
        self.log(f"ERROR {what}: {text[:300]}")
        traceback.print_exc(file=sys.stderr)

    def report(self) -> dict[str, Any]:
        extras = dict(self.extras)
        extras["wall_s"] = round(self.budget.elapsed(), 1)
        if self.device.type == "cuda":
            import torch

            extras["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return assemble_report(self.header, self.runs, extras)

    def save(self) -> None:
        if self.args.out is not None:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.write_text(json.dumps(self.report(), indent=2) + "\n")

    def out_of_time(self, what: str, need: float = 0.0) -> bool:
        if self.budget.left() <= need:
            self.skip(what, f"budget: {self.budget.left():.0f} s left of --budget-s {self.args.budget_s:g}")
            return True
        return False

    def compile_timeout(self) -> float:
        """A compile's limit: ``--compile-timeout-s``, cut to what is left of the budget plus 30 s."""
        return max(10.0, min(self.args.compile_timeout_s, self.budget.left() + 30.0))

    def add(self, key: str, times: Sequence[float], batch: int, **fields: Any) -> None:
        self.runs[key] = figure(times, batch, **fields)
        self.log(f"{key}: {self.runs[key]['per_s']} /s (median {self.runs[key]['median_ms']} ms)")

    # ----------------------------------------------------------------------------------------------- phases
    def eager_inference(self, nets: Mapping[str, Any], backbone: str, precisions: Sequence[str]) -> None:
        args = self.args
        layouts = LAYOUTS if args.channels_last == "auto" else LAYOUTS[:1]
        for layout in layouts:
            for net in nets.values():
                _layout(net, layout)
            for batch in _ints(args.batches):
                x = _input(batch, args.size, self.device, layout, args.seed)
                for precision in precisions:
                    what = f"{backbone} inference {precision} {layout} b{batch}"
                    if self.out_of_time(what):
                        return
                    try:
                        calls = {m: inference_call(net, x, self.device, precision) for m, net in nets.items()}
                        times = side_by_side(calls, self.device, args.warmup, args.repeats, args.inner)
                    except Exception as error:  # noqa: BLE001
                        self.error(what, error)
                        continue
                    for model, ts in times.items():
                        key = run_key(model, backbone, "inference", precision, layout, batch, False)
                        self.add(
                            key,
                            ts,
                            batch,
                            model=model,
                            backbone=backbone,
                            mode="inference",
                            precision=precision,
                            layout=layout,
                            compiled=False,
                        )
        for net in nets.values():
            _layout(net, "contiguous")

    def memory_cache(self, net: Any, backbone: str) -> None:
        args = self.args
        x = _input(1, args.size, self.device, "contiguous", args.seed)
        result: dict[str, Any] = {}
        for precision in [p for p in ("fp32", "bf16") if p in _names(args.precisions)] or ["fp32"]:
            what = f"{backbone} memory cache on/off {precision} b1"
            if self.out_of_time(what):
                break
            call = inference_call(net, x, self.device, precision)
            calls = {"on": call, "off": call}
            before = {
                "on": lambda: setattr(net.ecrm, "memory_cache", True),
                "off": lambda: setattr(net.ecrm, "memory_cache", False),
            }
            try:
                times = side_by_side(calls, self.device, args.warmup, args.repeats, args.inner, before)
            finally:
                net.ecrm.memory_cache = True
            for state, ts in times.items():
                key = run_key("ecrm_unet", backbone, f"memory_cache_{state}", precision, "contiguous", 1, False)
                self.add(
                    key,
                    ts,
                    1,
                    model="ecrm_unet",
                    backbone=backbone,
                    mode=f"memory_cache_{state}",
                    precision=precision,
                    layout="contiguous",
                    compiled=False,
                )
            on = self.runs[run_key("ecrm_unet", backbone, "memory_cache_on", precision, "contiguous", 1, False)]
            off = self.runs[run_key("ecrm_unet", backbone, "memory_cache_off", precision, "contiguous", 1, False)]
            result[precision] = {
                "frames_per_s": {"cache_on": on["per_s"], "cache_off": off["per_s"]},
                "on_vs_off_time_pct": round(100.0 * (on["median_ms"] / off["median_ms"] - 1.0), 2),
                "fastest_round_on_vs_off_time_pct": round(100.0 * (on["min_ms"] / off["min_ms"] - 1.0), 2),
            }
        if result:
            self.extras.setdefault("memory_cache", {})[backbone] = result

    def training(self, nets: Mapping[str, Any], backbone: str) -> None:
        args = self.args
        layouts = LAYOUTS if args.channels_last == "auto" else LAYOUTS[:1]
        for layout in layouts:
            for batch in _ints(args.train_batches):
                what = f"{backbone} training bf16 {layout} b{batch}"
                if self.out_of_time(what):
                    return
                try:
                    copies = {m: _layout(copy.deepcopy(net), layout) for m, net in nets.items()}
                    calls = {
                        m: training_call(net, batch, args.size, self.device, "bf16", layout, args.aux_weight, args.seed)
                        for m, net in copies.items()
                    }
                    times = side_by_side(calls, self.device, args.train_warmup, args.train_repeats, args.train_inner)
                except Exception as error:  # noqa: BLE001
                    self.error(what, error)
                    continue
                finally:
                    copies = calls = None  # noqa: F841  (free the copies and their optimizer state)
                    self._empty_cache()
                for model, ts in times.items():
                    key = run_key(model, backbone, "training", "bf16", layout, batch, False)
                    self.add(
                        key,
                        ts,
                        batch,
                        model=model,
                        backbone=backbone,
                        mode="training",
                        precision="bf16",
                        layout=layout,
                        compiled=False,
                    )

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def eager_layout(self, model: str, backbone: str, precision: str, batch: int) -> str:
        """The faster eager inference layout of ``model`` at ``precision`` and ``batch`` (contiguous if unknown)."""
        per_s = {
            layout: self.runs.get(run_key(model, backbone, "inference", precision, layout, batch, False), {}).get(
                "per_s", 0.0
            )
            for layout in LAYOUTS
        }
        return "channels_last" if per_s["channels_last"] > per_s["contiguous"] else "contiguous"

    def compiled_inference(self, nets: Mapping[str, Any], backbone: str, batch: int) -> None:
        import torch

        args = self.args
        precision = args.compile_precision
        what = f"{backbone} inference {precision}+compile b{batch}"
        if self.out_of_time(what, need=args.compile_min_s * len(nets)):
            return
        torch._dynamo.reset()
        status: dict[str, Any] = {}
        calls: dict[str, Callable[[], Any]] = {}
        layouts: dict[str, str] = {}
        for model, net in nets.items():
            layout = self.eager_layout(model, backbone, precision, batch)
            layouts[model] = layout
            x = _input(batch, args.size, self.device, layout, args.seed)
            twin = _layout(copy.deepcopy(net), layout)
            self.log(f"compiling {model}/{backbone} b{batch} ({layout}, {precision}, mode={args.compile_mode})")
            result = compile_and_warm(
                twin,
                lambda c, x=x: inference_call(c, x, self.device, precision, True),
                args.compile_mode,
                self.compile_timeout(),
            )
            call = result.pop("call", None)
            result.pop("module", None)
            status[model] = {**result, "layout": layout}
            self.log(f"compile {model}/{backbone} b{batch}: {json.dumps(status[model])[:300]}")
            if call is not None:
                calls[model] = call
        self.extras.setdefault("compile", {}).setdefault(backbone, {})[f"b{batch}"] = status
        if calls:
            try:
                times = side_by_side(calls, self.device, args.warmup, args.repeats, args.inner)
            except Exception as error:  # noqa: BLE001
                self.error(what, error)
                times = {}
            for model, ts in times.items():
                key = run_key(model, backbone, "inference", precision, layouts[model], batch, True)
                self.add(
                    key,
                    ts,
                    batch,
                    model=model,
                    backbone=backbone,
                    mode="inference",
                    precision=precision,
                    layout=layouts[model],
                    compiled=True,
                )
        calls.clear()
        torch._dynamo.reset()
        self._empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_without_cuda(args)  # before importing anything else: one line and status 2 without CUDA

    import torch
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    import monai_ecrm  # noqa: F401  (registers efficientnet-lite0 in MONAI's FlexibleUNet registry)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    _configure_dynamo()
    run = Run(args, device)
    registered = set(FLEXUNET_BACKBONE.register_dict)
    backbones = []
    for name in _names(args.backbones):
        if name in registered:
            backbones.append(name)
        else:
            run.skip(f"backbone {name}", "not registered in MONAI's FLEXUNET_BACKBONE")
    extra = []
    for name in _names(args.extra_backbones):
        if name in backbones:
            continue
        if name in registered:
            extra.append(name)
        else:
            run.skip(f"extra backbone {name}", "not registered in MONAI's FLEXUNET_BACKBONE")
    run.extras["backbones_measured"] = {"full": backbones, "eager_inference_only": extra}
    precisions = [p for p in _names(args.precisions) if p in PRECISIONS]
    nets_of: dict[str, dict[str, Any]] = {}

    # 1. eager: inference (both layouts), memory cache, training, per backbone
    for backbone in backbones:
        run.log(f"building {backbone} (ECRM memory filled) and its no-ECRM twin")
        nets = {m: build(m, backbone, args.bank_size, args.size, device, args.seed) for m in MODELS}
        run.extras["memory_filled"][backbone] = memory_filled(nets["ecrm_unet"])
        nets_of[backbone] = nets
        run.eager_inference(nets, backbone, precisions)
        run.memory_cache(nets["ecrm_unet"], backbone)
        run.training(nets, backbone)
        run.save()
    for backbone in extra:
        nets = {m: build(m, backbone, args.bank_size, args.size, device, args.seed) for m in MODELS}
        run.extras["memory_filled"][backbone] = memory_filled(nets["ecrm_unet"])
        run.eager_inference(nets, backbone, [p for p in precisions if p in ("fp32", "bf16")] or precisions)
        del nets
        run._empty_cache()
        run.save()

    # 2. accuracy, eager part
    accuracy: dict[str, Any] | None = None
    if args.kvasir is not None:
        if not run.out_of_time("Kvasir accuracy (fp32, bf16)"):
            try:
                net, record, source = load_checkpoint(args.checkpoint)
                net = net.to(device).eval()
                pairs = kvasir_pairs(args.kvasir)[: args.max_images or None]
                frames: dict = {}
                modes = [("fp32", net, "fp32"), ("bf16", net, "bf16")]
                dices = kvasir_accuracy(net, record, pairs, device, modes, frames)
                accuracy = {
                    "net": net,
                    "record": record,
                    "source": source,
                    "pairs": pairs,
                    "frames": frames,
                    "dices": dices,
                }
                run.extras["accuracy"] = accuracy_summary(source, pairs, dices)
                run.log(f"Kvasir mean Dice: {run.extras['accuracy']['mean_dice']}")
            except Exception as error:  # noqa: BLE001
                run.error("Kvasir accuracy", error)
        run.save()

    # 3. compiled inference: batch 1 for every backbone first, then the larger batches
    for batch in _ints(args.compile_batches):
        for backbone in backbones:
            try:
                run.compiled_inference(nets_of[backbone], backbone, batch)
            except Exception as error:  # noqa: BLE001
                run.error(f"{backbone} compiled b{batch}", error)
            run.save()

    # 4. accuracy, compiled
    if accuracy is not None and _ints(args.compile_batches):
        precision = args.compile_precision
        what = f"Kvasir accuracy ({precision}+compile)"
        if not run.out_of_time(what, need=args.compile_min_s):
            try:
                torch._dynamo.reset()
                net, side = accuracy["net"], int(accuracy["record"]["preprocessing"]["spatial_size"][0])
                sample = torch.zeros(1, 3, side, side, device=device)

                def warm_call(module: Any) -> Callable[[], Any]:
                    return inference_call(module, sample, device, precision, True)

                result = compile_and_warm(net, warm_call, args.compile_mode, run.compile_timeout())
                result.pop("call", None)
                compiled = result.pop("module", None)
                run.extras["accuracy"]["compile"] = result
                if compiled is not None:

                    def forward(x: Any) -> Any:
                        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
                        if mark is not None:
                            mark()
                        return compiled(x).clone()  # (CUDA graphs reuse their output buffer)

                    name = f"{precision}+compile"
                    dices = kvasir_accuracy(
                        net,
                        accuracy["record"],
                        accuracy["pairs"],
                        device,
                        [(name, forward, precision)],
                        accuracy["frames"],
                    )
                    accuracy["dices"].update(dices)
                    compile_status = run.extras["accuracy"]["compile"]
                    run.extras["accuracy"] = accuracy_summary(accuracy["source"], accuracy["pairs"], accuracy["dices"])
                    run.extras["accuracy"]["compile"] = compile_status
                    run.log(f"Kvasir mean Dice: {run.extras['accuracy']['mean_dice']}")
            except Exception as error:  # noqa: BLE001
                run.error(what, error)
            run.save()

    report = run.report()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
