"""ONNX export with the memory inside, the model record in the file, INT8, and the refusals (monai_ecrm.onnx)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'monai-ecrm[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'monai-ecrm[onnx]')")

from conftest_data import real_data  # noqa: E402

from monai_ecrm.networks.nets import ECRMUNet  # noqa: E402
from monai_ecrm.onnx import (  # noqa: E402
    EXPORT_CONVERTER_KWARGS,
    METADATA_KEY,
    OnnxModelError,
    attention_nodes,
    export_network,
    is_quantized,
    load_onnx_session,
    main,
    make_record,
    quantize_int8,
    read_metadata,
    write_metadata,
)
from monai_ecrm.record import resolve_network_kwargs  # noqa: E402
from monai_ecrm.transforms import NORMALIZATIONS, infer_transforms  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "polyp_ecrm"
ARGS_FILE = BUNDLE / "configs" / "onnx_export.json"
#: a small network: EfficientNet-Lite0 encoder, ECRMUNet's default ECRM (the 1/16 map, as wide as it; memory written
#: from the label; the attention supervised, computed explicitly), narrow attention and decoder
KWARGS = {
    "backbone": "efficientnet-lite0",
    "bank_size": 4,
    "key_channels": 64,
    "decoder_channels": [64, 32, 16, 16, 8],
}
#: the same network as config overrides of the bundle's inference.json (MONAI's `--id value` arguments)
OVERRIDES = {
    "backbone": "efficientnet-lite0",
    "bank_size": 4,
    "network_def#key_channels": 64,
    "network_def#decoder_channels": [64, 32, 16, 16, 8],
}
TRAIN_SIZE = 64


def blob_pictures(count: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB pictures ``[N, H, W, 3]`` of a bright disc on a reddish textured background, and the disc masks."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    pictures = np.empty((count, height, width, 3), np.uint8)
    masks = np.empty((count, height, width), bool)
    for index in range(count):
        centre = rng.uniform(0.3, 0.7, 2) * (height, width)
        radius = rng.uniform(0.12, 0.3) * min(height, width)
        disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2
        picture = rng.normal(0.45, 0.06, (height, width, 3)) * np.array([1.0, 0.55, 0.45])
        picture[disc] += 0.3
        pictures[index] = (picture.clip(0, 1) * 255).astype(np.uint8)
        masks[index] = disc
    return pictures, masks


def normalised(pictures: np.ndarray) -> np.ndarray:
    """Pictures as the network input: [0, 1], the "lite" mean/std, ``[N, 3, H, W]`` float32."""
    mean, std = (np.asarray(values, np.float32) for values in NORMALIZATIONS["lite"])
    return np.ascontiguousarray(((pictures / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))


def relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(reference - other).max() / (reference.max() - reference.min()))


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return float(2 * (first & second).sum() / max(first.sum() + second.sum(), 1))


@pytest.fixture(scope="module")
def trained() -> ECRMUNet:
    """A small network trained briefly on discs: confident masks, a filled memory (training writes it).

    BatchNorm stays in eval mode while training, so the eval output is what training optimised."""
    torch.manual_seed(0)
    net = ECRMUNet(**KWARGS).train()
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(25):
        pictures, masks = blob_pictures(8, TRAIN_SIZE, TRAIN_SIZE, seed=step)
        target = torch.from_numpy(masks[:, None].astype(np.float32))
        logits = net(torch.from_numpy(normalised(pictures)), labels=target)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(5.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    assert int(net.ecrm.memory.filled) == net.ecrm.memory.num_slots
    return net


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The trained network exported from a 352 px sample (a multiple of 32: no padding needed at that size)."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_network(trained, path, make_record(KWARGS, TRAIN_SIZE, "lite"), sample_shape=(1, 3, 352, 352))


@pytest.fixture(scope="module")
def session(exported):
    return load_onnx_session(exported, threads=1)[0]


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("calibration")
    for index, picture in enumerate(blob_pictures(10, TRAIN_SIZE, TRAIN_SIZE, seed=100)[0]):
        Image.fromarray(picture).save(folder / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def int8_model(exported, calibration_folder) -> Path:
    out = exported.with_name("model.int8.onnx")
    quantize_int8(exported, out, calibration_folder, num_images=8)
    return out


def test_args_file_holds_the_export_options():
    arguments = json.loads(ARGS_FILE.read_text())
    assert arguments["use_trace"] is True and arguments["net_id"] == "network_def"
    assert arguments["converter_kwargs"] == EXPORT_CONVERTER_KWARGS, "export_network and the bundle must agree"


def test_exported_model_passes_the_checker_and_holds_the_filled_memory(exported, trained):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    memory = trained.ecrm.memory.filled_memory().reshape(-1, trained.ecrm.feat_channels).numpy()
    initializers = [onnx.numpy_helper.to_array(init) for init in model.graph.initializer]
    assert any(array.shape == memory.shape and np.array_equal(array, memory) for array in initializers), (
        "the ECRM memory must travel inside the ONNX file as an initializer"
    )
    assert attention_nodes(model), "the memory attention must be in the graph"
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert [dim.HasField("dim_param") for dim in dims] == [True, False, True, True], "batch, H, W dynamic"


@pytest.mark.parametrize("batch, height, width", [(2, 352, 352), (1, 500, 574), (1, 97, 130)])
def test_onnx_runtime_equals_pytorch_at_any_batch_and_size(session, trained, batch, height, width):
    image = normalised(blob_pictures(batch, height, width, seed=height)[0])
    with torch.no_grad():
        reference = trained(torch.from_numpy(image)).numpy()
    output = session.run(None, {"image": image})[0]
    assert output.shape == (batch, 1, height, width)
    assert relative_difference(reference, output) <= 1e-4


@pytest.mark.parametrize("size", [(352, 352), (500, 574)])
def test_onnx_runtime_equals_pytorch_on_kvasir_frames(session, trained, size):
    folder = real_data("kvasir_seg") / "images"
    preprocessing = infer_transforms(spatial_size=size, normalization="lite")
    files = sorted(folder.glob("*.jpg"))[:2]
    image = np.stack([np.asarray(preprocessing({"image": str(path)})["image"]) for path in files])
    with torch.no_grad():
        reference = trained(torch.from_numpy(image)).numpy()
    assert relative_difference(reference, session.run(None, {"image": image})[0]) <= 1e-4


def test_metadata_round_trip_replaces_the_record_and_keeps_other_entries(exported, tmp_path):
    path = tmp_path / "copy.onnx"
    path.write_bytes(exported.read_bytes())
    model = onnx.load(str(path))
    model.metadata_props.add(key="other", value="kept")
    onnx.save(model, str(path))
    record = read_metadata(path)
    assert record["schema_version"] == 1 and record["precision"] == "float32"
    assert record["network"]["kwargs"] == resolve_network_kwargs(KWARGS), "every argument stated, none to guess"
    assert record["preprocessing"]["mean"] == list(NORMALIZATIONS["lite"][0])
    assert record["memory"] == {"slots": 4, "filled": 4, "sources": None}
    record["memory"]["sources"] = ["case_a", "case_b"]
    write_metadata(path, record)
    assert read_metadata(path) == record
    props = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert props["other"] == "kept" and json.loads(props[METADATA_KEY]) == record


def test_int8_masks_agree_with_float32_and_the_calibration_is_recorded(int8_model, exported):
    record = read_metadata(int8_model)
    calibration = record["calibration"]
    assert record["precision"] == "int8" and calibration["num_images"] == 8
    assert len(calibration["paths_sha256"]) == 64 and calibration["format"] == "QDQ" and calibration["per_channel"]
    assert {"/ecrm/MatMul", "/ecrm/Softmax", "/ecrm/MatMul_1"} <= set(calibration["float_nodes"])
    assert is_quantized(onnx.load(str(int8_model)))
    float_session, _ = load_onnx_session(exported, threads=1)
    int8_session, int8_record = load_onnx_session(int8_model, threads=1)
    assert int8_record == record
    image = normalised(blob_pictures(6, TRAIN_SIZE, TRAIN_SIZE, seed=500)[0])
    float_mask = float_session.run(None, {"image": image})[0] > 0
    int8_mask = int8_session.run(None, {"image": image})[0] > 0
    assert float_mask.mean() > 0.05, "the test network must predict masks for the comparison to mean anything"
    assert dice(float_mask, int8_mask) >= 0.9


def test_monai_bundle_onnx_export_command_then_record(trained, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(trained.state_dict(), ckpt)
    out = tmp_path / "model.onnx"
    configs = BUNDLE / "configs"
    common = ["--ckpt_file", str(ckpt), "--meta_file", str(configs / "metadata.json")]
    common += ["--config_file", str(configs / "inference.json")]
    overrides = [str(item) for key, value in OVERRIDES.items() for item in (f"--{key}", json.dumps(value))]
    command = [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", str(out)]
    command += common + ["--bundle_root", str(BUNDLE), "--args_file", str(ARGS_FILE)] + overrides
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metadata(out) == {}, "MONAI's command writes no record"
    main(["record", "--model", str(out), *common, *overrides])
    session, record = load_onnx_session(out, threads=1)
    assert record["network"]["kwargs"]["backbone"] == "efficientnet-lite0"
    assert record["preprocessing"]["spatial_size"] == [256, 256] and record["threshold"] == 0.5
    assert record["memory"]["filled"] == 4 and record["source"]["checkpoint"] == "model.pt"
    image = normalised(blob_pictures(1, 500, 574, seed=7)[0])
    with torch.no_grad():
        reference = trained(torch.from_numpy(image)).numpy()
    assert relative_difference(reference, session.run(None, {"image": image})[0]) <= 1e-4


def test_export_command_writes_model_and_record_in_one_step(trained, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(trained.state_dict(), ckpt)
    out = tmp_path / "model.onnx"
    configs = BUNDLE / "configs"
    overrides = [str(item) for key, value in OVERRIDES.items() for item in (f"--{key}", json.dumps(value))]
    main(
        ["export", "--filepath", str(out), "--ckpt_file", str(ckpt), "--config_file", str(configs / "inference.json")]
        + ["--meta_file", str(configs / "metadata.json"), "--args_file", str(ARGS_FILE)]
        + overrides
    )
    record = read_metadata(out)
    assert record["source"]["opset"] == 18 and record["network"]["kwargs"]["key_channels"] == 64
    onnx.checker.check_model(onnx.load(str(out)))


def test_a_file_that_is_not_onnx_is_refused_naming_it(tmp_path, calibration_folder):
    checkpoint = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, checkpoint)
    with pytest.raises(OnnxModelError, match=r"model\.pt: not an ONNX model"):
        load_onnx_session(checkpoint)
    with pytest.raises(OnnxModelError, match=r"model\.pt: not an ONNX model"):
        quantize_int8(checkpoint, tmp_path / "out.onnx", calibration_folder, num_images=2)
    with pytest.raises(OnnxModelError, match="no such file"):
        read_metadata(tmp_path / "missing.onnx")


def test_an_onnx_model_with_another_input_layout_is_refused(tmp_path):
    helper = onnx.helper
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", "height", "width", 3])
    output = helper.make_tensor_value_info("pred", onnx.TensorProto.FLOAT, ["batch", "height", "width", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["pred"])], "nhwc", [image], [output])
    path = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxModelError, match=r"nhwc\.onnx: input 'image' is FLOAT \['\?', '\?', '\?', 3\]; expected"):
        load_onnx_session(path)


def test_int8_without_calibration_record_and_float_without_record_are_refused(int8_model, exported, tmp_path):
    stripped = tmp_path / "int8_no_calibration.onnx"
    stripped.write_bytes(int8_model.read_bytes())
    record = read_metadata(stripped)
    del record["calibration"]
    write_metadata(stripped, record)
    with pytest.raises(OnnxModelError, match=r"int8_no_calibration\.onnx: an INT8 model without its calibration"):
        load_onnx_session(stripped)
    bare = tmp_path / "bare.onnx"
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    with pytest.raises(OnnxModelError, match=r"bare\.onnx: no model record"):
        load_onnx_session(bare)
    assert load_onnx_session(bare, require_record=False)[1] == {}


def test_quantize_refuses_more_calibration_images_than_the_datalist_holds(exported, calibration_folder, tmp_path):
    with pytest.raises(ValueError, match="50 images asked for"):
        quantize_int8(exported, tmp_path / "out.onnx", calibration_folder, num_images=50)
