"""``monai-ecrm-infer --explain K``: the memory cases each image drew on, in report.csv and beside the masks.

The model is a tiny ECRM-UNet whose memory :func:`~monai_ecrm.handlers.refresh_memory` wrote from four synthetic case
pictures saved as PNG files (so the memory's case names are real relative paths, and the pictures are on disk where
the model record says the training data was), each case a distinct colour so its tile can be told apart.
"""

from __future__ import annotations

import csv
import io
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest_data import write_png
from monai.data import Dataset
from PIL import Image
from test_dicom_seg import multiframe_dicom, video_frames

from monai_ecrm import explanations as explain_module
from monai_ecrm.clinical import ClinicalInference, job
from monai_ecrm.clinical.cli import EXIT_OK, EXIT_USAGE, main
from monai_ecrm.clinical.explain import EXPLAIN_COLUMNS, NOTE_COLUMN, CasePictures, ExplainingRunner
from monai_ecrm.handlers import refresh_memory
from monai_ecrm.networks.nets import ECRMUNet
from monai_ecrm.record import make_record, record_for_torchscript, record_from_network, write_record
from monai_ecrm.transforms import eval_transforms, infer_transforms
from monai_ecrm.writing import PARTIAL_DIR

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")

SIZE = 64
INPUT_TILE = 256
TILE = 192
#: the cases' colours; each case is a picture of that colour with a white box, its label
COLOURS = {"left/case0.png": (200, 0, 0), "left/case1.png": (0, 200, 0), "right/case2.png": (0, 0, 200),
           "right/case3.png": (200, 200, 0)}  # fmt: skip
NETWORK = {
    "backbone": "resnet10",
    "bank_size": 6,
    "ecrm_channels": 16,
    "key_channels": 8,
    "decoder_channels": (16,) * 5,
}


@dataclass
class Model:
    """A saved model, the folder of its training cases, and the inputs to explain."""

    checkpoint: Path
    network: ECRMUNet
    dataset: Path
    inputs: Path


def _network() -> ECRMUNet:
    torch.manual_seed(0)
    return ECRMUNet(**NETWORK).eval()


def _save(network: ECRMUNet, folder: Path, threshold: float, dataset_dir: Path | None) -> Path:
    """``folder/model.pt`` with its ``model.json``, as the bundle writes them."""
    folder.mkdir(parents=True)
    training = {"description": "synthetic cases", "dataset_dir": str(dataset_dir) if dataset_dir else None}
    kwargs = record_from_network(network)["network"]["kwargs"]
    checkpoint = folder / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    write_record(checkpoint, make_record(kwargs, spatial_size=SIZE, threshold=threshold, training=training))
    return checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    root = tmp_path_factory.mktemp("explain")
    dataset, labels = root / "dataset", root / "labels"
    items = []
    for name, colour in COLOURS.items():
        picture = np.zeros((48, 64, 3), dtype=np.uint8)
        picture[...] = colour
        picture[12:30, 16:40] = 255
        for folder in (dataset, labels):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        label = write_png(labels / name, np.where(picture[..., 1] == 255, 255, 0).astype(np.uint8))
        items.append({"image": str(write_png(dataset / name, picture)), "label": str(label)})
    network = _network()  # label prototypes need the labels; a coarse-mask memory ignores them
    refresh_memory(network, Dataset(items, transform=eval_transforms(spatial_size=SIZE)))
    assert network.ecrm.memory.slot_names()[:4] == list(COLOURS), "the memory names its cases by relative path"

    inputs = root / "inputs"
    inputs.mkdir()
    frames = video_frames(3, 48, 64)
    write_png(inputs / "still.png", frames[0])
    multiframe_dicom(inputs / "video.dcm", frames[1:])
    # a threshold at the median probability: masks with both classes from the untrained network
    with torch.no_grad():
        image = infer_transforms(spatial_size=SIZE)({"image": str(inputs / "still.png")})["image"]
        threshold = float(torch.sigmoid(network(image.as_tensor()[None])).median())
    return Model(_save(network, root / "models", threshold, dataset), network, dataset, inputs)


def run(model: Model, output: Path, capsys, *options: str) -> tuple[int, str, dict[str, dict[str, str]]]:
    """The command on the model's inputs: exit status, stderr, and report rows by input name."""
    capsys.readouterr()
    rc = main([str(model.inputs), "-o", str(output), "--no-progress", "--checkpoint", str(model.checkpoint), *options])
    rows = {}
    if (output / "report.csv").is_file():
        with open(output / "report.csv", newline="", encoding="utf-8") as stream:
            rows = {Path(row["input"]).name: row for row in csv.DictReader(stream)}
    return rc, capsys.readouterr().err, rows


def _masks(output: Path) -> dict[str, np.ndarray]:
    masks = {path.name: np.asarray(Image.open(path)) for path in output.glob("*_seg.png")}
    masks.update({path.name: pydicom.dcmread(path).pixel_array for path in output.glob("*_seg.dcm")})
    return masks


def _frames(row: dict[str, str]) -> list[tuple[list[str], list[float]]]:
    """A report row's cases and shares, per frame."""
    cases, shares = (row[column].split(";") for column in EXPLAIN_COLUMNS)
    assert len(cases) == len(shares), "one group of cases and of shares per frame"
    return [(names.split("|"), [float(share) for share in values.split("|")]) for names, values in zip(cases, shares)]


def _tile(picture: np.ndarray, index: int) -> np.ndarray:
    """The ``index``-th tile of an explanation picture (0: the input, then the cases)."""
    if index == 0:
        return picture[26 : 26 + INPUT_TILE, 8 : 8 + INPUT_TILE]
    left = 16 + INPUT_TILE + (index - 1) * (TILE + 8)
    return picture[26 : 26 + TILE, left : left + TILE]


def test_explain_names_the_top_memory_cases_and_draws_them_beside_unchanged_masks(model, tmp_path, capsys):
    rc, err, rows = run(model, tmp_path / "explained", capsys, "--explain", "2")
    assert rc == EXIT_OK, err
    assert "explain: pictures of 4 of 4 memory cases found" in err, "the record's dataset folder holds the cases"
    assert [len(_frames(rows[name])) for name in ("still.png", "video.dcm")] == [1, 2], "a group per frame"
    for name, row in rows.items():
        for cases, shares in _frames(row):
            assert len(cases) == 2 and set(cases) <= set(COLOURS), f"{name}: {cases} are not 2 memory cases"
            assert all(0 < share <= 1 for share in shares) and shares == sorted(shares, reverse=True), shares
        assert NOTE_COLUMN not in row, "nothing to excuse"

    outputs = {name: {Path(path).name for path in row["outputs"].split(";")} for name, row in rows.items()}
    assert outputs == {
        "still.png": {"still_seg.png", "still_explain.png"},
        "video.dcm": {"video_seg.dcm", "video_frame0000_explain.png", "video_frame0001_explain.png"},
    }, "an explanation picture per frame, named as the masks, listed with the input's outputs"
    picture = np.asarray(Image.open(tmp_path / "explained" / "still_explain.png").convert("RGB"))
    assert picture.shape[1] == 16 + INPUT_TILE + 2 * (TILE + 8), "the input tile and the 2 case tiles in a row"
    first = _frames(rows["still.png"])[0][0][0]
    colour_pixels = (_tile(picture, 1) == COLOURS[first]).all(axis=-1).sum()
    assert colour_pixels > 0.3 * TILE * TILE, f"tile 1 shows the picture of {first}, read from the dataset folder"

    rc, err, _ = run(model, tmp_path / "plain", capsys)
    assert rc == EXIT_OK, err
    plain, explained = _masks(tmp_path / "plain"), _masks(tmp_path / "explained")
    assert sorted(plain) == ["still_seg.png", "video_seg.dcm"] and sorted(explained) == sorted(plain)
    for name, mask in plain.items():
        assert 0 < mask.mean() < mask.max(), f"{name}: the comparison needs masks with both classes"
        np.testing.assert_array_equal(explained[name], mask, err_msg=f"{name}: --explain changed the mask")

    rc, err, rows = run(model, tmp_path / "explained", capsys, "--explain", "2")
    assert rc == EXIT_OK and {row["status"] for row in rows.values()} == {"skipped-existing"}, "a rerun resumes"


def test_unreachable_case_pictures_are_named_on_grey_tiles_and_found_with_explain_root(model, tmp_path, capsys):
    moved = _save(model.network, tmp_path / "moved", 0.5, tmp_path / "gone")  # the training folder is not here
    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(model.inputs / "still.png", single / "still.png")
    elsewhere = Model(moved, model.network, model.dataset, single)

    rc, err, _ = run(elsewhere, tmp_path / "names", capsys, "--explain", "1")
    assert rc == EXIT_OK and "pictures of 0 of 4 memory cases found" in err and "--explain-root" in err, err
    tile = _tile(np.asarray(Image.open(tmp_path / "names" / "still_explain.png").convert("RGB")), 1)
    assert (tile == 128).all(axis=-1).mean() > 0.5, "a case whose picture is not here is a grey tile with its name"

    # a folder above the dataset folder: the cases are found one level below it
    rc, err, _ = run(
        elsewhere, tmp_path / "found", capsys, "--explain", "1", "--explain-root", str(model.dataset.parent)
    )
    assert rc == EXIT_OK and "pictures of 4 of 4 memory cases found" in err, err


@pytest.mark.parametrize("memory", ["empty", "unnamed"])
def test_a_memory_without_cases_writes_the_masks_and_says_why_once(memory, model, tmp_path, capsys):
    network = _network()
    if memory == "unnamed":  # written in training, before memory provenance: no sources, no names
        with torch.no_grad():
            network.train()(torch.rand(2, 3, SIZE, SIZE), labels=(torch.rand(2, 1, SIZE, SIZE) > 0.5).float())
        network.eval().ecrm.memory.sources.fill_(-1)
    assert int(network.ecrm.memory.filled) == (0 if memory == "empty" else 2)
    checkpoint = _save(network, tmp_path / "model", 0.5, model.dataset)
    rc, err, rows = run(
        Model(checkpoint, network, model.dataset, model.inputs), tmp_path / "out", capsys, "--explain", "2"
    )
    assert rc == EXIT_OK, err
    notes = [line for line in err.splitlines() if "explain:" in line]
    assert len(notes) == 1 and ("empty" if memory == "empty" else "does not record") in notes[0], err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "report.csv",
        "still_seg.png",
        "video_seg.dcm",
    ]
    for row in rows.values():
        assert row["status"] == "written" and row[NOTE_COLUMN] == notes[0].split("explain: ")[1].split(";")[0], row
        assert EXPLAIN_COLUMNS[0] not in row, "no cases to list"


def test_explain_above_the_filled_slots_shows_all_of_them_said_once(model, tmp_path, capsys):
    rc, err, rows = run(model, tmp_path / "out", capsys, "--explain", "5")  # 4 of 6 slots filled
    assert rc == EXIT_OK, err
    assert [line for line in err.splitlines() if "the memory holds" in line] == [
        "monai-ecrm-infer: explain: --explain 5: the memory holds 4 cases: all 4 shown"
    ], err
    for row in rows.values():
        for cases, shares in _frames(row):
            assert sorted(cases) == sorted(COLOURS), "every filled slot, each once"
            assert sum(shares) == pytest.approx(1, abs=5e-3), "the shares of all filled slots sum to 1"


def test_explain_needs_the_pytorch_network(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(model.inputs), "-o", str(tmp_path / "onnx"), "--onnx", "model.onnx", "--explain", "2"])
    assert exited.value.code == EXIT_USAGE and "--explain needs the PyTorch network" in capsys.readouterr().err

    bundle = tmp_path / "bundle" / "models"
    shutil.copytree(model.checkpoint.parent, bundle)
    record = make_record(record_from_network(model.network)["network"]["kwargs"], spatial_size=SIZE)
    torch.jit.save(
        torch.jit.script(model.network), str(bundle / "model.ts"), _extra_files=record_for_torchscript(record)
    )
    capsys.readouterr()
    rc = main(
        [str(model.inputs), "-o", str(tmp_path / "ts"), "--torchscript", str(bundle / "model.ts"), "--explain", "2"]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "a TorchScript model does not have" in err and "--checkpoint" in err, err
    assert not (tmp_path / "ts").exists(), "nothing is written"

    rc = main([str(model.inputs / "still.png"), "-o", str(tmp_path / "bundle_out"), "--bundle", str(bundle.parent),
               "--explain", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_OK and f"model: {bundle / 'model.pt'} " in err, "a bundle's model.pt is taken for --explain"
    assert (tmp_path / "bundle_out" / "still_explain.png").is_file()


def _explaining_job(model: Model, output: Path) -> ClinicalInference:
    return ClinicalInference(
        ExplainingRunner(model.network, 2),
        output,
        spatial_size=SIZE,
        progress=False,
        case_pictures=CasePictures([model.dataset]),
    )


def _copies(model: Model, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir()
    return [Path(shutil.copyfile(model.inputs / "still.png", folder / name)) for name in names]


def _writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("monai-ecrm-explain")]


def test_explanation_pictures_written_in_the_background_are_there_when_the_job_returns(model, tmp_path, monkeypatch):
    """The pictures are written by a background thread while the network runs on: an input is reported (and run()
    returns) only when its pictures are in place, a picture that cannot be written fails its own input only, and the
    pictures waiting to be written stay few (memory stays flat however slow the disk)."""
    write = explain_module._write_png
    waiting, most = [0], [0]
    compose = explain_module.ExplanationWriter.compose

    def counted_compose(self, data, explanation):
        waiting[0] += 1
        most[0] = max(most[0], waiting[0])
        return compose(self, data, explanation)

    def slow_or_failing(partial, image, written, final):
        time.sleep(0.2)  # a slow disk: the calling thread is on the next inputs meanwhile
        waiting[0] -= 1
        if final.name.startswith("c_"):
            raise OSError(28, "No space left on device")
        return write(partial, image, written, final)

    monkeypatch.setattr(explain_module.ExplanationWriter, "compose", counted_compose)
    monkeypatch.setattr(explain_module, "_write_png", slow_or_failing)
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    inputs = _copies(model, tmp_path / "in", names)
    results = _explaining_job(model, tmp_path / "out").run(inputs)

    assert [result.status for result in results] == ["written", "written", "failed", "written", "written", "written"]
    assert "No space left on device" in results[2].detail, results[2].detail
    for result in results[:2] + results[3:]:
        stem = Path(result.input).stem
        assert {Path(output).name for output in result.outputs} == {f"{stem}_seg.png", f"{stem}_explain.png"}
        assert all(Path(output).is_file() for output in result.outputs), f"{stem}: reported before it was written"
    assert not (tmp_path / "out" / "c_explain.png").exists()
    assert most[0] <= job._WRITES_AHEAD + 1, f"{most[0]} pictures waited to be written: memory grows with the job"
    assert not _writer_threads(), "the job's writing thread ends with the job"
    assert not (tmp_path / "out" / PARTIAL_DIR).exists(), "nothing left in the private folder"


def test_an_interrupted_job_has_its_reported_inputs_complete_and_stops_its_writing_thread(model, tmp_path):
    class Interrupting(ExplainingRunner):
        frames = 0

        def __call__(self, image):
            self.frames += 1
            if self.frames == 3:
                raise KeyboardInterrupt
            return super().__call__(image)

    inputs = _copies(model, tmp_path / "in", ["a.png", "b.png", "c.png"])
    inference = _explaining_job(model, tmp_path / "out")
    inference.runner = Interrupting(model.network, 2)
    results = []
    with pytest.raises(KeyboardInterrupt):
        inference.run(inputs, results)
    assert [Path(result.input).name for result in results] == ["a.png", "b.png"]
    assert all(Path(output).is_file() for result in results for output in result.outputs)
    assert not _writer_threads(), "an interrupted job does not leave its writing thread behind"
    assert not (tmp_path / "out" / PARTIAL_DIR).exists()


def test_an_explanation_picture_is_a_png_of_exactly_the_composed_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    pixels[10:20] = (24, 24, 24)  # flat rows, as the background between tiles
    decoded = Image.open(io.BytesIO(explain_module._png(pixels)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
