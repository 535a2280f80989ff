"""The search's backbone (search/backbone.py): its cache key, its cloud copy, the defaults that make
every trial a fine-tune of it; and in real searches: trained once and found again at --resume, one
trainer for two searches, a corrupt cache trained again, a stopped training going on, a given PATH."""
import json
import subprocess

import pyarrow.parquet as pq
import pytest
import torch

from drn.config import TrainConfig
from drn.train import Trainer
from search.backbone import backbone_key, backbone_path, backbone_uri, ensure_backbone
from search.cloud import fetch, publish
from search.config import SCRATCH_EPOCHS, SearchConfig

from conftest import cli_command, interrupt_search, run_cli, search_args


def _cfg(tmp_path, **kw) -> SearchConfig:
    return SearchConfig(**{"target_flops": ["50%"], "arch": "resnet8", "dataset": "synthetic", "storage": str(tmp_path),
                           "name": "s", "backbone_epochs": 1, **kw})


def test_the_key_names_what_the_plain_network_is_trained_with_and_nothing_else(tmp_path):
    base = backbone_key(_cfg(tmp_path))
    assert backbone_key(_cfg(tmp_path)) == base
    for change in ({"arch": "resnet14"}, {"dataset": "svhn"}, {"data_dir": str(tmp_path / "other")},
                   {"backbone_epochs": 2}, {"batch_size": 64}, {"seed": 1}, {"val_fraction": 0.2}):
        assert backbone_key(_cfg(tmp_path, **change)) != base, change
    # what only the trials use: the same backbone
    for same in ({"target_flops": ["30%", "70%"]}, {"epochs": 7}, {"num_samples": 3}, {"name": "other"},
                 {"space": "wide"}, {"tolerance": 0.1}):
        assert backbone_key(_cfg(tmp_path, **same)) == base, same
    assert backbone_path(_cfg(tmp_path)).parent.name == f"resnet8-synthetic-{base}"


def test_trials_fine_tune_a_backbone_by_default(tmp_path):
    cfg = SearchConfig(target_flops=["50%"])
    assert cfg.backbone == "auto" and cfg.backbone_epochs == SCRATCH_EPOCHS == 250
    # a short main phase and a long finetune, as shares of the backbone's schedule (17 + 167 of 250)
    assert (cfg.epochs, cfg.finetune_epochs) == (17, 167)
    assert cfg.total_epochs == cfg.epochs + cfg.finetune_epochs < cfg.backbone_epochs
    short = SearchConfig(target_flops=["50%"], backbone_epochs=30)
    assert (short.epochs, short.finetune_epochs) == (2, 20)          # BENCHMARKS.md, "The trial's schedule from a backbone"
    scratch = SearchConfig(target_flops=["50%"], backbone="none")  # from scratch: the paper's schedule
    assert scratch.epochs == SCRATCH_EPOCHS and scratch.total_epochs == 250 + 25
    assert SearchConfig(target_flops=["50%"], epochs=3, finetune_epochs=0).total_epochs == 3
    from drn.checkpoint import save_checkpoint                     # a given backbone: its own schedule
    save_checkpoint(tmp_path / "p.pt", {**_plain(tmp_path), "epoch": 60})
    given = SearchConfig(target_flops=["50%"], backbone=str(tmp_path / "p.pt"))
    assert (given.backbone_epochs, given.epochs, given.finetune_epochs) == (60, 4, 40)


def _plain(tmp_path) -> dict:
    tc = TrainConfig(arch="resnet8", dataset="synthetic", routing="full", epochs=1, batch_size=64,
                     out=str(tmp_path / "plain"))
    trainer = Trainer(tc, log=lambda s: None)
    trainer.run()
    return trainer.state()


def test_a_cloud_storage_keeps_a_copy_that_a_new_head_fetches(tmp_path, monkeypatch):
    remote = (tmp_path / "bucket").as_uri()            # file://: the same pyarrow code path as s3://
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, storage=remote)
    uri = backbone_uri(cfg)
    assert uri.startswith(remote + "/backbones/resnet8-synthetic-") and uri.endswith("/checkpoint.pt")
    assert backbone_uri(_cfg(tmp_path)) is None        # a local storage holds the cache itself
    assert not fetch(uri, tmp_path / "x.pt")           # nothing there yet

    from drn.checkpoint import save_checkpoint
    local = backbone_path(cfg)
    local.parent.mkdir(parents=True)
    save_checkpoint(local, _plain(tmp_path))
    publish(uri.rsplit("/", 1)[0], [local])

    head = tmp_path / "new-head"                       # another machine: no local cache
    head.mkdir()
    monkeypatch.chdir(head)
    notes = []
    path, ckpt, origin = ensure_backbone(cfg, None, 1, 0, notes.append)   # no Ray: it is not trained
    assert origin == "cached" and path == head / "drn-results" / local.relative_to(tmp_path / "drn-results")
    assert notes == [f"backbone: fetched {uri}", f"backbone: reusing {uri}"]
    assert ckpt["model"]["stem.0.weight"].equal(torch.load(local, weights_only=True)["model"]["stem.0.weight"])


# ----------------------------------------------------------------------------- real searches

@pytest.mark.slow
def test_backbone_auto_is_trained_once_and_found_again_at_resume(tmp_path):
    args = ("--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic", "--epochs", "1",
            "--finetune-epochs", "0", "--batch-size", "64", "--num-samples", "1", "--storage", str(tmp_path),
            "--backbone-epochs", "1")                  # --backbone auto: the default
    first = run_cli("drn-search", *args, "--name", "a1")
    assert first.returncode in (0, 3), first.stderr[-3000:]   # 3: ended without a feasible model
    assert "backbone: training the plain resnet8 for 1 epochs" in first.stderr and "backbone: epoch 1/1" in first.stderr
    assert json.loads((tmp_path / "a1" / "search.json").read_text())["backbone"] == "auto"
    cached = list((tmp_path / "backbones").glob("resnet8-synthetic-*/checkpoint.pt"))
    assert len(cached) == 1
    plain = torch.load(cached[0], map_location="cpu", weights_only=True)
    assert plain["config"]["routing"] == "full" and plain["epoch"] == 1
    trial = pq.read_table(tmp_path / "a1" / "trials.parquet").to_pylist()[0]
    ckpt = torch.load(trial["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["init_info"]["init"] == str(cached[0]) and ckpt["config"]["router_open"] == 0.99

    assert f"backbone (trained): {cached[0]}, 1 epochs" in first.stdout and "trained in" in first.stdout
    from mlflow import MlflowClient                          # and on the search's parent run
    uri = json.loads((tmp_path / "a1" / "mlflow.json").read_text())
    parent = MlflowClient(uri["uri"]).get_run(uri["parent_run_id"]).data
    assert parent.tags["backbone_path"] == str(cached[0]) and parent.tags["backbone_origin"] == "trained"
    assert parent.metrics["backbone_val_accuracy"] == plain["history"][-1]["accuracy"]
    assert parent.metrics["backbone_test_accuracy"] == plain["test"]["test_accuracy"]
    assert parent.metrics["backbone_seconds"] > 0

    again = run_cli("drn-search", "--resume", "a1", "--storage", str(tmp_path))   # found, not trained again
    assert again.returncode == first.returncode, again.stderr[-3000:]
    assert f"backbone: reusing {cached[0]}" in again.stderr and "training the plain" not in again.stderr
    assert f"backbone (cached): {cached[0]}, 1 epochs" in again.stdout
    assert torch.load(cached[0], map_location="cpu", weights_only=True)["model"]["stem.0.weight"].equal(
        plain["model"]["stem.0.weight"])


@pytest.mark.slow
def test_two_searches_started_at_once_on_a_corrupt_cache_train_one_backbone(tiny_data, tmp_path):
    """Both need the backbone whose cached file is corrupt: the first to hold the cache's lock says so and
    trains it again, the other waits and reuses it."""
    key = SearchConfig(target_flops=["50%"], arch="resnet8", dataset="imagefolder", data_dir=str(tiny_data),
                       batch_size=12, storage=str(tmp_path), backbone_epochs=3)
    corrupt = backbone_path(key)
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x00truncated" * 10)
    procs = [subprocess.Popen([*cli_command("drn-search"), *search_args(
        tiny_data, tmp_path, f"c{i}", "--num-samples", "1", "--backbone", "auto", "--backbone-epochs", "3")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=900) for p in procs]
    errs = [e for _, e in outs]
    assert [p.returncode in (0, 3) for p in procs] == [True, True], errs
    assert sum(f"backbone cache {corrupt} is corrupt: training it again" in e for e in errs) == 1, errs
    assert sum("backbone: training the plain" in e for e in errs) == 1, errs
    assert sum(f"backbone: reusing {corrupt}" in e for e in errs) == 1, errs
    assert sum(f"backbone (cached): {corrupt}" in o for o, _ in outs) == 1
    assert list((tmp_path / "backbones").glob("*/checkpoint.pt")) == [corrupt]
    assert torch.load(corrupt, map_location="cpu", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_a_backbone_stopped_by_ctrl_c_goes_on_from_its_last_epoch_at_resume(tiny_data, tmp_path):
    epochs = 40
    args = search_args(tiny_data, tmp_path, "b", "--num-samples", "1", "--backbone", "auto",
                       "--backbone-epochs", str(epochs))
    rc, err = interrupt_search(args, f"backbone: epoch 2/{epochs}")
    assert rc == 130 and "drn-search --resume b" in err, err[-3000:]
    partial = list((tmp_path / "backbones").glob("*/partial.pt"))
    assert len(partial) == 1 and not partial[0].with_name("checkpoint.pt").exists()
    kept = torch.load(partial[0], map_location="cpu", weights_only=True)["epoch"]
    assert 2 <= kept < epochs, kept
    resumed = run_cli("drn-search", "--resume", "b", "--storage", str(tmp_path))
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert f"going on from epoch {kept}," in resumed.stderr and f"backbone: epoch {epochs}/{epochs}" in resumed.stderr
    assert f"backbone: epoch {kept}/{epochs}" not in resumed.stderr          # the kept epochs did not run again
    done = torch.load(partial[0].with_name("checkpoint.pt"), map_location="cpu", weights_only=True)
    assert done["epoch"] == epochs and len(done["history"]) == epochs and not partial[0].exists()
    assert pq.read_table(tmp_path / "b" / "trials.parquet").to_pylist()[0]["state"] == "COMPLETE"


@pytest.mark.slow
def test_every_trial_starts_from_a_given_backbone(tmp_path):
    """--backbone PATH: the driver loads the plain network once and every trial warm-starts from it
    (its weights handed over through Ray's object store, with the images the driver decoded)."""
    full = tmp_path / "full"
    trained = run_cli("drn-train", "--arch", "resnet8", "--dataset", "synthetic", "--routing", "full", "--epochs",
                      "1", "--batch-size", "64", "--device", "cpu", "--out", str(full))
    assert trained.returncode == 0, trained.stderr[-2000:]
    backbone = full / "checkpoint.pt"
    proc = run_cli("drn-search", "--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic",
                   "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "64", "--num-samples", "2",
                   "--max-concurrent", "2", "--storage", str(tmp_path), "--name", "bb", "--backbone", str(backbone))
    assert proc.returncode in (0, 3), proc.stderr[-3000:]   # 3: ended without a feasible model
    assert f"backbone (given): {backbone}, 1 epochs, val acc" in proc.stdout   # named in the summary
    rows = pq.read_table(tmp_path / "bb" / "trials.parquet").to_pylist()
    assert len(rows) == 2
    plain = torch.load(backbone, map_location="cpu", weights_only=True)
    for r in rows:
        ckpt = torch.load(r["checkpoint"], map_location="cpu", weights_only=True)
        assert ckpt["init_info"]["init"] == str(backbone) and ckpt["init_info"]["init_kind"] == "drn full"
        assert ckpt["init_info"]["init_epoch"] == 1 and ckpt["val_index"] == plain["val_index"]
        # the convolutions trained on from the backbone's: one epoch moves the stem ~0.6 x its norm; a
        # fresh start would be an independent draw, ~1.4 x its norm away
        w, w0 = ckpt["model"]["stem.0.weight"], plain["model"]["stem.0.weight"]
        assert (w - w0).norm() < w0.norm()
