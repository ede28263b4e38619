from __future__ import annotations

import logging

import pytest
import torch
from engine_fixtures import SIZE, items, tiny_net
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from monai_ecrm.handlers.memory_bank import MemoryBankHandler
from monai_ecrm.handlers.memory_refresh import MemoryRefreshHandler, refresh_memory
from monai_ecrm.networks.blocks.ecrm import class_prototypes
from monai_ecrm.networks.nets import ECRMUNet


def trainer_for(net, handlers, max_epochs=1, epoch_length=None) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(items(4), batch_size=2, shuffle=False, num_workers=0),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
        loss_function=DiceCELoss(sigmoid=True),
        train_handlers=handlers,
        epoch_length=epoch_length,
    )


def prototypes_by_hand(net: ECRMUNet, images: torch.Tensor) -> torch.Tensor:
    """Training's prototype rule with the current weights, BatchNorm in eval mode: ``[N, K, C]``."""
    net.eval()
    with torch.no_grad():
        deepest = net.encoder(images)[-1]
        return class_prototypes(net.ecrm.coarse(deepest), net.ecrm.embed(deepest))


def test_memory_bank_handler_logs_fill_pointer_and_rejected_writes_per_epoch(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    set_determinism(seed=0)
    net = tiny_net()
    handler = MemoryBankHandler(log_dir=str(tmp_path), name="memory_test")
    trainer = trainer_for(net, [handler], max_epochs=3, epoch_length=1)
    logged = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: logged.append(dict(engine.state.ecrm_memory)))

    def write_a_non_finite_prototype(engine):
        net.ecrm.memory.enqueue(torch.full((1, 1, 16), float("nan")))

    trainer.add_event_handler(Events.EPOCH_STARTED(once=3), write_a_non_finite_prototype)
    with caplog.at_level(logging.INFO, logger="memory_test"), pytest.warns(UserWarning, match="non-finite"):
        trainer.run()
    handler.close()

    assert [(s["filled"], s["pointer"], s["rejected"]) for s in logged] == [(2, 2, 0), (4, 0, 0), (4, 2, 1)]
    assert "2/4 slots filled" in caplog.text and "refused 1 non-finite" in caplog.text
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    filled = [(event.step, event.value) for event in events.Scalars("ecrm_memory/filled")]
    assert filled == [(1, 2.0), (2, 4.0), (3, 4.0)]
    assert [event.value for event in events.Scalars("ecrm_memory/rejected")] == [0.0, 0.0, 1.0]


def test_memory_bank_handler_resets_at_the_chosen_event():
    net = tiny_net()
    trainer = trainer_for(net, [MemoryBankHandler(reset_event="EPOCH_STARTED")], max_epochs=3, epoch_length=1)
    logged = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: logged.append(engine.state.ecrm_memory["filled"]))
    trainer.run()
    assert logged == [2, 2, 2], "each epoch starts from an empty memory and writes one batch of two"


def test_refresh_handler_rebuilds_memory_with_final_weights_in_dataset_order():
    set_determinism(seed=0)
    net = tiny_net()
    refresh_items = items(6, seed=1)
    refresh_loader = DataLoader(refresh_items, batch_size=4, shuffle=False, num_workers=0)
    trainer = trainer_for(net, [MemoryRefreshHandler(refresh_loader)], max_epochs=2)
    trainer.run()

    assert trainer.state.ecrm_refreshed == 6
    images = torch.stack([item["image"] for item in refresh_items])
    expected = prototypes_by_hand(net, images)[-4:]  # the last bank_size images, oldest first
    bank = net.ecrm.memory
    assert int(bank.filled) == 4 and int(bank.pointer) == 2, "6 images in a 4-slot ring: wrapped once"
    torch.testing.assert_close(bank.slots(), expected, atol=1e-6, rtol=0)


def test_refresh_memory_changes_no_weight_and_restores_modes():
    set_determinism(seed=0)
    net = tiny_net()
    trainer_for(net, []).run()  # running statistics and memory from training
    net.train()
    before = {key: value.clone() for key, value in net.state_dict().items() if ".memory." not in key}
    data = items(5, seed=2)
    data[3]["image"] = torch.full((3, SIZE, SIZE), float("nan"))

    with pytest.warns(UserWarning, match="non-finite"):
        written = refresh_memory(net, data)  # a plain list of items: one image per write, list order

    assert written == 4, "the non-finite image is refused, not counted"
    after = net.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items()), "no weight or BN statistic may change"
    assert all(module.training for module in net.modules()), "training/eval flags must be restored"
    good = torch.stack([data[index]["image"] for index in (0, 1, 2, 4)])
    torch.testing.assert_close(net.ecrm.memory.slots(), prototypes_by_hand(net, good), atol=1e-6, rtol=0)
    assert int(net.ecrm.memory.rejected) == 1

    assert refresh_memory(net, data[:1], reset=False) == 1
    assert int(net.ecrm.memory.filled) == 4 and int(net.ecrm.memory.pointer) == 1, "reset=False appends in ring order"
