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
    "one_line_errors",
    "select_nothing",
    "report_failed_inputs",
    "InferenceItems",
    "DEBUG_ENV",
    "main",
]

BUNDLE_NAME = "polyp_ecrm"
#: size of the synthetic demo set the bundle generates in its ``demo_data`` folder
DEMO_IMAGES, DEMO_SIZE = 24, 128
logger = logging.getLogger("monai_ecrm.bundle")
#: environment variable that keeps Python's full tracebacks on the console (``MONAI_ECRM_DEBUG=1``)
DEBUG_ENV = "MONAI_ECRM_DEBUG"


def _root_error(error: BaseException) -> BaseException:
    """The innermost error of a chain: MONAI's config parser wraps the error of an expression in a ``RuntimeError``
    ("Failed to evaluate ..."), ignite's engine re-raises the handler's; the innermost one says what is wrong."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def _one_line(error: BaseException) -> str:
    from monai_ecrm.data import DataError

    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C); a training run continues with --resume_from latest"
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 600:  # e.g. torch's list of every missing and unexpected key: the log has all of it
        text = text[:600] + " ..."
    # errors of this package (and file errors) say what is wrong and where; others get their type as a hint
    ours = type(error).__module__.startswith("monai_ecrm") or isinstance(error, (DataError, OSError, SystemExit))
    return text if ours else f"{type(error).__name__}: {text}"


def _without_tracebacks(factory: Any) -> Any:
    """A log record factory that keeps the message and drops the traceback (ignite's engine and MONAI's
    ``StatsHandler`` log the whole traceback of an error that then reaches :func:`one_line_errors`, which writes it to
    its log file once)."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record

    make.one_line_errors = True  # type: ignore[attr-defined]
    return make


def one_line_errors(log_file: str | os.PathLike | None = None, debug: bool | None = None) -> bool:
    """Make a bundle command end an error with one line: ``error: <what is wrong, naming the file or option>``, the
    full traceback written to ``log_file`` (appended) instead of the console. For the configs' ``initialize`` list
    (first entry), so that ``python -m monai.bundle run`` speaks like ``monai-ecrm-infer``.

    ``MONAI_ECRM_DEBUG=1`` in the environment (or ``debug=True``) keeps Python's own tracebacks. Ctrl-C prints one
    line too. The exit status stays non-zero (1). Returns whether the one-line mode is on.

    Why not MONAI's: ``monai.bundle`` leaves errors to Python's default hook, and its config parser wraps each one in
    "Failed to evaluate" errors, 60 to 200 lines for a wrong folder.
    """
    if debug is None:
        debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if debug:
        return False
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "one_line_errors", False):
        logging.setLogRecordFactory(_without_tracebacks(factory))
    target = Path(log_file).expanduser() if log_file else None

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        import traceback

        where = ""
        if target is not None:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a", encoding="utf-8") as stream:
                    stream.write("".join(traceback.format_exception(kind, error, trace)) + "\n")
                where = f" (traceback in {target}; {DEBUG_ENV}=1 shows it here)"
            except OSError:
                where = f" ({DEBUG_ENV}=1 shows the traceback)"
        print(f"error: {_one_line(_root_error(error))}{where}", file=sys.stderr, flush=True)

    sys.excepthook = hook
    return True


class InferenceItems(list):
    """The items ``inference.json`` runs, and ``failed``: ``(path, problem)`` of every input left out
    (:func:`report_failed_inputs` ends the run with them)."""

    failed: list[tuple[str, str]]


def report_failed_inputs(items: Any) -> int:
    """The last step of ``inference.json``: exit with one line listing every input that could not be read (status 1)
    after the others were written; return the number of items run when none failed."""
    failed = list(getattr(items, "failed", []) or [])
    if failed:
        listed = "; ".join(f"{path}: {problem}" for path, problem in failed)
        sys.exit(
            f"error: {len(failed)} input(s) could not be read and were left out ({listed}); the other {len(items)} "
            "were written"
        )
    return len(items)


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
    logged as errors (not Python warnings, which ``PYTHONWARNINGS=ignore`` would hide) and left out by default so the
    rest complete; they are returned in the result's ``failed`` (:class:`InferenceItems`), and
    :func:`report_failed_inputs` makes the command exit non-zero for them at the end."""
    from monai_ecrm.data import DataError

    if on_error == "skip":
        try:
            items = InferenceItems(_inference_items(dataset_dir, demo_dir, on_error="raise"))
            items.failed = []
            return items
        except DataError as error:
            if not error.problems:
                raise
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                items = InferenceItems(_inference_items(dataset_dir, demo_dir, on_error="skip"))
            items.failed = list(error.problems)
            for path, problem in items.failed:
                logger.error(f"left out {path}: {problem}")
            return items
    return _inference_items(dataset_dir, demo_dir, on_error)


def _inference_items(
    dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None, on_error: str
) -> list[dict[str, Any]]:
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


def select_nothing(evaluator: Any) -> Any:
    """``evaluator`` made to score without selecting (``evaluate.json``): MONAI's evaluator compares its key metric
    with the best so far and logs "Got new best metric" at its first epoch whatever the comparison says; an evaluation
    of a test set selects no model, so the comparison is turned off (the metrics are computed and logged as before).
    Returns the evaluator."""
    evaluator.metric_cmp_fn = lambda current, best: False
    evaluator.state.best_metric_epoch = 0
    return evaluator


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

    from monai_ecrm.networks.utils import unwrap_network

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
    --out FILE`` writes the PraNet split (training, a fixed validation split, named test sets) as a datalist JSON;
    ``monai-ecrm-bundle adapt --model models/model.pt --cases DIR --out adapted.pt [--k N] [--mode replace|add]
    [--site NAME] [--seed S]`` writes a site's labelled cases (DIR/images, DIR/masks) into a copy of the model's ECRM
    memory, without training (:func:`monai_ecrm.adaptation.adapt_memory`); bad input ends in one ``error:`` line,
    exit status 2, nothing written."""
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
    adapt = sub.add_parser(
        "adapt",
        help="write a site's labelled cases into the ECRM memory of a copy of a model (no training)",
        description="Write the prototypes of k labelled cases of a new site into a trained model's ECRM memory; "
        "everything but the memory stays bit-identical. The adapted weights go to --out, their record beside them "
        "(<stem>.json); the model is left as it is. Run the result with monai-ecrm-infer --checkpoint OUT.",
    )
    adapt.add_argument("--model", required=True, help="the trained model (models/model.pt, its record beside it)")
    adapt.add_argument("--cases", required=True, help="the site's cases: a folder with images/ and masks/")
    adapt.add_argument("--out", required=True, help="the adapted weights to write (.pt; not the model)")
    adapt.add_argument("--k", type=int, default=None, help="use K of the cases, a seeded draw (default: all)")
    adapt.add_argument(
        "--mode",
        choices=("replace", "add"),
        default="replace",
        help="replace: empty the memory, then write the cases (default; slots beyond K stay empty and are not "
        "attended); add: write them after the existing slots, over the oldest when the memory is full",
    )
    adapt.add_argument("--site", default=None, help="the site's name in the record (default: the cases folder's)")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the draw of K cases (0)")
    adapt.add_argument("--device", default="cpu", help="where to run the encoder (cpu)")
    args = parser.parse_args(argv)
    if args.command == "adapt":
        from monai_ecrm.adaptation import adapt_memory
        from monai_ecrm.record import read_record, record_path

        try:
            out = adapt_memory(
                args.model,
                args.cases,
                args.out,
                mode=args.mode,
                site=args.site,
                k=args.k,
                seed=args.seed,
                device=args.device,
            )
        except (ValueError, OSError) as error:  # bad input: the message names the file or argument
            text = " ".join(str(error).split()) or type(error).__name__
            print(f"error: {text[:600] + ' ...' if len(text) > 600 else text}", file=sys.stderr)
            return 2
        record = read_record(out) or {}
        done = record.get("adaptation")
        done = done[-1] if isinstance(done, list) else done or {}
        memory = record.get("memory") or {}
        skipped = f" ({len(done['not_written'])} without a prototype)" if done.get("not_written") else ""
        print(
            f"{out}: {done.get('written')} of {done.get('k')} case(s) of site {done.get('site')!r} written into the "
            f"memory ({done.get('mode')}){skipped}; {memory.get('filled')}/{memory.get('slots')} slots filled; "
            f"record {record_path(out)}"
        )
        return 0
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
