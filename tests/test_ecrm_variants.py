"""ECRM variants (issue #15): zero-start context, label prototypes, background tokens, attend-then-write, larger
memories, a finer level; each keeps the block's properties (eval never writes, batch independence where promised,
any channels, 2D/3D, bf16, TorchScript)."""

from __future__ import annotations

import copy

import pytest
import torch

from monai_ecrm.networks.blocks import ECRM
from monai_ecrm.networks.blocks.ecrm import class_prototypes, label_prototypes, label_weights

VARIANTS = {
    "dcrnet": {},
    "gate": {"context_start": "gate"},
    "zero": {"context_start": "zero"},
    "label": {"prototypes": "label"},
    "label_bg": {"prototypes": "label", "background_tokens": True},
    "bg": {"background_tokens": True},
    "attend_first": {"attend_first": True},
    "large": {"bank_size": 256, "context_start": "zero"},
    "attention": {"prototypes": "label", "background_tokens": True, "supervise_attention": True},
}


def _block(spatial_dims=2, in_channels=16, num_classes=1, **kwargs) -> ECRM:
    args = {"bank_size": 6, "feat_channels": 24, "key_channels": 8}
    args.update(kwargs)
    torch.manual_seed(0)
    return ECRM(spatial_dims, in_channels, num_classes=num_classes, **args)


def _labels(batch: int, *spatial: int) -> torch.Tensor:
    labels = torch.zeros(batch, 1, *spatial)
    labels[(slice(None), slice(None), *[slice(1, max(2, s // 2)) for s in spatial])] = 1.0
    return labels


def _fill(block: ECRM, spatial=(6, 6), batches: int = 3) -> ECRM:
    block.train()
    with torch.no_grad():
        for _ in range(batches):
            block(torch.randn(2, block.coarse.conv.in_channels, *spatial), labels=_labels(2, *spatial))
    return block.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_eval_never_writes_and_is_batch_independent(name):
    block = _fill(_block(**VARIANTS[name]))
    before = {k: v.clone() for k, v in block.memory.state_dict().items()}
    x = torch.randn(4, 16, 6, 6)
    other = x.clone()
    other[1:] = torch.randn(3, 16, 6, 6) * 5
    with torch.no_grad():
        torch.testing.assert_close(block(x, labels=_labels(4, 6, 6))[0][0], block(other)[0][0])
    for key, value in block.memory.state_dict().items():
        assert torch.equal(value, before[key]), f"{name}: eval changed memory {key}"


@pytest.mark.parametrize("name", ["gate", "zero"])
def test_zero_start_context_contributes_exactly_nothing_then_learns(name):
    block = _fill(_block(**VARIANTS[name]))
    assert int(block.memory.filled) > 0
    x = torch.randn(2, 16, 5, 5)
    emptied = copy.deepcopy(block)
    emptied.memory.reset()
    with torch.no_grad():
        assert torch.equal(block(x)[0], emptied(x)[0]), "an untrained memory must not change the output"
    block.train()
    features, _ = block(x)
    features.square().mean().backward()
    learnable = block.context_gate if name == "gate" else block.fuse_context.weight
    assert learnable.grad is not None and learnable.grad.abs().sum() > 0, "the context must be able to grow in"


def test_dcrnet_block_context_is_used_from_the_start():
    block = _fill(_block())
    emptied = copy.deepcopy(block)
    emptied.memory.reset()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert not torch.allclose(block(x)[0], emptied(x)[0])


def test_label_prototypes_are_mask_weighted_means_of_area_pooled_labels():
    block = _block(prototypes="label", background_tokens=True, bank_size=4).train()
    x = torch.randn(2, 16, 4, 4)
    labels = torch.zeros(2, 1, 16, 16)  # 4x the feature grid, as a stride-4 level sees it
    labels[0, 0, :8, :8] = 1.0  # top-left quarter
    labels[1, 0, :, :2] = 1.0  # half a feature column
    reference = copy.deepcopy(block)
    block(x, labels=labels)
    with torch.no_grad():
        features = reference.embed(x)
    fg0 = features[0, :, :2, :2].mean(dim=(1, 2))
    bg0 = (features[0].sum(dim=(1, 2)) - features[0, :, :2, :2].sum(dim=(1, 2))) / 12
    fg1 = features[1, :, :, 0].mean(dim=1)  # each cell of column 0 is half covered: equal weights
    slots = block.memory.slots()
    assert slots.shape == (2, 2, 24)
    torch.testing.assert_close(slots[0, 0], fg0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slots[0, 1], bg0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slots[1, 0], fg1, atol=1e-5, rtol=1e-5)


def test_label_prototypes_attend_to_the_memory_before_their_own_write():
    """The prediction of a training batch never sees its own ground truth."""
    block = _fill(_block(prototypes="label")).train()
    x = torch.randn(2, 16, 6, 6)
    a, b = _labels(2, 6, 6), 1.0 - _labels(2, 6, 6)
    first, second = copy.deepcopy(block), copy.deepcopy(block)
    out_a, _ = first(x, labels=a)
    out_b, _ = second(x, labels=b)
    torch.testing.assert_close(out_a, out_b)  # same output whatever the label
    assert not torch.equal(first.memory.memory, second.memory.memory)  # but different writes


def test_attend_first_training_output_is_batch_independent_with_batch_free_norms():
    block = _fill(_block(attend_first=True, norm="instance")).train()
    x = torch.randn(3, 16, 6, 6)
    other = x.clone()
    other[1:] = torch.randn(2, 16, 6, 6) * 3
    first, second = copy.deepcopy(block), copy.deepcopy(block)
    torch.testing.assert_close(first(x)[0][0], second(other)[0][0])
    # the DCRNet order writes the batch first: another sample changes sample 0's training output
    dcrnet = _fill(_block(norm="instance")).train()
    first, second = copy.deepcopy(dcrnet), copy.deepcopy(dcrnet)
    assert not torch.allclose(first(x)[0][0], second(other)[0][0])


def test_attend_first_backward_through_the_memory_projections_works():
    block = _fill(_block(attend_first=True, background_tokens=True)).train()
    features, aux = block(torch.randn(2, 16, 5, 5))
    (features.mean() + aux.mean()).backward()  # the write after the attention must not break autograd
    assert block.memory_key[0].weight.grad is not None


def test_label_prototypes_need_the_label_in_training_and_never_at_inference():
    block = _fill(_block(prototypes="label")).train()
    with pytest.raises(ValueError, match="labels"):
        block(torch.randn(2, 16, 6, 6))
    block.eval()
    assert block(torch.randn(2, 16, 6, 6))[0].shape == (2, 24, 6, 6)
    with pytest.raises(ValueError, match="attend_first"):
        _block(prototypes="label", attend_first=False)


def test_images_without_a_class_are_not_written():
    block = _block(prototypes="label").train()
    labels = _labels(3, 6, 6)
    labels[1] = 0.0
    block(torch.randn(3, 16, 6, 6), labels=labels)
    assert int(block.memory.filled) == 2 and int(block.memory.rejected) == 0


def test_background_tokens_of_the_coarse_mask():
    block = _block(background_tokens=True).train()
    x = torch.randn(2, 16, 5, 5)
    reference = copy.deepcopy(block)
    block(x)
    with torch.no_grad():
        aux, features = reference.coarse(x), reference.embed(x)
        expected = torch.cat([class_prototypes(aux, features), class_prototypes(-aux, features)], dim=1)
    torch.testing.assert_close(block.memory.slots(), expected)


@pytest.mark.parametrize("spatial_dims,num_classes", [(2, 1), (2, 3), (3, 1), (3, 2)])
@pytest.mark.parametrize("name", ["label_bg", "gate", "bg"])
def test_variants_any_channels_2d_3d_multiclass(name, spatial_dims, num_classes):
    block = _block(spatial_dims, in_channels=8, num_classes=num_classes, **VARIANTS[name]).train()
    spatial = (5,) * spatial_dims
    labels = torch.randint(0, num_classes + 1, (2, 1, *spatial)).clamp(max=max(num_classes - 1, 1)).float()
    labels[:, :, 0] = 0
    labels[:, :, 1] = 1
    labels[:, :, 2] = num_classes - 1  # every class present (an image lacking one is not written)
    for _ in range(2):
        features, aux = block(torch.randn(2, 8, *spatial), labels=labels)
        (features.mean() + aux.mean()).backward()
    assert features.shape == (2, 24, *spatial) and aux.shape == (2, num_classes, *spatial)
    assert block.memory.memory.shape[1] == num_classes + int(block.background_tokens)
    assert int(block.memory.filled) > 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_bf16_and_torchscript(name):
    block = _fill(_block(**VARIANTS[name])).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = block(torch.randn(2, 16, 6, 6), labels=_labels(2, 6, 6))
        features.float().mean().backward()
    assert block.memory.memory.dtype == torch.float32
    scripted = torch.jit.script(copy.deepcopy(block))
    x = torch.randn(2, 16, 6, 5)
    block.eval()
    scripted.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], scripted(x)[0])
    block.train()
    scripted.train()
    with torch.no_grad():
        block(x, labels=_labels(2, 6, 5))
        scripted(x, labels=_labels(2, 6, 5))
    assert torch.equal(block.memory.memory, scripted.memory.memory)


def test_dcrnet_checkpoint_loads_strictly_into_every_variant_with_the_same_memory_layout():
    state = _fill(_block()).state_dict()
    for name in ("gate", "zero", "attend_first", "label"):
        block = _block(**VARIANTS[name])
        missing, unexpected = block.load_state_dict(state, strict=False)
        assert unexpected == [] and (missing == (["context_gate"] if name == "gate" else [])), name
    assert "context_gate" not in _block().state_dict()


def test_label_weights_multiclass_index_and_one_hot_agree():
    index = torch.randint(0, 3, (2, 1, 8, 8))
    one_hot = torch.nn.functional.one_hot(index[:, 0], 3).movedim(-1, 1).float()
    torch.testing.assert_close(label_weights(index, 3, [4, 4]), label_weights(one_hot, 3, [4, 4]))
    fractions = label_weights(one_hot, 3, [4, 4], background=True)
    torch.testing.assert_close(fractions[:, 3], torch.zeros(2, 4, 4))
    prototypes, present = label_prototypes(fractions[:, :3], torch.randn(2, 5, 4, 4))
    assert prototypes.shape == (2, 3, 5) and present.dtype == torch.bool


def test_supervised_attention_outputs_the_attention_s_own_log_odds_as_the_coarse_mask():
    block = _fill(_block(**VARIANTS["attention"]))
    x = torch.randn(2, 16, 5, 4)
    with torch.no_grad():
        _, odds = block(x)
        queries = block.query(block.embed(x)).flatten(2).transpose(1, 2)
        tokens = block.memory.filled_memory().reshape(-1, block.feat_channels)
        attention = torch.softmax(queries @ block.memory_key(tokens).T / block.key_channels**0.5, dim=-1)
        attention = attention.reshape(2, 20, -1, 2)  # [B, positions, slots, (polyp, background)]
        expected = (attention[..., 0].sum(-1) / attention[..., 1].sum(-1)).log().reshape(2, 1, 5, 4)
    torch.testing.assert_close(odds, expected, atol=1e-5, rtol=1e-4)
    block.train()
    features, odds = block(x, labels=_labels(2, 5, 4))
    odds.sum().backward()  # the aux loss reaches the attention's projections
    assert block.query.conv.weight.grad is not None and block.memory_key[0].weight.grad.abs().sum() > 0
    empty = _block(**VARIANTS["attention"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(empty(x)[1], empty.coarse(x))  # nothing to attend to: the coarse conv's mask
    with pytest.raises(ValueError, match="supervise_attention"):
        _block(supervise_attention=True)
