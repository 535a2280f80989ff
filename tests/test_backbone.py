"""The search's backbone (search/backbone.py): its cache key, its cloud copy, its reuse across
--resume, and the defaults that make every trial a fine-tune of it."""
import json

import pytest
import torch

from drn.config import TrainConfig
from drn.train import Trainer
from search.backbone import backbone_key, backbone_path, backbone_uri, ensure_backbone
from search.cloud import fetch, publish
from search.config import SCRATCH_EPOCHS, SearchConfig

from conftest import run_cli


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


@pytest.mark.slow
def test_resume_finds_the_backbone_again(tmp_path):
    args = ("--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic", "--epochs", "1",
            "--finetune-epochs", "0", "--batch-size", "64", "--num-samples", "1", "--storage", str(tmp_path),
            "--backbone-epochs", "1")                  # --backbone auto: the default
    first = run_cli("drn-search", *args, "--name", "r")
    assert first.returncode in (0, 3), first.stderr[-3000:]   # 3: ended without a feasible model
    assert "backbone: training the plain resnet8 for 1 epochs" in first.stderr
    assert json.loads((tmp_path / "r" / "search.json").read_text())["backbone"] == "auto"
    cached = list((tmp_path / "backbones").glob("resnet8-synthetic-*/checkpoint.pt"))
    assert len(cached) == 1
    again = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path))
    assert again.returncode == first.returncode, again.stderr[-3000:]
    assert f"backbone: reusing {cached[0]}" in again.stderr and "training the plain" not in again.stderr
    assert f"backbone (cached): {cached[0]}, 1 epochs" in again.stdout
