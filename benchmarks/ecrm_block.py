"""ECRM block: forward+backward time and memory, ours vs the seed listing, side by side in one run.

Each (implementation, shape) pair runs in a fresh Python process so that peak resident memory is its own.
Memory figure: growth of the process's peak resident set size (``ru_maxrss``) during one training step
(forward + backward) above the peak reached after a warm no-grad step at the same shape.

Usage: ``python benchmarks/ecrm_block.py [--repeats 5] [--seed-listing PATH]``; prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "seed_shape": {"batch": 8, "channels": 512, "size": 11, "slots": 20},
    "large": {"batch": 8, "channels": 512, "size": 44, "slots": 4096},
}
DEFAULT_SEED = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "seed_ecrm.py"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(impl: str, shape: dict, seed_path: str):
    import torch

    torch.manual_seed(0)
    channels, slots = shape["channels"], shape["slots"]
    if impl == "seed":
        spec = importlib.util.spec_from_file_location("seed_ecrm", seed_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        block = module.ECRM(bank_size=slots, feat_channels=channels, num_classes=1)
        block.bank.copy_(torch.rand_like(block.bank))
        block.bank_full = True

        def step(x):
            return block(x, flag="train")

    else:
        from monai_ecrm.networks.blocks import ECRM

        block = ECRM(2, channels, num_classes=1, bank_size=slots, feat_channels=512, key_channels=256)
        with torch.no_grad():
            block.memory.memory.copy_(torch.rand_like(block.memory.memory))
            block.memory.filled.fill_(slots)

        def step(x):
            return block(x)

    block.train()
    return block, step


def worker(impl: str, shape_name: str, repeats: int, seed_path: str) -> dict:
    import torch

    shape = SHAPES[shape_name]
    block, step = _build(impl, shape, seed_path)
    x = torch.randn(shape["batch"], shape["channels"], shape["size"], shape["size"])
    with torch.no_grad():
        step(x)
        step(x)
    baseline = _peak_rss_mb()
    times = []
    for i in range(repeats + 1):
        x.requires_grad_(False)
        start = time.perf_counter()
        out, aux = step(x)
        (out.float().mean() + aux.float().mean()).backward()
        elapsed = time.perf_counter() - start
        block.zero_grad(set_to_none=True)
        if i == 0:
            growth = _peak_rss_mb() - baseline
        else:
            times.append(elapsed)
    times.sort()
    return {"impl": impl, "shape": shape_name, "median_step_s": times[len(times) // 2], "memory_growth_mb": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per measurement")
    parser.add_argument("--seed-listing", default=str(DEFAULT_SEED), help="path of the seed's seed_ecrm.py")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker[0], args.worker[1], args.repeats, args.seed_listing)))
        return
    if not Path(args.seed_listing).is_file():
        sys.exit(f"seed listing not found at {args.seed_listing}: pass --seed-listing PATH")
    results = {"threads": args.threads, "repeats": args.repeats, "shapes": SHAPES, "runs": {}, "ratios": {}}
    for shape_name in SHAPES:
        for impl in ("seed", "ours"):
            cmd = [sys.executable, __file__, "--worker", impl, shape_name, "--repeats", str(args.repeats)]
            cmd += ["--seed-listing", args.seed_listing, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results["runs"][f"{impl}/{shape_name}"] = json.loads(out.strip().splitlines()[-1])
        ours, seed = results["runs"][f"ours/{shape_name}"], results["runs"][f"seed/{shape_name}"]
        results["ratios"][shape_name] = {
            "time_ours_over_seed": ours["median_step_s"] / seed["median_step_s"],
            "memory_growth_ours_over_seed": ours["memory_growth_mb"] / max(seed["memory_growth_mb"], 1e-9),
        }
    results["targets"] = {
        "seed_shape time ratio <= 1.0": results["ratios"]["seed_shape"]["time_ours_over_seed"] <= 1.0,
        "large time ratio <= 0.6": results["ratios"]["large"]["time_ours_over_seed"] <= 0.6,
        "large memory ratio <= 0.5": results["ratios"]["large"]["memory_growth_ours_over_seed"] <= 0.5,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
