"""Memory provenance (issue #16, item 3): the training batches write which case each memory slot holds, and the names
of those cases travel with every checkpoint the bundle saves, not only with a refreshed model."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_fixtures import items, tiny_net
from monai.data import Dataset
from monai.engines import PrepareBatchExtraInput, SupervisedTrainer, default_prepare_batch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from test_bundle import BUNDLE, TINY, bundle_run
from torch.utils.data import DataLoader

from monai_ecrm.bundle import training_datalist, training_prepare_batch
from monai_ecrm.data import select_memory_cases, with_case_index
from monai_ecrm.handlers import refresh_memory
from monai_ecrm.handlers.case_names import CaseNamesHandler, case_names
from monai_ecrm.networks.nets import ECRMUNet

NO_FINAL_REFRESH = ["--train#handlers#5#_disabled_", "True"]  # the memory as the training batches wrote it
FLEXIBLE_UNET = (
    "{'_target_': 'monai.networks.nets.FlexibleUNet', 'in_channels': 3, 'out_channels': 1, 'backbone': 'resnet10', "
    "'spatial_dims': 2, 'pretrained': False}"
)


def _train(net: torch.nn.Module, data: list[dict], batch_size: int = 3) -> SupervisedTrainer:
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=batch_size, shuffle=False),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=DiceCELoss(sigmoid=True),
        prepare_batch=training_prepare_batch(net),
    )
    trainer.run()
    return trainer


def _memory(path: Path) -> tuple[list[int], list[str], int]:
    """``(sources, names table, filled)`` of the ECRM memory in a bundle checkpoint or ``model.pt``."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    state = state.get("network", state)
    text = bytes(state["ecrm.memory.source_names_utf8"].tolist()).decode("utf-8")
    return state["ecrm.memory.sources"].tolist(), text.split("\n") if text else [], int(state["ecrm.memory.filled"])


def _paths(count: int) -> list[dict]:
    return [{"image": f"/data/kvasir/images/{index}.png"} for index in range(count)]


def test_the_trainer_s_case_indices_reach_the_memory_through_prepare_batch_extra_input():
    torch.manual_seed(0)
    net = tiny_net()  # 4 slots
    prepare = training_prepare_batch(net)
    assert isinstance(prepare, PrepareBatchExtraInput) and prepare.extra_keys == {"sources": "case_index"}
    assert training_prepare_batch(net, labels=True).extra_keys == {"labels": "label", "sources": "case_index"}
    _train(net, with_case_index(items(6)))
    # batch [0, 1, 2] fills slots 0-2, then [3, 4, 5] wraps around: 3 in slot 3, 4 and 5 over 0 and 1
    assert net.ecrm.memory.sources.tolist() == [4, 5, 2, 3], "each slot records the item that wrote it"


def test_networks_without_memory_get_monai_s_batches_and_still_train():
    flexible = FlexibleUNet(in_channels=3, out_channels=1, backbone="resnet10", spatial_dims=2, pretrained=False)
    assert training_prepare_batch(flexible) is default_prepare_batch, "FlexibleUNet takes no sources"
    torch.manual_seed(0)
    without = ECRMUNet(backbone="resnet10", use_ecrm=False, decoder_channels=(16,) * 5)
    trainer = _train(without, with_case_index(items(4)), batch_size=2)
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))


def test_case_names_set_the_table_and_carry_a_loaded_memory_over_by_name():
    net = _train(tiny_net(), with_case_index(items(3))).network  # slots 0-2 written by cases 0, 1, 2
    bank = net.ecrm.memory
    bank.set_source_names(["a.png", "b.png", "c.png"])  # as a checkpoint of another training list would hold them
    other_list = [{"image": f"/data/images/{name}"} for name in ("c.png", "a.png", "x.png")]
    handler = CaseNamesHandler(other_list)
    handler(SimpleNamespace(network=net))
    assert bank.source_names == ["c.png", "a.png", "x.png"]
    assert bank.slot_names() == ["a.png", None, "c.png", None], "a slot keeps its case or loses it, never another's"
    assert bank.sources.tolist() == [1, -1, 0, -1]
    bank.set_source_names([])  # a memory whose sources have no names: unknown under any table
    handler(SimpleNamespace(network=net))
    assert bank.sources.tolist() == [-1] * 4
    flexible = FlexibleUNet(in_channels=3, out_channels=1, backbone="resnet10", spatial_dims=2, pretrained=False)
    handler(SimpleNamespace(network=flexible))  # nothing to name


def test_a_refresh_of_indexed_training_items_keeps_the_training_table():
    torch.manual_seed(0)
    training = with_case_index(_paths(8))
    net = tiny_net()
    names = case_names(training)
    net.ecrm.memory.set_source_names(names)
    refresh_set = Dataset(training[3:7], transform=lambda item: {**item, "image": torch.randn(3, 32, 32)})
    refresh_memory(net, DataLoader(refresh_set, batch_size=2))
    assert net.ecrm.memory.source_names == names, "the refresh keeps the table the case indices point into"
    assert sorted(net.ecrm.memory.sources.tolist()) == [3, 4, 5, 6]
    assert sorted(net.ecrm.memory.slot_names()) == names[3:7]
    unindexed = Dataset(_paths(4), transform=lambda item: {"image": torch.randn(3, 32, 32)})
    refresh_memory(net, unindexed)
    assert net.ecrm.memory.source_names == ["0.png", "1.png", "2.png", "3.png"], "positions name the refresh set"
    net.ecrm.memory.reset()
    net.ecrm.memory.set_source_names(["only", "two"])
    with pytest.raises(ValueError, match="another memory"):
        refresh_memory(net, refresh_set)  # indices 3-6 point past this table


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One epoch of the bundle on the demo set, the end-of-training memory refresh off."""
    root = tmp_path_factory.mktemp("names") / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    bundle_run(root, ["train.json"], "--max_epochs", "1", *TINY, *NO_FINAL_REFRESH)
    return root


def _split(root: Path) -> dict[str, list[dict]]:
    demo = root / "demo_data"
    return training_datalist(demo, demo_dir=demo)  # the bundle's split (defaults of train.json)


def test_every_checkpoint_names_its_memory_after_training_items_never_validation_items(trained):
    split = _split(trained)
    names = case_names(split["training"])
    validation = {item["image"] for item in split["validation"]}
    for path in (trained / "models" / "checkpoint_final.pt", trained / "models" / "checkpoint_epoch=1.pt"):
        sources, table, filled = _memory(path)
        assert filled == 6 and all(source >= 0 for source in sources), f"{path.name}: every slot knows its case"
        assert table == names, f"{path.name}: the names of the training list travel with the weights"
        assert not {split["training"][source]["image"] for source in sources} & validation
    sources, table, _ = _memory(trained / "models" / "model.pt")  # the memory validation refreshed
    chosen = select_memory_cases(with_case_index(split["training"]), 6, "stratified", seed=0)
    assert table == names and sorted(sources) == sorted(item["case_index"] for item in chosen), (
        "the refresh writes the cases the memory policy chose, in the same index space"
    )


def test_a_resumed_run_keeps_the_table_and_the_slots_cases(trained, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(trained, root)
    bundle_run(root, ["train.json"], "--max_epochs", "2", "--resume_from", "latest", *TINY, *NO_FINAL_REFRESH)
    sources, table, _ = _memory(root / "models" / "checkpoint_final.pt")
    assert table == case_names(_split(root)["training"]) and all(source >= 0 for source in sources)


def test_a_bundle_network_without_memory_still_trains(tmp_path):
    root = tmp_path / "polyp_ecrm"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval", "demo_data", "logs", "predictions"))
    # the whole train.json (handlers included: the model record describes ECRMUNet networks only and says so)
    bundle_run(root, ["train.json"], "--max_epochs", "1", *TINY, "--network_def", FLEXIBLE_UNET)
    state = torch.load(root / "models" / "checkpoint_final.pt", weights_only=True)["network"]
    assert not any("memory" in key for key in state)
    assert not (root / "models" / "model.json").exists(), "no ECRMUNet record for a FlexibleUNet"
