from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import SIZE, items, tiny_net
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, StatsHandler, TensorBoardStatsHandler, from_engine
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import set_determinism

from monai_ecrm.handlers.aux_supervision import AuxSupervisionHandler, aux_to_label_size, loss_terms


def loader(count: int, batch_size: int = 2) -> DataLoader:
    return DataLoader(items(count), batch_size=batch_size, shuffle=False, num_workers=0)


def trainer_for(net, handlers, max_epochs=1, epoch_length=None, count=2, lr=0.01) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=loader(count),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=DiceCELoss(sigmoid=True),
        train_handlers=handlers,
        epoch_length=epoch_length,
    )


def evaluator_for(net, handlers) -> SupervisedEvaluator:
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader(4),
        network=net,
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
        key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        val_handlers=handlers,
    )


@pytest.fixture(autouse=True)
def _determinism():
    set_determinism(seed=0)
    yield
    set_determinism(seed=None)


def test_trainer_loss_is_main_plus_weighted_aux_computed_by_hand():
    net = tiny_net()
    reference = copy.deepcopy(net).train()
    trainer = trainer_for(net, [AuxSupervisionHandler(DiceCELoss(sigmoid=True), weight=0.3)])
    trainer.run()
    output = trainer.state.output[0]

    batch = next(iter(loader(2)))
    captured = []
    reference.ecrm.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    with torch.no_grad():
        pred = reference(batch["image"])
        main = DiceCELoss(sigmoid=True)(pred, batch["label"])
        aux_up = F.interpolate(captured[0], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        aux = DiceCELoss(sigmoid=True)(aux_up, batch["label"])
    assert output["loss_main"] == pytest.approx(float(main), abs=1e-5)
    assert output["loss_aux"] == pytest.approx(float(aux), abs=1e-5)
    assert output["loss"] == pytest.approx(float(main + 0.3 * aux), abs=1e-5), "backward must see main + w * aux"
    assert output["aux_weight"] == 0.3
    assert loss_terms(trainer.state.output) == {
        key: pytest.approx(output[key]) for key in ("loss", "loss_main", "loss_aux", "aux_weight")
    }


def test_coarse_mask_conv_gets_gradient_only_through_aux_supervision():
    net = tiny_net()
    trainer_for(net, []).run()
    grad = net.ecrm.coarse.conv.weight.grad
    assert grad is None or grad.abs().sum() == 0, "without side supervision the coarse mask gets no gradient"

    net = tiny_net()
    trainer_for(net, [AuxSupervisionHandler(DiceCELoss(sigmoid=True))]).run()
    grad = net.ecrm.coarse.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "the coarse-mask conv must be trained by the aux loss"


def test_weight_schedule_and_loss_terms_reach_stats_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = tiny_net()
    handler = AuxSupervisionHandler(
        DiceCELoss(sigmoid=True), weight_schedule={"type": "linear", "start": 0.4, "end": 0.1}
    )
    seen = []
    handlers = [
        StatsHandler(name="aux_test", output_transform=loss_terms, tag_name="loss"),
        TensorBoardStatsHandler(log_dir=str(tmp_path), output_transform=loss_terms),
        handler,
    ]
    trainer = trainer_for(net, handlers, max_epochs=3, epoch_length=1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(dict(engine.state.output[0])))
    trainer.run()

    assert [round(out["aux_weight"], 6) for out in seen] == [0.4, 0.25, 0.1]
    for out in seen:
        assert out["loss"] == pytest.approx(out["loss_main"] + out["aux_weight"] * out["loss_aux"], abs=1e-5)
    assert trainer.state.metrics["train_loss_aux"] == pytest.approx(seen[-1]["loss_aux"])
    log = "".join(capsys.readouterr())
    assert "loss_main" in log and "loss_aux" in log, "StatsHandler must show both loss terms"
    assert "train_loss_aux" in log, "epoch means must reach the epoch-level stats whatever the handler order"
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss_main", "loss_aux", "train_loss_main", "train_loss_aux"} <= tags

    assert handler.weight_at(2, 3) == pytest.approx(0.25)
    cosine = AuxSupervisionHandler(DiceCELoss(), weight_schedule={"type": "cosine", "start": 1.0, "end": 0.0})
    assert [cosine.weight_at(epoch, 5) for epoch in (1, 3, 5)] == pytest.approx([1.0, 0.5, 0.0])
    assert AuxSupervisionHandler(DiceCELoss(), weight_schedule=lambda epoch: 1.0 / epoch).weight_at(4, 10) == 0.25
    with pytest.raises(ValueError, match="end"):
        AuxSupervisionHandler(DiceCELoss(), weight_schedule={"type": "linear"})


def test_evaluator_adds_aux_dice_without_changing_main_metrics_outputs_or_memory(capsys):
    net = tiny_net()
    net.train()(torch.randn(3, 3, SIZE, SIZE))  # a partly filled memory, pointer not at 0
    memory = {key: value.numpy().tobytes() for key, value in net.ecrm.memory.state_dict().items()}

    def record(store):
        return lambda engine: store.extend(item["pred"].clone() for item in engine.state.output)

    plain_preds, preds = [], []
    plain = evaluator_for(net, [])
    plain.add_event_handler(Events.ITERATION_COMPLETED, record(plain_preds))
    plain.run()

    stats = StatsHandler(name="aux_eval", iteration_log=False)  # listed first on purpose
    evaluator = evaluator_for(net, [stats, AuxSupervisionHandler(DiceCELoss(sigmoid=True))])
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, record(preds))
    evaluator.run()

    metrics = evaluator.state.metrics
    assert metrics["val_mean_dice"] == plain.state.metrics["val_mean_dice"]
    assert all(torch.equal(a, b) for a, b in zip(plain_preds, preds)), "post-transforms must see the same output"
    assert set(torch.unique(torch.stack(preds)).tolist()) <= {0.0, 1.0}, "AsDiscreted still thresholds the output"
    assert "val_aux_dice" in "".join(capsys.readouterr()), "the epoch stats must show it even when listed first"

    # the aux Dice by hand: coarse mask upsampled to the label, sigmoid > 0.5, MeanDice conventions
    captured = []
    handle = net.ecrm.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    dices = []
    with torch.no_grad():
        for batch in loader(4):
            net.eval()(batch["image"])
            aux = F.interpolate(captured.pop(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            dices.append(compute_dice((torch.sigmoid(aux) > 0.5).float(), batch["label"]))
    handle.remove()
    expected = torch.cat(dices)
    assert metrics["val_aux_dice"] == pytest.approx(float(expected[~expected.isnan()].mean()), abs=1e-6)

    after = {key: value.numpy().tobytes() for key, value in net.ecrm.memory.state_dict().items()}
    assert after == memory, "evaluation must leave the memory byte-identical"


def test_hook_only_while_running_and_network_scripts_after_completion():
    net = tiny_net()
    hooks_during = []
    handler = AuxSupervisionHandler(DiceCELoss(sigmoid=True))
    trainer = trainer_for(net, [handler])
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: hooks_during.append(len(net.ecrm._forward_hooks))
    )
    trainer.run()
    evaluator_for(net, [AuxSupervisionHandler(DiceCELoss(sigmoid=True))]).run()
    assert hooks_during == [1]
    assert len(net.ecrm._forward_hooks) == 0, "no hook may stay on the network after the engines complete"
    net.eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))

    # detached before running: no hook, no aux terms
    trainer = trainer_for(net, [handler])
    handler.detach(trainer)
    trainer.run()
    assert "loss_aux" not in trainer.state.output[0] and len(net.ecrm._forward_hooks) == 0


def test_wrong_module_name_fails_when_the_run_starts_naming_it():
    trainer = trainer_for(tiny_net(), [AuxSupervisionHandler(DiceCELoss(), module_name="missing")])
    with pytest.raises(AttributeError, match="no submodule 'missing'"):
        trainer.run()


def test_aux_upsampled_by_stride_keeps_cells_over_their_pixels():
    # a 45 x 77 input is padded to 64 x 96: coarse cells cover 32 x 32 pixels from the top-left corner
    aux = torch.arange(6.0).reshape(1, 1, 2, 3)
    up = aux_to_label_size(aux, (45, 77), stride=32)
    assert up.shape == (1, 1, 45, 77)
    torch.testing.assert_close(up, F.interpolate(aux, size=(64, 96), mode="bilinear")[..., :45, :77])
    assert aux_to_label_size(aux, (45, 77)).shape == (1, 1, 45, 77)
