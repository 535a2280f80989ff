"""The search's results: one row per Optuna trial of its studies (one per target, see searcher.py)
-> <results>/<name>/trials.parquet, the Pareto flags, and the summary printed at the end."""
import os
from pathlib import Path

import optuna
import pyarrow as pa
import pyarrow.parquet as pq

from drn.checkpoint import temp_beside
from drn.config import is_number

from .pareto import pareto_front
from .searcher import search_trial

# accuracy, flops, k: on val (what every choice reads); test_*: the held-out split, reported only
METRICS = ("accuracy", "flops", "k", "latency_ms", "test_accuracy", "test_flops", "test_k", "epoch", "threshold",
           "uncalibrated_flops", "mu", "target_cost", "rel_error", "distinct_paths", "path_entropy",
           "effective_paths", "dynamic_share", "test_distinct_paths", "test_effective_paths", "test_dynamic_share",
           "mlflow_missing")   # 1: the trial could not log everything to MLflow (the driver logs it at the end)


def trial_rows(studies: list[optuna.Study], space_names: list[str], tolerance: float,
               checkpoints: dict[str, str] | None = None) -> list[dict]:
    """Every trial of the search's studies, by its search-wide number, with its parameters, final
    metrics, state and Pareto flags over the finished trials: `pareto_flops` (accuracy vs FLOPs) and
    `pareto_k` (accuracy vs routing length K) among the trials of the same target, `pareto_all`
    (accuracy vs FLOPs) across all targets."""
    rows = []
    trials = sorted((t for s in studies for t in s.get_trials(deepcopy=False)), key=search_trial)
    for t in trials:
        a = t.user_attrs
        row = {"trial": search_trial(t), "state": t.state.name, "target": a.get("target"),
               "tune_trial_id": a.get("tune_trial_id")}
        row.update({n: t.params.get(n) for n in space_names})
        row.update({m: a.get(m) for m in METRICS})
        row["feasible"] = (t.state == optuna.trial.TrialState.COMPLETE and row["rel_error"] is not None
                           and abs(row["rel_error"]) <= tolerance)
        row["reason"] = a.get("reason")
        row["checkpoint"] = (checkpoints or {}).get(a.get("tune_trial_id"))
        row["model_uri"] = a.get("model_uri")   # the trial's logged model (models:/m-<id>), when MLflow took it
        rows.append(row)
    done = front_candidates(rows)
    for r in rows:
        r.update(pareto_flops=False, pareto_k=False, pareto_all=False)
    for target in dict.fromkeys(r["target"] for r in done):   # one front per target, in first-seen order
        group = [r for r in done if r["target"] == target]
        for key, col in (("flops", "pareto_flops"), ("k", "pareto_k")):
            for i in pareto_front([(r["accuracy"], r[key]) for r in group], (True, False)):
                group[i][col] = True
    for i in pareto_front([(r["accuracy"], r["flops"]) for r in done], (True, False)):
        done[i]["pareto_all"] = True   # across targets; equals pareto_flops when there is one target
    return rows


def front_candidates(rows: list[dict]) -> list[dict]:
    """The one rule for who may stand on a front (Parquet's pareto_* flags, MLflow's pareto tags,
    the registry's versions and the summary's fronts all come from it): every finished trial with a
    finite val accuracy and FLOPs, feasible or not. An infeasible trial that no other trial of its
    target dominates stays on the front, its `feasible` flag false: the front shows the trade-off
    the search found; the pick per budget is best_feasible."""
    return [r for r in rows if r["state"] == "COMPLETE" and is_number(r["accuracy"]) and is_number(r["flops"])]


def best_feasible(rows: list[dict], target: str) -> dict | None:
    """A target's pick: its feasible trial with the best val accuracy (the first on a tie; test is
    never read), or None. The summary's best trial and the registry's alias best-<target>."""
    cands = [r for r in rows if r["target"] == target and r["feasible"]]
    return max(cands, key=lambda r: r["accuracy"]) if cands else None


def write_parquet(rows: list[dict], path: str | Path) -> None:
    """Atomic: a crash mid-write leaves the previous file."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary(rows: list[dict], targets: list[str], cost_key: str = "flops", models: list[dict] | None = None) -> str:
    """`models`: the registry's (registry.register_front), named with their URIs at the end."""
    unit = "FLOPs" if cost_key == "flops" else "ms"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"{len(rows)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)]
    lines.append("")
    lines.append("best trial per target by val accuracy (feasible: within tolerance of the target on val; "
                 "test: the held-out split, reported only):")
    lines.append(f"  {'target':>10}  {'trial':>5}  {'val acc':>7}  {'test acc':>8}  {unit:>9}  {'error':>7}  {'K':>5}  "
                 f"{'paths':>5}")   # paths: effective paths on val, 2^(the routes' entropy): 1 is a static network
    for target in targets:
        b = best_feasible(rows, target)
        if b is None:
            lines.append(f"  {target:>10}  none feasible yet")
            continue
        test = f"{b['test_accuracy']:>8.2%}" if is_number(b.get("test_accuracy")) else f"{'-':>8}"
        paths = f"{b['effective_paths']:>5.1f}" if is_number(b.get("effective_paths")) else f"{'-':>5}"
        lines.append(f"  {target:>10}  {b['trial']:>5}  {b['accuracy']:>7.2%}  {test}  {b[cost_key]:>9.4g}  "
                     f"{b['rel_error']:>+7.2%}  {b['k']:>5.1f}  {paths}")
    for target in targets:
        front = sorted((r for r in rows if r["target"] == target and r["pareto_flops"]), key=lambda r: r["flops"])
        lines.append("")
        lines.append(f"Pareto front of target {target}, val accuracy vs FLOPs (finished trials, feasible or not):")
        several = len(targets) > 1
        lines.append(f"  {'trial':>5}  {'val acc':>7}  {'FLOPs':>9}  {'K':>5}  feasible" + "  on the front of all targets" * several)
        for r in front:
            line = f"  {r['trial']:>5}  {r['accuracy']:>7.2%}  {r['flops']:>9.4g}  {r['k']:>5.1f}  {'yes' if r['feasible'] else 'no':>8}"
            lines.append(line + f"  {'yes' if r['pareto_all'] else 'no'}" * several)
        if not front:
            lines.append("  no finished trial yet")
    if models:
        lines += ["", *model_lines(models)]
    failed = [r for r in rows if r["state"] == "FAIL"]
    for r in failed:
        lines.append(f"trial {r['trial']} failed: {r['reason']}")
    return "\n".join(lines)


STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
# what the JSON summary and `drn-search status` give of a target's best trial (test: reported only)
BEST_KEYS = ("trial", "accuracy", "test_accuracy", "flops", "latency_ms", "rel_error", "k", "effective_paths",
             "dynamic_share", "model_uri", "checkpoint")


def summary_object(rows: list[dict], targets: list[str], space_names: list[str],
                   models: list[dict] | None = None) -> dict:
    """The summary as one JSON-able object: trials by state, each target's best feasible trial (by val)
    with its parameters and model URI (the registry's best-<target> alias where it was registered),
    its front's trials, the failed trials' reasons, and what is running."""
    from .registry import alias as alias_of
    alias = {m["alias"]: m for m in models or [] if m.get("alias")}
    best = {}
    for t in targets:
        b = best_feasible(rows, t)
        if b is not None:
            b = {**{k: b.get(k) for k in BEST_KEYS}, "params": {n: b.get(n) for n in space_names}}
            registered = alias.get(alias_of(t))
            if registered is not None:   # the registry's version, and the alias that follows the best
                b["registered_uri"] = registered["uri"]
                b["alias_uri"] = f"{registered['uri'].rsplit('/', 1)[0]}@{alias_of(t)}"
        best[t] = b
    return {"trials": {s.lower(): sum(r["state"] == s for r in rows) for s in STATES},
            "best": best,
            "fronts": {t: [r["trial"] for r in sorted((r for r in rows if r["target"] == t and r["pareto_flops"]),
                                                      key=lambda r: r["flops"])] for t in targets},
            "failed": [{"trial": r["trial"], "reason": r["reason"]} for r in rows if r["state"] == "FAIL"],
            "running": [{"trial": r["trial"], "target": r["target"], "epoch": r.get("epoch"),
                         "accuracy": r.get("accuracy")} for r in rows if r["state"] == "RUNNING"]}


def model_lines(models: list[dict]) -> list[str]:
    """One line per registered model on a front or under an alias: its URIs, trial, target, hyper-parameters."""
    lines = ["registered models (drn-eval URI, or mlflow.pytorch.load_model; best-<target>: the target's "
             "best feasible by val accuracy):"]
    width = max(len(m["uri"]) for m in models)
    for m in models:
        name = m["uri"].rsplit("/", 1)[0]
        alias = f"{name}@{m['alias']}" if m["alias"] else "-"
        where = "front" if m["front"] else "off the front"
        hp = ", ".join(f"{k} {_short(v)}" for k, v in sorted(m["params"].items()))
        lines.append(f"  {m['uri']:<{width}}  {alias}  trial {m['trial']}, target {m['target']}, {where}: {hp}")
    return lines


def _short(v) -> str:
    """A hyper-parameter at 3 digits (MLflow hands params back as strings)."""
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return str(v)


