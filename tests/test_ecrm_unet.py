from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks

from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet, dcrnet

SMALL = {"bank_size": 4, "ecrm_channels": 32, "key_channels": 16, "decoder_channels": (32, 16, 16, 8, 8)}
#: the two ECRM option sets: ECRMUNet's defaults (the study's variant) and the published DCRNet block
OPTION_SETS = {"defaults": {}, "dcrnet": DCRNET_ECRM_OPTIONS}


def _labels(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A binary mask for the images ``x`` (the default ECRM writes its memory from the ground truth in training)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape[0], 1, *x.shape[2:], generator=generator) > 0.5).float()


@pytest.mark.parametrize(
    "backbone",
    [
        "resnet18",
        "resnet34",
        "resnet50",
        "efficientnet-b0",
        "efficientnet-b1",
        "efficientnet-b2",
        "efficientnet-b3",
        "efficientnet-lite0",
    ],
)
def test_one_logits_tensor_of_input_size_for_each_backbone(backbone):
    net = ECRMUNet(backbone=backbone, **SMALL)
    x = torch.randn(2, 3, 64, 96)
    out = net.train()(x, labels=_labels(x))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 96)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 96)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet-b0"])
def test_3d_backbones(backbone):
    net = ECRMUNet(spatial_dims=3, in_channels=1, out_channels=2, backbone=backbone, **SMALL)
    x = torch.randn(1, 1, 32, 32, 64)
    out = net(x, labels=_labels(x))
    assert out.shape == (1, 2, 32, 32, 64)


def test_sizes_not_multiple_of_32_are_padded_and_cropped_back():
    net = ECRMUNet(backbone="resnet18", **SMALL).eval()
    x = torch.randn(1, 3, 45, 77)
    with torch.no_grad():
        out = net(x)
        padded = net(torch.nn.functional.pad(x, (0, 96 - 77, 0, 64 - 45)))
    assert out.shape == (1, 1, 45, 77)
    torch.testing.assert_close(out, padded[:, :, :45, :77], msg="padding must be at the end, never shifting the image")


@pytest.mark.parametrize("options, stride", [({}, 16), (DCRNET_ECRM_OPTIONS, 32)], ids=["defaults", "dcrnet"])
def test_aux_logits_reachable_through_a_forward_hook_without_changing_the_output(options, stride):
    net = ECRMUNet(backbone="resnet18", **SMALL, **options).train()
    captured = []
    handle = net.ecrm.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    x = torch.randn(2, 3, 64, 64)
    out = net(x, labels=_labels(x))
    handle.remove()
    assert isinstance(out, torch.Tensor)
    assert captured[0].shape == (2, 1, 64 // stride, 64 // stride), f"ECRM coarse mask at 1/{stride} resolution"


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_scripted_equals_eager_in_eval(options):
    net = ECRMUNet(backbone="resnet34", **SMALL, **options)
    x = torch.randn(4, 3, 64, 64)
    for _ in range(2):  # fill part of the memory (label prototypes: attended from the second step on)
        net.train()(x, labels=_labels(x))
    net.eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_eval_output_of_a_sample_independent_of_the_batch(options):
    net = ECRMUNet(backbone="resnet18", **SMALL, **options)
    x = torch.randn(4, 3, 64, 64)
    net.train()(x, labels=_labels(x))
    net.eval()
    x = torch.randn(3, 3, 64, 64)
    other = x.clone()
    other[1:] = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], net(other)[0])
        torch.testing.assert_close(net(x[:1])[0], net(x)[0], atol=1e-5, rtol=1e-5)


def test_dcrnet_preset_shape():
    net = dcrnet(bank_size=2)
    assert net.backbone == "resnet34" and net.use_icrm and net.memory_stride == 32
    assert net.ecrm.feat_channels == 512 and net.ecrm.key_channels == 256
    assert (net.ecrm.prototypes, net.ecrm.background_tokens, net.ecrm.supervise_attention) == ("coarse", False, False)
    assert not net.ecrm.attend_first and net.ecrm.context_start == "full", "DCRNet writes, then attends"
    assert int(net.ecrm.memory.num_slots) == 2
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize(
    "backbone, options, channels",
    [
        ("resnet34", {}, 256),
        ("resnet34", DCRNET_ECRM_OPTIONS, 512),
        ("efficientnet-lite0", {}, 112),
        ("efficientnet-lite0", DCRNET_ECRM_OPTIONS, 320),
    ],
)
def test_ecrm_channels_follow_the_memory_level(backbone, options, channels):
    with torch.device("meta"):
        net = ECRMUNet(backbone=backbone, **options)
    assert net.ecrm.feat_channels == channels, "ecrm_channels=None: the channels of the level ECRM works on"


def test_default_options_are_the_study_variant_and_train_only_with_labels():
    net = ECRMUNet(backbone="resnet18", **SMALL).train()
    assert net.memory_stride == 16 and net.ecrm.prototypes == "label" and net.ecrm.background_tokens
    assert net.ecrm.supervise_attention and net.ecrm.attend_first
    with pytest.raises(ValueError, match=r"network\(images, labels=labels\)"):
        net(torch.randn(2, 3, 64, 64))  # a training forward without the label would write nothing true to the memory
    net.eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64), "inference never needs the label"


def test_pretrained_true_without_offline_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="pretrained_weights=PATH"):
        ECRMUNet(backbone="resnet34", pretrained=True)


def _torchvision_resnet34_state_dict() -> dict[str, torch.Tensor]:
    """A state dict in torchvision's ResNet-34 layout (torchvision itself is not installed here): MONAI's ResNet
    with projection shortcuts has the same keys, plus torchvision's classifier ``fc``."""
    from monai.networks.nets.resnet import ResNet, ResNetBlock, get_inplanes

    reference = ResNet(
        ResNetBlock,
        [3, 4, 6, 3],
        get_inplanes(),
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=1000,
    )
    torch.manual_seed(3)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}


def test_loading_a_local_torchvision_resnet34_state_dict(tmp_path):
    state = _torchvision_resnet34_state_dict()
    assert "layer2.0.downsample.0.weight" in state and "fc.weight" in state
    path = tmp_path / "resnet34-torchvision.pth"
    torch.save(state, path)
    net = ECRMUNet(backbone="resnet34", pretrained_weights=str(path), **SMALL)
    encoder_state = net.encoder.state_dict()
    for key, value in encoder_state.items():
        torch.testing.assert_close(value, state[key], msg=f"encoder key {key} not loaded")


def test_pretrained_weights_of_another_architecture_name_the_missing_keys(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(ECRMUNet(backbone="efficientnet-b0", **SMALL).encoder.state_dict(), path)
    with pytest.raises(Exception, match="layer1"):
        ECRMUNet(backbone="resnet34", pretrained_weights=str(path), **SMALL)


# --------------------------------------------------------------------------------------------------- DDP
#: (ECRM options, find_unused_parameters): the DCRNet block uses every parameter at every step, so DDP's defaults
#: work. The default ECRM does not (its memory projections wait for a memory in the first step, the coarse conv stands
#: aside once the attention gives the coarse mask): DDP needs find_unused_parameters=True, which the bundle's
#: multi_gpu_train.json sets for every network, the DCRNet block included
DDP_CASES = {
    "dcrnet-default-ddp": (DCRNET_ECRM_OPTIONS, False),
    "dcrnet-find-unused": (DCRNET_ECRM_OPTIONS, True),
    "defaults-find-unused": ({}, True),
}


def _ddp_worker(rank: int, world_size: int) -> dict:
    results = {}
    aux_outputs: list[torch.Tensor] = []
    for name, (options, find_unused_parameters) in DDP_CASES.items():
        torch.manual_seed(0)
        net = ECRMUNet(backbone="resnet18", **SMALL, **options)
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=find_unused_parameters)
        net.ecrm.register_forward_hook(lambda module, args, output: aux_outputs.append(output[1]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(rank + 1)
        for _ in range(3):
            x = torch.randn(2, 3, 64, 64)
            label = (torch.rand(2, 1, 64, 64) > 0.5).float()
            aux_outputs.clear()
            logits = model(x, labels=label)
            aux = aux_outputs[0]
            aux_label = torch.nn.functional.interpolate(label, size=aux.shape[2:], mode="area")
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
            loss = loss + 0.4 * torch.nn.functional.binary_cross_entropy_with_logits(aux, aux_label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        layers = [net.ecrm.coarse.conv.weight, net.ecrm.query.conv.weight]
        results[name] = ([layer.detach().numpy().copy() for layer in layers], net.ecrm.memory.memory.numpy().copy())
    return results


def test_ddp_training_steps_with_aux_loss():
    results = run_ranks(_ddp_worker)
    for name in DDP_CASES:
        (layers0, memory0), (layers1, memory1) = results[0][name], results[1][name]
        for first, second in zip(layers0, layers1):
            torch.testing.assert_close(torch.from_numpy(first), torch.from_numpy(second), msg=f"{name}: out of sync")
        assert (memory0 == memory1).all(), f"{name}: the memory must be identical on both ranks"
