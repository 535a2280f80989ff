"""drn-search on a Ray cluster, on one machine: a head and a second node started with `ray start` on
127.0.0.1 (1 CPU each, custom resources `head` / `node2` tell them apart), token authentication on,
and a local directory both nodes see as the shared storage. Then the faults clusters have: a node
lost mid-trial, the driver SIGKILLed mid-search, a trial that diverges."""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from conftest import cli_command, enqueued_study

pytestmark = pytest.mark.slow

EPOCHS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Ray's workers start their own sessions: a process-group
    kill misses them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Cluster:
    def __init__(self, tmp: Path):
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.address = f"127.0.0.1:{free_port()}"
        self.storage = tmp / "shared"          # what both nodes see
        self.node2 = None
        proc = subprocess.run(
            ["ray", "start", "--head", f"--port={self.address.split(':')[1]}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", "--num-gpus=0", '--resources={"head": 1}', "--include-dashboard=false"],
            env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        self.start_node2()

    def start_node2(self) -> None:
        self.node2 = subprocess.Popen(
            ["ray", "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", "--num-gpus=0", '--resources={"node2": 1}'],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            nodes = self.nodes()
            if sorted(r.get("node2", 0) + 2 * r.get("head", 0) for r in nodes.values()) == [1, 2]:
                return
            time.sleep(2)
        raise AssertionError(f"second node did not join: {self.nodes()}")

    def kill_node2(self) -> None:
        """The node dies as a machine does: its raylet, agents and workers, SIGKILL, all at once."""
        for pid in descendants(self.node2.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.node2.wait(timeout=30)

    def nodes(self) -> dict[str, dict]:
        """Alive node id -> its resources, asked of the cluster by a separate driver."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % self.address)
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def node_id(self, resource: str) -> str:
        return next(n for n, r in self.nodes().items() if r.get(resource))

    def search(self, name: str, *extra: str, popen: bool = False):
        args = [*cli_command("drn-search"), "--address", self.address, "--storage", str(self.storage),
                "--name", name, "--target-flops", "50%", "--arch", "resnet8", "--dataset", "synthetic",
                "--batch-size", "64", "--max-concurrent", "2", "--cpus-per-trial", "1", "--scheduler", "fifo",
                "--tolerance", "0.5", "--backbone", "none", "--finetune-epochs", "0", *extra]
        if popen:
            return subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=900)

    def stop(self) -> None:
        """This cluster's processes, and no other Ray's (`ray stop` would end the local Rays of the
        tests running beside this one): those that name its GCS port, and everything below them."""
        if self.node2 is not None and self.node2.poll() is None:
            self.kill_node2()
        port = self.address.split(":")[1]
        mark = re.compile(rb"(127\.0\.0\.1:|gcs_server_port=)%s(?![0-9])" % port.encode())
        roots = []
        for d in Path("/proc").iterdir():
            try:
                cmdline = (d / "cmdline").read_bytes() if d.name.isdigit() else b""
            except OSError:
                continue
            if mark.search(cmdline) and int(d.name) != os.getpid():
                roots.append(int(d.name))
        for pid in {p for root in roots for p in descendants(root)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def results(experiment: Path) -> dict[int, list[dict]]:
    """Optuna trial number -> Tune's per-epoch results of that trial (result.json, every attempt)."""
    out = {}
    for f in experiment.glob("trial-*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[int(rows[0]["optuna_trial"])] = rows
    return out


def tune_states(experiment: Path) -> dict[int, str]:
    """Optuna trial number -> the status Tune last saved for it (experiment_state-*.json): what a
    resumed driver starts from. A trial the driver saw finish but had not yet saved as TERMINATED is
    re-run by Tune on resume (from its final checkpoint), so a kill is only safe once it is saved."""
    files = sorted(experiment.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except json.JSONDecodeError:                 # caught mid-write
        return {}
    out = {}
    for data, _ in state["trial_data"]:
        trial = json.loads(data) if isinstance(data, str) else data
        if isinstance(trial.get("config"), dict) and "optuna_trial" in trial["config"]:
            out[int(trial["config"]["optuna_trial"])] = trial["status"]
    return out


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"drn-search ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def mlflow_children(results_dir: Path) -> list:
    from mlflow import MlflowClient
    ids = json.loads((results_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=ids["uri"])
    return client.search_runs([ids["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{ids['parent_run_id']}'")


def test_trials_run_on_both_nodes_and_a_lost_node_costs_one_restart_from_its_checkpoint(cluster):
    head, node2 = cluster.node_id("head"), cluster.node_id("node2")
    proc = cluster.search("lost", "--num-samples", "2", "--epochs", str(EPOCHS), "--max-failures", "2", popen=True)
    experiment = cluster.storage / "lost"

    def on_node2():
        for n, rows in results(experiment).items():
            if any(r["node_id"] == node2 for r in rows):
                return [n]
    [victim] = wait_for(on_node2, 300, "a trial reporting from the second node", proc)
    cluster.kill_node2()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode in (0, 3), err[-3000:]   # 3: ended without a feasible model (tiny data)

    table = pq.read_table(experiment / "trials.parquet").to_pylist()
    assert sorted(r["trial"] for r in table) == [0, 1] and {r["state"] for r in table} == {"COMPLETE"}
    runs = results(experiment)
    assert {r["node_id"] for rows in runs.values() for r in rows} == {head, node2}   # both nodes ran trials
    rows = runs[victim]
    before = [r for r in rows if r["node_id"] == node2]
    after = [r for r in rows if r["node_id"] != node2]
    assert before and after, rows
    # the restart went on from the last epoch the lost node had checkpointed, on the head, and no
    # epoch was trained twice
    assert {r["start_epoch"] for r in after} == {before[-1]["epoch"]}
    assert {r["node_id"] for r in after} == {head}
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert f"trial {victim} lost its worker" in err and "restarted from its epoch" in err
    assert "Traceback" not in err
    # each trial once in Optuna and in MLflow, the restarted one with one value per epoch
    study = optuna.load_study(study_name="lost", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert len(study.trials) == 2
    children = mlflow_children(experiment)
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == [0, 1]
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=json.loads((experiment / "mlflow.json").read_text())["uri"])
    child = next(c for c in children if c.data.tags["optuna_trial"] == str(victim))
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    cluster.start_node2()


def test_a_sigkilled_driver_resumes_without_losing_or_rerunning_a_finished_trial(cluster):
    experiment = cluster.storage / "killed"
    proc = cluster.search("killed", "--num-samples", "3", "--epochs", "3", popen=True)

    def one_done_one_running():
        if not (experiment / "trials.parquet").exists():
            return None
        table = pq.read_table(experiment / "trials.parquet").to_pylist()
        done = {r["trial"]: r for r in table if r["state"] == "COMPLETE"}
        running = [n for n, rows in results(experiment).items() if n not in done and rows[-1]["epoch"] < 3]
        saved = tune_states(experiment)
        safe = all(saved.get(n) == "TERMINATED" for n in done)   # Tune's own record of the finished ones
        # and of every trial the searcher has asked for (Tune asks ahead for pending trials): an ask
        # Tune had not saved yet is lost with the driver, and the searcher marks it FAIL on resume
        study = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment / 'optuna.db'}")
        asked = {t.user_attrs.get("search_trial", t.number) for t in study.get_trials(deepcopy=False)
                 if t.state != optuna.trial.TrialState.WAITING}
        safe = safe and asked <= set(saved)
        return (done, running) if done and running and safe else None
    done, _ = wait_for(one_done_one_running, 600, "one finished trial saved as such and one running", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    again = subprocess.run([*cli_command("drn-search"), "--resume", "killed", "--storage", str(cluster.storage),
                            "--address", cluster.address], env=cluster.env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    table = pq.read_table(experiment / "trials.parquet").to_pylist()
    complete = {r["trial"]: r for r in table if r["state"] == "COMPLETE"}
    assert len(complete) == 3, table
    for n, r in done.items():                   # kept, and not run again
        assert complete[n]["accuracy"] == r["accuracy"] and complete[n]["tune_trial_id"] == r["tune_trial_id"]
        rows = results(experiment)[n]            # a re-run would add rows (start_epoch > 0)
        assert [r["epoch"] for r in rows] == [1, 2, 3] and {r["start_epoch"] for r in rows} == {0}
    for n, rows in results(experiment).items():
        assert rows[-1]["epoch"] == 3
    children = mlflow_children(experiment)
    tags = [c.data.tags["optuna_trial"] for c in children]
    assert len(tags) == len(set(tags)) and {int(t) for t in tags} >= set(complete)   # no duplicate child runs


def test_a_diverging_trial_fails_and_the_rest_go_on(cluster, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("d_c: 0.2\nlr: {type: categorical, choices: [0.05, 1.0e+6]}\n")
    # the rates given, not drawn: trial 1 diverges, 0 and 2 learn
    study = enqueued_study(tmp_path / "o.db", "diverge", [{"lr": 0.05}, {"lr": 1.0e+6}, {"lr": 0.05}])
    proc = cluster.search("diverge", "--num-samples", "3", "--epochs", "2", "--space", str(space),
                          "--optuna-storage", study)
    assert proc.returncode == 4, proc.stderr[-3000:]           # ended, with a failed trial
    table = pq.read_table(cluster.storage / "diverge" / "trials.parquet").to_pylist()
    assert {r["trial"]: r["lr"] for r in table} == {0: 0.05, 1: 1.0e+6, 2: 0.05}
    for r in table:
        assert r["state"] == ("FAIL" if r["lr"] > 1 else "COMPLETE"), r
        if r["state"] == "FAIL":
            assert "not finite" in r["reason"]
            assert f"trial {r['trial']} failed: loss is not finite" in proc.stdout     # the summary says so
    states = {c.data.tags["optuna_trial"]: (c.data.tags["state"], c.info.status)
              for c in mlflow_children(cluster.storage / "diverge")}
    assert states == {str(r["trial"]): ("FAIL", "FAILED") if r["state"] == "FAIL" else ("COMPLETE", "FINISHED")
                      for r in table}


def test_without_address_a_search_starts_its_own_ray_not_the_cluster_this_machine_runs(cluster, tmp_path):
    """`ray start` leaves its address where ray.init() with no address would join it: drn-search
    without --address asks for a Ray of its own ("local"), so the cluster's nodes stay out of it."""
    code = ("import json, ray; from search.config import SearchConfig; from search.tuner import connect; "
            "r = connect(SearchConfig(target_flops=['50%'])); "
            "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, 'head': r.get('head', 0)})); "
            "ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["gcs"] != cluster.address and got["head"] == 0
