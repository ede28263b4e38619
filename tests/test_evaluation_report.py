"""EvaluationReport writes the per-image scores, the per-dataset table and worst-case overlays of an evaluator."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Activationsd
from PIL import Image

from monai_ecrm.handlers.evaluation_report import GT_COLOUR, PRED_COLOUR, EvaluationReport, render_overlay
from monai_ecrm.metrics import compute_e_measure_curve, polyp_metric_suite


def make_items() -> list[dict]:
    """Five images of different sizes in two datasets; "image" holds logits whose quality varies with the shift."""
    items = []
    for index, (height, width, shift, dataset) in enumerate(
        [(40, 52, 0, "A"), (48, 48, 12, "A"), (36, 60, 4, "A"), (44, 44, 8, "B"), (50, 40, 1, "B")]
    ):
        rows, cols = np.mgrid[:height, :width]
        inside = ((rows - height / 2) / (height / 4)) ** 2 + ((cols - width / 2) / (width / 4)) ** 2
        logits = 3 * (1 - ((rows - height / 2) / (height / 4)) ** 2 - ((cols - width / 2 - shift) / (width / 4)) ** 2)
        meta = {"filename_or_obj": f"/data/{dataset}/images/case{index}.png"}
        items.append(
            {
                "image": MetaTensor(torch.from_numpy(logits.astype(np.float32))[None], meta=meta),
                "label": torch.from_numpy((inside <= 1).astype(np.float32))[None],
                "dataset": dataset,
            }
        )
    return items


def evaluate(items, report):
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items), batch_size=1, num_workers=0),
        network=torch.nn.Identity(),
        postprocessing=Activationsd(keys="pred", sigmoid=True),
        val_handlers=[report],
    )
    evaluator.run()
    return evaluator


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_report_writes_per_image_scores_and_one_table_row_per_dataset(tmp_path):
    items = make_items()
    report = EvaluationReport(tmp_path, worst_k=2)
    evaluate(items, report)
    rows = read_csv(tmp_path / "per_image.csv")
    assert [row["filename"] for row in rows] == [item["image"].meta["filename_or_obj"] for item in items]
    assert [row["dataset"] for row in rows] == ["A", "A", "A", "B", "B"]
    for row, item in zip(rows, items):
        expected = polyp_metric_suite(torch.sigmoid(item["image"].as_tensor())[None], item["label"][None])
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(float(value[0]), abs=1e-9), name
        assert (int(row["height"]), int(row["width"])) == tuple(item["label"].shape[1:])
    summary = read_csv(tmp_path / "summary.csv")
    assert [(row["dataset"], row["images"]) for row in summary] == [("A", "3"), ("B", "2"), ("overall", "5")]
    mean_dice_a = np.mean([float(row["dice"]) for row in rows[:3]])
    assert float(summary[0]["dice"]) == pytest.approx(mean_dice_a)
    curves = [
        compute_e_measure_curve(torch.sigmoid(item["image"].as_tensor())[None], item["label"][None])
        for item in items[:3]
    ]
    max_of_mean_curve = float(torch.cat(curves).mean(0).max())
    assert float(summary[0]["e_measure_max"]) == pytest.approx(max_of_mean_curve), "the papers' dataset max E-phi"
    assert "mDice" in (tmp_path / "summary.md").read_text()


def test_overlays_show_the_worst_cases_of_each_dataset_by_dice(tmp_path):
    report = EvaluationReport(tmp_path, worst_k=2)
    evaluate(make_items(), report)
    rows = read_csv(tmp_path / "per_image.csv")
    for dataset in ("A", "B"):
        ranked = sorted((row for row in rows if row["dataset"] == dataset), key=lambda row: float(row["dice"]))
        written = sorted(path.name for path in (tmp_path / "overlays" / dataset).iterdir())
        stems = [row["filename"].split("/")[-1][: -len(".png")] for row in ranked[:2]]
        expected = [
            f"{place:02d}_dice{float(row['dice']):.3f}_{stem}.png"
            for place, (row, stem) in enumerate(zip(ranked, stems), 1)
        ]
        assert written == expected, f"dataset {dataset}: the two lowest Dice, worst first"
    worst = np.asarray(Image.open(tmp_path / "overlays" / "B" / written[0]))
    colours = {tuple(pixel) for pixel in worst.reshape(-1, 3)}
    assert GT_COLOUR in colours and PRED_COLOUR in colours, "both contours are drawn"


def test_a_second_evaluation_replaces_the_first_report(tmp_path):
    items = make_items()
    report = EvaluationReport(tmp_path, worst_k=1)
    evaluator = evaluate(items, report)
    first = [path.name for path in (tmp_path / "overlays" / "A").iterdir()]
    items[1]["label"] = items[1]["label"] * 0 + 1  # a different worst case in dataset A
    evaluator.data_loader = DataLoader(Dataset(items), batch_size=1, num_workers=0)
    evaluator.run()
    assert len(read_csv(tmp_path / "per_image.csv")) == len(items), "rows of the first run are not repeated"
    second = [path.name for path in (tmp_path / "overlays" / "A").iterdir()]
    assert len(second) == 1 and second != first, "the stale overlay of the first run is removed"


def test_overlay_draws_contours_where_the_masks_end_in_either_layout():
    label = torch.zeros(1, 30, 40)
    label[:, 5:15, 10:30] = 1
    pred = torch.zeros(1, 30, 40)
    pred[:, 18:25, 2:8] = 0.9
    image = torch.rand(3, 15, 20)  # any size: resized to the prediction's
    picture = render_overlay(image, pred, label, contour_width=1)
    assert picture.shape == (30, 40, 3)
    assert tuple(picture[5, 20]) == GT_COLOUR and tuple(picture[10, 10]) == GT_COLOUR, "the mask's border rows/cols"
    assert tuple(picture[10, 20]) not in (GT_COLOUR, PRED_COLOUR), "the inside is the image"
    assert tuple(picture[18, 5]) == PRED_COLOUR and tuple(picture[21, 2]) == PRED_COLOUR
    # an inverted prediction in MONAI's (W, H) layout over the network input in rows-first layout: drawn upright
    transposed = render_overlay(image, pred.transpose(1, 2), label.transpose(1, 2), 0.5, "WH", 1, image_layout="HW")
    assert np.array_equal(transposed, picture), "MONAI's (W, H) layout is drawn upright"
    both_transposed = render_overlay(image.transpose(1, 2), pred.transpose(1, 2), label.transpose(1, 2), 0.5, "WH", 1)
    assert np.array_equal(both_transposed, picture)
    assert render_overlay(None, pred, label, caption="Dice 0.000").shape == (30 + 14, 40, 3)


def test_ties_among_the_worst_give_as_many_overlays_as_asked_named_after_the_dataset_folder(tmp_path):
    """Most of the worst cases share Dice 0 (nothing predicted): the overlays written are the first ones seen, and
    the dataset, given by no item, is named after the folder above the images."""
    rows, cols = np.mgrid[:24, :32]
    label = torch.from_numpy(((rows - 12) ** 2 + (cols - 16) ** 2 <= 49).astype(np.float32))[None]
    items = []
    for index in range(15):
        good = index % 3 == 1  # interleaved good predictions; the others miss the polyp, Dice 0
        logits = 10 * (2 * label - 1) if good else torch.full_like(label, -10.0)
        meta = {"filename_or_obj": f"/data/Kvasir-SEG/images/case{index:02d}.png"}
        items.append({"image": MetaTensor(logits, meta=meta), "label": label})
    evaluate(items, EvaluationReport(tmp_path, worst_k=4))
    per_image = read_csv(tmp_path / "per_image.csv")
    assert {row["dataset"] for row in per_image} == {"Kvasir-SEG"}, "named after the dataset folder"
    zero = [row for row in per_image if float(row["dice"]) == 0.0]
    assert len(zero) == 10
    written = sorted(path.name for path in (tmp_path / "overlays" / "Kvasir-SEG").iterdir())
    expected = [f"{place:02d}_dice0.000_{Path(row['filename']).stem}.png" for place, row in enumerate(zero[:4], 1)]
    assert written == expected, "worst_k overlays of the worst cases, ties in the order of per_image.csv"


def test_report_min_max_normalizes_the_maps_when_asked(tmp_path):
    items = make_items()[:2]
    for item in items:  # sigmoid maps in about [0.3, 0.6]: not spanning [0, 1]
        item["image"] = item["image"].clamp(-3, 3) / 6 - 0.4
    evaluate(items, EvaluationReport(tmp_path, worst_k=1, normalize="minmax"))
    for row, item in zip(read_csv(tmp_path / "per_image.csv"), items):
        pred = torch.sigmoid(item["image"].as_tensor())[None]
        expected = polyp_metric_suite(pred, item["label"][None], normalize="minmax")
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(float(value[0]), abs=1e-9), name
        as_given = polyp_metric_suite(pred, item["label"][None])
        assert abs(float(row["s_measure"]) - float(as_given["s_measure"][0])) > 1e-3, "the maps are stretched"
