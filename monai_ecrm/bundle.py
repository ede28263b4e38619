"""Helpers the ``polyp_ecrm`` bundle configs call by name, and the ``monai-ecrm-bundle`` command.

The configs stay declarative: anything longer than one line lives here (datalists for every ``dataset_dir`` form,
the synthetic demo set, where the installed bundle is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_ecrm.data import folder_datalist, load_datalist, make_demo_dataset

__all__ = [
    "BUNDLE_NAME",
    "bundle_path",
    "training_datalist",
    "evaluation_datalist",
    "inference_datalist",
    "attach_handlers",
    "main",
]

BUNDLE_NAME = "polyp_ecrm"
#: size of the synthetic demo set the bundle generates in its ``demo_data`` folder
DEMO_IMAGES, DEMO_SIZE = 24, 128
logger = logging.getLogger("monai_ecrm.bundle")


def bundle_path() -> Path:
    """Where the ``polyp_ecrm`` bundle is: the repository's ``bundles/polyp_ecrm`` for a source checkout or an
    editable install, else the copy a wheel installs under ``<prefix>/share/monai-ecrm/bundles/polyp_ecrm``."""
    candidates = [Path(__file__).resolve().parents[1] / "bundles" / BUNDLE_NAME]
    for prefix in {sys.prefix, sysconfig.get_paths()["data"]}:
        candidates.append(Path(prefix) / "share" / "monai-ecrm" / "bundles" / BUNDLE_NAME)
    for candidate in candidates:
        if (candidate / "configs" / "train.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"the {BUNDLE_NAME} bundle was not found (looked in {', '.join(str(c) for c in candidates)}); "
        "reinstall monai-ecrm"
    )


def _datalist_keys(path: Path) -> list[str]:
    """The top-level keys of a datalist JSON (so that a missing list is told apart from a broken one)."""
    with open(path) as stream:
        content = json.load(stream)
    return list(content) if isinstance(content, dict) else []


def _is_demo(dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None) -> bool:
    return demo_dir is not None and Path(dataset_dir).expanduser().resolve() == Path(demo_dir).expanduser().resolve()


def _prepare(dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None, demo_images: int, demo_size: int):
    if _is_demo(dataset_dir, demo_dir):
        make_demo_dataset(dataset_dir, num_images=demo_images, size=demo_size)


def training_datalist(
    dataset_dir: str | os.PathLike,
    demo_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_images: int = DEMO_IMAGES,
    demo_size: int = DEMO_SIZE,
    on_error: str = "raise",
) -> dict[str, list[dict[str, Any]]]:
    """``{"training": [...], "validation": [...]}`` for every form ``dataset_dir`` may take.

    - the bundle's ``demo_dir``: the SYNTHETIC demo set, generated there when absent;
    - a folder with ``images/`` and ``masks/`` (Kvasir-SEG layout): all pairs, split at random (fixed ``seed``)
      into ``1 - val_fraction`` training and ``val_fraction`` validation pairs;
    - a MONAI datalist JSON: its ``"training"`` list, and its ``"validation"`` list when it has one (otherwise a
      random split of ``"training"`` as for a folder).

    Args:
        dataset_dir: folder or datalist JSON.
        demo_dir: the bundle's demo folder (generated only when ``dataset_dir`` is this folder).
        val_fraction: share of the pairs held out for validation when the source has no validation list.
        seed: seed of that split.
        demo_images: number of synthetic pairs of the demo set.
        demo_size: side of the synthetic pictures.
        on_error: ``"raise"`` (every bad file in one error) or ``"skip"`` (report and leave them out).
    """
    _prepare(dataset_dir, demo_dir, demo_images, demo_size)
    source = Path(dataset_dir).expanduser()
    validation: list[dict[str, Any]] | None = None
    if source.is_file():
        training = load_datalist(source, data_list_key="training", on_error=on_error)
        if "validation" in _datalist_keys(source):
            validation = load_datalist(source, data_list_key="validation", on_error=on_error)
    else:
        training = folder_datalist(source, require_masks=True, on_error=on_error)
    if validation is None:
        order = list(range(len(training)))
        random.Random(seed).shuffle(order)
        num_val = max(1, round(len(training) * val_fraction)) if len(training) > 1 and val_fraction > 0 else 0
        held_out = set(order[:num_val])
        validation = [item for i, item in enumerate(training) if i in held_out]
        training = [item for i, item in enumerate(training) if i not in held_out]
    return {"training": training, "validation": validation}


def evaluation_datalist(
    dataset_dir: str | os.PathLike,
    eval_dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    on_error: str = "raise",
) -> list[dict[str, Any]]:
    """The pairs ``evaluate.json`` scores: every pair of ``eval_dataset_dir`` (a test folder or a datalist JSON's
    ``"validation"`` list) when given, else the validation split of the training ``dataset_dir``."""
    if eval_dataset_dir:
        source = Path(eval_dataset_dir).expanduser()
        if source.is_file():
            return load_datalist(source, data_list_key="validation", on_error=on_error)
        return folder_datalist(source, require_masks=True, on_error=on_error)
    return training_datalist(dataset_dir, demo_dir=demo_dir, val_fraction=val_fraction, seed=seed, on_error=on_error)[
        "validation"
    ]


def inference_datalist(
    dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None = None, on_error: str = "skip"
) -> list[dict[str, Any]]:
    """Image-only items for ``inference.json``: a folder of pictures (``images/`` inside it, or the pictures
    themselves), a single file, or a datalist JSON (``"testing"`` list, else ``"validation"``). Unreadable files are
    reported (logged) and left out by default so the rest complete."""
    if demo_dir is not None and Path(dataset_dir).expanduser().resolve().is_relative_to(Path(demo_dir).resolve()):
        _prepare(demo_dir, demo_dir, DEMO_IMAGES, DEMO_SIZE)
    source = Path(dataset_dir).expanduser()
    if source.is_file() and source.suffix.lower() == ".json":
        keys = [key for key in ("test", "testing", "validation", "training") if key in _datalist_keys(source)]
        if not keys:
            raise ValueError(f"{source}: no 'test', 'testing', 'validation' or 'training' list in the datalist")
        items = load_datalist(source, data_list_key=keys[0], on_error=on_error)
        return [{"image": item["image"], **({"frame": item["frame"]} if "frame" in item else {})} for item in items]
    if source.is_file():
        from monai_ecrm.data import validate_datalist

        return validate_datalist([{"image": str(source.resolve())}], keys=("image",), on_error=on_error)
    return folder_datalist(source, mask_dir=None, on_error=on_error)


def attach_handlers(engine: Any, *handlers: Any) -> Any:
    """Attach handlers to an engine after it is built, in order, skipping ``None`` (a ``_disabled_`` component).

    Checkpoint handlers whose ``save_dict``/``load_dict`` holds the trainer itself cannot be in the trainer's own
    ``train_handlers`` (a circular reference in the config): the bundle attaches them with this function, after
    every handler of ``train_handlers``, so a checkpoint is written after validation at the end of an epoch.
    """
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)
    return engine


def main(argv: Sequence[str] | None = None) -> int:
    """``monai-ecrm-bundle path`` prints where the installed bundle is; ``monai-ecrm-bundle copy DEST`` copies it
    out (for example to train with its own ``models/`` folder)."""
    parser = argparse.ArgumentParser(prog="monai-ecrm-bundle", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the folder of the installed polyp_ecrm bundle")
    copy = sub.add_parser("copy", help="copy the bundle to DEST (which must not exist)")
    copy.add_argument("dest", help="destination folder")
    args = parser.parse_args(argv)
    source = bundle_path()
    if args.command == "path":
        print(source)
        return 0
    dest = Path(args.dest)
    if dest.exists():
        parser.error(f"{dest} already exists")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "runs"))
    print(dest)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
