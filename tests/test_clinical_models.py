"""``monai-ecrm-infer`` runs a model as it was trained, whichever way it is given, and names it.

Each documented configuration is a small trained-like model (its memory written by a few training-mode forwards) with
its record (:mod:`monai_ecrm.record`): ``model.pt`` with ``model.json`` beside it, a TorchScript export with the
record embedded, and a bundle folder whose ``configs/inference.json`` is the installed bundle's (256 px,
efficientnet-lite0).
The oracle is the job run with the record's input size, normalisation and threshold: ``--checkpoint``,
``--torchscript`` and ``--bundle`` must give its masks. The threshold is the median probability of the picture, so a
mask has both classes and a model run at another size, normalisation or threshold gives another mask.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest_data import dicom_dataset, write_dicom, write_png
from PIL import Image
from test_dicom_seg import video_frames

from monai_ecrm.clinical import ClinicalInference
from monai_ecrm.clinical.cli import EXIT_OK, EXIT_USAGE, main
from monai_ecrm.clinical.seg import bundle_version
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
from monai_ecrm.record import make_record, record_for_torchscript, record_from_network, write_record
from monai_ecrm.transforms import infer_transforms, normalization_for_backbone

#: the 2D configurations the README and the accuracy study document (tests/test_record.py's), small memories, and the
#: input size each was "trained" at: none at the 256 px the installed bundle's inference.json says
CONFIGURATIONS = {
    "defaults": ({"backbone": "resnet10", "bank_size": 4}, 64),
    "resnet34_icrm": ({"backbone": "resnet34", "use_icrm": True, "bank_size": 4, **DCRNET_ECRM_OPTIONS}, 64),
    "lite0_320": ({"backbone": "efficientnet-lite0", "ecrm_channels": 320, "bank_size": 4, **DCRNET_ECRM_OPTIONS}, 64),
    "lite0_320_stride16": ({"backbone": "efficientnet-lite0", "ecrm_channels": 320, "memory_stride": 16}, 64),
    "resnet18_stride16": ({"backbone": "resnet18", "memory_stride": 16, "bank_size": 4}, 96),
    "label_prototypes_background": ({"backbone": "resnet10", "prototypes": "label", "background_tokens": True}, 64),
    "gated_context": ({"backbone": "resnet10", "context_start": "gate", "key_channels": 64}, 64),
    "no_ecrm": ({"backbone": "resnet10", "use_ecrm": False}, 64),
}
DESCRIPTION = "Kvasir-SEG, test split"
#: torch 2.13 deprecates TorchScript, but ``ckpt_export`` files are TorchScript: the command must keep reading them
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
PICTURE = video_frames(3, 72, 96)[2]


@dataclass
class TrainedModel:
    """A model saved every way the command takes it, and the mask it must give for :data:`PICTURE`."""

    name: str
    network: ECRMUNet
    record: dict
    checkpoint: Path
    torchscript: Path
    bundle: Path
    picture: Path
    mask: np.ndarray


def _filled(network: ECRMUNet, size: int) -> ECRMUNet:
    """``network`` after two training-mode forwards (its memory written), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            labels = (torch.rand(2, 1, size, size) > 0.5).float()
            network.train()(torch.rand(2, 3, size, size), labels=labels)
    return network.eval()


def _median_probability(network: ECRMUNet, picture: Path, size: int, normalization: str) -> float:
    with torch.no_grad():
        image = infer_transforms(spatial_size=size, normalization=normalization)({"image": str(picture)})["image"]
        return float(torch.sigmoid(network(image.as_tensor()[None])).median())


def _reference_mask(network, picture: Path, output: Path, size: int, normalization: str, threshold: float):
    job = ClinicalInference(
        network, output, spatial_size=size, normalization=normalization, threshold=threshold, progress=False
    )
    assert [result.status for result in job.run([picture])] == ["written"]
    return np.asarray(Image.open(output / f"{picture.stem}_seg.png"))


def _save(name: str, root: Path) -> TrainedModel:
    config, size = CONFIGURATIONS[name]
    torch.manual_seed(1)
    network = _filled(ECRMUNet(**config), size)
    normalization = normalization_for_backbone(config["backbone"])
    picture = write_png(root / "frame.png", PICTURE)
    threshold = _median_probability(network, picture, size, normalization)
    kwargs = record_from_network(network)["network"]["kwargs"]
    training = {"description": DESCRIPTION, "train_images": 8, "completed": True}
    record = make_record(kwargs, spatial_size=size, threshold=threshold, training=training)

    checkpoint = root / "pt" / "model.pt"
    checkpoint.parent.mkdir()
    torch.save(network.state_dict(), checkpoint)
    write_record(checkpoint, record)  # models/model.json beside models/model.pt, as the bundle writes it
    torchscript = root / "ts" / "model.ts"  # the record embedded, nothing beside it
    torchscript.parent.mkdir()
    torch.jit.save(torch.jit.script(network), str(torchscript), _extra_files=record_for_torchscript(record))
    bundle = _bundle(root / "bundle", checkpoint)
    mask = _reference_mask(network, picture, root / "reference", size, normalization, threshold)
    assert 0.05 < (mask > 0).mean() < 0.95, "the comparison needs a mask with both classes"
    return TrainedModel(name, network, record, checkpoint, torchscript, bundle, picture, mask)


def _bundle(folder: Path, *models: Path, config: dict | None = None) -> Path:
    """A bundle folder: the installed bundle's inference.json (updated with ``config``) and ``models``."""
    from monai_ecrm.bundle import bundle_path

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = json.loads((bundle_path() / "configs" / "inference.json").read_text())
    inference.update(config or {})
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    for model in models:
        shutil.copyfile(model, folder / "models" / model.name)
        if model.with_suffix(".json").is_file():
            shutil.copyfile(model.with_suffix(".json"), folder / "models" / "model.json")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The saved models, made once per module and configuration."""
    cache: dict[str, TrainedModel] = {}

    def get(name: str) -> TrainedModel:
        if name not in cache:
            cache[name] = _save(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def segment(picture: Path, output: Path, *options: str) -> tuple[int, np.ndarray | None, dict[str, str]]:
    """Run the command on one picture: its exit status, the mask (``None`` when none was written) and report row."""
    rc = main([str(picture), "-o", str(output), "--no-progress", *options])
    masks = sorted(output.glob("*_seg.png")) if output.is_dir() else []
    mask = np.asarray(Image.open(masks[0])) if masks else None
    row = {}
    if (output / "report.csv").is_file():
        with open(output / "report.csv", newline="", encoding="utf-8") as stream:
            row = next(csv.DictReader(stream))
    return rc, mask, row


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_every_configuration_gives_its_masks_through_checkpoint_torchscript_and_bundle(name, models, tmp_path, capsys):
    model = models(name)
    size = CONFIGURATIONS[name][1]
    ts_bundle = _bundle(tmp_path / "ts_bundle", model.torchscript)  # DIR/models/model.ts is taken before model.pt
    ways = {
        "checkpoint": (["--checkpoint", str(model.checkpoint)], model.checkpoint),
        "torchscript": (["--torchscript", str(model.torchscript)], model.torchscript),
        "bundle": (["--bundle", str(model.bundle)], model.bundle / "models" / "model.pt"),
        "bundle_ts": (["--bundle", str(ts_bundle)], ts_bundle / "models" / "model.ts"),
    }
    for way, (options, file) in ways.items():
        capsys.readouterr()
        rc, mask, row = segment(model.picture, tmp_path / way, *options)
        err = capsys.readouterr().err
        assert rc == EXIT_OK, f"{name} through --{way}: {err}"
        message = f"{name} through --{way}: not run with the record's size, normalisation and threshold"
        np.testing.assert_array_equal(mask, model.mask, err_msg=message)
        expected = f"monai-ecrm-infer: model: {file} (sha256 {_sha(file)}): trained on {DESCRIPTION} (8 training "
        expected += f"images) at {size}x{size} px"
        assert err.splitlines()[0] == expected, f"{name} through --{way}: the model line"
        assert "assumed" not in err, f"{name} through --{way}: the record states everything: {err}"
        assert (row["model"], row["model_sha256"]) == (str(file), _sha(file)), "report.csv names the model"


def test_the_oracle_tells_another_size_or_normalisation_apart(models, tmp_path):
    """The oracle sees a model run at the bundle config's 352 px or with ImageNet normalisation instead of the Lite
    one: the masks differ (so the test above would have caught both)."""
    model = models("lite0_320")
    threshold = model.record["threshold"]
    at_352 = _reference_mask(model.network, model.picture, tmp_path / "352", 352, "lite", threshold)
    imagenet = _reference_mask(model.network, model.picture, tmp_path / "imagenet", 64, "imagenet", threshold)
    assert not np.array_equal(at_352, model.mask) and not np.array_equal(imagenet, model.mask)


@pytest.mark.parametrize("way", ["checkpoint", "torchscript", "bundle"])
def test_an_option_that_contradicts_the_model_is_an_error_naming_both_values(way, models, tmp_path, capsys):
    model = models("lite0_320")
    given = {"checkpoint": model.checkpoint, "torchscript": model.torchscript, "bundle": model.bundle}[way]
    for options, values in [
        (["--spatial-size", "352"], ("spatial_size", "[64, 64]", "352")),
        (["--backbone", "resnet34"], ("backbone", "'efficientnet-lite0'", "'resnet34'")),
        (["--bank-size", "20"], ("bank_size", "4", "20")),
        (["--no-use-icrm", "--bank-size", "3"], ("bank_size", "4", "3")),
    ]:
        output = tmp_path / "_".join(options)
        rc, _, _ = segment(model.picture, output, f"--{way}", str(given), *options)
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE, f"--{way} {options}: {err}"
        assert len(err.splitlines()) == 1 and err.startswith("monai-ecrm-infer: error: "), err
        key, recorded, stated = values
        assert f"{key}: {recorded} (" in err and f"{stated} (the command line)" in err, err
        assert not output.exists(), "nothing is written when the model cannot be run as asked"


def test_the_threshold_may_be_given_as_an_operating_point(models, tmp_path, capsys):
    model = models("lite0_320")
    rc, mask, _ = segment(model.picture, tmp_path / "out", "--checkpoint", str(model.checkpoint), "--threshold", "0")
    assert rc == EXIT_OK, capsys.readouterr().err
    assert (mask == 255).all(), "--threshold 0 marks every pixel"


@pytest.mark.parametrize("kind", ["checkpoint", "torchscript"])
def test_a_lite0_model_without_a_record_runs_from_its_weights_and_says_what_it_assumed(kind, models, tmp_path, capsys):
    """Before records: a Lite0 model with 320 ECRM channels was refused as a checkpoint (no flag gave the channels),
    and as TorchScript it ran with resnet34's ImageNet normalisation. Its weights show both."""
    model = models("lite0_320")
    file = tmp_path / "bare" / ("model.pt" if kind == "checkpoint" else "model.ts")
    file.parent.mkdir()
    if kind == "checkpoint":
        shutil.copyfile(model.checkpoint, file)
    else:
        torch.jit.save(torch.jit.script(model.network), str(file))
    threshold = str(model.record["threshold"])
    rc, mask, _ = segment(model.picture, tmp_path / "out", f"--{kind}", str(file), "--spatial-size", "64",
                          "--threshold", threshold)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_OK, err
    np.testing.assert_array_equal(mask, model.mask, err_msg="the Lite normalisation follows the weights' backbone")
    lines = err.splitlines()
    assert lines[0].endswith("no model record: what it was trained on, and at which input size, is unknown"), lines
    assert lines[1].startswith("monai-ecrm-infer: model: assumed normalisation 'lite': the model does not state"), lines

    rc, _, _ = segment(model.picture, tmp_path / "defaults", f"--{kind}", str(file))
    err = capsys.readouterr().err
    assert rc == EXIT_OK and "assumed input size 352x352 px, normalisation 'lite', threshold 0.5" in err, err


def test_a_bundle_trained_before_records_takes_its_config_size_and_threshold(models, tmp_path, capsys):
    model = models("resnet18_stride16")
    threshold = model.record["threshold"]
    bare = tmp_path / "bare.pt"
    shutil.copyfile(model.checkpoint, bare)
    bundle = _bundle(tmp_path / "old_bundle", config={"spatial_size": 96, "threshold": threshold})
    shutil.copyfile(bare, bundle / "models" / "model.pt")
    rc, mask, _ = segment(model.picture, tmp_path / "out", "--bundle", str(bundle))
    err = capsys.readouterr().err
    assert rc == EXIT_OK, err
    np.testing.assert_array_equal(mask, model.mask, err_msg="the bundle config's 96 px and threshold")
    assert "monai-ecrm-infer: model: assumed normalisation 'imagenet': " in err, "only the normalisation is assumed"

    rc, _, _ = segment(model.picture, tmp_path / "flags", "--bundle", str(bundle), "--spatial-size", "64")
    assert rc == EXIT_OK, "the command line's values come before the config's of a bundle without a record"


def test_without_a_model_option_the_installed_bundle_model_is_named(models, tmp_path, capsys, monkeypatch):
    import monai_ecrm.bundle

    model = models("gated_context")
    monkeypatch.setattr(monai_ecrm.bundle, "bundle_path", lambda: model.bundle)
    rc, mask, row = segment(model.picture, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == EXIT_OK, err
    file = model.bundle / "models" / "model.pt"
    assert err.startswith(f"monai-ecrm-infer: model: {file} (sha256 {_sha(file)}) (the installed bundle's: no model "
                          "option given): trained on "), err  # fmt: skip
    assert row["model"] == str(file) and row["model_sha256"] == _sha(file)
    np.testing.assert_array_equal(mask, model.mask)


@pytest.mark.parametrize("given", [False, True], ids=["installed", "bundle_option"])
def test_without_any_trained_model_the_command_says_how_to_get_one(given, tmp_path, capsys, monkeypatch):
    import monai_ecrm.bundle

    empty = _bundle(tmp_path / "untrained")
    monkeypatch.setattr(monai_ecrm.bundle, "bundle_path", lambda: empty)
    picture = write_png(tmp_path / "frame.png", PICTURE)
    rc, _, _ = segment(picture, tmp_path / "out", *(["--bundle", str(empty)] if given else []))
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"monai-ecrm-infer: error: no trained model: {empty / 'models'} holds neither"), err
    assert f"--config_file {empty / 'configs' / 'train.json'}" in err and "--checkpoint" in err, err
    assert not (tmp_path / "out").exists()


def test_the_seg_names_the_model_in_its_algorithm_identification(models, tmp_path):
    model = models("lite0_320")
    folder = tmp_path / "dicom"
    folder.mkdir()
    write_dicom(folder / "frame.dcm", dicom_dataset(PICTURE))
    assert main([str(folder), "-o", str(tmp_path / "out"), "--checkpoint", str(model.checkpoint), "--no-progress"]) == 0
    seg = pydicom.dcmread(tmp_path / "out" / "frame_seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == bundle_version()
    parameters = dict(item.split("=", 1) for item in algorithm.AlgorithmParameters.split(","))
    assert parameters["model"] == "model.pt" and parameters["model_sha256"] == _sha(model.checkpoint)
    assert parameters["trained_on"] == "Kvasir-SEG; test split (8 training images)", "commas would split the list"
    assert parameters["input_size"] == "64" and parameters["normalization"] == "lite"
    assert parameters["backbone"] == "efficientnet-lite0"
    assert float(parameters["threshold"]) == pytest.approx(model.record["threshold"])
