"""Does the cluster's MLflow store hold its writers? (BENCHMARKS.md, "MLflow under concurrent writers")

cluster.yaml's head runs `mlflow server` on a sqlite store, and up to eight GPU workers log to it at
once (a trial per worker, an epoch's metrics at a time). This starts the same server on loopback and
N writer processes that each log a run's metrics as fast as it takes them for D seconds, then reads
every run back: calls, errors, and values lost (logged with success but not read back).

    python bench/mlflow_load.py [--writers 8] [--seconds 60] [--json OUT]
"""
import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KEYS = 10   # metrics per call, as a trial's epoch logs about ten


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # as cluster.yaml
    uri = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def writer(uri: str, experiment_id: str, seconds: float, out) -> None:
    """Log KEYS metrics per call at step 0, 1, ... for `seconds`; report the run, the steps taken and
    the errors and latencies of the calls."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    client = MlflowClient(uri)
    run = client.create_run(experiment_id).info.run_id
    ok, errors, lat, step, end = [], [], [], 0, time.time() + seconds
    while time.time() < end:
        t0 = time.time()
        try:
            client.log_batch(run, metrics=[Metric(f"m{k}", float(step), int(t0 * 1000), step) for k in range(KEYS)])
            ok.append(step)
        except Exception as e:   # what the run could not log is what is lost to a trial
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        lat.append(time.time() - t0)
        step += 1
    out.put({"run": run, "ok": ok, "errors": errors, "latency": lat})


def load(writers: int, seconds: float) -> dict:
    from mlflow import MlflowClient
    with tempfile.TemporaryDirectory() as d:
        proc, uri = serve(Path(d))
        try:
            exp = MlflowClient(uri).create_experiment("load")
            out = mp.get_context("spawn").Queue()
            procs = [mp.get_context("spawn").Process(target=writer, args=(uri, exp, seconds, out))
                     for _ in range(writers)]
            for p in procs:
                p.start()
            got = [out.get(timeout=seconds + 300) for _ in procs]
            for p in procs:
                p.join()
            client = MlflowClient(uri)
            lost = 0
            for g in got:
                stored = {k: {m.step for m in client.get_metric_history(g["run"], f"m{k}")} for k in range(KEYS)}
                lost += sum(len(set(g["ok"]) - steps) for steps in stored.values())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lat = sorted(x for g in got for x in g["latency"])
    return {"writers": writers, "seconds": seconds, "calls": len(lat), "values": KEYS * sum(len(g["ok"]) for g in got),
            "errors": sum(len(g["errors"]) for g in got), "lost": lost,
            "first_errors": sorted({e for g in got for e in g["errors"]})[:3],
            "latency_p50_ms": 1000 * statistics.median(lat), "latency_p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    result = load(args.writers, args.seconds)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["errors"] == 0 and result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
