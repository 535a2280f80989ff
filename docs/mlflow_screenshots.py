"""Real-browser check of the MLflow walk-through: start `mlflow server` on 127.0.0.1, run a tiny
drn-search against it, and take headless-Chromium screenshots of (1) the link the search prints (its
fronts' runs), (2) the parent run's Pareto plot, (3) the registered model's versions and aliases and
(4) the version the alias best-70pct points at; then `drn-eval` that alias's URI. Writes docs/img/*.png.

    apt-get install chromium        # Debian's package: /usr/bin/chromium
    python docs/mlflow_screenshots.py [--chromium /usr/bin/chromium]
"""
import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(chromium: str, url: str, out: Path, size=(1500, 900)) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=20000",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drn-mlflow-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                               "--artifacts-destination", str(work / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        # two targets: one front per target (tags.pareto) and the front across them (tags.pareto_all)
        subprocess.run(["drn-search", "--smoke-test", "--target-flops", "40%", "70%", "--num-samples", "8",
                        "--max-concurrent", "2", "--tolerance", "0.2", "--storage", str(work / "results"),
                        "--name", "demo", "--mlflow-uri", uri], check=True)
        from mlflow import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("demo")
        parent = client.search_runs([exp.experiment_id], filter_string="tags.role = 'search'")[0]
        (HERE / "img").mkdir(exist_ok=True)
        from search.tracking import front_url
        # the link the search prints: its view saved on the experiment, opened in a fresh browser
        shot(args.chromium, front_url(uri, exp.experiment_id), HERE / "img" / "mlflow-front.png", (1900, 700))
        shot(args.chromium, f"{uri}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/pareto.png",
             HERE / "img" / "mlflow-pareto-plot.png")
        from search.registry import alias, model_name
        name, best = model_name("demo"), alias("70%")
        shot(args.chromium, f"{uri}/#/models/{name}", HERE / "img" / "mlflow-versions.png", (1900, 1900))
        version = client.get_model_version_by_alias(name, best)
        shot(args.chromium, f"{uri}/#/models/{name}/versions/{version.version}", HERE / "img" / "mlflow-alias.png")
        print(f"models:/{name}@{best} -> version {version.version}")
        subprocess.run(["drn-eval", f"models:/{name}@{best}", "--mlflow-uri", uri], check=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
