"""CPU inference speed of ECRM-UNet: PyTorch eager (float32, bfloat16 autocast) against ONNX Runtime (float32, INT8).

For each backbone and size: an ``ECRMUNet`` with a filled memory (random prototypes in every slot, as in a trained
model, or the memory of ``--weights``) is exported with :func:`monai_ecrm.onnx.export_network` (the options of the
bundle's ``configs/onnx_export.json``) and quantised with :func:`monai_ecrm.onnx.quantize_int8` (QDQ, per-channel
weights, the memory attention kept in float) on ``--calibration`` images: Kvasir-SEG frames from ``--data`` when
present, else synthetic pictures. Then frames/s at batch 1 for

* ``torch_fp32``: ``net.eval()`` under ``torch.inference_mode()``;
* ``torch_bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ``ort_fp32`` and ``ort_int8``: :func:`monai_ecrm.onnx.load_onnx_session` (``ORT_ENABLE_ALL``, ``--threads``
  intra-op threads, one inter-op thread).

The network is ``ECRMUNet``'s defaults with 20 memory slots: the study's ECRM on the 1/16 map, ``ecrm_channels``
following that level (resnet34: 256, efficientnet-lite0: 112), a polyp and a background token per slot, and the
attention computed explicitly (``supervise_attention``: its log-odds are the coarse mask), not by the SDPA kernel.
``--network-kwargs`` changes any option (DCRNet's block on the 1/32 map: ``DCRNET_ECRM_OPTIONS`` as JSON; the figures
measured before ECRMUNet's defaults changed are of that block with 512 / 320 ECRM channels).

``torch.set_num_threads(--threads)`` for PyTorch. The engines of one (backbone, size) run in blocks, ``--rounds``
rounds of ``--repeats / --rounds`` timed frames per engine, the order rotating each round, so that load from other
processes falls on all of them alike; each block starts with one untimed frame, because both runtimes' thread pools
spin-wait after a run (frame-by-frame alternation made each engine pay for the other's spinning: PyTorch float32
measured 15-30 % slower beside ONNX Runtime than alone). Figures are medians after ``--warmup`` untimed frames.
The ratios and the targets of the issue (ORT float32 >= 1.5x eager float32, INT8 >= 3x
eager float32 and faster than bfloat16, EfficientNet-Lite0 INT8 at 352 px >= 40 frames/s) are in the output.

Usage::

    python benchmarks/onnx_speed.py [--backbones resnet34,efficientnet-lite0] [--sizes 256,352]
        [--engines torch_fp32,torch_bf16,ort_fp32,ort_int8] [--threads 2] [--repeats 20] [--rounds 4] [--warmup 3]
        [--calibration 16] [--data ../shared/data/kvasir_seg] [--weights model.pt --network-kwargs '{...}']
        [--quantize-attention] [--profile DIR] [--keep DIR] [--end-to-end N [--end-to-end-rounds 2]]

``--profile DIR`` writes ONNX Runtime's profiler traces (Chrome trace JSON) there and adds the share of time per
operator type to the output.

``--end-to-end N`` adds, per backbone and size, the frames/s of ``monai-ecrm-infer``'s job
(:class:`~monai_ecrm.clinical.job.ClinicalInference`: JPEG decoding and preprocessing in the prefetch thread, the
network, ``Invertd`` back to the frame's size, threshold, atomic PNG writing) on a folder of the first N Kvasir-SEG
JPEG frames (synthetic 530x620 pictures without ``--data``), with each engine as the command runs it: the network
(``torch_fp32``), ``TorchRunner(autocast="bf16")`` (``--bf16``), :class:`~monai_ecrm.clinical.onnx_runner.OnnxRunner`
on the float32 and INT8 files (``--onnx``). Model loading is not timed. After a 2-frame warm-up job per engine, the
engines each run the whole folder in turn, ``--end-to-end-rounds`` times (rotating the order); frames/s is N over the
median job time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import monai_ecrm
from monai_ecrm.networks.nets import ECRMUNet
from monai_ecrm.onnx import export_network, load_onnx_session, make_record, quantize_int8
from monai_ecrm.transforms import normalization_for_backbone

E2E_PICTURE_SIZE = (530, 620)

ENGINES = ("torch_fp32", "torch_bf16", "ort_fp32", "ort_int8")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"
TARGETS = {"ort_fp32_vs_torch_fp32": 1.5, "ort_int8_vs_torch_fp32": 3.0, "ort_int8_vs_torch_bf16": 1.0}
LITE0_INT8_352_FPS = 40.0


def build(backbone: str, weights: str | None, network_kwargs: dict) -> tuple[ECRMUNet, dict]:
    """The network in eval mode with a filled memory, and its construction arguments."""
    torch.manual_seed(0)
    kwargs = {"backbone": backbone, "bank_size": 20, **network_kwargs}
    net = ECRMUNet(**kwargs)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    elif net.use_ecrm:
        with torch.no_grad():
            bank = net.ecrm.memory
            bank.memory.copy_(torch.rand_like(bank.memory))
            bank.filled.fill_(bank.num_slots)
    return net.eval(), kwargs


def calibration_source(args: argparse.Namespace, size: int, scratch: Path) -> Path:
    """Kvasir-SEG's folder when present, else a folder of synthetic pictures (bright blobs on a textured red)."""
    if args.data.is_dir():
        return args.data
    from PIL import Image

    folder = scratch / f"synthetic_{size}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.mgrid[0:size, 0:size]
    for index in range(args.calibration):
        centre, radius = rng.uniform(0.25, 0.75, 2) * size, rng.uniform(0.08, 0.25) * size
        blob = ((grid - centre[:, None, None]) ** 2).sum(0) < radius**2
        picture = rng.normal(0.45, 0.08, (size, size, 3)) * np.array([1.0, 0.55, 0.45])
        picture[blob] += 0.3
        Image.fromarray((picture.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def op_shares(trace: str) -> dict[str, float]:
    """Share of node time per operator type in an ONNX Runtime profile (top 8)."""
    events = json.loads(Path(trace).read_text())
    times: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            times[event.get("args", {}).get("op_name", "?")] += event.get("dur", 0)
    total = sum(times.values()) or 1
    return {op: round(duration / total, 3) for op, duration in times.most_common(8)}


def runners(net: ECRMUNet, paths: dict[str, Path], engines: list[str], threads: int, profile: Path | None, tag: str):
    """One callable per engine, running a frame ``[1, 3, H, W]`` float32."""
    calls, sessions = {}, {}

    def torch_call(bf16: bool):
        def run(frame: np.ndarray) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(torch.from_numpy(frame))

        return run

    for engine in engines:
        if engine.startswith("torch"):
            calls[engine] = torch_call(engine == "torch_bf16")
            continue
        prefix = str(profile / f"{tag}_{engine}") if profile else None
        session, _ = load_onnx_session(paths[engine], threads=threads, profile_prefix=prefix)
        sessions[engine] = session
        name = session.get_inputs()[0].name
        calls[engine] = lambda frame, session=session, name=name: session.run(None, {name: frame})
    return calls, sessions


def measure(args: argparse.Namespace, backbone: str, size: int, scratch: Path) -> dict:
    net, kwargs = build(backbone, args.weights, args.network_kwargs)
    engines = args.engines
    paths: dict[str, Path] = {}
    row: dict = {"backbone": backbone, "size": size, "network": kwargs}
    if any(engine.startswith("ort") for engine in engines):
        record = make_record(kwargs, size, normalization_for_backbone(backbone))
        paths["ort_fp32"] = export_network(net, scratch / f"{backbone}_{size}.onnx", record, (1, 3, size, size))
        if "ort_int8" in engines:
            paths["ort_int8"] = scratch / f"{backbone}_{size}.int8.onnx"
            start = time.perf_counter()
            calibration = quantize_int8(
                paths["ort_fp32"],
                paths["ort_int8"],
                calibration_source(args, size, scratch),
                num_images=args.calibration,
                quantize_attention=args.quantize_attention,
            )["calibration"]
            row["calibration"] = {
                "images": calibration["num_images"],
                "source": calibration["datalist"],
                "float_nodes": len(calibration["float_nodes"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
    calls, sessions = runners(net, paths, engines, args.threads, args.profile, f"{backbone}_{size}")
    frame = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    for call in calls.values():
        for _ in range(args.warmup):
            call(frame)
    times: dict[str, list[float]] = {engine: [] for engine in calls}
    order = list(calls)
    rounds = max(1, min(args.rounds, args.repeats))
    for round_index in range(rounds):
        block = args.repeats // rounds + (1 if round_index < args.repeats % rounds else 0)
        for engine in order[round_index % len(order) :] + order[: round_index % len(order)]:
            calls[engine](frame)  # untimed: the previous engine's idle threads (spin-waiting) settle first
            for _ in range(block):
                start = time.perf_counter()
                calls[engine](frame)
                times[engine].append(time.perf_counter() - start)
    row["fps"] = {engine: round(1.0 / statistics.median(values), 2) for engine, values in times.items()}
    row["fps_best"] = {engine: round(1.0 / min(values), 2) for engine, values in times.items()}
    fps = row["fps"]
    row["ratios"] = {
        name: round(fps[a] / fps[b], 2)
        for name, (a, b) in {
            "ort_fp32_vs_torch_fp32": ("ort_fp32", "torch_fp32"),
            "ort_int8_vs_torch_fp32": ("ort_int8", "torch_fp32"),
            "ort_int8_vs_torch_bf16": ("ort_int8", "torch_bf16"),
            "ort_int8_vs_ort_fp32": ("ort_int8", "ort_fp32"),
            "torch_bf16_vs_torch_fp32": ("torch_bf16", "torch_fp32"),
        }.items()
        if a in fps and b in fps
    }
    row["targets_met"] = {
        name: row["ratios"][name] >= value for name, value in TARGETS.items() if name in row["ratios"]
    }
    if backbone == "efficientnet-lite0" and size == 352 and "ort_int8" in fps:
        row["targets_met"]["lite0_int8_352_fps"] = fps["ort_int8"] >= LITE0_INT8_352_FPS
    if args.end_to_end:
        row["end_to_end"] = end_to_end(args, net, paths, size, normalization_for_backbone(backbone), scratch)
    if args.profile:
        row["profile"] = {}
        for engine, session in sessions.items():
            trace = session.end_profiling()
            row["profile"][engine] = {"trace": trace, "op_share": op_shares(trace)}
    return row


def end_to_end_frames(args: argparse.Namespace, scratch: Path) -> tuple[list[Path], str]:
    """The first ``--end-to-end`` Kvasir-SEG JPEGs, else as many synthetic pictures; and where they come from."""
    frames = sorted((args.data / "images").glob("*.jpg"))[: args.end_to_end]
    if len(frames) == args.end_to_end:
        return frames, f"{args.data / 'images'} (first {len(frames)} JPEG frames)"
    from PIL import Image

    folder = scratch / "end_to_end_frames"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(args.end_to_end):
        picture = rng.normal(0.45, 0.08, (*E2E_PICTURE_SIZE, 3)) * np.array([1.0, 0.55, 0.45])
        Image.fromarray((picture.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{index:03d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg")), f"synthetic {E2E_PICTURE_SIZE[0]}x{E2E_PICTURE_SIZE[1]} JPEG pictures"


def end_to_end(
    args: argparse.Namespace, net: ECRMUNet, paths: dict[str, Path], size: int, normalization: str, scratch: Path
) -> dict:
    """Frames/s of the command's job on ``--end-to-end`` frames with each engine (see the module docstring)."""
    from monai_ecrm.clinical import ClinicalInference, TorchRunner
    from monai_ecrm.clinical.onnx_runner import OnnxRunner

    frames, source = end_to_end_frames(args, scratch)
    models = {
        "torch_fp32": lambda: net,
        "torch_bf16": lambda: TorchRunner(net, "cpu", autocast="bf16"),
        "ort_fp32": lambda: OnnxRunner(paths["ort_fp32"], threads=args.threads),
        "ort_int8": lambda: OnnxRunner(paths["ort_int8"], threads=args.threads),
    }
    runners = {engine: models[engine]() for engine in args.engines}

    def job(engine: str, inputs: list[Path]) -> float:
        output = scratch / f"end_to_end_{engine}"
        inference = ClinicalInference(
            runners[engine], output, spatial_size=size, normalization=normalization, overwrite=True, progress=False
        )
        start = time.perf_counter()
        results = inference.run(inputs)
        elapsed = time.perf_counter() - start
        failed = [result for result in results if result.status != "written"]
        if failed:
            raise RuntimeError(f"end-to-end job with {engine}: {failed[0].input}: {failed[0].detail}")
        return elapsed

    for engine in runners:
        job(engine, frames[:2])
    times: dict[str, list[float]] = {engine: [] for engine in runners}
    order = list(runners)
    for repeat in range(args.end_to_end_rounds):
        for engine in order[repeat % len(order) :] + order[: repeat % len(order)]:
            times[engine].append(job(engine, frames))
    fps = {engine: round(len(frames) / statistics.median(values), 2) for engine, values in times.items()}
    return {
        "frames": len(frames),
        "source": source,
        "rounds": args.end_to_end_rounds,
        "fps": fps,
        "vs_torch_fp32": {
            engine: round(value / fps["torch_fp32"], 2) for engine, value in fps.items() if "torch_fp32" in fps
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet34,efficientnet-lite0", help="comma-separated backbones")
    parser.add_argument("--sizes", default="256,352", help="comma-separated square input sizes")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads and ORT intra-op threads (2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed frames per engine (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames per engine first (3)")
    parser.add_argument("--rounds", type=int, default=4, help="timed blocks per engine, order rotating (4)")
    parser.add_argument("--calibration", type=int, default=16, help="INT8 calibration images (16)")
    parser.add_argument("--data", type=Path, default=DATA, help="Kvasir-SEG folder for the calibration images")
    parser.add_argument("--weights", help="a state dict of ECRMUNet (e.g. the bundle's models/model.pt)")
    parser.add_argument(
        "--network-kwargs",
        type=json.loads,
        default={},
        help="JSON: ECRMUNet options other than its defaults (those of --weights; DCRNet's block: "
        '{"memory_stride": null, "prototypes": "coarse", "background_tokens": false, "supervise_attention": false})',
    )
    parser.add_argument("--quantize-attention", action="store_true", help="quantise the memory attention too")
    parser.add_argument("--profile", type=Path, help="folder for ONNX Runtime profiler traces")
    parser.add_argument("--keep", type=Path, help="keep the exported models in this folder")
    parser.add_argument(
        "--end-to-end", type=int, default=0, metavar="N", help="also time the command's job on N frames (0: no)"
    )
    parser.add_argument("--end-to-end-rounds", type=int, default=2, help="timed jobs per engine for --end-to-end (2)")
    args = parser.parse_args(argv)
    args.engines = [engine for engine in args.engines.split(",") if engine]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    backbones = [name for name in args.backbones.split(",") if name]
    if args.weights and len(backbones) != 1:
        parser.error("--weights needs exactly one backbone (the one the weights are for)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]  # other processes' load: the figures of a busy machine are not comparable
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if args.keep:
            folder = args.keep
            folder.mkdir(parents=True, exist_ok=True)
        for backbone in backbones:
            for size in (int(value) for value in args.sizes.split(",")):
                rows.append(measure(args, backbone, size, folder))
    import onnxruntime

    result = {
        "benchmark": "onnx_speed",
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "load_average_1min": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},
        "weights": args.weights or "random (memory filled with random prototypes)",
        "targets": {**TARGETS, "lite0_int8_352_fps": LITE0_INT8_352_FPS},
        "versions": {
            "monai_ecrm": monai_ecrm.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "results": rows,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
