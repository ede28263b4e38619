"""What ``monai-ecrm-infer`` prints: the lines documented in :mod:`monai_ecrm.clinical.cli`, each event once, no
library noise (highdicom's INFO lines, Python warnings), whatever logging the calling program set up."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clinical_fixtures import save_torchscript
from conftest_data import DATA_DIR, dicom_dataset, write_dicom, write_png
from test_dicom_seg import video_frames

from monai_ecrm.clinical import cli
from monai_ecrm.clinical.cli import EXIT_FAILED, main

NEMA_FRAME = DATA_DIR / "dicom_samples" / "nema_wg04_vl2_j2kr.dcm"

# the command run as a host program would run it: its root logger at INFO, Python's default warning filters
_HOST = "import logging, sys; logging.basicConfig(level=logging.INFO); from monai_ecrm.infer import main; "
_HOST += "sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory) -> Path:
    return save_torchscript(tmp_path_factory.mktemp("model"))


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """A PNG, a DICOM frame (the real JPEG 2000 endoscopy frame where present), a broken PNG and a text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "a.png", video_frames(1, 36, 48)[0])
    if NEMA_FRAME.is_file():
        shutil.copyfile(NEMA_FRAME, folder / "b.dcm")
    else:
        write_dicom(folder / "b.dcm", dicom_dataset(video_frames(2, 36, 48)[1]))
    (folder / "c.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


def documented_lines(folder: Path, output: Path, model: Path) -> list[str]:
    """The lines :mod:`monai_ecrm.clinical.cli` documents for a run on :func:`mixed_folder` with ``model`` (a
    TorchScript file without a model record, run at 32 px), in order."""
    return [
        f"monai-ecrm-infer: model: {model} (sha256 ",
        "monai-ecrm-infer: model: assumed normalisation 'imagenet', threshold 0.5: the model does not state them",
        f"monai-ecrm-infer: failed: {folder / 'c.png'}: not a readable PNG file: Pillow cannot identify its contents",
        f"monai-ecrm-infer: skipped: {folder / 'notes.txt'}: unknown extension '.txt'; supported extensions: ",
        f"monai-ecrm-infer: 2 written, 0 already done, 1 skipped, 1 failed; report: {output / 'report.csv'}",
    ]


def assert_documented(stderr: str, folder: Path, output: Path, model: Path) -> None:
    lines = stderr.splitlines()
    expected = documented_lines(folder, output, model)
    assert len(lines) == len(expected), "one line per event, nothing else:\n" + stderr
    for line, start in zip(lines, expected):
        assert line.startswith(start), f"expected a line starting {start!r}, got {line!r}"


def test_a_command_run_prints_the_documented_lines_once_and_no_library_noise(tmp_path, mixed_folder, torchscript_model):
    """A pipeline that logs at INFO and runs the command must not get highdicom's nine INFO lines per SEG, a warning,
    or the command's lines twice (through its own handler and the root one)."""
    output = tmp_path / "out"
    argv = [str(mixed_folder), "-o", str(output), "--torchscript", str(torchscript_model), "--spatial-size", "32",
            "--no-progress"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _HOST, *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == EXIT_FAILED, run.stderr
    assert run.stdout == "", "the command prints nothing on stdout"
    assert "highdicom" not in run.stderr, "highdicom's INFO lines are silenced within the command"
    assert "warn" not in run.stderr.lower(), "no Python warning reaches the user"
    assert_documented(run.stderr, mixed_folder, output, torchscript_model)
    assert (output / "a_seg.png").is_file() and (output / "b_seg.dcm").is_file()


def test_event_levels_and_logging_restored_after_the_command(tmp_path, mixed_folder, torchscript_model, capsys, caplog):
    """In-process (a program calling ``main``): the lines on stderr at their documented levels, none through the
    root logger, highdicom quiet during the run and the loggers as they were afterwards."""
    caplog.set_level(logging.INFO)  # the host logs INFO through the root logger
    highdicom = logging.getLogger("highdicom")
    before = (cli.logger.level, cli.logger.propagate, list(cli.logger.handlers), highdicom.level)
    records: list[logging.LogRecord] = []
    recorder = logging.Handler()
    recorder.emit = records.append
    cli.logger.addHandler(recorder)
    output = tmp_path / "out"
    try:
        rc = main([str(mixed_folder), "-o", str(output), "--torchscript", str(torchscript_model), "--spatial-size",
                   "32", "--no-progress"])  # fmt: skip
    finally:
        cli.logger.removeHandler(recorder)
    assert rc == EXIT_FAILED
    assert_documented(capsys.readouterr().err, mixed_folder, output, torchscript_model)
    levels = [(record.levelno, record.getMessage().split(":")[0]) for record in records]
    summary = "2 written, 0 already done, 1 skipped, 1 failed; report"
    model = [(logging.INFO, "model"), (logging.WARNING, "model")]
    assert levels == [*model, (logging.ERROR, "failed"), (logging.INFO, "skipped"), (logging.INFO, summary)]
    assert not [r for r in caplog.records if r.name.startswith(("highdicom", "monai_ecrm"))], (
        "neither highdicom's INFO lines nor the command's lines reach the host's root handlers"
    )
    after = (cli.logger.level, cli.logger.propagate, list(cli.logger.handlers), highdicom.level)
    assert after == before, "main leaves the loggers as it found them"
