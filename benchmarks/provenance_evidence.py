"""Does memory provenance mean something? (issue #16, item 5) Three checks on a trained ECRMUNet:

1. own case: the memory is filled (``refresh_memory``, with case names) from ``--cases`` Kvasir-SEG training images;
   feeding each of those images back, how often is its own slot the one with the largest attention share
   (``ECRMUNet.memory_attention``)? Chance is 1 / filled slots; the go/no-go is 5x chance.
2. permutation: permuting the memory's slots permutes the shares the same way (max abs difference).
3. spread: the mean entropy of the shares (normalised by log(filled)) on the Kvasir-SEG test set, whose dataset
   filled the memory, and on CVC-ClinicDB's, which did not: a memory that distinguishes cases should spread the
   attention of pictures from elsewhere more.

The weights: an accuracy-protocol run folder (``--run``: ``final_model.pt`` + ``result.json``) or a model file with its
record (``--model``: a bundle's ``models/model.pt`` beside ``model.json``), read with ``monai_ecrm.record``.
Pictures are preprocessed as at evaluation (the run's size, its normalisation). Prints JSON.

    python benchmarks/provenance_evidence.py --run /work/runs/screen128/ecrm-pretrained-seed0
    python benchmarks/provenance_evidence.py --model ../runs/bundle256/ecrm-seed0/polyp_ecrm/models/model.pt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polyp_accuracy as pa  # noqa: E402

from monai_ecrm.handlers import refresh_memory  # noqa: E402
from monai_ecrm.record import load_network  # noqa: E402


def _images(items, preprocessing) -> list[torch.Tensor]:
    return [torch.as_tensor(preprocessing(dict(item))["image"]) for item in items]


def _shares(net, images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([net.memory_attention(image[None]) for image in images])


def _entropy(shares: torch.Tensor, filled: int) -> float:
    p = shares[:, :filled].clamp_min(1e-12)
    return float((-(p * p.log()).sum(dim=1) / math.log(filled)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pa.add_model_arguments(parser)
    parser.add_argument("--data", type=Path, default=pa.DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=0, help="memory cases (default: the model's bank size)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = pa.model_file(args)
    net, record = load_network(model_path)
    net.eval()
    size = record["preprocessing"]["spatial_size"][0]
    normalization = record["preprocessing"]["normalization"]
    bank = net.ecrm.memory.num_slots
    cases = min(args.cases or bank, bank)
    pargs = pa.parse_args(
        ["--data", str(args.data), "--size", str(size), "--backbone", record["network"]["kwargs"]["backbone"]]
    )
    lists = pa.load_datalists(pargs)
    preprocessing = pa.full_size_eval_transforms(size, normalization=normalization)
    kvasir_train = [item for item in lists["train"] if "kvasir" in str(item["image"])][-cases:]
    memory_items = [{**item, **preprocessing(dict(item))} for item in kvasir_train]
    memory_items = [{"image": item["image"], "label": item["label"]} for item in memory_items]
    refresh_memory(net, memory_items, source_names=pa._ids(kvasir_train))
    filled = int(net.ecrm.memory.filled)
    own = _shares(net, [item["image"] for item in memory_items])
    slot_of_case = {int(source): slot for slot, source in enumerate(net.ecrm.memory.sources.tolist()) if source >= 0}
    top1 = [int(own[case].argmax()) == slot_of_case[case] for case in range(len(memory_items)) if case in slot_of_case]
    rank_of_own = [
        int((own[case] > own[case, slot_of_case[case]]).sum()) + 1
        for case in range(len(memory_items))
        if case in slot_of_case
    ]
    # permutation
    order = torch.randperm(bank, generator=torch.Generator().manual_seed(0))
    permuted = load_network(model_path)[0].eval()
    permuted.load_state_dict(net.state_dict())
    with torch.no_grad():
        permuted.ecrm.memory.memory.copy_(net.ecrm.memory.memory[order])
        permuted.ecrm.memory.sources.copy_(net.ecrm.memory.sources[order])
    sample = [item["image"] for item in memory_items[:4]]
    permutation_error = float((_shares(permuted, sample) - _shares(net, sample)[:, order]).abs().max())
    spread = {
        name: _entropy(_shares(net, _images(items, preprocessing)), filled) for name, items in lists["test"].items()
    }
    chance = 1.0 / filled
    rate = float(np.mean(top1)) if top1 else float("nan")
    report = {
        "model_file": str(model_path),
        "model": record["network"]["kwargs"],
        "spatial_size": size,
        "memory_cases": filled,
        "own_case_top1_rate": rate,
        "chance": chance,
        "rate_over_chance": rate / chance,
        "go": rate >= 5 * chance,
        "own_case_mean_rank": float(np.mean(rank_of_own)),
        "permutation_max_abs_error": permutation_error,
        "mean_normalised_entropy": spread,
        "memory_filled_from": "kvasir (training split)",
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
