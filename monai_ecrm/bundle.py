"""Helpers the ``polyp_ecrm`` bundle configs call by name, and the ``monai-ecrm-bundle`` command.

The configs stay declarative: anything longer than one line lives here (datalists for every ``dataset_dir`` form,
the synthetic demo set, where the installed bundle is). Every validation split is made by case
(:func:`monai_ecrm.data.split_by_case`): the frames of a multi-frame file, and items sharing a ``"case"`` key, stay on
one side; without ``"case"`` keys the split is per file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import sysconfig
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_ecrm.data import (
    PRANET_VAL_SEED,
    folder_datalist,
    item_case,
    load_datalist,
    make_demo_dataset,
    pranet_datalist,
    split_by_case,
)

__all__ = [
    "BUNDLE_NAME",
    "bundle_path",
    "training_datalist",
    "evaluation_datalist",
    "inference_datalist",
    "write_pranet_datalist",
    "attach_handlers",
    "training_prepare_batch",
    "check_bundle_root",
    "check_explain",
    "check_model",
    "log_metrics",
    "require_model",
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


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as stream:
        content = json.load(stream)
    return content if isinstance(content, dict) else {}


def _datalist_keys(path: Path) -> list[str]:
    """The top-level keys of a datalist JSON (so that a missing list is told apart from a broken one)."""
    return list(_read_json(path))


def _has_labelled_test(path: Path) -> bool:
    """Whether a datalist JSON has a ``"test"`` list that can be scored: items with a ``"label"`` each."""
    test = _read_json(path).get("test")
    return isinstance(test, list) and bool(test) and all(isinstance(item, dict) and "label" in item for item in test)


def _warn_shared_cases(training: list[dict[str, Any]], validation: list[dict[str, Any]], source: Path) -> None:
    shared = {item_case(item) for item in training} & {item_case(item) for item in validation}
    if shared:
        named = ", ".join(sorted(shared)[:5]) + (", ..." if len(shared) > 5 else "")
        logger.warning(
            f"{source}: {len(shared)} case(s) in both the training and the validation list ({named}): validation "
            "scores of these cases are scores on training data"
        )


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
      into ``1 - val_fraction`` training and ``val_fraction`` validation files; every frame of a multi-frame file
      lands on the same side;
    - a MONAI datalist JSON: its ``"training"`` list, and its ``"validation"`` list when it has one (a warning
      names any case found in both); otherwise a random split of ``"training"`` by case: items with the same
      ``"case"`` value (the frames of one video, say) stay together, and items without one are split per file.

    Args:
        dataset_dir: folder or datalist JSON.
        demo_dir: the bundle's demo folder (generated only when ``dataset_dir`` is this folder).
        val_fraction: share of the cases (files, or ``"case"`` values) held out for validation when the source has
            no validation list.
        seed: seed of that split (:func:`monai_ecrm.data.split_by_case`).
        demo_images: number of synthetic pairs of the demo set.
        demo_size: side of the synthetic pictures.
        on_error: ``"raise"`` (every bad file in one error) or ``"skip"`` (report and leave them out).
    """
    _prepare(dataset_dir, demo_dir, demo_images, demo_size)
    source = Path(dataset_dir).expanduser()
    if source.is_file():
        training = load_datalist(source, data_list_key="training", on_error=on_error)
        if "validation" in _datalist_keys(source):
            validation = load_datalist(source, data_list_key="validation", on_error=on_error)
            _warn_shared_cases(training, validation, source)
            return {"training": training, "validation": validation}
    else:
        training = folder_datalist(source, require_masks=True, on_error=on_error)
    training, validation = split_by_case(training, val_fraction, seed)
    return {"training": training, "validation": validation}


def evaluation_datalist(
    dataset_dir: str | os.PathLike,
    eval_dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    on_error: str = "raise",
    eval_list: str | None = None,
) -> list[dict[str, Any]]:
    """The pairs ``evaluate.json`` scores, each named by its ``"dataset"`` key (the report's per-dataset rows).

    The source is ``eval_dataset_dir`` when given, else the training ``dataset_dir``:

    - a datalist JSON with a ``"test"`` list of labelled items: that list, each item keeping the test set its
      ``"dataset"`` names (``"test"`` when it names none), so each test set is scored apart;
    - a datalist JSON without one: its ``"validation"`` list (for the training ``dataset_dir``, the validation split
      :func:`training_datalist` makes when there is none), named ``"validation"``;
    - a folder given as ``eval_dataset_dir``: every pair, named after the folder;
    - the training folder: its validation split, named ``"validation"``; the bundle's demo folder is named
      ``"demo"`` and logged as the SYNTHETIC demo set.

    Args:
        dataset_dir: the training folder or datalist JSON.
        eval_dataset_dir: a test folder or datalist JSON.
        demo_dir: the bundle's demo folder.
        val_fraction: see :func:`training_datalist`.
        seed: see :func:`training_datalist`.
        on_error: see :func:`training_datalist`.
        eval_list: ``None`` (``"test"`` when the JSON has a labelled one, else ``"validation"``), ``"test"`` or
            ``"validation"``: the list of a datalist JSON to score.
    """
    if eval_list not in (None, "test", "validation"):
        raise ValueError(f"eval_list must be None, 'test' or 'validation', got {eval_list!r}")
    source = Path(eval_dataset_dir or dataset_dir).expanduser()
    if source.is_file() and eval_list != "validation" and _has_labelled_test(source):
        items = load_datalist(source, data_list_key="test", on_error=on_error)
        return [{**item, "dataset": str(item.get("dataset", "test"))} for item in items]
    if eval_list == "test":
        raise ValueError(f"{source}: eval_list='test' needs a datalist JSON with a 'test' list of labelled items")
    if eval_dataset_dir and source.is_file():
        items, name = load_datalist(source, data_list_key="validation", on_error=on_error), "validation"
    elif eval_dataset_dir:
        items, name = folder_datalist(source, require_masks=True, on_error=on_error), source.resolve().name
    else:
        split = training_datalist(
            dataset_dir, demo_dir=demo_dir, val_fraction=val_fraction, seed=seed, on_error=on_error
        )
        items, name = split["validation"], "validation"
        if _is_demo(dataset_dir, demo_dir):
            name = "demo"
            logger.warning(
                f"evaluating on the SYNTHETIC demo set in {dataset_dir} (drawn blobs, not polyps): its scores only "
                "show that the pipeline runs; pass --dataset_dir or --eval_dataset_dir to score real data"
            )
    return [{**item, "dataset": str(item.get("dataset", name))} for item in items]


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


def check_bundle_root(bundle_root: str | os.PathLike) -> bool:
    """Warn (once, naming the folder) when ``bundle_root`` is not a bundle: a command run from the repository root
    without ``--bundle_root`` would otherwise write ``demo_data/``, ``logs/`` and ``models/`` into the working folder
    without a word. Returns whether it is one (a ``configs/metadata.json`` inside)."""
    root = Path(bundle_root).expanduser()
    if (root / "configs" / "metadata.json").is_file():
        return True
    logger.warning(
        f"bundle_root {str(root.resolve())!r} is not a bundle (no configs/metadata.json): models/, logs/, eval/ and "
        "demo_data/ will be written there. From the repository root pass --bundle_root bundles/polyp_ecrm."
    )
    return False


def require_model(path: str | os.PathLike) -> str:
    """``path`` when the trained model exists; otherwise exit with one line saying so and how to get one (instead of
    a long ``FileNotFoundError`` traceback from the checkpoint loader)."""
    if not Path(path).expanduser().is_file():
        sys.exit(
            f"error: no trained model at {path}. Train the bundle first (configs/train.json writes models/model.pt), "
            "or pass --ckpt_path PATH to a model.pt."
        )
    return str(path)


def log_metrics(engine: Any) -> None:
    """``StatsHandler(epoch_print_logger=...)`` for evaluation: one INFO line with the metrics, without the "best
    value at epoch" line a training validation needs (an evaluation selects nothing)."""
    metrics = ", ".join(
        f"{name}: {value:.4f}"
        for name, value in sorted(engine.state.metrics.items())
        if isinstance(value, (int, float))
    )
    engine.logger.info(f"Evaluation metrics -- {metrics}")


def check_model(
    path: str | os.PathLike,
    network: Any = None,
    spatial_size: Any = None,
    normalization: str | None = None,
    threshold: float | None = None,
) -> None:
    """The bundle config's network, input size, normalisation (and threshold) checked against the record training
    wrote beside the model (:func:`monai_ecrm.record.check_bundle_config`): a contradiction (a model trained at
    64 px run at 352 px) exits with one line naming both values instead of running silently or with a traceback."""
    from monai_ecrm.record import check_bundle_config

    try:
        check_bundle_config(
            path, network=network, spatial_size=spatial_size, normalization=normalization, threshold=threshold
        )
    except ValueError as error:
        sys.exit(f"error: {error}")


def check_explain(explain: int, onnx_path: str | os.PathLike | None = None, use_ecrm: bool = True) -> int:
    """The bundle's ``explain`` K checked against what can give memory shares: an ONNX model (``onnx_path``) gives
    none, nor a network without ECRM (``use_ecrm`` false); either exits with one line instead of running without the
    explanations asked for. Returns ``explain``."""
    if explain is None or int(explain) < 0:
        sys.exit(f"error: explain {explain}: give the number of memory cases to name per image (0: none)")
    if int(explain) and onnx_path is not None:
        sys.exit(
            f"error: --explain {explain} needs the PyTorch network's memory attention, which an ONNX model "
            f"(--onnx_path {onnx_path}) does not give: leave out --onnx_path to run models/model.pt"
        )
    if int(explain) and not use_ecrm:
        sys.exit(f"error: --explain {explain} needs the network's ECRM memory: this network has none (use_ecrm false)")
    return int(explain)


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


def training_prepare_batch(
    network: Any, labels: bool = False, label_key: str = "label", source_key: str = "case_index"
) -> Any:
    """The trainer's ``prepare_batch``: MONAI's ``PrepareBatchExtraInput`` passing each batch's ``source_key`` (the
    training items' positions, :func:`monai_ecrm.data.with_case_index`, collated to a ``[B]`` tensor) as ``sources=``
    to a network whose ``forward`` takes it (``ECRMUNet``: the memory records which case wrote each slot), and the
    label as ``labels=`` when ``labels`` and the ``forward`` takes it (ECRM writing its memory from the ground truth);
    MONAI's ``default_prepare_batch`` when neither applies (a network without memory, such as ``FlexibleUNet``, given
    as ``network_def`` while the config still says ``prototypes`` label).

    Args:
        network: the training network (DDP/compile wrappers are unwrapped).
        labels: pass ``labels=`` (``prototypes="label"``) to a network whose ``forward`` takes it.
        label_key: batch key of the label.
        source_key: batch key of the case indices.
    """
    from monai.engines import PrepareBatchExtraInput, default_prepare_batch

    from monai_ecrm.handlers.aux_supervision import unwrap_network

    try:
        parameters = inspect.signature(unwrap_network(network).forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    extra = {"labels": label_key} if labels and "labels" in parameters else {}
    if "sources" in parameters:
        extra["sources"] = source_key
    return PrepareBatchExtraInput(extra) if extra else default_prepare_batch


def write_pranet_datalist(
    data_root: str | os.PathLike, out: str | os.PathLike, val_fraction: float = 0.1, seed: int = PRANET_VAL_SEED
) -> dict[str, Any]:
    """Writes :func:`monai_ecrm.data.pranet_datalist` to ``out`` as a datalist JSON (absolute paths) for
    ``--dataset_dir``: ``train.json`` trains on ``"training"`` and selects on ``"validation"``, ``evaluate.json``
    scores each test set of ``"test"``. Returns the datalist."""
    datalist = pranet_datalist(data_root, val_fraction=val_fraction, seed=seed)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1) + "\n")
    return datalist


def main(argv: Sequence[str] | None = None) -> int:
    """``monai-ecrm-bundle path`` prints where the installed bundle is; ``monai-ecrm-bundle copy DEST`` copies it
    out (for example to train with its own ``models/`` folder); ``monai-ecrm-bundle pranet-datalist --data DIR
    --out FILE`` writes the PraNet split (training, a fixed validation split, named test sets) as a datalist JSON."""
    parser = argparse.ArgumentParser(prog="monai-ecrm-bundle", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the folder of the installed polyp_ecrm bundle")
    copy = sub.add_parser("copy", help="copy the bundle to DEST (which must not exist)")
    copy.add_argument("dest", help="destination folder")
    pranet = sub.add_parser("pranet-datalist", help="write the PraNet split as one datalist JSON")
    pranet.add_argument("--data", required=True, help="folder holding kvasir_seg/, cvc_clinicdb/ and pranet_split/")
    pranet.add_argument("--out", required=True, help="the datalist JSON to write")
    pranet.add_argument("--val-fraction", type=float, default=0.1, help="share of training cases held out (0.1)")
    pranet.add_argument("--seed", type=int, default=PRANET_VAL_SEED, help="seed of the held-out draw (keep it fixed)")
    args = parser.parse_args(argv)
    if args.command == "pranet-datalist":
        datalist = write_pranet_datalist(args.data, args.out, val_fraction=args.val_fraction, seed=args.seed)
        tests = Counter(item["dataset"] for item in datalist["test"])
        sizes = [f"{name} {len(datalist[name])}" for name in ("training", "validation")]
        sizes += [f"test {name} {count}" for name, count in tests.items()]
        print(f"{args.out}: {', '.join(sizes)}")
        return 0
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
