"""MLflow, trial logging: one experiment per search, a parent run for the search, a nested child
run per trial (per-epoch metrics, final model, routes), Pareto and feasibility tags. The registry of
the front's models is search/registry.py, the Pareto plot search/plots.py.

Everything goes through an explicit `MlflowClient(uri)` with an absolute tracking URI (Ray moves
trials' working directories) and explicit experiment ids: no `mlflow.set_experiment`, whose env
var would override the experiment inside workers. Children nest by the `mlflow.parentRunId` tag.
"""
import dataclasses
import json
import logging
import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from drn.config import UsageError, is_number

from .config import brief
from .plots import pareto_plot
from .secrets import strip_password
from .registry import CHECKPOINT_ARTIFACT, fetch_checkpoint, register_front, slug, using_tracking_uri   # noqa: F401 (public here too)

# MLflow announces each new sqlite store's schema set-up at INFO: two lines of noise per search
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
# and each model version it registers ("Waiting up to 300 seconds for model version to finish creation")
logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
# and prints two links per finished run on a server, to the run and to the experiment's GenAI overview:
# the search prints one link, to its fronts (front_url), at its end
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a server that does not answer costs a trial seconds per call, not MLflow's default ~4 minutes of
# retries per epoch: its logging is best effort (search/trainable.py BestEffort), the driver fills gaps
for _k, _v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
               ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
    os.environ.setdefault(_k, _v)

RDB_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")
# child-run tag -> trials-table column; the UI filter `tags.pareto = 'true'` shows the front(s)
PARETO_TAGS = {"pareto": "pareto_flops",      # accuracy vs FLOPs, among the trials of the run's target
               "pareto_k": "pareto_k",        # accuracy vs routing length K, same target
               "pareto_all": "pareto_all"}    # accuracy vs FLOPs across all targets of the search
# the figures of the final epoch that are also linked to the trial's logged model (its Models-tab columns)
MODEL_METRICS = ("accuracy", "test_accuracy", "flops", "test_flops", "k", "test_k", "latency_ms", "test_latency_ms")
# what the MLflow 3 UI reads to open an experiment on its runs, not on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# a view of the runs page saved on the experiment (the UI's "share view": the tag
# mlflow.sharedViewState.<key>, opened by ?viewStateShareKey=<key>): the fronts' runs, flat, best val
# accuracy first, with what a person picks by in columns. A fresh browser opens an experiment on the
# GenAI overview whatever its tags say; this link opens the runs
FRONT_VIEW = "front"


def front_view(cost_key: str) -> dict:
    return {"searchFilter": "tags.pareto = 'true'", "orderByKey": "metrics.`accuracy`", "orderByAsc": False,
            "selectedColumns": ["tags.`target`", "metrics.`accuracy`", "metrics.`test_accuracy`",
                                f"metrics.`{cost_key}`", "metrics.`k`", "metrics.`effective_paths`",
                                "tags.`feasible`"],
            "runsExpanded": {}, "groupBy": None}


def front_url(uri: str, experiment_id: str) -> str:
    """The runs page of the search's fronts (FRONT_VIEW): on the server at `uri`, or on the
    `mlflow ui` a local store is opened with (127.0.0.1:5000)."""
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={FRONT_VIEW}"


def resolve_uri(uri: str | None, results_dir: Path, given_by: str = "--mlflow-uri") -> str:
    """The tracking URI, absolute; a server must answer its /health before any trial runs.
    `given_by`: where `uri` came from (the flag or $MLFLOW_TRACKING_URI), for the error lines."""
    if uri is None:
        return f"sqlite:///{(results_dir / 'mlflow.db').absolute()}"
    if "://" not in uri and ":" not in uri:                    # a bare path: a file store
        return Path(uri).expanduser().absolute().as_uri()
    scheme = uri.split(":", 1)[0].split("+")[0]
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise UsageError(f"MLflow at {uri} answered /health with HTTP {r.status}")
        except (urllib.error.URLError, socket.timeout, ConnectionError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(f"cannot reach MLflow at {uri}: {reason}") from None
        return uri.rstrip("/")
    if scheme == "sqlite":
        path = uri.split("sqlite:///", 1)[-1] if uri.startswith("sqlite:///") else None
        if not path:
            raise UsageError(f"{given_by} {uri!r}: a sqlite URI is sqlite:///path/to/mlflow.db")
        return f"sqlite:///{Path(path).expanduser().absolute()}"
    if scheme == "file":
        return uri
    if scheme in RDB_SCHEMES:
        return uri
    raise UsageError(f"{given_by} {uri!r}: give http(s)://host:port, sqlite:///path, file:///path or an RDB URL")


@dataclass(frozen=True)
class Tracking:
    """What a trial needs to log (plain strings: it travels in the trial config)."""
    uri: str
    experiment_id: str
    parent_run_id: str
    search: str

    def client(self):
        from mlflow import MlflowClient
        return MlflowClient(tracking_uri=self.uri)

    # ------------------------------------------------------------------ trial side
    def child_run(self, trial: int, target: str, params: dict) -> str:
        """The trial's child run; a restarted trial finds and reuses its own (no duplicates)."""
        client = self.client()
        found = client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.optuna_trial = '{trial}'"))
        if found:
            return found[0].info.run_id
        login = {"logged_in_as": os.environ["MLFLOW_TRACKING_USERNAME"]} if os.environ.get("MLFLOW_TRACKING_USERNAME") else {}
        run = client.create_run(self.experiment_id, run_name=f"t{trial}-{slug(target)}", tags={
            "mlflow.parentRunId": self.parent_run_id, "optuna_trial": str(trial), "target": str(target),
            "state": "RUNNING", "search": self.search, "feasible": "false", **login,   # the MLflow user, not its password
            **{tag: "false" for tag in PARETO_TAGS}})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        return run.info.run_id

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """Metric key -> the last step the run has of it (empty for a new run)."""
        client = self.client()
        return {k: max(m.step for m in client.get_metric_history(run_id, k))
                for k in client.get_run(run_id).data.metrics}

    def log_epoch(self, run_id: str, metrics: dict, step: int, model_id: str | None = None) -> None:
        """One epoch's metrics; with `model_id` (the last epoch's) MODEL_METRICS are linked to that model."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client().log_batch(run_id, metrics=[
            Metric(k, float(v), now, step, model_id=model_id if k in MODEL_METRICS else None)
            for k, v in metrics.items()])

    def log_final(self, run_id: str, trainer, trial: int, target: str) -> str:
        """The finished trial's val routes, its checkpoint and its model (mlflow.pytorch, named
        <search>-t<trial>-<target>; MLflow gives it the run's params); returns the model's id.
        A restarted trial whose model is logged already gets that one back: one model per trial."""
        import mlflow
        import torch
        from drn.evaluate import route_split
        from drn.routemap import routes_png
        client = self.client()
        done = self.logged_model(run_id)
        if done is not None:
            return done
        model = trainer.model.eval().cpu()
        val = trainer.data.val
        preds, gates, _ = route_split(model, val.images, trainer.cfg.eval_batch_size, "hard")
        flops = trainer.cost.route_cost(gates)
        with tempfile.TemporaryDirectory() as d:
            write_routes(Path(d) / "routes.parquet", val.labels, preds, gates, flops)
            client.log_artifact(run_id, str(Path(d) / "routes.parquet"))
            # val, not test: a person picks a model by what the MLflow UI shows
            routes_png(Path(d) / "routes.png", val.images, val.labels, preds, gates, trainer.history,
                       title=f"trial {trial}, target {target}, val split")
            client.log_artifact(run_id, str(Path(d) / "routes.png"))
            client.log_artifact(run_id, str(trainer.checkpoint_path), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))
        example = val.images[:2].float().div(255).numpy()
        with using_tracking_uri(self.uri), mlflow.start_run(run_id=run_id, nested=True):
            with torch.no_grad():
                out = RoutedClassifier(model)(torch.from_numpy(example)).numpy()
            signature = mlflow.models.infer_signature(example, out)
            # requirements given, not inferred: inference re-imports the model in a subprocess (~10 s)
            # and no serving check (MLflow reloads the model to run the example, ~5 s a trial):
            # test_tracking loads the logged model by its models:/ URI and runs it
            info = mlflow.pytorch.log_model(
                RoutedClassifier(model), name=self.model_name(trial, target), signature=signature,
                input_example=example, pip_requirements=requirements(), validate_serving_input=False,
                tags={"search": self.search, "optuna_trial": str(trial), "target": str(target)})
        self._tag_model(run_id, info.model_uri)
        return info.model_id

    def model_name(self, trial: int, target: str) -> str:
        """The trial's logged model: <search>-t<trial>-<target>, as MLflow takes names (s-t3-50pct)."""
        return f"{slug(self.search)}-t{trial}-{slug(target)}"

    def logged_model(self, run_id: str) -> str | None:
        """The id of the model the run logged already (READY: a crash mid-upload left none), else None."""
        from mlflow.entities import LoggedModelStatus
        found = [m for m in self.client().search_logged_models([self.experiment_id],
                                                               filter_string=f"source_run_id = '{run_id}'")
                 if m.status == LoggedModelStatus.READY]
        if not found:
            return None
        self._tag_model(run_id, found[0].model_uri)   # a crash may have come between the model and its tags
        return found[0].model_id

    def _tag_model(self, run_id: str, model_uri: str) -> None:
        client = self.client()
        client.set_tag(run_id, "model", "logged")
        client.set_tag(run_id, "model_uri", model_uri)   # MLflow 3: models:/m-<id>, not the run's artifacts

    # ------------------------------------------------------------------ driver side
    def log_backbone(self, info: dict) -> None:
        """The search's backbone on its parent run: path and origin as tags, its accuracies and cost as metrics."""
        client = self.client()
        for k in ("path", "origin"):
            client.set_tag(self.parent_run_id, f"backbone_{k}", str(info[k]))
        for k in ("val_accuracy", "test_accuracy", "seconds", "epochs"):
            if isinstance(info.get(k), (int, float)):
                client.log_metric(self.parent_run_id, f"backbone_{k}", float(info[k]))

    def children(self) -> dict:
        """optuna_trial (str) -> the trial's child run."""
        return {r.data.tags.get("optuna_trial"): r for r in self.client().search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10000)}

    def update(self, rows: list[dict], parquet: Path | None = None, targets: list[str] | None = None,
               cost_key: str = "flops") -> list[dict]:
        """Trial states, feasible and Pareto tags on the children; trials table and Pareto plot on the
        parent; the registry (registry.register_front), whose current models it returns."""
        client = self.client()
        runs = self.children()
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
        for row in rows:
            run = runs.get(str(row["trial"]))
            if run is None:
                continue
            rid = run.info.run_id
            tags = {"state": row["state"], "feasible": "true" if row.get("feasible") else "false"}
            tags.update({tag: "true" if row.get(col) else "false" for tag, col in PARETO_TAGS.items()})
            for tag, value in tags.items():
                if run.data.tags.get(tag) != value:   # one call per change, not per trial per update
                    client.set_tag(rid, tag, value)
            if row.get("reason") and run.data.tags.get("reason") is None:
                client.set_tag(rid, "reason", str(row["reason"])[:4000])
            if row["state"] in status and run.info.status == "RUNNING":
                client.set_terminated(rid, status[row["state"]])
        if parquet is not None and parquet.exists():
            client.log_artifact(self.parent_run_id, str(parquet))
        if rows:
            with tempfile.TemporaryDirectory() as d:
                pareto_plot(rows, targets or [], Path(d) / "pareto.png", cost_key)
                client.log_artifact(self.parent_run_id, str(Path(d) / "pareto.png"))
        return register_front(self, rows, runs)

    def log_importance(self, studies: dict) -> dict[str, dict[str, float]]:
        """Optuna's parameter importances (search/plots.py) on the parent run, as `param_importance.png`
        and `.json`, for the studies (target -> optuna.Study) with enough complete trials."""
        from .plots import importance_plot, param_importances
        importances = param_importances(studies)
        if importances:
            with tempfile.TemporaryDirectory() as d:
                importance_plot(importances, Path(d) / "param_importance.png")
                (Path(d) / "param_importance.json").write_text(json.dumps(importances, indent=1))
                for f in ("param_importance.png", "param_importance.json"):
                    self.client().log_artifact(self.parent_run_id, str(Path(d) / f))
        return importances

    def backfill(self, row: dict, params: dict, data) -> None:
        """A finished trial's child run completed from its checkpoint (its own record of every epoch):
        the epochs' metrics MLflow lacks and the model, when the trial could not log them itself."""
        from types import SimpleNamespace
        from drn.checkpoint import load_checkpoint, model_from_checkpoint
        from drn.cost import measure_cost_table
        ckpt = load_checkpoint(row["checkpoint"])
        model, cfg = model_from_checkpoint(ckpt)
        run = TrialRun(self, row["trial"], row["target"], {**params, "seed": cfg.seed})
        history = ckpt["history"]
        for i, h in enumerate(history):
            m = {k: float(v) for k, v in h.items() if is_number(v)}
            if is_number(h.get("target")) and is_number(h.get("flops")):
                m["rel_error"] = h["flops"] / h["target"] - 1
            trainer = SimpleNamespace(model=model, data=data, cfg=cfg, cost=measure_cost_table(model),
                                      history=history, checkpoint_path=Path(row["checkpoint"]))
            run.report(m, int(h["epoch"]), trainer if i == len(history) - 1 else None)

    def complete(self, rows: list[dict], params: dict, data) -> list[str]:
        """Backfill every finished trial whose run lacks its model (the trial said so, or MLflow was
        lost before it could); returns one line per trial still missing."""
        runs, lines = self.children(), []
        for row in rows:
            run = runs.get(str(row["trial"]))
            if row["state"] != "COMPLETE" or (not row.get("mlflow_missing") and run is not None
                                               and run.data.tags.get("model_uri")):
                continue
            try:
                if not row.get("checkpoint"):
                    raise FileNotFoundError("no checkpoint on this machine")
                self.backfill(row, {**params, **{k: row[k] for k in params if k in row}}, data)
            except Exception as e:
                lines.append(f"MLflow lacks trial {row['trial']}'s final metrics and model: {brief(e)}")
        return lines

    def register_front(self, rows: list[dict]) -> list[dict]:
        return register_front(self, rows)


class TrialRun:
    """A trial's side of MLflow: its child run, each epoch's metrics logged once per (key, step) --
    a restarted trial re-runs the epochs after its last Tune checkpoint, and the MLflow log of an
    epoch comes before Tune saves that epoch's checkpoint -- and, at the last epoch, its model once."""

    def __init__(self, track: Tracking, trial: int, target: str, params: dict):
        self.track, self.trial, self.target = track, trial, str(target)
        self.run_id = track.child_run(trial, target, params)
        self.logged = track.logged_steps(self.run_id)

    def report(self, metrics: dict, step: int, trainer=None) -> str | None:
        """One epoch's metrics; with `trainer` (the last epoch) its model first, which the
        final figures are then linked to (the Models tab shows them); returns that model's URI."""
        model_id = self.track.log_final(self.run_id, trainer, self.trial, self.target) if trainer else None
        fresh = {k: v for k, v in metrics.items() if self.logged.get(k, -1) < step}
        if fresh:
            self.track.log_epoch(self.run_id, fresh, step, model_id)
            self.logged.update(dict.fromkeys(fresh, step))
        return f"models:/{model_id}" if model_id else None


def trial_login(track: Tracking) -> tuple[str, str] | None:
    """The MLflow login the trials use, for a server that asks for one (the driver's own login is in
    MLFLOW_TRACKING_USERNAME / _PASSWORD): a user of this search alone, `drn-<experiment id>`, with
    edit rights on its experiment and nothing else, and a new random password each time a driver
    starts (nothing stores it). Where the driver may not create users, its own login. None: no login."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password and track.uri.startswith(("http://", "https://"))):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    auth, name, secret = AuthServiceClient(track.uri), f"drn-{track.experiment_id}", secrets.token_urlsafe(24)
    try:
        try:
            auth.create_user(name, secret)
        except MlflowException as e:
            if "exists" not in str(e).lower():
                raise
            auth.update_user_password(name, secret)   # a resumed search: the user of its first driver
        auth.grant_user_permission(name, "experiment", track.experiment_id, "EDIT")
    except (MlflowException, OSError) as e:   # no auth app (404), or a driver that is no admin (403)
        logging.getLogger(__name__).debug("no per-search MLflow user: %s", e)
        return user, password
    return name, secret


def use_login(login: tuple[str, str] | None) -> None:
    """In a trial's process: MLflow's client reads the login from these two variables (Ray neither logs
    nor shows a worker's own environment, unlike its runtime env)."""
    if login is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login


def check(cfg, results_dir: Path) -> tuple[str, str | None]:
    """Before anything is written: the tracking URI (--mlflow-uri, else $MLFLOW_TRACKING_URI, else
    sqlite in the results dir; absolute, reachable) and the artifact location a new experiment
    gets; an experiment name already taken there is a usage error."""
    import mlflow
    from mlflow import MlflowClient
    name = experiment_name(cfg)
    env = strip_password("$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI") or None)
    if env is not None:   # the trials of a local Ray inherit this process's environment
        os.environ["MLFLOW_TRACKING_URI"] = env
    uri = resolve_uri(cfg.mlflow_uri or env, results_dir,
                      "--mlflow-uri" if cfg.mlflow_uri else "$MLFLOW_TRACKING_URI")
    local = uri.startswith(("sqlite:", "file:"))
    artifacts = (results_dir / "mlartifacts").absolute().as_uri() if local else None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return uri, artifacts        # a new store: nothing to clash with, and nothing written yet
    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as e:
        raise UsageError(f"MLflow at {uri}: {str(e).splitlines()[0]}") from None
    if exp is not None:
        where = f" with artifacts at {exp.artifact_location}" if exp.artifact_location != artifacts else ""
        flag = "--experiment-name" if cfg.experiment_name else "--name (or give --experiment-name)"
        raise UsageError(f"MLflow experiment {name!r} already exists at {uri}{where}; pick another {flag}")
    return uri, artifacts


def experiment_name(cfg) -> str:
    """--experiment-name, else the search's name."""
    if cfg.experiment_name is not None and not cfg.experiment_name.strip():
        raise UsageError("--experiment-name must not be empty")
    return cfg.experiment_name or cfg.name


def resumed(results_dir: Path) -> Tracking:
    return Tracking(**json.loads((results_dir / "mlflow.json").read_text()))


def create(cfg, results_dir: Path, uri: str, artifacts: str | None) -> Tracking:
    """The experiment (tagged to open on its runs in the MLflow 3 UI) and the search's parent run
    (CLI config, space file, version, commit)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment_name(cfg), artifact_location=artifacts,
                                      tags={**EXPERIMENT_KIND, "search": cfg.name,
                                            f"mlflow.sharedViewState.{FRONT_VIEW}": json.dumps(front_view(cfg.cost_key))})
    parent = client.create_run(exp_id, run_name=cfg.name, tags={"role": "search", "search": cfg.name,
                                                                 "git_commit": git_commit(), "drn_version": version()})
    rid = parent.info.run_id
    for k, v in cfg.to_dict().items():
        client.log_param(rid, k, json.dumps(v) if isinstance(v, (list, dict)) else v)
    client.log_artifact(rid, cfg.space)
    client.log_artifact(rid, str(results_dir / "search.json"))
    tracking = Tracking(uri, exp_id, rid, cfg.name)
    (results_dir / "mlflow.json").write_text(json.dumps(dataclasses.asdict(tracking)))
    return tracking


class RoutedClassifier(nn.Module):
    """What mlflow.pytorch logs (as torch.export's pt2, no pickle): images in [0, 1] (B, 3, H, W)
    -> logits under hard routing at the model's calibrated threshold, in its mask form (every
    block runs, skipped ones are multiplied by 0: the same logits as gathered routing, which
    torch.export cannot trace because its shapes depend on the data). For the fast gathered form
    load the run's drn checkpoint (`checkpoint/checkpoint.pt`, what drn-eval loads)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, routing="mask").logits


def write_routes(path: Path, labels, preds, gates, flops) -> None:
    """One row per val image: index, label, prediction, route (executed-block bits), FLOPs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    g = gates.bool().cpu()
    table = pa.table({
        "index": list(range(labels.shape[0])),
        "label": labels.cpu().tolist(),
        "prediction": preds.cpu().tolist(),
        "route": ["".join("1" if b else "0" for b in row) for row in g.tolist()],
        "executed": g.sum(1).tolist(),
        "flops": flops.cpu().tolist(),
    })
    pq.write_table(table, path)


def requirements() -> list[str]:
    """The logged model is a torch.export program: it needs torch (and drn-search to be used as a
    routed model through its checkpoint)."""
    import torch
    return [f"torch=={torch.__version__.split('+')[0]}", f"drn-search=={version()}"]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        return v("drn-search")
    except PackageNotFoundError:
        return "unknown"
