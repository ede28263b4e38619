"""``monai-ecrm-infer``: DICOM in, DICOM SEG out, for files, folders and studies; robust to bad inputs and interruption.

Networks are tiny (a ResNet-10 ECRM-UNet at 64 px, or a one-layer TorchScript model) so the jobs run in seconds.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from clinical_fixtures import save_torchscript
from conftest_data import dicom_dataset, real_data, write_dicom, write_png
from PIL import Image
from test_dicom_seg import multiframe_dicom, structured_report, video_frames

from monai_ecrm.clinical.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from monai_ecrm.clinical.seg import bundle_version
from monai_ecrm.data import read_picture
from monai_ecrm.writing import PARTIAL_DIR

TINY = {"backbone": "resnet10", "bank_size": 2}
TINY_ARGS = ["--backbone", "resnet10", "--bank-size", "2", "--spatial-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory) -> Path:
    return save_torchscript(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ecrm_checkpoint(tmp_path_factory) -> Path:
    from monai_ecrm.networks.nets import ECRMUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(ECRMUNet(**TINY).state_dict(), path)
    return path


def read_report(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "report.csv", newline="", encoding="utf-8") as stream:
        return {Path(row["input"]).name: row for row in csv.DictReader(stream)}


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ["--output", "--checkpoint", "--torchscript", "--bundle", "--backbone", "--bank-size", "--use-icrm",
                   "--spatial-size", "--threshold", "--probabilities", "--dicom-png", "--overwrite", "--device",
                   "--no-progress", "report.csv", "exit status"]:  # fmt: skip
        assert option in text, f"--help does not mention {option}"
    assert "(x, y, 3)" in text and "RGB24" in text, "--help says which NIfTI layouts are pictures"
    assert "own file name alone" in text and "both a_seg.png" in text, "--help gives the naming rule (a.png, a.jpg)"
    assert "models/model.json" in text and "contradicts the model is an error" in text, "--help says what runs a model"


def test_real_dicom_frame_seg_equals_the_bundle_png_mask(tmp_path, ecrm_checkpoint):
    """The SEG's mask is the mask the bundle's inference.json writes for the same picture given as PNG."""
    from monai.bundle import run

    from monai_ecrm.bundle import bundle_path
    from monai_ecrm.networks.nets import ECRMUNet
    from monai_ecrm.transforms import infer_transforms

    source = real_data("dicom_samples") / "nema_wg04_vl2_j2kr.dcm"
    picture, _ = read_picture(source)
    png_dir, dicom_dir = tmp_path / "png", tmp_path / "dicom"
    png_dir.mkdir(), dicom_dir.mkdir()
    write_png(png_dir / "frame.png", picture)
    shutil.copyfile(source, dicom_dir / "frame.dcm")  # a temporary copy, named as the PNG
    # a threshold at the median probability gives a mask with both classes from the untrained network
    network = ECRMUNet(**TINY).eval()
    network.load_state_dict(torch.load(ecrm_checkpoint, weights_only=True))
    with torch.no_grad():
        image = infer_transforms(spatial_size=64)({"image": str(png_dir / "frame.png")})["image"]
        threshold = float(torch.sigmoid(network(image.as_tensor()[None])).median())

    bundle_out, cli_out, seg_bundle_out = tmp_path / "bundle_out", tmp_path / "cli_out", tmp_path / "seg_bundle_out"
    overrides = dict(
        bundle_root=str(tmp_path / "bundle_root"),
        ckpt_path=str(ecrm_checkpoint),
        num_workers=0,
        spatial_size=64,
        threshold=threshold,
        device="$torch.device('cpu')",
        **TINY,
    )
    config = str(bundle_path() / "configs" / "inference.json")
    run(config_file=config, dataset_dir=str(png_dir), output_dir=str(bundle_out), **overrides)
    rc = main([str(dicom_dir), "-o", str(cli_out), "--checkpoint", str(ecrm_checkpoint), "--threshold", str(threshold)]
              + TINY_ARGS)  # fmt: skip
    assert rc == EXIT_OK
    assert sorted(p.name for p in cli_out.iterdir()) == ["frame_seg.dcm", "report.csv"], "no PNG for DICOM input"

    png_mask = np.asarray(Image.open(bundle_out / "frame_seg.png"))
    seg = pydicom.dcmread(cli_out / "frame_seg.dcm")
    source_header = pydicom.dcmread(source, stop_before_pixels=True)
    assert (seg.Rows, seg.Columns) == (source_header.Rows, source_header.Columns)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source_header.SOPInstanceUID
    )
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == bundle_version()
    assert 0.05 < png_mask.mean() / 255 < 0.95, "the comparison needs a mask with both classes"
    np.testing.assert_array_equal(seg.pixel_array.astype(np.uint8) * 255, png_mask)

    # the same through the bundle, with the postprocessing the bundle's inference.json gets for DICOM SEG output
    postprocessing = {
        "_target_": "monai_ecrm.infer.clinical_postprocessing",
        "preprocessing": "@preprocessing",
        "output_dir": "@output_dir",
        "threshold": "@threshold",
        "probabilities": "@probabilities",
        "bundle_root": "@bundle_root",
    }
    run(config_file=config, dataset_dir=str(dicom_dir), output_dir=str(seg_bundle_out), postprocessing=postprocessing,
        **overrides)  # fmt: skip
    from_bundle = pydicom.dcmread(seg_bundle_out / "frame_seg.dcm")
    np.testing.assert_array_equal(from_bundle.pixel_array, seg.pixel_array)


_PEAK_RUNNER = """
import json, resource, sys
from monai_ecrm.clinical.cli import main

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False

def peak_kib():
    try:
        with open("/proc/self/status") as stream:
            return next(int(line.split()[1]) for line in stream if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

jobs = json.loads(sys.argv[1])
results = {}
for name, argv in jobs.items():
    if name != "warmup" and not reset_peak():
        results[name] = None
        continue
    results[name] = {"rc": main(argv), "peak_kib": peak_kib()}
print(json.dumps(results))
"""


def _peaks(jobs: dict[str, list[str]]) -> dict[str, dict]:
    """Run the jobs one after the other in a fresh Python process; the peak resident memory of each (the process's
    peak is reset between jobs, or each job gets its own process where the kernel cannot reset it)."""
    run = subprocess.run([sys.executable, "-c", _PEAK_RUNNER, json.dumps(jobs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        if result is None:  # no peak reset here: one process per job
            results[name] = _peaks({name: jobs[name]})[name]
    return results


def test_multiframe_video_gives_one_seg_frame_per_frame_in_constant_memory(tmp_path, torchscript_model):
    height = width = 512  # 100 frames: 79 MB of pixels, more than 10% of the job's baseline if loaded at once
    videos = {}
    for frames in (10, 100):
        videos[frames] = multiframe_dicom(tmp_path / f"video{frames}.dcm", video_frames(frames, height, width))
    warmup = multiframe_dicom(tmp_path / "warmup.dcm", video_frames(2, 16, 16))  # first-use imports and caches
    args = ["--torchscript", str(torchscript_model), "--spatial-size", "64", "--no-progress"]
    jobs = {
        "warmup": [str(warmup), "-o", str(tmp_path / "warmup"), *args],
        "10": [str(videos[10]), "-o", str(tmp_path / "out10"), *args],
        "100": [str(videos[100]), "-o", str(tmp_path / "out100"), *args],
    }
    peaks = _peaks(jobs)
    assert all(result["rc"] == EXIT_OK for result in peaks.values()), peaks
    for frames in (10, 100):
        seg = pydicom.dcmread(tmp_path / f"out{frames}" / f"video{frames}_seg.dcm")
        assert seg.NumberOfFrames == frames
        numbers = [
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
            for item in seg.PerFrameFunctionalGroupsSequence
        ]
        assert numbers == list(range(1, frames + 1))
    masks = pydicom.dcmread(tmp_path / "out10" / "video10_seg.dcm").pixel_array
    assert len({mask.tobytes() for mask in masks}) > 1, "each frame is segmented on its own"
    ratio = peaks["100"]["peak_kib"] / peaks["10"]["peak_kib"]
    assert ratio <= 1.10, f"peak memory grows with the frames: {peaks} (ratio {ratio:.3f})"


def test_study_folder_with_sr_corrupt_and_good_frames_finishes_with_a_report(tmp_path, torchscript_model):
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    (study / "series2").mkdir()
    write_dicom(study / "series1" / "IM0001", dicom_dataset(video_frames(1, 24, 32)[0]))  # no extension
    write_dicom(study / "series1" / "IM0002", dicom_dataset(video_frames(2, 24, 32)[1]))
    multiframe_dicom(study / "series2" / "video.dcm", video_frames(4, 24, 32), rle=True, bad_frames=(1,))
    structured_report(study / "series2" / "report.dcm")
    state = dicom_dataset(None)
    state.SOPClassUID = state.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    state.Modality = "PR"
    write_dicom(study / "series2" / "state.dcm", state)
    (study / "series2" / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)
    truncated = write_dicom(study / "series1" / "IM0003", dicom_dataset(video_frames(1, 24, 32)[0]))
    truncated.write_bytes(truncated.read_bytes()[:-500])
    (study / "notes.txt").write_text("not a picture")

    output = tmp_path / "out"
    rc = main([str(study), "-o", str(output), "--torchscript", str(torchscript_model), "--spatial-size", "32",
               "--no-progress"])  # fmt: skip
    assert rc == EXIT_FAILED, "failed inputs give a non-zero exit status"
    report = read_report(output)
    statuses = {name: row["status"] for name, row in report.items()}
    assert statuses == {
        "IM0001": "written",
        "IM0002": "written",
        "IM0003": "failed",
        "video.dcm": "partial",
        "report.dcm": "skipped",
        "state.dcm": "skipped",
        "garbage.dcm": "failed",
        "notes.txt": "skipped",
    }
    assert "Basic Text SR" in report["report.dcm"]["detail"]
    assert "Presentation State" in report["state.dcm"]["detail"]
    assert "frame 1" in report["video.dcm"]["detail"] and "3 of 4 frames" in report["video.dcm"]["detail"]
    assert report["IM0003"]["detail"] and report["garbage.dcm"]["detail"] and report["notes.txt"]["detail"]
    assert (output / "series1" / "IM0001_seg.dcm").is_file() and (output / "series1" / "IM0002_seg.dcm").is_file()
    assert not (output / "series2" / "video_seg.dcm").exists(), "a partial SEG is never under the final name"
    video_seg = pydicom.dcmread(output / "series2" / "video_seg.partial.dcm")
    numbers = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        for item in video_seg.PerFrameFunctionalGroupsSequence
    ]
    assert numbers == [1, 3, 4], "the undecodable frame has no SEG frame; the others keep their source frame numbers"
    assert not (output / PARTIAL_DIR).exists()


def test_nifti_pictures_give_masks_in_their_own_layout_and_a_volume_is_reported(tmp_path, torchscript_model):
    """NIfTI saved the obvious way, ``Nifti1Image(picture_array, affine)``: RGB (H, W, 3) uint8 and grey (H, W)."""
    import nibabel

    folder = tmp_path / "nifti"
    folder.mkdir()
    picture = video_frames(1, 36, 48)[0]
    affine = np.diag([0.5, -0.5, 1.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(picture, affine), folder / "rgb.nii.gz")
    nibabel.save(nibabel.Nifti1Image(picture[..., 1], affine), folder / "grey.nii.gz")
    nibabel.save(nibabel.Nifti1Image(picture.astype(np.float32) / 255, affine), folder / "volume.nii.gz")
    output = tmp_path / "out"
    rc = main([str(folder), "-o", str(output), "--torchscript", str(torchscript_model), "--spatial-size", "32",
               "--no-progress"])  # fmt: skip
    assert rc == EXIT_FAILED
    report = read_report(output)
    assert {name: row["status"] for name, row in report.items()} == {
        "grey.nii.gz": "written",
        "rgb.nii.gz": "written",
        "volume.nii.gz": "failed",
    }
    assert "3 slices" in report["volume.nii.gz"]["detail"]
    for name in ("rgb", "grey"):
        mask = nibabel.load(output / f"{name}_seg.nii.gz")
        voxels = np.asarray(mask.dataobj)
        assert voxels.shape == (36, 48), f"{name}: the mask has the source's spatial shape"
        assert voxels.dtype == np.uint8 and set(np.unique(voxels)) <= {0, 255}, f"{name}: masks are 0/255"
        assert np.allclose(mask.affine, affine), f"{name}: the source's affine is kept"


def _mixed_folder(folder: Path) -> Path:
    folder.mkdir()
    write_png(folder / "a.png", video_frames(1, 36, 48)[0])
    write_dicom(folder / "b.dcm", dicom_dataset(video_frames(2, 36, 48)[1]))
    multiframe_dicom(folder / "c.dcm", video_frames(3, 36, 48))
    write_png(folder / "d.png", video_frames(4, 36, 48)[3])
    return folder


def test_interrupted_run_resumed_gives_the_same_outputs(tmp_path, torchscript_model, monkeypatch):
    import monai_ecrm.writing as writing

    inputs = _mixed_folder(tmp_path / "in")
    args = ["--torchscript", str(torchscript_model), "--spatial-size", "32", "--no-progress", "--dicom-png"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main([str(inputs), "-o", str(reference), *args]) == EXIT_OK

    renames = []
    original = writing._replace

    def interrupted(source, destination):
        renames.append(destination)
        if len(renames) == 2:  # killed while the second output is being written
            raise KeyboardInterrupt
        original(source, destination)

    monkeypatch.setattr(writing, "_replace", interrupted)
    assert main([str(inputs), "-o", str(resumed), *args]) == 130
    monkeypatch.setattr(writing, "_replace", original)
    assert sorted(p.name for p in resumed.iterdir()) == ["a_seg.png", "report.csv"], "no half-written output"

    assert main([str(inputs), "-o", str(resumed), *args]) == EXIT_OK
    statuses = {name: row["status"] for name, row in read_report(resumed).items()}
    assert statuses == {"a.png": "skipped-existing", "b.dcm": "written", "c.dcm": "written", "d.png": "written"}
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        if name.endswith(".png"):
            assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
        elif name.endswith(".dcm"):
            first, second = pydicom.dcmread(reference / name), pydicom.dcmread(resumed / name)
            np.testing.assert_array_equal(first.pixel_array, second.pixel_array)
            assert first.ReferencedSeriesSequence == second.ReferencedSeriesSequence
            assert first.NumberOfFrames == second.NumberOfFrames


def test_bundle_folder_and_a_checkpoint_option_that_contradicts_it(tmp_path, ecrm_checkpoint, capsys):
    from monai_ecrm.bundle import bundle_path

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = json.loads((bundle_path() / "configs" / "inference.json").read_text())
    config.update(TINY, spatial_size=64)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    (bundle / "models" / "model.pt").write_bytes(ecrm_checkpoint.read_bytes())
    picture = write_png(tmp_path / "frame.png", video_frames(1, 40, 56)[0])
    assert main([str(picture), "-o", str(tmp_path / "out"), "--bundle", str(bundle), "--no-progress"]) == EXIT_OK
    assert Image.open(tmp_path / "out" / "frame_seg.png").size == (56, 40)

    rc = main([str(picture), "-o", str(tmp_path / "bad"), "--checkpoint", str(ecrm_checkpoint), "--backbone",
               "resnet10", "--bank-size", "3", "--no-progress"])  # fmt: skip
    assert rc == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"error: bank_size: 2 (the weights in {ecrm_checkpoint}) against 3 (the command line)" in error, error
    assert not (tmp_path / "bad").exists(), "nothing is written when the model cannot be loaded"


def test_pipelined_job_equals_the_sequential_job(tmp_path, torchscript_model):
    """Decoding ahead in a background thread changes nothing a user sees: the same results in input order, the same
    reports for a bad frame and a bad file, the same masks frame by frame."""
    from monai_ecrm.clinical import ClinicalInference, find_inputs, load_model

    inputs = _mixed_folder(tmp_path / "in")
    multiframe_dicom(inputs / "e.dcm", video_frames(5, 36, 48), rle=True, bad_frames=(2,))
    truncated = write_dicom(inputs / "f.dcm", dicom_dataset(video_frames(1, 36, 48)[0]))
    truncated.write_bytes(truncated.read_bytes()[:-500])
    write_dicom(inputs / "g.dcm", dicom_dataset(video_frames(7, 36, 48)[6]))
    paths = find_inputs(inputs)
    model = load_model(torchscript=torchscript_model)
    folders, reports = {}, {}
    for name, prefetch in (("sequential", 0), ("pipelined", 2)):
        folders[name] = tmp_path / name
        job = ClinicalInference(model, folders[name], spatial_size=32, progress=False, prefetch=prefetch)
        results = job.run(paths)
        assert [result.input for result in results] == [str(path) for path in paths], "results keep the input order"
        reports[name] = {Path(r.input).name: (r.status, r.detail) for r in results}
    assert reports["pipelined"] == reports["sequential"]
    assert reports["pipelined"]["e.dcm"][0] == "partial" and "frame 2" in reports["pipelined"]["e.dcm"][1]
    assert reports["pipelined"]["f.dcm"][0] == "failed" and reports["pipelined"]["g.dcm"][0] == "written"
    sequential, pipelined = folders["sequential"], folders["pipelined"]
    names = sorted(p.name for p in sequential.iterdir())
    assert names == sorted(p.name for p in pipelined.iterdir()) and "e_seg.partial.dcm" in names
    for name in names:
        if name.endswith(".png"):
            assert (sequential / name).read_bytes() == (pipelined / name).read_bytes(), name
        else:
            first, second = pydicom.dcmread(sequential / name), pydicom.dcmread(pipelined / name)
            np.testing.assert_array_equal(first.pixel_array, second.pixel_array, err_msg=name)
            numbers = [
                [item.DerivationImageSequence[0].SourceImageSequence[0].get("ReferencedFrameNumber") for item in
                 seg.PerFrameFunctionalGroupsSequence]
                for seg in (first, second)
            ]  # fmt: skip
            assert numbers[0] == numbers[1], name
    assert not (pipelined / PARTIAL_DIR).exists()


def test_inputs_sharing_an_output_name_stop_the_job_and_names_follow_the_file_alone(tmp_path, torchscript_model,
                                                                                    capsys):  # fmt: skip
    """``a.png`` and ``a.jpg`` both became ``a_seg.png`` (one mask lost); then they kept their suffixes, which renamed
    ``a.jpg``'s output when ``a.png`` was added. An output's name now depends on its input's name alone: inputs whose
    outputs would meet stop the job, naming both, before anything is written."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    frames = video_frames(5, 36, 48)
    write_png(folder / "a.png", frames[0])
    Image.fromarray(frames[1]).save(folder / "A.jpg")  # one output name, ignoring case
    write_png(folder / "b.png", frames[3])
    write_png(folder / "sub" / "a.png", frames[4])  # another output folder: its own name
    args = ["--torchscript", str(torchscript_model), "--spatial-size", "32", "--no-progress"]
    output = tmp_path / "out"
    assert main([str(folder), "-o", str(output), *args]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert error.startswith("monai-ecrm-infer: error: ") and len(error.splitlines()) == 1, error
    assert str(folder / "a.png") in error and str(folder / "A.jpg") in error and "a_seg.png" in error, error
    assert not output.exists(), "nothing is written"

    (folder / "A.jpg").unlink()
    assert main([str(folder), "-o", str(output), *args]) == EXIT_OK
    report = {str(Path(row["input"]).relative_to(folder)): row for row in _rows(output)}
    outputs = {name: Path(row["outputs"]).relative_to(output).as_posix() for name, row in report.items()}
    assert outputs == {"a.png": "a_seg.png", "b.png": "b_seg.png", "sub/a.png": "sub/a_seg.png"}
    assert main([str(folder), "-o", str(output), *args]) == EXIT_OK
    assert {row["status"] for row in _rows(output)} == {"skipped-existing"}, "a rerun finds the same names"


def test_names_that_would_still_meet_stop_the_job_before_anything_is_written(tmp_path, torchscript_model, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a.bmp", "b.jpg"):
        Image.fromarray(video_frames(1, 24, 32)[0]).save(folder / name)
    output = tmp_path / "out"
    rc = main([str(folder), "-o", str(output), "--torchscript", str(torchscript_model), "--spatial-size", "32",
               "--no-progress"])  # fmt: skip
    assert rc == EXIT_USAGE
    error = capsys.readouterr().err
    assert error.startswith("monai-ecrm-infer: error: ") and len(error.splitlines()) == 1, error
    assert str(folder / "a.png") in error and str(folder / "a.bmp") in error and "a_seg.png" in error, error
    assert not output.exists(), "nothing is written"


def _rows(output: Path) -> list[dict[str, str]]:
    with open(output / "report.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))
