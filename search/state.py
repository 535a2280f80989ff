"""Where a search's state lives, and who can reach it.

With a cloud --storage (s3://, gs://, file://...) Tune keeps its part there, but ours -- search.json,
mlflow.json, trials.parquet, scheduler.jsonl and the Optuna sqlite study -- is written on the head, in
./drn-results/<name>/. A copy goes to <storage>/<name>/drn-state/ when the search starts and each time
a trial ends, so that `--resume NAME --storage URI` on a new head fetches it first. An RDB
--optuna-storage (postgresql://...) is shared already: there is no optuna.db to copy.

A Ray cluster that spans several machines runs trials where the head's disk is out of reach: their
checkpoints (--storage) and MLflow runs must go somewhere every machine can write.
"""
import json
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from drn.config import UsageError

from .cloud import fetch, publish
from .config import is_uri, local_store

STATE_DIR = "drn-state"
SCHEDULER_STATE = "scheduler.jsonl"   # the ASHAs' rungs (search/scheduler.py)
FILES = ("search.json", "mlflow.json", "trials.parquet", SCHEDULER_STATE)
STUDY = "optuna.db"        # the default study (--optuna-storage unset), beside them
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")   # an MLflow server only the head reaches


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def state_uri(storage: str, name: str) -> str | None:
    """The cloud copy of search `name`'s files, or None for a local --storage (they live there already)."""
    return f"{storage.rstrip('/')}/{name}/{STATE_DIR}" if is_uri(storage) else None


def backup_sqlite(db: Path, copy: Path) -> None:
    """A consistent copy of a sqlite file that the searcher may be writing (sqlite's online backup:
    copying the bytes mid-transaction could give a torn database)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(copy)
    try:
        with dst:
            src.backup(dst)
    finally:
        src.close()
        dst.close()


RETRIES = (1.0, 2.0, 4.0)   # seconds before each new try of a failed copy (a network blip, a throttled bucket)


def upload(results_dir: Path, uri: str | None, log, retries=RETRIES) -> bool:
    """Copy the search's files to its cloud copy `uri` (nothing for None), trying again after each of
    `retries` seconds. A failure is one line via `log` naming the files not copied, not the search's
    end: the next trial's end tries again, and the search's end exits non-zero if its copy fails."""
    if uri is None:
        return False
    import pyarrow as pa
    names = [f for f in (*FILES, STUDY) if (results_dir / f).is_file()]
    for wait in (*retries, None):
        try:
            with tempfile.TemporaryDirectory() as d:
                files = [results_dir / f for f in FILES if (results_dir / f).is_file()]
                if (results_dir / STUDY).is_file():
                    backup_sqlite(results_dir / STUDY, Path(d) / STUDY)
                    files.append(Path(d) / STUDY)
                publish(uri, files)
            return True
        except (OSError, sqlite3.Error, pa.ArrowException) as e:
            if wait is None:
                log(f"could not copy the search's state to {uri} ({', '.join(names)} not copied; they are in "
                    f"{results_dir}): {_first_line(e)}")
                return False
            time.sleep(wait)


class Unreadable(UsageError):
    """The cloud copy could not be read (credentials, network)."""


def fetch_state(storage: str, name: str, results_dir: Path, accept=lambda fetched: None) -> bool:
    """On a head that lacks search `name`: its files from the cloud copy into `results_dir`; False
    when there is none. Refused (nothing written) when the copy cannot be resumed here, or when
    `accept(folder)` raises a UsageError on the fetched files."""
    uri = state_uri(storage, name)
    if uri is None or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return False
    import pyarrow as pa
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        try:
            if not fetch(f"{uri}/search.json", tmp / "search.json"):
                return False
            fetched = [f for f in FILES[1:] + (STUDY,) if fetch(f"{uri}/{f}", tmp / f)]
        except (OSError, pa.ArrowException) as e:
            raise Unreadable(f"{uri} cannot be read: {_first_line(e)}") from None
        if "mlflow.json" not in fetched:
            raise UsageError(f"{uri} holds no mlflow.json: search {name!r} stopped before it started")
        try:
            track = json.loads((tmp / "mlflow.json").read_text())
            keys = {"uri", "experiment_id", "parent_run_id", "search"}
            if not (isinstance(track, dict) and keys <= set(track) and all(isinstance(track[k], str) for k in keys)):
                raise ValueError("not the search's MLflow record")
        except ValueError as e:   # json's errors are ValueErrors too
            raise UsageError(f"{uri}/mlflow.json is malformed ({str(e).splitlines()[0][:120]}); nothing was "
                             f"fetched") from None
        _check_mlflow_here(track["uri"], name)
        accept(tmp)
        results_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            shutil.move(f, results_dir / f.name)
    return True


def _check_mlflow_here(uri: str, name: str) -> None:
    """A local MLflow store stayed on the old head (it is not copied: its artifacts can be large)."""
    store = local_store(uri)
    if store is not None and not store.exists():
        raise UsageError(f"search {name!r} logs to the MLflow store {uri}, which is not on this head (a local "
                         f"store stays on the head that ran the search); resume it there, or run searches that "
                         f"must outlive their head with an MLflow server (--mlflow-uri http://HOST:5000)")


def follow_mlflow(results_dir: Path) -> None:
    """The default MLflow store (sqlite in the results dir) moves with its results dir (copied to
    another head, another --storage): mlflow.json then names the store here. Any other store stays."""
    record, here = results_dir / "mlflow.json", results_dir / "mlflow.db"
    track = json.loads(record.read_text())
    store = local_store(track["uri"]) if track["uri"].startswith("sqlite:") else None
    # <the results dir where the search started>/mlflow.db, and this results dir holds it now
    if store is not None and store.parts[-2:] == here.parts[-2:] and store != here and here.is_file():
        record.write_text(json.dumps({**track, "uri": f"sqlite:///{here}"}))


def check_new(storage: str, name: str) -> None:
    """A new search must not write into another's folder under a cloud --storage (a local one is
    checked by its results dir)."""
    if not is_uri(storage):
        return
    import pyarrow as pa
    from pyarrow import fs
    try:
        filesystem, where = fs.FileSystem.from_uri(f"{storage.rstrip('/')}/{name}")
        found = filesystem.get_file_info(where).type != fs.FileType.NotFound
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read --storage {storage}: {_first_line(e)}") from None
    if found:
        raise UsageError(f"search {name!r} already exists in {storage}; continue it with --resume {name} "
                         f"--storage {storage} or pick another --name")


def save_after_the_last_upload(log) -> None:
    """Tune saves its experiment state (trials, searcher, callbacks) into a staging dir that a
    background thread uploads to --storage. Ray 2.60 saves without waiting for the previous upload:
    a forced save (each trial checkpoint, with num_to_keep=1) renames a .tmp file the upload has just
    listed, and the upload fails with a FileNotFoundError traceback on stderr. Here each save waits for
    the upload in flight first (a few small files, milliseconds). Idempotent; called by the Progress
    callback's setup, in whatever process runs Tune's driver."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as Manager
    if getattr(Manager.sync_up_experiment_state, "drn_waits", False):
        return
    sync_up = Manager.sync_up_experiment_state

    def sync_up_experiment_state(self, save_fn, force=False, wait=False):
        def save():
            syncer = getattr(self._storage, "syncer", None)
            if syncer is not None:
                try:
                    syncer.wait()
                except Exception as e:   # that upload is lost; the one after this save sends it all again
                    log(f"warning: an upload of Tune's state to --storage failed: {_first_line(e)}")
            save_fn()
        return sync_up(self, save, force=force, wait=wait)
    sync_up_experiment_state.drn_waits, sync_up_experiment_state.ray = True, sync_up
    Manager.sync_up_experiment_state = sync_up_experiment_state


def cluster_machines() -> int:
    """Machines (node IPs) of the connected Ray cluster: nodes that share one can share its disk."""
    import ray
    return len({n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")})


def check_shared(address: str | None, storage: str, mlflow_uri: str, machines: int) -> None:
    """Trials on other machines write their checkpoints to --storage and their runs to `mlflow_uri`
    (the search's, resolved): both must be reachable from every machine of a cluster (a local Ray is
    one machine)."""
    if address is None or machines <= 1:
        return
    local, fixes = [], []
    if not is_uri(storage) or storage.startswith("file:"):
        local.append(f"--storage {storage}")
        fixes.append("a cloud --storage (s3://BUCKET/PATH, gs://...)")
    if local_store(mlflow_uri) is not None or urlsplit(mlflow_uri).hostname in LOOPBACK:
        local.append(f"MLflow store {mlflow_uri}")
        fixes.append("an MLflow server at an address they reach (--mlflow-uri http://HEAD-IP:5000)")
    if local:
        raise UsageError(f"the Ray cluster at {address} spans {machines} machines, and trials on the others cannot "
                         f"reach this one's {' nor its '.join(local)}: give {' and '.join(fixes)}")
