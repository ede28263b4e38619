"""A ring-buffer memory of per-class prototypes: the "exterior" memory that ECRM attends to.

All state lives in persistent buffers so that ``state_dict`` round trips (checkpoints, resume, export) restore the
memory exactly. The seed listing kept its "full" flag as a plain Python attribute and lost it on every resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from monai.utils import evenly_divisible_all_gather
from torch import nn

__all__ = ["MemoryBank", "MemorySizeMismatchError", "SIZE_MISMATCH_POLICIES"]

#: accepted values of ``MemoryBank(on_size_mismatch=...)``
SIZE_MISMATCH_POLICIES = ("error", "reset", "keep_newest")


class MemorySizeMismatchError(RuntimeError):
    """A checkpoint's ECRM memory does not fit the memory of the model it is loaded into."""


class MemoryBank(nn.Module):
    """Fixed-size ring buffer of class prototypes ``[num_slots, num_classes, channels]``.

    One slot holds the ``num_classes`` prototypes of one training image. Writes (:meth:`enqueue`) go in ring order:
    a batch larger than the free space wraps around and overwrites the oldest slots; if a batch holds more
    prototypes than there are slots, the newest ``num_slots`` are kept. Nothing is silently dropped.

    Rules the rest of the package relies on:

    - the memory is written only while the module is in training mode (``model.eval()`` freezes it, like
      BatchNorm's running statistics) and never takes gradient;
    - prototypes with a non-finite value are refused: counted in ``rejected``, warned about, never stored;
    - under ``torch.distributed`` with more than one rank the prototypes of all ranks are gathered (in rank order,
      unequal batch sizes allowed) before the write, so every rank holds the same memory (except inside
      :meth:`local_writes`);
    - the memory is stored in float32 whatever the autocast dtype of the caller.

    Buffers (all persistent): ``memory`` ``[S, K, C]`` float32, ``pointer`` (next slot to write), ``filled``
    (number of slots holding a prototype), ``rejected`` (prototypes refused since creation; :meth:`reset` keeps it,
    it is a lifetime count), ``sources`` ``[S]`` int64: the identity of the case that wrote each slot (an index into
    a names table kept beside the weights, see the provenance docs), ``-1`` for an empty slot or an unknown source.
    State dicts without ``sources`` (the seed listing's, and this package's before it existed) load with unknown
    sources, strict loading included.

    Names: ``source_names`` (a ``List[str]``) turns a source index into a case name (the refresh records the image
    paths of the refresh set, relative to their common folder). It travels with the weights: in the state dict as
    the module's extra state (``model.pt``), and as a typed attribute that ``torch.jit.script``/``save``/``load``
    keep (TorchScript drops extra state). A names table that does not cover every recorded source is refused.

    Loading a state dict whose memory has another number of slots raises :class:`MemorySizeMismatchError`, unless
    ``on_size_mismatch`` says otherwise:

    - ``"error"`` (default): raise, naming both slot counts and this argument;
    - ``"reset"``: ignore the checkpoint's memory and start empty;
    - ``"keep_newest"``: keep the checkpoint's newest ``min(S_checkpoint_filled, S)`` prototypes, oldest first.

    A different number of classes or channels is always an error: that is another architecture.

    Args:
        num_slots: number of slots ``S`` (images remembered), at least 1.
        num_classes: prototypes per slot ``K``.
        channels: channels ``C`` of one prototype.
        on_size_mismatch: policy when a loaded state dict has another slot count (see above).
    """

    def __init__(self, num_slots: int, num_classes: int, channels: int, on_size_mismatch: str = "error") -> None:
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"MemoryBank: num_slots must be >= 1, got {num_slots}.")
        if num_classes < 1 or channels < 1:
            raise ValueError(f"MemoryBank: num_classes and channels must be >= 1, got {num_classes}, {channels}.")
        if on_size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(
                f"MemoryBank: on_size_mismatch must be one of {SIZE_MISMATCH_POLICIES}, got {on_size_mismatch!r}."
            )
        self.num_slots = num_slots
        self.num_classes = num_classes
        self.channels = channels
        self.on_size_mismatch = on_size_mismatch
        self.register_buffer("memory", torch.zeros(num_slots, num_classes, channels))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("rejected", torch.zeros((), dtype=torch.long))
        self.register_buffer("sources", torch.full((num_slots,), -1, dtype=torch.long))
        # the names as UTF-8 bytes, one per line: a tensor like every other state-dict entry (code that averages or
        # copies state dicts keeps working), persisted in model.pt and kept by TorchScript
        self.register_buffer("source_names_utf8", torch.zeros(0, dtype=torch.uint8))
        self.source_names: list[str] = []
        self._local_writes = False
        # bumped by every change made through the bank (write, reset, state-dict load, mark_changed): readers that
        # keep something derived from the memory (ECRM's eval-time cache) compare it; not saved, not a buffer
        self.content_version = 0

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, num_classes={self.num_classes}, channels={self.channels}"

    @torch.jit.unused
    def set_source_names(self, names: list[str] | None) -> None:
        """The case names that ``sources`` index (``None`` or ``[]``: none). Refused when a recorded source has no
        name: the table would belong to another memory."""
        names = [str(name) for name in (names or [])]
        _check_names(self.sources, names, "MemoryBank.set_source_names")
        self._store_names(names)

    @torch.jit.unused
    def remap_sources(self, names: list[str]) -> int:
        """Make ``names`` the names table, each slot keeping its case: a recorded source is re-indexed to the
        position of its name in ``names`` (the first, if listed twice). A source without a name, or whose name is not
        in ``names``, becomes unknown (-1): a slot may lose its name, never get another case's. Returns the number
        of slots that had a source and lost it."""
        names = [str(name) for name in names]
        position: dict[str, int] = {}
        for index, name in enumerate(names):
            position.setdefault(name, index)
        old = self.source_names
        remapped = [position.get(old[index], -1) if 0 <= index < len(old) else -1 for index in self.sources.tolist()]
        lost = sum(1 for before, after in zip(self.sources.tolist(), remapped) if before >= 0 and after < 0)
        with torch.no_grad():  # in place: wrappers (DDP) hold the buffer itself
            self.sources.copy_(torch.tensor(remapped, dtype=torch.long))
        self._store_names(names)
        return lost

    @torch.jit.unused
    def _store_names(self, names: list[str]) -> None:
        if any("\n" in name for name in names):
            raise ValueError("MemoryBank: case names cannot contain a line break.")
        encoded = "\n".join(names).encode("utf-8") if names else b""
        self._buffers["source_names_utf8"] = torch.tensor(list(encoded), dtype=torch.uint8, device=self.memory.device)
        self.source_names = names

    @torch.jit.unused
    def sync_names(self) -> None:
        """Set ``source_names`` from the ``source_names_utf8`` buffer (after code that restores buffers directly)."""
        text = bytes(self.source_names_utf8.tolist()).decode("utf-8")
        self.source_names = text.split("\n") if text else []

    @torch.jit.unused
    def slot_names(self) -> list[str | None]:
        """The case name of every slot in storage order (``None`` for an empty slot or an unknown source)."""
        return [
            self.source_names[index] if 0 <= index < len(self.source_names) else None for index in self.sources.tolist()
        ]

    def is_empty(self) -> bool:
        """Whether no slot holds a prototype yet (a freshly built model, or right after :meth:`reset`)."""
        return int(self.filled) == 0

    def filled_memory(self) -> torch.Tensor:
        """The filled slots ``[F, K, C]`` in storage order (cheap view; order-free consumers such as attention)."""
        return self.memory[: int(self.filled)]

    def slots(self) -> torch.Tensor:
        """The filled slots ``[F, K, C]``, oldest first (a copy)."""
        filled = int(self.filled)
        if filled < self.num_slots:
            return self.memory[:filled].clone()
        pointer = int(self.pointer)
        return torch.cat([self.memory[pointer:], self.memory[:pointer]], dim=0)

    def mark_changed(self) -> None:
        """Declare that the memory buffers changed behind the bank's back (a write through ``.data``, numpy or a
        collective such as ``torch.distributed.broadcast``, which torch's in-place version counters do not see), so
        that what was derived from the memory (ECRM's eval-time cache of the projected memory) is recomputed."""
        self.content_version += 1

    def reset(self) -> None:
        """Empty the memory (contents zeroed, pointer and fill back to 0; ``rejected`` is kept)."""
        self.content_version += 1
        with torch.no_grad():
            self.memory.zero_()
            self.pointer.zero_()
            self.filled.zero_()
            self.sources.fill_(-1)
        if not torch.jit.is_scripting():
            self._store_names([])

    @contextmanager
    def local_writes(self) -> Iterator[None]:
        """Within this block writes are not gathered across ranks: a rank stores only its own prototypes.

        For code that writes the memory on one rank and then broadcasts it to the others (as
        :func:`~monai_ecrm.handlers.refresh_memory` does); without ``torch.distributed`` it changes nothing.
        """
        previous, self._local_writes = self._local_writes, True
        try:
            yield
        finally:
            self._local_writes = previous

    def enqueue(self, prototypes: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        """Write a batch of prototypes ``[B, K, C]`` in ring order (training mode only; no gradient).

        Args:
            prototypes: one row of ``K`` class prototypes per image.
            sources: ``[B]`` integer case identities written beside them (``sources`` buffer), in the same ring
                order; ``None`` records unknown sources (-1).
        """
        if not self.training:
            return
        if prototypes.dim() != 3 or prototypes.shape[1] != self.num_classes or prototypes.shape[2] != self.channels:
            raise ValueError(
                f"MemoryBank.enqueue: expected prototypes of shape [B, {self.num_classes}, {self.channels}], "
                f"got {list(prototypes.shape)}."
            )
        if sources is None:
            ids = torch.full((prototypes.shape[0],), -1, dtype=torch.long, device=self.memory.device)
        else:
            ids = sources.reshape(-1).to(dtype=torch.long, device=self.memory.device)
            if ids.shape[0] != prototypes.shape[0]:
                raise ValueError(f"MemoryBank.enqueue: {ids.shape[0]} sources for {prototypes.shape[0]} prototypes.")
        with torch.no_grad():
            self._write(prototypes.detach().to(dtype=self.memory.dtype, device=self.memory.device), ids)

    def _write(self, values: torch.Tensor, sources: torch.Tensor) -> None:
        self.content_version += 1
        if not torch.jit.is_scripting():
            values, sources = self._gather_across_ranks(values, sources)
        finite = torch.isfinite(values).flatten(1).all(dim=1)
        num_bad = int((~finite).sum())
        if num_bad > 0:
            self.rejected.add_(num_bad)
            warnings.warn(
                f"ECRM memory bank: refused {num_bad} of {values.shape[0]} prototype(s) with non-finite values "
                f"(rejected so far: {int(self.rejected)}). They were not stored.",
                stacklevel=2,
            )
            values = values[finite]
            sources = sources[finite]
        count = values.shape[0]
        if count == 0:
            return
        if count > self.num_slots:
            values = values[count - self.num_slots :]
            sources = sources[count - self.num_slots :]
            count = self.num_slots
        start = int(self.pointer)
        index = (torch.arange(count, device=self.memory.device) + start) % self.num_slots
        self.memory.index_copy_(0, index, values)
        self.sources.index_copy_(0, index, sources)
        self.pointer.fill_((start + count) % self.num_slots)
        self.filled.fill_(min(int(self.filled) + count, self.num_slots))

    @torch.jit.unused
    def _gather_across_ranks(self, values: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate the prototypes (and their sources) of every rank in rank order (unequal batch sizes
        allowed)."""
        dist = torch.distributed
        if self._local_writes or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return values, sources
        return evenly_divisible_all_gather(values, concat=True), evenly_divisible_all_gather(sources, concat=True)

    # ------------------------------------------------------------------ checkpoint compatibility
    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self.content_version += 1
        key = prefix + "memory"
        if key in state_dict:
            incoming = state_dict[key]
            if incoming.dim() != 3 or tuple(incoming.shape[1:]) != (self.num_classes, self.channels):
                raise MemorySizeMismatchError(
                    f"ECRM memory bank ({key}): the checkpoint stores prototypes of {list(incoming.shape[1:])} "
                    f"[classes, channels], this model expects [{self.num_classes}, {self.channels}]. This is a "
                    "checkpoint of another architecture (num_classes or feat_channels differ)."
                )
            if incoming.shape[0] != self.num_slots:
                self._load_other_size(state_dict, prefix, missing_keys, incoming)
                return
        sources_missing = key in state_dict and prefix + "sources" not in state_dict
        names_key = prefix + "source_names_utf8"
        names_missing = names_key not in state_dict
        if not names_missing:  # its length follows the names: take the incoming shape before the copy
            self._buffers["source_names_utf8"] = torch.zeros_like(
                torch.as_tensor(state_dict[names_key]), device=self.memory.device
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if sources_missing:
            # a memory saved before sources were recorded: its cases are unknown, which is not an error
            if prefix + "sources" in missing_keys:
                missing_keys.remove(prefix + "sources")
            with torch.no_grad():
                self.sources.fill_(-1)
        if names_missing:  # saved before names were recorded: no names
            if prefix + "source_names_utf8" in missing_keys:
                missing_keys.remove(prefix + "source_names_utf8")
            self._store_names([])
        else:
            self.sync_names()
            _check_names(self.sources, self.source_names, f"loading the ECRM memory ({prefix}source_names_utf8)")

    def _load_other_size(
        self, state_dict: Mapping[str, Any], prefix: str, missing_keys: list[str], incoming: torch.Tensor
    ) -> None:
        theirs, ours = int(incoming.shape[0]), self.num_slots
        if self.on_size_mismatch == "error":
            raise MemorySizeMismatchError(
                f"ECRM memory bank ({prefix}memory): the checkpoint holds {theirs} slots, this model has {ours} "
                f"(bank_size). Build the model with bank_size={theirs}, or pass on_size_mismatch='reset' "
                "(start with an empty memory) or on_size_mismatch='keep_newest' (keep the newest prototypes that "
                "fit) to the MemoryBank/ECRM/ECRMUNet (argument `bank_size_mismatch` of ECRMUNet)."
            )
        for name in ("pointer", "filled", "rejected"):
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
        self.reset()
        if prefix + "rejected" in state_dict:
            self.rejected.copy_(torch.as_tensor(state_dict[prefix + "rejected"]).reshape(()))
        if self.on_size_mismatch == "reset":
            warnings.warn(
                f"ECRM memory bank: checkpoint memory of {theirs} slots discarded (policy 'reset').", stacklevel=2
            )
            return
        their_filled = int(torch.as_tensor(state_dict.get(prefix + "filled", theirs)))
        their_pointer = int(torch.as_tensor(state_dict.get(prefix + "pointer", 0)))
        ordered = _oldest_first(incoming, their_pointer, their_filled)
        kept = ordered[max(0, ordered.shape[0] - ours) :]
        their_names = state_dict.get(prefix + "source_names_utf8")
        decoded = bytes(torch.as_tensor(their_names).tolist()).decode("utf-8") if their_names is not None else ""
        self._store_names(decoded.split("\n") if decoded else [])
        if their_names is None:
            missing_keys.append(prefix + "source_names_utf8")
        their_sources = state_dict.get(prefix + "sources")
        with torch.no_grad():
            if their_sources is not None:
                kept_sources = _oldest_first(torch.as_tensor(their_sources), their_pointer, their_filled)
                kept_sources = kept_sources[max(0, kept_sources.shape[0] - ours) :]
                self.sources[: kept_sources.shape[0]] = kept_sources.to(self.sources)
            self.memory[: kept.shape[0]] = kept.to(self.memory)
            self.filled.fill_(kept.shape[0])
            self.pointer.fill_(kept.shape[0] % ours)
        warnings.warn(
            f"ECRM memory bank: checkpoint memory of {theirs} slots loaded into {ours} slots "
            f"(policy 'keep_newest': {kept.shape[0]} newest prototypes kept).",
            stacklevel=2,
        )


def _check_names(sources: torch.Tensor, names: list[str], where: str) -> None:
    known = sources[sources >= 0]
    if names and known.numel() and int(known.max()) >= len(names):
        raise ValueError(
            f"{where}: the names table has {len(names)} names but the memory records source {int(known.max())}: "
            "it belongs to another memory (refresh the memory, or load the names saved with these weights)."
        )


# a class-level annotation TorchScript can read (the module uses postponed annotations, which it cannot resolve):
# the names survive torch.jit.script/save/load as a typed attribute
MemoryBank.__annotations__["source_names"] = list[str]


def _oldest_first(memory: torch.Tensor, pointer: int, filled: int) -> torch.Tensor:
    """The filled slots of a ring buffer, oldest first."""
    if filled < memory.shape[0]:
        return memory[:filled]
    return torch.cat([memory[pointer:], memory[:pointer]], dim=0)
