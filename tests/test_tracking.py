"""MLflow against a real `mlflow server` (sqlite backend, loopback, free port): a tiny search leaves
one parent and a child per trial, Pareto tags equal the Pareto function, artifacts parse, and a
logged model reloads in a fresh process and reproduces its numbers through drn-eval."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_cli
from search.pareto import pareto_front

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start: " + (d / "server.log").read_text()[-2000:])
            time.sleep(1)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("tracked")
    proc = run_cli("drn-search", "--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic",
                   "--epochs", "2", "--batch-size", "64", "--num-samples", "3", "--max-concurrent", "2",
                   "--scheduler", "fifo", "--tolerance", "0.2", "--storage", str(storage), "--name", "t3",
                   "--mlflow-uri", server, "--backbone", "none", "--finetune-epochs", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
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
        assert {"d_c", "d_d", "lam", "alpha"} <= set(c.data.params)
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


def test_front_model_reloads_in_a_fresh_process_and_drn_eval_reproduces_it(tracked, server):
    proc, client, runs, _ = tracked
    assert "models:/drn-t3/1" in proc.stdout
    version = client.get_model_version("drn-t3", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["pareto"] == "true"
    code = ("import mlflow, torch, sys; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pytorch.load_model('models:/drn-t3/1'); print(tuple(m(torch.rand(4, 3, 32, 32)).shape))")
    fresh = subprocess.run([sys.executable, "-c", code, server], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and fresh.stdout.strip().endswith("(4, 10)"), fresh.stderr[-2000:]
    for uri in ("models:/drn-t3/1", f"runs:/{version.run_id}"):
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
