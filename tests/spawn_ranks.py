"""Run a function on several CPU ranks (gloo) in spawned processes and collect what each rank reports."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, queue: Any, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # the worker returns numpy arrays or plain values: tensors would travel as shared memory that vanishes
        # when this process exits
        queue.put((rank, worker(rank, world_size, *args)))
        dist.barrier()  # with gloo, a rank leaving early can make the other abort
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable, *args: Any, world_size: int = 2, timeout: float = 240) -> dict[int, Any]:
    """``worker(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns ``{rank: result}``. Fails when a
    rank does not report in ``timeout`` seconds or exits with an error; never leaves a process behind."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, port, queue, worker, args)) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=timeout)
            results[rank] = result
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return results
