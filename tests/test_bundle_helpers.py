"""The library functions the bundle configs call by name: datalists for every dataset_dir form, the full-size
evaluation presets and the backbone normalisation."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest_data import DATA_DIR, real_data, write_clip_dataset
from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate

from monai_ecrm.bundle import evaluation_datalist, inference_datalist, main, training_datalist
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


def _json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_folder_split_keeps_every_frame_of_a_multipage_tiff_on_one_side(tmp_path):
    root = write_clip_dataset(tmp_path / "set", frames=10, stills=9)
    clip_held_out = []
    for seed in range(20):
        split = training_datalist(root, val_fraction=0.2, seed=seed)
        sides = {side for side, items in split.items() for item in items if item["image"].endswith("clip.tif")}
        assert len(sides) == 1, f"seed {seed}: frames of one video in training and in validation"
        assert len({item["image"] for item in split["validation"]}) == 2, "0.2 of the 10 files held out"
        assert split == training_datalist(root, val_fraction=0.2, seed=seed), "the split must not change between runs"
        clip_held_out.append(sides == {"validation"})
    assert any(clip_held_out), "the clip can be held out like any other file"


def test_datalist_json_case_key_keeps_a_video_on_one_side(demo, tmp_path):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    videos = [{**pair, "case": f"video{index % 4}"} for index, pair in enumerate(pairs)]
    path = _json(tmp_path / "datalist.json", {"training": videos})
    for seed in range(8):
        split = training_datalist(path, val_fraction=0.25, seed=seed)
        train_cases = {item["case"] for item in split["training"]}
        val_cases = {item["case"] for item in split["validation"]}
        assert len(val_cases) == 1 and not train_cases & val_cases, f"seed {seed}: a video on both sides"
        assert len(split["training"]) + len(split["validation"]) == len(pairs)


def test_a_validation_list_sharing_cases_with_training_is_reported(demo, tmp_path, caplog):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    path = _json(tmp_path / "datalist.json", {"training": pairs[:7], "validation": pairs[6:]})
    with caplog.at_level(logging.WARNING, logger="monai_ecrm.bundle"):
        split = training_datalist(path)
    assert len(split["validation"]) == 4, "a given validation list is used as it is"
    assert "1 case(s) in both the training and the validation list" in caplog.text


def test_evaluation_scores_each_named_test_set_else_the_validation_list(demo, tmp_path):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    test = [{**pair, "dataset": "kvasir"} for pair in pairs[6:8]] + [
        {**pair, "dataset": "clinicdb"} for pair in pairs[8:]
    ]
    path = _json(tmp_path / "datalist.json", {"training": pairs[:5], "validation": pairs[5:6], "test": test})
    assert Counter(item["dataset"] for item in evaluation_datalist(path)) == {"kvasir": 2, "clinicdb": 2}
    assert Counter(item["dataset"] for item in evaluation_datalist(demo, eval_dataset_dir=path)) == {
        "kvasir": 2,
        "clinicdb": 2,
    }
    validation = evaluation_datalist(path, eval_list="validation")
    assert [(item["image"], item["dataset"]) for item in validation] == [(pairs[5]["image"], "validation")]
    unlabelled = _json(
        tmp_path / "decathlon.json", {"training": pairs[:5], "validation": pairs[5:6], "test": ["x.png"]}
    )
    assert [item["image"] for item in evaluation_datalist(unlabelled)] == [pairs[5]["image"]], "no masks to score"
    with pytest.raises(ValueError, match="'test' list of labelled items"):
        evaluation_datalist(unlabelled, eval_list="test")
    assert {item["dataset"] for item in evaluation_datalist(path, eval_dataset_dir=demo)} == {demo.name}


def _evaluate_config(bundle_root: Path, **overrides) -> ConfigParser:
    configs = Path(__file__).resolve().parents[1] / "bundles" / "polyp_ecrm" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser["bundle_root"] = str(bundle_root)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_evaluate_json_scores_the_test_sets_and_names_the_demo_set(demo, tmp_path, caplog):
    pairs = training_datalist(demo, val_fraction=0.0)["training"]
    test = [{**pair, "dataset": "kvasir" if index < 3 else "clinicdb"} for index, pair in enumerate(pairs[5:])]
    path = _json(tmp_path / "datalist.json", {"training": pairs[:4], "validation": pairs[4:5], "test": test})
    items = _evaluate_config(tmp_path / "bundle", dataset_dir=str(path)).get_parsed_content("eval_datalist")
    assert Counter(item["dataset"] for item in items) == {"kvasir": 3, "clinicdb": 2}, "each test set scored by name"
    items = _evaluate_config(tmp_path / "bundle", dataset_dir=str(path), eval_list="validation").get_parsed_content(
        "eval_datalist"
    )
    assert [item["image"] for item in items] == [pairs[4]["image"]]
    with caplog.at_level(logging.WARNING, logger="monai_ecrm.bundle"):
        items = _evaluate_config(tmp_path / "bundle").get_parsed_content("eval_datalist")
    assert items and {item["dataset"] for item in items} == {"demo"}, "the synthetic set is never reported as data"
    assert "SYNTHETIC demo set" in caplog.text


def test_pranet_datalist_command_writes_one_fixed_split_with_the_test_sets(tmp_path, capsys):
    for name in ("kvasir_seg", "cvc_clinicdb", "pranet_split"):
        real_data(name)
    out = tmp_path / "pranet.json"
    assert main(["pranet-datalist", "--data", str(DATA_DIR), "--out", str(out)]) == 0
    assert "training 1305, validation 145" in capsys.readouterr().out
    datalist = json.loads(out.read_text())
    training, validation = datalist["training"], datalist["validation"]
    assert (len(training), len(validation)) == (1305, 145), "the 1450 PraNet training pairs, 10 % held out"
    assert not {item["image"] for item in training} & {item["image"] for item in validation}, "disjoint cases"
    assert Counter(item["dataset"] for item in datalist["test"]) == {"kvasir": 100, "clinicdb": 62}
    selected_on = {item["image"] for item in training_datalist(out)["validation"]}
    assert selected_on == {item["image"] for item in validation}, "train.json selects on the stored validation split"
    assert not selected_on & {item["image"] for item in datalist["test"]}, "the test sets play no part in selection"
    scored = Counter(item["dataset"] for item in evaluation_datalist(out))
    assert scored == {"kvasir": 100, "clinicdb": 62}, "evaluate.json scores each test set, never the validation split"


def test_a_folder_that_is_not_a_bundle_is_warned_about(tmp_path, caplog):
    from monai_ecrm.bundle import bundle_path, check_bundle_root

    with caplog.at_level("WARNING", logger="monai_ecrm.bundle"):
        assert check_bundle_root(bundle_path()) is True
        assert not caplog.records
        assert check_bundle_root(tmp_path) is False
    assert len(caplog.records) == 1 and str(tmp_path) in caplog.text and "--bundle_root" in caplog.text


def test_bundle_inference_without_a_trained_model_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    from monai_ecrm.bundle import bundle_path

    bundle = tmp_path / "polyp_ecrm"
    shutil.copytree(bundle_path(), bundle, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs"))
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json")]
    result = subprocess.run(
        [*command, "--bundle_root", str(bundle)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "no trained model" in line]
    assert len(lines) == 1 and "model.pt" in lines[0] and "train" in lines[0]
