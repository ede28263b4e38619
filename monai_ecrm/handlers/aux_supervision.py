"""Side supervision of the ECRM coarse mask (the auxiliary output) on MONAI engines, and aux-head metrics."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_ecrm.networks.utils import unwrap_network

idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "AuxSupervisionHandler",
    "aux_to_label_size",
    "find_module",
    "has_memory",
    "loss_terms",
    "unwrap_network",
    "without_memory",
]

#: keys this handler adds to a trainer's ``engine.state.output``
LOSS_MAIN, LOSS_AUX, AUX_WEIGHT = "loss_main", "loss_aux", "aux_weight"
#: schedule types accepted in the declarative form of ``weight_schedule``
SCHEDULE_TYPES = ("constant", "linear", "cosine")


def has_memory(network: nn.Module, module_name: str = "ecrm") -> bool:
    """Whether ``network`` has an ECRM module with a memory at ``module_name`` (``False`` for FlexibleUNet, or an
    ECRMUNet built with ``use_ecrm=False``): the bundle's ECRM handlers then do nothing. (The aux handler still
    raises for a wrong ``module_name`` on a network that has a memory elsewhere.)"""
    from monai_ecrm.networks.blocks.memory_bank import MemoryBank

    try:
        module = unwrap_network(network).get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, MemoryBank) or isinstance(getattr(module, "memory", None), MemoryBank)


def without_memory(network: nn.Module, module_name: str = "ecrm") -> bool:
    """Whether the ECRM handlers should do nothing for ``network``: it has no memory at ``module_name`` and none
    anywhere else (a network with a memory under another name is a configuration error they report instead)."""
    from monai_ecrm.networks.blocks.memory_bank import MemoryBank

    if has_memory(network, module_name):
        return False
    return not any(isinstance(module, MemoryBank) for module in unwrap_network(network).modules())


def find_module(network: nn.Module, module_name: str) -> nn.Module:
    """The submodule ``module_name`` (a dotted path such as ``"ecrm"``) of the unwrapped ``network``.

    Raises:
        AttributeError: naming the path and the network class when there is no such submodule.
    """
    plain = unwrap_network(network)
    try:
        return plain.get_submodule(module_name)
    except AttributeError as error:
        raise AttributeError(
            f"{type(plain).__name__} has no submodule {module_name!r} (the ECRM module); pass module_name=... "
            "naming the ECRM module of this network."
        ) from error


def aux_to_label_size(aux_logits: torch.Tensor, label_size: Sequence[int], stride: int | None = None) -> torch.Tensor:
    """Upsample coarse-mask logits to the label's spatial size (bilinear in 2D, trilinear in 3D).

    With ``stride`` (the network's total stride, the input padded at the end of each axis to a multiple of it, as
    :class:`~monai_ecrm.networks.nets.ECRMUNet` does), the logits are upsampled by exactly ``stride`` and the padded
    part cropped off, so every coarse cell stays over the pixels it was computed from. Without it they are resized
    straight to ``label_size``.

    Args:
        aux_logits: ``[B, K, *coarse]``.
        label_size: spatial size of the label.
        stride: the network's total stride, or ``None``.
    """
    label_size = [int(size) for size in label_size]
    mode = "bilinear" if aux_logits.dim() == 4 else "trilinear"
    if stride is not None:
        padded = [int(size) * int(stride) for size in aux_logits.shape[2:]]
        if all(p >= s for p, s in zip(padded, label_size)):
            upsampled = F.interpolate(aux_logits, size=padded, mode=mode, align_corners=False)
            crop = tuple(slice(0, size) for size in label_size)
            return upsampled[(slice(None), slice(None), *crop)]
    return F.interpolate(aux_logits, size=label_size, mode=mode, align_corners=False)


def loss_terms(output: Any) -> dict[str, float] | None:
    """``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler``/``ProgressBar`` on a trainer: the total
    loss and, when :class:`AuxSupervisionHandler` is attached, its main and aux terms and the aux weight.

    Works on the decollated list (MONAI's default) and on the batch dict. In a bundle config:
    ``"output_transform": "$monai_ecrm.handlers.aux_supervision.loss_terms"``.
    """
    if isinstance(output, (list, tuple)):
        output = output[0] if output else None
    if not isinstance(output, Mapping):
        return None
    terms = {key: output[key] for key in (Keys.LOSS, LOSS_MAIN, LOSS_AUX, AUX_WEIGHT) if key in output}
    return {key: float(value) for key, value in terms.items()} or None


def _label_from_output(label_key: str) -> Callable[[Mapping], torch.Tensor]:
    def _label(output: Mapping) -> torch.Tensor:
        return output[label_key]

    return _label


class AuxSupervisionHandler:
    """Supervises the ECRM coarse mask on a MONAI trainer and reports aux-head metrics on a MONAI evaluator,
    with ``SupervisedTrainer``/``SupervisedEvaluator`` used unchanged.

    The network's ``forward`` returns only the segmentation logits; the coarse-mask logits (the second output of the
    ECRM module, ``net.<module_name>``) are captured by a forward hook that this handler registers when the engine
    starts and removes when it completes, and on :meth:`detach`. While the engine is not running the network carries
    no hook, so ``torch.jit.script``, export and plain inference of the same network work as before. (If a run ends
    with an exception the hook stays until :meth:`detach` or the next completed run.)

    The coarse logits are **upsampled to the label** (:func:`aux_to_label_size`; bilinear/trilinear, exactly by the
    network's stride with the padding cropped off when the network has an integer ``stride`` attribute as
    ``ECRMUNet`` does), never the label downsampled, so the same loss (e.g. ``DiceCELoss(sigmoid=True)``) and the
    same label serve both heads.

    On a trainer (``monai.engines.Trainer``), events used:

    - ``STARTED`` / ``COMPLETED``: register / remove the forward hook;
    - ``EPOCH_STARTED``: evaluate the weight schedule, reset the epoch means;
    - ``ITERATION_STARTED``: arm the capture (only the trainer's own forward pass is captured);
    - ``IterationEvents.LOSS_COMPLETED`` (between the loss and ``backward``): ``__call__`` replaces
      ``engine.state.output["loss"]`` with ``loss_main + weight * loss(aux, label)``.

    Written to ``engine.state``: ``output["loss_main"]``, ``output["loss_aux"]``, ``output["aux_weight"]`` (floats;
    :func:`loss_terms` is the ``output_transform`` that shows them in ``StatsHandler``/``TensorBoardStatsHandler``),
    ``state.aux_weight``, and, with ``epoch_metrics``, the running epoch means ``metrics["train_loss_main"]`` and
    ``metrics["train_loss_aux"]`` (updated every iteration, so epoch-level stats handlers show them whatever the
    handler order).

    On an evaluator (any other MONAI workflow), events used: ``STARTED``/``COMPLETED`` (hook), ``EPOCH_STARTED``
    (reset), ``ITERATION_STARTED`` (arm), ``IterationEvents.FORWARD_COMPLETED`` (``__call__``: the aux Dice of the
    batch against the batch's label, before any post-transform). Written to ``engine.state``:
    ``metrics[metric_name]``, the mean Dice over samples and classes (MONAI ``MeanDice`` conventions: empty-label
    cases ignored), updated every iteration so it is in place before any ``EPOCH_COMPLETED`` handler runs; under
    ``torch.distributed`` it is reduced over ranks at the last iteration of the epoch. The batch output, the main
    metrics and the post-transforms are untouched. The coarse mask is discretised with a sigmoid and ``threshold``
    (one class) or an argmax (several classes; a one-channel label is one-hot encoded). An inferer that calls the
    network several times per batch (sliding window) gives no single coarse map: the metric is skipped, with a
    warning.

    Use one instance per engine (the trainer's and the evaluator's are separate objects in a config).

    Args:
        loss: the aux loss, any callable ``loss(aux_logits, label)`` such as ``monai.losses.DiceCELoss(sigmoid=True)``
            (its mean is taken).
        weight: weight of the aux loss (trainer), when ``weight_schedule`` is ``None``.
        weight_schedule: ``None`` (constant ``weight``), a callable ``epoch -> weight`` (epochs counted from 1), or the
            JSON-friendly form ``{"type": "linear" | "cosine" | "constant", "start": 0.4, "end": 0.1}``: ``start`` at
            epoch 1, ``end`` at ``max_epochs`` (linear, or half a cosine); ``start`` defaults to ``weight``. A resumed
            run with a larger ``max_epochs`` stretches the schedule to the new end.
        module_name: dotted path of the ECRM module in the (unwrapped) network; its output ``aux_index`` is the coarse
            mask.
        label_key: key of the label in ``engine.state.output`` (used by the default ``output_transform``).
        metric_name: name of the aux Dice in the evaluator's ``engine.state.metrics``.
        threshold: probability threshold of the one-class coarse mask (evaluator).
        output_transform: ``engine.state.output -> label`` batch tensor (the batch dict, before decollation); default
            reads ``label_key``.
        aux_index: position of the coarse logits in the ECRM module's output tuple.
        aux_stride: ``"auto"`` reads the network's integer ``memory_stride`` attribute (the stride of ECRM's level),
            else its ``stride`` (see above); an int gives it, ``None`` resizes the coarse logits straight to the label
            size.
        include_background: as in ``MeanDice`` (evaluator).
        epoch_metrics: write the epoch means of the two loss terms to the trainer's ``engine.state.metrics``.
        name: logger name; ``None`` uses ``engine.logger``.
    """

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weight: float = 0.4,
        weight_schedule: Callable[[int], float] | Mapping[str, Any] | None = None,
        module_name: str = "ecrm",
        label_key: str = "label",
        metric_name: str = "val_aux_dice",
        threshold: float = 0.5,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        aux_index: int = 1,
        aux_stride: int | str | None = "auto",
        include_background: bool = True,
        epoch_metrics: bool = True,
        name: str | None = None,
    ) -> None:
        if isinstance(weight_schedule, Mapping):
            kind = weight_schedule.get("type", "linear")
            if kind not in SCHEDULE_TYPES:
                raise ValueError(f"AuxSupervisionHandler: weight_schedule type must be one of {SCHEDULE_TYPES}.")
            if kind != "constant" and "end" not in weight_schedule:
                raise ValueError("AuxSupervisionHandler: a linear or cosine weight_schedule needs an 'end' weight.")
        elif weight_schedule is not None and not callable(weight_schedule):
            raise TypeError("AuxSupervisionHandler: weight_schedule must be None, a callable or a mapping.")
        if isinstance(aux_stride, str) and aux_stride != "auto":
            raise ValueError(f"AuxSupervisionHandler: aux_stride must be 'auto', an int or None, got {aux_stride!r}.")
        self.loss = loss
        self.weight = float(weight)
        self.weight_schedule = weight_schedule
        self.module_name = module_name
        self.label_key = label_key
        self.metric_name = metric_name
        self.threshold = threshold
        self.output_transform = output_transform or _label_from_output(label_key)
        self.aux_index = aux_index
        self.aux_stride = aux_stride
        self.include_background = include_background
        self.epoch_metrics = epoch_metrics
        self._name = name
        self.logger = logging.getLogger(name)
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._armed = False
        self._captured: list[torch.Tensor] = []
        self._registered: list[tuple[Any, Callable]] = []
        self._is_trainer = False
        self._current_weight = self.weight
        self._sums: dict[str, float] = {}
        self._count = 0
        self._warned = False

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Engine) -> None:
        """Register the events on a MONAI trainer or evaluator (see the class docstring).

        Args:
            engine: a MONAI ``Workflow`` (``SupervisedTrainer``, ``SupervisedEvaluator``) with a ``network``.
        """
        from monai.engines import Trainer

        if self._name is None:
            self.logger = engine.logger
        self._is_trainer = isinstance(engine, Trainer)
        work = IterationEvents.LOSS_COMPLETED if self._is_trainer else IterationEvents.FORWARD_COMPLETED
        for event, handler in (
            (Events.STARTED, self._register_hook),
            (Events.EPOCH_STARTED, self._start_epoch),
            (Events.ITERATION_STARTED, self._arm),
            (work, self),
            (Events.COMPLETED, self._remove_hook),
        ):
            engine.add_event_handler(event, handler)
            self._registered.append((event, handler))

    def detach(self, engine: Engine) -> None:
        """Remove this handler's events from ``engine`` and its hook from the network."""
        for event, handler in self._registered:
            if engine.has_event_handler(handler, event):
                engine.remove_event_handler(handler, event)
        self._registered.clear()
        self._remove_hook(engine)

    def _register_hook(self, engine: Engine) -> None:
        self._remove_hook(engine)
        # looked up when the run starts: MONAI workflows attach their handlers before they set `engine.network`
        if not isinstance(getattr(engine, "network", None), nn.Module):
            raise TypeError("AuxSupervisionHandler: the engine has no `network` module (use a MONAI engine).")
        self._inactive = without_memory(engine.network, self.module_name)
        if self._inactive:
            # a network without ECRM (FlexibleUNet, ECRMUNet(use_ecrm=False)): no coarse mask to supervise
            engine.logger.debug(f"AuxSupervisionHandler: no ECRM module {self.module_name!r}; nothing to do.")
            return
        module = find_module(engine.network, self.module_name)
        self._hook = module.register_forward_hook(self._capture)

    def _remove_hook(self, engine: Engine | None = None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._armed = False
        self._captured = []

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._captured.append(output[self.aux_index])

    def _arm(self, engine: Engine) -> None:
        self._captured = []
        self._armed = True

    def _take(self) -> list[torch.Tensor]:
        captured, self._captured, self._armed = self._captured, [], False
        return captured

    def _start_epoch(self, engine: Engine) -> None:
        self._sums = {}
        self._count = 0
        if self._is_trainer:
            self._current_weight = self.weight_at(engine.state.epoch, engine.state.max_epochs)
            engine.state.aux_weight = self._current_weight

    def weight_at(self, epoch: int, max_epochs: int | None) -> float:
        """The aux weight of ``epoch`` (counted from 1) in a run of ``max_epochs`` epochs."""
        schedule = self.weight_schedule
        if schedule is None:
            return self.weight
        if not isinstance(schedule, Mapping):
            return float(schedule(epoch))
        start = float(schedule.get("start", self.weight))
        kind = schedule.get("type", "linear")
        if kind == "constant":
            return start
        end = float(schedule["end"])
        progress = 0.0 if not max_epochs or max_epochs <= 1 else min(max(epoch - 1, 0) / (max_epochs - 1), 1.0)
        if kind == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return start + (end - start) * progress

    def _stride(self, engine: Engine) -> int | None:
        if self.aux_stride == "auto":
            network = unwrap_network(engine.network)
            # the stride of the level ECRM works on (ECRMUNet(memory_stride=16)), else the network's total stride
            stride = getattr(network, "memory_stride", getattr(network, "stride", None))
            return stride if isinstance(stride, int) else None
        return self.aux_stride  # type: ignore[return-value]

    # ------------------------------------------------------------------ work
    def __call__(self, engine: Engine) -> None:
        """Trainer: add the weighted aux loss to ``engine.state.output["loss"]``. Evaluator: update the aux Dice.

        Args:
            engine: the MONAI engine this handler is attached to.
        """
        captured = self._take()
        if getattr(self, "_inactive", False):
            return
        if self._is_trainer:
            self._supervise(engine, captured)
        else:
            self._measure(engine, captured)

    def _supervise(self, engine: Engine, captured: list[torch.Tensor]) -> None:
        if len(captured) != 1:
            raise RuntimeError(
                f"AuxSupervisionHandler: expected one call of the ECRM module ({self.module_name!r}) per training "
                f"iteration, got {len(captured)}. Is the hook on the right module, and the inferer a SimpleInferer?"
            )
        output = engine.state.output
        label = self.output_transform(output)
        aux = aux_to_label_size(captured[0], label.shape[2:], self._stride(engine))
        aux_loss = torch.as_tensor(self.loss(aux, label)).mean()
        main_loss = output[Keys.LOSS]
        output[Keys.LOSS] = main_loss + self._current_weight * aux_loss
        terms = {LOSS_MAIN: float(main_loss.detach()), LOSS_AUX: float(aux_loss.detach())}
        output.update(terms)
        output[AUX_WEIGHT] = self._current_weight
        if self.epoch_metrics:
            self._count += 1
            for key, value in terms.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
                engine.state.metrics[f"train_{key}"] = self._sums[key] / self._count

    def _measure(self, engine: Engine, captured: list[torch.Tensor]) -> None:
        if len(captured) == 1:
            with torch.no_grad():
                label = self.output_transform(engine.state.output)
                aux = aux_to_label_size(captured[0].detach().float(), label.shape[2:], self._stride(engine))
                dice = compute_dice(
                    self._discretise(aux), self._onehot_label(label, aux.shape[1]), self.include_background
                )
                valid = ~torch.isnan(dice)
                self._sums["dice"] = self._sums.get("dice", 0.0) + float(dice[valid].sum())
                self._count += int(valid.sum())
        elif not self._warned:
            self._warned = True
            warnings.warn(
                f"AuxSupervisionHandler: {len(captured)} calls of the ECRM module in one evaluation iteration (a "
                f"sliding-window inferer?): {self.metric_name} is not computed for such batches.",
                stacklevel=2,
            )
        total, count = self._sums.get("dice", 0.0), self._count
        if self._last_iteration(engine) and idist.get_world_size() > 1:
            # ignite places the tensor on the backend's device (CUDA for NCCL) and back
            reduced = idist.all_reduce(torch.tensor([total, count], dtype=torch.float64))
            total, count = float(reduced[0]), int(reduced[1])
        engine.state.metrics[self.metric_name] = total / count if count else float("nan")

    def _discretise(self, aux: torch.Tensor) -> torch.Tensor:
        if aux.shape[1] == 1:
            return (torch.sigmoid(aux) > self.threshold).float()
        return one_hot(aux.argmax(dim=1, keepdim=True), num_classes=aux.shape[1])

    @staticmethod
    def _onehot_label(label: torch.Tensor, num_classes: int) -> torch.Tensor:
        label = torch.as_tensor(label).float()
        if num_classes > 1 and label.shape[1] == 1:
            return one_hot(label.long(), num_classes=num_classes)
        return label

    @staticmethod
    def _last_iteration(engine: Engine) -> bool:
        epoch_length = engine.state.epoch_length
        return epoch_length is not None and engine.state.iteration % epoch_length == 0
