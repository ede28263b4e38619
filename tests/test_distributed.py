"""Distributed training (issue #7): the ECRM memory under DDP with 2 CPU ranks (gloo), the memory refresh, and the
bundle's ``multi_gpu_train.json`` (+ ``multi_gpu_train_cpu.json``) run with torchrun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn_ranks import run_ranks

from monai_ecrm.handlers.memory_refresh import refresh_memory
from monai_ecrm.networks.blocks import MemoryBank
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "polyp_ecrm"
SIZE = 64
STEPS = 4
BANK = 5  # smaller than the prototypes of two steps: the ring wraps
#: DCRNet's block (one prototype per image, written before the attention: the gather order shows in every step)
TINY = {"backbone": "resnet10", "bank_size": BANK, "ecrm_channels": 16, "key_channels": 8, "decoder_channels": (8,) * 5}
TINY.update(DCRNET_ECRM_OPTIONS)


def _numpy_state(bank: MemoryBank) -> dict:
    # numpy copies: tensors would travel as shared memory that vanishes when the worker exits
    return {name: buffer.detach().numpy().copy() for name, buffer in bank.named_buffers()}


def _refresh_images(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randn(3, SIZE, SIZE, generator=generator) for _ in range(count)]


def _ddp_worker(rank: int, world_size: int, reference_path: str) -> dict:
    torch.manual_seed(0)
    net = ECRMUNet(**TINY)
    bank = net.ecrm.memory
    written: list = []  # the prototypes this rank hands to the memory, step by step
    enqueue = bank.enqueue

    def _record(prototypes: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        written.append((prototypes.detach().numpy().copy(), sources.numpy().copy()))
        enqueue(prototypes, sources)

    bank.enqueue = _record
    aux: list[torch.Tensor] = []
    net.ecrm.register_forward_hook(lambda module, args, output: aux.append(output[1]))
    model = torch.nn.parallel.DistributedDataParallel(net)  # default: buffers broadcast from rank 0 each forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(10 + rank)
    states = []
    for _ in range(STEPS):
        batch = 2 + rank  # unequal local batches: rank order is visible in the slots
        image = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        label = (torch.rand(batch, 1, SIZE, SIZE, generator=generator) > 0.5).float()
        aux.clear()
        cases = 1000 * rank + 10 * len(states) + torch.arange(batch)  # case identities, gathered with the memory
        logits = model(image, sources=cases)
        aux_label = F.interpolate(label, size=aux[0].shape[2:], mode="area")
        loss = F.binary_cross_entropy_with_logits(logits, label)
        loss = loss + 0.4 * F.binary_cross_entropy_with_logits(aux[0], aux_label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append(_numpy_state(bank))
    bank.enqueue = enqueue
    running_mean = net.encoder.bn1.running_mean.numpy().copy()

    if rank == 0:
        torch.save(net.state_dict(), reference_path)
    dist.barrier()
    # the same images on every rank (the bundle's refresh loader): rank 0 writes, then broadcasts
    replicated_count = refresh_memory(model, _refresh_images(7))
    replicated = _numpy_state(bank)
    # each rank its shard: writes gathered in rank order
    images = [{"image": image} for image in _refresh_images(6)]
    sampler = torch.utils.data.distributed.DistributedSampler(images, shuffle=False)
    loader = torch.utils.data.DataLoader(images, batch_size=2, sampler=sampler)
    sharded_count = refresh_memory(model, loader)
    sharded = _numpy_state(bank)
    # unequal shard lengths: a clear error on every rank instead of a hang in the gather
    uneven = torch.utils.data.DataLoader(images[: 3 - rank], batch_size=1)
    try:
        refresh_memory(model, uneven, distributed="sharded")
        uneven_error = ""
    except ValueError as error:
        uneven_error = str(error)
    return {
        "states": states,
        "written": written,
        "running_mean": running_mean,
        "replicated": (replicated_count, replicated),
        "sharded": (sharded_count, sharded),
        "uneven_error": uneven_error,
    }


def _assert_same_bank(first: dict, second: dict, what: str) -> None:
    for name in ("memory", "pointer", "filled", "rejected", "sources"):
        assert (first[name] == second[name]).all(), f"{what}: ranks disagree on {name}"


def test_memory_identical_on_every_rank_and_equal_to_one_process_writing_in_rank_order(tmp_path):
    reference_path = str(tmp_path / "rank0.pt")
    results = run_ranks(_ddp_worker, reference_path)

    # training: after every step the ranks hold the same memory ...
    for step in range(STEPS):
        _assert_same_bank(results[0]["states"][step], results[1]["states"][step], f"step {step}")
    # ... which is what one process gets writing each step's global batch in rank order
    single = MemoryBank(BANK, 1, TINY["ecrm_channels"]).train()
    for step in range(STEPS):
        for rank in range(2):
            local, cases = (torch.from_numpy(array) for array in results[rank]["written"][step])
            assert local.shape[0] == 2 + rank
            single.enqueue(local, cases)
        for name, buffer in single.named_buffers():
            assert torch.equal(torch.from_numpy(results[0]["states"][step][name]), buffer), f"step {step}: {name}"
    assert int(single.filled) == BANK and int(single.pointer) == (STEPS * 5) % BANK

    # the BatchNorm statistics differ between ranks after the last step (DDP broadcasts them before a forward) ...
    assert not (results[0]["running_mean"] == results[1]["running_mean"]).all()
    # ... yet the refresh from the same images gives one memory: rank 0's, exactly as one process writes it
    count0, replicated0 = results[0]["replicated"]
    count1, replicated1 = results[1]["replicated"]
    assert count0 == count1 == 7
    _assert_same_bank(replicated0, replicated1, "replicated refresh")
    net = ECRMUNet(**TINY)
    net.load_state_dict(torch.load(reference_path, weights_only=True))
    assert refresh_memory(net, _refresh_images(7)) == 7
    torch.testing.assert_close(torch.from_numpy(replicated0["memory"]), net.ecrm.memory.memory)
    assert int(replicated0["pointer"]) == int(net.ecrm.memory.pointer) == 7 % BANK
    assert int(replicated0["filled"]) == BANK

    # sharded refresh: every rank its shard, the writes gathered; same memory everywhere
    count0, sharded0 = results[0]["sharded"]
    count1, sharded1 = results[1]["sharded"]
    assert count0 == count1 == 6
    _assert_same_bank(sharded0, sharded1, "sharded refresh")
    assert int(sharded0["filled"]) == BANK and int(sharded0["pointer"]) == 6 % BANK
    for rank in range(2):
        assert "yield between 2 and 3 batches" in results[rank]["uneven_error"]


# ------------------------------------------------------------------------------------------------ bundle
def _merged_config(*names: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in names])
    return parser


def test_multi_gpu_config_disables_only_the_writing_handlers_on_other_ranks():
    parser = _merged_config("train.json", "multi_gpu_train.json")
    rank_gated = "$torch.distributed.get_rank() > 0"
    for section, handlers in (("train", parser["train"]["handlers"]), ("validate", parser["validate"]["handlers"])):
        gated = [h["_target_"].rsplit(".", 1)[-1] for h in handlers if h.get("_disabled_") == rank_gated]
        kept = [h["_target_"].rsplit(".", 1)[-1] for h in handlers if h.get("_disabled_") != rank_gated]
        if section == "train":
            assert gated == ["MemoryBankHandler", "StatsHandler", "TensorBoardStatsHandler", "ProgressBarHandler"]
            for needed in (
                "CosineScheduleHandler",
                "AuxSupervisionHandler",
                "ValidationHandler",
                "BatchNormRefreshHandler",
                "MemoryRefreshHandler",
            ):
                assert needed in kept, f"{needed} must run on every rank"
        else:
            # rank 0 writes model.pt and its record
            assert gated == ["StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver", "ModelRecordHandler"]
            assert kept == [
                "PreserveRandomState",
                "PreserveNetworkState",
                "BatchNormRefreshHandler",
                "MemoryRefreshHandler",
                "AuxSupervisionHandler",
            ]
    assert parser["train"]["checkpoint_saver"]["_disabled_"] == rank_gated
    assert parser["train"]["checkpoint_pruner"]["_disabled_"] == rank_gated
    assert parser["train"]["checkpoint_loader"].get("_disabled_") != rank_gated, "resume loads on every rank"
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["dist_backend"] == "nccl"
    cpu = _merged_config("train.json", "multi_gpu_train.json", "multi_gpu_train_cpu.json")
    assert cpu["dist_backend"] == "gloo" and cpu["network"]["device_ids"] is None


@pytest.mark.slow
def test_bundle_trains_with_torchrun_on_two_cpu_ranks_and_its_checkpoint_loads_in_one_process(tmp_path):
    bundle = tmp_path / "polyp_ecrm"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "runs"))
    configs = ",".join(
        f"'{bundle / 'configs' / name}'" for name in ("train.json", "multi_gpu_train.json", "multi_gpu_train_cpu.json")
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file", f"[{configs}]", "--bundle_root", str(bundle),
        "--max_epochs", "1", "--spatial_size", str(SIZE), "--batch_size", "2", "--num_workers", "0",
        "--progress_bar", "False", "--backbone", "resnet10", "--bank_size", "8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in time (hung ranks?):\n" + output.decode(errors="replace")[-4000:])
    log = output.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    with pytest.raises(ProcessLookupError):  # no rank left behind in the session torchrun led
        os.killpg(proc.pid, 0)
    assert log.count("ECRM memory refreshed") == 4, "both refreshes (validation start, end of training) on 2 ranks"

    models = bundle / "models"
    written = sorted(path.name for path in models.iterdir())
    assert written == ["checkpoint_epoch=1.pt", "checkpoint_final.pt", "model.json", "model.pt"], "rank 0 writes, once"
    checkpoint = torch.load(models / "checkpoint_final.pt", weights_only=True, map_location="cpu")
    assert {"network", "optimizer", "trainer", "rng"} <= set(checkpoint)
    for state in (checkpoint["network"], torch.load(models / "model.pt", weights_only=True, map_location="cpu")):
        assert not any(key.startswith("module.") for key in state)
        net = ECRMUNet(backbone="resnet10", bank_size=8)
        net.load_state_dict(state, strict=True)
        assert int(net.ecrm.memory.filled) > 0
