"""drn-search end to end on a real local Ray cluster (tiny data, CPU): trials, ASHA -> PRUNED,
Parquet, summary, resume after an interrupt of a two-target search (one Optuna study and one ASHA
per target) (bad input: test_bad_input.py)."""
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from conftest import cli_command, enqueued_study, free_port, interrupt_search, mlflow_server, run_cli, start_mlflow

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETE", "PRUNED", "FAIL"}


def search_args(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return ["--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", str(data),
            "--epochs", "2", "--finetune-epochs", "0", "--backbone", "none", "--batch-size", "12",
            "--storage", str(storage), "--name", name, *extra]


def tune_epochs(experiment: Path) -> dict[int, list[int]]:
    """Optuna trial number -> the epochs Tune recorded for it (result.json of each trial dir)."""
    out = {}
    for f in experiment.glob("trial-*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[int(rows[0]["optuna_trial"])] = [int(r["epoch"]) for r in rows]
    return out


# the wide space with the learning rate a choice between one that learns and one that cannot, each
# trial's rate given (enqueued in the study, not drawn): trials 0, 1 and 3 lr 0.05 (epoch-1 val
# accuracy 55-90 % on the generated set), trial 2 lr 1e-5 (chance, ~10 %). With 2 trials at a time
# trial 2 starts only after trial 0 or 1 has passed ASHA's rung, so it meets a cut it is far below
# on any machine and with any seed: the test does not hang on float-exact accuracies
ASHA_LRS = [0.05, 0.05, 1.0e-5, 0.05]
ASHA_SPACE = """\
d_c:   {type: float, low: 0.05, high: 0.5}
d_d:   {type: float, low: 0.2, high: 1.0}
lam:   {type: float, low: 0.05, high: 0.8, log: true}
alpha: {type: float, low: 0.05, high: 0.8, log: true}
beta:  {type: float, low: 2.0, high: 10.0}
lr:    {type: categorical, choices: [0.05, 1.0e-5]}
views: {type: int, low: 2, high: 4}
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    # the generated 10-class set (250 val images), not tiny_data: its shapes are learnt to 100 % in
    # one epoch, so every trial would tie at ASHA's rung, and ASHA keeps ties
    storage = tmp_path_factory.mktemp("search")
    space = storage / "asha.yaml"
    space.write_text(ASHA_SPACE)
    study = enqueued_study(storage / "optuna-given.db", "s4", [{"lr": lr} for lr in ASHA_LRS])
    args = search_args(Path("unused"), storage, "s4", "--num-samples", "4", "--max-concurrent", "2",
                       "--reduction-factor", "2", "--space", str(space), "--dataset", "synthetic",
                       "--batch-size", "64", "--optuna-storage", study)
    proc = run_cli("drn-search", *args)
    return proc, storage / "s4"


def test_a_real_search_ends_every_trial_and_writes_parquet(search):
    proc, results = search
    assert proc.returncode in (0, 3), proc.stderr[-3000:]   # 3: ended without a feasible model
    table = pq.read_table(results / "trials.parquet").to_pylist()
    assert proc.returncode == (0 if any(r["feasible"] for r in table) else 3)   # 0: a feasible model
    assert sorted(r["trial"] for r in table) == [0, 1, 2, 3]
    assert {r["state"] for r in table} <= TERMINAL - {"FAIL"}
    for r in table:
        assert r["target"] == "50%" and 0.05 <= r["d_c"] <= 0.5 and 2 <= r["views"] <= 4
        assert 0 <= r["accuracy"] <= 1 and r["flops"] > 0 and Path(r["checkpoint"]).is_file()
    assert any(r["pareto_flops"] for r in table if r["state"] == "COMPLETE")
    assert "Pareto front of target 50%, val accuracy vs FLOPs" in proc.stdout and "4 trials:" in proc.stdout
    out = proc.stdout + proc.stderr   # the search's own lines, not Tune's banner or MLflow's schema set-up
    assert "Configuration for experiment" not in out and "tensorboard" not in out and "INFO mlflow" not in out
    assert "epoch 2/2" in proc.stderr                                     # progress while it ran
    json.loads((results / "search.json").read_text())                    # its settings, for --resume
    # the default MLflow store: sqlite in the results dir, by an absolute URI
    tracking = json.loads((results / "mlflow.json").read_text())
    assert tracking["uri"] == f"sqlite:///{results / 'mlflow.db'}" and (results / "mlflow.db").is_file()
    assert tracking["uri"].startswith("sqlite:////")


def test_asha_stopped_trials_are_pruned_in_optuna_not_complete(search):
    proc, results = search
    study = optuna.load_study(study_name="s4", storage=f"sqlite:///{results.parent / 'optuna-given.db'}")
    epochs = tune_epochs(results)
    assert sorted(epochs) == [0, 1, 2, 3]
    for t in study.trials:
        stopped_early = epochs[t.number][-1] < 2
        assert t.state == (optuna.trial.TrialState.PRUNED if stopped_early else optuna.trial.TrialState.COMPLETE)
        if stopped_early:                        # its partial accuracy is an intermediate value only
            assert t.intermediate_values == {1: pytest.approx(t.user_attrs["accuracy"])}
    assert study.metric_names == ["val_accuracy"]   # optuna-dashboard names the objective
    lrs = {t.number: t.params["lr"] for t in study.trials}
    assert lrs == dict(enumerate(ASHA_LRS)), lrs   # as enqueued: see the fixture
    assert epochs[2] == [1], epochs              # the trial that cannot learn stopped at the rung
    assert 2 not in [t.number for t in study.best_trials]


def test_resume_after_an_interrupt_keeps_finished_trials_and_counts_none_twice(tiny_data, tmp_path):
    # two targets: a study each, numbered once across both; ASHA per target, its only rung at the
    # last epoch (nothing pruned), restored with the tuner
    args = search_args(tiny_data, tmp_path, "r", "--num-samples", "4", "--max-concurrent", "1",
                       "--target-flops", "50%", "70%", "--scheduler", "asha", "--grace-period", "2")
    rc, err = interrupt_search(args, "2/4 trials ended")     # two trials have ended: Ctrl-C
    assert rc == 130, err[-3000:]
    before = {r["trial"]: r for r in pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()}
    finished = {n: r for n, r in before.items() if r["state"] in TERMINAL}
    assert len(finished) >= 2

    resumed = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path))
    after = pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()
    feasible = all(any(r["feasible"] for r in after if r["target"] == t) for t in ("50%", "70%"))
    assert resumed.returncode == (0 if feasible else 3), resumed.stderr[-3000:]   # 3: a target has no model
    assert sorted(r["trial"] for r in after) == [0, 1, 2, 3] and {r["state"] for r in after} == {"COMPLETE"}
    assert len({r["tune_trial_id"] for r in after}) == 4
    for r in after:                               # finished trials kept as they were, not re-run
        if r["trial"] in finished:
            assert r["accuracy"] == finished[r["trial"]]["accuracy"]
            assert r["tune_trial_id"] == finished[r["trial"]]["tune_trial_id"]
    for n, epochs in tune_epochs(tmp_path / "r").items():
        assert epochs == [1, 2], (n, epochs)      # an interrupted trial went on from its checkpoint
    # ASHA's rungs (JSON) kept the trials that ended before the interrupt: tuner.pkl has the start's
    rungs = {d["target"]: d for d in map(json.loads, (tmp_path / "r" / "scheduler.jsonl").read_text().splitlines())}
    recorded = {t: set(rungs[t]["brackets"][0][0]["recorded"]) for t in ("50%", "70%")}
    assert recorded == {t: {r["tune_trial_id"] for r in after if r["target"] == t} for t in ("50%", "70%")}
    db = f"sqlite:///{tmp_path / 'r' / 'optuna.db'}"
    assert sorted(optuna.get_all_study_names(db)) == ["r@50%", "r@70%"]
    for target in ("50%", "70%"):                 # each study holds its own target's trials, two each
        study = optuna.load_study(study_name=f"r@{target}", storage=db)
        assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
        assert {t.user_attrs["target"] for t in study.trials} == {target} and len(study.trials) == 2
        assert sorted(t.user_attrs["search_trial"] for t in study.trials) == sorted(
            r["trial"] for r in after if r["target"] == target)


    # extended: --num-samples grows the search; its trials go on counting, its other settings stay
    saved = (tmp_path / "r" / "search.json").read_text()
    for flag in (["--epochs", "3"], ["--num-samples", "3"]):   # another setting, or fewer trials: refused
        refused = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path), *flag)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (tmp_path / "r" / "search.json").read_text() == saved
    more = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path), "--num-samples", "5", "--json")
    summary = json.loads(more.stdout)                        # --json: stdout is one object
    assert more.returncode == summary["exit_code"] in (0, 3), more.stderr[-3000:]
    assert summary["trials"] == {"complete": 5, "pruned": 0, "fail": 0, "running": 0} and summary["complete"]
    rows = pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()
    assert sorted(r["trial"] for r in rows) == [0, 1, 2, 3, 4]
    assert {r["trial"]: r["accuracy"] for r in rows if r["trial"] < 4} == {r["trial"]: r["accuracy"] for r in after}
    assert json.loads((tmp_path / "r" / "search.json").read_text())["num_samples"] == 5
    status = json.loads(run_cli("drn-search", "status", "r", "--storage", str(tmp_path), "--json").stdout)
    assert status["state"] == "finished" and status["ended"] == 5 and status["trials"] == summary["trials"]
    for t in ("50%", "70%"):                                 # the best per target, with its model's URI
        best = status["best"][t]
        assert (best is None) == (summary["best"][t] is None)
        if best is not None:
            assert best["model_uri"].startswith("models:/m-") and best["trial"] == summary["best"][t]["trial"]


def test_sigterm_ends_a_search_as_ctrl_c_does_and_status_shows_it_running(tiny_data, tmp_path):
    # trials long enough that one is still running while `status` starts (a 2-epoch trial can end
    # in the seconds that takes, leaving none running until the next is asked)
    args = search_args(tiny_data, tmp_path, "t", "--num-samples", "3", "--max-concurrent", "1", "--json",
                       "--epochs", "30")
    proc = subprocess.Popen([*cli_command("drn-search"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stderr:                                 # a trial has reported an epoch
        seen.append(line)
        if "epoch 1/30" in line:
            break
    for _ in range(5):
        status = json.loads(run_cli("drn-search", "status", "t", "--storage", str(tmp_path), "--json").stdout)
        if status["running"]:
            break
    assert status["state"] == "running" and status["driver_pid"] == proc.pid, status
    assert status["running"] and status["asked"] >= 1, status
    assert status["running"][0]["epoch"] is None or 1 <= status["running"][0]["epoch"] <= 30, status
    second = run_cli("drn-search", "--resume", "t", "--storage", str(tmp_path))   # one driver per search
    assert second.returncode == 2 and "is running already" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    proc.send_signal(signal.SIGTERM)                         # as `ray job stop` does
    out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 143, err[-3000:]
    summary = json.loads(out)                                # the summary, as after Ctrl-C
    assert summary["exit_code"] == 143 and not summary["complete"]
    assert "terminated (SIGTERM)" in err and "drn-search --resume t" in err and "Traceback" not in err
    text = run_cli("drn-search", "status", "t", "--storage", str(tmp_path)).stdout
    assert "stopped before its end" in text and "--resume t" in text


def test_a_backbone_stopped_by_ctrl_c_goes_on_from_its_last_epoch_at_resume(tiny_data, tmp_path):
    import torch
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


def test_two_searches_started_at_once_on_one_cache_train_one_backbone(tiny_data, tmp_path):
    procs = [subprocess.Popen([*cli_command("drn-search"), *search_args(
        tiny_data, tmp_path, f"c{i}", "--num-samples", "1", "--backbone", "auto", "--backbone-epochs", "3")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode in (0, 3) for p in procs] == [True, True], errs
    assert sum("backbone: training the plain" in e for e in errs) == 1, errs
    assert sum("backbone: reusing" in e for e in errs) == 1, errs
    assert len(list((tmp_path / "backbones").glob("*/checkpoint.pt"))) == 1


@contextlib.contextmanager
def postgres_with_password(folder: Path, user: str, password: str):
    """A real PostgreSQL (pgserver's, on a unix socket in `folder`) with a database `optuna` owned by
    `user`, who must give `password` (scram); yields (the socket dir, a superuser URL of the database)."""
    import pgserver   # a test dependency: PostgreSQL's binaries in a wheel
    srv = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        srv.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'; CREATE DATABASE optuna OWNER {user};")
        hba = folder / "pg_hba.conf"
        hba.write_text(f"local all {user} scram-sha-256\n" + hba.read_text())
        srv.psql("SELECT pg_reload_conf();")
        yield folder, f"postgresql://postgres@/optuna?host={folder}"
    finally:
        srv.cleanup()


def test_a_password_in_a_uri_is_stored_and_shown_nowhere(tiny_data, tmp_path):
    """A real search logging to a real MLflow server through http://USER:PASSWORD@... and keeping its
    studies in a real PostgreSQL through postgresql://USER:PASSWORD@...: the passwords are in no file of
    the results, the MLflow server's store, Ray's session logs, nor the output, and both logins worked."""
    secret, pg_secret = "pw-Planted-7f3a9", "pg-Planted-2c81e"
    (tmp_path / "mlflow").mkdir()
    sessions = lambda: set(Path("/tmp/ray").glob("session_2*"))
    before = sessions()
    with mlflow_server(tmp_path / "mlflow") as uri, \
            postgres_with_password(tmp_path / "pg", "drn", pg_secret) as (sock, admin):
        login = uri.replace("http://", f"http://alice:{secret}@")
        storage = f"postgresql://drn:{pg_secret}@/optuna?host={sock}"
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        proc = subprocess.run([*cli_command("drn-search"), *search_args(
            tiny_data, tmp_path / "st", "p", "--num-samples", "1", "--mlflow-uri", login,
            "--optuna-storage", storage)], capture_output=True, text=True, env=env)
        assert proc.returncode in (0, 3), proc.stderr[-3000:]
        from mlflow import MlflowClient
        assert MlflowClient(uri).get_experiment_by_name("p") is not None   # the login reached the server
        study = optuna.load_study(study_name="p", storage=admin)            # and the other reached PostgreSQL
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
        saved = json.loads((tmp_path / "st" / "p" / "search.json").read_text())["optuna_storage"]
        assert saved == f"postgresql://drn@/optuna?host={sock}"
        status = subprocess.run([*cli_command("drn-search"), "status", "p", "--storage", str(tmp_path / "st"),
                                 "--json"], capture_output=True, text=True, env={**env, "PGPASSWORD": pg_secret})
        assert status.returncode == 0 and json.loads(status.stdout)["ended"] == 1, status.stderr[-2000:]
    # the database server's own files hold the role's verifier, not the password: they are its store
    files = [f for root in (tmp_path, *(sessions() - before)) for f in root.rglob("*")
             if f.is_file() and (tmp_path / "pg") not in f.parents]
    assert len(files) > 20
    assert [f for f in files if secret.encode() in f.read_bytes()] == []
    assert [f for f in files if pg_secret.encode() in f.read_bytes()] == []
    assert secret not in proc.stdout + proc.stderr and pg_secret not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "st" / "p" / "search.json").read_text())["mlflow_uri"] == uri
    refused = run_cli("drn-search", *search_args(tiny_data, tmp_path / "st", "q", "--optuna-storage",
                                                 f"sqlite://alice:{secret}@/x.db"))
    assert refused.returncode == 2 and "holds a password" in refused.stderr and secret not in refused.stderr


def test_an_mlflow_outage_fails_no_trial_and_the_end_logs_what_it_missed(tiny_data, tmp_path):
    """The MLflow server is killed in trial 0 and started again (same port, same store) once two trials
    have ended: no trial fails, and by the end every trial's run has its final metrics and its model."""
    from mlflow import MlflowClient
    (tmp_path / "mlflow").mkdir()
    port = free_port()
    server = start_mlflow(tmp_path / "mlflow", port)
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*cli_command("drn-search"), *search_args(
        tiny_data, tmp_path, "o", "--num-samples", "3", "--max-concurrent", "1", "--mlflow-uri", uri)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "epoch 1/2" in line and server.poll() is None:      # the outage, in trial 0
                server.terminate()
                server.wait(timeout=30)
            if "2/3 trials ended" in line:                        # and MLflow is back
                server = start_mlflow(tmp_path / "mlflow", port)
                break
        out, err = proc.communicate(timeout=900)
        err = "".join(seen) + err
        assert proc.returncode in (0, 3), err[-3000:]
        assert "MLflow did not take" in err and "Traceback" not in err
        rows = pq.read_table(tmp_path / "o" / "trials.parquet").to_pylist()
        assert [r["state"] for r in rows] == ["COMPLETE"] * 3
        assert sum(r["mlflow_missing"] == 1 for r in rows) >= 1
        track = json.loads((tmp_path / "o" / "mlflow.json").read_text())
        client = MlflowClient(uri)
        runs = client.search_runs([track["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = "
                                  f"'{track['parent_run_id']}'")
        assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == [0, 1, 2]
        for r in runs:
            row = rows[int(r.data.tags["optuna_trial"])]
            assert r.data.tags["model_uri"].startswith("models:/m-") and r.data.tags["state"] == "COMPLETE"
            assert r.data.metrics["accuracy"] == pytest.approx(row["accuracy"])
            assert max(m.step for m in client.get_metric_history(r.info.run_id, "accuracy")) == 2
        assert "MLflow lacks" not in out
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_final_copy_that_fails_exits_5_and_names_what_was_not_copied(tiny_data, tmp_path, monkeypatch):
    """A file:// --storage (a cloud storage to the search) whose drn-state folder is replaced by a file once
    the search runs: every copy fails after its retries, and the search's end says so with exit 5."""
    import shutil
    monkeypatch.chdir(tmp_path)                               # our files live in ./drn-results beside a URI
    bucket = tmp_path / "bucket"
    args = search_args(tiny_data, tmp_path, "u", "--num-samples", "1")
    args[args.index("--storage") + 1] = bucket.as_uri()
    proc = subprocess.Popen([*cli_command("drn-search"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "started:" in line:                                # the first copy is made; break the next ones
            shutil.rmtree(bucket / "u" / "drn-state")
            (bucket / "u" / "drn-state").write_text("not a folder")
            break
    out, err = proc.communicate(timeout=900)
    err = "".join(seen) + err
    assert proc.returncode == 5, err[-3000:]
    last = [line for line in err.splitlines() if "could not copy the search's state" in line][-1]
    assert "search.json" in last and "optuna.db" in last and "not copied" in last
    assert "were not copied to --storage" in err and "Traceback" not in err
    assert (tmp_path / "drn-results" / "u" / "trials.parquet").is_file()   # kept here


def test_an_existing_name_is_not_overwritten(search, tiny_data):
    proc, results = search
    again = run_cli("drn-search", *search_args(tiny_data, results.parent, "s4", "--space", "wide"))
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume s4" in again.stderr


def test_every_trial_starts_from_the_backbone(tmp_path):
    """--backbone PATH: the driver loads the plain network once and every trial warm-starts from it
    (its weights handed over through Ray's object store, with the images the driver decoded)."""
    import torch
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


def test_backbone_auto_is_trained_once_cached_reused_and_retrained_when_corrupt(tmp_path):
    import torch
    args = ("--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic", "--epochs", "1",
            "--finetune-epochs", "0", "--batch-size", "64", "--num-samples", "1", "--storage", str(tmp_path),
            "--backbone", "auto", "--backbone-epochs", "1")
    first = run_cli("drn-search", *args, "--name", "a1")
    assert first.returncode in (0, 3), first.stderr[-3000:]   # 3: ended without a feasible model
    assert "backbone: training the plain resnet8 for 1 epochs" in first.stderr and "backbone: epoch 1/1" in first.stderr
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

    again = run_cli("drn-search", *args, "--name", "a2")     # the same key: found, not trained again
    assert again.returncode in (0, 3), again.stderr[-3000:]   # 3: ended without a feasible model
    assert f"backbone: reusing {cached[0]}" in again.stderr and "training the plain" not in again.stderr
    assert f"backbone (cached): {cached[0]}" in again.stdout
    assert torch.load(cached[0], map_location="cpu", weights_only=True)["model"]["stem.0.weight"].equal(
        plain["model"]["stem.0.weight"])

    cached[0].write_bytes(b"\x00truncated" * 10)             # a corrupt cache: one note, trained again
    third = run_cli("drn-search", *args, "--name", "a3")
    assert third.returncode in (0, 3), third.stderr[-3000:]   # 3: ended without a feasible model
    assert f"backbone cache {cached[0]} is corrupt: training it again" in third.stderr
    assert torch.load(cached[0], map_location="cpu", weights_only=True)["epoch"] == 1
