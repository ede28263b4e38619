"""What memory provenance costs (issue #16, performance): ``ECRMUNet.forward_with_shares`` (the logits and each
memory slot's attention share from ONE forward, what ``memory_attention`` and ``--explain`` run) against the normal
forward, and ``monai-ecrm-infer --explain 3`` against the same job without it.

For each backbone: an ``ECRMUNet`` in eval mode (``onnx_speed.build``: ECRMUNet's defaults, the study's ECRM on the
1/16 map with ``ecrm_channels`` following the level, polyp and background tokens, the attention computed explicitly;
``--network-kwargs`` changes them) whose memory is filled (random prototypes in every slot, as in a trained model, or
the memory of ``--weights``) and named after the first ``bank_size`` Kvasir-SEG training pictures
(synthetic names without ``--data``), so that ``--explain`` draws real thumbnails.

* ``network``: frames/s at batch 1, ``--size`` px, ``--threads`` threads, of ``forward`` and ``forward_with_shares``
  stepped round-robin (one timed frame each in turn, medians after ``--warmup`` untimed frames), and the overhead
  ``forward_with_shares / forward - 1`` (target <= 0.10). ``forward_unchanged``: ``forward`` of the same network
  with its provenance buffers emptied (no sources, no names) against ``forward`` with them, in the same round-robin:
  the normal forward must not pay for provenance (ratio within noise of 1).
* ``command`` (``--end-to-end N``): the clinical job (:class:`~monai_ecrm.clinical.job.ClinicalInference`) on the
  first N Kvasir-SEG JPEG frames with the plain runner and with ``ExplainingRunner(top_k=3)`` and the case
  pictures (``report.csv`` columns, ``<stem>_explain.png``), each job ``--end-to-end-rounds`` times in turn; the
  per-frame slowdown ``explain / plain - 1`` (target <= 0.15). Model loading is not timed.

Prints one JSON object::

    python benchmarks/provenance_speed.py [--backbones resnet34,efficientnet-lite0] [--size 352] [--threads 2]
        [--repeats 30] [--warmup 3] [--end-to-end 100] [--end-to-end-rounds 2] [--data ../shared/data/kvasir_seg]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_speed import build  # noqa: E402

import monai_ecrm  # noqa: E402
from monai_ecrm.transforms import normalization_for_backbone  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"
TARGETS = {"forward_with_shares_overhead": 0.10, "explain_command_slowdown": 0.15}


def name_memory(net, data: Path) -> list[str]:
    """Sources 0..n-1 in the slots and names: Kvasir-SEG picture names when present, else synthetic ones."""
    bank = net.ecrm.memory
    pictures = sorted((data / "images").glob("*.jpg"))[: bank.num_slots] if data.is_dir() else []
    names = [p.name for p in pictures] or [f"case_{i:03d}.jpg" for i in range(bank.num_slots)]
    with torch.no_grad():
        bank.sources.copy_(torch.arange(bank.num_slots) % len(names))
    bank.set_source_names(names)
    return names


def _round_robin(calls: dict, frame: torch.Tensor, repeats: int, warmup: int) -> dict[str, list[float]]:
    for call in calls.values():
        for _ in range(warmup):
            call(frame)
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for repeat in range(repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            start = time.perf_counter()
            calls[name](frame)
            times[name].append(time.perf_counter() - start)
    return times


def network_speed(net, args: argparse.Namespace) -> dict:
    import copy

    bare = copy.deepcopy(net)
    with torch.no_grad():
        bare.ecrm.memory.sources.fill_(-1)
    bare.ecrm.memory.set_source_names([])

    def plain(model):
        def run(frame):
            with torch.inference_mode():
                model(frame)

        return run

    calls = {
        "forward": plain(net),
        "forward_with_shares": lambda frame: net.forward_with_shares(frame),
        "forward_without_provenance": plain(bare),
    }
    frame = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, args.size, args.size)).astype(np.float32))
    times = _round_robin(calls, frame, args.repeats, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "fps": {name: round(1.0 / value, 2) for name, value in median.items()},
        "forward_with_shares_overhead": round(median["forward_with_shares"] / median["forward"] - 1.0, 3),
        "forward_unchanged": round(median["forward"] / median["forward_without_provenance"], 3),
    }


def command_speed(net, args: argparse.Namespace, normalization: str, scratch: Path) -> dict:
    from monai_ecrm.clinical import ClinicalInference, TorchRunner
    from monai_ecrm.clinical.explain import CasePictures, ExplainingRunner

    frames = sorted((args.data / "images").glob("*.jpg"))[: args.end_to_end]
    if len(frames) < args.end_to_end:
        return {"skipped": f"fewer than {args.end_to_end} JPEG frames under {args.data / 'images'}"}
    runners = {"plain": TorchRunner(net, "cpu"), "explain_3": ExplainingRunner(net, 3, "cpu")}
    pictures = CasePictures([args.data / "images"])

    def job(name: str, inputs: list[Path]) -> float:
        inference = ClinicalInference(
            runners[name],
            scratch / name,
            spatial_size=args.size,
            normalization=normalization,
            overwrite=True,
            progress=False,
            case_pictures=pictures if name != "plain" else None,
        )
        start = time.perf_counter()
        results = inference.run(inputs)
        elapsed = time.perf_counter() - start
        failed = [result for result in results if result.status != "written"]
        if failed:
            raise RuntimeError(f"{name} job: {failed[0].input}: {failed[0].detail}")
        return elapsed

    for name in runners:
        job(name, frames[:2])
    explained = sorted((scratch / "explain_3").glob("*_explain.png"))
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for repeat in range(args.end_to_end_rounds):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            times[name].append(job(name, frames))
    fps = {name: round(len(frames) / statistics.median(values), 2) for name, values in times.items()}
    return {
        "frames": len(frames),
        "rounds": args.end_to_end_rounds,
        "fps": fps,
        "explain_pictures_written": len(explained) > 0,
        "explain_command_slowdown": round(fps["plain"] / fps["explain_3"] - 1.0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet34,efficientnet-lite0", help="comma-separated backbones")
    parser.add_argument("--size", type=int, default=352, help="square input size (352)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed frames per call (30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames per call first (3)")
    parser.add_argument("--end-to-end", type=int, default=100, help="frames of the command's job; 0: skip (100)")
    parser.add_argument("--end-to-end-rounds", type=int, default=2, help="timed jobs per runner (2)")
    parser.add_argument("--data", type=Path, default=DATA, help="Kvasir-SEG folder (names and frames)")
    parser.add_argument("--weights", help="a state dict of ECRMUNet (e.g. the bundle's models/model.pt)")
    parser.add_argument("--network-kwargs", type=json.loads, default={}, help="JSON: ECRMUNet options of --weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {
        "benchmark": "provenance_speed",
        "monai_ecrm": monai_ecrm.__version__,
        "torch": torch.__version__,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads},
        "size": args.size,
        "targets": TARGETS,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for backbone in args.backbones.split(","):
            net, kwargs = build(backbone, args.weights, args.network_kwargs)
            name_memory(net, args.data)
            row = {"backbone": backbone, "network": kwargs, **network_speed(net, args)}
            if args.end_to_end:
                folder = Path(scratch) / backbone
                row["command"] = command_speed(net, args, normalization_for_backbone(backbone), folder)
            met = {
                "forward_with_shares_overhead": row["forward_with_shares_overhead"]
                <= TARGETS["forward_with_shares_overhead"]
            }
            if "explain_command_slowdown" in row.get("command", {}):
                met["explain_command_slowdown"] = (
                    row["command"]["explain_command_slowdown"] <= TARGETS["explain_command_slowdown"]
                )
            row["targets_met"] = met
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
