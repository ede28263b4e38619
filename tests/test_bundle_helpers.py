"""The library functions the bundle configs call by name: datalists for every dataset_dir form, the full-size
evaluation presets and the backbone normalisation."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import decollate_batch, list_data_collate

from monai_ecrm.bundle import evaluation_datalist, inference_datalist, training_datalist
from monai_ecrm.data import make_demo_dataset
from monai_ecrm.transforms import (
    full_size_eval_postprocessing,
    full_size_eval_transforms,
    normalization_for_backbone,
    train_transforms,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", num_images=10, size=48)


def test_folder_split_is_disjoint_complete_and_seeded(demo):
    split = training_datalist(demo, val_fraction=0.2, seed=3)
    train = {item["image"] for item in split["training"]}
    val = {item["image"] for item in split["validation"]}
    assert len(val) == 2 and len(train) == 8 and not train & val
    assert split == training_datalist(demo, val_fraction=0.2, seed=3), "the split must not change between runs"
    assert val != {item["image"] for item in training_datalist(demo, val_fraction=0.2, seed=4)["validation"]}


def test_demo_set_generated_only_for_the_bundles_demo_folder(tmp_path):
    demo_dir = tmp_path / "demo_data"
    split = training_datalist(demo_dir, demo_dir=demo_dir, demo_images=6, demo_size=32)
    assert len(split["training"]) + len(split["validation"]) == 6
    with pytest.raises(ValueError):
        training_datalist(tmp_path / "elsewhere", demo_dir=demo_dir)  # a real dataset_dir is never invented


def test_datalist_json_with_its_own_validation_list(demo, tmp_path):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": pairs[:7], "validation": pairs[7:]}))
    split = training_datalist(path)
    assert [i["image"] for i in split["validation"]] == [p["image"] for p in pairs[7:]]
    assert evaluation_datalist(demo, eval_dataset_dir=path)[0]["image"] == pairs[7]["image"]
    assert len(evaluation_datalist(demo, eval_dataset_dir=demo)) == 10, "a test folder is scored whole"


def test_inference_datalist_from_a_file_or_a_folder(demo):
    image = sorted((demo / "images").iterdir())[0]
    assert inference_datalist(image) == [{"image": str(image.resolve())}]
    items = inference_datalist(demo / "images")
    assert len(items) == 10 and all(set(item) == {"image"} for item in items)


def test_full_size_evaluation_keeps_the_original_mask(demo):
    item = training_datalist(demo, val_fraction=0.0)["training"][0]
    pre = full_size_eval_transforms(spatial_size=32)
    data = pre(dict(item))
    assert data["image"].shape == (3, 32, 32) and data["label"].shape == (1, 32, 32)
    assert data["label_full"].shape == (1, 48, 48)
    batch = list_data_collate([data])
    batch["pred"] = torch.zeros(1, 1, 32, 32)
    out = full_size_eval_postprocessing(pre)(decollate_batch(batch)[0])
    assert out["pred"].shape == (1, 48, 48) and torch.allclose(out["pred"], torch.tensor(0.5))
    assert torch.equal(out["gt"], out["label_full"]) and set(out["gt"].unique().tolist()) <= {0.0, 1.0}


def test_normalization_follows_the_backbone(demo):
    assert normalization_for_backbone("efficientnet-lite0") == "lite"
    assert normalization_for_backbone("resnet34") == "imagenet"
    item = training_datalist(demo, val_fraction=0.0)["training"][0]
    lite = train_transforms(32, normalization="lite", flip_prob=0, affine_prob=0, intensity_prob=0)(dict(item))
    imagenet = train_transforms(32, flip_prob=0, affine_prob=0, intensity_prob=0)(dict(item))
    assert not torch.allclose(lite["image"], imagenet["image"])
    assert lite["image"].min() >= -127 / 128 - 1e-4 and lite["image"].max() <= 128 / 128 + 1e-4


def test_a_broken_validation_list_is_an_error_not_a_silent_random_split(demo, tmp_path):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": pairs[:7], "validation": [{"image": str(tmp_path / "gone.png")}]}))
    with pytest.raises(ValueError, match="gone.png"):
        training_datalist(path)
