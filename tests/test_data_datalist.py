"""Datalists: folders matched by stem, flat image folders, split id lists, datalist JSON, and the real PraNet split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_data import (
    DATA_DIR,
    dicom_dataset,
    marker_picture,
    real_data,
    write_clip_dataset,
    write_dicom,
    write_png,
)

from monai_ecrm.data import (
    PRANET_VAL_SEED,
    DataError,
    folder_datalist,
    load_datalist,
    pranet_datalist,
    read_picture,
    split_by_case,
    split_datalist,
)
from monai_ecrm.transforms import LoadPolypImage, LoadPolypImaged


def _dataset(root: Path, images: list[str], masks: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in images:
        write_png(root / "images" / name, marker_picture()) if name.endswith(".png") else _save(root / "images" / name)
    for name in masks:
        write_png(root / "masks" / name, marker_picture(rgb=False))
    return root


def _save(path: Path) -> None:
    from PIL import Image

    Image.fromarray(marker_picture()).save(path)


def test_pairs_match_by_stem_across_extensions(tmp_path):
    root = _dataset(tmp_path / "set", ["a.jpg", "b.png", "c.tif"], ["a.png", "b.png", "c_mask.png"])
    with pytest.raises(DataError, match="no mask with the stem 'c'"):
        folder_datalist(root)
    (root / "masks" / "c_mask.png").rename(root / "masks" / "c.png")
    items = folder_datalist(root)
    assert [(Path(i["image"]).name, Path(i["label"]).name) for i in items] == [
        ("a.jpg", "a.png"),
        ("b.png", "b.png"),
        ("c.tif", "c.png"),
    ]
    assert all(Path(i["image"]).is_absolute() and Path(i["label"]).is_absolute() for i in items)


def test_mask_suffix_matches_stem_mask_names(tmp_path):
    root = _dataset(tmp_path / "set", ["a.png", "b.png"], ["a_mask.png", "b_mask.png"])
    items = folder_datalist(root, mask_suffix="_mask")
    assert [Path(i["label"]).name for i in items] == ["a_mask.png", "b_mask.png"]


def test_flat_folder_of_images_gives_an_inference_list(tmp_path):
    for name in ("x.png", "y.png"):
        write_png(tmp_path / name, marker_picture())
    (tmp_path / ".DS_Store").write_bytes(b"\x00")  # hidden files are ignored
    items = folder_datalist(tmp_path)
    assert items == [{"image": str(tmp_path / "x.png")}, {"image": str(tmp_path / "y.png")}]


def test_multiframe_dicom_lists_one_item_per_frame(tmp_path):
    frames = np.stack([marker_picture(rgb=False) // (index + 1) for index in range(4)])
    write_dicom(tmp_path / "clip.dcm", dicom_dataset(frames, frames=4))
    write_png(tmp_path / "still.png", marker_picture())
    items = folder_datalist(tmp_path)
    assert [item.get("frame") for item in items] == [0, 1, 2, 3, None]
    loaded = LoadPolypImaged("image", label_keys=[])(items[2])["image"]
    assert torch.equal(loaded[0], torch.from_numpy(frames[2] / 255.0).float()), "frame 2 loads frame 2"


def test_frames_of_a_multipage_tiff_never_straddle_the_split(tmp_path):
    items = folder_datalist(write_clip_dataset(tmp_path / "set", frames=10, stills=9))
    clip = [item for item in items if item["image"].endswith("clip.tif")]
    assert [item["frame"] for item in clip] == list(range(10)), "the TIFF is listed frame by frame"
    clip_held_out = []
    for seed in range(20):
        training, validation = split_by_case(items, val_fraction=0.2, seed=seed)
        val_clip = [item for item in validation if item["image"].endswith("clip.tif")]
        assert len(val_clip) in (0, 10), f"seed {seed}: frames {[i['frame'] for i in val_clip]} of one clip held out"
        assert len({item["image"] for item in validation}) == 2, "0.2 of the 10 files (cases), not of the 19 frames"
        assert sorted(map(str, training + validation)) == sorted(map(str, items)), "every item on exactly one side"
        clip_held_out.append(bool(val_clip))
    assert any(clip_held_out) and not all(clip_held_out), "the clip is drawn like any other file"


def test_items_sharing_a_case_key_land_on_the_same_side():
    items = [{"image": f"/videos/frame{index:03d}.png", "case": f"video{index % 12}"} for index in range(60)]
    items += [{"image": f"/stills/{index}.png"} for index in range(8)]  # no case key: one case per file
    splits = {seed: split_by_case(items, val_fraction=0.25, seed=seed) for seed in range(10)}
    for seed, (training, validation) in splits.items():
        train_cases = {item.get("case", item["image"]) for item in training}
        val_cases = {item.get("case", item["image"]) for item in validation}
        assert not train_cases & val_cases, f"seed {seed}: a video on both sides of the split"
        assert len(val_cases) == 5, "round(0.25 * 20 cases) held out, whatever the cases' sizes"
        assert len(training) + len(validation) == len(items)
    assert split_by_case(items, 0.25, seed=3) == splits[3], "the split is a function of the datalist and the seed"
    assert len({str(validation) for _, validation in splits.values()}) > 1, "the seed changes the split"
    assert split_by_case(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_case(items, 1.0)


def test_split_datalist_follows_id_lists_and_reports_missing_ids(tmp_path):
    first = _dataset(tmp_path / "first", ["1.png", "2.png", "3.png"], ["1.png", "2.png", "3.png"])
    second = _dataset(tmp_path / "second", ["a.png"], ["a.png"])
    (tmp_path / "first.txt").write_text("3\n1\n\n# a comment\n")
    (tmp_path / "second.txt").write_text("a.png\n")
    items = split_datalist([first, second], [tmp_path / "first.txt", tmp_path / "second.txt"])
    assert [Path(i["image"]).relative_to(tmp_path).as_posix() for i in items] == [
        "first/images/3.png",
        "first/images/1.png",
        "second/images/a.png",
    ]
    (tmp_path / "first.txt").write_text("1\n7\n8\n")
    with pytest.raises(DataError) as caught:
        split_datalist(first, tmp_path / "first.txt")
    assert [problem for _, problem in caught.value.problems] == ["listed in first.txt but no image with this stem"] * 2


def test_load_datalist_reads_monai_json_and_folders(tmp_path):
    root = _dataset(tmp_path / "set", ["a.png", "b.png"], ["a.png", "b.png"])
    datalist = {
        "training": [{"image": "set/images/a.png", "label": "set/masks/a.png"}],
        "validation": [{"image": "set/images/b.png", "label": "set/masks/b.png"}],
        "test": ["set/images/b.png"],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    training = load_datalist(tmp_path / "datalist.json")
    assert training == [{"image": str(root / "images" / "a.png"), "label": str(root / "masks" / "a.png")}]
    testing = load_datalist(tmp_path / "datalist.json", data_list_key="test")
    assert testing == [{"image": str(root / "images" / "b.png")}]
    assert len(load_datalist(root)) == 2
    datalist["training"].append({"image": "set/images/missing.png", "label": "set/masks/a.png"})
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(DataError, match="missing.png: file not found"):
        load_datalist(tmp_path / "datalist.json")


@pytest.fixture(scope="module")
def pranet_split():
    kvasir, clinicdb = real_data("kvasir_seg"), real_data("cvc_clinicdb")
    split = real_data("pranet_split")
    return {
        "train": split_datalist([kvasir, clinicdb], [split / "train_kvasir.txt", split / "train_clinicdb.txt"]),
        "test_kvasir": split_datalist(kvasir, split / "test_kvasir.txt"),
        "test_clinicdb": split_datalist(clinicdb, split / "test_clinicdb.txt"),
    }


def test_pranet_split_builds_with_the_published_sizes(pranet_split):
    sizes = {name: len(items) for name, items in pranet_split.items()}
    assert sizes == {"train": 1450, "test_kvasir": 100, "test_clinicdb": 62}
    train = {item["image"] for item in pranet_split["train"]}
    test = {item["image"] for item in pranet_split["test_kvasir"] + pranet_split["test_clinicdb"]}
    assert not train & test, "no test image may leak into training"


def test_pranet_datalist_holds_out_a_fixed_validation_split_and_names_the_test_sets(pranet_split):
    datalist = pranet_datalist(DATA_DIR, verify="none")
    training, validation = datalist["training"], datalist["validation"]
    assert (len(training), len(validation)) == (1305, 145), "10 % of the 1450 training pairs held out"
    assert not {item["image"] for item in training} & {item["image"] for item in validation}
    assert (training, validation) == split_by_case(pranet_split["train"], 0.1, PRANET_VAL_SEED), "a fixed split"
    test = {name: [item for item in datalist["test"] if item["dataset"] == name] for name in ("kvasir", "clinicdb")}
    assert len(datalist["test"]) == 162 and [len(items) for items in test.values()] == [100, 62]
    assert [{k: v for k, v in item.items() if k != "dataset"} for item in test["kvasir"]] == pranet_split["test_kvasir"]
    held_out = {item["image"] for item in validation}
    assert not held_out & {item["image"] for item in datalist["test"]}, "validation comes from the training lists"


@pytest.mark.slow
def test_every_real_pair_loads_with_a_binary_mask(pranet_split):
    """All 1612 pairs decode; masks are binary with some foreground and some background (about 10 s)."""
    mask_loader = LoadPolypImage(as_label=True)
    foreground = []
    for item in pranet_split["train"] + pranet_split["test_kvasir"] + pranet_split["test_clinicdb"]:
        image, info = read_picture(item["image"])  # the decoding LoadPolypImage does, without the float copy
        mask = mask_loader(item["label"])
        assert info.channels == 3 and mask.shape[1:] == image.shape[:2], item
        foreground.append(float(mask.mean()))
        assert torch.all((mask == 0) | (mask == 1)), item["label"]
    assert 0.0 < min(foreground) and max(foreground) < 1.0, "every real mask has a polyp and background"


def test_kvasir_jpeg_mask_is_thresholded_at_half_range():
    kvasir = real_data("kvasir_seg")
    from PIL import Image

    path = sorted((kvasir / "masks").iterdir())[0]
    raw = np.asarray(Image.open(path)).max(axis=-1)
    mask = LoadPolypImage(as_label=True)(path)
    assert len(np.unique(raw)) > 2, "Kvasir-SEG masks carry JPEG noise"
    assert torch.equal(mask[0], torch.from_numpy(raw >= 128).float())
