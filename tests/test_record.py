"""The model record: a model file says how to run it (construction from the weights, preprocessing and threshold
from the record), a flag that contradicts the model is an error, and the record travels in TorchScript files and
with the bundle's weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from monai_ecrm.handlers import ModelRecordHandler
from monai_ecrm.networks.nets import DCRNET_ECRM_OPTIONS, ECRMUNet
from monai_ecrm.record import (
    TORCHSCRIPT_EXTRA_FILE,
    RecordConflictError,
    embed_record,
    file_sha256,
    load_model,
    load_network,
    load_torchscript,
    make_record,
    merge_record,
    read_record,
    record_for_torchscript,
    record_from_network,
    record_from_state_dict,
    resolve_network_kwargs,
    write_record,
)

#: the configurations the README and the accuracy study document, by name
CONFIGURATIONS = {
    "defaults": {},
    "lite0_defaults": {"backbone": "efficientnet-lite0"},
    "resnet18": {"backbone": "resnet18", "bank_size": 6},
    "resnet18_dcrnet": {"backbone": "resnet18", "bank_size": 6, **DCRNET_ECRM_OPTIONS},
    "resnet34_icrm": {"backbone": "resnet34", "use_icrm": True, **DCRNET_ECRM_OPTIONS},
    "lite0_320": {"backbone": "efficientnet-lite0", "ecrm_channels": 320, **DCRNET_ECRM_OPTIONS},
    "lite0_320_stride16": {"backbone": "efficientnet-lite0", "ecrm_channels": 320, "memory_stride": 16},
    "resnet34_stride16": {"backbone": "resnet34", "memory_stride": 16},
    "label_prototypes_background": {"backbone": "resnet18", "prototypes": "label", "background_tokens": True},
    "gated_context": {"backbone": "resnet18", "context_start": "gate", "key_channels": 64},
    "no_ecrm": {"backbone": "resnet18", "use_ecrm": False},
    "bank_256": {"backbone": "resnet18", "bank_size": 256},
    "3d_two_classes": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "backbone": "resnet18"},
}
#: the check of a bundle config against the trained model's record, for inference.json's (and evaluate.json's)
#: ``initialize`` list, with ``"$import monai_ecrm.record"`` among the imports
CHECK_LINE = (
    "$monai_ecrm.record.check_bundle_config(@ckpt_path, network=@network_def, spatial_size=@spatial_size, "
    "normalization=@normalization, threshold=@threshold)"
)
#: what the weights determine (the other arguments, training-only options and layer settings, leave the same keys and
#: shapes whatever they are)
IN_WEIGHTS = {"spatial_dims", "in_channels", "out_channels", "backbone", "use_ecrm", "use_icrm", "decoder_channels"}
IN_WEIGHTS |= {"upsample", "bank_size", "ecrm_channels", "key_channels", "ecrm_classes", "background_tokens"}
IN_WEIGHTS |= {"memory_stride"}


def _filled(network: ECRMUNet, size: int = 64) -> ECRMUNet:
    """``network`` after one training-mode forward (its memory written), in eval mode."""
    torch.manual_seed(0)
    labels = (torch.rand(4, 1, size, size) > 0.5).float()
    if network.use_ecrm:
        network.train()(torch.rand(4, 3, size, size), labels=labels)
    return network.eval()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_the_weights_determine_the_construction(name):
    config = CONFIGURATIONS[name]
    torch.manual_seed(0)
    network = ECRMUNet(**config)
    derived = record_from_state_dict(network.state_dict())["network"]["kwargs"]
    expected = resolve_network_kwargs(config)
    wrong = {key: (value, expected[key]) for key, value in derived.items() if value != expected[key]}
    assert not wrong, f"derived (got, built with) differ for {name}: {wrong}"
    missing = (IN_WEIGHTS & set(expected)) - set(derived)
    assert not missing, f"{name}: the weights determine {sorted(missing)} but they were not derived"
    if config.get("context_start") == "gate":
        assert derived["context_start"] == "gate", "a gate parameter shows in the weights"
    rebuilt = ECRMUNet(**merge_record(record_from_state_dict(network.state_dict()))["network"]["kwargs"])
    rebuilt.load_state_dict(network.state_dict(), strict=True)


def test_lite0_without_any_record_gets_the_lite_normalisation():
    derived = record_from_state_dict(ECRMUNet(backbone="efficientnet-lite0", ecrm_channels=320).state_dict())
    merged = merge_record(derived)
    assert merged["preprocessing"]["normalization"] == "lite", "Lite0 weights expect (x - 127) / 128, not ImageNet"
    assert {"preprocessing.spatial_size", "threshold"} <= set(merged["assumed"]), "defaults must be reported"
    assert "network.kwargs.ecrm_channels" not in merged["assumed"]


def test_not_an_ecrm_unet_is_a_clear_error(tmp_path):
    from monai.networks.nets import FlexibleUNet

    path = tmp_path / "final_model.pt"
    torch.save(FlexibleUNet(in_channels=3, out_channels=1, backbone="resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="not an ECRMUNet") as error:
        load_model(path)
    assert str(path) in str(error.value)


@pytest.fixture(scope="module")
def lite0_network():
    """The accuracy protocol's network (the reference weights'): Lite0, DCRNet's ECRM block on the 1/32 map."""
    torch.manual_seed(1)
    return _filled(ECRMUNet(backbone="efficientnet-lite0", ecrm_channels=320, bank_size=4, **DCRNET_ECRM_OPTIONS))


def _save(kind: str, network: ECRMUNet, folder):
    folder.mkdir(parents=True, exist_ok=True)
    state = network.state_dict()
    if kind == "flat":
        path = folder / "model.pt"
        torch.save(state, path)
    elif kind == "bundle_checkpoint":
        path = folder / "checkpoint_final.pt"
        torch.save({"network": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    else:  # the accuracy protocol's run folder: final_model.pt and result.json
        path = folder / "final_model.pt"
        torch.save(state, path)
        network_kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "backbone": "efficientnet-lite0"}
        network_kwargs.update(bank_size=4, use_icrm=False, ecrm_channels=320, key_channels=256, memory_stride=None)
        result = {
            "run": "ecrm-random-seed0",
            "model": "ecrm",
            "size": 64,
            "steps": 10,
            "batch_size": 2,
            "train_images": 8,
            "val_images": 2,
            "config": {"normalization": "lite", "train_fingerprint": "abc"},
            "network": network_kwargs,
        }
        (folder / "result.json").write_text(json.dumps(result))
    return path


@pytest.mark.parametrize("kind", ["flat", "bundle_checkpoint", "accuracy_protocol"])
def test_from_checkpoint_round_trip_gives_identical_outputs(kind, lite0_network, tmp_path):
    path = _save(kind, lite0_network, tmp_path / kind)
    loaded = load_model(path)
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), lite0_network(x)), "the loaded model must compute exactly what was saved"
    assert not loaded.training
    _, record = load_network(path)
    assert record["memory"]["filled"] == 4, "the memory's fill comes from the weights"
    if kind == "accuracy_protocol":
        assert record["preprocessing"]["spatial_size"] == [64, 64] and record["training"]["steps"] == 10
        assert "preprocessing.spatial_size" not in record["assumed"]


def test_a_flag_that_contradicts_the_weights_is_refused_naming_both_values(lite0_network, tmp_path):
    path = _save("flat", lite0_network, tmp_path)
    with pytest.raises(RecordConflictError) as error:
        load_model(path, ecrm_channels=512)
    message = str(error.value)
    assert "ecrm_channels" in message and "320" in message and "512" in message and str(path) in message
    assert isinstance(error.value, ValueError), "the command maps ValueError subclasses to exit status 2"
    with pytest.raises(RecordConflictError) as error:
        load_network(path, flags={"bank_size": 20, "backbone": "resnet34", "spatial_size": 352})
    assert [key for key, _ in error.value.conflicts] == ["backbone", "bank_size"], "every contradiction, in one error"
    assert load_model(path, ecrm_channels=320, backbone="efficientnet-lite0").ecrm.feat_channels == 320


def test_a_flag_that_contradicts_the_record_is_refused_and_one_it_lacks_is_taken(lite0_network, tmp_path):
    path = _save("flat", lite0_network, tmp_path)
    derived = record_from_state_dict(lite0_network.state_dict())
    _, bare = load_network(path, flags={"spatial_size": 256})
    assert bare["preprocessing"]["spatial_size"] == [256, 256], "without a record the flag states the size"
    write_record(tmp_path, make_record(merge_record(derived)["network"]["kwargs"], spatial_size=64))
    assert (tmp_path / "model.json").is_file()
    with pytest.raises(RecordConflictError) as error:
        load_network(path, flags={"spatial_size": 352}, labels={"flags": "the command line"})
    message = str(error.value)
    assert "spatial_size" in message and "64" in message and "352" in message and "the command line" in message
    with pytest.raises(RecordConflictError, match="normalization"):
        load_network(path, flags={"normalization": "imagenet"})
    _, record = load_network(path, flags={"threshold": 0.3, "spatial_size": 64})
    assert record["threshold"] == 0.3, "the threshold is an operating point the user may choose"
    with pytest.raises(RecordConflictError, match="threshold"):
        merge_record(derived, read_record(path), {"threshold": 0.3}, overridable=())


def test_a_record_that_does_not_belong_to_the_weights_is_refused(lite0_network, tmp_path):
    path = _save("flat", lite0_network, tmp_path)
    other = {"backbone": "efficientnet-lite0", "ecrm_channels": 320, "bank_size": 20, **DCRNET_ECRM_OPTIONS}
    write_record(path, make_record(other, 64))
    with pytest.raises(RecordConflictError) as error:
        load_model(path)
    assert "bank_size" in str(error.value) and "4" in str(error.value) and "20" in str(error.value)


def _aux_and_logits(network: ECRMUNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured = []
    handle = network.ecrm.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    with torch.no_grad():
        logits = network(x)
    handle.remove()
    return logits, captured[0]


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "resnet18"])
def test_a_model_file_that_does_not_state_the_ecrm_options_is_read_as_the_dcrnet_block(backbone, tmp_path):
    """Model files written before ECRMUNet's defaults changed (a seed-layout or older model.pt, no record) do not say
    how their memory was written nor whether the attention gave the coarse mask: they must be read as what they were,
    DCRNet's block, never as today's defaults (whose coarse mask is another computation)."""
    torch.manual_seed(4)
    network = _filled(ECRMUNet(backbone=backbone, bank_size=4, key_channels=64, **DCRNET_ECRM_OPTIONS))
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    assert read_record(path) is None
    x = torch.rand(2, 3, 64, 64)
    expected = _aux_and_logits(network, x)
    for loaded, record in (load_network(path), (load_model(path), None)):
        kwargs = {key: getattr(loaded.ecrm, key) for key in ("prototypes", "background_tokens", "supervise_attention")}
        assert kwargs == {"prototypes": "coarse", "background_tokens": False, "supervise_attention": False}
        assert loaded.memory_stride == 32 and not loaded.ecrm.attend_first and loaded.ecrm.context_start == "full"
        logits, aux = _aux_and_logits(loaded, x)
        assert torch.equal(logits, expected[0]) and torch.equal(aux, expected[1]), "the same outputs, aux included"
        if record is not None:
            resolved = {key: record["network"]["kwargs"][key] for key in DCRNET_ECRM_OPTIONS}
            assert resolved == {**DCRNET_ECRM_OPTIONS, "memory_stride": 32, "attend_first": False}


def test_a_record_without_the_ecrm_options_states_the_dcrnet_values(lite0_network, tmp_path):
    """A record written without an option (from a partial configuration, e.g. an older ONNX file's) had the DCRNet
    value: the merged record says so, lists what the weights cannot confirm as assumed, and refuses a flag against
    it."""
    derived = record_from_state_dict(lite0_network.state_dict())
    written = make_record(merge_record(derived)["network"]["kwargs"], spatial_size=64)
    for key in ("memory_stride", "prototypes", "background_tokens", "supervise_attention", "attend_first"):
        del written["network"]["kwargs"][key]
    merged = merge_record(None, written)
    kwargs = merged["network"]["kwargs"]
    assert (kwargs["memory_stride"], kwargs["prototypes"], kwargs["supervise_attention"]) == (32, "coarse", False)
    assert {"network.kwargs.memory_stride", "network.kwargs.background_tokens"} <= set(merged["assumed"])
    assert merge_record(derived, written)["network"]["kwargs"] == kwargs
    with pytest.raises(RecordConflictError, match="prototypes"):
        merge_record(derived, written, {"prototypes": "label"})
    path = _save("flat", lite0_network, tmp_path)
    write_record(path, written)
    assert load_model(path).ecrm.prototypes == "coarse"


def test_a_default_network_round_trips_with_its_record(tmp_path):
    torch.manual_seed(5)
    network = _filled(ECRMUNet(backbone="resnet18", bank_size=4, key_channels=64))
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    write_record(path, make_record(record_from_network(network)["network"]["kwargs"], spatial_size=64))
    loaded = load_model(path)
    assert (loaded.memory_stride, loaded.ecrm.prototypes, loaded.ecrm.supervise_attention) == (16, "label", True)
    x = torch.rand(2, 3, 64, 64)
    assert all(map(torch.equal, _aux_and_logits(loaded, x), _aux_and_logits(network, x)))


def test_records_are_written_atomically_and_read_back(tmp_path):
    record = make_record({"backbone": "resnet18", "bank_size": 6}, spatial_size=[64, 80], threshold=0.4)
    assert record["schema_version"] == 1 and record["memory"] == {"slots": 6, "filled": None, "sources": None}
    written = write_record(tmp_path / "models", record)
    assert written == tmp_path / "models" / "model.json"
    assert [p.name for p in written.parent.iterdir()] == ["model.json"], "no temporary file may be left behind"
    assert read_record(tmp_path / "models") == record == read_record(tmp_path / "models" / "model.pt")
    assert json.loads(json.dumps(record)) == record, "the record is plain JSON data"
    newer = dict(record, schema_version=99)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="schema version 99"):
        read_record(tmp_path / "newer.json")
    with pytest.raises(ValueError, match="normalization"):
        make_record({"backbone": "resnet18"}, 64, normalization="zscore")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A TorchScript export of a small ECRMUNet saved as MONAI's ckpt_export saves it (metadata.json and the config
    file as extra files), with the eager network it came from."""
    from monai.data import save_net_with_metadata

    torch.manual_seed(2)
    network = _filled(ECRMUNet(backbone="resnet18", bank_size=3))
    path = tmp_path_factory.mktemp("ts") / "model.ts"
    config = json.dumps({"spatial_size": 352, "backbone": "resnet34"}).encode()
    save_net_with_metadata(
        torch.jit.script(network), str(path), meta_values={"name": "x"}, more_extra_files={"inference.json": config}
    )
    return path, network


def test_torchscript_extra_file_round_trip(scripted, tmp_path):
    _, network = scripted
    record = make_record(record_from_network(network)["network"]["kwargs"], spatial_size=96, normalization="lite")
    path = tmp_path / "saved.ts"
    torch.jit.save(torch.jit.script(network), str(path), _extra_files=record_for_torchscript(record))
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_EXTRA_FILE]) == record
    module, merged = load_torchscript(path)
    assert merged["preprocessing"]["spatial_size"] == [96, 96] and merged["preprocessing"]["normalization"] == "lite"
    assert merged["memory"]["filled"] == 3, "a scripted model's weights are checked and read like a state dict's"
    with pytest.raises(RecordConflictError, match="96"):
        load_torchscript(path, flags={"spatial_size": 352})


def test_a_record_is_embedded_into_a_ckpt_export_file_keeping_its_extra_files(scripted, tmp_path):
    source, network = scripted
    path = tmp_path / "models" / "model.ts"
    path.parent.mkdir()
    shutil.copy(source, path)
    assert read_record(path) is None, "ckpt_export's config copy is the config as written, not a record"
    _, bare = load_torchscript(path)
    assert bare["network"]["kwargs"]["backbone"] == "resnet18", "the scripted weights say resnet18, not the config"
    record = make_record(record_from_network(network)["network"]["kwargs"], spatial_size=64)
    write_record(path.parent, record)
    assert load_torchscript(path)[1]["preprocessing"]["spatial_size"] == [64, 64], "the model.json beside is read"
    embed_record(path)
    with zipfile.ZipFile(path) as archive:
        extras = {name.split("/extra/")[1] for name in archive.namelist() if "/extra/" in name}
    assert {"metadata.json", "inference.json", TORCHSCRIPT_EXTRA_FILE} <= extras
    (path.parent / "model.json").unlink()
    assert read_record(path) == record
    module, merged = load_torchscript(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(module(x), network(x)), "embedding must not change the model"
    wrong = make_record({"backbone": "resnet18", "bank_size": 5}, 64)
    with pytest.raises(RecordConflictError, match="bank_size"):
        embed_record(path, wrong)


def test_handler_writes_the_record_each_time_the_weights_change_and_names_them(tmp_path):
    torch.manual_seed(3)
    network = ECRMUNet(backbone="resnet18", bank_size=4, memory_stride=16)
    datalist = {"training": [{"image": f"/data/{i}.png"} for i in range(5)], "validation": [{"image": "/data/v.png"}]}
    models = tmp_path / "models"
    handler = ModelRecordHandler(models, spatial_size=128, normalization="imagenet", datalist=datalist)
    engine = Engine(lambda engine, batch: None)
    engine.network = network
    saves = {1: True, 2: False, 3: True}  # the best-model saver writes model.pt after epochs 1 and 3 only

    def saver(engine):
        if saves[engine.state.epoch]:
            models.mkdir(exist_ok=True)
            network.ecrm.memory.filled.fill_(engine.state.epoch)
            torch.save(network.state_dict(), models / "model.pt.tmp")
            os.replace(models / "model.pt.tmp", models / "model.pt")

    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
    handler.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(read_record(models)))
    engine.run([0, 1], max_epochs=3)
    assert [record["training"]["epoch"] for record in seen] == [1, 1, 3], "rewritten only with new weights"
    record = read_record(models / "model.pt")
    assert record["weights"]["sha256"] == file_sha256(models / "model.pt") and record["memory"]["filled"] == 3
    assert record["preprocessing"]["spatial_size"] == [128, 128]
    assert record["training"]["train_images"] == 5 and record["training"]["val_images"] == 1
    assert record["network"]["kwargs"]["memory_stride"] == 16 and record["network"]["kwargs"]["bank_size"] == 4
    assert engine.state.model_record == record
    conflicting = ModelRecordHandler(tmp_path / "other", spatial_size=128, network_kwargs={"bank_size": 20})
    with pytest.raises(RecordConflictError, match="bank_size"):
        conflicting.run_record(SimpleNamespace(network=network))


def test_the_bundle_records_the_overridden_values(tmp_path):
    """``--spatial_size 64`` on the command line (the config file says 256) is what models/model.json says."""
    repo = Path(__file__).resolve().parents[1]
    bundle = tmp_path / "polyp_ecrm"
    for part in ("configs", "docs"):
        shutil.copytree(repo / "bundles" / "polyp_ecrm" / part, bundle / part)
    tiny = ["--spatial_size", "64", "--batch_size", "4", "--val_batch_size", "4", "--num_workers", "0"]
    tiny += ["--backbone", "resnet18", "--bank_size", "6", "--progress_bar", "False", "--bn_refresh", "False"]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json")]
    command += ["--bundle_root", str(bundle), "--max_epochs", "1", "--train#trainer#epoch_length", "1", *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = read_record(bundle / "models")
    assert record["preprocessing"]["spatial_size"] == [64, 64], "the override, not the config file's 256"
    assert record["network"]["kwargs"]["backbone"] == "resnet18" and record["network"]["kwargs"]["bank_size"] == 6
    assert record["training"]["epoch"] == 1 and record["weights"]["file"] == "model.pt"
    assert "SYNTHETIC" in record["training"]["description"]
    for name in ("model.pt", "checkpoint_final.pt"):
        network, merged = load_network(bundle / "models" / name)
        assert merged["preprocessing"]["spatial_size"] == [64, 64] and merged["memory"]["filled"] > 0
    with pytest.raises(RecordConflictError, match="352"):
        load_network(bundle / "models" / "model.pt", flags={"spatial_size": 352})

    # the line proposed for inference.json's initialize list: its own 256 px and resnet34 against the trained model
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "backbone": "resnet18", "bank_size": 6})
    parser["imports"] = [*parser["imports"], "$import monai_ecrm.record"]
    parser["check_record"] = CHECK_LINE

    def refused(value: str) -> bool:  # MONAI wraps what a config expression raises
        with pytest.raises(RuntimeError) as error:
            parser.get_parsed_content("check_record")
        return isinstance(error.value.__cause__, RecordConflictError) and value in str(error.value.__cause__)

    assert refused("256"), "the config's 256 px against the 64 px the model was trained at"
    parser["spatial_size"] = 64
    assert parser.get_parsed_content("check_record")["preprocessing"]["spatial_size"] == [64, 64]
    parser["backbone"] = "resnet34"
    assert refused("resnet34")
