"""Operating a search safely, each on real processes (a real local Ray, MLflow server, PostgreSQL):
SIGTERM ends it as Ctrl-C does, no password is stored or shown, an MLflow outage fails no trial, and
a final copy that fails says what was not copied (S3: test_search_state.py)."""
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from conftest import (cli_command, files_holding, free_port, mlflow_server, ray_sessions, run_cli, search_args,
                      start_mlflow)

pytestmark = pytest.mark.slow


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
    before = ray_sessions()
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
    roots = (tmp_path / "st", tmp_path / "mlflow", *(ray_sessions() - before))
    for planted in (secret, pg_secret):
        seen, holding = files_holding(planted, *roots)
        assert seen > 20 and holding == [], (planted, holding)
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


