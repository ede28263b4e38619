"""The bundle's memory provenance (experimental): ``inference.json --explain K`` names the memory cases each image drew
on (``explain.csv``, ``<stem>_explain.png``) beside unchanged masks; ``evaluate.json`` writes ``report.html`` with the
worst cases' overlays and, with ``--explain K``, the memory cases they drew on.

The model is the clinical explain tests' tiny ECRM-UNet whose memory holds four named synthetic cases (the ``model``
fixture of ``test_clinical_explain``); the configs run in-process (``monai.bundle.run``) with the overrides that
describe that network.
"""

from __future__ import annotations

import csv
import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
import test_clinical_explain as clinical_explain
import torch
from monai.bundle import run
from PIL import Image
from test_clinical_explain import COLOURS, NETWORK, SIZE, _network, _save, _tile

from monai_ecrm.bundle import bundle_path
from monai_ecrm.clinical.explain import EXPLAIN_COLUMNS, NOTE_COLUMN, CasePictures, Explanation, MemoryCase
from monai_ecrm.data import make_demo_dataset
from monai_ecrm.handlers.report_page import write_report_page
from monai_ecrm.metrics.evaluation import ROW_FIELDS, TABLE_HEADERS
from monai_ecrm.networks.nets import ECRMUNet
from monai_ecrm.record import read_record

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")

model = clinical_explain.model  # the fixture: a tiny ECRM-UNet whose memory names four cases, and its inputs

CONFIGS = bundle_path() / "configs"
#: what the bundle needs to build the fixture's network (the rest follows the record)
NETWORK_OVERRIDES = {
    "backbone": NETWORK["backbone"],
    "bank_size": NETWORK["bank_size"],
    "ecrm_channels": NETWORK["ecrm_channels"],
    "network_def#key_channels": NETWORK["key_channels"],
    "network_def#decoder_channels": list(NETWORK["decoder_channels"]),
}


def _common(checkpoint: Path, output: Path, **overrides) -> dict:
    record = read_record(checkpoint) or {}
    return {
        "bundle_root": str(bundle_path()),
        "ckpt_path": str(checkpoint),
        "output_dir": str(output),
        "num_workers": 0,
        "device": "$torch.device('cpu')",
        "spatial_size": SIZE,
        "threshold": record.get("threshold", 0.5),
        "logging_file": False,
        **NETWORK_OVERRIDES,
        **overrides,
    }


def infer(checkpoint: Path, inputs: Path, output: Path, **overrides) -> None:
    """``inference.json`` on ``inputs`` (``python -m monai.bundle run --config_file configs/inference.json ...``)."""
    config = str(CONFIGS / "inference.json")
    run(config_file=config, **_common(checkpoint, output, dataset_dir=str(inputs), **overrides))


def evaluate(checkpoint: Path, datalist: Path, output: Path, **overrides) -> Path:
    """``train.json`` + ``evaluate.json`` on the datalist's test sets; returns the report folder."""
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    run(config_file=configs, **_common(checkpoint, output, dataset_dir=str(datalist), **overrides))
    return output / "report"


def _masks(output: Path) -> dict[str, np.ndarray]:
    masks = {path.name: np.asarray(Image.open(path)) for path in output.glob("*_seg.png")}
    masks.update({path.name: pydicom.dcmread(path).pixel_array for path in output.glob("*_seg.dcm")})
    return masks


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _explain_lines(caplog, text: str) -> list[str]:
    """The handler's ``explain:`` log lines that contain ``text``."""
    messages = [record.getMessage() for record in caplog.records]
    return [message for message in messages if message.startswith("explain:") and text in message]


def test_inference_explain_names_memory_cases_beside_unchanged_masks(model, tmp_path):
    names = set(model.network.ecrm.memory.slot_names()[:4])
    assert names == set(COLOURS)
    infer(model.checkpoint, model.inputs, tmp_path / "plain")
    infer(model.checkpoint, model.inputs, tmp_path / "explained", explain=3)

    plain, explained = _masks(tmp_path / "plain"), _masks(tmp_path / "explained")
    assert sorted(plain) == ["still_seg.png", "video_seg.dcm"] and sorted(explained) == sorted(plain)
    for name, mask in plain.items():
        assert 0 < mask.mean() < mask.max(), f"{name}: the comparison needs masks with both classes"
        np.testing.assert_array_equal(explained[name], mask, err_msg=f"{name}: explain changed the mask")
    assert not list((tmp_path / "plain").glob("explain*")), "explain 0 (the default) writes no explanation"

    rows = _rows(tmp_path / "explained" / "explain.csv")
    assert [(Path(row["image"]).name, row["frame"]) for row in rows] == [
        ("still.png", ""),
        ("video.dcm", "0"),
        ("video.dcm", "1"),
    ], "a row per image and per frame of a video"
    for row in rows:
        cases = row[EXPLAIN_COLUMNS[0]].split("|")
        shares = [float(share) for share in row[EXPLAIN_COLUMNS[1]].split("|")]
        assert len(cases) == len(shares) == 3 and set(cases) <= names, f"{row}: not 3 of the memory's cases"
        assert all(0 < share <= 1 for share in shares) and shares == sorted(shares, reverse=True), shares
    pictures = sorted(path.name for path in (tmp_path / "explained").glob("*_explain.png"))
    assert pictures == ["still_explain.png", "video_frame0000_explain.png", "video_frame0001_explain.png"]
    picture = np.asarray(Image.open(tmp_path / "explained" / "still_explain.png").convert("RGB"))
    first = rows[0][EXPLAIN_COLUMNS[0]].split("|")[0]
    colour = (_tile(picture, 1) == COLOURS[first]).all(axis=-1).mean()
    assert colour > 0.3, "tile 1 shows the first case's picture, read from the folder the model record names"


def test_inference_explain_above_the_filled_slots_shows_all_of_them_said_once(model, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        infer(model.checkpoint, model.inputs / "still.png", tmp_path / "out", explain=5)  # 4 of 6 slots filled
    assert _explain_lines(caplog, "memory holds") == ["explain: explain 5: the memory holds 4 cases: all 4 shown"]
    assert _explain_lines(caplog, "pictures of") == [
        f"explain: pictures of 4 of 4 memory cases found (in {model.dataset})"
    ], "the training pictures are found where the model record says"
    (row,) = _rows(tmp_path / "out" / "explain.csv")
    assert sorted(row[EXPLAIN_COLUMNS[0]].split("|")) == sorted(COLOURS), "every filled slot, each once"


def test_inference_explain_with_an_empty_memory_says_why_once_and_writes_the_masks(model, tmp_path, caplog):
    checkpoint = _save(_network(), tmp_path / "model", 0.5, model.dataset)  # never refreshed: an empty memory
    with caplog.at_level(logging.INFO):
        infer(checkpoint, model.inputs, tmp_path / "out", explain=2, threshold=0.5)
    (line,) = _explain_lines(caplog, "")
    assert "empty" in line and "without explanations" in line, line
    assert sorted(_masks(tmp_path / "out")) == ["still_seg.png", "video_seg.dcm"], "the masks are still written"
    assert not list((tmp_path / "out").glob("*_explain.png"))
    rows = _rows(tmp_path / "out" / "explain.csv")
    assert len(rows) == 3 and all("empty" in row[NOTE_COLUMN] for row in rows), "the table says why, per image"


@pytest.mark.parametrize(
    "overrides, expected",
    [({"onnx_path": "models/model.onnx"}, "ONNX model"), ({"use_ecrm": False}, "use_ecrm false")],
)
def test_inference_explain_without_memory_attention_is_one_line_error(model, tmp_path, overrides, expected):
    with pytest.raises(SystemExit) as exited:
        infer(model.checkpoint, model.inputs, tmp_path / "out", explain=2, **overrides)
    message = str(exited.value)
    assert message.startswith("error: --explain 2") and expected in message and "\n" not in message, message
    assert not (tmp_path / "out").exists(), "nothing is written"


class _Page(HTMLParser):
    """The parts of ``report.html`` a reader relies on: table rows by table, image sources, text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "dataset": attrs.get("data-dataset"), "rows": []})
        elif tag == "tr":
            self._cells = []
        elif tag in ("td", "th") and self._cells is not None:
            self._cells.append("")
        elif tag == "img":
            self.images.append(attrs)
            if self.tables and self._cells:
                self._cells[-1] += f"[img {attrs['src']}]"

    def handle_endtag(self, tag):
        if tag == "tr" and self._cells is not None:
            self.tables[-1]["rows"].append(self._cells)
            self._cells = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cells:
            self._cells[-1] += data


def _page(folder: Path) -> _Page:
    page = _Page()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def test_sets(tmp_path_factory) -> Path:
    """A datalist whose ``"test"`` list holds two named test sets of labelled synthetic pictures."""
    demo = make_demo_dataset(tmp_path_factory.mktemp("labelled") / "set", num_images=5, size=SIZE)
    images, masks = sorted((demo / "images").iterdir()), sorted((demo / "masks").iterdir())
    test = [
        {"image": str(image), "label": str(mask), "dataset": "kvasir" if index < 3 else "clinic<db>"}
        for index, (image, mask) in enumerate(zip(images, masks))
    ]
    path = demo.parent / "datalist.json"
    path.write_text(json.dumps({"training": test[:1], "test": test}))
    return path


def test_evaluation_page_shows_the_tables_the_worst_cases_and_their_memory_cases(model, test_sets, tmp_path):
    names = set(model.network.ecrm.memory.slot_names()[:4])
    report = evaluate(model.checkpoint, test_sets, tmp_path / "eval", explain=2, worst_k=2)
    page = _page(report)
    with open(report.parent / "metrics.csv", newline="") as stream:
        aux = {row[0]: float(row[1]) for row in csv.reader(stream) if row and row[0] == "aux_dice"}
    assert aux and np.isfinite(aux["aux_dice"]), "the aux head is still scored when the forward is explained"

    summary = next(table for table in page.tables if table["class"] == "summary")
    assert [row[0] for row in summary["rows"][1:]] == ["kvasir", "clinic<db>", "overall"], "a row per dataset"
    assert summary["rows"][1][1] == "3" and summary["rows"][2][1] == "2", "the image counts"
    worst = {table["dataset"]: table["rows"] for table in page.tables if table["class"] == "worst"}
    assert sorted(worst) == ["clinic<db>", "kvasir"], "the worst cases of each dataset, names unescaped once"
    assert worst["kvasir"][0][-1].startswith("Memory cases"), "the memory column"
    overlays = [image["src"] for image in page.images if image.get("class") == "overlay"]
    assert len(overlays) == 4 and all((report / src).is_file() for src in overlays), "one overlay per worst case"
    for rows in worst.values():
        for row in rows[1:]:
            assert row[1].startswith("[img overlays/"), row
            shown = {name for name in names if name in row[-1]}
            assert len(shown) == 2, f"{row[-1]}: 2 memory cases named per worst case"
    thumbnails = [image for image in page.images if image.get("class") == "case"]
    assert len(thumbnails) == 8 and {image["alt"] for image in thumbnails} <= names
    assert all((report / image["src"]).is_file() for image in thumbnails), "thumbnails written next to the page"
    assert all(not image["src"].startswith(("/", "file:", "data:")) for image in page.images), "relative links only"

    with open(report / "per_image.csv", newline="") as stream:
        assert tuple(next(csv.reader(stream))) == ROW_FIELDS, "per_image.csv keeps its columns"
    assert len(_rows(report / "explain.csv")) == 5


def test_evaluation_page_without_memory_cases_says_why(model, test_sets, tmp_path):
    report = evaluate(model.checkpoint, test_sets, tmp_path / "default", worst_k=1, explain=0)
    page = _page(report)
    worst = [table["rows"] for table in page.tables if table["class"] == "worst"]
    assert len(worst) == 2 and all(rows[0][-1] == "IoU" for rows in worst), "no memory column with --explain 0"
    assert "No memory cases shown" in "".join(page.text)
    assert not (report / "memory_cases").exists() and not (report / "explain.csv").exists()

    torch.manual_seed(0)
    plain = ECRMUNet(**NETWORK, use_ecrm=False).eval()
    checkpoint = _save(plain, tmp_path / "plain_model", 0.5, model.dataset)
    report = evaluate(checkpoint, test_sets, tmp_path / "plain", explain=2, worst_k=1, use_ecrm=False, threshold=0.5)
    text = "".join(_page(report).text)
    assert "No memory cases shown: the model has no ECRM memory" in text, "a network without ECRM: the page says so"


def test_report_page_escapes_every_name(tmp_path):
    case = MemoryCase(0, 'cases/<b>"odd" & name.png', 0.75)
    worst = {
        "set <i>": [
            {"place": 1, "filename": "/data/<x>.png", "dice": 0.1, "iou": 0.05, "overlay": None,
             "explanation": Explanation((case,))}
        ]
    }  # fmt: skip
    summary = [{"dataset": "set <i>", "images": 1, **dict.fromkeys(TABLE_HEADERS, 0.5)}]
    write_report_page(tmp_path, summary, worst, pictures=CasePictures([tmp_path / "nowhere"]))
    source = (tmp_path / "report.html").read_text()
    assert "<b>" not in source and "<i>" not in source and "<x>" not in source, "names are text, never markup"
    page = _page(tmp_path)
    assert case.name in "".join(page.text) and "(picture not found)" in "".join(page.text)
    assert not (tmp_path / "memory_cases").exists(), "no thumbnail for a case whose picture is not here"
