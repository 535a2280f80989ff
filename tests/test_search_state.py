"""Issue 16: a static baseline searches what it trains; a cluster of several machines must reach the
search's storage; a search's own files survive the head through a cloud --storage (file://: the same
pyarrow code path as s3://)."""
import json
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import cli_command, interrupt_search, mlflow_server, run_cli
from drn.config import TrainConfig, UsageError
from search import tracking
from search.cli import main
from search.config import SPACES_DIR, SearchConfig
from search.progress import Progress
from search.searcher import OptunaSearcher, load_studies
from search.space import ROUTER_ONLY, SEARCHABLE, load_space
from search.state import check_new, check_shared, state_uri, upload

BASE = ["--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic", "--name", "b"]


# ----------------------------------------------------------------------------- static baselines

@pytest.mark.parametrize("space", [
    "d_c: {type: float, low: 0.05, high: 0.5}\nlam: {type: float, low: 0.05, high: 0.8}\n",  # margins, weights
    "beta: {type: float, low: 2.0, high: 8.0}\nlr: 0.05\nrouter_hidden: 16\n",  # a used one only fixed
])
def test_a_static_routing_with_a_space_of_router_parameters_is_refused(tmp_path, capsys, space):
    if "\n" in space:
        (tmp_path / "s.yaml").write_text(space)
        space = str(tmp_path / "s.yaml")
    storage = tmp_path / "results"
    rc = main([*BASE, "--routing", "firstk", "--space", space, "--storage", str(storage)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--routing firstk has no routers" in err and "--space static" in err
    assert not storage.exists()


def test_the_static_space_is_valid_for_static_routes_only(tmp_path):
    space = load_space(SPACES_DIR / "static.yaml")
    d = space.distributions()
    assert d["lr"].low < 0.1 < d["lr"].high and d["lr"].log                       # drn-train's lr
    assert d["weight_decay"].low < 1e-4 < d["weight_decay"].high and d["weight_decay"].log
    assert not set(d) & set(ROUTER_ONLY) and set(d) <= set(SEARCHABLE)
    for routing in ("firstk", "randomk", "distributedk", "deepk"):
        assert SearchConfig.from_flags({"target_flops": ["50%"], "routing": routing, "space": "static",
                                        "storage": str(tmp_path)}).space == str(SPACES_DIR / "static.yaml")
    with pytest.raises(UsageError, match="drop_path is for the static routes"):
        SearchConfig(target_flops=["50%"], space="static")


def _train_static(tiny_data, tmp_path, **kw):
    """One epoch of a static route (firstk, 2 of resnet8's 3 blocks): the network, and its routers at the start."""
    from drn.train import Trainer
    cfg = TrainConfig(arch="resnet8", dataset="imagefolder", data_dir=str(tiny_data), out=str(tmp_path / "r"),
                      epochs=1, batch_size=12, device="cpu", routing="firstk", k=2, **kw)
    trainer = Trainer(cfg, log=lambda s: None)
    routers = [p.detach().clone() for p in trainer.model.router_parameters()]
    trainer.run()
    return trainer.model, routers


def test_a_static_route_trains_with_what_the_static_space_samples_and_never_runs_its_routers(tiny_data, tmp_path):
    base, routers = _train_static(tiny_data, tmp_path)
    weights = lambda m: torch.cat([p.detach().flatten() for n, p in m.named_parameters() if "router" not in n])
    assert all(a.equal(b) for a, b in zip(routers, base.router_parameters()))    # beta, router_hidden: idle
    changed = dict(lr=0.3, weight_decay=0.01, drop_path=0.9)   # far from the defaults, to show in 3 steps
    assert set(changed) == {p.name for p in load_space(SPACES_DIR / "static.yaml").params}
    for name, value in changed.items():
        other, _ = _train_static(tiny_data, tmp_path, **{name: value})
        assert not weights(other).equal(weights(base)), f"{name} changed nothing"
    # the loss weights and margins, all at once: Eq. 5-10 are not computed for a static route (cross-entropy only)
    other, _ = _train_static(tiny_data, tmp_path, d_c=0.4, d_d=0.9, lam=0.7, alpha=0.7, gamma=0.9, mu=0.5)
    assert weights(other).equal(weights(base))
    assert {"d_c", "d_d", "lam", "alpha", "gamma", "mu", "beta", "router_hidden"} == set(ROUTER_ONLY)


# ----------------------------------------------------------------------------- storage on a cluster

@pytest.mark.parametrize("storage,mlflow,machines,refused", [
    ("/home/u/drn-results", "sqlite:////home/u/drn-results/x/mlflow.db", 2,
     "--storage /home/u/drn-results nor its MLflow store sqlite:////home/u/drn-results/x/mlflow.db"),
    ("s3://b/drn", "http://10.0.1.23:5000", 3, None),
    ("s3://b/drn", "postgresql://u:p@10.0.1.23/mlflow", 2, None),
    ("s3://b/drn", "file:///home/u/mlruns", 2, "give an MLflow server"),
    ("s3://b/drn", "sqlite:////home/u/m.db", 2, "MLflow store sqlite:////home/u/m.db"),
    ("s3://b/drn", "http://127.0.0.1:5000", 2, "MLflow store http://127.0.0.1:5000"),
    ("file:///mnt/drn", "http://10.0.1.23:5000", 2, "give a cloud --storage (s3://"),
    ("/home/u/drn-results", "sqlite:////home/u/m.db", 1, None),   # one machine (also: nodes that share its IP)
])
def test_a_cluster_of_several_machines_must_reach_storage_and_mlflow(storage, mlflow, machines, refused):
    if refused is None:
        check_shared("auto", storage, mlflow, machines)
    else:
        with pytest.raises(UsageError, match=refused.replace("(", r"\(")) as e:
            check_shared("auto", storage, mlflow, machines)
        assert "\n" not in str(e.value) and "spans" in str(e.value)
    check_shared(None, "/home/u/drn-results", "sqlite:////home/u/m.db", 1)   # a local Ray is one machine


# ----------------------------------------------------------------------------- state beyond the head

def _new_search(remote, name, **kw) -> tuple[SearchConfig, tracking.Tracking]:
    """What run_search writes before its first trial: search.json and the MLflow experiment."""
    cfg = SearchConfig(target_flops=["50%"], arch="resnet8", dataset="synthetic", storage=remote, name=name, **kw)
    cfg.results_dir.mkdir(parents=True)
    cfg.save(cfg.results_dir / "search.json")
    return cfg, tracking.create(cfg, cfg.results_dir, *tracking.check(cfg, cfg.results_dir))


def test_a_cloud_storage_keeps_the_search_state_that_a_new_head_resumes(tmp_path, monkeypatch, capsys):
    remote = (tmp_path / "bucket").as_uri()
    (tmp_path / "mlflow").mkdir()                     # a store both heads reach (a server, in a cluster)
    (tmp_path / "head").mkdir()
    monkeypatch.chdir(tmp_path / "head")
    cfg, track = _new_search(remote, "s1", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow' / 'm.db'}")
    copy = state_uri(cfg.storage, cfg.name)
    assert copy == f"{remote}/s1/drn-state" and state_uri(str(tmp_path), "s1") is None
    notes = []
    assert upload(cfg.results_dir, copy, notes.append) and not notes              # at the start
    assert sorted(p.name for p in (tmp_path / "bucket/s1/drn-state").iterdir()) == ["mlflow.json", "search.json"]

    # trials end: a real study in the head's optuna.db, the table rewritten and copied by the callback
    searcher = OptunaSearcher(load_space(cfg.space), cfg.targets, cfg.name, cfg.study_storage, cfg.tolerance,
                              cfg.total_epochs, seed=0)
    progress = Progress(cfg.study_storage, cfg.name, [p.name for p in load_space(cfg.space).params], cfg.tolerance,
                        str(cfg.results_dir / "trials.parquet"), 3, cfg.total_epochs, cfg.cost_key, None,
                        cfg.targets, 0, copy)
    for i, acc in enumerate((0.5, 0.6, 0.7)):
        searcher.suggest(str(i))
        searcher.on_trial_complete(str(i), {"accuracy": acc, "flops": 100.0, "target_cost": 100.0,
                                            "epoch": cfg.total_epochs, "k": 2.0})
        progress._write([])
    with sqlite3.connect(cfg.results_dir / "optuna.db") as db:   # a write in flight: not in the copy
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE half_written (x)")
        assert upload(cfg.results_dir, copy, notes.append) and not notes
        db.rollback()

    shutil.rmtree(tmp_path / "head")                  # the head is lost; another starts without ./drn-results
    head = tmp_path / "new-head"
    head.mkdir()
    monkeypatch.chdir(head)
    again = SearchConfig.resumed("s1", {"storage": remote})
    assert again == cfg and again.results_dir == head / "drn-results" / "s1"
    study = load_studies(again.study_storage, again.name, again.targets)[0]
    assert [t.value for t in study.trials] == [0.5, 0.6, 0.7] and study.best_trial.params == study.trials[2].params
    rows = pq.read_table(again.results_dir / "trials.parquet").to_pylist()
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 and [r["accuracy"] for r in rows] == [0.5, 0.6, 0.7]
    assert tracking.resumed(again.results_dir) == track
    with sqlite3.connect(again.results_dir / "optuna.db") as db:
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'half_written'").fetchall()

    # the name is taken under the cloud storage, whichever head asks
    with pytest.raises(UsageError, match="already exists in"):
        check_new(remote, "s1")
    check_new(remote, "s2")
    # an unknown name: one line naming where it looked
    capsys.readouterr()
    assert main(["--resume", "nope", "--storage", remote]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"nor in {remote}/nope/drn-state" in err
    assert not (head / "drn-results" / "nope").exists()

    # a local MLflow store is not copied: where it is lost too (the default: sqlite in the head's
    # results dir), another head is refused before it writes anything
    shutil.rmtree(tmp_path / "mlflow")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="logs to the MLflow store .* not on this head.*MLflow server"):
        SearchConfig.resumed("s1", {"storage": remote})
    assert not (tmp_path / "drn-results").exists()


def test_the_default_mlflow_store_moves_with_its_results_dir_and_any_other_stays(tmp_path):
    cfg, track = _new_search(str(tmp_path / "old"), "s")        # the default: sqlite in the results dir
    assert track.uri == f"sqlite:///{tmp_path / 'old' / 's' / 'mlflow.db'}"
    shutil.move(tmp_path / "old", tmp_path / "new")
    moved = tracking.resumed(SearchConfig.resumed("s", {"storage": str(tmp_path / "new")}).results_dir)
    assert moved == tracking.Tracking(**{**vars(track), "uri": f"sqlite:///{tmp_path / 'new' / 's' / 'mlflow.db'}"})
    assert moved.client().get_run(track.parent_run_id).info.experiment_id == track.experiment_id
    for uri in ("http://10.0.1.23:5000", f"sqlite:///{tmp_path / 'm.db'}"):   # a server, a store elsewhere
        (tmp_path / "new" / "s" / "mlflow.json").write_text(json.dumps({**vars(track), "uri": uri}))
        assert tracking.resumed(SearchConfig.resumed("s", {"storage": str(tmp_path / "new")}).results_dir).uri == uri


def test_a_failed_copy_is_one_line_and_the_search_goes_on(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "search.json").write_text(json.dumps({}))
    (tmp_path / "bucket").write_text("a file where the bucket's folder should be")
    notes, t0 = [], time.time()
    assert not upload(tmp_path / "r", f"{(tmp_path / 'bucket').as_uri()}/s/drn-state", notes.append,
                      retries=(0.2, 0.2))
    assert len(notes) == 1 and notes[0].startswith("could not copy the search's state to file://")
    assert "search.json not copied" in notes[0] and time.time() - t0 >= 0.4     # tried again, twice


def two_heads(data: Path, tmp_path: Path, name: str, epochs: int) -> tuple[str, Path, Path, list[str]]:
    """A file:// --storage (a cloud one to the search), the folders two heads run in, and a tiny
    two-trial search's flags."""
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second, tmp_path / "mlflow"):
        d.mkdir()
    remote = (tmp_path / "bucket").as_uri()
    return remote, first, second, [
        "--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", str(data),
        "--epochs", str(epochs), "--finetune-epochs", "0", "--backbone", "none", "--batch-size", "12",
        "--scheduler", "fifo", "--num-samples", "2", "--max-concurrent", "1", "--storage", remote, "--name", name]


@pytest.mark.slow
def test_a_search_resumed_from_another_directory_keeps_its_files_there(tiny_data, tmp_path):
    """The restored Tuner unpickles the first driver's searcher and callback: they must use this
    head's ./drn-results, not the one of the directory the search started in."""
    remote, first, second, args = two_heads(tiny_data, tmp_path, "moved", epochs=1)
    with mlflow_server(tmp_path / "mlflow") as mlflow_uri:
        rc, err = interrupt_search([*args, "--mlflow-uri", mlflow_uri], "1/2 trials ended", cwd=first)  # one trial ended
        assert rc == 130, err[-3000:]
        assert [p.name for p in first.iterdir()] == ["drn-results"]

        shutil.rmtree(first / "drn-results")          # that head is lost; this one runs elsewhere
        resumed = run_cli("drn-search", "--resume", "moved", "--storage", remote, cwd=second)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]   # 3: ended without a feasible model
    rows = pq.read_table(second / "drn-results" / "moved" / "trials.parquet").to_pylist()
    assert sorted(r["trial"] for r in rows) == [0, 1] and {r["state"] for r in rows} == {"COMPLETE"}
    assert not list(first.iterdir())                  # nothing written back where the search started
    assert pq.read_table(f"{tmp_path / 'bucket' / 'moved' / 'drn-state' / 'trials.parquet'}").to_pylist() == rows


def test_tune_saves_its_state_only_after_the_last_upload_ended(tmp_path, monkeypatch):
    """Ray 2.60 wrote the next experiment state into the staging dir while the previous upload was
    still copying it: a forced save renamed a .tmp file the upload had listed, and the upload failed
    with a FileNotFoundError traceback (seen once in CI). With the fix each save waits for it."""
    import ray.train._internal.storage as ray_storage
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    copy = ray_storage._pyarrow_fs_copy_files

    def slow_copy(*args, **kwargs):          # an upload that takes a while (a loaded head, a slow bucket)
        time.sleep(0.5)
        return copy(*args, **kwargs)
    monkeypatch.setattr(ray_storage, "_pyarrow_fs_copy_files", slow_copy)
    Manager = _ExperimentCheckpointManager      # as Ray ships it, even where a search ran in this process
    monkeypatch.setattr(Manager, "sync_up_experiment_state",
                        getattr(Manager.sync_up_experiment_state, "ray", Manager.sync_up_experiment_state))
    monkeypatch.setattr(ray_storage, "_get_ray_train_session_dir", lambda: str(tmp_path / "session"))  # no Ray

    def saves_during_an_upload() -> list[bool]:
        storage = StorageContext(storage_path=str(tmp_path / "storage"), experiment_dir_name=f"x{time.time_ns()}")
        manager = Manager(storage=storage, checkpoint_period=0)
        staging = Path(storage.experiment_driver_staging_path)
        staging.mkdir(parents=True)
        seen = []

        def save():
            seen.append(bool(storage.syncer._should_continue_existing_sync()))
            (staging / "state.json").write_text(json.dumps({"saves": len(seen)}))
        for _ in range(3):
            manager.sync_up_experiment_state(save_fn=save, force=True)
        storage.syncer.wait()
        uploaded = Path(storage.experiment_fs_path, "state.json")
        assert json.loads(uploaded.read_text()) == {"saves": 3}
        return seen

    assert any(saves_during_an_upload())        # the race, as Ray ships it
    # drn-search's Progress callback applies the fix where Tune's driver runs (setup, at its start)
    progress = Progress(f"sqlite:///{tmp_path / 'o.db'}", "n", [], 0.01, str(tmp_path / "t.parquet"), 1, 1, "flops")
    progress.setup()
    progress.setup()                            # idempotent: one wait, not two
    assert not getattr(Manager.sync_up_experiment_state.ray, "drn_waits", False)   # wraps Ray's, once
    assert not any(saves_during_an_upload())


def test_a_malformed_fetched_mlflow_json_is_one_line_and_fetches_nothing(tmp_path):
    from drn.config import UsageError
    from search.state import fetch_state
    copy = tmp_path / "bucket" / "s" / "drn-state"
    copy.mkdir(parents=True)
    (copy / "search.json").write_text("{}")
    for bad in ("{not json", json.dumps({"uri": 1}), json.dumps(["a list"])):
        (copy / "mlflow.json").write_text(bad)
        with pytest.raises(UsageError, match="mlflow.json is malformed") as e:
            fetch_state((tmp_path / "bucket").as_uri(), "s", tmp_path / "head" / "s")
        assert "\n" not in str(e.value) and not (tmp_path / "head").exists()


def test_default_names_differ_for_searches_started_in_one_second():
    names = {SearchConfig(target_flops=["50%"], arch="resnet8").name for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"drn-resnet8-\d{8}-\d{6}-[0-9a-f]{4}", n) for n in names)


@pytest.mark.slow
def test_a_resume_from_a_stale_copy_keeps_the_trials_that_ended_after_it(tiny_data, tmp_path):
    """The copy of the study under --storage was made while trial 0 ran and before trial 1 was asked (a
    head lost between copies). Tune's own state, newer, says both ended: the resumed search takes their
    ends from it, trial 0 told as it ended and trial 1 added, instead of failing them."""
    from search.state import backup_sqlite
    remote, first, second, args = two_heads(tiny_data, tmp_path, "stale", epochs=2)
    args += ["--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow' / 'm.db'}"]   # a store both heads reach
    proc = subprocess.Popen([*cli_command("drn-search"), *args], cwd=first, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:                          # trial 0 runs, trial 1 is not asked yet: the snapshot
        seen.append(line)
        if "trial 0 (target 50%) epoch 1/2" in line:
            backup_sqlite(first / "drn-results" / "stale" / "optuna.db", tmp_path / "stale.db")
            break
    out, err = proc.communicate(timeout=900)
    assert proc.returncode in (0, 3), "".join(seen) + err
    before = {r["trial"]: r for r in pq.read_table(first / "drn-results" / "stale" / "trials.parquet").to_pylist()}
    assert {r["state"] for r in before.values()} == {"COMPLETE"} and sorted(before) == [0, 1]
    copy = tmp_path / "bucket" / "stale" / "drn-state"
    shutil.copyfile(tmp_path / "stale.db", copy / "optuna.db")   # the copy is stale
    shutil.rmtree(first / "drn-results")              # and the head that had the rest is lost

    resumed = run_cli("drn-search", "--resume", "stale", "--storage", remote, cwd=second)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    after = {r["trial"]: r for r in pq.read_table(second / "drn-results" / "stale" / "trials.parquet").to_pylist()}
    assert sorted(after) == [0, 1] and {r["state"] for r in after.values()} == {"COMPLETE"}, after
    for n in (0, 1):                                  # as they ended, from Tune's record
        assert after[n]["accuracy"] == before[n]["accuracy"] and after[n]["tune_trial_id"] == before[n]["tune_trial_id"]
        assert after[n]["lr"] == pytest.approx(before[n]["lr"]) and after[n]["feasible"] == before[n]["feasible"]
    assert "trial 0 (target 50%) started" not in resumed.stderr and "lost when the driver" not in resumed.stdout



@pytest.mark.slow
def test_a_search_on_s3_keeps_its_state_there_and_a_new_head_resumes_it(tiny_data, tmp_path, monkeypatch):
    """A real search with --storage s3:// on a real S3 API (moto's server on loopback): Tune's trials and
    our state copy land in the bucket; a new head with an empty disk finds the search there. A copy
    into a bucket that does not exist fails after its retries with one line naming the files."""
    from pyarrow import fs
    from conftest import s3_server
    from search.state import upload
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second, tmp_path / "mlflow"):
        d.mkdir()
    with s3_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)                  # the drn-search processes inherit it
        args = ["--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir",
                str(tiny_data), "--epochs", "1", "--finetune-epochs", "0", "--backbone", "none", "--batch-size", "12",
                "--num-samples", "2", "--max-concurrent", "1", "--storage", "s3://drn-bucket/drn", "--name", "s3",
                "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow' / 'm.db'}"]
        ran = run_cli("drn-search", *args, cwd=first)
        assert ran.returncode in (0, 3), ran.stderr[-3000:]
        s3, _ = fs.FileSystem.from_uri("s3://drn-bucket/drn")
        keys = {i.path for i in s3.get_file_info(fs.FileSelector("drn-bucket/drn/s3", recursive=True))}
        for f in ("search.json", "mlflow.json", "trials.parquet", "optuna.db"):
            assert f"drn-bucket/drn/s3/drn-state/{f}" in keys, f
        assert any(k.endswith("/checkpoint.pt") and "/trial-" in k for k in keys)   # Tune's, from the trials
        before = pq.read_table(first / "drn-results" / "s3" / "trials.parquet").to_pylist()

        again = run_cli("drn-search", "--resume", "s3", "--storage", "s3://drn-bucket/drn", cwd=second)
        assert again.returncode == ran.returncode, again.stderr[-3000:]
        after = pq.read_table(second / "drn-results" / "s3" / "trials.parquet").to_pylist()
        assert [(r["trial"], r["state"], r["accuracy"]) for r in after] == [
            (r["trial"], r["state"], r["accuracy"]) for r in before]

        notes = []
        assert not upload(second / "drn-results" / "s3", "s3://no-such-bucket/drn/s3/drn-state", notes.append,
                          retries=(0.1,))
        assert len(notes) == 1 and "search.json" in notes[0] and "not copied" in notes[0]
