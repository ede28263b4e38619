"""Memory provenance: which training cases of the ECRM memory an image drew on, for the clinical command
(:mod:`monai_ecrm.clinical.explain`, which adds the runner) and the bundle's handlers alike (below both layers).

ECRM attends, at every position of its feature map, to a memory of class prototypes, each slot written from one
training case (:attr:`~monai_ecrm.networks.blocks.MemoryBank.sources`, named by ``source_names``). The share of that
attention each slot receives for an image, weighted over the predicted polyp, is
:meth:`~monai_ecrm.networks.nets.ECRMUNet.forward_with_shares`'s second output, computed in the forward that gives the
mask. ``monai-ecrm-infer --explain K`` reports the K cases with the largest shares:

- :class:`~monai_ecrm.clinical.explain.ExplainingRunner` (the command's): a runner that calls ``forward_with_shares``
  instead of ``forward`` (no second forward) and gives each frame's :class:`Explanation` and its report columns
  (:data:`EXPLAIN_COLUMNS`: ``explain_cases`` ``"a.jpg|b.jpg"``, ``explain_shares`` ``"0.412|0.201"``, the cases of
  one frame joined with ``|``, so the job can join the frames of a video with ``;``);
- :class:`ExplanationWriter`: ``<stem>_explain.png`` beside each mask (named as the mask, written atomically): the
  picture with the predicted contour, then a tile per memory case with its name and share;
- :class:`CasePictures`: the memory cases' pictures, found on the user's side under the folders given (the model
  record's ``training.dataset_dir``, ``--explain-root``); a case whose picture is not there gets a grey tile with its
  name. No picture of a training case travels with a model: only the names do.

A model whose memory is empty, or does not record which cases wrote it, cannot be explained: :func:`explain_problem`
says why (``monai-ecrm-infer`` logs it once and puts it in the report's :data:`NOTE_COLUMN`), and the runner gives the
masks alone.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_ecrm.data.errors import DataError
from monai_ecrm.transforms import NORMALIZATIONS
from monai_ecrm.transforms.io import LoadPolypImage
from monai_ecrm.writing import PartialFolder, prediction_path, source_key

__all__ = [
    "EXPLAIN_COLUMNS",
    "EXPLAIN_POSTFIX",
    "NOTE_COLUMN",
    "CasePictures",
    "Explanation",
    "ExplanationWriter",
    "MemoryCase",
    "compose_explanation",
    "explain_messages",
    "explain_problem",
    "explanation_from_shares",
    "memory_case_names",
]

EXPLAIN_COLUMNS = ("explain_cases", "explain_shares")
"""The report columns of an explained frame: the case names and their shares (3 decimals), largest share first, the
cases of a frame joined with ``|``."""
NOTE_COLUMN = "explain_note"
"""The report column saying why the model's frames are not explained (the same on every row; no
:data:`EXPLAIN_COLUMNS` then)."""
EXPLAIN_POSTFIX = "explain"
"""Output postfix of the explanation pictures: ``<stem>_explain.png`` beside ``<stem>_seg.png``."""
CASE_SEPARATOR = "|"
"""Joins the cases of one frame in the report (``;`` joins the frames of a video)."""

_INPUT_TILE = 256
_TILE = 192
_CAPTION = 40
_TITLE = 26
_GAP = 8
_BACKGROUND = (24, 24, 24)
_MISSING = (128, 128, 128)
_TEXT = (235, 235, 235)
_CONTOUR = (255, 230, 0)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class MemoryCase:
    """A memory slot an image attended to.

    Args:
        slot: the slot's index in storage order.
        name: the case that wrote it (a path relative to the refresh set's common folder, e.g.
            ``kvasir_seg/images/cju0qkwl35piu0993l0dewei2.jpg``), ``None`` when the memory does not record it.
        share: its share of ECRM's attention over the predicted polyp (the shares of the filled slots sum to 1).
    """

    slot: int
    name: str | None
    share: float

    @property
    def label(self) -> str:
        """The case's name, or ``slot <n> (case unknown)``."""
        return self.name if self.name is not None else f"slot {self.slot} (case unknown)"


@dataclass(frozen=True)
class Explanation:
    """The memory cases one frame drew on most, largest share first."""

    cases: tuple[MemoryCase, ...]

    def columns(self) -> dict[str, str]:
        """The frame's report values (:data:`EXPLAIN_COLUMNS`)."""
        return {
            EXPLAIN_COLUMNS[0]: CASE_SEPARATOR.join(case.label for case in self.cases),
            EXPLAIN_COLUMNS[1]: CASE_SEPARATOR.join(f"{case.share:.3f}" for case in self.cases),
        }


def _memory(network: torch.nn.Module) -> Any:
    """The ECRM memory bank of a network, ``None`` when it has none."""
    return getattr(getattr(network, "ecrm", None), "memory", None)


def memory_case_names(network: torch.nn.Module, record: Mapping[str, Any] | None = None) -> list[str | None]:
    """The case of each filled memory slot, in storage order (``None`` where it is not recorded).

    The memory's own names (``MemoryBank.slot_names``, saved with the weights) come first; a memory that records the
    slots' case indices but not their names takes them from the model record's ``memory.sources``.

    Args:
        network: an ECRM network (eager: a TorchScript module has no ``forward_with_shares``).
        record: the model's record.
    """
    bank = _memory(network)
    if bank is None:
        return []
    filled = int(bank.filled)
    names = list(bank.slot_names())[:filled]
    recorded = ((record or {}).get("memory") or {}).get("sources")
    if all(name is None for name in names) and isinstance(recorded, list) and recorded:
        sources = bank.sources.tolist()[:filled]
        names = [str(recorded[index]) if 0 <= index < len(recorded) else None for index in sources]
    return names


def explain_problem(network: Any, record: Mapping[str, Any] | None = None) -> str | None:
    """Why a model's frames cannot be explained, ``None`` when they can.

    Args:
        network: the model as loaded.
        record: the model's record.
    """
    if not callable(getattr(network, "forward_with_shares", None)):
        return "the model has no memory attention to report (a TorchScript or another runtime's model)"
    bank = _memory(network)
    if not getattr(network, "use_ecrm", True) or bank is None:
        return "the model has no ECRM memory (use_ecrm=False)"
    if int(bank.filled) == 0:
        return "the model's ECRM memory is empty: no training case to show"
    if all(name is None for name in memory_case_names(network, record)):
        return (
            "the model's memory does not record which training cases wrote it (a model saved before memory "
            "provenance: monai_ecrm.handlers.refresh_memory records them)"
        )
    return None


def explanation_from_shares(shares: torch.Tensor, names: Sequence[str | None], top_k: int) -> Explanation:
    """The ``top_k`` memory cases of one image with the largest shares (all filled slots when there are fewer).

    Args:
        shares: one image's shares ``[bank_size]`` (a row of
            :meth:`~monai_ecrm.networks.nets.ECRMUNet.forward_with_shares`'s second output).
        names: the case of each filled slot (:func:`memory_case_names`): the first ``len(names)`` slots are ranked.
        top_k: cases to keep.
    """
    filled = shares[: len(names)].detach().float().cpu()
    values, slots = torch.topk(filled, min(top_k, len(names)))
    cases = (MemoryCase(slot, names[slot], share) for slot, share in zip(slots.tolist(), values.tolist()))
    return Explanation(tuple(cases))


def explain_messages(
    names: list[str | None], top_k: int, pictures: CasePictures | None, option: str, root_option: str
) -> list[str]:
    """The ``explain`` log lines of a run, shared by the command and the bundle's handler: how many memory cases
    ``top_k`` can show and how many of their pictures were found under ``pictures.roots``. ``option`` and
    ``root_option`` name the settings as the user gave them (``--explain``/``--explain-root`` or the bundle's
    ``explain``/``--explain_root``)."""
    filled = len(names)
    messages = []
    if top_k > filled:
        messages.append(f"explain: {option} {top_k}: the memory holds {filled} cases: all {filled} shown")
    if pictures is None:
        return messages
    found = sum(pictures.path(name) is not None for name in names if name is not None)
    looked = ", ".join(map(str, pictures.roots)) or f"no folder: no {root_option}, no training folder in the record"
    hint = "" if found else f": their names are shown; {root_option} DIR names the folder of the training pictures"
    messages.append(f"explain: pictures of {found} of {filled} memory cases found (in {looked}){hint}")
    return messages


class CasePictures:
    """The pictures of the memory cases, found on the user's side: a case name (a path relative to the folder
    common to the refresh set) is looked for in each of ``roots`` in turn, as ``root/name``, then one and two folder
    levels below (a record's dataset folder above the images' folder). What was found is remembered; a case not found
    is shown by its name alone.

    Args:
        roots: folders to look in, first match wins (``--explain-root``, then the record's ``training.dataset_dir``).
        tile: the thumbnails' longest side in pixels (smaller pictures are enlarged), the side of the cases' tiles in
            the explanation pictures.
    """

    def __init__(self, roots: Iterable[str | os.PathLike | None], tile: int = _TILE) -> None:
        self.roots = [Path(root).expanduser() for root in roots if root]
        self.tile = tile
        self._paths: dict[str, Path | None] = {}
        self._thumbnails: dict[str, Image.Image | None] = {}
        self._prefixes: list[Path] = []
        self._folders: dict[Path, list[Path]] = {}
        self._loader = LoadPolypImage(as_label=False)

    def path(self, name: str) -> Path | None:
        """The picture file of a case, ``None`` when none of the roots holds it."""
        if name not in self._paths:
            self._paths[name] = self._find(_file_part(name))
        return self._paths[name]

    def _find(self, relative: str) -> Path | None:
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:  # names stay below a root
            return None
        for folder in self._prefixes:  # where earlier cases were found: one stat per case in the usual layout
            if (folder / relative).is_file():
                return folder / relative
        for root in self.roots:
            for folder in self._candidates(root):
                if (folder / relative).is_file():
                    self._prefixes.append(folder)
                    return folder / relative
        return None

    def _candidates(self, root: Path) -> list[Path]:
        """``root`` and the folders one and two levels below it (listed once)."""
        if root not in self._folders:
            children = _subfolders(root)
            self._folders[root] = [
                root,
                *children,
                *(grandchild for child in children for grandchild in _subfolders(child)),
            ]
        return self._folders[root]

    def thumbnail(self, name: str) -> Image.Image | None:
        """The case's picture (RGB, its longest side :attr:`tile`), ``None`` when not found or unreadable."""
        if name not in self._thumbnails:
            path = self.path(name)
            self._thumbnails[name] = None if path is None else self._read(path, _frame_part(name))
        return self._thumbnails[name]

    def _read(self, path: Path, frame: int | None) -> Image.Image | None:
        try:
            picture = self._loader(str(path), frame)
        except (DataError, OSError, ValueError, RuntimeError):  # shown by its name, as a case not found
            return None
        image = _to_pil(picture.as_tensor().numpy())
        return image.resize(_fitted(image.width, image.height, self.tile), Image.Resampling.BILINEAR)


def _file_part(name: str) -> str:
    """A case name without the ``#frame`` of a multi-frame item."""
    return name.rsplit("#", 1)[0] if _frame_part(name) is not None else name


def _frame_part(name: str) -> int | None:
    head, _, tail = name.rpartition("#")
    return int(tail) if head and tail.isdigit() else None


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(child for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    except OSError:
        return []


def _fitted(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` scaled, up or down, so that the longest side is ``size``."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_pil(picture: np.ndarray, mean: np.ndarray | float = 0.0, std: np.ndarray | float = 1.0) -> Image.Image:
    """A ``[3, H, W]`` picture normalised as ``(x - mean) / std``, ``x`` its intensities in ``[0, 1]``, as an RGB
    image (``mean`` and ``std`` per channel, ``[3, 1, 1]``, or one number)."""
    array = picture * (np.asarray(std, dtype=np.float32) * 255.0)
    array += np.asarray(mean, dtype=np.float32) * 255.0
    np.clip(array, 0.0, 255.0, out=array)
    np.rint(array, out=array)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in array.astype(np.uint8)])  # Pillow interleaves


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The caption font of ``size`` pixels, loaded once."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, its start cut off (``...``) until it fits ``width`` pixels: a path's end names the case."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


@functools.lru_cache(maxsize=2048)
def _label(text: str, size: int, width: int) -> Image.Image:
    """One line of ``text`` (:func:`_fit` to ``width`` pixels) as its coverage (``"L"``), to paste in its colour.

    Rendered once: the cases' names and the shares (3 decimals) come back frame after frame.
    """
    font = _font(size)
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    text = _fit(draw, text, font, width)
    right, bottom = draw.textbbox((0, 0), text, font=font)[2:]
    coverage = Image.new("L", (max(1, int(right)), max(1, int(bottom))))
    ImageDraw.Draw(coverage).text((0, 0), text, fill=255, font=font)
    return coverage


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` pixels (a path has no spaces to break at)."""
    lines, line = [], ""
    for character in text:
        if line and draw.textlength(line + character, font=font) > width:
            lines.append(line)
            line = ""
        line += character
    return [*lines, line][:10]


@functools.lru_cache(maxsize=256)
def _missing_tile(label: str, tile: int) -> Image.Image:
    """The grey tile of a case whose picture is not found, with its name (drawn once per case)."""
    box = Image.new("RGB", (tile, tile), _MISSING)
    note = ImageDraw.Draw(box)
    small = _font(12)
    lines = ["picture not found:", *_wrap(note, label, small, tile - 16)]
    top = (tile - 16 * len(lines)) // 2
    for number, line in enumerate(lines):
        note.text((8, top + 16 * number), line, fill=(255, 255, 255), font=small)
    return box


def _sampled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` ``[H, W]`` at ``size`` (width, height), nearest neighbour (each pixel's centre)."""
    width, height = size
    if mask.shape == (height, width):
        return mask
    rows = ((np.arange(height) + 0.5) * (mask.shape[0] / height)).astype(np.intp)
    columns = ((np.arange(width) + 0.5) * (mask.shape[1] / width)).astype(np.intp)
    return mask.take(rows, axis=0).take(columns, axis=1)  # two takes: ~10x faster than one fancy index


def _spread(mask: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """``combine`` over each pixel's 3x3 neighbourhood, the border repeated (``np.logical_and``: erosion,
    ``np.logical_or``: dilation)."""
    padded = np.pad(mask, 1, mode="edge")
    rows = combine(combine(padded[:-2], padded[1:-1]), padded[2:])
    return combine(combine(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _contour(mask: np.ndarray) -> np.ndarray:
    """The outline of a mask ``[H, W]`` (bool), two pixels wide: its edge pixels and their neighbours."""
    return _spread(mask & ~_spread(mask, np.logical_and), np.logical_or)


def compose_explanation(
    picture: Image.Image,
    mask: np.ndarray,
    cases: Sequence[MemoryCase],
    thumbnails: Sequence[Image.Image | None],
    title: str = "",
    tile: int = _TILE,
    input_tile: int = _INPUT_TILE,
) -> Image.Image:
    """The explanation picture: a row of tiles, the input with the predicted contour first (``input_tile`` pixels),
    then each memory case (``tile`` pixels: its picture, or a grey tile with its name) with its name, rank and share
    below; ``title`` above.

    Args:
        picture: the input picture (RGB, any size; shown with its aspect ratio).
        mask: the predicted mask ``[H, W]`` (bool) of the picture, at any size.
        cases: the memory cases, largest share first.
        thumbnails: each case's picture, ``None`` when not available.
        title: a line above the row.
        tile: the cases' tiles' side in pixels.
        input_tile: the input's tile's side in pixels.
    """
    width = 2 * _GAP + input_tile + len(cases) * (tile + _GAP)
    canvas = Image.new("RGB", (width, _TITLE + max(input_tile, tile) + _CAPTION), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    large = _font(14)
    draw.text((_GAP, 6), _fit(draw, title, large, width - 2 * _GAP), fill=_TEXT, font=large)

    shown = picture.copy()
    shown.thumbnail((input_tile, input_tile), Image.Resampling.BILINEAR)
    pixels = np.array(shown)
    pixels[_contour(_sampled(np.asarray(mask, dtype=bool), shown.size))] = _CONTOUR
    _centred(canvas, Image.fromarray(pixels), _GAP, input_tile)
    canvas.paste(_TEXT, (_GAP, _TITLE + input_tile + 4), _label("input, predicted contour", 12, input_tile))

    for rank, (case, thumbnail) in enumerate(zip(cases, thumbnails), start=1):
        left = 2 * _GAP + input_tile + (rank - 1) * (tile + _GAP)
        if thumbnail is not None:
            _centred(canvas, thumbnail, left, tile)
        else:
            canvas.paste(_missing_tile(case.label, tile), (left, _TITLE))
        canvas.paste(_TEXT, (left, _TITLE + tile + 4), _label(case.label, 12, tile))
        canvas.paste(_TEXT, (left, _TITLE + tile + 21), _label(f"{rank}. share {case.share:.3f}", 12, tile))
    return canvas


def _centred(canvas: Image.Image, picture: Image.Image, left: int, tile: int) -> None:
    """Paste ``picture`` centred in the tile of side ``tile`` at ``left`` under the title."""
    canvas.paste(picture, (left + (tile - picture.width) // 2, _TITLE + (tile - picture.height) // 2))


def _png(pixels: np.ndarray) -> bytes:
    """An RGB picture ``[H, W, 3]`` (uint8) as a PNG file: each row Up-filtered (minus the row above), deflated at
    level 1 with run-length matching only (zlib's ``Z_RLE``).

    Pillow's PNG encoder tries the five PNG filters on every row (about 10 ms per megabyte of pixels, whatever
    ``compress_level``) and searches for repeats: on explanation pictures (photographs on a flat background) this
    takes about a third of its time at ``compress_level=1`` for files of the same size, with the same pixels.
    """
    height, width = pixels.shape[:2]
    flat = pixels.reshape(height, -1)
    rows = np.empty((height, flat.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 2  # the Up filter; above the first row is zero
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # modulo 256, as PNG's filters are
    compressor = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    data = compressor.compress(rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits RGB, deflate, filtered rows, no interlace
    return b"".join([_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND", b"")])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


class ExplanationWriter:
    """Writes ``<stem>_explain.png`` (:func:`compose_explanation`) for an explained frame, beside its mask: the
    mask's name with ``explain`` for ``seg`` (:func:`~monai_ecrm.writing.prediction_path`, the job's output
    stems, so the collision rule of the masks holds), for DICOM sources too (``<stem>[_frameNNNN]_explain.png``),
    written in the job's private folder and renamed into place.

    Args:
        output_dir: the output folder.
        pictures: the memory cases' pictures.
        normalization: the network input's normalisation (undone to show the picture).
        threshold: the masks' threshold, for ``probabilities`` predictions.
        probabilities: the post-processed predictions are probabilities rather than 0/1 masks.
        data_root_dir: keep the sources' sub-folders below this folder in the output.
        partial: where files are written before they are renamed into place (the mask writer's).
        output_stems: the job's output stems (:func:`~monai_ecrm.writing.output_stems`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pictures: CasePictures,
        normalization: str = "imagenet",
        threshold: float = 0.5,
        probabilities: bool = False,
        data_root_dir: str | os.PathLike = "",
        partial: PartialFolder | None = None,
        output_stems: Mapping[str, str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pictures = pictures
        mean, std = NORMALIZATIONS[normalization]
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.threshold = threshold if probabilities else 0.5
        self.data_root_dir = data_root_dir
        self.partial = partial or PartialFolder(output_dir)
        self.output_stems = output_stems if output_stems is not None else {}

    def path(self, source: str | os.PathLike, frame: int | None = None) -> Path:
        """The explanation picture of a source file (or of one frame of a multi-frame file)."""
        stem = self.output_stems.get(source_key(source))
        return prediction_path(
            source, self.output_dir, frame, self.data_root_dir, EXPLAIN_POSTFIX, dicom_seg=False, stem=stem
        )

    def expected(self, source: str | os.PathLike, num_frames: int) -> list[Path]:
        """The explanation pictures of a finished source."""
        return [self.path(source, frame) for frame in ([None] if num_frames == 1 else range(num_frames))]

    def __call__(self, data: Mapping[str, Any], explanation: Explanation) -> Path:
        """Write the explanation picture of a post-processed frame (:meth:`compose`, then write it); its path.

        Args:
            data: the frame after the post-processing: ``image`` the network input ``[3, H, W]``, ``pred`` the mask
                (or probabilities) ``[1, W, H]`` at the source's size, with the source's metadata.
            explanation: the frame's memory cases.
        """
        return self.compose(data, explanation)()

    def compose(self, data: Mapping[str, Any], explanation: Explanation) -> Callable[[], Path]:
        """Compose the explanation picture of a post-processed frame; the call returned writes it as PNG in the
        private folder, renames it into place and returns its path.

        The call holds the GIL only briefly (zlib and the file system release it), so it may run in another thread
        while this one goes on; the private folder is made here, in the caller's thread.

        Args:
            data: see :meth:`__call__`.
            explanation: the frame's memory cases.
        """
        prediction = data["pred"]
        meta = prediction.meta
        values = prediction.as_subclass(torch.Tensor).detach().cpu().numpy()[0]  # [W, H] at the source's size
        shown = _fitted(values.shape[0], values.shape[1], _INPUT_TILE)  # the source's aspect ratio
        mask = _sampled(values, shown[::-1]).T >= self.threshold  # [H, W] at the tile's size, as AsDiscrete
        network_input = data["image"].as_subclass(torch.Tensor).detach().cpu().numpy()
        picture = _to_pil(network_input, self.mean, self.std).resize(shown, Image.Resampling.BILINEAR)
        thumbnails = [self.pictures.thumbnail(case.name) if case.name else None for case in explanation.cases]
        frame = int(meta.get("frame_index", -1))
        source = Path(meta["source_path"])
        title = f"{source.name}{f' frame {frame}' if frame >= 0 else ''}: the ECRM memory cases it drew on most"
        image = compose_explanation(picture, mask, explanation.cases, thumbnails, title, self.pictures.tile)
        final = self.path(source, frame if frame >= 0 else None)
        return functools.partial(_write_png, self.partial, image, self.partial.folder / final.name, final)


def _write_png(partial: PartialFolder, image: Image.Image, written: Path, final: Path) -> Path:
    written.write_bytes(_png(np.asarray(image)))
    return partial.publish(written, final)
