"""Training that means what it says (issue #18), through the bundle's own configs and handlers: a longer resume
rebuilds the cosine schedule, validation leaves training alone, a resume after a finished run is exact, checkpoints
do not pile up, the key metric counts false positives on polyp-free frames; plus the bf16 switch and networks
without a memory."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from engine_fixtures import items, tiny_net
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from test_bundle import BUNDLE, CONFIGS, TINY, bundle_run
from torch.utils.data import DataLoader

from monai_ecrm.handlers import (
    AuxSupervisionHandler,
    BatchNormRefreshHandler,
    MemoryBankHandler,
    MemoryRefreshHandler,
    cosine_factor,
    refresh_batchnorm,
)
from monai_ecrm.inferers import AutocastInferer

FLAT_LR = ["--train#handlers#0#_disabled_", "True"]  # no schedule: a constant rate that no max_epochs changes


def _bundle(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    return root


def _network(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["network"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _logged_rates(log: str) -> dict[int, float]:
    return {int(e): float(r) for e, r in re.findall(r"Epoch (\d+): learning rate ([0-9.eE+-]+)", log)}


def test_resuming_with_more_epochs_rebuilds_the_cosine_schedule_and_trains(tmp_path):
    root = _bundle(tmp_path, "cosine")
    bundle_run(root, ["train.json"], "--max_epochs", "2", *TINY)
    finished = _network(root / "models" / "checkpoint_final.pt")
    optimizer = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12), "a finished run ends at rate 0"
    initial = optimizer["param_groups"][0]["initial_lr"]

    result = bundle_run(root, ["train.json"], "--max_epochs", "4", "--resume_from", "latest", *TINY)
    rates = _logged_rates(result.stdout + result.stderr)
    state = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)
    trainer = state["trainer"]
    steps_per_epoch, total = trainer["epoch_length"], 4 * trainer["epoch_length"]
    # the documented curve: the rebuilt schedule at the step where the run is
    for epoch in (3, 4):
        expected = initial * cosine_factor((epoch - 1) * steps_per_epoch, total)
        assert rates[epoch] == pytest.approx(expected, rel=5e-3), f"epoch {epoch}"  # logged with 3 digits
    assert rates[3] > 0.0, "the extension must not train at rate 0"
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12), "ends at its end value"
    assert rates[4] < rates[3], "never higher at the end than where the extension started"
    assert _max_difference(finished, state["network"]) > 0.0, "the extra epochs must change the weights"
    epoch_files = sorted(p.name for p in (root / "models").glob("checkpoint_epoch=*.pt"))
    assert epoch_files == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"], "num_checkpoints holds across resumes"


def test_validation_and_a_resume_after_a_finished_run_change_nothing_in_training(tmp_path):
    """An uninterrupted 3-epoch run validating every epoch ends bit-identical to a 2-epoch run without validation
    resumed (from its finished state) to 3 epochs with validation: neither validation nor the end-of-training
    refreshes before the final save change what training does."""
    validated, resumed = _bundle(tmp_path, "validated"), _bundle(tmp_path, "resumed")
    bundle_run(validated, ["train.json"], "--max_epochs", "3", "--val_interval", "1", *FLAT_LR, *TINY)
    bundle_run(resumed, ["train.json"], "--max_epochs", "2", "--val_interval", "100", *FLAT_LR, *TINY)
    assert not (resumed / "models" / "model.pt").is_file(), "no validation ran in the first part"
    bundle_run(resumed, ["train.json"], "--max_epochs", "3", "--resume_from", "latest", *FLAT_LR, *TINY)
    reference = _network(validated / "models" / "checkpoint_final.pt")
    assert _max_difference(reference, _network(resumed / "models" / "checkpoint_final.pt")) == 0.0, (
        "the trained weights must depend neither on val_interval nor on a resume after a finished run"
    )


def test_the_key_metric_counts_false_positives_on_polyp_free_frames():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    metric = parser.get_parsed_content("validate#key_metric#val_mean_dice")
    polyp = torch.zeros(1, 8, 8)
    polyp[:, 2:6, 2:6] = 1
    preds = [polyp.clone(), torch.ones(1, 8, 8)]  # a perfect polyp frame, a polyp-free frame full of false positives
    labels = [polyp.clone(), torch.zeros(1, 8, 8)]
    metric.metric_fn.reset()
    metric.metric_fn(y_pred=preds, y=labels)
    assert float(metric.metric_fn.aggregate()) == pytest.approx(0.5), "a false positive on a polyp-free frame counts"


def test_bf16_switch_runs_the_trainers_forward_in_bfloat16():
    net = tiny_net()
    dtypes: list[torch.dtype] = []
    net.decoder.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(items(4), batch_size=2),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=DiceCELoss(sigmoid=True),
        inferer=AutocastInferer("bf16", enabled=True),
    )
    trainer.run()
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes), "bf16 autocast did not run"
    assert trainer.state.output[0]["pred"].dtype == torch.float32, "the loss sees float32 logits"
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["bf16"] = True
    assert parser.get_parsed_content("train#inferer").enabled and parser.get_parsed_content("validate#inferer").enabled


@pytest.mark.parametrize("kind", ["flexunet", "no_ecrm"])
def test_bundle_handlers_do_nothing_for_a_network_without_memory(kind):
    torch.manual_seed(0)
    if kind == "flexunet":
        net = FlexibleUNet(in_channels=3, out_channels=1, backbone="efficientnet-b0", pretrained=False)
    else:
        from monai_ecrm.networks.nets import ECRMUNet

        net = ECRMUNet(backbone="resnet10", use_ecrm=False, decoder_channels=(16,) * 5)
    loader = DataLoader(items(4), batch_size=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=DiceCELoss(sigmoid=True),
    )
    for handler in (
        AuxSupervisionHandler(DiceCELoss(sigmoid=True)),
        MemoryBankHandler(),
        BatchNormRefreshHandler(loader),
        MemoryRefreshHandler(loader),
    ):
        handler.attach(trainer)
    trainer.run()
    assert math.isfinite(float(trainer.state.output[0]["loss"]))
    assert trainer.state.ecrm_refreshed == 0 and trainer.state.bn_refreshed == 4


def test_batchnorm_refresh_recomputes_statistics_and_leaves_memory_flags_and_rng_alone():
    net = tiny_net()
    loader = DataLoader(items(6), batch_size=3)
    with torch.no_grad():
        net.train()
        net(torch.randn(2, 3, 32, 32))  # fill the memory
    net.eval()
    norm = (
        net.encoder.bn1
        if hasattr(net.encoder, "bn1")
        else next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    )
    norm.running_mean.fill_(100.0)
    memory = {k: v.clone() for k, v in net.ecrm.memory.state_dict().items()}
    rng = torch.get_rng_state()
    images = refresh_batchnorm(net, loader)
    assert images == 6
    assert norm.running_mean.abs().max() < 100.0, "statistics recomputed"
    assert not net.training and not any(m.training for m in net.modules()), "flags restored"
    assert norm.momentum == 0.1 or norm.momentum is not None, "momentum restored"
    for key, value in net.ecrm.memory.state_dict().items():
        assert torch.equal(value, memory[key]), f"BatchNorm refresh wrote the memory ({key})"
    assert torch.equal(torch.get_rng_state(), rng), "the global generator must be left as it was"
    # the exact mean over the images, as one big batch in train mode gives it
    reference = tiny_net()
    reference.load_state_dict(net.state_dict())
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    reference.eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
    with torch.no_grad():
        for batch in loader:
            reference(batch["image"])
    torch.testing.assert_close(
        norm.running_mean,
        dict(reference.named_modules())[next(n for n, m in net.named_modules() if m is norm)].running_mean,
    )
