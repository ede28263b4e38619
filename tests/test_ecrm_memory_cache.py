"""ECRM's eval-time cache of the memory side (keys, values, scaling of the frozen memory): the same outputs as the
computation at every forward, and every change of the memory or of the projections seen."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from monai_ecrm.handlers import refresh_memory
from monai_ecrm.networks.blocks import ECRM
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet

#: the two attention paths: SDPA (DCRNet's block) and the explicit attention with log-odds (ECRMUNet's default)
VARIANTS = {
    "sdpa": {},
    "odds": {"prototypes": "label", "background_tokens": True, "supervise_attention": True},
}


def _block(variant: str = "sdpa", **kwargs) -> ECRM:
    args = {"spatial_dims": 2, "in_channels": 16, "bank_size": 6, "feat_channels": 24, "key_channels": 8}
    args.update(VARIANTS[variant])
    args.update(kwargs)
    torch.manual_seed(0)
    return ECRM(**args)


def _fill(block: ECRM, slots: int | None = None, seed: int = 1) -> ECRM:
    memory = block.memory
    slots = memory.num_slots if slots is None else slots
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        memory.memory[:slots] = torch.rand(slots, memory.num_classes, memory.channels, generator=generator)
        memory.filled.fill_(slots)
        memory.pointer.fill_(slots % memory.num_slots)
    return block


def _frames(count: int = 4, batch: int = 1, seed: int = 2, size=(6, 5), channels: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *size, generator=generator) for _ in range(count)]


def _uncached(block: nn.Module, x: torch.Tensor, **kwargs):
    """The computation at every forward (the code before the cache): the same module, cache off."""
    ecrms = [module for module in block.modules() if isinstance(module, ECRM)]
    for module in ecrms:
        module.memory_cache = False
    try:
        with torch.no_grad():
            return block(x, **kwargs)
    finally:
        for module in ecrms:
            module.memory_cache = True


def _cached(block: nn.Module, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        return block(x, **kwargs)


def _assert_same(ours, theirs, **tolerance) -> None:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tolerance)


def _projection_calls(block: ECRM) -> list[int]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    block.memory_key.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("key_channels", [8, 16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_outputs_equal_the_computation_at_every_forward(variant, batch, key_channels):
    block = _fill(_block(variant, key_channels=key_channels)).eval()
    calls = _projection_calls(block)
    for x in _frames(5, batch):
        ours, theirs = _cached(block, x), _uncached(block, x)
        _assert_same(ours, theirs)
        # the same operations on the same values: the same bits (the keys' scaling is cached only where exact)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # 5 cached frames projected the memory once; the 5 uncached ones once each
    assert calls[0] == 1 + 5
    assert block._memory_cache is not None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_partly_filled_and_empty_memory(variant):
    block = _fill(_block(variant), slots=2).eval()
    for x in _frames(2):
        _assert_same(_cached(block, x), _uncached(block, x))
    empty = _block(variant).eval()
    for x in _frames(2):
        ours, theirs = _cached(empty, x), _uncached(empty, x)
        _assert_same(ours, theirs)
        assert torch.isfinite(ours[0]).all()
    assert empty._memory_cache is not None and empty._memory_cache[2] is None  # "empty" is cached too


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_training_write_is_seen_in_eval(variant):
    block = _fill(_block(variant), slots=2).eval()
    x = _frames(1)[0]
    before = _cached(block, x)
    block.train()
    train_x = _frames(1, batch=2, seed=5)[0]
    labels = (torch.rand(2, 1, 6, 5) > 0.5).float() if variant == "odds" else None
    with torch.no_grad():
        block(train_x, labels=labels)
    assert int(block.memory.filled) == 4
    block.eval()
    after = _cached(block, x)
    _assert_same(after, _uncached(block, x))
    assert not torch.allclose(after[0], before[0])
    # a write by the bank alone (its own training flag, the block in eval: the cache is kept, its stamp tells)
    block.memory.train()
    block.memory.enqueue(torch.rand(1, block.memory.num_classes, block.memory.channels))
    block.memory.eval()
    _assert_same(_cached(block, x), _uncached(block, x))
    assert not torch.allclose(_cached(block, x)[0], after[0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reset_is_seen(variant):
    block = _fill(_block(variant)).eval()
    x = _frames(1)[0]
    _cached(block, x)
    block.memory.reset()
    _assert_same(_cached(block, x), _uncached(block, x))
    _assert_same(_cached(block, x), _cached(_block(variant).eval(), x))  # the output of an empty memory


def test_load_state_dict_of_another_memory_is_seen():
    block = _fill(_block(), seed=1).eval()
    other = _fill(_block(), slots=3, seed=7).eval()
    x = _frames(1)[0]
    _cached(block, x)
    block.load_state_dict(other.state_dict())
    _assert_same(_cached(block, x), _cached(other, x))
    _assert_same(_cached(block, x), _uncached(block, x))
    # the projections too: another block's weights, same memory
    torch.manual_seed(3)
    weights = ECRM(2, 16, bank_size=6, feat_channels=24, key_channels=8).state_dict()
    weights = {key: value for key, value in weights.items() if not key.startswith("memory.")}
    block.load_state_dict(weights, strict=False)
    _assert_same(_cached(block, x), _uncached(block, x))


def test_load_state_dict_with_assign_is_seen():
    block = _fill(_block(), seed=1).eval()
    other = _fill(_block(), slots=4, seed=9).eval()
    x = _frames(1)[0]
    _cached(block, x)
    block.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    _assert_same(_cached(block, x), _cached(other, x))


class _Net(nn.Module):
    def __init__(self, ecrm: ECRM) -> None:
        super().__init__()
        self.ecrm = ecrm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ecrm(x)[0]


def test_refresh_memory_is_seen():
    net = _Net(_fill(_block())).eval()
    x = _frames(1)[0]
    before = _cached(net, x)
    generator = torch.Generator().manual_seed(11)
    images = [torch.randn(16, 6, 5, generator=generator) for _ in range(3)]
    assert refresh_memory(net, images) == 3
    assert int(net.ecrm.memory.filled) == 3 and not net.training
    after = _cached(net, x)
    _assert_same(after, _uncached(net, x))
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_moving_to_another_dtype_is_seen(variant):
    block = _fill(_block(variant)).eval()
    x = _frames(1)[0]
    _cached(block, x)
    block.double()
    assert block._memory_cache is None  # .to() / .double() / .cuda() drop it (and the old tensors it held)
    ours = _cached(block, x.double())
    assert ours[0].dtype == torch.float64
    assert block._memory_cache[2][3].dtype == torch.float64
    _assert_same(ours, _uncached(block, x.double()))
    block.float()
    _assert_same(_cached(block, x), _uncached(block, x))


@pytest.mark.parametrize("key_channels", [8, 16])  # 16: the cache scales the keys (exact), 8: the scores
def test_bf16_autocast_on_and_off(key_channels):
    block = _fill(_block("odds", key_channels=key_channels)).eval()
    x = _frames(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = _cached(block, x), _uncached(block, x)
    assert ours[0].dtype == torch.bfloat16
    _assert_same(ours, theirs)
    _assert_same(_cached(block, x), _uncached(block, x))  # autocast off: float32 keys again


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_in_place_changes_of_memory_and_weights_are_seen(variant):
    block = _fill(_block(variant)).eval()
    x = _frames(1)[0]
    _cached(block, x)
    with torch.no_grad():
        block.memory.memory[1] = 2.0 * block.memory.memory[1]  # a direct write, as tests and benchmarks do
    _assert_same(_cached(block, x), _uncached(block, x))
    with torch.no_grad():
        block.memory_key[0].weight.mul_(1.5)
        block.memory_value[0].bias.add_(0.25)
    _assert_same(_cached(block, x), _uncached(block, x))
    with torch.no_grad():
        block.memory.filled.fill_(3)
    _assert_same(_cached(block, x), _uncached(block, x))
    # a write no version counter sees needs mark_changed (or clear_memory_cache)
    block.memory.memory.data.mul_(0.5)
    block.memory.mark_changed()
    _assert_same(_cached(block, x), _uncached(block, x))
    block.memory_value[0].weight.data.mul_(0.5)
    block.clear_memory_cache()
    _assert_same(_cached(block, x), _uncached(block, x))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_recomputes_and_gradients_reach_the_memory_projections(variant):
    block = _fill(_block(variant)).eval()
    x = _frames(1, batch=2)[0]
    _cached(block, x)
    assert block._memory_cache is not None
    block.train()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    labels = (torch.rand(2, 1, 6, 5) > 0.5).float() if variant == "odds" else None
    features, aux = block(x, labels=labels)
    assert block._memory_cache is None  # training drops it
    (features.square().mean() + aux.mean()).backward()
    for projection in (block.memory_key[0], block.memory_value[0]):
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    optimizer.step()  # new weights (and, from the write, a new memory): eval must see them
    block.eval()
    for frame in _frames(2):
        _assert_same(_cached(block, frame), _uncached(block, frame))


def test_eval_with_gradient_recomputes_and_gradients_flow():
    block = _fill(_block()).eval()
    x = _frames(1)[0]
    _cached(block, x)
    features, _ = block(x)  # eval, gradient on: no cache, the projections are in the graph
    features.mean().backward()
    assert block.memory_key[0].weight.grad is not None and block.memory_key[0].weight.grad.abs().sum() > 0
    _assert_same(features.detach(), _uncached(block, x)[0])


def test_inference_mode_then_no_grad():
    block = _fill(_block("odds")).eval()
    x = _frames(1)[0]
    with torch.inference_mode():
        first = block(x)
    _assert_same(first, _uncached(block, x))
    _assert_same(_cached(block, x), _uncached(block, x))


def test_script_and_deepcopy_of_a_block_holding_a_cache():
    block = _fill(_block("odds")).eval()
    frames = _frames(3)
    _cached(block, frames[0])
    scripted = torch.jit.script(copy.deepcopy(block)).eval()
    for x in frames:
        with torch.no_grad():
            _assert_same(scripted(x), _cached(block, x))
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.memory.memory.mul_(0.5)
    _assert_same(_cached(twin, frames[0]), _uncached(twin, frames[0]))
    _assert_same(_cached(block, frames[0]), _uncached(block, frames[0]))


def test_tracing_does_not_capture_the_cache():
    block = _fill(_block()).eval()
    x = _frames(1)[0]
    _cached(block, x)  # a cache is held while tracing
    with torch.no_grad():
        traced = torch.jit.trace(block, x, check_trace=False)
    # the trace reads the memory buffer and projects it: an in-place change of the memory reaches it
    with torch.no_grad():
        block.memory.memory.mul_(0.5)
        _assert_same(traced(x), _uncached(block, x))


def test_one_model_used_by_several_threads():
    block = _fill(_block("odds")).eval()
    frames = _frames(6)
    expected = [_uncached(block, x) for x in frames]
    results: dict[int, list] = {}

    def run(index: int) -> None:
        results[index] = [_cached(block, x) for x in frames]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outputs in results.values():
        for ours, theirs in zip(outputs, expected):
            _assert_same(ours, theirs)


@pytest.mark.parametrize("options", [{}, DCRNET_ECRM_OPTIONS], ids=["defaults", "dcrnet"])
def test_ecrm_unet_frames_equal_the_computation_at_every_forward(options):
    small = {"bank_size": 4, "ecrm_channels": 32, "key_channels": 16, "decoder_channels": (32, 16, 16, 8, 8)}
    torch.manual_seed(0)
    net = ECRMUNet(backbone="resnet18", use_icrm=False, **small, **options)
    bank = net.ecrm.memory
    with torch.no_grad():
        bank.memory.copy_(torch.rand_like(bank.memory))
        bank.filled.fill_(bank.num_slots)
    net.eval()
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(1, 3, 64, 64, generator=generator)
        _assert_same(_cached(net, x), _uncached(net, x))
    assert net.ecrm._memory_cache is not None
