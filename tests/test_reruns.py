"""Reruns of ``monai-ecrm-infer`` into an output folder that already holds outputs: what is skipped, what is replaced,
and what the report says made each output.

- an output is skipped only when it is complete and was made by the same model (model file SHA-256) for its input:
  a SEG says so itself, other outputs through their ``report.csv`` row, which each job merges;
- a SEG of some of its source's frames is never under its final name;
- an output's name depends on its input's own file name only;
- a model file given to the wrong option is one line naming it, without torch's advice;
- a report names a model by file, SHA-256, size, threshold and date.

Models are one-convolution TorchScript files (``clinical_fixtures``), so each job takes a second.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
import torch
from clinical_fixtures import OneConv, save_torchscript
from conftest_data import dicom_dataset, write_dicom, write_png
from PIL import Image
from test_dicom_seg import multiframe_dicom, video_frames

from monai_ecrm.clinical.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

SIZE_ARGS = ["--spatial-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> Path:
    return save_torchscript(tmp_path_factory.mktemp("model_a"))


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> Path:
    """Another model: the same convolution with another bias (other masks, another file SHA-256)."""
    network = OneConv()
    with torch.no_grad():
        network.conv.bias.fill_(-0.2)
    path = tmp_path_factory.mktemp("model_b") / "model.ts"
    torch.jit.script(network).save(str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _run(source: Path, output: Path, model: Path, *options: str) -> int:
    return main([str(source), "-o", str(output), "--torchscript", str(model), *SIZE_ARGS, *options])


def _rows(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "report.csv", newline="", encoding="utf-8") as stream:
        return {Path(row["input"]).name: row for row in csv.DictReader(stream)}


def _folder(folder: Path) -> Path:
    """Two pictures and a single-frame DICOM image."""
    folder.mkdir()
    frames = video_frames(3, 36, 48)
    write_png(folder / "a.png", frames[0])
    Image.fromarray(frames[1]).save(folder / "b.jpg")
    write_dicom(folder / "c.dcm", dicom_dataset(frames[2]))
    return folder


def _outputs(output: Path) -> dict[str, bytes]:
    """The masks of a folder: PNG bytes, SEG pixels."""
    masks = {path.name: path.read_bytes() for path in output.glob("*_seg.png")}
    masks.update({path.name: pydicom.dcmread(path).pixel_array.tobytes() for path in output.glob("*_seg.dcm")})
    return masks


# ------------------------------------------------------------------------------------ 1. reruns never misattribute
def test_a_rerun_with_another_model_replaces_the_outputs_and_the_report_names_the_model_that_made_them(
    tmp_path, model_a, model_b, capsys
):
    """Seen: 20 masks of model A skipped by a rerun with model B, and listed in report.csv as model B's."""
    inputs = _folder(tmp_path / "in")
    output = tmp_path / "out"
    assert _run(inputs, output, model_a) == EXIT_OK
    assert _run(inputs, tmp_path / "b_alone", model_b) == EXIT_OK
    capsys.readouterr()

    assert _run(inputs, output, model_b) == EXIT_OK
    err = capsys.readouterr().err
    assert "replaced the outputs of 3 inputs made by another model" in err, err
    rows = _rows(output)
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(["a.png", "b.jpg", "c.dcm"], "written")
    for name, row in rows.items():
        assert row["model_sha256"] == _sha(model_b), f"{name}: report.csv names the model that made its outputs"
        assert row["detail"].startswith("replaced-other-model: "), row["detail"]
        assert f"(sha256 {_sha(model_a)})" in row["detail"], f"{name}: the detail names the model replaced"
    assert _outputs(output) == _outputs(tmp_path / "b_alone"), "the outputs are model B's"

    assert _run(inputs, output, model_b) == EXIT_OK
    rows = _rows(output)
    assert {row["status"] for row in rows.values()} == {"skipped-existing"}, "the same model skips its own outputs"
    assert {row["model_sha256"] for row in rows.values()} == {_sha(model_b)}


def test_the_report_keeps_the_rows_of_inputs_a_run_did_not_touch(tmp_path, model_a, model_b):
    inputs = _folder(tmp_path / "in")
    output = tmp_path / "out"
    assert _run(inputs, output, model_a) == EXIT_OK
    assert _run(inputs / "a.png", output, model_b) == EXIT_OK  # one input of the folder, another model
    rows = _rows(output)
    assert sorted(rows) == ["a.png", "b.jpg", "c.dcm"], "the rows of the other inputs are kept"
    assert rows["a.png"]["model_sha256"] == _sha(model_b) and rows["a.png"]["model"] == str(model_b)
    assert rows["b.jpg"]["model_sha256"] == _sha(model_a) and rows["b.jpg"]["model"] == str(model_a)
    assert rows["c.dcm"]["model_sha256"] == _sha(model_a) and rows["b.jpg"]["status"] == "written"

    assert _run(inputs, output, model_a) == EXIT_OK
    rows = _rows(output)
    assert rows["a.png"]["status"] == "written" and "replaced-other-model" in rows["a.png"]["detail"]
    assert rows["b.jpg"]["status"] == rows["c.dcm"]["status"] == "skipped-existing"
    assert {row["model_sha256"] for row in rows.values()} == {_sha(model_a)}


def test_a_seg_says_which_model_made_it_and_an_output_nobody_recorded_is_replaced(tmp_path, model_a, model_b):
    inputs = _folder(tmp_path / "in")
    output = tmp_path / "out"
    assert _run(inputs, output, model_a) == EXIT_OK
    (output / "report.csv").unlink()  # the SEG names its model; the PNG masks have no record left
    assert _run(inputs / "c.dcm", output, model_a) == EXIT_OK
    assert _rows(output)["c.dcm"]["status"] == "skipped-existing", "the SEG itself says model A made it"

    (output / "report.csv").unlink()
    assert _run(inputs / "c.dcm", output, model_b) == EXIT_OK
    row = _rows(output)["c.dcm"]
    assert row["status"] == "written" and row["detail"].startswith("replaced-other-model: c_seg.dcm"), row
    seg = pydicom.dcmread(output / "c_seg.dcm")
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"model_sha256={_sha(model_b)}" in parameters

    assert _run(inputs / "a.png", output, model_a) == EXIT_OK
    row = _rows(output)["a.png"]
    assert row["status"] == "written", "a PNG no report row names is not taken for this model's"
    assert row["detail"].startswith("replaced-unknown-origin: a_seg.png"), row["detail"]


# ------------------------------------------------------------------------- 2. a partial output is never final
def test_a_partial_seg_is_never_under_its_final_name_and_a_rerun_tries_again(tmp_path, model_a):
    inputs = tmp_path / "in"
    inputs.mkdir()
    multiframe_dicom(inputs / "video.dcm", video_frames(4, 24, 32), rle=True, bad_frames=(1,))
    output = tmp_path / "out"
    for attempt in ("first", "rerun"):
        assert _run(inputs, output, model_a) == EXIT_FAILED, attempt
        row = _rows(output)["video.dcm"]
        assert row["status"] == "partial" and "3 of 4 frames" in row["detail"], f"{attempt}: {row}"
        assert "video_seg.partial.dcm" in row["detail"] and row["outputs"] == str(output / "video_seg.partial.dcm")
        assert not (output / "video_seg.dcm").exists(), f"{attempt}: nothing under the final name"
        assert pydicom.dcmread(output / "video_seg.partial.dcm").NumberOfFrames == 3

    # a partial SEG an earlier version left under the final name: it has 3 of the source's 4 frames
    shutil.move(output / "video_seg.partial.dcm", output / "video_seg.dcm")
    (output / "report.csv").unlink()
    assert _run(inputs, output, model_a) == EXIT_FAILED
    row = _rows(output)["video.dcm"]
    assert row["status"] == "partial" and "replaced-partial" not in row["detail"], "the final SEG is left as it was"

    multiframe_dicom(inputs / "video.dcm", video_frames(4, 24, 32), rle=True)  # the file, whole again
    assert _run(inputs, output, model_a) == EXIT_OK
    assert _rows(output)["video.dcm"]["status"] == "written"
    assert pydicom.dcmread(output / "video_seg.dcm").NumberOfFrames == 4
    assert not (output / "video_seg.partial.dcm").exists(), "the complete SEG removes the partial one"


# ------------------------------------------------------------------------------------- 3. names of own name only
def test_adding_a_file_never_renames_the_output_of_another(tmp_path, model_a, capsys):
    """Adding ``a.png`` beside ``a.jpg`` renamed ``a.jpg``'s output on the next run (``a_seg.png`` orphaned,
    ``a_jpg_seg.png`` written again)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    frames = video_frames(2, 36, 48)
    Image.fromarray(frames[0]).save(inputs / "a.jpg")
    output = tmp_path / "out"
    assert _run(inputs, output, model_a) == EXIT_OK
    mask = (output / "a_seg.png").read_bytes()
    write_png(inputs / "b.png", frames[1])
    assert _run(inputs, output, model_a) == EXIT_OK
    rows = _rows(output)
    assert rows["a.jpg"]["status"] == "skipped-existing" and rows["a.jpg"]["outputs"] == str(output / "a_seg.png")

    write_png(inputs / "a.png", frames[1])  # its output would be a.jpg's: the job stops, naming both
    capsys.readouterr()
    assert _run(inputs, output, model_a) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(inputs / "a.jpg") in err and str(inputs / "a.png") in err, err
    assert sorted(path.name for path in output.iterdir()) == ["a_seg.png", "b_seg.png", "report.csv"]
    assert (output / "a_seg.png").read_bytes() == mask, "nothing written, nothing renamed"


def test_outputs_an_earlier_version_named_with_their_suffix_are_found_through_the_report(tmp_path, model_a, model_b):
    """An earlier version wrote ``a_png_seg.png`` where ``a.png`` and ``a.jpg`` shared a stem; ``a.jpg`` is gone."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", video_frames(1, 36, 48)[0])
    output = tmp_path / "out"
    assert _run(inputs, output, model_a) == EXIT_OK
    (output / "a_seg.png").rename(output / "a_png_seg.png")
    report = (output / "report.csv").read_text(encoding="utf-8")
    (output / "report.csv").write_text(report.replace("a_seg.png", "a_png_seg.png"), encoding="utf-8")

    assert _run(inputs, output, model_a) == EXIT_OK
    row = _rows(output)["a.png"]
    assert row["status"] == "skipped-existing" and row["outputs"] == str(output / "a_png_seg.png"), row
    assert "earlier version" in row["detail"]
    assert not (output / "a_seg.png").exists(), "the mask is not made twice"

    assert _run(inputs, output, model_b) == EXIT_OK  # another model: segmented again, under today's name
    row = _rows(output)["a.png"]
    assert row["status"] == "written" and row["outputs"] == str(output / "a_seg.png")


# ---------------------------------------------------------------------------- 4. a model file of another kind
def _whole_module(folder: Path) -> Path:
    path = folder / "whole.pt"
    torch.save(OneConv(), path)  # a pickled module, not a state dict
    return path


def _onnx(folder: Path) -> Path:
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation
        torch.onnx.export(OneConv(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    return path


@pytest.mark.parametrize(
    "option, make, named",
    [
        ("--checkpoint", _onnx, "ONNX file, not PyTorch weights (a state dict or training checkpoint): use --onnx"),
        ("--torchscript", _onnx, "is an ONNX file, not a TorchScript file: use --onnx"),
        ("--checkpoint", lambda folder: save_torchscript(folder), "is a TorchScript file"),
        ("--checkpoint", _whole_module, "holds Python objects besides tensors"),
        ("--checkpoint", lambda folder: _text(folder / "model.pt"), "not a model file"),
    ],
    ids=["onnx_as_checkpoint", "onnx_as_torchscript", "torchscript_as_checkpoint", "pickled_module", "text"],
)
def test_a_model_file_of_another_kind_is_one_line_naming_it(option, make, named, tmp_path, capsys):
    picture = write_png(tmp_path / "frame.png", video_frames(1, 24, 32)[0])
    file = make(tmp_path)
    capsys.readouterr()
    rc = main([str(picture), "-o", str(tmp_path / "out"), option, str(file), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert len(err.splitlines()) == 1 and err.startswith(f"monai-ecrm-infer: error: {file}"), err
    assert named in err, err
    assert "weights_only" not in err and "trust" not in err, "torch's advice is not given"
    assert not (tmp_path / "out").exists()


def _text(path: Path) -> Path:
    path.write_text("not a model\n")
    return path


# ------------------------------------------------------------------------------ 5. a report names its model
def test_model_identity_names_file_sha256_size_threshold_and_date(tmp_path, model_a):
    from monai_ecrm.handlers.report_page import model_identity, model_identity_html

    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    identity = model_identity(model_a, 0.35, when)
    assert identity == {
        "file": "model.ts",
        "sha256": hashlib.sha256(model_a.read_bytes()).hexdigest(),
        "bytes": model_a.stat().st_size,
        "threshold": 0.35,
        "date": "2026-01-02T03:04:05+00:00",
    }
    page = model_identity_html({**identity, "file": "<b>.pt"})
    assert "&lt;b&gt;.pt" in page and identity["sha256"] in page and str(identity["bytes"]) in page
    assert "0.35" in page and "2026-01-02T03:04:05+00:00" in page
    assert all(label in page for label in ("Model file", "SHA-256", "Size (bytes)", "Threshold", "Date of the run"))
