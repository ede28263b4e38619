"""``monai-ecrm-infer --onnx`` and ``--bf16``, and the bundle's ``--onnx_path``: the same masks, reports and refusals as
the PyTorch path (monai_ecrm.clinical.onnx_runner, monai_ecrm.onnx.OnnxNetwork, TorchRunner's autocast).

The model is test_onnx's small EfficientNet-Lite0 ECRM-UNet trained a few steps on bright discs (confident masks on
discs, non-trivial ones on Kvasir frames), exported once to float32 ONNX and quantised to INT8 on Kvasir frames other
than the ones segmented here, as a user calibrates on training images.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

pytest.importorskip("onnx", reason="onnx not installed (pip install 'monai-ecrm[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'monai-ecrm[onnx]')")

from conftest_data import DATA_DIR, dicom_dataset, real_data, write_dicom, write_png  # noqa: E402
from PIL import Image  # noqa: E402
from test_dicom_seg import multiframe_dicom  # noqa: E402
from test_onnx import KWARGS, OVERRIDES, TRAIN_SIZE, blob_pictures, dice, trained  # noqa: E402, F401

from monai_ecrm.clinical.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from monai_ecrm.clinical.onnx_runner import OnnxRunner  # noqa: E402
from monai_ecrm.onnx import export_network, make_record, quantize_int8, read_metadata, write_metadata  # noqa: E402

KVASIR = DATA_DIR / "kvasir_seg" / "images"
NEMA = DATA_DIR / "dicom_samples" / "nema_wg04_vl2_j2kr.dcm"
#: the PyTorch path of the command for the test model (its weights show the architecture; no record: size given)
TORCH_ARGS = ["--spatial-size", str(TRAIN_SIZE)]


@dataclass
class Models:
    checkpoint: Path
    onnx: Path
    int8: Path


@dataclass
class Run:
    rc: int
    output: Path
    conv_dtypes: set[torch.dtype]


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory) -> Models:  # noqa: F811 (test_onnx's fixture)
    folder = tmp_path_factory.mktemp("models")
    checkpoint = folder / "model.pt"
    torch.save(trained.state_dict(), checkpoint)
    onnx_path = export_network(trained, folder / "model.onnx", make_record(KWARGS, TRAIN_SIZE, "lite"))
    calibration = folder / "calibration"
    calibration.mkdir()
    if KVASIR.is_dir():  # frames the tests do not segment (they take the first ones)
        for path in sorted(KVASIR.glob("*.jpg"))[20:36]:
            shutil.copy(path, calibration / path.name)
    else:
        for index, picture in enumerate(blob_pictures(16, 96, 128, seed=200)[0]):
            write_png(calibration / f"{index:02d}.png", picture)
    int8 = folder / "model.int8.onnx"
    quantize_int8(onnx_path, int8, calibration, num_images=16)
    return Models(checkpoint, onnx_path, int8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every kind of input the command takes: Kvasir JPEGs and the NEMA frame (where the data is), a PNG, a
    single-frame and a multi-frame DICOM, and an RGB NIfTI picture."""
    import nibabel

    folder = tmp_path_factory.mktemp("inputs")
    if KVASIR.is_dir():
        for path in sorted(KVASIR.glob("*.jpg"))[:3]:
            shutil.copy(path, folder / path.name)
    if NEMA.is_file():
        shutil.copy(NEMA, folder / NEMA.name)
    pictures = blob_pictures(6, 96, 128, seed=300)[0]
    write_png(folder / "discs.png", pictures[0])
    write_dicom(folder / "still.dcm", dicom_dataset(pictures[1]))
    multiframe_dicom(folder / "video.dcm", pictures[2:5])
    nibabel.save(nibabel.Nifti1Image(pictures[5], np.diag([0.5, -0.5, 1.0, 1.0])), folder / "picture.nii.gz")
    return folder


@pytest.fixture(scope="module")
def command(models, inputs, tmp_path_factory):
    """``run(name, *args)``: the command on ``inputs`` (once per name), with the dtypes the Conv2d layers gave."""
    done: dict[str, Run] = {}

    def run(name: str, *args: str) -> Run:
        if name not in done:
            output = tmp_path_factory.mktemp(name) / "out"
            dtypes: set[torch.dtype] = set()

            def conv_dtype(module, _inputs, result):
                if isinstance(module, torch.nn.Conv2d):
                    dtypes.add(result.dtype)

            hook = torch.nn.modules.module.register_module_forward_hook(conv_dtype)
            try:
                rc = main([str(inputs), "-o", str(output), "--no-progress", *args])
            finally:
                hook.remove()
            done[name] = Run(rc, output, dtypes)
        return done[name]

    return run


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    """Every mask written under ``folder`` as booleans (PNG, DICOM SEG frames, NIfTI), by file name."""
    import nibabel

    masks = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith("_seg.png"):
            masks[path.name] = np.asarray(Image.open(path)) > 0
        elif path.name.endswith("_seg.dcm"):
            masks[path.name] = pydicom.dcmread(path).pixel_array > 0
        elif path.name.endswith("_seg.nii.gz"):
            masks[path.name] = np.asarray(nibabel.load(path).dataobj) > 0
    return masks


def statuses(folder: Path) -> dict[str, str]:
    with open(folder / "report.csv", newline="", encoding="utf-8") as stream:
        return {Path(row["input"]).name: row["status"] for row in csv.DictReader(stream)}


def test_onnx_masks_equal_the_pytorch_masks_on_every_kind_of_input(command, models):
    real_data("kvasir_seg")
    real_data("dicom_samples")
    reference = command("torch", "--checkpoint", str(models.checkpoint), *TORCH_ARGS)
    onnx_run = command("onnx", "--onnx", str(models.onnx))
    assert reference.rc == onnx_run.rc == EXIT_OK
    expected = statuses(reference.output)
    assert set(expected.values()) == {"written"} and len(expected) == 8
    assert statuses(onnx_run.output) == expected, "the same report, input by input"
    torch_masks, onnx_masks = read_masks(reference.output), read_masks(onnx_run.output)
    assert sorted(onnx_masks) == sorted(torch_masks) and len(torch_masks) == 8, "the same outputs"
    assert pydicom.dcmread(onnx_run.output / "video_seg.dcm").NumberOfFrames == 3
    both_classes = [name for name, mask in torch_masks.items() if 0.02 < mask.mean() < 0.98]
    assert len(both_classes) >= 4, f"the comparison needs masks with both classes: {both_classes}"
    for name, mask in torch_masks.items():
        differing = float((onnx_masks[name] != mask).mean())
        assert differing <= 0.001, f"{name}: {differing:.4%} of the pixels differ between ONNX Runtime and PyTorch"


def test_int8_masks_agree_with_float32_where_they_are_not_empty(command, models):
    real_data("kvasir_seg")
    real_data("dicom_samples")
    float_masks = read_masks(command("onnx", "--onnx", str(models.onnx)).output)
    int8_run = command("int8", "--onnx", str(models.int8))
    assert int8_run.rc == EXIT_OK
    int8_masks = read_masks(int8_run.output)
    assert sorted(int8_masks) == sorted(float_masks)
    compared = [name for name, mask in float_masks.items() if mask.any()]
    assert len(compared) >= 6, "most test masks must hold a polyp for the comparison to mean anything"
    scores = {name: round(dice(float_masks[name], int8_masks[name]), 4) for name in compared}
    assert min(scores.values()) >= 0.98, scores


def test_bf16_runs_the_network_in_bfloat16_and_its_masks_agree_with_float32(command, models):
    reference = command("torch", "--checkpoint", str(models.checkpoint), *TORCH_ARGS)
    bf16 = command("bf16", "--checkpoint", str(models.checkpoint), *TORCH_ARGS, "--bf16")
    assert bf16.rc == EXIT_OK
    assert reference.conv_dtypes == {torch.float32}
    assert bf16.conv_dtypes == {torch.bfloat16}, "--bf16 must run the convolutions in bfloat16"
    torch_masks, bf16_masks = read_masks(reference.output), read_masks(bf16.output)
    assert sorted(bf16_masks) == sorted(torch_masks)
    for name, mask in torch_masks.items():
        agreeing = float((bf16_masks[name] == mask).mean())
        assert agreeing >= 0.99, f"{name}: only {agreeing:.2%} of the pixels agree between bfloat16 and float32"


def test_an_onnx_rerun_skips_what_is_written_and_leaves_no_partial_files(command, models, inputs, tmp_path):
    from monai_ecrm.writing import PARTIAL_DIR

    first = command("onnx", "--onnx", str(models.onnx))
    assert not (first.output / PARTIAL_DIR).exists()
    rc = main([str(inputs), "-o", str(first.output), "--no-progress", "--onnx", str(models.onnx)])
    assert rc == EXIT_OK
    assert set(statuses(first.output).values()) == {"skipped-existing"}


def test_help_names_the_onnx_threads_and_bf16_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--onnx", "--threads", "--bf16", "INT8"):
        assert option in text, f"--help does not mention {option}"


@pytest.mark.parametrize(
    "options",
    [["--checkpoint", "model.pt"], ["--torchscript", "model.ts"], ["--bundle", "."], ["--bf16"], ["--device", "cuda"]],
    ids=["checkpoint", "torchscript", "bundle", "bf16", "cuda"],
)
def test_onnx_with_another_model_or_a_pytorch_option_is_a_usage_error(models, tmp_path, options, capsys):
    picture = write_png(tmp_path / "frame.png", blob_pictures(1, 40, 56, seed=1)[0][0])
    with pytest.raises(SystemExit) as exited:
        main([str(picture), "-o", str(tmp_path / "out"), "--onnx", str(models.onnx), *options])
    assert exited.value.code == EXIT_USAGE
    assert options[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _not_onnx(models: Models, folder: Path) -> Path:
    return models.checkpoint


def _channels_last(models: Models, folder: Path) -> Path:
    import onnx

    helper = onnx.helper
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", "height", "width", 3])
    output = helper.make_tensor_value_info("pred", onnx.TensorProto.FLOAT, ["batch", "height", "width", 1])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["pred"])], "nhwc", [image], [output])
    path = folder / "nhwc.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def _int8_without_calibration(models: Models, folder: Path) -> Path:
    path = folder / "int8_no_calibration.onnx"
    shutil.copy(models.int8, path)
    record = read_metadata(path)
    del record["calibration"]
    write_metadata(path, record)
    return path


def _without_record(models: Models, folder: Path) -> Path:
    import onnx

    model = onnx.load(str(models.onnx))
    del model.metadata_props[:]
    path = folder / "bare.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "make, options, expected",
    [
        (_not_onnx, [], r"model\.pt: not an ONNX model .*Expected a \.onnx file"),
        (_channels_last, [], r"nhwc\.onnx: input 'image' is FLOAT .*expected one float32 input \[batch, 3, height"),
        (_int8_without_calibration, [], r"int8_no_calibration\.onnx: an INT8 model without its calibration record"),
        (_without_record, [], r"bare\.onnx: no model record"),
        (lambda models, folder: models.onnx, ["--spatial-size", "128"], r"spatial_size: \[64, 64\] .*against 128"),
    ],
    ids=["not_onnx", "channels_last", "int8_without_calibration", "no_record", "contradicting_size"],
)
def test_a_file_that_is_not_the_expected_onnx_model_stops_the_command_naming_it(
    models, tmp_path, capsys, make, options, expected
):
    import re

    model = make(models, tmp_path)
    picture = write_png(tmp_path / "frame.png", blob_pictures(1, 40, 56, seed=1)[0][0])
    rc = main([str(picture), "-o", str(tmp_path / "out"), "--no-progress", "--onnx", str(model), *options])
    assert rc == EXIT_USAGE
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(expected, errors[0]), errors
    assert str(model) in errors[0], "the error names the file"
    assert not (tmp_path / "out").exists(), "nothing is written when the model is refused"


def test_onnx_runner_settings_are_the_record_and_a_threshold_may_differ(models):
    runner = OnnxRunner(models.onnx, threads=1, flags={"threshold": 0.3, "backbone": "efficientnet-lite0"})
    assert runner.settings == {"spatial_size": [64, 64], "normalization": "lite", "threshold": 0.3}
    assert runner.backbone == "efficientnet-lite0" and runner.precision == "float32"
    assert OnnxRunner(models.int8, threads=1).precision == "int8"


def test_bundle_inference_runs_the_onnx_model_with_one_override(models, tmp_path):
    from monai.bundle import run

    from monai_ecrm.bundle import bundle_path

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index, picture in enumerate(blob_pictures(3, 80, 96, seed=400)[0]):
        write_png(pictures / f"case{index}.png", picture)
    bundle_root = tmp_path / "bundle_root"
    (bundle_root / "models").mkdir(parents=True)
    shutil.copy(models.onnx, bundle_root / "models" / "model.onnx")
    config = str(bundle_path() / "configs" / "inference.json")
    common = dict(
        bundle_root=str(bundle_root),
        dataset_dir=str(pictures),
        num_workers=0,
        device="$torch.device('cpu')",
        spatial_size=TRAIN_SIZE,
    )
    run(config_file=config, output_dir=str(tmp_path / "pytorch"), ckpt_path=str(models.checkpoint), **OVERRIDES,
        **common)  # fmt: skip
    # a path below the bundle root, as for model.pt; the ONNX network needs no architecture: the backbone only names
    # the normalisation of the preprocessing
    onnx_common = {**common, "onnx_path": "models/model.onnx", "backbone": "efficientnet-lite0"}
    run(config_file=config, output_dir=str(tmp_path / "onnx"), **onnx_common)
    torch_masks, onnx_masks = read_masks(tmp_path / "pytorch"), read_masks(tmp_path / "onnx")
    assert sorted(onnx_masks) == sorted(torch_masks) and len(torch_masks) == 3
    for name, mask in torch_masks.items():
        assert 0.02 < mask.mean() < 0.98, f"{name}: the comparison needs a mask with both classes"
        assert float((onnx_masks[name] != mask).mean()) <= 0.001, name

    # the config is checked against the file's record as against a model.pt's: one line, no traceback
    with pytest.raises(SystemExit) as exited:
        run(config_file=config, output_dir=str(tmp_path / "bad"), **{**onnx_common, "spatial_size": 352})
    assert str(exited.value).startswith("error: spatial_size: [64, 64]") and "352" in str(exited.value)
