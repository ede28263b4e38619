"""DICOM in, DICOM SEG out: frames streamed from the file as the readers give them, SEGs that viewers can overlay.

The synthetic DICOM files are written with pydicom directly; the SEGs are read back with pydicom and highdicom.
"""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest_data import dicom_dataset, real_data, write_dicom
from pydicom.uid import ExplicitVRLittleEndian

from monai_ecrm.clinical.seg import ALGORITHM_NAME, POLYP_CATEGORY, POLYP_TYPE, build_dicom_seg, bundle_version
from monai_ecrm.clinical.sources import DecodedFrame, NotAnImageError, iter_dicom_frames, read_dicom_source
from monai_ecrm.data import DataError, read_picture
from monai_ecrm.data.image_io import IMAGECODECS_PLUGIN, dicom_decoding_plugin

MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
MULTIFRAME_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DCIODVFY = shutil.which("dciodvfy")


def video_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """RGB frames ``[F, H, W, 3]`` with a bright square that moves from frame to frame."""
    rows = np.linspace(0, 120, height, dtype=np.uint8)[:, None]
    columns = np.linspace(0, 90, width, dtype=np.uint8)[None, :]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = rows
    frames[..., 1] = columns
    frames[..., 2] = 40
    side = max(2, min(height, width) // 4)
    for index in range(num_frames):
        top, left = (3 * index) % (height - side), (5 * index) % (width - side)
        frames[index, top : top + side, left : left + side] = 250
    return frames


def multiframe_dicom(
    path: Path,
    frames: np.ndarray,
    rle: bool = False,
    bad_frames: tuple[int, ...] = (),
    sop_class: str = MULTIFRAME_TRUE_COLOR_SC,
    photometric: str | None = None,
) -> Path:
    """A multi-frame secondary capture (endoscopy video stand-in) of ``frames`` ``[F, H, W(, 3)]``; with ``rle``,
    RLE Lossless with the ``bad_frames`` replaced by undecodable fragments."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import RLELossless

    ds = dicom_dataset(frames, photometric=photometric, frames=frames.shape[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "ES"
    ds.PatientName = "Synthetic^Video"
    if rle:
        ds.compress(RLELossless, frames)
        fragments = list(generate_frames(ds.PixelData, number_of_frames=frames.shape[0]))
        for index in bad_frames:  # an RLE header announcing 3 segments, followed by garbage
            fragments[index] = b"\x03\x00\x00\x00" + b"\x00" * 60 + b"\xff" * 10
        ds.PixelData = encapsulate(fragments)
    return write_dicom(path, ds)


def structured_report(path: Path) -> Path:
    """A Basic Text SR: a DICOM object without pixel data."""
    ds = dicom_dataset(None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    return write_dicom(path, ds)


@pytest.mark.parametrize("rle", [False, True])
def test_streamed_frames_equal_the_reader_frames(tmp_path, rle):
    frames = video_frames(4, 13, 11)
    path = multiframe_dicom(tmp_path / "video.dcm", frames, rle=rle)
    streamed = list(iter_dicom_frames(path))
    assert [frame.index for frame in streamed] == [0, 1, 2, 3]
    for frame in streamed:
        reference, info = read_picture(path, frame=frame.index)
        np.testing.assert_array_equal(frame.data, reference, err_msg="a streamed frame differs from read_picture's")
        assert (frame.info.bit_depth, frame.info.channels) == (info.bit_depth, info.channels)


def test_streamed_monochrome1_frames_are_inverted_as_the_reader_does(tmp_path):
    frames = (np.arange(3 * 6 * 5, dtype=np.uint16).reshape(3, 6, 5) * 97) % 4096
    path = multiframe_dicom(
        tmp_path / "mono1.dcm", frames, sop_class=MULTIFRAME_GRAYSCALE_WORD_SC, photometric="MONOCHROME1"
    )
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    for frame in iter_dicom_frames(path):
        np.testing.assert_array_equal(frame.data, read_picture(path, frame=frame.index)[0])


def test_an_undecodable_frame_is_reported_and_the_next_frames_decoded(tmp_path):
    frames = video_frames(5, 12, 10)
    path = multiframe_dicom(tmp_path / "video.dcm", frames, rle=True, bad_frames=(2,))
    streamed = list(iter_dicom_frames(path))
    assert len(streamed) == 5
    assert isinstance(streamed[2], DataError)
    assert "frame 2" in str(streamed[2]) and str(path) in str(streamed[2])
    for index in (0, 1, 3, 4):
        assert isinstance(streamed[index], DecodedFrame)
        np.testing.assert_array_equal(streamed[index].data, frames[index])


def test_non_image_dicom_is_not_an_image_and_a_corrupt_file_is_an_error(tmp_path):
    with pytest.raises(NotAnImageError, match="Basic Text SR"):
        read_dicom_source(structured_report(tmp_path / "report.dcm"))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\x13\x37" * 50)
    with pytest.raises(DataError) as raised:
        read_dicom_source(garbage)
    assert not isinstance(raised.value, NotAnImageError), "a corrupt file must count as a failure, not a skip"
    assert str(garbage) in str(raised.value)


def test_seg_of_the_real_frame_references_it_and_reads_back():
    import highdicom as hd

    path = real_data("dicom_samples") / "nema_wg04_vl2_j2kr.dcm"
    source = read_dicom_source(path)
    mask = np.zeros((source.Rows, source.Columns), dtype=bool)
    mask[100:220, 300:520] = True
    seg = build_dicom_seg(source, mask, algorithm_parameters={"threshold": 0.5})
    read = pydicom.dcmread(BytesIO(_to_bytes(seg)))
    assert read.SOPClassUID == SEGMENTATION_STORAGE and read.SegmentationType == "BINARY"
    assert (read.Rows, read.Columns, read.NumberOfFrames) == (source.Rows, source.Columns, 1)
    assert read.StudyInstanceUID == source.StudyInstanceUID and read.PatientID == source.PatientID
    assert read.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = read.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    frame_source = read.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert frame_source.ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = read.SegmentSequence[0]
    assert segment.SegmentLabel == "Polyp" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == POLYP_CATEGORY[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == POLYP_TYPE[0]
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == ALGORITHM_NAME and algorithm.AlgorithmVersion == bundle_version()
    np.testing.assert_array_equal(read.pixel_array.astype(bool), mask)
    readback = hd.seg.Segmentation.from_dataset(read)
    pixels = readback.get_pixels_by_source_instance([source.SOPInstanceUID])
    np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), mask)


def _to_bytes(dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_multiframe_seg_has_a_frame_per_source_frame(tmp_path):
    import highdicom as hd

    frames = video_frames(5, 13, 11)  # 143 pixels: frames are not whole bytes when bit-packed
    path = multiframe_dicom(tmp_path / "video.dcm", frames, rle=True)
    source = read_dicom_source(path)
    masks = frames[..., 2] > 200
    seg = build_dicom_seg(source, masks)
    target = tmp_path / "video_seg.dcm"
    seg.save_as(target)
    read = pydicom.dcmread(target)
    assert read.NumberOfFrames == 5
    np.testing.assert_array_equal(read.pixel_array.astype(bool), masks)
    numbers = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        for item in read.PerFrameFunctionalGroupsSequence
    ]
    assert numbers == [1, 2, 3, 4, 5], "each SEG frame must name its source frame for a viewer to overlay it"
    classes = {
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPClassUID
        for item in read.PerFrameFunctionalGroupsSequence
    }
    assert classes == {MULTIFRAME_TRUE_COLOR_SC}
    readback = hd.seg.segread(target)
    pixels = readback.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=[1, 2, 3, 4, 5])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks)


def test_multiframe_seg_of_some_frames_and_fractional_values(tmp_path):
    import highdicom as hd

    frames = video_frames(4, 8, 6)
    path = multiframe_dicom(tmp_path / "video.dcm", frames)
    source = read_dicom_source(path)
    probabilities = np.random.default_rng(0).random((3, 8, 6)).astype(np.float32)
    seg = build_dicom_seg(source, probabilities, frame_numbers=[1, 2, 4], fractional=True)
    seg.save_as(tmp_path / "seg.dcm")
    readback = hd.seg.segread(tmp_path / "seg.dcm")
    assert readback.SegmentationType == "FRACTIONAL"
    stored = readback.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=[1, 2, 4], rescale_fractional=False
    )
    np.testing.assert_array_equal(stored[..., 0], np.around(probabilities * 255))
    with pytest.raises(DataError, match="frames"):
        build_dicom_seg(source, probabilities, frame_numbers=[1, 2, 9])


def test_masks_of_another_size_are_an_error_naming_the_source(tmp_path):
    path = write_dicom(tmp_path / "frame.dcm", dicom_dataset(video_frames(1, 10, 12)[0]))
    source = read_dicom_source(path)
    with pytest.raises(DataError, match="10 rows x 12 columns") as raised:
        build_dicom_seg(source, np.zeros((12, 10), dtype=bool))
    assert str(path) in str(raised.value)


def test_jpeg2000_frames_decode_to_the_pixels_of_pydicoms_decoder(tmp_path):
    """The JPEG 2000 decoder used for the frames (imagecodecs' where installed) is lossless to the same pixels as
    pydicom's pylibjpeg plugin, colour transform included, for a single frame and for the frames of a video; a bad
    frame of the video is reported and the frames after it decoded."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.pixels import pixel_array

    sample = real_data("dicom_samples") / "nema_wg04_vl2_j2kr.dcm"
    reference = pixel_array(sample, decoding_plugin="pylibjpeg")
    source = pydicom.dcmread(sample)
    assert dicom_decoding_plugin(source.file_meta.TransferSyntaxUID) == IMAGECODECS_PLUGIN, "imagecodecs is installed"
    assert dicom_decoding_plugin(ExplicitVRLittleEndian) == "", "other syntaxes keep pydicom's own decoders"
    (frame,) = iter_dicom_frames(sample)
    np.testing.assert_array_equal(frame.data, reference)
    np.testing.assert_array_equal(read_picture(sample)[0], reference)

    codestream = next(generate_frames(source.PixelData, number_of_frames=1))
    ds = dicom_dataset(np.stack([reference] * 3), frames=3)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_TRUE_COLOR_SC
    ds.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    ds.PhotometricInterpretation = source.PhotometricInterpretation
    ds.PixelData = encapsulate([codestream, codestream[: len(codestream) // 3], codestream])
    ds["PixelData"].VR = "OB"
    path = write_dicom(tmp_path / "video.dcm", ds)
    streamed = list(iter_dicom_frames(path))
    assert isinstance(streamed[1], DataError) and "frame 1" in str(streamed[1])
    for index in (0, 2):
        np.testing.assert_array_equal(streamed[index].data, reference, err_msg=f"frame {index}")
        np.testing.assert_array_equal(read_picture(path, frame=index)[0], reference, err_msg=f"frame {index}")


def validator_report(path: Path) -> list[str]:
    """The errors and warnings of David Clunie's DICOM validator ``dciodvfy`` on a file."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools): SEGs not validated")
@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
@pytest.mark.parametrize("source_kind", ["real_frame", "single_frame", "video", "video_some_frames"])
def test_written_segs_pass_the_dicom_validator(tmp_path, source_kind, fractional):
    """PACS and viewers may refuse a non-conformant object: every kind of SEG the command writes passes dciodvfy
    without errors (the real frame has an empty Patient Orientation; a job whose other frames could not be decoded
    writes the frames that came)."""
    if source_kind == "real_frame":
        path = real_data("dicom_samples") / "nema_wg04_vl2_j2kr.dcm"
    elif source_kind == "single_frame":
        ds = dicom_dataset(video_frames(1, 10, 12)[0])
        ds.PatientOrientation = ["A", "F"]
        path = write_dicom(tmp_path / "frame.dcm", ds)
    else:
        path = multiframe_dicom(tmp_path / "video.dcm", video_frames(5, 13, 11), rle=True)
    source = read_dicom_source(path)
    frame_numbers = [1, 2, 4] if source_kind == "video_some_frames" else None
    frames = len(frame_numbers) if frame_numbers else int(source.get("NumberOfFrames", 1) or 1)
    masks = np.random.default_rng(0).random((frames, source.Rows, source.Columns)).astype(np.float32)
    seg = build_dicom_seg(source, masks if fractional else masks > 0.5, frame_numbers, fractional=fractional)
    target = tmp_path / "seg.dcm"
    seg.save_as(target)
    report = validator_report(target)
    errors = [line for line in report if line.startswith("Error")]
    assert not errors, f"dciodvfy finds errors in the SEG of a {source_kind} source:\n" + "\n".join(report)
    if source_kind == "single_frame":
        assert pydicom.dcmread(target).PatientOrientation == ["A", "F"], "the source's Patient Orientation is kept"
