"""Training data pipeline throughput on Kvasir-SEG, cold and cached, and the share of a training step spent waiting.

Prints one JSON object:

- ``cold_images_per_s``: load + augment at ``--spatial-size`` with ``--workers`` DataLoader workers, no cache.
- ``cache_build_s`` and ``cached_images_per_s``: ``CacheDataset`` holding the deterministic part (load, resize,
  compact cast), then one epoch of augmentation only.
- ``train_loop``: a real training loop (the package's ``ECRMUNet``, or MONAI's ``FlexibleUNet`` if it cannot be
  built) fed by the cached pipeline; ``data_wait_share`` is the mean time ``next(batch)`` blocks divided by the mean
  step time, after ``--warmup-steps``. Target: at most 0.05.

Real data are read from ``../shared/data/kvasir_seg`` (``--data`` to change); the script exits with a message when
they are absent. Keep ``--num-images`` and ``--train-steps`` small on CPU machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from monai_ecrm.data import folder_datalist
from monai_ecrm.transforms import train_transforms

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kvasir_seg"


def _epoch_images_per_s(dataset, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False)
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def _network(backbone: str) -> tuple[torch.nn.Module, str]:
    try:
        from monai_ecrm.networks.nets import ECRMUNet

        return ECRMUNet(backbone=backbone), f"monai_ecrm ECRMUNet({backbone})"
    except Exception as error:  # the network is developed elsewhere in the project; fall back to MONAI's U-Net
        from monai.networks.nets import FlexibleUNet

        print(f"ECRMUNet unavailable ({error}); using FlexibleUNet", file=sys.stderr)
        return FlexibleUNet(3, 1, backbone=backbone, pretrained=False), f"monai FlexibleUNet({backbone})"


def _train_loop(dataset, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    network, name = _network(args.backbone)
    network = network.to(device).train()
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    waits, steps = [], []
    total_steps = args.warmup_steps + args.train_steps
    done = 0
    mark = time.perf_counter()
    while done < total_steps:
        iterator = iter(loader)
        while done < total_steps:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            got_batch = time.perf_counter()
            images = batch["image"].as_tensor().to(device, non_blocking=True)
            labels = batch["label"].as_tensor().to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            # ECRMUNet's default ECRM writes its memory from the label in training
            outputs = network(images, labels=labels) if name.startswith("monai_ecrm") else network(images)
            loss = loss_function(outputs, labels)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            if done >= args.warmup_steps:
                waits.append(got_batch - mark)
                steps.append(end - mark)
            mark = end
            done += 1
    wait, step = sum(waits) / len(waits), sum(steps) / len(steps)
    return {
        "model": name,
        "device": str(device),
        "batch_size": args.batch_size,
        "measured_steps": len(steps),
        "step_s_mean": round(step, 4),
        "data_wait_s_mean": round(wait, 4),
        "data_wait_share": round(wait / step, 4),
        "target_share": 0.05,
        "meets_target": wait / step <= 0.05,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and masks/")
    parser.add_argument("--num-images", type=int, default=160, help="pairs used (0: all)")
    parser.add_argument("--spatial-size", type=int, default=352)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=6, help="measured training steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="unmeasured first steps (worker start-up)")
    parser.add_argument("--backbone", default="efficientnet-b0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-train-loop", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "images").is_dir():
        raise SystemExit(f"Kvasir-SEG not found at {args.data} (see ../shared/data/SOURCES.md); pass --data")
    set_determinism(seed=0)
    items = folder_datalist(args.data)
    items = items[: args.num_images] if args.num_images > 0 else items
    preset = train_transforms(spatial_size=args.spatial_size)
    result: dict = {
        "dataset": str(args.data.name),
        "num_images": len(items),
        "spatial_size": args.spatial_size,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    result["cold_images_per_s"] = round(_epoch_images_per_s(Dataset(items, preset), args.batch_size, args.workers), 1)
    start = time.perf_counter()
    cached = CacheDataset(items, preset, cache_rate=1.0, num_workers=max(args.workers, 1), progress=False)
    result["cache_build_s"] = round(time.perf_counter() - start, 2)
    result["cached_images_per_s"] = round(_epoch_images_per_s(cached, args.batch_size, args.workers), 1)
    if not args.skip_train_loop:
        result["train_loop"] = _train_loop(cached, args)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
