"""The search's results: one row per Optuna trial -> <results>/<name>/trials.parquet, the Pareto
flags, and the summary printed at the end."""
import math
import os
from pathlib import Path

import optuna
import pyarrow as pa
import pyarrow.parquet as pq

from .pareto import pareto_front

METRICS = ("accuracy", "flops", "k", "latency_ms", "epoch", "threshold", "mu", "target_cost", "rel_error",
           "distinct_paths")


def trial_rows(study: optuna.Study, space_names: list[str], tolerance: float,
               checkpoints: dict[str, str] | None = None) -> list[dict]:
    """Every trial of the study with its parameters, final metrics, state and Pareto flags
    (`pareto_flops`: accuracy vs FLOPs, `pareto_k`: accuracy vs routing length K; finished
    trials only)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {"trial": t.number, "state": t.state.name, "target": a.get("target"),
               "tune_trial_id": a.get("tune_trial_id")}
        row.update({n: t.params.get(n) for n in space_names})
        row.update({m: a.get(m) for m in METRICS})
        row["feasible"] = (t.state == optuna.trial.TrialState.COMPLETE and row["rel_error"] is not None
                           and abs(row["rel_error"]) <= tolerance)
        row["reason"] = a.get("reason")
        row["checkpoint"] = (checkpoints or {}).get(a.get("tune_trial_id"))
        rows.append(row)
    done = [r for r in rows if r["state"] == "COMPLETE" and _finite(r["accuracy"]) and _finite(r["flops"])]
    for key, col in (("flops", "pareto_flops"), ("k", "pareto_k")):
        front = set(pareto_front([(r["accuracy"], r[key]) for r in done], (True, False)))
        for i, r in enumerate(done):
            r[col] = i in front
        for r in rows:
            r.setdefault(col, False)
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> None:
    """Atomic: a crash mid-write leaves the previous file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def summary(rows: list[dict], targets: list[str], cost_key: str = "flops") -> str:
    unit = "FLOPs" if cost_key == "flops" else "ms"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"{len(rows)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)]
    lines.append("")
    lines.append(f"best trial per target (feasible: within tolerance of the target):")
    lines.append(f"  {'target':>10}  {'trial':>5}  {'val acc':>7}  {unit:>9}  {'error':>7}  {'K':>5}")
    for target in targets:
        cands = [r for r in rows if r["target"] == target and r["feasible"]]
        if not cands:
            lines.append(f"  {target:>10}  none feasible yet")
            continue
        b = max(cands, key=lambda r: r["accuracy"])
        lines.append(f"  {target:>10}  {b['trial']:>5}  {b['accuracy']:>7.2%}  {b[cost_key]:>9.4g}  "
                     f"{b['rel_error']:>+7.2%}  {b['k']:>5.1f}")
    front = sorted((r for r in rows if r.get("pareto_flops")), key=lambda r: r["flops"])
    lines.append("")
    lines.append("Pareto front, val accuracy vs FLOPs:")
    lines.append(f"  {'trial':>5}  {'target':>10}  {'val acc':>7}  {'FLOPs':>9}  {'K':>5}")
    for r in front:
        lines.append(f"  {r['trial']:>5}  {r['target']:>10}  {r['accuracy']:>7.2%}  {r['flops']:>9.4g}  {r['k']:>5.1f}")
    failed = [r for r in rows if r["state"] == "FAIL"]
    for r in failed:
        lines.append(f"trial {r['trial']} failed: {r['reason']}")
    return "\n".join(lines)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
