"""`drn-search status NAME`: a running or finished search, read from its own files (search.json and
its Optuna studies, fetched from a cloud --storage's copy when this machine lacks them): its driver,
its trials by state, what is running, and each target's best feasible trial with its model URI.
Reads only: nothing is written, and MLflow is not needed."""
import fcntl
import json
import os
import tempfile
from pathlib import Path

import optuna

from drn.config import UsageError

from .config import SearchConfig, is_uri, results_root
from .results import STATES, summary_object, trial_rows
from .searcher import search_trial, studies_by_target

LOCK = "driver.lock"   # held (flock) by the driver of a search while it runs: one driver per search


def claim(results_dir: Path, name: str):
    """The search's driver lock, taken for this process (an open file: closed, or the process gone, it
    is free again); a search that another driver runs is refused with one line."""
    f = open(results_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UsageError(f"search {name!r} is running already (driver pid {pid} on this machine); "
                         f"see it with: drn-search status {name}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def driver(results_dir: Path) -> int | None:
    """The pid of the driver running the search now, or None."""
    try:
        f = open(results_dir / LOCK)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _running(studies: dict[str, optuna.Study]) -> dict[int, dict]:
    """Search trial -> the last epoch and val accuracy that a running trial reported."""
    out = {}
    for study in studies.values():
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            step = max(t.intermediate_values, default=None)
            out[search_trial(t)] = {"epoch": step, "accuracy": t.intermediate_values.get(step)}
    return out


def read(name: str, storage: str) -> dict:
    """The search's status as one JSON-able object (`drn-search status --json`)."""
    results = results_root(storage) / name
    if (results / "search.json").is_file():
        return _read(results, results, storage)
    if is_uri(storage):
        from .state import fetch_state
        with tempfile.TemporaryDirectory() as d:   # the cloud copy, read where it lands and dropped
            if fetch_state(storage, name, Path(d) / name):
                return _read(Path(d) / name, results, storage)
    raise UsageError(f"no search named {name!r} under {results.parent} (no search.json)")


def _read(folder: Path, results: Path, storage: str) -> dict:
    saved = json.loads((folder / "search.json").read_text())
    cfg = SearchConfig.from_dict({**saved, "storage": storage})
    db = cfg.optuna_storage or f"sqlite:///{folder / 'optuna.db'}"
    studies = studies_by_target(db, cfg.name, cfg.targets) if cfg.optuna_storage or (folder / "optuna.db").is_file() else {}
    names = sorted({p for s in studies.values() for t in s.get_trials(deepcopy=False) for p in t.params})
    rows = trial_rows(list(studies.values()), names, cfg.tolerance)
    running = _running(studies)
    for r in rows:
        if r["trial"] in running:
            r.update(running[r["trial"]])
    pid = driver(results)
    ended = sum(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    state = "running" if pid else ("finished" if ended >= cfg.num_samples else "stopped")
    return {"name": cfg.name, "results_dir": str(results), "state": state, "driver_pid": pid,
            "targets": cfg.targets, "num_samples": cfg.num_samples, "asked": len(rows), "ended": ended,
            "total_epochs": cfg.total_epochs, **summary_object(rows, cfg.targets, names)}


def text(s: dict) -> str:
    """`drn-search status` without --json."""
    how = {"running": f"running (driver pid {s['driver_pid']})", "finished": "finished",
           "stopped": f"stopped before its end: continue it with drn-search --resume {s['name']}"}[s["state"]]
    lines = [f"search {s['name']}: {how}", f"  results: {s['results_dir']}",
             f"  targets {', '.join(s['targets'])}; {s['ended']} of {s['num_samples']} trials ended, "
             f"{s['asked']} asked: " + (", ".join(f"{s['trials'][k.lower()]} {k.lower()}" for k in STATES
                                                if s["trials"][k.lower()]) or "none yet")]
    for r in s["running"]:
        acc = f", val acc {r['accuracy']:.2%}" if r["accuracy"] is not None else ""
        verb = "running" if s["state"] == "running" else "interrupted"
        lines.append(f"  {verb}: trial {r['trial']} (target {r['target']}), epoch {r['epoch'] or 0}/{s['total_epochs']}{acc}")
    lines.append("best feasible trial per target, by val accuracy:")
    for t, b in s["best"].items():
        if b is None:
            lines.append(f"  {t:>10}  none feasible yet")
            continue
        uri = b.get("alias_uri") or b.get("model_uri") or "(no model logged)"
        lines.append(f"  {t:>10}  trial {b['trial']}, val acc {b['accuracy']:.2%}, FLOPs {b['flops']:.4g} "
                     f"({b['rel_error']:+.2%} of the target): {uri}")
    for f in s["failed"]:
        lines.append(f"trial {f['trial']} failed: {f['reason']}")
    return "\n".join(lines)
