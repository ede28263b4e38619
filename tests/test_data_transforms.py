"""Transform presets: tensor convention, seeded augmentation, caching, inversion to the original size, class maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_data import marker_picture, write_png
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader
from monai.transforms import Randomizable
from PIL import Image

from monai_ecrm.data import make_demo_dataset
from monai_ecrm.data.datalist import folder_datalist
from monai_ecrm.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadPolypImage,
    eval_postprocessing,
    eval_transforms,
    infer_postprocessing,
    infer_transforms,
    train_transforms,
)


@pytest.fixture(scope="module")
def demo_items(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo") / "synthetic", num_images=4, size=80)
    return folder_datalist(root)


def test_train_preset_gives_the_tensor_convention(demo_items):
    item = train_transforms(spatial_size=64)(demo_items[0])
    image, label = item["image"], item["label"]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert label.shape == (1, 64, 64) and label.dtype == torch.float32
    assert set(label.unique().tolist()) <= {0.0, 1.0}
    low = (0.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    high = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for channel in range(3):  # ImageNet-normalised values of intensities clipped to [0, 1]
        assert low[channel] - 1e-4 <= image[channel].min() and image[channel].max() <= high[channel] + 1e-4


def test_train_augmentation_is_seeded_by_set_random_state(demo_items):
    def run(seed):
        preset = train_transforms(spatial_size=48, affine_prob=1.0, intensity_prob=1.0)
        preset.set_random_state(seed=seed)
        return [preset(demo_items[0])["image"] for _ in range(3)]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "same seed, same augmentations (exact resume)"
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    steps = train_transforms().transforms
    random_names = [type(t).__name__ for t in steps if type(t).__name__.startswith("Rand")]
    assert len(random_names) == 6 and all(
        isinstance(t, Randomizable) for t in steps if type(t).__name__ in random_names
    )


def test_train_augmentation_moves_image_and_mask_together(tmp_path):
    """The polyp stays under its mask through flips, rotation and zoom."""
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[10:30, 8:20] = 255
    item = {"image": str(write_png(tmp_path / "i.png", picture)), "label": str(write_png(tmp_path / "m.png", picture))}
    preset = train_transforms(spatial_size=64, affine_prob=1.0, intensity_prob=0.0)
    for seed in range(4):
        preset.set_random_state(seed=seed)
        out = preset(item)
        bright = out["image"][0] > 0  # normalised black is negative
        assert (bright.float() - out["label"][0]).abs().mean() < 0.03, f"seed {seed}: image and mask moved apart"


def test_cache_dataset_holds_the_compact_deterministic_part(demo_items):
    preset = train_transforms(spatial_size=48)
    dataset = CacheDataset(demo_items, preset, cache_rate=1.0, num_workers=0, progress=False)
    cached = dataset._cache[0]
    assert cached["image"].dtype == torch.float16 and cached["label"].dtype == torch.uint8
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.float32


def test_eval_and_infer_predictions_invert_to_the_original_size(tmp_path):
    picture = marker_picture(36, 50)
    path = write_png(tmp_path / "odd_size.png", picture)
    for preset in (infer_transforms(spatial_size=32), eval_transforms(spatial_size=32)):
        item = preset({"image": str(path), "label": str(path)})
        assert item["image"].shape == (3, 32, 32)
        item["pred"] = torch.zeros(1, 32, 32)
        inverted = infer_postprocessing(preset)(item)["pred"]
        assert inverted.shape == (1, 50, 36), "Invertd gives the writers MONAI's reader layout [C, W, H]"
    item = eval_transforms(spatial_size=32, resize_label=False)({"image": str(path), "label": str(path)})
    assert item["label"].shape == (1, 36, 50), "resize_label=False keeps the mask at its original size"


def test_eval_postprocessing_binary_and_multiclass():
    binary = eval_postprocessing()({"pred": torch.tensor([[[-3.0, 2.0]]]), "label": torch.ones(1, 1, 2)})
    assert binary["pred"].tolist() == [[[0.0, 1.0]]]
    logits = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]], [[0.0, 0.0]]])
    multi = eval_postprocessing(num_classes=3)({"pred": logits, "label": torch.tensor([[[0.0, 2.0]]])})
    assert multi["pred"].shape == (3, 1, 2) and multi["label"][:, 0, 1].tolist() == [0.0, 0.0, 1.0]


def test_multiclass_masks_from_a_colour_or_value_mapping(tmp_path):
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[2:8, 2:8] = (250, 5, 3)  # red: class 1, with noise
    colour[10:16, 10:20] = (2, 251, 6)  # green: class 2
    Image.fromarray(colour).save(tmp_path / "colour.jpg", quality=90)
    mapping = {"0,0,0": 0, "#ff0000": 1, "0,255,0": 2}
    label = LoadPolypImage(as_label=True, num_classes=3, label_mapping=mapping)(tmp_path / "colour.jpg")[0]
    assert label[4, 4] == 1 and label[12, 15] == 2 and label[18, 25] == 0 and label.shape == (20, 30)
    values = np.zeros((20, 30), np.uint8)
    values[5:10, 5:10] = 128
    values[12:18, 12:18] = 255
    path = write_png(tmp_path / "values.png", values)
    label = LoadPolypImage(as_label=True, num_classes=3, label_mapping=[[0, 0], [128, 1], [255, 2]])(path)[0]
    assert label[7, 7] == 1 and label[15, 15] == 2 and label[0, 0] == 0
    indices = write_png(tmp_path / "indices.png", (values // 127).astype(np.uint8))
    assert torch.equal(LoadPolypImage(as_label=True, num_classes=3)(indices)[0], label), "index masks as they are"


def test_presets_are_built_from_bundle_config_targets(demo_items):
    config = ConfigParser(
        {
            "train": {"_target_": "monai_ecrm.transforms.train_transforms", "spatial_size": [40, 48]},
            "infer": {"_target_": "monai_ecrm.transforms.infer_transforms", "spatial_size": 40},
            "post": {"_target_": "monai_ecrm.transforms.infer_postprocessing", "preprocessing": "@infer"},
            "loader": {"_target_": "monai_ecrm.transforms.LoadPolypImaged", "keys": ["image", "label"]},
        }
    )
    assert config.get_parsed_content("train")(demo_items[0])["image"].shape == (3, 40, 48)
    assert config.get_parsed_content("loader")(demo_items[0])["label"].shape == (1, 80, 80)
    assert config.get_parsed_content("post") is not None


def test_batched_predictions_invert_per_item_after_decollation(tmp_path):
    """The evaluator's path: collate, predict, decollate, then Invertd restores each item's own size and layout."""
    from monai.data import Dataset, decollate_batch

    sizes = [(36, 48), (40, 30)]
    items = [{"image": str(write_png(tmp_path / f"{h}x{w}.png", marker_picture(h, w)))} for h, w in sizes]
    preset = infer_transforms(spatial_size=32)
    batch = next(iter(DataLoader(Dataset(items, preset), batch_size=2)))
    batch["pred"] = batch["image"][:, :1] * 4.0
    post = infer_postprocessing(preset, output_dir=str(tmp_path / "out"))
    for item, (height, width) in zip(decollate_batch(batch), sizes):
        assert post(item)["pred"].shape == (1, width, height)
    for height, width in sizes:
        assert np.asarray(Image.open(tmp_path / "out" / f"{height}x{width}_seg.png")).shape == (height, width)


def test_probability_maps_can_be_written_instead_of_masks(tmp_path):
    path = write_png(tmp_path / "p.png", marker_picture())
    preset = infer_transforms(spatial_size=36)
    item = preset({"image": str(path)})
    item["pred"] = torch.zeros(1, 36, 36)  # probability 0.5 everywhere
    infer_postprocessing(preset, output_dir=str(tmp_path / "out"), probabilities=True)(item)
    written = np.asarray(Image.open(tmp_path / "out" / "p_seg.png"))
    assert written.shape == (36, 48) and set(np.unique(written).tolist()) == {127}
