"""Bad input: each bad file gives one clear error naming it and its problem; a datalist build reports them all."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from conftest_data import dicom_dataset, marker_picture, write_dicom, write_png
from PIL import Image

from monai_ecrm.data import DataError, folder_datalist, probe_picture, read_picture
from monai_ecrm.transforms import LoadPolypImage, LoadPolypImaged, eval_transforms

# file name -> words the error must contain (besides the file's path)
BAD_FILES = {
    "zero_byte.png": "empty file (0 bytes)",
    "truncated.jpg": "truncated JPEG",
    "not_an_image.png": "Pillow cannot identify",
    "no_pixels.dcm": "DICOM without pixel data",
    "mpeg4_video.dcm": "cannot be decoded",
    "not_dicom.dcm": "not a DICOM file",
    "volume.nii.gz": "3D NIfTI volume of shape (36, 48, 5)",
    "scan.xyz": "unknown extension '.xyz'",
}


def _write_bad_files(folder: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG4HP41

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_byte.png").write_bytes(b"")
    Image.fromarray(marker_picture()).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    (folder / "not_an_image.png").write_bytes(b"these bytes are not a PNG picture" * 10)
    write_dicom(folder / "no_pixels.dcm", dicom_dataset(None))
    video = dicom_dataset(marker_picture(), frames=None)
    video.file_meta.TransferSyntaxUID = MPEG4HP41
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    video["PixelData"].VR = "OB"
    video["PixelData"].is_undefined_length = True
    write_dicom(folder / "mpeg4_video.dcm", video)
    (folder / "not_dicom.dcm").write_text("a text file with a DICOM extension\n" * 10)
    nibabel.save(nibabel.Nifti1Image(np.zeros((36, 48, 5), np.uint8), np.eye(4)), folder / "volume.nii.gz")
    (folder / "scan.xyz").write_bytes(b"\x00" * 100)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad") / "images"
    _write_bad_files(folder)
    return folder


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_gives_one_error_naming_it(bad_folder, name):
    path = bad_folder / name
    for check in (probe_picture, read_picture, LoadPolypImage()):
        with pytest.raises(DataError) as caught:
            check(path)
        message = str(caught.value)
        assert str(path) in message and BAD_FILES[name] in message, f"{check}: unclear error {message!r}"
        assert caught.value.problems == [(str(path), message[len(str(path)) + 2 :])], "one problem, this file"


def test_datalist_build_reports_every_bad_file_at_once(bad_folder, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(bad_folder, root / "images")
    write_png(root / "images" / "good.png", marker_picture())
    with pytest.raises(DataError) as caught:
        folder_datalist(root, verify="full")
    reported = dict(caught.value.problems)
    for name, words in BAD_FILES.items():
        assert words in reported.get(str((root / "images" / name).resolve()), ""), f"{name} missing from the report"
    assert len(reported) == len(BAD_FILES), "the good file must not be reported"
    with pytest.warns(UserWarning, match=f"{len(BAD_FILES)} problem"):
        items = folder_datalist(root, verify="full", on_error="skip")
    assert [Path(item["image"]).name for item in items] == ["good.png"], "skip mode keeps the good files"


def test_image_mask_size_mismatch_names_both_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = write_png(tmp_path / "images" / "a.png", marker_picture())
    mask = write_png(tmp_path / "masks" / "a.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="size mismatch") as caught:
        folder_datalist(tmp_path)
    assert "image 48x36, label 20x20" in str(caught.value) and str(image) in str(caught.value)
    with pytest.raises(DataError, match="size mismatch") as caught:
        LoadPolypImaged(["image", "label"])({"image": str(image), "label": str(mask)})
    assert str(image) in str(caught.value) and str(mask) in str(caught.value)


def test_unmatched_images_and_masks_are_all_reported(tmp_path):
    for folder, names in (("images", ["a.png", "b.jpg", "c.png"]), ("masks", ["a.png", "c.tif", "d.png"])):
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(marker_picture(rgb=False)).save(tmp_path / folder / name)
    with pytest.raises(DataError) as caught:
        folder_datalist(tmp_path)
    reported = dict(caught.value.problems)
    assert "no mask with the stem 'b'" in reported[str(tmp_path / "images" / "b.jpg")]
    assert "no image with the stem 'd'" in reported[str(tmp_path / "masks" / "d.png")]
    assert len(reported) == 2, "a.png/a.png and c.png/c.tif match by stem across extensions"


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="empty folder: no picture files"):
        folder_datalist(tmp_path / "empty")
    with pytest.raises(DataError, match="folder not found"):
        folder_datalist(tmp_path / "nowhere")


def test_grayscale_rgba_and_16_bit_pngs_are_documented_conversions(tmp_path):
    picture = marker_picture()
    gray = write_png(tmp_path / "gray.png", picture[..., 0])
    rgba = write_png(tmp_path / "rgba.png", np.concatenate([picture, np.zeros((36, 48, 1), np.uint8)], axis=-1))
    deep = write_png(tmp_path / "deep.png", picture[..., 0].astype(np.uint16) * 257)
    loader = LoadPolypImage()
    expected_gray = torch.from_numpy(picture[..., 0] / 255.0).float().expand(3, -1, -1)
    assert torch.allclose(loader(gray).as_tensor(), expected_gray), "grayscale is replicated to 3 channels"
    assert torch.allclose(loader(deep).as_tensor(), expected_gray), "16-bit intensities are divided by 65535"
    expected_rgb = torch.from_numpy(np.moveaxis(picture, -1, 0) / 255.0).float()
    assert torch.allclose(loader(rgba).as_tensor(), expected_rgb), "RGBA loses its alpha, keeps its colours"


def test_wrong_channel_count_and_bad_masks_are_errors(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "five.tif", np.zeros((36, 48, 5), np.uint8), photometric="minisblack", planarconfig=1)
    with pytest.raises(DataError, match="5 samples per pixel"):
        LoadPolypImage()(tmp_path / "five.tif")
    colour_mask = write_png(tmp_path / "colour_mask.png", marker_picture())
    with pytest.raises(DataError, match="give label_mapping"):
        LoadPolypImage(as_label=True, num_classes=3)(colour_mask)


def test_errors_inside_a_preset_keep_the_file_name(bad_folder):
    preset = eval_transforms(spatial_size=32)
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as caught:
        warnings.simplefilter("ignore")
        preset({"image": str(bad_folder / "truncated.jpg"), "label": str(bad_folder / "truncated.jpg")})
    cause = caught.value.__cause__
    assert isinstance(cause, DataError) and str(bad_folder / "truncated.jpg") in str(cause)


def test_data_error_survives_pickling_with_its_problems():
    import pickle

    error = DataError([("a.png", "empty file (0 bytes)"), ("b.dcm", "DICOM without pixel data")])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == str(error)
    assert str(DataError("message only")) == "message only", "DataLoader workers re-raise with a message"


def test_mask_noise_never_makes_foreground_in_an_empty_jpeg_mask(tmp_path):
    empty = np.zeros((36, 48), np.uint8) + 9
    Image.fromarray(empty).save(tmp_path / "empty.jpg", quality=60)
    assert LoadPolypImage(as_label=True)(tmp_path / "empty.jpg").sum() == 0
