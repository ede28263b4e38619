"""MONAI datalists from folders of pictures and masks, from split id lists and from datalist JSON files.

A datalist is a list of ``{"image": path, "label": path}`` items (no ``"label"`` for inference lists) with absolute
path strings, as MONAI's datasets take them; a frame of a multi-frame DICOM or multi-page TIFF file is an item of its
own with a ``"frame"`` index. Images and masks are matched by file stem across extensions (``images/12.tif`` with
``masks/12.png``).

Every builder checks the files it lists (``verify``) and reports every problem at once: one
:class:`~monai_ecrm.data.DataError` naming each bad file and what is wrong (``on_error="raise"``), or a warning with
the same report and a list of the good items (``on_error="skip"``).

Splits are made by case (:func:`split_by_case`), never by item: the frames of one file, and the items that share a
``"case"`` key (for example the frames of one colonoscopy video stored as separate files), all land on the same
side. Without a ``"case"`` key the case is the source file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

from monai.data import load_decathlon_datalist

from monai_ecrm.data.errors import DataError, format_problems
from monai_ecrm.data.image_io import file_stem, picture_format, probe_picture, read_picture

__all__ = [
    "PRANET_SETS",
    "PRANET_VAL_SEED",
    "folder_datalist",
    "item_case",
    "load_datalist",
    "pranet_datalist",
    "split_by_case",
    "split_datalist",
    "validate_datalist",
    "with_case_index",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
VERIFY_LEVELS = ("none", "header", "full")
#: the two datasets of the PraNet split: name (the test items' ``"dataset"``) -> folder under the data root
PRANET_SETS = {"kvasir": "kvasir_seg", "clinicdb": "cvc_clinicdb"}
#: seed of the PraNet split's held-out validation cases: one split for every run, model and training seed
PRANET_VAL_SEED = 20240611


def _check_options(verify: str, on_error: str) -> None:
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _index_folder(folder: Path, suffix: str = "") -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Picture files of a folder by stem (``suffix`` removed from mask stems), and the files that cannot be listed."""
    files: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            picture_format(path)
        except DataError as error:
            problems += error.problems
            continue
        stem = file_stem(path)
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        files.setdefault(stem, []).append(str(path.resolve()))
    index = {}
    for stem, paths in files.items():
        if len(paths) > 1:
            names = ", ".join(Path(p).name for p in paths)
            problems += [(p, f"several files share the stem '{stem}' ({names}): which one is meant?") for p in paths]
        else:
            index[stem] = paths[0]
    return index, problems


def _finish(
    items: list[dict[str, Any]], problems: list[tuple[str, str]], on_error: str, source: PathLike
) -> list[dict[str, Any]]:
    if problems:
        header = f"{len(problems)} problem(s) in the datalist from {source}"
        if on_error == "raise" or not items:
            if not items:
                header += " (no usable item left)"
            raise DataError(problems, header=header)
        message = format_problems(problems, header=header + f"; {len(items)} good item(s) kept")
        warnings.warn(message, stacklevel=3)  # once: a logger line as well printed every problem twice
    return items


def _verify_item(
    item: dict[str, Any], keys: Sequence[str], verify: str, frame_key: str, expand_frames: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Check one item's files; returns the item (one per frame for multi-frame files) or its problems."""
    present = [key for key in keys if key in item]
    if verify == "none":
        return [item], []
    infos, problems = {}, []
    for key in present:
        try:
            infos[key] = probe_picture(item[key])
        except DataError as error:
            problems += error.problems
    if problems:
        return [], problems
    sizes = {(info.width, info.height) for info in infos.values()}
    if len(sizes) > 1:
        described = ", ".join(f"{key} {info.width}x{info.height}" for key, info in infos.items())
        return [], [(item[present[0]], f"image/mask size mismatch (width x height): {described}")]
    frame_counts = {info.frames for info in infos.values()}
    frames = max(frame_counts)
    if len(frame_counts) > 1:
        described = ", ".join(f"{key} {info.frames}" for key, info in infos.items())
        return [], [(item[present[0]], f"frame counts differ: {described}")]
    if frames > 1 and frame_key not in item:
        if not expand_frames:
            return [], [(item[present[0]], f"{frames} frames where one 2D frame is expected")]
        items = [{**item, frame_key: index} for index in range(frames)]
    else:
        items = [item]
    if verify == "full":
        for frame_item in items:
            for key in present:
                try:
                    read_picture(frame_item[key], frame=frame_item.get(frame_key) if frames > 1 else None)
                except DataError as error:
                    problems += error.problems
        if problems:
            return [], problems
    return items, []


def validate_datalist(
    datalist: Iterable[dict[str, Any]],
    keys: Sequence[str] = ("image", "label"),
    verify: str = "header",
    on_error: str = "raise",
    frame_key: str = "frame",
    expand_frames: bool = True,
    source: PathLike = "the datalist",
) -> list[dict[str, Any]]:
    """Check the files of a datalist and report every bad one at once.

    Args:
        datalist: items with file paths under ``keys``.
        keys: the keys holding picture files (missing keys are skipped, as in image-only lists).
        verify: ``"none"``; ``"header"`` (read headers: extension, readability, 2D, channels, truncation marker,
            DICOM pixel data and decoder, image/mask sizes); ``"full"`` (decode every picture, slower).
        on_error: ``"raise"`` a :class:`DataError` naming every bad file, or ``"skip"`` them with a warning.
        frame_key: item key for the frame index of multi-frame files.
        expand_frames: list each frame of a multi-frame file as an item of its own.
        source: how the report names where the datalist came from.

    Returns:
        The good items (multi-frame files expanded).
    """
    _check_options(verify, on_error)
    items, problems = [], []
    for item in datalist:
        good, bad = _verify_item(dict(item), keys, verify, frame_key, expand_frames)
        items += good
        problems += bad
    return _finish(items, problems, on_error, source)


def _pairs(
    images: dict[str, str],
    masks: dict[str, str] | None,
    stems: Iterable[str],
    image_folder: Path,
    mask_folder: Path | None,
    image_key: str,
    label_key: str,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    items, problems = [], []
    for stem in stems:
        if stem not in images:
            continue
        if masks is None:
            items.append({image_key: images[stem]})
        elif stem in masks:
            items.append({image_key: images[stem], label_key: masks[stem]})
        else:
            problems.append((images[stem], f"no mask with the stem '{stem}' in {mask_folder}"))
    if masks is not None:
        problems += [
            (path, f"no image with the stem '{stem}' in {image_folder}")
            for stem, path in masks.items()
            if stem not in images
        ]
    return items, problems


def _folders(root: Path, image_dir: str | None, mask_dir: str | None) -> tuple[Path, Path | None]:
    if not root.exists():
        raise DataError([(str(root), "folder not found")])
    if not root.is_dir():
        raise DataError([(str(root), "not a folder")])
    image_folder = root / image_dir if image_dir else root
    if not image_folder.is_dir():
        image_folder, mask_dir = root, None  # a flat folder of images, for inference
    mask_folder = root / mask_dir if mask_dir and (root / mask_dir).is_dir() else None
    return image_folder, mask_folder


def folder_datalist(
    root: PathLike,
    image_dir: str | None = "images",
    mask_dir: str | None = "masks",
    mask_suffix: str = "",
    require_masks: bool | None = None,
    verify: str = "header",
    on_error: str = "raise",
    expand_frames: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    frame_key: str = "frame",
) -> list[dict[str, Any]]:
    """A datalist from a folder of images and masks matched by file stem, or from a flat folder of images.

    Layouts: ``root/<image_dir>/*`` with ``root/<mask_dir>/*`` (pairs); ``root/<image_dir>/*`` alone, or pictures
    directly in ``root`` (image-only items, for inference). Hidden files are ignored; any other file with an unknown
    extension is reported.

    Args:
        root: the dataset folder.
        image_dir: sub-folder of the images; ``None`` (or a missing sub-folder) takes the pictures in ``root`` itself.
        mask_dir: sub-folder of the masks; ``None`` or missing gives an image-only list.
        mask_suffix: what mask stems add to their image's stem (``"_mask"`` for ``12_mask.png`` beside ``12.jpg``).
        require_masks: ``True`` makes a missing mask folder an error; ``None`` takes masks where the folder exists.
        verify: see :func:`validate_datalist`.
        on_error: see :func:`validate_datalist`.
        expand_frames: see :func:`validate_datalist`.
        image_key: item key of the image.
        label_key: item key of the mask.
        frame_key: item key of the frame index of multi-frame files.

    Returns:
        Items ``{"image": path, "label": path}`` (``"label"`` left out without masks), sorted by stem; a multi-frame
        file gives one item per frame, and :func:`split_by_case` keeps those frames together (a folder has no
        ``"case"`` keys, so a split of it is per file).

    Raises:
        DataError: every unmatched, unlisted or unreadable file (``on_error="raise"``), or no picture at all.
    """
    _check_options(verify, on_error)
    root = Path(root).expanduser().resolve()
    image_folder, mask_folder = _folders(root, image_dir, mask_dir)
    if require_masks and mask_folder is None:
        raise DataError([(str(root / (mask_dir or "")), "mask folder not found")])
    images, problems = _index_folder(image_folder)
    masks = None
    if mask_folder is not None:
        masks, mask_problems = _index_folder(mask_folder, mask_suffix)
        problems += mask_problems
    if not images and not problems:
        raise DataError([(str(image_folder), "empty folder: no picture files")])
    items, pair_problems = _pairs(images, masks, sorted(images), image_folder, mask_folder, image_key, label_key)
    items, verify_problems = _verify_all(items, (image_key, label_key), verify, frame_key, expand_frames)
    return _finish(items, problems + pair_problems + verify_problems, on_error, root)


def _verify_all(
    items: list[dict[str, Any]], keys: Sequence[str], verify: str, frame_key: str, expand_frames: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    good, problems = [], []
    for item in items:
        kept, bad = _verify_item(item, keys, verify, frame_key, expand_frames)
        good += kept
        problems += bad
    return good, problems


def _read_ids(ids_file: Path) -> list[str]:
    if not ids_file.is_file():
        raise DataError([(str(ids_file), "id list not found")])
    lines = (line.strip() for line in ids_file.read_text().splitlines())
    return [file_stem(line) for line in lines if line and not line.startswith("#")]


def split_datalist(
    root_or_roots: PathLike | Sequence[PathLike],
    ids_file: PathLike | Sequence[PathLike],
    image_dir: str = "images",
    mask_dir: str | None = "masks",
    mask_suffix: str = "",
    verify: str = "header",
    on_error: str = "raise",
    expand_frames: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    frame_key: str = "frame",
) -> list[dict[str, Any]]:
    """A datalist of the pairs named in id lists (one file stem per line), such as the PraNet split.

    ``split_datalist([kvasir, clinicdb], ["train_kvasir.txt", "train_clinicdb.txt"])`` gives the 1450 PraNet
    training pairs. Ids are file stems (an extension, if given, is ignored); blank lines and ``#`` comments are
    skipped.

    Args:
        root_or_roots: a dataset folder, or several.
        ids_file: an id list for each root (one list is applied to every root).
        image_dir: sub-folder of the images in each root.
        mask_dir: sub-folder of the masks; ``None`` for image-only lists.
        mask_suffix: see :func:`folder_datalist`.
        verify: see :func:`validate_datalist`.
        on_error: see :func:`validate_datalist`.
        expand_frames: see :func:`validate_datalist`.
        image_key: item key of the image.
        label_key: item key of the mask.
        frame_key: item key of the frame index of multi-frame files.

    Returns:
        The items in id-list order, root after root.

    Raises:
        DataError: every listed id without an image or mask and every unreadable file (``on_error="raise"``).
    """
    _check_options(verify, on_error)
    roots = [root_or_roots] if isinstance(root_or_roots, (str, os.PathLike)) else list(root_or_roots)
    id_files = [ids_file] if isinstance(ids_file, (str, os.PathLike)) else list(ids_file)
    if len(id_files) == 1:
        id_files = id_files * len(roots)
    if len(id_files) != len(roots):
        raise ValueError(f"{len(roots)} roots but {len(id_files)} id lists: give one list per root, or one for all")
    items, problems = [], []
    for root, id_file in zip(roots, id_files):
        root = Path(root).expanduser().resolve()
        id_file = Path(id_file).expanduser().resolve()
        if not (root / image_dir).is_dir():
            raise DataError([(str(root / image_dir), "image folder not found")])
        mask_folder = root / mask_dir if mask_dir else None
        if mask_folder is not None and not mask_folder.is_dir():
            raise DataError([(str(mask_folder), "mask folder not found")])
        images, index_problems = _index_folder(root / image_dir)
        masks, mask_problems = _index_folder(mask_folder, mask_suffix) if mask_folder else (None, [])
        ids = _read_ids(id_file)
        listed = set(ids)
        problems += [problem for problem in index_problems + mask_problems if file_stem(problem[0]) in listed]
        problems += [
            (str(root / image_dir / stem), f"listed in {id_file.name} but no image with this stem")
            for stem in ids
            if stem not in images
        ]
        masks_of_ids = None if masks is None else {stem: masks[stem] for stem in ids if stem in masks}
        pairs, pair_problems = _pairs(images, masks_of_ids, ids, root / image_dir, mask_folder, image_key, label_key)
        items += pairs
        problems += pair_problems
    items, verify_problems = _verify_all(items, (image_key, label_key), verify, frame_key, expand_frames)
    return _finish(items, problems + verify_problems, on_error, ", ".join(str(p) for p in id_files))


def load_datalist(
    source: PathLike,
    data_list_key: str = "training",
    base_dir: PathLike | None = None,
    verify: str = "header",
    on_error: str = "raise",
    **folder_kwargs: Any,
) -> list[dict[str, Any]]:
    """A datalist from a MONAI datalist JSON file (read as MONAI reads it) or from a folder.

    What a bundle's ``dataset_dir`` may be: a folder for :func:`folder_datalist`, or a JSON file for
    ``monai.data.load_decathlon_datalist`` (relative paths resolved against ``base_dir``, by default the JSON's
    folder), whose items are then checked with :func:`validate_datalist`.

    Args:
        source: a folder or a ``.json`` datalist.
        data_list_key: the JSON's list to read (``"training"``, ``"validation"``, ``"testing"``, ...).
        base_dir: folder relative paths in the JSON start from.
        verify: see :func:`validate_datalist`.
        on_error: see :func:`validate_datalist`.
        folder_kwargs: further arguments of :func:`folder_datalist` for a folder.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return folder_datalist(source, verify=verify, on_error=on_error, **folder_kwargs)
    if not source.is_file():
        raise DataError([(str(source), "neither a folder nor a datalist file")])
    try:
        datalist = load_decathlon_datalist(source, is_segmentation=True, data_list_key=data_list_key, base_dir=base_dir)
    except json.JSONDecodeError as error:
        raise DataError([(str(source), f"not a JSON datalist: {error}")]) from None
    except ValueError as error:
        raise DataError([(str(source), str(error))]) from None
    keys = (folder_kwargs.get("image_key", "image"), folder_kwargs.get("label_key", "label"))
    return validate_datalist(datalist, keys=keys, verify=verify, on_error=on_error, source=source)


def item_case(item: dict[str, Any], case_key: str = "case", image_key: str = "image") -> str:
    """The case an item belongs to: its ``case_key`` value when it has one, else its source file.

    A case is what a split keeps whole: every frame of a multi-frame file (same ``image``), or every item a datalist
    gives the same ``"case"`` (the frames of one video stored as separate files, the pictures of one patient).
    """
    if case_key in item:
        return f"case:{item[case_key]}"
    return f"file:{item[image_key]}"


def with_case_index(datalist: Sequence[dict[str, Any]], key: str = "case_index") -> list[dict[str, Any]]:
    """Copies of the items, each with its position in ``datalist`` under ``key`` (``0, 1, ...``).

    The bundle's training list goes through this: the index survives MONAI's collation as a ``[B]`` tensor and reaches
    the network as ``sources=`` (``PrepareBatchExtraInput``), so every memory slot the training batches write records
    its case (``MemoryBank.sources``), an index into the names of the same list in the same order
    (:class:`~monai_ecrm.handlers.case_names.CaseNamesHandler`). A ``DistributedSampler`` shards the indexed list, so
    the indices are global. An index already in an item is replaced: it is a position, not an identity.
    """
    return [{**item, key: index} for index, item in enumerate(datalist)]


def split_by_case(
    datalist: Sequence[dict[str, Any]],
    val_fraction: float,
    seed: int = 0,
    case_key: str = "case",
    image_key: str = "image",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A random training/validation split that never puts one case on both sides.

    Cases (:func:`item_case`: the ``case_key`` value, else the source file, so the frames of a multi-frame file
    stay together) are taken in order of first appearance, shuffled with ``random.Random(seed)``, and
    ``round(val_fraction * number of cases)`` of them (at least one, when there are two cases or more and
    ``val_fraction > 0``) are held out. The held-out share is ``val_fraction`` of the cases, not of the items. The
    split depends only on the datalist and ``seed``; for a datalist of single-frame items without ``case_key`` it is
    the per-item split the bundle made before cases existed.

    Args:
        datalist: the items to split.
        val_fraction: share of the cases held out, in ``[0, 1)``.
        seed: seed of the draw.
        case_key: item key naming an item's case.
        image_key: item key of the source file, the case of items without ``case_key``.

    Returns:
        ``(training, validation)``, each in the datalist's order.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cases = [item_case(item, case_key, image_key) for item in datalist]
    names = list(dict.fromkeys(cases))
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    num_val = max(1, round(len(names) * val_fraction)) if len(names) > 1 and val_fraction > 0 else 0
    held_out = {names[index] for index in order[:num_val]}
    training = [item for item, case in zip(datalist, cases) if case not in held_out]
    validation = [item for item, case in zip(datalist, cases) if case in held_out]
    return training, validation


def pranet_datalist(
    data_root: PathLike,
    val_fraction: float = 0.1,
    seed: int = PRANET_VAL_SEED,
    split_dir: str = "pranet_split",
    verify: str = "header",
    on_error: str = "raise",
) -> dict[str, Any]:
    """The PraNet split as one datalist: training, a fixed held-out validation split, and the named test sets.

    Layout of ``data_root`` (that of ``../shared/data``): ``kvasir_seg/{images,masks}``,
    ``cvc_clinicdb/{images,masks}`` and ``<split_dir>/{train,test}_{kvasir,clinicdb}.txt``. The 1450 training pairs
    (900 Kvasir-SEG + 550 CVC-ClinicDB) are split by :func:`split_by_case` with a fixed ``seed``, so every run of
    every model and training seed validates on the same cases (145 with the defaults) and the test sets take no part
    in model selection. The id lists carry no ``"case"``, so that split is per file: CVC-ClinicDB's 612 frames come
    from a few dozen videos, and frames of one video can fall on both sides (add ``"case"`` keys to the items and
    drop ``"validation"`` to have the bundle re-split by video).

    Args:
        data_root: folder holding the two datasets and the id lists.
        val_fraction: share of the training cases held out for validation.
        seed: seed of that draw (:data:`PRANET_VAL_SEED` by default; keep it fixed).
        split_dir: folder of the id lists under ``data_root``.
        verify: see :func:`validate_datalist`.
        on_error: see :func:`validate_datalist`.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "description": str}``: ``{"image", "label"}``
        items with absolute paths; each ``"test"`` item also names its test set in ``"dataset"`` (``"kvasir"``:
        100 pairs, ``"clinicdb"``: 62), the key ``evaluate.json`` scores each test set by.

    Raises:
        DataError: a listed id without its files, an unreadable file, or a picture in both a training and a test
            list.
    """
    root = Path(data_root).expanduser().resolve()
    lists = root / split_dir
    options = {"verify": verify, "on_error": on_error}
    train = split_datalist(
        [root / folder for folder in PRANET_SETS.values()],
        [lists / f"train_{name}.txt" for name in PRANET_SETS],
        **options,
    )
    test = [
        {**item, "dataset": name}
        for name, folder in PRANET_SETS.items()
        for item in split_datalist(root / folder, lists / f"test_{name}.txt", **options)
    ]
    leaked = {item["image"] for item in train} & {item["image"] for item in test}
    if leaked:
        raise DataError([(path, "in a training list and a test list of the PraNet split") for path in sorted(leaked)])
    training, validation = split_by_case(train, val_fraction, seed)
    description = (
        f"PraNet split from {root}: training = train_{{kvasir,clinicdb}}.txt less the validation cases "
        f"({val_fraction:g} of them, per file, drawn with seed {seed}); test = test_{{kvasir,clinicdb}}.txt, "
        "named by each item's 'dataset'"
    )
    return {"description": description, "training": training, "validation": validation, "test": test}
