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
