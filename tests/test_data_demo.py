"""The embedded synthetic demo set: deterministic, idempotent, fast, labelled synthetic, usable as a dataset."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from monai_ecrm.data import folder_datalist, make_demo_dataset
from monai_ecrm.transforms import LoadPolypImaged


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    start = time.perf_counter()
    root = make_demo_dataset(tmp_path_factory.mktemp("demo") / "polyp_demo")
    return root, time.perf_counter() - start


def test_default_demo_set_is_fast_complete_and_says_it_is_synthetic(demo_root):
    root, seconds = demo_root
    assert seconds < 2.0, f"generation took {seconds:.2f} s"
    items = folder_datalist(root, verify="full")
    assert len(items) == 24
    readme = (root / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "not colonoscopy images" in readme
    assert all("synthetic_" in item["image"] for item in items)
    loaded = LoadPolypImaged(["image", "label"])(items[0])
    assert loaded["image"].shape == (3, 128, 128) and loaded["label"].shape == (1, 128, 128)


def test_demo_masks_are_binary_with_a_polyp_each(demo_root):
    root, _ = demo_root
    for path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(path))
        assert set(np.unique(mask).tolist()) == {0, 255}, path.name
        assert 0.005 < (mask > 0).mean() < 0.5, f"{path.name}: polyp-like blob expected"


def test_demo_set_is_deterministic_and_seed_dependent(tmp_path, demo_root):
    root, _ = demo_root
    again = make_demo_dataset(tmp_path / "again", num_images=3)
    other = make_demo_dataset(tmp_path / "other", num_images=3, seed=1)
    for index in range(3):
        name = f"synthetic_{index:03d}.png"
        for folder in ("images", "masks"):
            assert (again / folder / name).read_bytes() == (root / folder / name).read_bytes(), "same seed, same pair"
        assert (other / "images" / name).read_bytes() != (root / "images" / name).read_bytes()


def test_demo_set_is_generated_only_when_absent(tmp_path):
    root = make_demo_dataset(tmp_path / "set", num_images=2, size=32)
    stamp = (root / "images" / "synthetic_000.png").stat().st_mtime_ns
    assert make_demo_dataset(root, num_images=2, size=32) == root
    assert (root / "images" / "synthetic_000.png").stat().st_mtime_ns == stamp, "an existing set is not rewritten"
    with pytest.raises(FileExistsError, match="other arguments"):
        make_demo_dataset(root, num_images=3, size=32)
    make_demo_dataset(root, num_images=3, size=32, overwrite=True)
    assert len(list((root / "images").iterdir())) == 3
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo set"):
        make_demo_dataset(tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    assert len(folder_datalist(make_demo_dataset(tmp_path / "empty", num_images=1, size=32))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_concurrent_generation_leaves_one_complete_set(tmp_path):
    """Several ranks of one job may all ask for the demo set at start-up."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: make_demo_dataset(tmp_path / "shared", num_images=3, size=32), range(4)))
    assert len(set(roots)) == 1 and len(folder_datalist(roots[0])) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
