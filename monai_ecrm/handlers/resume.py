"""Exact resume: the random-number state a checkpoint must carry, and finding the checkpoint to resume from.

A training checkpoint for exact resume is MONAI's ``CheckpointSaver`` with
``save_dict={"network": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer, "rng": RandomState()}``
(the network's state dict holds the ECRM memory), saved at ``EPOCH_COMPLETED``; ``CheckpointLoader`` with the same
dict as ``load_dict`` restores it when the trainer starts. MONAI 1.6.1's ``CheckpointLoader`` reads the file with
``torch.load(weights_only=True)`` (no code runs from a checkpoint), which is why :class:`RandomState` stores only
tensors, ints, floats and lists. It also keeps the trainer's own ``max_epochs`` when that is larger than the saved
one, so a resumed run can train longer. (Its ``strict_shape=False`` option loads no network weights in 1.6.1: it
looks the parameters up in the whole checkpoint rather than in its ``"network"`` entry. Do not use it for resume.)

What the next epoch's randomness depends on, and how it is restored:

- the shuffling order and the base seed of the DataLoader workers are drawn from torch's global generator when the
  epoch's iterator is created (after ``EPOCH_STARTED``); each worker seeds Python, NumPy and torch from that base
  seed, and MONAI's ``DataLoader`` ``worker_init_fn`` seeds the dataset's random transforms from it. Restoring the
  torch global state (:class:`RandomState`) therefore reproduces shuffling and all augmentation in workers, provided
  the workers are not persistent (``persistent_workers=False``, the default);
- with ``num_workers=0`` the random transforms run in the main process, each with its own NumPy ``RandomState``:
  pass the dataset (or its transform) as ``RandomState(transforms=...)`` to save them too;
- Python's and NumPy's global generators, CUDA's generators and any ``torch.Generator`` given to a DataLoader.

Anything that draws from the global generators between the checkpoint and the next epoch must do the same in the
resumed run. Validation does not (its DataLoader iterator draws a seed when it starts): attach
:class:`PreserveRandomState` to the evaluator so validation leaves the training stream untouched, whatever the order
of the ``ValidationHandler`` and the ``CheckpointSaver``.

Under ``torch.distributed`` the checkpoint holds the random state of the rank that saved it, and every rank restores
it: the run resumes deterministically but not bit-identical to an uninterrupted multi-rank run.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PreserveRandomState", "RandomState", "latest_checkpoint", "transform_random_states"]


def _encode_numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    if name != "MT19937":
        raise ValueError(f"RandomState: unsupported NumPy bit generator {name!r}.")
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _decode_numpy_state(state: dict[str, Any]) -> tuple:
    keys = torch.as_tensor(state["keys"]).cpu().numpy().astype(np.uint32)  # map_location may have moved it
    return ("MT19937", keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def transform_random_states(transforms: Any) -> list[np.random.RandomState]:
    """Every NumPy ``RandomState`` of MONAI random transforms reachable from ``transforms``, in a fixed order.

    Args:
        transforms: a transform or ``Compose``, a dataset with a ``transform`` attribute, or a sequence of those.
            Nested transforms are searched (``RandAffined`` keeps separate generators in its inner transforms).
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif isinstance(obj, (Transform, Randomizable)):
            for value in vars(obj).values():
                visit(value)
        elif isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "transform"):
            visit(obj.transform)

    visit(transforms)
    return found


class RandomState:
    """The random-number state that the next epoch of a training run depends on, as a checkpointable object.

    ``state_dict()`` captures, at the moment it is called (when ``CheckpointSaver`` saves), the global generators of
    torch (CPU, and CUDA when initialised), NumPy and Python, the states of the given ``torch.Generator`` objects and
    of the given MONAI random transforms; ``load_state_dict()`` puts them back. Everything is encoded as tensors,
    ints, floats and lists, so ``torch.load(weights_only=True)`` reads it. See the module docstring for which of them
    reproduce the DataLoader shuffling, the workers' seeds and the augmentation.

    Use the same object in ``CheckpointSaver(save_dict=...)`` and ``CheckpointLoader(load_dict=...)``.

    Args:
        transforms: MONAI random transforms whose own generators should be saved (needed with ``num_workers=0``): a
            ``Compose``, a dataset (its ``transform``) or a sequence of them. ``None`` saves the global state only.
        generators: ``torch.Generator`` objects to save (e.g. the one given to a ``DataLoader(generator=...)``).
    """

    def __init__(self, transforms: Any = None, generators: Sequence[torch.Generator] | None = None) -> None:
        self.transforms = transforms
        self.generators = list(generators or [])

    def state_dict(self) -> dict[str, Any]:
        """The current random-number state (see the class docstring)."""
        version, python_state, gauss = random.getstate()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(cuda),
            "numpy": _encode_numpy_state(np.random.get_state()),
            "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
            "generators": [generator.get_state() for generator in self.generators],
            "transforms": [_encode_numpy_state(state.get_state()) for state in self._transform_states()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state captured by :meth:`state_dict`.

        Args:
            state_dict: the saved state.

        Raises:
            ValueError: the number of saved transform generators or ``torch.Generator`` objects differs from this
                object's (another preprocessing pipeline).
        """
        transform_states = self._transform_states()
        saved_transforms = state_dict.get("transforms", [])
        if len(saved_transforms) != len(transform_states):
            raise ValueError(
                f"RandomState: the checkpoint holds {len(saved_transforms)} random-transform state(s), this pipeline "
                f"has {len(transform_states)}: the checkpoint was written with other transforms (or with/without "
                "RandomState(transforms=...))."
            )
        saved_generators = state_dict.get("generators", [])
        if len(saved_generators) != len(self.generators):
            raise ValueError(
                f"RandomState: the checkpoint holds {len(saved_generators)} torch.Generator state(s), this object "
                f"has {len(self.generators)}."
            )
        torch.set_rng_state(torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu())
        cuda_states = state_dict.get("cuda", [])
        if cuda_states and torch.cuda.is_available():
            for index, state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(torch.as_tensor(state, dtype=torch.uint8).cpu(), index)
        np.random.set_state(_decode_numpy_state(state_dict["numpy"]))
        python = state_dict["python"]
        random.setstate((int(python["version"]), tuple(torch.as_tensor(python["state"]).tolist()), python["gauss"]))
        for generator, state in zip(self.generators, saved_generators):
            generator.set_state(torch.as_tensor(state, dtype=torch.uint8).cpu())
        for transform_state, state in zip(transform_states, saved_transforms):
            transform_state.set_state(_decode_numpy_state(state))

    def _transform_states(self) -> list[np.random.RandomState]:
        return [] if self.transforms is None else transform_random_states(self.transforms)


class PreserveRandomState:
    """Leaves the global random-number state as it was before the engine ran: attach it to the evaluator that a
    ``ValidationHandler`` runs inside training, so validation (whose DataLoader iterator draws a seed from torch's
    global generator) does not shift the training run's shuffling and augmentation. Then training gives the same
    weights whether or not, and however often, it validates, and the state saved by ``CheckpointSaver`` does not
    depend on whether it runs before or after validation.

    Events used: ``STARTED`` (capture) and ``COMPLETED`` (restore). Writes nothing to ``engine.state``.

    Args:
        generators: ``torch.Generator`` objects to preserve as well.
    """

    def __init__(self, generators: Sequence[torch.Generator] | None = None) -> None:
        self._state = RandomState(generators=generators)
        self._saved: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Register the capture and restore events.

        Args:
            engine: any ignite engine (typically the validation evaluator).
        """
        engine.add_event_handler(Events.STARTED, self.capture)
        engine.add_event_handler(Events.COMPLETED, self)

    def capture(self, engine: Engine | None = None) -> None:
        """Capture the current global state."""
        self._saved = self._state.state_dict()

    def __call__(self, engine: Engine | None = None) -> None:
        """Restore the state captured at ``STARTED``."""
        if self._saved is not None:
            self._state.load_state_dict(self._saved)
            self._saved = None


def _iteration_of(path: Path, key: str) -> int | None:
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: no memory map
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file (e.g. killed while saving) is skipped
        logging.getLogger(__name__).warning(f"latest_checkpoint: skipping unreadable {path}: {error}")
        return None
    state = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return None
    if "iteration" in state:
        return int(state["iteration"])
    if "epoch" in state and "epoch_length" in state:
        return int(state["epoch"]) * int(state["epoch_length"])
    return None


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "*.pt", key: str = "trainer") -> str | None:
    """The training checkpoint in ``ckpt_dir`` that is furthest into training, or ``None`` when there is none.

    Every file matching ``pattern`` is opened with ``torch.load(weights_only=True, mmap=True)`` (tensors are not
    read); files without a ``key`` entry holding an ignite engine state (e.g. a flat ``model.pt``) and unreadable
    files (a checkpoint cut short by a kill while saving) are skipped. The largest trainer iteration wins. On a tie,
    a file whose name does not contain ``final`` wins over one that does: ``CheckpointSaver`` writes the last epoch's
    checkpoint before the end-of-training refreshes (BatchNorm statistics, ECRM memory) and ``checkpoint_final.pt``
    after them, so resuming from the epoch file continues exactly the state training had (a resumed run then ends
    like an uninterrupted one), while the final file serves deployment. Otherwise the newer file wins. Usable as the
    bundle's resume path:
    ``"load_path": "$monai_ecrm.handlers.resume.latest_checkpoint(@ckpt_dir)"``.

    Args:
        ckpt_dir: the folder of ``CheckpointSaver``.
        pattern: glob of the candidate files.
        key: the ``save_dict`` key of the trainer.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    best: tuple[int, bool, float, str] | None = None
    for path in sorted(path for path in folder.glob(pattern) if path.is_file()):
        iteration = _iteration_of(path, key)
        if iteration is None:
            continue
        candidate = (iteration, "final" not in path.name, path.stat().st_mtime, str(path))
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[3]
