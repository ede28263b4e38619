"""Readers: every input format loads to the same tensor, and predictions written back line up with their sources."""

from __future__ import annotations

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from conftest_data import (
    dicom_dataset,
    marker_mask,
    marker_picture,
    real_data,
    write_dicom,
    write_nifti,
    write_png,
)
from monai.data import DataLoader, Dataset, list_data_collate
from monai.transforms import LoadImage, LoadImaged
from PIL import Image

from monai_ecrm.data import DataError, PolypImageReader, read_picture
from monai_ecrm.transforms import LoadPolypImage, LoadPolypImaged, infer_postprocessing, infer_transforms


def _expected(picture: np.ndarray, scale: float = 255.0) -> torch.Tensor:
    """The pipeline tensor of a displayed picture ``[H, W(, C)]``: ``[3, H, W]`` in ``[0, 1]``."""
    array = picture.astype(np.float32) / scale
    array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array
    return torch.from_numpy(np.moveaxis(array, -1, 0).copy())


@pytest.fixture(scope="module")
def marker_files(tmp_path_factory):
    """The same RGB L-marker picture written by Pillow, tifffile, pydicom (raw and JPEG 2000) and nibabel."""
    folder = tmp_path_factory.mktemp("marker")
    picture = marker_picture()
    j2k = dicom_dataset(picture)
    j2k.compress(pydicom.uid.JPEG2000Lossless, picture, photometric_interpretation="YBR_RCT")
    files = {
        "png": write_png(folder / "marker.png", picture),
        "bmp": write_png(folder / "marker.bmp", picture),
        "tiff": folder / "marker.tif",
        "dicom": write_dicom(folder / "marker.dcm", dicom_dataset(picture)),
        "dicom_j2k": write_dicom(folder / "marker_j2k.dcm", j2k),
        "dicom_no_extension": write_dicom(folder / "IM000001", dicom_dataset(picture)),
        "nifti": write_nifti(folder / "marker.nii.gz", picture),
    }
    tifffile.imwrite(files["tiff"], picture, photometric="rgb")
    return picture, files


def test_same_picture_loads_to_the_same_tensor_in_every_format(marker_files):
    picture, files = marker_files
    expected = _expected(picture)
    loader = LoadPolypImage()
    for fmt, path in files.items():
        image = loader(path)
        assert image.shape == (3, 36, 48), f"{fmt}: [3, H, W] expected, got {tuple(image.shape)}"
        assert image.dtype == torch.float32
        assert torch.equal(image.as_tensor(), expected), f"{fmt} loads differently from the picture as displayed"


def test_grayscale_picture_in_every_format_replicates_to_three_channels(tmp_path):
    picture = marker_picture(rgb=False)
    paths = [
        write_png(tmp_path / "gray.png", picture),
        write_dicom(tmp_path / "gray.dcm", dicom_dataset(picture)),
        write_nifti(tmp_path / "gray.nii", picture),
    ]
    tifffile.imwrite(tmp_path / "gray.tiff", picture)
    for path in paths + [tmp_path / "gray.tiff"]:
        assert torch.equal(LoadPolypImage()(path).as_tensor(), _expected(picture)), path.name


def test_jpeg_loads_like_pillow_decodes_it(tmp_path):
    path = tmp_path / "marker.jpg"
    Image.fromarray(marker_picture()).save(path, quality=95)
    decoded = np.asarray(Image.open(path))
    assert torch.equal(LoadPolypImage()(path).as_tensor(), _expected(decoded))


def test_real_jpeg2000_dicom_frame_matches_pydicom_pixel_array():
    path = real_data("dicom_samples") / "nema_wg04_vl2_j2kr.dcm"
    reference = pydicom.dcmread(path).pixel_array  # YBR_RCT frame decoded to RGB, (486, 756, 3)
    image = LoadPolypImage()(path)
    assert image.shape == (3, 486, 756)
    assert torch.equal(image.as_tensor(), _expected(reference))
    assert image.meta["source_format"] == "dicom"
    assert image.meta["SOPInstanceUID"] == str(pydicom.dcmread(path).SOPInstanceUID), "DICOM identifiers are kept"


def test_cvc_clinicdb_original_tiffs_match_the_pngs():
    tif, png = real_data("cvc_clinicdb_tif"), real_data("cvc_clinicdb")
    with pytest.raises(OSError):  # why tifffile is needed: Pillow cannot open these 3-sample TIFFs
        Image.open(tif / "images" / "1.tif").load()
    loader, mask_loader = LoadPolypImage(), LoadPolypImage(as_label=True)
    for index in (1, 2, 3):
        assert torch.equal(loader(tif / "images" / f"{index}.tif"), loader(png / "images" / f"{index}.png"))
        tif_mask = mask_loader(tif / "masks" / f"{index}.tif")
        png_mask = mask_loader(png / "masks" / f"{index}.png")
        assert tif_mask.shape == (1, 288, 384)
        assert (tif_mask != png_mask).float().mean() < 0.01, "TIFF and PNG masks of CVC-ClinicDB should agree"


def test_dicom_ybr_full_is_converted_to_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    picture = marker_picture()
    ybr = convert_color_space(picture, "RGB", "YBR_FULL")
    image = LoadPolypImage()(write_dicom(tmp_path / "ybr.dcm", dicom_dataset(ybr, photometric="YBR_FULL")))
    assert (image.as_tensor() - _expected(picture)).abs().max() <= 2 / 255, "YBR_FULL must load as RGB"


def test_dicom_monochrome1_is_inverted_and_12_bit_scaled(tmp_path):
    picture = (marker_picture(rgb=False).astype(np.uint16) * 16).clip(0, 4095)  # 12 bits stored
    ds = dicom_dataset(picture, photometric="MONOCHROME1", bits_stored=12)
    image = LoadPolypImage()(write_dicom(tmp_path / "mono1.dcm", ds))
    assert torch.allclose(image.as_tensor(), _expected(4095 - picture, scale=4095.0))


def test_multiframe_dicom_is_a_sequence_of_frames(tmp_path):
    frames = np.stack([marker_picture(rgb=False) // (index + 1) for index in range(3)])
    path = write_dicom(tmp_path / "clip.dcm", dicom_dataset(frames, frames=3))
    loader = LoadPolypImage()
    for index in range(3):
        image = loader(path, frame=index)
        assert torch.equal(image.as_tensor(), _expected(frames[index])), f"frame {index}"
        assert image.meta["frame_index"] == index
        assert image.meta["filename_or_obj"].endswith(f"clip_frame{index:04d}.dcm"), "each frame saves to its own file"
    with pytest.raises(ValueError, match="3 frames where one 2D frame is expected"):
        loader(path)


def test_sixteen_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    picture = (np.arange(36 * 48, dtype=np.uint16).reshape(36, 48) * 50).astype(np.uint16)
    image = LoadPolypImage()(write_png(tmp_path / "deep.png", picture))
    assert torch.allclose(image.as_tensor(), _expected(picture, scale=65535.0))


def test_rgba_png_drops_alpha_and_keeps_colours(tmp_path):
    picture = marker_picture()
    rgba = np.concatenate([picture, np.full((36, 48, 1), 128, np.uint8)], axis=-1)
    image = LoadPolypImage()(write_png(tmp_path / "rgba.png", rgba))
    assert torch.equal(image.as_tensor(), _expected(picture))


def test_masks_are_binary_and_jpeg_noise_is_thresholded(tmp_path):
    mask = marker_mask()
    noisy = np.where(mask, 250, 6).astype(np.uint8)
    Image.fromarray(np.repeat(noisy[..., None], 3, -1)).save(tmp_path / "mask.jpg", quality=75)
    write_png(tmp_path / "zero_one.png", mask.astype(np.uint8))
    for name in ("mask.jpg", "zero_one.png"):
        label = LoadPolypImage(as_label=True)(tmp_path / name)
        assert label.shape == (1, 36, 48)
        assert set(label.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(label[0].bool(), torch.from_numpy(mask)), name


def test_monai_loadimaged_with_our_reader_matches_monai_pil_reader(marker_files):
    _, files = marker_files
    ours = LoadImaged("image", reader=PolypImageReader(), ensure_channel_first=True, image_only=True)
    theirs = LoadImage(image_only=True, ensure_channel_first=True)  # MONAI's PILReader, spatial-first layout
    loaded = ours({"image": str(files["png"])})["image"]
    assert torch.equal(loaded.as_tensor(), theirs(str(files["png"])).as_tensor().to(loaded.dtype))
    dicom = ours({"image": str(files["dicom"])})["image"]
    assert torch.equal(dicom.as_tensor(), loaded.as_tensor()), "all formats share MONAI's reader layout"


def test_mixed_formats_collate_into_one_batch(marker_files):
    _, files = marker_files
    items = [{"image": str(files[fmt])} for fmt in ("png", "dicom", "nifti", "tiff")]
    loader = DataLoader(
        Dataset(items, LoadPolypImaged("image", label_keys=[])), batch_size=4, collate_fn=list_data_collate
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 36, 48)
    assert list(batch["image"].meta["source_format"]) == ["png", "dicom", "nifti", "tiff"]


@pytest.mark.parametrize("fmt", ["png", "dicom", "nifti"])
def test_prediction_written_back_lines_up_with_the_source(tmp_path, fmt):
    """An L marker predicted on a resized input is written at the source's size, where the source has it."""
    picture = marker_picture(rgb=False)
    source = {
        "png": lambda: write_png(tmp_path / "source.png", picture),
        "dicom": lambda: write_dicom(tmp_path / "source.dcm", dicom_dataset(picture)),
        "nifti": lambda: write_nifti(tmp_path / "source.nii.gz", picture, np.diag([-0.5, -0.5, 2.0, 1.0])),
    }[fmt]()
    preprocessing = infer_transforms(spatial_size=[72, 96])
    item = preprocessing({"image": str(source)})
    item["pred"] = item["image"][:1] * 4.0  # logits: the marker is bright, the background dark
    output = tmp_path / "out"
    infer_postprocessing(preprocessing, output_dir=str(output))(item)
    written = sorted(output.iterdir())
    assert len(written) == 1
    if fmt == "nifti":
        assert written[0].name == "source_seg.nii.gz"
        result, original = nibabel.load(written[0]), nibabel.load(source)
        voxels = np.asarray(result.dataobj).reshape(original.shape)
        assert np.array_equal(voxels > 0, np.asarray(original.dataobj) > 0), "the mask does not overlay its source"
        assert np.allclose(result.affine, original.affine), "the prediction must keep the source's affine"
    else:
        assert written[0].name == "source_seg.png"
        written_mask = np.asarray(Image.open(written[0]))
        assert written_mask.shape == picture.shape
        assert np.array_equal(written_mask > 0, marker_mask()), "the mask does not overlay its source in Pillow"


def test_read_picture_gives_the_displayed_layout_for_nifti(tmp_path):
    picture = marker_picture()
    path = write_nifti(tmp_path / "rgb.nii", picture)
    data, info = read_picture(path)
    assert np.array_equal(data, picture)
    assert (info.width, info.height, info.channels) == (48, 36, 3)


RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
# NIfTI layouts of the 48 x 36 marker picture and their spatial shapes (the shape without the channel axis)
NIFTI_SPATIAL_SHAPES = {
    "grey_2d": (48, 36),
    "grey_4d": (48, 36, 1, 1),
    "rgb_uint8": (48, 36),
    "rgb24": (48, 36),
    "vector": (48, 36, 1, 1),
}


def nifti_source(path, layout: str, picture: np.ndarray, affine: np.ndarray):
    """A NIfTI file holding ``picture`` (``[H, W, 3]`` RGB or ``[H, W]`` grey) in one of the accepted layouts
    (:data:`NIFTI_SPATIAL_SHAPES`), with voxel axis x along the columns."""
    voxels = np.swapaxes(picture, 0, 1)
    if layout == "rgb24":
        structured = np.empty(voxels.shape[:2], dtype=RGB24)
        for index, name in enumerate(RGB24.names):
            structured[name] = voxels[..., index]
        voxels = structured
    elif layout == "vector":
        voxels = voxels[:, :, None, None, :]
    elif layout == "grey_4d":
        voxels = voxels[:, :, None, None]
    nibabel.save(nibabel.Nifti1Image(voxels, affine), path)
    return path


def test_rgb_nifti_saved_as_a_uint8_picture_array_reads_as_rgb(tmp_path):
    """The obvious way to save a picture as NIfTI, ``Nifti1Image(numpy.asarray(picture), affine)``: (H, W, 3) uint8."""
    picture = marker_picture()
    path = tmp_path / "saved_as_is.nii.gz"
    nibabel.save(nibabel.Nifti1Image(picture, np.eye(4)), path)
    data, info = read_picture(path)
    assert info.channels == 3 and data.shape == (48, 36, 3), "(H, W, 3) uint8 is an RGB picture, not 3 slices"
    np.testing.assert_array_equal(data, np.swapaxes(picture, 0, 1), err_msg="voxel axis x runs along the columns")
    image = LoadPolypImage()(path)
    assert image.shape == (3, 48, 36) and not torch.equal(image[0], image[1]), "colours are kept, not greyed"


def test_rgb24_nifti_reads_as_rgb(tmp_path):
    picture = marker_picture()
    path = nifti_source(tmp_path / "rgb24.nii", "rgb24", picture, np.eye(4))
    assert nibabel.load(path).header["datatype"] == 128, "NIfTI's RGB24 datatype"
    data, info = read_picture(path)
    assert info.channels == 3
    np.testing.assert_array_equal(data, picture)


def test_a_three_slice_volume_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((20, 16, 3)).astype(np.float32), np.eye(4)), path)
    with pytest.raises(DataError) as raised:
        read_picture(path)
    message = str(raised.value)
    assert str(path) in message and "3 slices" in message and "where a 2D frame is expected" in message, message
    assert "uint8" in message, "the error says how a colour picture is stored"


@pytest.mark.parametrize("layout", list(NIFTI_SPATIAL_SHAPES))
def test_nifti_mask_has_the_source_shape_and_affine_and_0_255_values(tmp_path, layout):
    """A NIfTI mask overlays its source in any viewer: the source's spatial shape and affine, values 0/255."""
    picture = marker_picture(rgb=not layout.startswith("grey"))
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    path = nifti_source(tmp_path / "source.nii.gz", layout, picture, affine)
    preprocessing = infer_transforms(spatial_size=[72, 96])
    item = preprocessing({"image": str(path)})
    item["pred"] = item["image"][:1] * 8.0 - 4.0  # logits: positive on the marker (255), negative elsewhere
    output = tmp_path / "out"
    infer_postprocessing(preprocessing, output_dir=str(output))(item)
    (written,) = output.iterdir()
    mask = nibabel.load(written)
    voxels = np.asarray(mask.dataobj)
    assert voxels.shape == NIFTI_SPATIAL_SHAPES[layout], f"the mask of a {nibabel.load(path).shape} source"
    assert voxels.dtype == np.uint8 and set(np.unique(voxels)) == {0, 255}, "masks are 0/255 like the PNG masks"
    np.testing.assert_array_equal(voxels.reshape(48, 36).T > 0, marker_mask(), err_msg="the mask overlays its source")
    assert np.allclose(mask.affine, affine), "the prediction must keep the source's affine"


def test_each_frame_of_a_multiframe_file_gets_its_own_prediction_file(tmp_path):
    frames = np.stack([marker_picture(rgb=False)] * 2)
    path = write_dicom(tmp_path / "clip.dcm", dicom_dataset(frames, frames=2))
    preprocessing = infer_transforms(spatial_size=32)
    post = infer_postprocessing(preprocessing, output_dir=str(tmp_path / "out"))
    for frame in (0, 1):
        item = preprocessing({"image": str(path), "frame": frame})
        item["pred"] = item["image"][:1]
        post(item)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_frame0000_seg.png", "clip_frame0001_seg.png"]
