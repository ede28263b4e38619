"""evaluate_folder scores saved prediction maps as the papers' evaluation does, and names every file it cannot score."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from monai_ecrm.metrics import SUITE_KEYS, evaluate_folder, markdown_table, summarize

psm = pytest.importorskip("py_sod_metrics", reason="pysodmetrics (test dependency) is the reference implementation")

KVASIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kvasir_seg"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three Kvasir-SEG masks (the JPEGs, copied to a temporary folder) and PNG maps saved from them."""
    if not (KVASIR / "masks").is_dir():
        pytest.skip(f"real data absent: {KVASIR} (see shared/data/SOURCES.md)")
    root = tmp_path_factory.mktemp("evaluation")
    gt_dir, pred_dir = root / "Kvasir" / "masks", root / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    files = sorted((KVASIR / "masks").glob("*.jpg"))
    for index, path in enumerate([files[0], files[2], files[3]]):  # files[1] is a large 1348x1070 mask
        (gt_dir / path.name).write_bytes(path.read_bytes())
        mask = np.asarray(Image.open(path).convert("L")) > 128
        soft = ndimage.gaussian_filter(np.roll(mask, 10 * index, axis=1).astype(np.float64), 4 + index)
        Image.fromarray((soft / soft.max() * 255).round().astype(np.uint8)).save(pred_dir / f"{path.stem}.png")
    return gt_dir, pred_dir


def test_scores_equal_pysodmetrics_on_the_same_files(folders, tmp_path):
    gt_dir, pred_dir = folders
    result = evaluate_folder(pred_dir, gt_dir, output_dir=tmp_path)
    assert [row["dataset"] for row in result["per_image"]] == ["Kvasir"] * 3, "named after the folder above masks/"
    for row in result["per_image"]:
        grey = np.asarray(Image.open(pred_dir / f"{Path(row['filename']).stem}.png"))
        gt = np.asarray(Image.open(row["filename"]).convert("L"))
        s_measure, wf_measure = psm.Smeasure(), psm.WeightedFmeasure()
        s_measure.step(grey, gt)
        wf_measure.step(grey, gt)
        assert row["s_measure"] == pytest.approx(s_measure.get_results()["sm"], abs=1e-4)
        assert row["weighted_f_measure"] == pytest.approx(wf_measure.get_results()["wfm"], abs=1e-4)
        assert (row["height"], row["width"]) == gt.shape


def test_writes_per_image_rows_and_the_papers_table(folders, tmp_path):
    gt_dir, pred_dir = folders
    result = evaluate_folder(pred_dir, gt_dir, output_dir=tmp_path, dataset="Kvasir-SEG")
    with open(tmp_path / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and set(SUITE_KEYS) <= set(rows[0])
    with open(tmp_path / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert summary[0]["dataset"] == "Kvasir-SEG" and summary[0]["images"] == "3"
    mean_dice = np.mean([float(row["dice"]) for row in rows])
    assert float(summary[0]["dice"]) == pytest.approx(mean_dice)
    table = (tmp_path / "summary.md").read_text()
    assert "mDice" in table and "S_alpha" in table and f"{mean_dice:.3f}" in table
    assert result["summary"][0]["dice"] == pytest.approx(mean_dice)


def test_missing_and_mismatched_predictions_are_all_named(folders, tmp_path):
    gt_dir, pred_dir = folders
    bad_preds = tmp_path / "pred"
    bad_preds.mkdir()
    stems = sorted(path.stem for path in gt_dir.iterdir())
    (bad_preds / f"{stems[0]}.png").write_bytes((pred_dir / f"{stems[0]}.png").read_bytes())
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad_preds / f"{stems[1]}.png")
    with pytest.raises(ValueError) as error:
        evaluate_folder(bad_preds, gt_dir)
    message = str(error.value)
    assert "2 of 3" in message and stems[1] in message and stems[2] in message, message
    with pytest.warns(UserWarning) as warned:
        result = evaluate_folder(bad_preds, gt_dir, strict=False)
    assert len(warned) == 2 and stems[1] in str(warned[0].message) + str(warned[1].message)
    assert [Path(row["filename"]).stem for row in result["per_image"]] == [stems[0]], "the good pair is still scored"
    assert len(result["errors"]) == 2


def test_summary_has_one_row_per_dataset_and_an_overall_row():
    rows = [{"dataset": name, **dict.fromkeys(SUITE_KEYS, value)} for name, value in [("A", 0.2), ("A", 0.4), ("B", 1)]]
    summary = summarize(rows)
    assert [(row["dataset"], row["images"]) for row in summary] == [("A", 2), ("B", 1), ("overall", 3)]
    assert summary[0]["dice"] == pytest.approx(0.3) and summary[2]["mae"] == pytest.approx(1.6 / 3)
    assert markdown_table(summary).count("\n") == 5, "header, rule and three rows"


def test_polyp_free_frames_are_counted_apart_with_their_false_positives(tmp_path):
    """A false positive on a frame without a polyp is invisible in the mean Dice (0 either way): the summary says how
    many polyp-free frames there were and how many of them got a false positive."""
    from monai_ecrm.metrics.evaluation import score_pair, write_tables

    polyp = np.zeros((16, 16), dtype=np.float32)
    polyp[4:10, 4:10] = 1.0
    empty = np.zeros((16, 16), dtype=np.float32)
    speck = empty.copy()
    speck[0, 0] = 0.9
    pairs = [(polyp, polyp), (empty, empty), (speck, empty), (empty, empty)]
    rows = [
        {"dataset": "clip", "filename": f"f{i}.png", "height": 16, "width": 16, **score_pair(p, g)}
        for i, (p, g) in enumerate(pairs)
    ]
    summary = summarize(rows)[0]
    assert summary["polyp_free_images"] == 3
    assert summary["polyp_free_false_positive_rate"] == pytest.approx(1 / 3)
    paths = write_tables(rows, tmp_path)
    written = next(csv.DictReader(open(paths["summary_csv"])))
    assert written["polyp_free_images"] == "3" and float(written["polyp_free_false_positive_rate"]) == pytest.approx(
        1 / 3
    )
    assert "Polyp-free frames" in paths["summary_md"].read_text()
    # a set with polyps only says so (NaN rate) and adds no polyp-free table
    only = summarize(rows[:1])[0]
    assert only["polyp_free_images"] == 0 and np.isnan(only["polyp_free_false_positive_rate"])
    assert "Polyp-free" not in markdown_table(summarize(rows[:1]))
