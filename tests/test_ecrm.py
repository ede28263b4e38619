from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from monai_ecrm.networks.blocks import ECRM, ICRM, class_prototypes

SEED_LISTING = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "seed_ecrm.py"


def _seed_module():
    if not SEED_LISTING.is_file():
        pytest.skip(f"seed listing not found at {SEED_LISTING} (../shared/reference is needed as a test oracle)")
    spec = importlib.util.spec_from_file_location("seed_ecrm", SEED_LISTING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small(**kwargs) -> ECRM:
    args = {"spatial_dims": 2, "in_channels": 16, "bank_size": 6, "feat_channels": 24, "key_channels": 8}
    args.update(kwargs)
    torch.manual_seed(0)
    return ECRM(**args)


def _fill(block: ECRM, slots: int | None = None) -> ECRM:
    memory = block.memory
    slots = memory.num_slots if slots is None else slots
    with torch.no_grad():
        memory.memory[:slots] = torch.rand(slots, memory.num_classes, memory.channels)
        memory.filled.fill_(slots)
        memory.pointer.fill_(slots % memory.num_slots)
    return block


def test_prototypes_and_coarse_mask_equal_the_seed():
    seed = _seed_module().ECRM(bank_size=4, feat_channels=32, num_classes=1).eval()
    for module in seed.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    ours = ECRM(2, 32, num_classes=1, bank_size=4, feat_channels=512).eval()
    with torch.no_grad():
        ours.coarse.conv.weight.copy_(seed.L.weight)
        ours.coarse.conv.bias.copy_(seed.L.bias)
        ours.embed.conv.weight.copy_(seed.X[0].weight)
        ours.embed.adn.N.load_state_dict(seed.X[1].state_dict())
    x = torch.randn(3, 32, 11, 9)
    with torch.no_grad():
        seed_aux, seed_protos, _, seed_features = seed.get_prototype(x)
        aux = ours.coarse(x)
        features = ours.embed(x)
        protos = class_prototypes(aux, features)
    torch.testing.assert_close(aux, seed_aux)
    torch.testing.assert_close(features, seed_features)
    torch.testing.assert_close(protos, seed_protos.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_equals_naive_per_sample_reference():
    block = _fill(_small(num_classes=2)).eval()
    x = torch.randn(3, 16, 5, 4)
    with torch.no_grad():
        features = block.embed(x)
        ours = block.attend(features)
        queries = block.query(features)
        tokens = block.memory.memory.reshape(-1, block.feat_channels)
        keys, values = block.memory_key(tokens), block.memory_value(tokens)
        expected = torch.zeros_like(queries)
        for b in range(x.shape[0]):
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    logits = torch.stack([queries[b, :, i, j] @ keys[m] for m in range(keys.shape[0])])
                    weights = torch.softmax(logits / math.sqrt(block.key_channels), dim=0)  # over the memory slots
                    expected[b, :, i, j] = (weights[:, None] * values).sum(0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_eval_output_of_a_sample_independent_of_the_rest_of_the_batch():
    block = _fill(_small()).eval()
    x = torch.randn(4, 16, 7, 7)
    other = x.clone()
    other[1:] = torch.randn(3, 16, 7, 7) * 5
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0][0], block(other)[0][0])
        torch.testing.assert_close(block(x[:1])[0][0], block(x)[0][0], atol=1e-5, rtol=1e-5)


def test_eval_leaves_memory_byte_identical():
    block = _fill(_small(), slots=3).eval()
    before = {k: v.clone() for k, v in block.memory.state_dict().items()}
    with torch.no_grad():
        block(torch.randn(2, 16, 6, 6))
    for key, value in block.memory.state_dict().items():
        assert torch.equal(value, before[key]), f"eval changed memory {key}"


def test_training_writes_the_batch_prototypes_then_attends():
    block = _small(bank_size=4).train()
    x = torch.randn(3, 16, 6, 6)
    reference = copy.deepcopy(block)
    block(x)
    with torch.no_grad():
        expected = class_prototypes(reference.coarse(x), reference.embed(x))
    assert int(block.memory.filled) == 3
    torch.testing.assert_close(block.memory.slots(), expected)


def test_empty_memory_gives_zero_context_not_a_crash():
    block = _small().eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        features, aux = block(x)
        embedded = block.embed(x)
        context = torch.zeros_like(block.query(embedded))
        expected = block.fuse_norm_act(block.fuse_features(embedded) + block.fuse_context(block.project(context)))
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, expected)


def test_no_gradient_reaches_memory_and_coarse_conv_learns_through_aux_only():
    block = _small().train()
    x = torch.randn(2, 16, 6, 6)
    features, aux = block(x)
    features.sum().backward(retain_graph=True)
    assert not block.memory.memory.requires_grad
    grad = block.coarse.conv.weight.grad
    # in training the coarse mask reaches the output with weight 0 (for DDP's unused-parameter search): no signal
    assert grad is None or not grad.any(), "the main output must not back-propagate into the memory write"
    aux.sum().backward()
    assert block.coarse.conv.weight.grad is not None and block.coarse.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "spatial_dims,in_channels,num_classes,bank_size,feat_channels,batch",
    [(2, 16, 1, 1, 16, 1), (2, 1024, 3, 4, 64, 2), (3, 32, 3, 5, 48, 2), (3, 16, 1, 1, 16, 1)],
)
def test_shapes_batch_one_one_slot_multiclass_3d(
    spatial_dims, in_channels, num_classes, bank_size, feat_channels, batch
):
    block = ECRM(spatial_dims, in_channels, num_classes, bank_size, feat_channels, key_channels=16).train()
    spatial = (5,) * spatial_dims
    x = torch.randn(batch, in_channels, *spatial)
    for _ in range(2):
        features, aux = block(x)
        (features.mean() + aux.mean()).backward()
    assert features.shape == (batch, feat_channels, *spatial)
    assert aux.shape == (batch, num_classes, *spatial)
    assert int(block.memory.filled) == min(2 * batch, bank_size)
    block.eval()
    with torch.no_grad():
        assert torch.isfinite(block(x)[0]).all()


def test_bf16_autocast_keeps_memory_float32():
    block = _small().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, aux = block(torch.randn(2, 16, 6, 6))
        features.float().mean().backward()
    assert block.memory.memory.dtype == torch.float32 and int(block.memory.filled) == 2
    assert torch.isfinite(features.float()).all()


def test_scripted_equals_eager_in_eval_and_training():
    block = _fill(_small(), slots=2)
    scripted = torch.jit.script(copy.deepcopy(block))
    x = torch.randn(2, 16, 6, 5)
    block.eval()
    scripted.eval()
    with torch.no_grad():
        for ours, theirs in zip(block(x), scripted(x)):
            torch.testing.assert_close(ours, theirs)
    block.train()
    scripted.train()
    with torch.no_grad():
        block(x)
        scripted(x)
    assert torch.equal(block.memory.memory, scripted.memory.memory)
    assert int(scripted.memory.filled) == 4


def test_resumed_training_step_equals_uninterrupted():
    def step(model, optimizer, x):
        optimizer.zero_grad()
        features, aux = model(x)
        (features.square().mean() + aux.mean()).backward()
        optimizer.step()

    torch.manual_seed(1)
    batches = [torch.randn(2, 16, 6, 6) for _ in range(4)]
    model = _small(bank_size=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x in batches[:2]:
        step(model, optimizer, x)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    for x in batches[2:]:
        step(model, optimizer, x)

    resumed = ECRM(2, 16, bank_size=3, feat_channels=24, key_channels=8).train()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for x in batches[2:]:
        step(resumed, resumed_optimizer, x)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=f"resume diverged at {key}")


def test_seed_layout_memory_loads_by_the_documented_rule():
    seed_module = _seed_module()
    seed = seed_module.ECRM(bank_size=5, feat_channels=512, num_classes=1).train()  # the seed needs 512 channels
    with torch.no_grad():
        seed(torch.randn(2, 512, 3, 3))  # 2 of 5 slots written, pointer 2
    target = ECRM(2, 512, bank_size=5, feat_channels=512)
    state = target.state_dict()
    for key in ("memory.memory", "memory.pointer", "memory.filled", "memory.rejected"):
        state.pop(key)
    state["bank"], state["bank_ptr"] = seed.bank.clone(), seed.bank_ptr.clone()
    target.load_state_dict(state)
    assert int(target.memory.filled) == 2 and int(target.memory.pointer) == 2
    torch.testing.assert_close(target.memory.slots(), seed.bank[:2].permute(0, 2, 1))

    with torch.no_grad():
        seed(torch.randn(4, 512, 3, 3))  # 2 + 4 > 5: the seed drops one and reports full, pointer 0
    state["bank"], state["bank_ptr"] = seed.bank.clone(), seed.bank_ptr.clone()
    target.load_state_dict(state)
    assert int(target.memory.filled) == 5 and int(target.memory.pointer) == 0


def test_icrm_shapes_identity_at_init_and_scriptable():
    block = ICRM(2, 32)
    x = torch.randn(2, 32, 6, 7)
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    scripted = torch.jit.script(block)
    torch.testing.assert_close(scripted(x), block(x))
    assert ICRM(3, 16)(torch.randn(1, 16, 3, 4, 5)).shape == (1, 16, 3, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(torch.randn(1, 32, 1, 1))
