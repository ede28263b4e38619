"""load_encoder_weights: local torchvision-style and MONAI state dicts into MONAI encoders, with clear reports."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import ResNet
from monai.networks.nets.efficientnet import EfficientNetEncoder
from monai.networks.nets.resnet import ResNetBlock, ResNetEncoder, get_inplanes
from torch import nn

from monai_ecrm.networks.nets.pretrained import load_encoder_weights


def _batch_norm(prefix: str, channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(channels, generator=generator) + 0.5,
        f"{prefix}.bias": torch.randn(channels, generator=generator),
        f"{prefix}.running_mean": torch.randn(channels, generator=generator) * 0.1,
        f"{prefix}.running_var": torch.rand(channels, generator=generator) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def _conv(out_channels: int, in_channels: int, kernel: int, generator: torch.Generator) -> torch.Tensor:
    fan_in = in_channels * kernel * kernel
    return torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) * (2.0 / fan_in) ** 0.5


def torchvision_resnet34_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in torchvision's resnet34 layout, written from its definition (torchvision is no dependency)."""
    generator = torch.Generator().manual_seed(seed)
    state = {"conv1.weight": _conv(64, 3, 7, generator)}
    state.update(_batch_norm("bn1", 64, generator))
    in_planes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            block_in = in_planes if block == 0 else planes
            state[f"{prefix}.conv1.weight"] = _conv(planes, block_in, 3, generator)
            state.update(_batch_norm(f"{prefix}.bn1", planes, generator))
            state[f"{prefix}.conv2.weight"] = _conv(planes, planes, 3, generator)
            state.update(_batch_norm(f"{prefix}.bn2", planes, generator))
            if block == 0 and layer > 1:
                state[f"{prefix}.downsample.0.weight"] = _conv(planes, block_in, 1, generator)
                state.update(_batch_norm(f"{prefix}.downsample.1", planes, generator))
        in_planes = planes
    state["fc.weight"] = torch.randn(1000, 512, generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


def monai_resnet34_encoder(in_channels: int = 3) -> ResNet:
    """MONAI's ResNet-34 configured like torchvision's (7x7 stride-2 stem, 1x1 conv shortcuts without bias)."""
    return ResNet(
        ResNetBlock,
        [3, 4, 6, 3],
        get_inplanes(),
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


def test_torchvision_resnet34_checkpoint_loads_every_tensor_into_monai_resnet(tmp_path):
    source = torchvision_resnet34_state_dict()
    path = tmp_path / "resnet34_ddp_checkpoint.pt"
    torch.save({"state_dict": {f"module.{key}": value for key, value in source.items()}, "epoch": 3}, path)
    encoder = monai_resnet34_encoder()

    report = load_encoder_weights(encoder, path)

    assert report.missing_keys == [] and report.mismatched_keys == []
    assert report.unexpected_keys == [], "the ImageNet classifier must be dropped silently for a headless encoder"
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, source[key]), f"{key} was not loaded from the checkpoint"


def test_extra_checkpoint_keys_are_reported_not_fatal():
    # MONAI's ResNetEncoder("resnet34") uses zero-padding shortcuts, so torchvision's downsample convs have no home.
    encoder = ResNetEncoder("resnet34", pretrained=False, spatial_dims=2, in_channels=3)

    with pytest.warns(UserWarning, match="not used by ResNetEncoder"):
        report = load_encoder_weights(encoder, torchvision_resnet34_state_dict())

    assert report.missing_keys == []
    assert sorted(report.unexpected_keys) == sorted(
        f"layer{layer}.0.downsample.{name}"
        for layer in (2, 3, 4)
        for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")
    )


@pytest.fixture(scope="module")
def efficientnet_b0_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return EfficientNetEncoder("efficientnet-b0", pretrained=False).state_dict()


def test_monai_efficientnet_state_dict_under_a_network_prefix_loads(efficientnet_b0_state):
    whole_network = {f"encoder.{key}": value for key, value in efficientnet_b0_state.items()}
    whole_network["decoder.blocks.0.weight"] = torch.zeros(2)
    encoder = EfficientNetEncoder("efficientnet-b0", pretrained=False)

    with pytest.warns(UserWarning, match="decoder.blocks.0.weight"):
        report = load_encoder_weights(encoder, {"model": whole_network})

    assert report.missing_keys == [] and report.mismatched_keys == []
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, efficientnet_b0_state[key]), key


def test_flat_block_numbering_of_efficientnet_pytorch_checkpoints_loads(efficientnet_b0_state):
    # lukemelas' EfficientNet-PyTorch numbers blocks 0..15 ("_blocks.3._bn0.weight"); MONAI nests them per stack
    # ("_blocks.2.3._bn0.weight") with the same running index.
    flat = {
        re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", key): value for key, value in efficientnet_b0_state.items()
    }
    assert "_blocks.15._project_conv.weight" in flat
    encoder = EfficientNetEncoder("efficientnet-b0", pretrained=False)

    report = load_encoder_weights(encoder, flat)

    assert report.missing_keys == [] and report.unexpected_keys == []
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, efficientnet_b0_state[key]), key


def test_missing_keys_raise_with_their_names_and_load_nothing(tmp_path):
    source = {key: value for key, value in torchvision_resnet34_state_dict().items() if not key.startswith("layer4")}
    path = tmp_path / "truncated.pth"
    torch.save(source, path)
    encoder = monai_resnet34_encoder()
    before = {key: value.clone() for key, value in encoder.state_dict().items()}

    with pytest.raises(RuntimeError, match=r"truncated\.pth.*layer4\.0\.conv1\.weight.*strict=False"):
        load_encoder_weights(encoder, path)

    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), "a failed load must leave the encoder untouched"


def test_non_strict_load_keeps_matching_tensors_and_warns():
    source = {key: value for key, value in torchvision_resnet34_state_dict().items() if not key.startswith("layer4")}
    encoder = monai_resnet34_encoder()

    with pytest.warns(UserWarning, match="missing"):
        report = load_encoder_weights(encoder, source, strict=False)

    assert report.missing_keys and all(key.startswith("layer4.") for key in report.missing_keys)
    assert torch.equal(encoder.state_dict()["layer3.5.conv2.weight"], source["layer3.5.conv2.weight"])


def test_shape_mismatch_names_the_key_and_both_shapes():
    source = torchvision_resnet34_state_dict()
    source["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)

    with pytest.raises(RuntimeError, match=r"layer1\.0\.conv1\.weight: checkpoint shape \(64, 64, 5, 5\) vs encoder"):
        load_encoder_weights(monai_resnet34_encoder(), source)


def test_rgb_weights_serve_a_one_channel_encoder():
    source = torchvision_resnet34_state_dict()
    grey_encoder = monai_resnet34_encoder(in_channels=1).eval()
    rgb_encoder = monai_resnet34_encoder(in_channels=3).eval()

    load_encoder_weights(grey_encoder, source)
    load_encoder_weights(rgb_encoder, source)

    grey = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rgb_encoder(grey.repeat(1, 3, 1, 1))
        actual = grey_encoder(grey)
    # activations reach the hundreds: float32 summation order alone moves them by ~1e-3, so compare relatively
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-5 * scale + 1e-5, (
        "a grey picture must look to the encoder like its RGB copy"
    )


def test_refuses_pickled_modules(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), path)

    with pytest.raises(RuntimeError, match="weights_only"):
        load_encoder_weights(monai_resnet34_encoder(), path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        load_encoder_weights(monai_resnet34_encoder(), tmp_path / "no_such_weights.pth")


def test_unrelated_checkpoint_says_nothing_matched():
    with pytest.raises(RuntimeError, match="no key matched"):
        load_encoder_weights(monai_resnet34_encoder(), {"decoder.weight": torch.zeros(3)})
