"""The search's model registry: the logged models of every target's front and of its best feasible
trial are versions of `drn-<search>`, each described and tagged with its trial's figures; an alias
`best-<target>` per budget points at that budget's best feasible model and moves as the search goes;
versions that fall off the front say so. And the other way: any model URI the MLflow UI shows ->
the drn checkpoint of the trial that logged it (what drn-eval loads).

Called from Tracking.update on the driver after every trial that ends, and once at the end."""
import contextlib
import os
import re
from pathlib import Path

from drn.config import UsageError, is_number

from .config import local_store

CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"   # a trial run's drn checkpoint (tracking.log_final)
# the figures a version carries as tags and in its description (val: what every choice reads)
FIGURES = (("accuracy", "val_accuracy", "val accuracy"), ("test_accuracy", "test_accuracy", "test accuracy"),
           ("flops", "flops", "FLOPs"), ("latency_ms", "latency_ms", "latency (ms)"), ("k", "k", "K"))


def model_name(search: str) -> str:
    """The registered model of a search: drn-<search> (not drn-drn-... )."""
    return search if search.startswith("drn-") else f"drn-{search}"


def slug(text: str) -> str:
    """A search name or target as MLflow's model and alias names take it: 50% -> 50pct, 1.5e8 -> 1p5e8,
    my.search -> my-search."""
    s = re.sub(r"(?<=\d)\.(?=\d)", "p", str(text).replace("%", "pct").replace("+", ""))
    return re.sub(r"[^A-Za-z0-9_-]", "-", s)


def alias(target: str) -> str:
    return f"best-{slug(target)}"


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """mlflow.set_tracking_uri for a block, then back as it was. MLflow also exports it as
    $MLFLOW_TRACKING_URI, which a later search in this process would take for the user's."""
    import mlflow
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(env)    # None: unset, as before


def register_front(track, rows: list[dict], runs: dict | None = None) -> list[dict]:
    """Register the logged models of the fronts (`pareto_flops`, one per target) and of each target's
    best feasible trial (results.best_feasible: the alias's), sync every version's description and
    tags with its trial's row, move the aliases. `runs`: optuna_trial -> child run, when the caller
    has them. Returns, per version on a front or under an alias: trial, target, version, uri,
    alias (or None), front, params."""
    with using_tracking_uri(track.uri):   # the registry resolves models:/m-<id> sources through it
        return _register_front(track, rows, runs)


def _register_front(track, rows: list[dict], runs: dict | None) -> list[dict]:
    from .results import best_feasible
    client = track.client()
    runs = runs if runs is not None else track.children()
    logged = {t: r for t, r in runs.items() if r.data.tags.get("model") == "logged"}
    best = {t: best_feasible(rows, t) for t in dict.fromkeys(r["target"] for r in rows)}
    best_trials = {b["trial"] for b in best.values() if b is not None}
    wanted = [r for r in rows if (r.get("pareto_flops") or r["trial"] in best_trials) and str(r["trial"]) in logged]
    name = model_name(track.search)
    exists = bool(client.search_registered_models(f"name = '{name}'"))
    if not wanted and not exists:
        return []
    if not exists:
        client.create_registered_model(name, description=(
            f"Search {track.search}: the models of its accuracy-vs-FLOPs fronts (one per target) and of each "
            f"target's best feasible trial (alias best-<target>: best val accuracy within tolerance)"))
    versions = {v.run_id: v for v in client.search_model_versions(f"name = '{name}'")}
    for row in wanted:
        run = logged[str(row["trial"])]
        if run.info.run_id not in versions:
            uri = run.data.tags["model_uri"]
            versions[run.info.run_id] = client.create_model_version(
                name, source=uri, run_id=run.info.run_id, model_id=uri.removeprefix("models:/"),
                tags={"optuna_trial": str(row["trial"])})
    by_trial = {str(r["trial"]): r for r in rows}
    by_run = {r.info.run_id: r for r in runs.values()}
    out = []
    for rid, v in versions.items():
        row, run = by_trial.get(v.tags.get("optuna_trial")), by_run.get(rid)
        if row is None or run is None:
            continue
        _sync(client, name, v, row, run.data.params, track.search)
        if row.get("pareto_flops") or row["trial"] in best_trials:
            out.append({"trial": row["trial"], "target": row["target"], "version": v.version,
                        "uri": f"models:/{name}/{v.version}", "front": bool(row.get("pareto_flops")),
                        "alias": alias(row["target"]) if row["trial"] in best_trials else None,
                        "params": dict(run.data.params)})
    _move_aliases(client, name, best, {v.tags.get("optuna_trial"): v.version for v in versions.values()})
    return sorted(out, key=lambda m: int(m["version"]))


def version_tags(row: dict, params: dict) -> dict[str, str]:
    tags = {"optuna_trial": str(row["trial"]), "target": str(row["target"]),
            "feasible": _flag(row.get("feasible")), "front": _flag(row.get("pareto_flops"))}
    tags.update({tag: f"{row[col]:.3g}" for col, tag, _ in FIGURES if is_number(row.get(col))})
    tags.update({f"hp_{k}": _short(v) for k, v in params.items()})
    return tags


def describe(row: dict, params: dict, search: str) -> str:
    figures = ", ".join(f"{label} {_fmt(col, row[col])}" for col, _, label in FIGURES if is_number(row.get(col)))
    if row.get("feasible"):
        feasible = "feasible (its cost on val within the tolerance of the target)"
    else:
        err = row.get("rel_error")
        feasible = "not feasible (cost off the target beyond the tolerance" + (
            f": {err:+.1%})" if is_number(err) else ")")
    front = (f"On the accuracy-vs-FLOPs front of target {row['target']}." if row.get("pareto_flops") else
             f"Off the accuracy-vs-FLOPs front of target {row['target']}: another trial of the target dominates it.")
    hp = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return (f"Trial {row['trial']} of search {search}, target {row['target']}: {figures}; {feasible}. "
            f"{front} Hyper-parameters: {hp}.")


def _sync(client, name: str, version, row: dict, params: dict, search: str) -> None:
    """One call per change: a version's description and tags follow its trial's row."""
    text = describe(row, params, search)
    if version.description != text:
        client.update_model_version(name, version.version, description=text)
    for k, v in version_tags(row, params).items():
        if version.tags.get(k) != v:
            client.set_model_version_tag(name, version.version, k, v)


def _move_aliases(client, name: str, best: dict, version_of: dict) -> None:
    """best-<target> -> the version of that target's best feasible trial (none feasible: no alias)."""
    have = client.get_registered_model(name).aliases
    for target, row in best.items():
        a = alias(target)
        want = version_of.get(str(row["trial"])) if row is not None else None
        if want is not None and str(have.get(a)) != str(want):
            client.set_registered_model_alias(name, a, want)
        elif want is None and a in have:
            client.delete_registered_model_alias(name, a)


def _short(v) -> str:
    """A parameter at 3 significant digits (MLflow hands params back as strings); words as they are."""
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


def _flag(v) -> str:
    return "true" if v else "false"


def _fmt(col: str, v: float) -> str:
    return f"{v:.2%}" if "accuracy" in col else f"{v:.4g}"


# ----------------------------------------------------------------------------- URIs -> checkpoint

def fetch_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """Any model URI MLflow shows -> the local path of its trial's drn checkpoint (the source run's
    `checkpoint/checkpoint.pt`, downloaded), which drn-eval loads with weights_only=True:
    models:/m-<id> (a logged model), models:/<name>/<version>, models:/<name>@<alias>, runs:/<run id>[/...]."""
    import mlflow
    from mlflow import MlflowClient
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    store = local_store(tracking_uri)
    if store is not None and not store.exists():   # MLflow would create an empty store there
        raise UsageError(f"{uri}: no MLflow store at {store}; give --mlflow-uri (or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run_id = source_run(client, uri)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                                        tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as e:
        raise UsageError(f"{uri}: {str(e).splitlines()[0]}") from None
    except OSError:   # a run without the artifact (not a drn-search trial), on a local artifact store
        raise UsageError(f"{uri}: its run has no {CHECKPOINT_ARTIFACT} (not a drn-search trial?)") from None


def source_run(client, uri: str) -> str:
    """The run that logged the model a URI names: the checkpoint is that run's artifact."""
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/")[0]
        if not run_id:
            raise UsageError(f"{uri}: give runs:/<run id>")
        return run_id
    if not uri.startswith("models:/"):
        raise UsageError(f"{uri}: not a runs:/ or models:/ URI")
    ref = uri[len("models:/"):].rstrip("/")
    if "@" in ref:
        name, _, a = ref.partition("@")
        version = client.get_model_version_by_alias(name, a)
    elif "/" in ref and ref.partition("/")[2].isdigit():
        version = client.get_model_version(*ref.split("/", 1))
    elif ref.startswith("m-") and "/" not in ref:
        return _logged_model_run(client.get_logged_model(ref), uri)
    else:
        raise UsageError(f"{uri}: give models:/<name>/<version>, models:/<name>@<alias> or models:/m-<id>")
    if version.run_id:
        return version.run_id
    if version.model_id:
        return _logged_model_run(client.get_logged_model(version.model_id), uri)
    raise UsageError(f"{uri}: the version names no source run or logged model")


def _logged_model_run(model, uri: str) -> str:
    if not model.source_run_id:
        raise UsageError(f"{uri}: the model was logged outside a run, so it has no drn checkpoint")
    return model.source_run_id


