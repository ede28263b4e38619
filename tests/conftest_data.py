"""Shared helpers of the data tests: the real-data folder and independent writers (Pillow, pydicom, nibabel).

The writers deliberately use the format libraries directly, never ``monai_ecrm``, so that the tests check our
readers against what other software writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data(name: str) -> Path:
    """The folder ``../shared/data/<name>``, or skip the test saying it is absent."""
    folder = DATA_DIR / name
    if not folder.is_dir():
        pytest.skip(f"real data '{name}' not found at {folder} (see ../shared/data/SOURCES.md)")
    return folder


def marker_picture(height: int = 36, width: int = 48, rgb: bool = True) -> np.ndarray:
    """A picture with an L shape near the top-left corner: any flip or transpose changes it.

    RGB pictures also have a background that brightens to the right (red) and downward (green).
    """
    picture = np.zeros((height, width, 3), dtype=np.uint8)
    if rgb:
        picture[..., 0] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
        picture[..., 1] = np.linspace(0, 90, height, dtype=np.uint8)[:, None]
    picture[3:21, 4:8] = 255  # the L's upright
    picture[17:21, 4:19] = 255  # the L's foot, pointing right
    return picture if rgb else picture[..., 0].copy()


def marker_mask(height: int = 36, width: int = 48) -> np.ndarray:
    """The L of :func:`marker_picture` as a boolean ``[H, W]`` mask."""
    return marker_picture(height, width, rgb=False) > 0


def write_png(path: Path, picture: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(picture).save(path)
    return path


def write_nifti(path: Path, picture: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A 2D picture as NIfTI the way ITK writes one: voxel axis i along the columns, j along the rows.

    RGB pictures become NIfTI vectors of shape ``(x, y, 1, 1, 3)``.
    """
    import nibabel

    data = np.swapaxes(picture, 0, 1)
    if data.ndim == 3:
        data = data[:, :, None, None, :]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    nibabel.save(nibabel.Nifti1Image(data, affine), path)
    return path


def dicom_dataset(
    pixels: np.ndarray | None,
    photometric: str | None = None,
    frames: int | None = None,
    bits_stored: int | None = None,
):
    """A Secondary Capture dataset around ``pixels`` (``[H, W]``, ``[H, W, 3]`` or ``[F, H, W(, 3)]``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SYNTHETIC-TEST"
    ds.Modality = "OT"
    if pixels is None:
        return ds
    colour = pixels.shape[-1] == 3 and pixels.ndim == (4 if frames else 3)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_dicom(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_clip_dataset(root: Path, frames: int, stills: int) -> Path:
    """``root/images`` and ``root/masks`` holding one multi-page TIFF pair ``clip.tif`` (``frames`` pages, written
    with tifffile) and ``stills`` single-frame PNG pairs ``still<k>.png``."""
    import tifffile

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    clip = np.stack([marker_picture() // (index + 1) for index in range(frames)])
    tifffile.imwrite(root / "images" / "clip.tif", clip, photometric="rgb")
    tifffile.imwrite(root / "masks" / "clip.tif", np.stack([marker_picture(rgb=False)] * frames))
    for index in range(stills):
        write_png(root / "images" / f"still{index}.png", marker_picture())
        write_png(root / "masks" / f"still{index}.png", marker_picture(rgb=False))
    return root
