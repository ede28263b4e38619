"""The clinical job as a library: one header parse per DICOM input, a replaceable model runner whose extra values
reach the report, and the names :mod:`monai_ecrm.infer` and :mod:`monai_ecrm.dicom_seg` published still there."""

from __future__ import annotations

import csv
import importlib
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from clinical_fixtures import OneConv
from conftest_data import dicom_dataset, write_dicom, write_png
from test_dicom_seg import multiframe_dicom, video_frames

import monai_ecrm.clinical as clinical
from monai_ecrm.clinical import ClinicalInference, FrameOutput, TorchRunner


class MeanLogitRunner:
    """A runner of another kind (as an ONNX Runtime session would be): the same logits, plus a report column."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.torch_runner = TorchRunner(model)

    def __call__(self, image: torch.Tensor) -> FrameOutput:
        logits = self.torch_runner(image).logits
        return FrameOutput(logits, {"mean_logit": f"{float(logits.mean()):.4f}"})


@pytest.fixture
def dicom_folder(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write_dicom(folder / "frame.dcm", dicom_dataset(video_frames(1, 24, 32)[0]))
    multiframe_dicom(folder / "video.dcm", video_frames(3, 24, 32), rle=True)
    write_png(folder / "picture.png", video_frames(2, 24, 32)[1])
    return folder


@pytest.mark.parametrize("dicom_png", [False, True], ids=["seg", "seg_and_png"])
def test_a_dicom_header_is_parsed_once_per_input(tmp_path, dicom_folder, monkeypatch, dicom_png):
    """Reading a header is most of a small frame's decoding time: deciding it is an image, checking it can be decoded,
    decoding its frames and building its SEG share one parse (pydicom reads the preamble once per parse)."""
    import pydicom.filereader

    parsed: list[str] = []
    lock = threading.Lock()
    original = pydicom.filereader.read_preamble

    def counting(fileobj, force):
        with lock:
            parsed.append(Path(getattr(fileobj, "name", "?")).name)
        return original(fileobj, force)

    monkeypatch.setattr(pydicom.filereader, "read_preamble", counting)
    job = ClinicalInference(OneConv().eval(), tmp_path / "out", spatial_size=32, progress=False, dicom_png=dicom_png)
    results = job.run(clinical.find_inputs(dicom_folder))
    assert [result.status for result in results] == ["written"] * 3
    assert sorted(parsed) == ["frame.dcm", "video.dcm"], f"header parses per input: {parsed}"


def test_a_model_runner_replaces_the_network_and_adds_report_columns(tmp_path, dicom_folder):
    """The job runs any runner: the same masks as the PyTorch module it wraps, and its per-frame values in report.csv
    (a column per name, the frames of a video joined with ';')."""
    model = OneConv().eval()
    inputs = clinical.find_inputs(dicom_folder)
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    ClinicalInference(model, plain, spatial_size=32, progress=False).run(inputs)
    results = ClinicalInference(MeanLogitRunner(model), extra, spatial_size=32, progress=False).run(inputs)
    clinical.write_report(results, extra / "report.csv")
    with open(extra / "report.csv", newline="", encoding="utf-8") as stream:
        rows = {Path(row["input"]).name: row for row in csv.DictReader(stream)}
    assert list(next(iter(rows.values()))) == ["input", "status", "outputs", "detail", "mean_logit"]
    assert len(rows["video.dcm"]["mean_logit"].split(";")) == 3, "one value per frame of the video"
    assert len(rows["frame.dcm"]["mean_logit"].split(";")) == 1 and rows["picture.png"]["mean_logit"]
    for name in ("frame_seg.dcm", "video_seg.dcm"):
        np.testing.assert_array_equal(
            pydicom.dcmread(plain / name).pixel_array, pydicom.dcmread(extra / name).pixel_array, err_msg=name
        )
    assert (plain / "picture_seg.png").read_bytes() == (extra / "picture_seg.png").read_bytes()


# the names the two modules published before the clinical package; bundle configs and user code import them there
_INFER_NAMES = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "InputResult", "ClinicalInference", "bundle_settings",
                "clinical_postprocessing", "clinical_preprocessing", "find_inputs", "load_model", "main",
                "write_report", "REPORT_NAME", "BUNDLE_SETTINGS"]  # fmt: skip
_DICOM_SEG_NAMES = ["ALGORITHM_NAME", "DecodedFrame", "LoadFramed", "NotAnImageError", "POLYP_CATEGORY", "POLYP_TYPE",
                    "SEG_SERIES_NUMBER", "SaveDicomSegd", "build_dicom_seg", "bundle_version", "iter_dicom_frames",
                    "prediction_path", "read_dicom_source", "PARTIAL_DIR", "ARTIFICIAL_INTELLIGENCE"]  # fmt: skip


@pytest.mark.parametrize(
    "module, names", [("monai_ecrm.infer", _INFER_NAMES), ("monai_ecrm.dicom_seg", _DICOM_SEG_NAMES)]
)
def test_the_old_modules_keep_their_names(module, names):
    old = importlib.import_module(module)
    for name in names:
        assert getattr(old, name) is getattr(clinical, name), f"{module}.{name} is no longer monai_ecrm.clinical's"


def test_an_input_whose_output_another_input_has_fails_without_writing(tmp_path):
    """A frame of a multi-frame file is named ``<stem>_frame0001``: a file of that name would get its mask's name. The
    second input claiming an output fails; the first one's outputs are its own, on every rerun."""
    folder = tmp_path / "in"
    folder.mkdir()
    multiframe_dicom(folder / "c.dcm", video_frames(3, 24, 32))
    write_png(folder / "c_frame0001.png", video_frames(5, 24, 32)[4])
    inputs = clinical.find_inputs(folder)
    alone = tmp_path / "alone"
    ClinicalInference(OneConv().eval(), alone, spatial_size=32, progress=False, dicom_png=True).run(inputs[:1])
    output = tmp_path / "out"
    for status in ("written", "skipped-existing"):
        job = ClinicalInference(OneConv().eval(), output, spatial_size=32, progress=False, dicom_png=True)
        results = {Path(result.input).name: result for result in job.run(inputs)}
        assert results["c.dcm"].status == status
        assert results["c_frame0001.png"].status == "failed" and not results["c_frame0001.png"].outputs
        assert "c_frame0001_seg.png is also the output of" in results["c_frame0001.png"].detail
        assert str(folder / "c.dcm") in results["c_frame0001.png"].detail
        mask = "c_frame0001_seg.png"
        assert (output / mask).read_bytes() == (alone / mask).read_bytes(), "the frame's mask is not overwritten"
