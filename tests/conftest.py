import contextlib
import os
import shutil
import signal
import socket
import sys
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "square", "stripes")


def _image(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A 32x32 RGB image whose class is visible in its colour and shape, plus noise."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-3, 3, 2)
    if kind == "circle":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3) ** 2
        img[mask] = (220, 40, 40)
    elif kind == "square":
        mask = (abs(yy - c[0]) < size / 4) & (abs(xx - c[1]) < size / 4)
        img[mask] = (40, 220, 40)
    else:
        img[(xx // 4) % 2 == 0] = (40, 40, 220)
    return img


def write_imagefolder(root: Path, per_class=(12, 6), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(c, rng)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 3-class ImageFolder tree (36 train / 18 val images of 32x32) made by the test."""
    return write_imagefolder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = os.environ.get("DRN_DATA_DIR")
    if not d:
        pytest.skip("DRN_DATA_DIR is not set (CI sets it to ../shared/data/cifar10-5k)")
    p = Path(d).absolute()
    if not (p / "train").is_dir():
        pytest.skip(f"DRN_DATA_DIR={d} has no train/ folder")
    return p


def cli_command(prog: str) -> list[str]:
    exe = shutil.which(prog)  # the installed console script
    if exe is not None:
        return [exe]
    mod, func = {"drn-train": ("drn.cli", "train_main"), "drn-eval": ("search.evaluate", "main"),
                 "drn-search": ("search.cli", "main")}[prog]
    return [sys.executable, "-c", f"import sys; from {mod} import {func}; sys.exit({func}(sys.argv[1:]))"]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run a console entry point in a fresh interpreter, as a user would."""
    prog, rest = args[0], args[1:]
    cmd = cli_command(prog)
    return subprocess.run([*cmd, *rest], capture_output=True, text=True, cwd=cwd, timeout=900)


def search_args(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """drn-search's flags for a small real search: ResNet-8 on an ImageFolder tree, 2 epochs from scratch."""
    return ["--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", str(data),
            "--epochs", "2", "--finetune-epochs", "0", "--backbone", "none", "--batch-size", "12",
            "--storage", str(storage), "--name", name, *extra]


def ray_sessions() -> set[Path]:
    """Ray's session folders on this machine: a test's own are those that appear while it runs (with
    those of the tests running beside it, which hold none of its secrets)."""
    return set(Path("/tmp/ray").glob("session_2*"))


def files_holding(secret: str, *roots: Path) -> tuple[int, list[Path]]:
    """How many files there are under `roots`, and those whose bytes hold `secret`. A file gone by the
    time it is read (a Ray session of a test beside this one, cleaning up) holds nothing."""
    seen, holding = 0, []
    for root in roots:
        for folder, _, names in os.walk(root):
            for n in names:
                f = Path(folder) / n
                try:
                    data = f.read_bytes() if f.is_file() else None
                except OSError:
                    continue
                if data is not None:
                    seen += 1
                    if secret.encode() in data:
                        holding.append(f)
    return seen, holding


def interrupt_search(args: list[str], after: str, cwd=None, pause: float = 0.0) -> tuple[int, str]:
    """Run drn-search with `args`, Ctrl-C once a stderr line holds `after` (and `pause` seconds more):
    its exit code and everything it wrote to stderr."""
    # SIGINT as a terminal gives it: a runner started in the background (`cmd &`) ignores SIGINT, its
    # children inherit that, and Python then installs no KeyboardInterrupt handler of its own
    proc = subprocess.Popen([*cli_command("drn-search"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = [], time.time() + 600
    for line in proc.stderr:
        seen.append(line)
        if after in line or time.time() > deadline:
            break
    time.sleep(pause)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + err


def margins_space(folder: Path) -> Path:
    """A space of the paper's margins and loss weights alone (d_c, d_d, lam, alpha, as spaces/wide.yaml
    has them): several parameters for the tests of the searcher's and the tracking's mechanics."""
    from search.config import SPACES_DIR
    f = folder / "margins.yaml"
    f.write_text("\n".join(line for line in (SPACES_DIR / "wide.yaml").read_text().splitlines()
                           if line.startswith(("d_c", "d_d", "lam", "alpha"))))
    return f


def mlflow_server_env(**extra: str) -> dict:
    """An MLflow server's environment, as cluster.yaml's head starts it: without MLflow 3's job runner
    (eight huey consumers, ~2 GB, for GenAI jobs that tracking never asks for)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra}


def start_mlflow(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` (its store, artifacts and log in `folder`), answering."""
    uri = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=log, env=mlflow_server_env())
    log.close()
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """A real `mlflow server` on 127.0.0.1 (its store, artifacts and log in `folder`); yields its URI."""
    port = free_port()
    proc = start_mlflow(folder, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def s3_server(bucket: str = "drn-bucket"):
    """A real S3 API on 127.0.0.1 (moto's server) holding `bucket`; yields the environment a client
    needs to reach it (pyarrow, boto3 and a local Ray's workers read AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def enqueued_study(db: Path, name: str, trials: list[dict]) -> str:
    """An Optuna study NAME in sqlite file `db` whose first trials are `trials` (enqueued: the searcher
    asks them in this order, whatever the seed), for `drn-search --optuna-storage <returned URL>`:
    tests that need a given parameter in a given trial do not depend on a sampler's draws."""
    import optuna
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for params in trials:
        study.enqueue_trial(params)
    return url
