"""Which training cases the deployed ECRM memory is written from: a stated, recorded policy, never file order.

The memory of a trained model holds ``bank_size`` prototypes, one per case. The refresh that writes it with the final
weights (:func:`~monai_ecrm.handlers.refresh_memory`) writes whatever set it is given; :func:`select_memory_cases`
chooses that set. The bundle calls it on its indexed training list (``memory_cases`` in ``train.json``) and records
the policy, the seed and the chosen cases in the model record (``record["memory"]["selection"]``).

Policies (:data:`MEMORY_POLICIES`):

- ``"first"``: the first ``num_cases`` items, in list order (what the bundle did before; an accident of file order:
  the PraNet training list puts all of Kvasir-SEG before CVC-ClinicDB, so no CVC-ClinicDB case ever reached a
  memory). Kept as an explicit option only.
- ``"random"``: ``num_cases`` items drawn without replacement with ``random.Random(seed)``.
- ``"stratified"`` (the bundle's default): the same draw, made separately in each dataset (:func:`memory_group`), with
  the slots shared out in proportion to the datasets' sizes and at least one slot per dataset where there are enough
  slots (:func:`stratified_allocation` states the rounding rule).
- ``"kcenter"``: k-center greedy (farthest-point) over per-case feature vectors the caller provides (``features``,
  one row per item: e.g. the cases' prototypes, :func:`monai_ecrm.handlers.memory_refresh.case_prototypes`, computed
  with a trained network), the first center drawn with ``random.Random(seed)``: the chosen cases cover the feature
  space, so no region of it is far from every memory slot. It needs a network pass over the candidate cases, so the
  bundle, which chooses its refresh set before training, does not offer it; use it on a trained model (see the
  function's docstring).

Every policy returns the chosen items in list order (their order in ``items``), whatever order it picked them in, so
the result is one deterministic list. The draws depend only on ``seed``, the number of items, their order and their
groups (never on paths, the machine, or the global random state, which is left untouched): the same list and seed give
the same cases everywhere.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import PurePath
from typing import Any, Union

import torch

__all__ = ["MEMORY_POLICIES", "kcenter_greedy", "memory_group", "select_memory_cases", "stratified_allocation"]

#: accepted values of ``select_memory_cases(policy=...)``
MEMORY_POLICIES = ("first", "random", "stratified", "kcenter")

GroupKey = Union[str, Callable[[Any], Any], None]


def memory_group(item: Any, group_key: GroupKey = None, image_key: str = "image") -> str:
    """The dataset an item belongs to, for ``policy="stratified"``.

    - ``group_key`` a callable: ``str(group_key(item))``;
    - ``group_key`` a key: the item's value under it (an item without it is an error);
    - ``None`` (default): the item's ``"dataset"`` when it has one, else the name of the folder two levels above its
      image (``.../kvasir_seg/images/x.jpg`` -> ``"kvasir_seg"``, ``.../cvc_clinicdb/images/1.tif`` ->
      ``"cvc_clinicdb"``: the ``<dataset>/images/<file>`` layout of every dataset folder :mod:`~monai_ecrm.data`
      reads). An item that is a path is read as its image.

    Raises:
        ValueError: the item has no ``group_key`` or, with the default, neither a ``"dataset"`` nor an image path.
    """
    if callable(group_key):
        return str(group_key(item))
    if group_key is not None:
        if not isinstance(item, Mapping) or group_key not in item:
            raise ValueError(f"select_memory_cases: an item has no group key {group_key!r}: {_describe(item)}")
        return str(item[group_key])
    if isinstance(item, Mapping) and item.get("dataset") is not None:
        return str(item["dataset"])
    image = item.get(image_key) if isinstance(item, Mapping) else item
    if not isinstance(image, (str, PurePath)) and not hasattr(image, "__fspath__"):
        raise ValueError(
            f"select_memory_cases(policy='stratified'): an item has neither a 'dataset' nor an image path under "
            f"{image_key!r} to take its dataset from: {_describe(item)} (pass group_key)."
        )
    return PurePath(image).parent.parent.name


def stratified_allocation(sizes: Sequence[int], num_cases: int) -> list[int]:
    """How many of ``num_cases`` slots each group of ``sizes`` items gets (``policy="stratified"``).

    Rule, in exact (rational) arithmetic, so every machine shares out alike:

    1. ``num_cases >= sum(sizes)``: every item (``sizes``).
    2. Fewer slots than groups: one slot to each of the ``num_cases`` largest groups (ties: the group listed first).
    3. Otherwise every group gets at least one slot: while a group's quota ``n * size / total`` (over the groups and
       slots not yet settled) is below one, it gets exactly one and leaves the pool; the remaining groups share the
       remaining slots by largest remainder (Hamilton): each gets the integer part of its quota, and the slots left
       over go one each to the largest fractional parts (ties: the larger group, then the group listed first).

    No group gets more slots than it has items. For example 20 slots over 810 and 495 items: quotas 12.41 and 7.59,
    so 12 and 8; 4 slots over 6 and 4 items: 2.4 and 1.6, so 2 and 2; 3 slots over 100, 100 and 1 item: the small
    group's quota 0.015 gives it 1, then 1 and 1.

    Args:
        sizes: the number of items of each group (each >= 1), in the order the groups are listed.
        num_cases: the number of slots (>= 1).
    """
    sizes = [int(size) for size in sizes]
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"stratified_allocation: every group needs at least one item, got sizes {sizes}.")
    if num_cases < 1:
        raise ValueError(f"stratified_allocation: num_cases must be >= 1, got {num_cases}.")
    if num_cases >= sum(sizes):
        return list(sizes)
    counts = [0] * len(sizes)
    if num_cases < len(sizes):
        for group in sorted(range(len(sizes)), key=lambda g: (-sizes[g], g))[:num_cases]:
            counts[group] = 1
        return counts
    pool = list(range(len(sizes)))
    slots = num_cases
    while True:
        total = sum(sizes[g] for g in pool)
        small = [g for g in pool if Fraction(slots * sizes[g], total) < 1]
        if not small:
            break
        for group in small:
            counts[group] = 1
        slots -= len(small)
        pool = [g for g in pool if g not in small]
    if pool:
        total = sum(sizes[g] for g in pool)
        quotas = {g: Fraction(slots * sizes[g], total) for g in pool}
        for group in pool:
            counts[group] = int(quotas[group])  # floor: quotas are positive
        left = slots - sum(counts[g] for g in pool)
        ranked = sorted(pool, key=lambda g: (-(quotas[g] - int(quotas[g])), -sizes[g], g))
        for group in ranked[:left]:
            counts[group] += 1
    return counts


def kcenter_greedy(features: Any, num_cases: int, seed: int = 0) -> list[int]:
    """K-center greedy (farthest-point) selection: the indices of ``num_cases`` rows of ``features``, in the order
    picked.

    The first center is row ``random.Random(seed).randrange`` over the usable rows; each next one is the row farthest
    (Euclidean distance, float64 on the CPU) from its nearest center so far, ties going to the lowest index. This is
    the greedy 2-approximation of the k-center problem: it minimises, within a factor of two, the largest distance
    from any row to its nearest chosen row. Rows with a non-finite value (a case that wrote no prototype, e.g. a
    picture without a polyp under label prototypes) are never chosen; when fewer rows are usable than ``num_cases``,
    all the usable ones are returned.

    Args:
        features: ``[N, D]`` (or ``[N, ...]``, flattened) per-case vectors: a tensor or anything
            ``torch.as_tensor`` takes.
        num_cases: how many rows to choose (>= 1).
        seed: seed of the first center.
    """
    if num_cases < 1:
        raise ValueError(f"kcenter_greedy: num_cases must be >= 1, got {num_cases}.")
    points = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    if points.dim() < 2 or points.shape[0] == 0:
        raise ValueError(f"kcenter_greedy: features must be [N, D] with N >= 1, got shape {list(points.shape)}.")
    points = points.reshape(points.shape[0], -1)
    usable = torch.isfinite(points).all(dim=1)
    candidates = usable.nonzero().flatten().tolist()
    if not candidates:
        raise ValueError("kcenter_greedy: no row of features is finite: no case to choose.")
    first = candidates[random.Random(seed).randrange(len(candidates))]
    chosen = [first]
    nearest = torch.full((points.shape[0],), float("inf"), dtype=torch.float64)
    nearest[~usable] = -float("inf")
    center = first
    for _ in range(min(num_cases, len(candidates)) - 1):
        distance = ((points - points[center]) ** 2).sum(dim=1)
        distance[~usable] = -float("inf")  # NaN would win the argmax
        nearest = torch.minimum(nearest, distance)
        nearest[center] = -float("inf")
        center = int(torch.argmax(nearest))  # the first index among equal maxima
        chosen.append(center)
    return chosen


def select_memory_cases(
    items: Sequence[Any],
    num_cases: int,
    policy: str = "stratified",
    seed: int = 0,
    group_key: GroupKey = None,
    features: Any = None,
    image_key: str = "image",
) -> list[Any]:
    """The items the ECRM memory is written from: ``num_cases`` of ``items`` chosen by ``policy``, in list order.

    See the module's docstring for the policies. ``items`` are datalist items (dicts with an image path; the bundle's
    carry their ``case_index`` too, which the memory refresh records as each slot's source), returned as they are (not
    copied). With ``num_cases >= len(items)`` every item is returned, whatever the policy (a memory larger than the
    candidate set is written from all of it). The global random state is neither read nor changed.

    Args:
        items: the candidate cases (the training list).
        num_cases: how many to choose (the memory's ``bank_size``), >= 1.
        policy: one of :data:`MEMORY_POLICIES`.
        seed: seed of the draw (``"random"``, ``"stratified"``, and the first center of ``"kcenter"``; unused by
            ``"first"``).
        group_key: what ``"stratified"`` groups by (:func:`memory_group`): ``None`` for the dataset (the item's
            ``"dataset"``, else the folder two levels above its image), an item key, or a callable of the item.
        features: ``"kcenter"`` only, and required there: ``[len(items), D]`` per-case vectors, row ``i`` for
            ``items[i]`` (e.g. :func:`monai_ecrm.handlers.memory_refresh.case_prototypes` over the same items, with
            the trained network). For example, for a trained ``net`` and the bundle's eval preprocessing::

                features = case_prototypes(net, Dataset(training_cases, transform=eval_transforms(...)))
                cases = select_memory_cases(training_cases, 20, "kcenter", seed=0, features=features)
                refresh_memory(net, Dataset(cases, transform=eval_transforms(...)))

        image_key: key of the image path in the items (for the default groups).

    Raises:
        ValueError: an unknown policy, ``num_cases`` < 1 (or not an integer), an empty ``items``, a seed that is not an
            integer, ``"kcenter"`` without ``features`` or with another number of rows, or (``"stratified"``) an item
            whose dataset cannot be told.
    """
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"select_memory_cases: policy must be one of {MEMORY_POLICIES}, got {policy!r}.")
    if isinstance(num_cases, bool) or not isinstance(num_cases, numbers.Integral) or num_cases < 1:
        raise ValueError(
            f"select_memory_cases: num_cases must be an integer >= 1 (the memory size), got {num_cases!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"select_memory_cases: seed must be an integer, got {seed!r}.")
    num_cases, seed = int(num_cases), int(seed)
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ValueError(f"select_memory_cases: items must be a list of datalist items, got {type(items).__name__}.")
    items = list(items)
    if not items:
        raise ValueError("select_memory_cases: no items to choose the memory cases from (an empty training list).")
    if policy == "kcenter":
        if features is None:
            raise ValueError(
                "select_memory_cases(policy='kcenter') needs features: one vector per item, from a network pass "
                "over the items (monai_ecrm.handlers.memory_refresh.case_prototypes with a trained network). The "
                "bundle chooses its refresh set before training and offers 'first', 'random' and 'stratified'."
            )
        shape = list(torch.as_tensor(features).shape)
        rows = shape[0] if shape else 0
        if rows != len(items):
            raise ValueError(f"select_memory_cases(policy='kcenter'): {rows} feature rows for {len(items)} items.")
    if num_cases >= len(items):
        return items
    if policy == "first":
        chosen = list(range(num_cases))
    elif policy == "random":
        chosen = random.Random(seed).sample(range(len(items)), num_cases)
    elif policy == "stratified":
        chosen = _stratified(items, num_cases, seed, group_key, image_key)
    else:
        chosen = kcenter_greedy(features, num_cases, seed)
    return [items[index] for index in sorted(chosen)]


def _stratified(items: list[Any], num_cases: int, seed: int, group_key: GroupKey, image_key: str) -> list[int]:
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(memory_group(item, group_key, image_key), []).append(index)
    members = list(groups.values())  # groups in order of first appearance
    counts = stratified_allocation([len(indices) for indices in members], num_cases)
    rng = random.Random(seed)
    chosen: list[int] = []
    for indices, count in zip(members, counts):
        chosen += rng.sample(indices, count)
    return chosen


def _describe(item: Any) -> str:
    text = repr(dict(item) if isinstance(item, Mapping) else item)
    return text if len(text) <= 200 else text[:197] + "..."
