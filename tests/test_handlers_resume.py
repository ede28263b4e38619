from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandAffined, RandFlipd
from monai.utils import set_determinism

from monai_ecrm.data import folder_datalist, make_demo_dataset
from monai_ecrm.handlers.resume import PreserveRandomState, RandomState, latest_checkpoint
from monai_ecrm.networks.blocks.memory_bank import MemorySizeMismatchError
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
from monai_ecrm.transforms.presets import train_transforms

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def tiny_net(bank_size: int = 4) -> ECRMUNet:
    """A tiny ECRMUNet with DCRNet's block (the trainers here pass no labels)."""
    return ECRMUNet(
        backbone="resnet10",
        bank_size=bank_size,
        ecrm_channels=16,
        key_channels=8,
        decoder_channels=(16,) * 5,
        **DCRNET_ECRM_OPTIONS,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_images=8, size=SIZE)


def assert_same_state(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=0, msg=f"{what}: {key} differs")


# ---------------------------------------------------------------------------------------------- random state
def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    transforms = Compose([RandFlipd(keys="x", prob=0.5), RandAffined(keys="x", prob=0.5, rotate_range=0.3)])
    transforms.set_random_state(seed=3)
    generator = torch.Generator().manual_seed(5)
    state = RandomState(transforms=transforms, generators=[generator])
    torch.save({"rng": state.state_dict()}, tmp_path / "rng.pt")

    def draws():
        inner = [t.R.random_sample() for t in transforms.transforms]
        inner.append(transforms.transforms[1].rand_affine.rand_affine_grid.R.random_sample())
        return (
            torch.rand(3).tolist(),
            np.random.random_sample(3).tolist(),
            [random.random() for _ in range(3)],
            torch.rand(3, generator=generator).tolist(),
            inner,
        )

    first = draws()
    state.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == first, "every generator the next epoch depends on must be restored"
    with pytest.raises(ValueError, match="random-transform state"):
        RandomState().load_state_dict(state.state_dict())


def test_preserve_random_state_makes_a_run_leave_the_global_generators_untouched():
    guard = PreserveRandomState()
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    guard.capture()
    torch.rand(100), np.random.random_sample(), random.random()
    guard()
    torch.testing.assert_close(torch.rand(2), expected)


# ---------------------------------------------------------------------------------------------- checkpoints
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran_code_from_checkpoint",))


def test_checkpoint_loader_refuses_code_and_reports_another_memory_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = tiny_net(bank_size=4)
    torch.save({"network": net.state_dict(), "evil": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader(load_path=str(tmp_path / "evil.pt"), load_dict={"network": net})(_Engine())
    assert not (tmp_path / "ran_code_from_checkpoint").exists(), "loading must never run code from a checkpoint"

    net.train()(torch.randn(2, 3, SIZE, SIZE))
    torch.save({"network": net.state_dict()}, tmp_path / "four_slots.pt")
    other = tiny_net(bank_size=6)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.zeros(1, 3, SIZE, SIZE), "label": torch.zeros(1, 1, SIZE, SIZE)}],
        network=other,
        optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
        loss_function=DiceCELoss(sigmoid=True),
        train_handlers=[CheckpointLoader(load_path=str(tmp_path / "four_slots.pt"), load_dict={"network": other})],
    )
    with pytest.raises(MemorySizeMismatchError, match="holds 4 slots, this model has 6"):
        trainer.run()


class _Engine:
    class state:  # noqa: N801 - a stand-in for ignite's State
        max_epochs = None
        epoch = 0

    logger = None


def test_latest_checkpoint_takes_the_furthest_readable_training_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    net_state = {"w": torch.zeros(3)}
    for iteration in (4, 12, 8):
        torch.save(
            {"network": net_state, "trainer": {"iteration": iteration, "epoch_length": 4}},
            tmp_path / f"c{iteration}.pt",
        )
    torch.save(net_state, tmp_path / "model.pt")  # a flat network file: not a training checkpoint
    complete = (tmp_path / "c12.pt").read_bytes()
    torch.save({"network": net_state, "trainer": {"iteration": 16, "epoch_length": 4}}, tmp_path / "c16.pt")
    (tmp_path / "c16.pt").write_bytes((tmp_path / "c16.pt").read_bytes()[: len(complete) // 2])  # cut by a kill
    assert latest_checkpoint(tmp_path) == str(tmp_path / "c12.pt")


# ---------------------------------------------------------------------------------------------- resume, in process
def _train_in_process(demo_dir: Path, ckpt_dir: Path, max_epochs: int, resume: bool) -> dict:
    """Training with the random preset, shuffling, ``num_workers=0`` (transforms random in this process)."""
    set_determinism(seed=0)
    dataset = Dataset(folder_datalist(demo_dir)[:6], transform=train_transforms(spatial_size=SIZE))
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0)
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=net,
        optimizer=optimizer,
        loss_function=DiceCELoss(sigmoid=True),
    )
    save_dict = {
        "network": net,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "trainer": trainer,
        "rng": RandomState(transforms=dataset),
    }
    handlers = [LrScheduleHandler(scheduler, print_lr=False)]
    if resume:
        handlers.insert(0, CheckpointLoader(load_path=latest_checkpoint(ckpt_dir), load_dict=save_dict))
    handlers.append(CheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=None))
    for handler in handlers:
        handler.attach(trainer)
    trainer.run()
    assert trainer.state.epoch == max_epochs
    return {key: value.clone() for key, value in net.state_dict().items()}


def test_resume_in_process_with_a_larger_max_epochs_equals_an_uninterrupted_run(demo_dir, tmp_path):
    uninterrupted = _train_in_process(demo_dir, tmp_path / "a", max_epochs=3, resume=False)
    _train_in_process(demo_dir, tmp_path / "b", max_epochs=2, resume=False)
    resumed = _train_in_process(demo_dir, tmp_path / "b", max_epochs=3, resume=True)
    assert_same_state(uninterrupted, resumed, "resumed past the saved max_epochs")


# ---------------------------------------------------------------------------------------------- kill and resume
TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler, MeanDice, ValidationHandler
    from monai.handlers import from_engine
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from monai_ecrm.data import folder_datalist
    from monai_ecrm.handlers.aux_supervision import AuxSupervisionHandler
    from monai_ecrm.handlers.memory_bank import MemoryBankHandler
    from monai_ecrm.handlers.resume import PreserveRandomState, RandomState, latest_checkpoint
    from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
    from monai_ecrm.transforms.presets import eval_postprocessing, eval_transforms, train_transforms

    data_dir, ckpt_dir, out_path, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    set_determinism(seed=0)
    datalist = folder_datalist(data_dir)
    train_loader = DataLoader(
        Dataset(datalist[:6], transform=train_transforms(spatial_size=32)), batch_size=2, shuffle=True, num_workers=2
    )
    val_loader = DataLoader(Dataset(datalist[6:], transform=eval_transforms(spatial_size=32)), batch_size=2)
    net = ECRMUNet(backbone="resnet10", bank_size=4, ecrm_channels=16, key_channels=8, decoder_channels=(16,) * 5,
                   **DCRNET_ECRM_OPTIONS)  # fmt: skip
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=val_loader,
        network=net,
        postprocessing=eval_postprocessing(),
        key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[AuxSupervisionHandler(DiceCELoss(sigmoid=True)), PreserveRandomState()],
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=4,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=DiceCELoss(sigmoid=True),
    )
    save_dict = {"network": net, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
                 "rng": RandomState()}
    handlers = [
        LrScheduleHandler(scheduler, print_lr=False),
        AuxSupervisionHandler(DiceCELoss(sigmoid=True), weight_schedule={"type": "linear", "start": 0.4, "end": 0.1}),
        MemoryBankHandler(),
        # saved before validation on purpose: PreserveRandomState makes the order irrelevant
        CheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=None),
        ValidationHandler(validator=evaluator, interval=1),
    ]
    if mode == "resume":
        path = latest_checkpoint(ckpt_dir)
        print("RESUMING FROM", path, flush=True)
        handlers.insert(0, CheckpointLoader(load_path=path, load_dict=save_dict))
    if mode == "stall":
        @trainer.on(Events.ITERATION_COMPLETED)
        def _stall(engine):
            if engine.state.epoch == 3 and engine.state.iteration % engine.state.epoch_length == 2:
                (ckpt_dir / "in_epoch_3").write_text("ready")
                time.sleep(300)
    for handler in handlers:
        handler.attach(trainer)
    trainer.run()
    torch.save(net.state_dict(), out_path)
    """
)


def _start(script: Path, demo_dir: Path, ckpt_dir: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(script), str(demo_dir), str(ckpt_dir), str(out), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches its DataLoader workers too
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_run_killed_during_epoch_3_and_resumed_ends_like_an_uninterrupted_run(demo_dir, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
    full = _start(script, demo_dir, tmp_path / "full", tmp_path / "full.pt", "full")
    killed = _start(script, demo_dir, tmp_path / "killed", tmp_path / "killed.pt", "stall")
    try:
        marker = tmp_path / "killed" / "in_epoch_3"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert killed.poll() is None, killed.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the run never reached epoch 3"
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    _finish(full)

    latest = latest_checkpoint(tmp_path / "killed")
    assert latest is not None and "epoch=2" in Path(latest).name, latest
    output = _finish(_start(script, demo_dir, tmp_path / "killed", tmp_path / "killed.pt", "resume"))
    assert f"RESUMING FROM {latest}" in output

    uninterrupted = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert int(uninterrupted["ecrm.memory.filled"]) == 4
    assert_same_state(uninterrupted, resumed, "killed in epoch 3 and resumed")
