from __future__ import annotations

import warnings

import pytest
import torch
from spawn_ranks import run_ranks

from monai_ecrm.networks.blocks import ECRM, MemoryBank, MemorySizeMismatchError


def _protos(values, num_classes=1, channels=3):
    """One prototype per value, every entry equal to that value (easy to read back)."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, num_classes, channels).clone()


def _ids(bank: MemoryBank) -> list[float]:
    return bank.slots()[:, 0, 0].tolist()


def test_ring_buffer_wraps_around_in_order():
    bank = MemoryBank(5, 1, 3).train()
    bank.enqueue(_protos([0, 1, 2]))
    bank.enqueue(_protos([3, 4, 5, 6]))  # 7 writes into 5 slots
    assert _ids(bank) == [2, 3, 4, 5, 6], "oldest-first order after wrap-around"
    assert int(bank.pointer) == 2 and int(bank.filled) == 5


def test_batch_larger_than_memory_keeps_newest():
    bank = MemoryBank(5, 1, 3).train()
    bank.enqueue(_protos([0]))
    bank.enqueue(_protos(list(range(10, 17))))
    assert _ids(bank) == [12, 13, 14, 15, 16]
    assert int(bank.filled) == 5


def test_partial_fill_slots_and_reset():
    bank = MemoryBank(4, 2, 3).train()
    bank.enqueue(_protos([7, 8], num_classes=2))
    assert bank.slots().shape == (2, 2, 3)
    assert _ids(bank) == [7, 8]
    bank.reset()
    assert bank.is_empty() and int(bank.pointer) == 0 and bank.slots().shape[0] == 0
    assert torch.count_nonzero(bank.memory) == 0


def test_eval_never_writes():
    bank = MemoryBank(4, 1, 3).eval()
    bank.enqueue(_protos([1, 2]))
    assert bank.is_empty(), "a module in eval mode must not write into its memory"


def test_non_finite_prototypes_refused_counted_and_warned():
    bank = MemoryBank(4, 1, 3).train()
    batch = _protos([1, 2, 3])
    batch[1, 0, 2] = float("nan")
    batch[2, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="refused 2 of 3"):
        bank.enqueue(batch)
    assert _ids(bank) == [1]
    assert int(bank.rejected) == 2
    assert torch.isfinite(bank.memory).all()
    with pytest.warns(UserWarning, match="rejected so far: 3"):
        bank.enqueue(_protos([float("nan")]))
    assert int(bank.filled) == 1


def test_enqueue_takes_no_gradient_and_stores_float32():
    bank = MemoryBank(4, 1, 3).train()
    protos = _protos([1, 2]).requires_grad_(True)
    bank.enqueue(protos.bfloat16())
    assert not bank.memory.requires_grad and bank.memory.dtype == torch.float32


def test_wrong_prototype_shape_is_a_clear_error():
    bank = MemoryBank(4, 1, 3).train()
    with pytest.raises(ValueError, match=r"expected prototypes of shape \[B, 1, 3\]"):
        bank.enqueue(torch.zeros(2, 3))


def test_state_dict_round_trip_restores_everything():
    bank = MemoryBank(5, 1, 3).train()
    bank.enqueue(_protos([0, 1, 2, 3, 4, 5, 6]))
    with pytest.warns(UserWarning):
        bank.enqueue(_protos([float("nan")]))
    restored = MemoryBank(5, 1, 3)
    restored.load_state_dict(bank.state_dict())
    for name in ("memory", "pointer", "filled", "rejected"):
        assert torch.equal(getattr(restored, name), getattr(bank, name)), name
    restored.train().enqueue(_protos([9]))
    bank.enqueue(_protos([9]))
    assert _ids(restored) == _ids(bank) == [3, 4, 5, 6, 9]


def test_other_slot_count_is_a_clear_error_naming_both_sizes_and_policy():
    small = MemoryBank(3, 1, 3).train()
    small.enqueue(_protos([1, 2]))
    with pytest.raises(MemorySizeMismatchError) as err:
        MemoryBank(5, 1, 3).load_state_dict(small.state_dict())
    text = str(err.value)
    assert "ECRM memory" in text and "3 slots" in text and "has 5" in text
    assert "on_size_mismatch" in text and "reset" in text and "keep_newest" in text


def test_other_class_or_channel_count_is_always_an_error():
    bank = MemoryBank(3, 1, 3)
    with pytest.raises(MemorySizeMismatchError, match="another architecture"):
        MemoryBank(3, 1, 4, on_size_mismatch="reset").load_state_dict(bank.state_dict())


def test_size_mismatch_policies():
    big = MemoryBank(6, 1, 3).train()
    big.enqueue(_protos(list(range(8))))  # holds 2..7, oldest first
    with pytest.warns(UserWarning, match="keep_newest"):
        newest = MemoryBank(4, 1, 3, on_size_mismatch="keep_newest")
        newest.load_state_dict(big.state_dict())
    assert _ids(newest) == [4, 5, 6, 7] and int(newest.pointer) == 0
    newest.train().enqueue(_protos([8]))
    assert _ids(newest) == [5, 6, 7, 8], "the ring order continues after a keep_newest load"

    grown = MemoryBank(10, 1, 3, on_size_mismatch="keep_newest")
    with pytest.warns(UserWarning):
        grown.load_state_dict(big.state_dict())
    assert _ids(grown) == [2, 3, 4, 5, 6, 7] and int(grown.pointer) == 6

    with pytest.warns(UserWarning, match="reset"):
        fresh = MemoryBank(4, 1, 3, on_size_mismatch="reset")
        fresh.load_state_dict(big.state_dict())
    assert fresh.is_empty()


def test_ecrm_passes_policy_to_its_memory():
    trained = ECRM(2, 8, bank_size=3, feat_channels=8, key_channels=4)
    with pytest.raises(MemorySizeMismatchError, match="bank_size"):
        ECRM(2, 8, bank_size=5, feat_channels=8, key_channels=4).load_state_dict(trained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ECRM(2, 8, bank_size=5, feat_channels=8, key_channels=4, bank_size_mismatch="reset").load_state_dict(
            trained.state_dict()
        )


# ----------------------------------------------------------------------------------------------- distributed
def _gather_worker(rank: int, world_size: int) -> dict:
    bank = MemoryBank(7, 1, 3).train()
    # unequal batch sizes: rank 0 writes 2 prototypes per step, rank 1 writes 3
    for step in range(3):
        bank.enqueue(_protos([100 * step + 10 * rank + i for i in range(2 + rank)]))
    return {k: v.numpy().copy() for k, v in bank.state_dict().items()}


def test_distributed_gather_gives_identical_memory_in_rank_order():
    states = {
        rank: {k: torch.from_numpy(v) for k, v in state.items()} for rank, state in run_ranks(_gather_worker).items()
    }
    for name in ("memory", "pointer", "filled"):
        assert torch.equal(states[0][name], states[1][name]), f"ranks disagree on {name}"
    single = MemoryBank(7, 1, 3).train()
    for step in range(3):
        for rank in range(2):
            single.enqueue(_protos([100 * step + 10 * rank + i for i in range(2 + rank)]))
    assert torch.equal(states[0]["memory"], single.memory), "must equal one process writing the ranks in order"
    assert torch.equal(states[0]["memory"], single.memory), "must equal one process writing the ranks in order"
    assert torch.equal(states[0]["pointer"], single.pointer)
