"""MLflow: one experiment per search, a parent run for the search, a nested child run per trial
(per-epoch metrics, final model, routes), Pareto tags and plot, front models registered.

Everything goes through an explicit `MlflowClient(uri)` with an absolute tracking URI (Ray moves
trials' working directories) and explicit experiment ids: no `mlflow.set_experiment`, whose env
var would override the experiment inside workers. Children nest by the `mlflow.parentRunId` tag.
"""
import dataclasses
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from drn.config import UsageError

RDB_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")
# child-run tag -> trials-table column; the UI filter `tags.pareto = 'true'` shows the front(s)
PARETO_TAGS = {"pareto": "pareto_flops",      # accuracy vs FLOPs, among the trials of the run's target
               "pareto_k": "pareto_k",        # accuracy vs routing length K, same target
               "pareto_all": "pareto_all"}    # accuracy vs FLOPs across all targets of the search


def resolve_uri(uri: str | None, results_dir: Path) -> str:
    """The tracking URI, absolute; a server must answer its /health before any trial runs."""
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
            raise UsageError(f"--mlflow-uri {uri!r}: a sqlite URI is sqlite:///path/to/mlflow.db")
        return f"sqlite:///{Path(path).expanduser().absolute()}"
    if scheme == "file":
        return uri
    if scheme in RDB_SCHEMES:
        return uri
    raise UsageError(f"--mlflow-uri {uri!r}: give http(s)://host:port, sqlite:///path, file:///path or an RDB URL")


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
        run = client.create_run(self.experiment_id, run_name=f"trial-{trial}", tags={
            "mlflow.parentRunId": self.parent_run_id, "optuna_trial": str(trial), "target": str(target),
            "state": "RUNNING", "search": self.search, **{tag: "false" for tag in PARETO_TAGS}})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        return run.info.run_id

    def log_epoch(self, run_id: str, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_final(self, run_id: str, trainer) -> None:
        """The finished trial's model (mlflow.pytorch), its checkpoint and its val routes."""
        import mlflow
        import torch
        from drn.evaluate import route_split
        model = trainer.model.eval().cpu()
        val = trainer.data.val
        preds, gates, _ = route_split(model, val.images, trainer.cfg.eval_batch_size, "hard")
        flops = trainer.cost.route_cost(gates)
        with tempfile.TemporaryDirectory() as d:
            write_routes(Path(d) / "routes.parquet", val.labels, preds, gates, flops)
            client = self.client()
            client.log_artifact(run_id, str(Path(d) / "routes.parquet"))
            client.log_artifact(run_id, str(trainer.checkpoint_path), artifact_path="checkpoint")
        mlflow.set_tracking_uri(self.uri)
        example = val.images[:2].float().div(255).numpy()
        with mlflow.start_run(run_id=run_id, nested=True):
            with torch.no_grad():
                out = RoutedClassifier(model)(torch.from_numpy(example)).numpy()
            signature = mlflow.models.infer_signature(example, out)
            # requirements given, not inferred: inference re-imports the model in a subprocess (~10 s)
            # and no serving check (MLflow reloads the model to run the example, ~5 s a trial):
            # test_tracking loads the logged model by its models:/ URI and runs it
            info = mlflow.pytorch.log_model(RoutedClassifier(model), name="model", signature=signature,
                                            input_example=example, pip_requirements=requirements(),
                                            validate_serving_input=False)
        client.set_tag(run_id, "model", "logged")
        client.set_tag(run_id, "model_uri", info.model_uri)   # MLflow 3: models:/m-<id>, not the run's artifacts

    # ------------------------------------------------------------------ driver side
    def log_backbone(self, info: dict) -> None:
        """The search's backbone on its parent run: path and origin as tags, its accuracies and cost as metrics."""
        client = self.client()
        for k in ("path", "origin"):
            client.set_tag(self.parent_run_id, f"backbone_{k}", str(info[k]))
        for k in ("val_accuracy", "test_accuracy", "seconds", "epochs"):
            if isinstance(info.get(k), (int, float)):
                client.log_metric(self.parent_run_id, f"backbone_{k}", float(info[k]))

    def update(self, rows: list[dict], parquet: Path | None = None, targets: list[str] | None = None,
               cost_key: str = "flops") -> None:
        """Trial states and Pareto tags on the children; trials table and Pareto plot on the parent."""
        client = self.client()
        runs = {r.data.tags.get("optuna_trial"): r for r in client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10000)}
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
        for row in rows:
            run = runs.get(str(row["trial"]))
            if run is None:
                continue
            rid = run.info.run_id
            tags = {"state": row["state"]}
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

    def register_front(self, rows: list[dict]) -> list[str]:
        """Register the front's logged models under `drn-<search>`; returns models:/ URIs."""
        import mlflow
        mlflow.set_tracking_uri(self.uri)   # the registry resolves models:/m-<id> sources through it
        client = self.client()
        name = self.search if self.search.startswith("drn-") else f"drn-{self.search}"  # not drn-drn-…
        runs = {r.data.tags.get("optuna_trial"): r for r in client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                                                f"and tags.model = 'logged'", max_results=10000)}
        front = [runs[str(r["trial"])] for r in rows if r.get("pareto_flops") and str(r["trial"]) in runs]  # every target's
        if not front:
            return []
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name, description=f"Pareto fronts (val accuracy vs FLOPs, one per target) of search {self.search}")
        have = {v.run_id: v.version for v in client.search_model_versions(f"name = '{name}'")}
        uris = []
        for run in front:
            rid = run.info.run_id
            if rid not in have:
                model_uri = run.data.tags["model_uri"]
                v = client.create_model_version(name, source=model_uri, run_id=rid,
                                                model_id=model_uri.removeprefix("models:/"),
                                                tags={"optuna_trial": run.data.tags.get("optuna_trial", "")})
                have[rid] = v.version
            uris.append(f"models:/{name}/{have[rid]}")
        return uris


def check(cfg, results_dir: Path) -> tuple[str, str | None]:
    """Before anything is written: the tracking URI (absolute, reachable) and the artifact
    location a new experiment gets; a name already taken there is a usage error."""
    import mlflow
    from mlflow import MlflowClient
    uri = resolve_uri(cfg.mlflow_uri, results_dir)
    local = uri.startswith(("sqlite:", "file:"))
    artifacts = (results_dir / "mlartifacts").absolute().as_uri() if local else None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return uri, artifacts        # a new store: nothing to clash with, and nothing written yet
    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.name)
    except mlflow.exceptions.MlflowException as e:
        raise UsageError(f"MLflow at {uri}: {str(e).splitlines()[0]}") from None
    if exp is not None:
        where = f" with artifacts at {exp.artifact_location}" if exp.artifact_location != artifacts else ""
        raise UsageError(f"MLflow experiment {cfg.name!r} already exists at {uri}{where}; pick another --name")
    return uri, artifacts


def resumed(results_dir: Path) -> Tracking:
    return Tracking(**json.loads((results_dir / "mlflow.json").read_text()))


def create(cfg, results_dir: Path, uri: str, artifacts: str | None) -> Tracking:
    """The experiment and the search's parent run (CLI config, space file, version, commit)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(cfg.name, artifact_location=artifacts)
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


def pareto_plot(rows: list[dict], targets: list[str], path: Path, cost_key: str = "flops") -> None:
    """Two panels, accuracy vs FLOPs and accuracy vs K: every trial, each target's front as a line,
    the front across targets (when several) circled, FLOPs targets as dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    has = [r for r in rows if r.get("accuracy") is not None and r.get("flops")]
    done = [r for r in has if r["state"] == "COMPLETE"]
    other = [r for r in has if r["state"] != "COMPLETE"]
    groups = list(dict.fromkeys([*targets, *(r["target"] for r in done)]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, col, label in ((axes[0], "flops", "pareto_flops", "FLOPs per image"),
                                (axes[1], "k", "pareto_k", "routing length K (executed blocks)")):
        if other:
            ax.scatter([r[key] for r in other], [100 * r["accuracy"] for r in other], c="0.75", s=16,
                       label="pruned / failed (partial)")
        for i, target in enumerate(groups):
            c = colors[i % len(colors)]
            group = [r for r in done if r["target"] == target]
            if not group:
                continue
            ax.scatter([r[key] for r in group], [100 * r["accuracy"] for r in group], color=c, s=22, alpha=0.6)
            front = sorted((r for r in group if r.get(col)), key=lambda r: r[key])
            ax.plot([r[key] for r in front], [100 * r["accuracy"] for r in front], "o-", color=c, lw=1.5,
                    label=f"front, target {target}" if len(groups) > 1 else "Pareto front")
            for r in front:
                ax.annotate(str(r["trial"]), (r[key], 100 * r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        if key == "flops" and len(groups) > 1:
            top = [r for r in done if r.get("pareto_all")]
            ax.scatter([r["flops"] for r in top], [100 * r["accuracy"] for r in top], s=110, facecolors="none",
                       edgecolors="k", lw=1.2, label="front across targets")
        if key == "flops" and cost_key == "flops":
            for t in sorted({r["target_cost"] for r in rows if r.get("target_cost")}):
                ax.axvline(t, color="0.4", ls="--", lw=0.8)
        ax.set_xlabel(f"{label} (hard routing, val)")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("val accuracy (%)")
    axes[0].set_title("accuracy vs FLOPs" + ("; dashed: targets" if cost_key == "flops" else "")
                      + f" ({', '.join(targets)})")
    axes[1].set_title("accuracy vs routing length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def fetch_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """runs:/<id>[/...] or models:/<name>/<version|alias> -> the local path of that run's
    drn checkpoint (downloaded), which drn-eval loads with weights_only=True."""
    import mlflow
    from mlflow import MlflowClient
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    store = _local_store(tracking_uri)
    if store is not None and not store.exists():   # MLflow would create an empty store there
        raise UsageError(f"{uri}: no MLflow store at {store}; give --mlflow-uri (or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/")[0]
        elif uri.startswith("models:/"):
            name, _, ref = uri[len("models:/"):].partition("/")
            if not ref:
                raise UsageError(f"{uri}: give models:/<name>/<version> or models:/<name>@<alias>")
            mv = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
            run_id = mv.run_id
        else:
            raise UsageError(f"{uri}: not a runs:/ or models:/ URI")
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/checkpoint.pt",
                                                        tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as e:
        raise UsageError(f"{uri}: {str(e).splitlines()[0]}") from None


def _local_store(tracking_uri: str) -> Path | None:
    """The file or folder of a local tracking store (sqlite file, ./mlruns folder), else None."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri[len("file:"):].removeprefix("//"))
    if "://" not in tracking_uri and ":" not in tracking_uri:
        return Path(tracking_uri)
    return None
