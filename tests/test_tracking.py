"""MLflow against a real `mlflow server` (sqlite backend, loopback, free port): a tiny search leaves
one parent and a child per trial, Pareto tags equal the Pareto function, artifacts parse, and a
logged model reloads in a fresh process and reproduces its numbers through drn-eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import mlflow_server, run_cli
from search.pareto import pareto_front
from search.registry import using_tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("tracked")
    proc = run_cli("drn-search", "--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic",
                   "--epochs", "2", "--batch-size", "64", "--num-samples", "3", "--max-concurrent", "2",
                   "--scheduler", "fifo", "--tolerance", "0.2", "--storage", str(storage), "--name", "t3",
                   "--mlflow-uri", server, "--backbone", "none", "--finetune-epochs", "0")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]   # 3: ended without a feasible model
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("t3")
    runs = client.search_runs([exp.experiment_id])
    return proc, client, runs, storage / "t3"


def test_one_parent_and_a_child_per_trial_with_per_epoch_metrics(tracked):
    _, client, runs, _ = tracked
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 3 and len(runs) == 4
    parent = parents[0]
    assert parent.data.params["arch"] == "resnet8" and parent.data.tags["git_commit"]
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["state"] == "COMPLETE" and c.info.status == "FINISHED" and c.data.tags["target"] == "50%"
        assert {"lr", "seed"} <= set(c.data.params)   # the default space's, and the trial's seed
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "accuracy")]
        assert steps == [1, 2]
        for key in ("flops", "k", "mu", "loss_cls", "loss_cost"):
            assert key in c.data.metrics


def test_pareto_tags_equal_the_pareto_function(tracked):
    _, _, runs, _ = tracked
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId")),
                      key=lambda r: int(r.data.tags["optuna_trial"]))
    points = [(r.data.metrics["accuracy"], r.data.metrics["flops"]) for r in children]
    front = set(pareto_front(points, (True, False)))
    assert [r.data.tags["pareto"] == "true" for r in children] == [i in front for i in range(3)]
    assert [r.data.tags["pareto_all"] for r in children] == [r.data.tags["pareto"] for r in children]  # one target
    points_k = [(r.data.metrics["accuracy"], r.data.metrics["k"]) for r in children]
    front_k = set(pareto_front(points_k, (True, False)))
    assert [r.data.tags["pareto_k"] == "true" for r in children] == [i in front_k for i in range(3)]
    feasible = {r["trial"]: r["feasible"] for r in pq.read_table(tracked[3] / "trials.parquet").to_pylist()}
    assert [r.data.tags["feasible"] for r in children] == ["true" if feasible[i] else "false" for i in range(3)]


def test_parent_and_child_artifacts_parse(tracked, tmp_path):
    _, client, runs, _ = tracked
    parent = next(r for r in runs if r.data.tags.get("role") == "search")
    d = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent")))
    assert Image.open(d / "pareto.png").size[0] > 300
    assert pq.read_table(d / "trials.parquet").num_rows == 3
    assert (d / "default.yaml").is_file() and json.loads((d / "search.json").read_text())["name"] == "t3"
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    routes = pq.read_table(client.download_artifacts(child.info.run_id, "routes.parquet", str(tmp_path))).to_pylist()
    assert len(routes) == 100   # the val carve: 10 % of the 1000 synthetic images
    assert set(routes[0]) == {"index", "label", "prediction", "route", "executed", "flops"}
    assert all(len(r["route"]) == 3 and r["executed"] == r["route"].count("1") for r in routes)
    mean = sum(r["flops"] for r in routes) / len(routes)
    assert mean == pytest.approx(child.data.metrics["flops"], rel=1e-6)
    acc = sum(r["label"] == r["prediction"] for r in routes) / len(routes)
    assert acc == pytest.approx(child.data.metrics["accuracy"], abs=1e-6)
    assert Image.open(client.download_artifacts(child.info.run_id, "routes.png", str(tmp_path))).size[0] > 600
    for key in ("path_entropy", "effective_paths", "dynamic_share"):   # the route statistics, every epoch
        assert key in child.data.metrics


def test_front_model_reloads_in_a_fresh_process_and_drn_eval_reproduces_it(tracked, server):
    proc, client, runs, _ = tracked
    version = next(v for v in client.search_model_versions("name = 'drn-t3'") if v.tags["front"] == "true")
    uri = f"models:/drn-t3/{version.version}"
    assert uri in proc.stdout and f"trial {version.tags['optuna_trial']}, target 50%, front" in proc.stdout
    run = client.get_run(version.run_id)
    assert run.data.tags["pareto"] == "true"
    code = ("import mlflow, torch, sys; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pytorch.load_model(sys.argv[2]); print(tuple(m(torch.rand(4, 3, 32, 32)).shape))")
    fresh = subprocess.run([sys.executable, "-c", code, server, uri], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and fresh.stdout.strip().endswith("(4, 10)"), fresh.stderr[-2000:]
    for uri in (uri, f"runs:/{version.run_id}"):
        ev = run_cli("drn-eval", uri, "--mlflow-uri", server, "--json", "--device", "cpu")
        assert ev.returncode == 0, ev.stderr[-2000:]
        m = json.loads(ev.stdout.strip().splitlines()[-1])
        # drn-eval reports the test split by default; the trial logged the same figures at its end
        assert m["split"] == "test" and m["accuracy"] == run.data.metrics["test_accuracy"]
        assert m["flops"] == pytest.approx(run.data.metrics["test_flops"])
        val = json.loads(run_cli("drn-eval", uri, "--mlflow-uri", server, "--json", "--device", "cpu", "--split",
                                 "val").stdout.strip().splitlines()[-1])
        assert val["accuracy"] == run.data.metrics["accuracy"] and val["flops"] == pytest.approx(run.data.metrics["flops"])


def test_a_model_uri_that_does_not_exist_is_a_usage_error(server):
    for uri in ("models:/nope/1", "runs:/0123456789abcdef"):
        ev = run_cli("drn-eval", uri, "--mlflow-uri", server)
        assert ev.returncode == 2 and ev.stderr.count("\n") == 1 and "Traceback" not in ev.stderr, ev.stderr


def test_an_experiment_name_taken_on_the_server_is_a_usage_error(tracked, server, tmp_path):
    proc = run_cli("drn-search", "--smoke-test", "--storage", str(tmp_path / "other"), "--name", "t3",
                   "--mlflow-uri", server, "--backbone", "none", "--finetune-epochs", "0")
    assert proc.returncode == 2 and "already exists" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- sqlite stores, no Ray
# A search's MLflow side driven as a search drives it, without Ray: the real Optuna searcher asks
# and is told, a tiny model trains on the generated images, TrialRun logs what trainable.run_trial
# logs, Tracking.update tags and registers after each trial as the Progress callback does.

def new_search(storage: Path, name: str, **flags):
    from search import tracking
    from search.config import SearchConfig
    from conftest import margins_space
    space = margins_space(storage)   # several parameters to track
    cfg = SearchConfig.from_flags({"smoke_test": True, "backbone": "none", "storage": str(storage), "name": name,
                                   "target_flops": ["50%"], "space": str(space), **flags})
    uri, artifacts = tracking.check(cfg, cfg.results_dir)
    cfg.results_dir.mkdir(parents=True)
    cfg.save(cfg.results_dir / "search.json")
    return cfg, tracking.create(cfg, cfg.results_dir, uri, artifacts)


def searcher_of(cfg, total_epochs: int):
    from search.searcher import OptunaSearcher
    from search.space import load_space
    space = load_space(cfg.space)
    return OptunaSearcher(space, cfg.targets, cfg.name, cfg.study_storage, cfg.tolerance, total_epochs), space


def rows_of(cfg, space) -> list[dict]:
    from search.results import trial_rows
    from search.searcher import load_studies
    return trial_rows(load_studies(cfg.study_storage, cfg.name, cfg.targets), [p.name for p in space.params],
                      cfg.tolerance)


def tiny_trainer(data: Path, out: Path, target: str, params: dict):
    from drn.config import TrainConfig
    from drn.train import Trainer
    cfg = TrainConfig(arch="resnet8", dataset="imagefolder", data_dir=str(data), out=str(out), epochs=1,
                      finetune_epochs=1, batch_size=12, views=2, eval_batch_size=64, device="cpu", seed=1,
                      val_fraction=0.25, target_flops=target, **params)
    return Trainer(cfg, log=lambda s: None)


def report(run, trainer, m: dict) -> dict:
    """What trainable.run_trial's report hands MLflow (its Tune half aside); the last epoch logs the model."""
    import math
    from search.trainable import scalar_metrics
    m = scalar_metrics(m)
    m.update(target_cost=trainer.target, rel_error=m["flops"] / trainer.target - 1)
    final = m["epoch"] >= trainer.cfg.total_epochs
    run.report({k: v for k, v in m.items() if math.isfinite(v)}, int(m["epoch"]), trainer if final else None)
    return m


@pytest.fixture(scope="module")
def trial(tiny_data, tmp_path_factory):
    """One trial of search `s` (target 50 %), trained for 2 epochs; then Tune restarts it twice: once
    from its epoch-1 checkpoint (epoch 2 runs again), once after its last report was lost."""
    from types import SimpleNamespace
    from mlflow import MlflowClient
    from search.tracking import TrialRun
    storage = tmp_path_factory.mktemp("trial")
    cfg, track = new_search(storage, "s", tolerance=0.9)
    searcher, space = searcher_of(cfg, 2)
    config = searcher.suggest("tune-0")
    params = {k: v for k, v in config.items() if k not in ("target", "optuna_trial")}
    trainer = tiny_trainer(tiny_data, storage / "t0", config["target"], params)
    run = TrialRun(track, config["optuna_trial"], config["target"], params)
    final = {}
    trainer.run(on_epoch=lambda m: final.update(report(run, trainer, m)))
    for replay in (trainer.history[1:], trainer.history[-1:]):   # each attempt opens the run anew
        again = TrialRun(track, config["optuna_trial"], config["target"], params)
        assert again.run_id == run.run_id
        for m in replay:
            report(again, trainer, m)
    searcher.on_trial_complete("tune-0", final)
    rows = rows_of(cfg, space)
    models = track.update(rows, None, cfg.targets)
    client = MlflowClient(tracking_uri=track.uri)
    return SimpleNamespace(cfg=cfg, track=track, client=client, run=client.get_run(run.run_id), trainer=trainer,
                           number=config["optuna_trial"], rows=rows, models=models, params=params)


def test_a_trial_logs_one_model_named_for_it_with_its_final_figures_linked(trial):
    models = trial.client.search_logged_models([trial.track.experiment_id])
    assert len(models) == 1, [m.name for m in models]     # restarted twice, logged once
    model = models[0]
    assert model.name == f"s-t{trial.number}-50pct" and model.source_run_id == trial.run.info.run_id
    assert trial.run.data.tags["model_uri"] == model.model_uri == f"models:/{model.model_id}"
    linked = {m.key: m.value for m in model.metrics}
    for key in ("accuracy", "test_accuracy", "flops", "k"):
        assert linked[key] == trial.run.data.metrics[key], key
    assert "loss_cls" not in linked                        # only the figures a model is chosen by
    assert model.params["d_c"] == str(trial.params["d_c"]) and model.tags["target"] == "50%"


def test_logging_and_registering_leave_this_process_tracking_uri_as_it_was(trial, monkeypatch):
    """MLflow exports the URI it is set to as $MLFLOW_TRACKING_URI: left there, a later search in the
    process (no --mlflow-uri) would log to this one's store, taking it for the user's choice."""
    import mlflow
    assert os.environ.get("MLFLOW_TRACKING_URI") != trial.track.uri   # the trial logged a model
    for env in (None, "http://127.0.0.1:9"):
        if env is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        trial.track.register_front(trial.rows)
        assert os.environ.get("MLFLOW_TRACKING_URI") == env
        with using_tracking_uri(trial.track.uri):
            assert mlflow.get_tracking_uri() == trial.track.uri
        assert os.environ.get("MLFLOW_TRACKING_URI") == env


def test_a_restarted_trial_logs_each_epoch_once(trial):
    rid = trial.run.info.run_id
    for key, steps in (("accuracy", [1, 2]), ("flops", [1, 2]), ("loss_cls", [1, 2]), ("test_accuracy", [2])):
        assert [m.step for m in trial.client.get_metric_history(rid, key)] == steps, key
    assert trial.run.data.metrics["accuracy"] == trial.trainer.history[-1]["accuracy"]


def test_the_experiment_opens_on_its_runs_and_children_say_whether_they_are_feasible(trial):
    """A fresh browser opens an experiment on the GenAI overview whatever its kind tag says: the
    summary links the runs page with a view saved on the experiment (the UI's shared view) that
    lists the fronts' runs flat, best val first, with what a person picks by as columns; each run
    is named for its trial and target."""
    from search.tracking import FRONT_VIEW, front_url
    exp = trial.client.get_experiment(trial.track.experiment_id)
    assert exp.name == "s" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{FRONT_VIEW}"])
    assert view["searchFilter"] == "tags.pareto = 'true'" and view["orderByKey"] == "metrics.`accuracy`"
    assert not view["orderByAsc"] and view["runsExpanded"] == {}
    shown = {c.split("`")[1] for c in view["selectedColumns"]}
    assert {"target", "accuracy", "test_accuracy", "flops", "k"} <= shown <= {*trial.run.data.metrics, *trial.run.data.tags}
    assert trial.run.info.run_name == f"t{trial.number}-50pct"
    # a local store: the `mlflow ui` the summary tells to start; a server: itself
    assert front_url(trial.track.uri, exp.experiment_id) == \
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={FRONT_VIEW}"
    assert front_url("http://10.0.0.5:5000", "3") == "http://10.0.0.5:5000/#/experiments/3/runs?viewStateShareKey=front"
    row = trial.rows[0]
    assert row["feasible"] and trial.run.data.tags["feasible"] == "true"
    assert trial.run.data.tags["pareto"] == "true" and trial.run.data.tags["state"] == "COMPLETE"


def test_drn_eval_reads_every_model_uri_mlflow_shows(trial, capsys):
    from search.evaluate import main
    assert [(m["uri"], m["alias"], m["front"]) for m in trial.models] == [("models:/drn-s/1", "best-50pct", True)]
    uris = (trial.run.data.tags["model_uri"], "models:/drn-s/1", "models:/drn-s@best-50pct",
            f"runs:/{trial.run.info.run_id}", f"runs:/{trial.run.info.run_id}/checkpoint")
    for uri in uris:
        capsys.readouterr()
        try:
            rc = main([uri, "--mlflow-uri", trial.track.uri, "--json", "--device", "cpu", "--split", "val"])
        finally:
            torch.set_grad_enabled(True)   # drn-eval turns it off for its process
        out = capsys.readouterr().out
        assert rc == 0, uri
        m = json.loads(out.strip().splitlines()[-1])
        assert m["accuracy"] == trial.run.data.metrics["accuracy"], uri
        assert m["flops"] == pytest.approx(trial.run.data.metrics["flops"]), uri
    for bad in ("models:/m-0123456789abcdef", "models:/drn-s@best-10pct", "models:/drn-s/7", "models:/drn-s"):
        capsys.readouterr()
        assert main([bad, "--mlflow-uri", trial.track.uri]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_registry_describes_versions_moves_the_alias_and_marks_those_off_the_front(trial, tmp_path):
    """Three trials of one target; the figures they report are the test's (the model each logs is the
    tiny trained one): trial 0, then trial 1 better at fewer FLOPs (0 falls off the front, the alias
    moves to 1), then trial 2 best but 50 % over its budget (on the front, not feasible: no alias)."""
    from mlflow import MlflowClient
    from search.results import best_feasible, summary
    from search.tracking import TrialRun
    cfg, track = new_search(tmp_path, "r", mlflow_uri=trial.track.uri)   # tolerance 5 %; a store with search s
    searcher, space = searcher_of(cfg, 2)
    target = trial.trainer.target
    figures = [(0.60, 1.00), (0.70, 0.98), (0.80, 1.50)]  # (val accuracy, cost / target)
    client = MlflowClient(tracking_uri=track.uri)
    seen = []
    for n, (acc, rel) in enumerate(figures):
        config = searcher.suggest(f"tune-{n}")
        assert config["optuna_trial"] == n
        params = {k: v for k, v in config.items() if k not in ("target", "optuna_trial")}
        m = {"epoch": 2.0, "accuracy": acc, "flops": rel * target, "k": 2.0, "test_accuracy": acc - 0.05,
             "target_cost": target, "rel_error": rel - 1}
        TrialRun(track, n, config["target"], params).report(m, 2, trial.trainer)
        searcher.on_trial_complete(f"tune-{n}", m)
        rows = rows_of(cfg, space)
        models = track.update(rows, None, cfg.targets)
        best = best_feasible(rows, "50%")
        versions = {v.tags["optuna_trial"]: v for v in client.search_model_versions("name = 'drn-r'")}
        alias = client.get_model_version_by_alias("drn-r", "best-50pct")
        assert alias.tags["optuna_trial"] == str(best["trial"]) == {0: "0", 1: "1", 2: "1"}[n]
        for row in rows:
            v = versions[str(row["trial"])]
            assert v.tags["front"] == ("true" if row["pareto_flops"] else "false")
            assert v.tags["feasible"] == ("true" if row["feasible"] else "false")
            assert v.tags["val_accuracy"] == f"{row['accuracy']:.3g}" and v.tags["target"] == "50%"
            assert v.tags["hp_d_c"] == f"{row['d_c']:.3g}" and f"d_c={row['d_c']}" in v.description
            assert f"val accuracy {row['accuracy']:.2%}" in v.description
            assert f"test accuracy {row['test_accuracy']:.2%}" in v.description
        seen.append(models)
    v0, v1, v2 = (versions[t] for t in "012")
    assert v0.tags["front"] == "false" and v0.description.count("Off the accuracy-vs-FLOPs front") == 1
    assert "On the accuracy-vs-FLOPs front" in v1.description and "; feasible" in v1.description
    assert v2.tags["front"] == "true" and "not feasible (cost off the target beyond the tolerance: +50.0%)" \
        in v2.description
    assert [(m["trial"], m["alias"], m["front"]) for m in seen[-1]] == [(1, "best-50pct", True), (2, None, True)]
    text = summary(rows, cfg.targets, "flops", seen[-1])
    line = next(l for l in text.splitlines() if l.strip().startswith(f"models:/drn-r/{v1.version}"))
    assert "models:/drn-r@best-50pct" in line and "trial 1, target 50%" in line
    assert f"d_c {float(v1.tags['hp_d_c']):.3g}," in line   # MLflow's string params, at 3 digits


def test_tracking_uri_flag_then_env_then_sqlite_and_the_experiment_name(trial, tmp_path, monkeypatch):
    from drn.config import UsageError
    from search import tracking
    from search.config import SearchConfig

    def cfg(**kw):
        return SearchConfig.from_flags({"smoke_test": True, "backbone": "none", "storage": str(tmp_path),
                                        "name": "e", **kw})

    results = tmp_path / "e"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.check(cfg(), results)[0] == f"sqlite:///{results / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking.check(cfg(), results)[0] == f"sqlite:///{tmp_path / 'env.db'}"
    flag = f"sqlite:///{tmp_path / 'flag.db'}"
    assert tracking.check(cfg(mlflow_uri=flag), results)[0] == flag
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    with pytest.raises(UsageError, match=r"^\$MLFLOW_TRACKING_URI 'bogus://x'"):
        tracking.check(cfg(), results)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trial.track.uri)   # a store that exists: search s is in it
    named = cfg(experiment_name="team")
    results.mkdir()
    named.save(results / "search.json")
    track = tracking.create(named, results, *tracking.check(named, results))
    from mlflow import MlflowClient
    exp = MlflowClient(tracking_uri=track.uri).get_experiment_by_name("team")
    assert track.uri == trial.track.uri and exp.experiment_id == track.experiment_id
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["search"] == "e"
    with pytest.raises(UsageError, match="experiment 'team' already exists.*--experiment-name"):
        tracking.check(cfg(name="e2", experiment_name="team"), tmp_path / "e2")
    with pytest.raises(UsageError, match="--experiment-name must not be empty"):
        tracking.check(cfg(experiment_name=" "), tmp_path / "e3")


def test_the_parent_run_carries_the_parameter_importance_once_a_study_has_enough_trials(tmp_path):
    from mlflow import MlflowClient
    from search.plots import MIN_IMPORTANCE_TRIALS
    from search.searcher import studies_by_target
    cfg, track = new_search(tmp_path, "imp")
    searcher, _ = searcher_of(cfg, 2)

    def finish(n):
        for i in range(n):
            config = searcher.suggest(f"t{i}")
            acc = 0.3 + 0.5 * config["d_c"]                 # val accuracy that follows d_c alone
            searcher.on_trial_complete(f"t{i}", {"accuracy": acc, "flops": 1.0, "target_cost": 1.0, "epoch": 2,
                                                 "k": 2.0})
        return track.log_importance(studies_by_target(cfg.study_storage, cfg.name, cfg.targets))

    artifacts = lambda: {a.path for a in MlflowClient(track.uri).list_artifacts(track.parent_run_id)}
    assert finish(MIN_IMPORTANCE_TRIALS - 1) == {} and "param_importance.png" not in artifacts()   # too few
    imp = finish(1)["50%"]
    assert max(imp, key=imp.get) == "d_c" and {"param_importance.png", "param_importance.json"} <= artifacts()
