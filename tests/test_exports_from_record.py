"""Exports take what they state from the model's record, name the weights they were exported from, and ``--bundle``
runs an export only when it is one of ``models/model.pt`` ("Model files you can trust", items 5 and 6).

The model is a small EfficientNet-Lite0 ECRM-UNet (test_onnx's architecture) whose memory two training-mode forwards
wrote, "trained" at 64 px: its record (``models/model.json`` beside ``models/model.pt``, naming those weights, as the
bundle writes it) states 64 px, where the bundle's ``inference.json`` says 256.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_data import write_png
from PIL import Image

from monai_ecrm.clinical.cli import EXIT_OK, EXIT_USAGE
from monai_ecrm.clinical.cli import main as infer
from monai_ecrm.networks.nets import ECRMUNet
from monai_ecrm.record import (
    RecordMismatchError,
    describe_weights,
    embed_record,
    load_network,
    load_torchscript,
    make_record,
    read_record,
    record_from_network,
    write_record,
)
from monai_ecrm.transforms import infer_transforms

#: torch 2.13 deprecates TorchScript, but ``ckpt_export`` files are TorchScript
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "polyp_ecrm"
CONFIGS = BUNDLE / "configs"
#: test_onnx's small network, and the same as overrides of the bundle's inference.json
KWARGS = {"backbone": "efficientnet-lite0", "bank_size": 4, "key_channels": 64, "decoder_channels": [64, 32, 16, 16, 8]}
OVERRIDES = {
    "backbone": "efficientnet-lite0",
    "bank_size": 4,
    "network_def#key_channels": 64,
    "network_def#decoder_channels": [64, 32, 16, 16, 8],
}
SIZE = 64
CASES = ["kvasir/a.jpg", "kvasir/b.jpg", "kvasir/c.jpg", "kvasir/d.jpg"]
TRAINING = {"description": "discs", "train_images": 8, "completed": True}


def _network(seed: int) -> ECRMUNet:
    """The network, its memory written by two training-mode forwards, in eval mode."""
    torch.manual_seed(seed)
    network = ECRMUNet(**KWARGS)
    with torch.no_grad():
        for _ in range(2):
            labels = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()
            network.train()(torch.rand(2, 3, SIZE, SIZE), labels=labels)
    return network.eval()


def _save(network: ECRMUNet, folder: Path, threshold: float = 0.5) -> Path:
    """``folder/model.pt`` and, beside it, the record naming it (``model.json``), as the bundle's training does."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    torch.save(network.state_dict(), weights)
    record = make_record(
        record_from_network(network)["network"]["kwargs"],
        spatial_size=SIZE,
        normalization="lite",
        threshold=threshold,
        training=TRAINING,
        memory={"slots": 4, "filled": 4},
        memory_sources=CASES,
        weights=describe_weights(weights),
    )
    write_record(weights, record)
    return weights


def _script(network: ECRMUNet, path: Path) -> Path:
    """``network`` scripted to ``path``, nothing embedded (what ``ckpt_export`` gives but its config copies)."""
    torch.jit.script(network).save(str(path))
    return path


def _export_args(weights: Path, out: Path, **overrides) -> list[str]:
    arguments = ["--filepath", str(out), "--ckpt_file", str(weights), "--config_file", str(CONFIGS / "inference.json")]
    arguments += ["--meta_file", str(CONFIGS / "metadata.json"), "--args_file", str(CONFIGS / "onnx_export.json")]
    for key, value in {**OVERRIDES, **overrides}.items():
        arguments += [f"--{key}", json.dumps(value)]
    return arguments


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[ECRMUNet, Path]:
    network = _network(seed=1)
    return network, _save(network, tmp_path_factory.mktemp("model") / "models")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    pixels = (rng.uniform(0.2, 0.8, (72, 96, 3)) * 255).astype(np.uint8)
    pixels[20:50, 30:70] = 230
    return write_png(tmp_path_factory.mktemp("picture") / "frame.png", pixels)


# ------------------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize(
    "threshold, overrides, named",
    [(0.5, {}, ["spatial_size: [64, 64]", "256"]), (0.4, {"spatial_size": SIZE}, ["threshold: 0.4", "0.5"])],
    ids=["spatial_size", "threshold"],
)
def test_onnx_export_refuses_a_config_value_that_contradicts_the_record(
    model, tmp_path, capsys, threshold, overrides, named
):
    pytest.importorskip("onnx")
    from monai_ecrm.onnx import main as onnx_main

    weights = _save(model[0], tmp_path / "models", threshold=threshold)
    out = tmp_path / "models" / "model.onnx"
    assert onnx_main(["export", *_export_args(weights, out, **overrides)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert all(text in error for text in named) and "the config" in error and str(weights) in error, error
    assert not out.exists(), "nothing is exported when the config contradicts the model"
    assert {path.name for path in (tmp_path / "models").iterdir()} == {"model.pt", "model.json"}, "no file left"


def test_onnx_export_takes_the_record_and_runs_as_the_checkpoint(model, picture, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from monai_ecrm.clinical.onnx_runner import OnnxRunner
    from monai_ecrm.clinical.runner import trained_on
    from monai_ecrm.onnx import load_onnx_session, read_metadata
    from monai_ecrm.onnx import main as onnx_main

    network, weights = model
    out = tmp_path / "model.onnx"
    assert onnx_main(["export", *_export_args(weights, out, spatial_size=SIZE)]) == 0, capsys.readouterr().err
    record, written = read_metadata(out), read_record(weights)
    assert record["preprocessing"] == written["preprocessing"] and record["threshold"] == written["threshold"]
    assert record["network"]["kwargs"] == written["network"]["kwargs"]
    assert record["training"] == TRAINING and record["memory"] == {"slots": 4, "filled": 4, "sources": CASES}
    assert record["exported_from"] == describe_weights(weights) and "weights" not in record
    assert record["source"]["checkpoint"] == "model.pt" and record["source"]["opset"] == 18

    runner = OnnxRunner(out, threads=1)
    _, merged = load_network(weights)
    expected = {key: merged["preprocessing"][key] for key in ("spatial_size", "normalization")}
    assert runner.settings == {**expected, "threshold": merged["threshold"]} and expected["spatial_size"] == [64, 64]
    assert trained_on(runner.record) == "discs (8 training images)"

    session, _ = load_onnx_session(out, threads=1)
    image = infer_transforms(spatial_size=SIZE, normalization="lite")({"image": str(picture)})["image"].as_tensor()
    with torch.no_grad():
        reference = network(image[None]).numpy()
    logits = session.run(None, {"image": image[None].numpy()})[0]
    assert np.abs(logits - reference).max() <= 1e-4 * (reference.max() - reference.min())

    # the two-step form (MONAI's onnx_export, then `record`) checks the config the same way
    assert onnx_main(["record", "--model", str(out), *_export_args(weights, out)[2:6]]) == 2
    assert "spatial_size: [64, 64]" in capsys.readouterr().err
    assert read_metadata(out) == record, "a refused record leaves the file as it was"


def test_onnx_exported_as_the_docs_say_gives_the_checkpoint_masks(model, picture, tmp_path, capsys):
    """The issue's symptom: a 64 px model exported with the bundle's inference.json (256 px) as the docs say. The
    export either states the record's size or stops with one line saying which override to give; followed, the
    ``--onnx`` masks are the checkpoint's."""
    pytest.importorskip("onnxruntime")
    from monai_ecrm.onnx import main as onnx_main

    network, weights = model
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    if onnx_main(["export", *_export_args(weights, out)]) != 0:
        key, value = re.search(r"e\.g\. --(\S+) (\S+)\)$", capsys.readouterr().err.strip()).groups()
        assert onnx_main(["export", *_export_args(weights, out, **{key: json.loads(value)})]) == 0
    image = infer_transforms(spatial_size=SIZE, normalization="lite")({"image": str(picture)})["image"].as_tensor()
    with torch.no_grad():
        threshold = float(torch.sigmoid(network(image[None])).median())  # a mask with both classes
    masks = {}
    for way in ("checkpoint", "onnx"):
        given = weights if way == "checkpoint" else out
        options = [f"--{way}", str(given), "--threshold", str(threshold), "--no-progress"]
        assert infer([str(picture), "-o", str(tmp_path / way), *options]) == EXIT_OK, capsys.readouterr().err
        masks[way] = np.asarray(Image.open(tmp_path / way / "frame_seg.png")) > 0
    assert 0.05 < masks["checkpoint"].mean() < 0.95
    assert float((masks["onnx"] != masks["checkpoint"]).mean()) <= 0.001


# ----------------------------------------------------------------------------------------------------- TorchScript
def test_embed_names_the_weights_and_refuses_a_stale_export(model, tmp_path):
    network, source = model
    folder = tmp_path / "models"
    shutil.copytree(source.parent, folder)
    exported = _script(network, folder / "model.ts")
    embed_record(exported)
    embedded = read_record(exported)
    assert embedded["exported_from"] == describe_weights(folder / "model.pt") and "weights" not in embedded
    assert embedded["training"] == TRAINING and embedded["memory"]["sources"] == CASES
    assert load_torchscript(exported)[1]["preprocessing"]["spatial_size"] == [64, 64]

    stale = _script(_network(seed=2), folder / "model.ts")  # earlier weights than model.pt's
    with pytest.raises(RecordMismatchError, match="stale export") as raised:
        embed_record(stale)
    assert str(stale) in str(raised.value) and "model.pt" in str(raised.value) and "ckpt_export" in str(raised.value)
    assert read_record(stale) is None, "the refused record is not embedded"


def test_a_torchscript_file_is_not_labelled_with_the_record_of_other_weights(model, tmp_path):
    network, source = model
    folder = tmp_path / "models"
    shutil.copytree(source.parent, folder)
    current = _script(network, tmp_path / "current.ts")
    shutil.copy(current, folder / "model.ts")  # ckpt_export's file, not embedded: model.json beside it applies
    assert load_torchscript(folder / "model.ts")[1]["training"] == TRAINING
    _script(_network(seed=2), folder / "model.ts")  # a stale export beside a newer model.pt and its record
    with pytest.raises(RecordMismatchError, match="stale export") as raised:
        load_torchscript(folder / "model.ts")
    assert str(folder / "model.json") in str(raised.value) and str(folder / "model.ts") in str(raised.value)
    (folder / "model.pt").unlink()  # nothing to check the export against: the record is not taken on trust
    with pytest.raises(RecordMismatchError, match="embed"):
        load_torchscript(folder / "model.ts")


# -------------------------------------------------------------------------------------------------------- --bundle
def _bundle_run(bundle: Path, picture: Path, output: Path, capsys) -> tuple[int, str, str]:
    """The command with ``--bundle``: its exit status, the model its report names, and its stderr."""
    capsys.readouterr()
    rc = infer([str(picture), "-o", str(output), "--bundle", str(bundle), "--no-progress"])
    err = capsys.readouterr().err
    with open(output / "report.csv", newline="", encoding="utf-8") as stream:
        return rc, next(csv.DictReader(stream))["model"], err


def test_bundle_runs_model_ts_only_when_it_is_an_export_of_model_pt(model, picture, tmp_path, capsys):
    network, source = model
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(CONFIGS / "inference.json", bundle / "configs" / "inference.json")
    models = bundle / "models"
    shutil.copytree(source.parent, models)
    exported = models / "model.ts"

    # an export of earlier weights, embedded with their record: stale once training wrote a new model.pt
    old = _network(seed=2)
    _save(old, tmp_path / "old")
    embed_record(_script(old, tmp_path / "old" / "model.ts"))
    shutil.copy(tmp_path / "old" / "model.ts", exported)
    rc, used, err = _bundle_run(bundle, picture, tmp_path / "stale", capsys)
    assert rc == EXIT_OK and used == str(models / "model.pt"), err
    warning = next(line for line in err.splitlines() if "stale" in line)
    assert str(exported) in warning and "ckpt_export" in warning and "monai_ecrm.record embed" in warning

    # an export without a record naming its weights (ckpt_export alone) may be stale too: model.pt runs
    _script(network, exported)
    rc, used, err = _bundle_run(bundle, picture, tmp_path / "unnamed", capsys)
    assert rc == EXIT_OK and used == str(models / "model.pt") and "does not name the weights" in err, err

    # re-exported and embedded: model.ts is model.pt's export, and runs
    embed_record(exported)
    rc, used, err = _bundle_run(bundle, picture, tmp_path / "current", capsys)
    assert rc == EXIT_OK and used == str(exported) and "stale" not in err, err
    assert "trained on discs (8 training images) at 64x64 px" in err.splitlines()[0]

    # --torchscript with a stale, unembedded export beside a newer record: one line, no model run
    _script(old, exported)
    capsys.readouterr()
    rc = infer([str(picture), "-o", str(tmp_path / "direct"), "--torchscript", str(exported), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "stale export" in err and len(err.strip().splitlines()) == 1, err
