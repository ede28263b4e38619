"""Post-processing and metrics run on one device whatever the network's: the bundle's configs on a second device.

On a GPU the network's output is on the GPU while the batch keys a MONAI engine does not move (the full-size mask
``label_full`` of ``evaluate.json``) stay on the CPU, and MONAI's MAE failed with ``Expected all tensors to be on the
same device``. These tests run the configs' own post-processing, metrics and report (``ConfigParser`` over the bundle's
JSON files) in a ``SupervisedEvaluator`` whose device and network are on a second device, and check that what reaches
the metrics, the report and the writers is on :data:`~monai_ecrm.transforms.presets.POSTPROCESSING_DEVICE` (the
CPU) and scores and writes exactly what a CPU-only run does.

The second device is PyTorch's ``lazy`` device (the TorchScript lazy-tensor backend shipped with every PyTorch
build, computing on the CPU): a real device type with storage, where an op mixing it with a CPU tensor raises, as
CUDA does, so the tests run on CPU-only machines. ``cuda`` is tested too where there is a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.metrics import MAEMetric
from PIL import Image

from monai_ecrm.bundle import inference_datalist, training_datalist
from monai_ecrm.data import make_demo_dataset
from monai_ecrm.transforms.presets import POSTPROCESSING_DEVICE

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "polyp_ecrm"
CONFIGS = BUNDLE / "configs"
SIZE = 32  # network input size; the demo pictures are 48 px, so the post-processing resizes the maps back up


def _lazy_device() -> torch.device | None:
    try:
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
        probe = torch.ones(2, device="lazy")
        if float((probe * 2).sum().cpu()) != 4.0:
            return None
    except Exception:  # noqa: BLE001 - a build without the lazy backend: the test is skipped, saying so
        return None
    return torch.device("lazy")


@pytest.fixture(scope="module", params=["lazy", "cuda"])
def other_device(request) -> torch.device:
    """A device other than the CPU, the post-processing's."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return torch.device("cuda")
    device = _lazy_device()
    if device is None:
        pytest.skip("this PyTorch build has no lazy (TorchScript) backend to stand for a second device")
    return device


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", num_images=3, size=48)


def _parser(configs: Sequence[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    for key, value in {"spatial_size": SIZE, "num_workers": 0, **overrides}.items():
        parser[key] = value
    return parser


def _network(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    return network.to(device)


class DevicesSeen:
    """Records, after the post-processing (``MODEL_COMPLETED``, before the metrics of ``ITERATION_COMPLETED``), the
    device of ``keys`` in every output item, and fails at once when they are not all on the post-processing's device
    (so a mixed pair is reported as such rather than as whatever a metric makes of it)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.seen: list[dict[str, str]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine) -> None:
        for item in engine.state.output:
            devices = {key: str(item[key].device) for key in self.keys}
            self.seen.append(devices)
            assert set(devices.values()) == {str(POSTPROCESSING_DEVICE)}, (
                f"what the metrics read must be on one device, the post-processing's ({POSTPROCESSING_DEVICE}); "
                f"the network ran on {engine.device} and the post-processed item has {devices}"
            )


def _evaluate(parser, items, device, handlers=(), metrics=True, batch_size=1, key_metric="validate#key_metric"):
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(Dataset(items, parser.get_parsed_content("validate#preprocessing")), batch_size),
        network=_network(device),
        postprocessing=parser.get_parsed_content("validate#postprocessing"),
        key_val_metric=parser.get_parsed_content(key_metric) if metrics else None,
        additional_metrics=parser.get_parsed_content("validate#additional_metrics") if metrics == "all" else None,
        val_handlers=list(handlers),
        amp=False,
    )
    evaluator.run()
    return evaluator


def _report_handler(parser: ConfigParser):
    """``evaluate.json``'s ``EvaluationReport``, found by its target (the handler list's order is not this test's)."""
    for index, handler in enumerate(parser["validate#handlers"]):
        if str(handler.get("_target_", "")).endswith("EvaluationReport"):
            return parser.get_parsed_content(f"validate#handlers#{index}")
    raise AssertionError("evaluate.json has no EvaluationReport handler")


def test_evaluate_postprocessing_puts_pred_and_gt_on_one_device(demo, other_device):
    """The issue's failure in one item: ``pred`` on the network's device, ``label_full`` as loaded (CPU)."""
    parser = _parser(["train.json", "evaluate.json"], bundle_root=str(demo.parent))
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    item = training_datalist(demo, val_fraction=0.0)["training"][0]
    logits = torch.linspace(-4.0, 4.0, SIZE * SIZE).reshape(1, SIZE, SIZE)

    sample = preprocessing(dict(item))
    reference = postprocessing({**sample, "pred": logits.clone()})
    # as SupervisedEvaluator leaves it: image (and the resized label) moved to its device, the output there too
    sample = {**sample, "image": sample["image"].to(other_device), "label": sample["label"].to(other_device)}
    out = postprocessing({**sample, "pred": logits.to(other_device)})

    assert out["pred"].device == out["gt"].device == out["image"].device == POSTPROCESSING_DEVICE
    assert out["pred"].shape == out["gt"].shape == (1, 48, 48)  # at the original size
    assert torch.allclose(out["pred"], reference["pred"], atol=1e-6) and torch.equal(out["gt"], reference["gt"])
    mae = MAEMetric()(out["pred"][None], out["gt"][None])  # what evaluate.json's MeanAbsoluteError computes
    assert torch.allclose(mae, MAEMetric()(reference["pred"][None], reference["gt"][None]))


def test_evaluate_config_with_the_network_on_another_device(demo, other_device, tmp_path):
    """``evaluate.json``'s post-processing, every metric (MAE included) and its report, the network on another device:
    the same scores and report rows as a CPU-only run."""
    items = training_datalist(demo, val_fraction=0.0)["training"]
    runs = {}
    for name, device in (("cpu", torch.device("cpu")), ("other", other_device)):
        parser = _parser(["train.json", "evaluate.json"], bundle_root=str(tmp_path / name), explain_pictures=None)
        report, seen = _report_handler(parser), DevicesSeen(["pred", "gt", "image"])
        evaluator = _evaluate(parser, items, device, handlers=[seen, report], metrics="all")
        runs[name] = (evaluator.state.metrics, report.rows, seen.seen)

    (cpu_metrics, cpu_rows, _), (metrics, rows, seen) = runs["cpu"], runs["other"]
    assert len(seen) == len(items)
    assert set(metrics) == set(cpu_metrics) >= {"mean_dice", "iou", "s_measure", "weighted_f_measure", "mae"}
    for name, value in metrics.items():
        assert math.isfinite(value) and value == pytest.approx(cpu_metrics[name], abs=1e-5), name
    assert [row["filename"] for row in rows] == [row["filename"] for row in cpu_rows]
    for row, cpu_row in zip(rows, cpu_rows):
        assert row["dice"] == pytest.approx(cpu_row["dice"], abs=1e-5)
    assert (tmp_path / "other" / "eval" / "report").is_dir()


def test_training_validation_with_the_network_on_another_device(demo, other_device):
    """``train.json``'s validation (the training-size ``eval_postprocessing`` and its Dice), batches of several
    images: the metric reads CPU tensors and gives the CPU-only run's score."""
    items = training_datalist(demo, val_fraction=0.0)["training"]
    scores = {}
    for name, device in (("cpu", torch.device("cpu")), ("other", other_device)):
        parser = _parser(["train.json"])
        seen = DevicesSeen(["pred", "label"])
        evaluator = _evaluate(parser, items, device, handlers=[seen], batch_size=2)
        assert len(seen.seen) == len(items)
        scores[name] = evaluator.state.metrics["val_mean_dice"]
    assert scores["other"] == pytest.approx(scores["cpu"], abs=1e-6)


def test_inference_config_with_the_network_on_another_device(demo, other_device, tmp_path):
    """``inference.json``'s post-processing (sigmoid, ``Invertd``, threshold, the writer): the prediction is on the
    CPU when written, and the masks equal those of a CPU-only run."""
    items = inference_datalist(demo / "images")
    masks = {}
    for name, device in (("cpu", torch.device("cpu")), ("other", other_device)):
        parser = _parser(["inference.json"], bundle_root=str(BUNDLE), output_dir=str(tmp_path / name))
        seen = DevicesSeen(["pred"])
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=DataLoader(Dataset(items, parser.get_parsed_content("preprocessing")), batch_size=1),
            network=_network(device),
            postprocessing=parser.get_parsed_content("postprocessing"),
            val_handlers=[seen],
            amp=False,
        )
        evaluator.run()
        assert len(seen.seen) == len(items)
        written = sorted((tmp_path / name).rglob("*.png"))
        assert len(written) == len(items)
        masks[name] = {path.relative_to(tmp_path / name): np.asarray(Image.open(path)) for path in written}
    assert masks["other"].keys() == masks["cpu"].keys()
    for path, mask in masks["other"].items():
        np.testing.assert_array_equal(mask, masks["cpu"][path])
