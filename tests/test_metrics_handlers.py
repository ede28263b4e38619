"""The polyp metric handlers report, in a MONAI evaluator, the mean of the per-image suite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanAbsoluteError, from_engine
from monai.transforms import Activationsd

from monai_ecrm.handlers.polyp_metric_handlers import EMeasure, PolypOverlap, SMeasure, WeightedFMeasure
from monai_ecrm.metrics import compute_e_measure_curve, polyp_metric_suite


def ellipse_items(sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Items whose "image" is the logit map of a shifted ellipse and whose "label" is the ellipse."""
    items = []
    for index, (height, width) in enumerate(sizes):
        rows, cols = np.mgrid[:height, :width]
        centre_r, centre_c = height * 0.5, width * (0.4 + 0.05 * index)
        radius = ((rows - centre_r) / (height / 4)) ** 2 + ((cols - centre_c) / (width / 3)) ** 2
        label = (radius <= 1).astype(np.float32)
        logits = 4 * (1.2 - ((rows - centre_r - 2) / (height / 4)) ** 2 - ((cols - centre_c) / (width / 3.5)) ** 2)
        items.append(
            {"image": torch.from_numpy(logits.astype(np.float32))[None], "label": torch.from_numpy(label)[None]}
        )
    return items


def run_evaluator(items, handlers_or_metrics, val_handlers=None):
    loader = DataLoader(Dataset(items), batch_size=1, num_workers=0)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        postprocessing=Activationsd(keys="pred", sigmoid=True),
        key_val_metric={"val_dice": handlers_or_metrics.pop("val_dice")},
        additional_metrics=handlers_or_metrics,
        val_handlers=val_handlers,
    )
    evaluator.run()
    return evaluator


def test_handlers_report_the_mean_of_the_per_image_suite_over_images_of_different_sizes():
    items = ellipse_items([(40, 52), (48, 48), (36, 60)])
    transform = from_engine(["pred", "label"])
    handlers = {
        "val_dice": PolypOverlap("dice", output_transform=transform),
        "val_iou": PolypOverlap("iou", output_transform=transform),
        "val_recall": PolypOverlap("recall", output_transform=transform),
        "val_s": SMeasure(output_transform=transform),
        "val_e_mean": EMeasure("mean", output_transform=transform),
        "val_e_adaptive": EMeasure("adaptive", output_transform=transform),
        "val_e_max": EMeasure("max", output_transform=transform),
        "val_wf": WeightedFMeasure(output_transform=transform),
        "val_mae": MeanAbsoluteError(output_transform=transform),
    }
    evaluator = run_evaluator(items, handlers)
    suites = [polyp_metric_suite(torch.sigmoid(item["image"])[None], item["label"][None]) for item in items]
    expected = {
        "val_dice": "dice",
        "val_iou": "iou",
        "val_recall": "recall",
        "val_s": "s_measure",
        "val_e_mean": "e_measure_mean",
        "val_e_adaptive": "e_measure_adaptive",
        "val_wf": "weighted_f_measure",
        "val_mae": "mae",
    }
    for handler_name, key in expected.items():
        mean = float(np.mean([float(suite[key][0]) for suite in suites]))
        assert evaluator.state.metrics[handler_name] == pytest.approx(mean, abs=1e-6), handler_name
        assert len(evaluator.state.metric_details[handler_name]) == len(items), "per-image scores are kept"
    curves = [compute_e_measure_curve(torch.sigmoid(item["image"])[None], item["label"][None]) for item in items]
    max_of_mean_curve = float(torch.cat(curves).mean(0).max())
    assert evaluator.state.metrics["val_e_max"] == pytest.approx(max_of_mean_curve), "the papers' dataset max E-phi"
    assert evaluator.state.best_metric == pytest.approx(evaluator.state.metrics["val_dice"])


def test_handlers_min_max_normalize_the_maps_only_when_asked():
    items = ellipse_items([(40, 52), (36, 60)])
    for item in items:  # sigmoid maps in about [0.27, 0.62]: not spanning [0, 1]
        item["image"] = item["image"].clamp(-4, 4) / 8 - 0.25
    transform = from_engine(["pred", "label"])
    # handler name: (handler, suite key, normalize)
    cases = {
        "val_dice": (PolypOverlap("dice", output_transform=transform, normalize="minmax"), "dice", "minmax"),
        "val_s": (SMeasure(output_transform=transform, normalize="minmax"), "s_measure", "minmax"),
        "val_e": (EMeasure("adaptive", output_transform=transform, normalize="minmax"), "e_measure_adaptive", "minmax"),
        "val_wf": (WeightedFMeasure(output_transform=transform, normalize="minmax"), "weighted_f_measure", "minmax"),
        "val_s_as_given": (SMeasure(output_transform=transform), "s_measure", None),
    }
    evaluator = run_evaluator(items, {name: case[0] for name, case in cases.items()})
    maps = [(torch.sigmoid(item["image"])[None], item["label"][None]) for item in items]
    for name, (_, key, normalize) in cases.items():
        mean = float(np.mean([float(polyp_metric_suite(*pair, normalize=normalize)[key][0]) for pair in maps]))
        assert evaluator.state.metrics[name] == pytest.approx(mean, abs=1e-6), name
    assert evaluator.state.metrics["val_dice"] > 0.5, "the stretched maps cross the 0.5 threshold on the polyps"
    assert abs(evaluator.state.metrics["val_s"] - evaluator.state.metrics["val_s_as_given"]) > 1e-3
