"""Memory provenance (issue #16, items 1-2): which case wrote each memory slot, and how much of ECRM's attention
each slot receives for an image."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from monai_ecrm.handlers import refresh_memory
from monai_ecrm.networks.blocks import MemoryBank
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet


def _net(**kwargs) -> ECRMUNet:
    """A tiny ECRMUNet with DCRNet's block (filled without labels below); ``kwargs`` override any option."""
    torch.manual_seed(0)
    options = {"backbone": "resnet10", "bank_size": 6, "ecrm_channels": 16, "key_channels": 8, **DCRNET_ECRM_OPTIONS}
    options.update(kwargs)
    return ECRMUNet(decoder_channels=(16,) * 5, **options)


def _filled(net: ECRMUNet, batches: int = 2, batch: int = 2) -> ECRMUNet:
    net.train()
    with torch.no_grad():
        for step in range(batches):
            net(torch.randn(batch, 3, 64, 64), sources=torch.arange(step * batch, (step + 1) * batch) + 100)
    return net.eval()


def test_sources_follow_the_ring_order_and_are_refused_with_their_prototypes():
    bank = MemoryBank(4, 1, 3).train()
    bank.enqueue(torch.rand(3, 1, 3), torch.tensor([10, 11, 12]))
    bad = torch.rand(3, 1, 3)
    bad[1, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank.enqueue(bad, torch.tensor([13, 14, 15]))  # 14 refused with its prototype; 13 and 15 wrap around
    assert bank.sources.tolist() == [15, 11, 12, 13]
    assert bank.slots().shape[0] == 4 and int(bank.pointer) == 1
    bank.enqueue(torch.rand(2, 1, 3))  # no sources given: unknown
    assert bank.sources.tolist() == [15, -1, -1, 13]
    bank.reset()
    assert bank.sources.tolist() == [-1] * 4
    with pytest.raises(ValueError, match="sources"):
        bank.train().enqueue(torch.rand(2, 1, 3), torch.tensor([1, 2, 3]))


def test_memories_saved_without_sources_load_strictly_with_unknown_sources():
    net = _filled(_net())
    state = net.state_dict()
    assert "ecrm.memory.sources" in state and state["ecrm.memory.sources"][:4].tolist() == [100, 101, 102, 103]
    old = {k: v for k, v in state.items() if k != "ecrm.memory.sources"}  # a model.pt from before provenance
    fresh = _net()
    fresh.ecrm.memory.sources.fill_(7)
    fresh.load_state_dict(old, strict=True)
    assert fresh.ecrm.memory.sources.tolist() == [-1] * 6
    torch.testing.assert_close(fresh.ecrm.memory.memory, net.ecrm.memory.memory)
    fresh.load_state_dict(state, strict=True)
    assert fresh.ecrm.memory.sources.tolist() == state["ecrm.memory.sources"].tolist()


def test_keep_newest_carries_the_sources_of_the_slots_it_keeps():
    net = _filled(_net(bank_size=6), batches=3)  # 6 slots, sources 100..105 in order
    smaller = _net(bank_size=4, bank_size_mismatch="keep_newest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smaller.load_state_dict(net.state_dict())
    assert smaller.ecrm.memory.sources.tolist() == [102, 103, 104, 105]


def test_refresh_records_each_slot_s_position_in_the_refresh_set_or_its_case_index():
    net = _net(bank_size=4)
    images = [{"image": torch.randn(3, 32, 32)} for _ in range(6)]
    refresh_memory(net, torch.utils.data.DataLoader(images, batch_size=4))
    assert sorted(net.ecrm.memory.sources.tolist()) == [2, 3, 4, 5]  # the last four of the six
    tagged = [{**item, "case_index": 40 + index} for index, item in enumerate(images)]
    refresh_memory(net, tagged)
    assert sorted(net.ecrm.memory.sources.tolist()) == [42, 43, 44, 45]


def test_label_prototype_images_not_written_leave_no_source_behind():
    net = _net(prototypes="label", bank_size=4).train()
    labels = torch.zeros(3, 1, 64, 64)
    labels[0, :, :32, :32] = 1
    labels[2, :, 32:, 32:] = 1  # image 1 has no polyp: not written
    with torch.no_grad():
        net(torch.randn(3, 3, 64, 64), labels=labels, sources=torch.tensor([7, 8, 9]))
    assert net.ecrm.memory.sources.tolist() == [7, 9, -1, -1]


def test_scripted_network_records_sources():
    net = _net().train()
    scripted = torch.jit.script(copy.deepcopy(net))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scripted(x, sources=torch.tensor([3, 4]))
    assert scripted.ecrm.memory.sources[:2].tolist() == [3, 4]


def test_memory_attention_shares_sum_to_one_over_filled_slots_from_one_forward():
    net = _filled(_net(background_tokens=True), batches=2)  # 4 of 6 slots
    before = {k: v.clone() for k, v in net.ecrm.memory.state_dict().items()}
    x = torch.randn(3, 3, 70, 90)  # padded to 96 x 96 inside
    seen = []  # a forward hook on ECRM (AuxSupervisionHandler's kind) sees the explained forward too
    hook = net.ecrm.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    logits, shares = net.forward_with_shares(x)
    hook.remove()
    assert len(seen) == 1, "ECRM ran once, through its module call"
    assert shares.shape == (3, 6) and not shares.requires_grad
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(3))
    assert (shares[:, 4:] == 0).all() and (shares[:, :4] > 0).all()
    with torch.no_grad():
        assert torch.equal(logits, net.eval()(x)), "the explained logits are the normal forward's"
        level = net.encoder(F.pad(x, [0, 6, 0, 26]))[net.memory_level]
        # the slot weights are the attention the forward's SDPA applies: rebuilt explicitly, its context is attend()'s
        ecrm, embedded = net.ecrm, net.ecrm.embed(level)
        queries = ecrm.query(embedded)
        tokens = ecrm.memory.filled_memory().reshape(-1, ecrm.feat_channels)
        q = queries.flatten(2).transpose(1, 2)
        attention = torch.softmax(q @ ecrm.memory_key(tokens).T / math.sqrt(ecrm.key_channels), dim=-1)
        context = (attention @ ecrm.memory_value(tokens)).transpose(1, 2).reshape(queries.shape)
        torch.testing.assert_close(context, ecrm.attend(embedded), atol=1e-5, rtol=1e-4)
        per_slot = attention.reshape(3, q.shape[1], int(ecrm.memory.filled), ecrm.memory_classes).sum(dim=-1)
        torch.testing.assert_close(ecrm.slot_weights(embedded), per_slot)
    for key, value in net.ecrm.memory.state_dict().items():
        assert torch.equal(value, before[key]), f"memory_attention changed {key}"
    torch.testing.assert_close(net.memory_attention(x), shares)


def test_memory_attention_follows_a_permutation_of_the_slots():
    net = _filled(_net(), batches=3)  # all 6 slots
    x = torch.randn(2, 3, 64, 64)
    shares = net.memory_attention(x)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = copy.deepcopy(net)
    with torch.no_grad():
        permuted.ecrm.memory.memory.copy_(net.ecrm.memory.memory[order])
        permuted.ecrm.memory.sources.copy_(net.ecrm.memory.sources[order])
    torch.testing.assert_close(permuted.memory_attention(x), shares[:, order], atol=1e-6, rtol=1e-5)


def test_memory_attention_weights_positions_by_the_given_mask():
    net = _filled(_net(), batches=3)
    x = torch.randn(1, 3, 64, 64)
    left = torch.zeros(1, 1, 64, 64)
    left[..., :32] = 1
    right = 1 - left
    by_left, by_right, by_both = (net.memory_attention(x, mask) for mask in (left, right, torch.ones_like(left)))
    torch.testing.assert_close((by_left + by_right) / 2, by_both, atol=1e-6, rtol=1e-5)  # equal areas
    empty = net.memory_attention(x, torch.zeros_like(left))
    assert (empty == 0).all(), "no weighted position: an all-zero row"


def test_memory_attention_of_an_empty_memory_is_all_zero_and_no_ecrm_is_an_error():
    net = _net().eval()
    assert (net.memory_attention(torch.randn(1, 3, 64, 64)) == 0).all()
    with pytest.raises(ValueError, match="no ECRM"):
        _net(use_ecrm=False).memory_attention(torch.randn(1, 3, 64, 64))


def test_case_names_travel_with_the_weights_and_torchscript_and_must_belong_to_the_memory(tmp_path):
    from monai.data import Dataset

    items = [{"image": f"/data/{folder}/images/{i}.png"} for folder in ("kvasir", "clinicdb") for i in range(3)]
    dataset = Dataset(items, transform=lambda item: {"image": torch.randn(3, 32, 32)})
    net = _net(bank_size=4)
    refresh_memory(net, torch.utils.data.DataLoader(dataset, batch_size=4))
    names = net.ecrm.memory.slot_names()
    assert sorted(names) == [
        "clinicdb/images/0.png",
        "clinicdb/images/1.png",
        "clinicdb/images/2.png",
        "kvasir/images/2.png",
    ]
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(torch.is_tensor(value) for value in state.values()), "state dicts stay all-tensor"
    loaded = _net(bank_size=4)
    loaded.load_state_dict(state, strict=True)
    assert loaded.ecrm.memory.slot_names() == names, "model.pt alone names the cases"
    scripted = torch.jit.script(loaded)
    torch.jit.save(scripted, str(tmp_path / "model.ts"))
    restored = torch.jit.load(str(tmp_path / "model.ts"))
    assert list(restored.ecrm.memory.source_names) == loaded.ecrm.memory.source_names, "TorchScript keeps them"
    old = {k: v for k, v in state.items() if "source_names" not in k}  # a model.pt from before names
    unnamed = _net(bank_size=4)
    unnamed.load_state_dict(old, strict=True)
    assert unnamed.ecrm.memory.slot_names() == [None] * 4
    with pytest.raises(ValueError, match="another memory"):
        unnamed.ecrm.memory.set_source_names(["only one name"])
    foreign = dict(state)
    foreign["ecrm.memory.source_names_utf8"] = torch.tensor(list(b"a\nb"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="another memory"):
        _net(bank_size=4).load_state_dict(foreign)
