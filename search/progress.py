"""A Tune callback on the driver: one line per trial epoch, and trials.parquet rewritten from the
search's studies (one per target) each time a trial ends (so a crashed driver leaves an up-to-date
table; with a cloud --storage, copied there with the search's other files, search/state.py). Trials
are named by their search-wide number. Holds only plain values: a restored search unpickles it."""
import functools
import sys
import time
from pathlib import Path

from ray.tune import Callback

from .config import brief
from .results import trial_rows, write_parquet
from .searcher import load_studies
from .state import save_after_the_last_upload, upload
from .tracking import Tracking


def never_fatal(hook):
    """An error in a callback hook aborts Tune's whole run: here it is one line, and the search goes on
    (what the hook could not do, the next trial's end or the search's end does again)."""
    @functools.wraps(hook)
    def safe(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:
            self._print(f"warning: {hook.__name__} failed ({brief(e)}); the search goes on")
    return safe


class Progress(Callback):
    def __init__(self, study_storage: str, study_name: str, space_names: list[str], tolerance: float,
                 parquet: str, num_samples: int, total_epochs: int, cost_key: str,
                 tracking: dict | None = None, targets: list[str] | None = None, max_failures: int = 0,
                 state: str | None = None):
        self.study_storage, self.study_name, self.space_names = study_storage, study_name, space_names
        self.tolerance, self.parquet, self.num_samples = tolerance, parquet, num_samples
        self.total_epochs, self.cost_key = total_epochs, cost_key
        self.tracking, self.targets = tracking, targets or []
        self.max_failures = max_failures
        self.state = state       # the cloud copy of the search's files (state.state_uri), or None
        self.t0 = time.time()
        self.ended = 0

    def setup(self, **info):
        self.t0 = time.time()  # also when a resumed search starts again
        # here, in the process that runs Tune's driver (under Ray Client, a remote actor)
        save_after_the_last_upload(self._print)

    def _print(self, msg: str) -> None:
        print(f"[drn-search {time.time() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    @never_fatal
    def on_trial_start(self, iteration, trials, trial, **info):
        c = trial.config
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("target", "optuna_trial"))
        self._print(f"trial {c.get('optuna_trial')} (target {c.get('target')}) started: {params}")

    @never_fatal
    def on_trial_result(self, iteration, trials, trial, result, **info):
        n = result.get("optuna_trial")
        if result.get("diverged"):
            self._print(f"trial {n:.0f} diverged: {result.get('error')}")
            return
        cost = result.get(self.cost_key, float("nan"))
        self._print(f"trial {n:.0f} (target {trial.config.get('target')}) epoch {result.get('epoch', 0):.0f}/"
                    f"{self.total_epochs}: val acc {result.get('accuracy', 0):.2%}, {self.cost_key} {cost:.4g} "
                    f"({result.get('rel_error', float('nan')):+.1%} of target), K {result.get('k', 0):.1f}, "
                    f"mu {result.get('mu', 0):.3g}"
                    + (f" (restarted from its epoch {result['start_epoch']:.0f} checkpoint)"
                       if result.get("start_epoch") and result.get("epoch") == result["start_epoch"] + 1 else ""))

    def _write(self, trials) -> list[dict]:
        studies = load_studies(self.study_storage, self.study_name, self.targets)
        rows = trial_rows(studies, self.space_names, self.tolerance, checkpoint_paths(trials))
        write_parquet(rows, self.parquet)
        if self.tracking is not None:   # states, Pareto tags, the parent's table and plot
            try:
                Tracking(**self.tracking).update(rows, Path(self.parquet), self.targets, self.cost_key)
            except Exception as e:   # MLflow away: the next trial's end, or the search's, updates it
                self._print(f"warning: MLflow did not take the trials' tags ({type(e).__name__}); "
                            f"they are updated when the next trial ends")
        # a callback pickled before it had a state copy has no attribute
        upload(Path(self.parquet).parent, getattr(self, "state", None), self._print)
        return rows

    @never_fatal
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial)

    @never_fatal
    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial)
        self._print(f"trial {trial.config.get('optuna_trial')} raised: {error_line(trial)} "
                    f"(traceback: {trial.error_file})")

    @never_fatal
    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial's worker died (node lost, OOM, a bug): Tune starts it again from its checkpoint."""
        self._print(f"trial {trial.config.get('optuna_trial')} lost its worker ({error_line(trial)}); "
                    f"retrying from its last epoch checkpoint (failure {trial.num_failures} of "
                    f"{self.max_failures} allowed)")

    def _ended(self, trials, trial) -> None:
        rows = self._write(trials)
        n = trial.config.get("optuna_trial")
        row = next((r for r in rows if r["trial"] == n), None)
        state = row["state"] if row else "?"
        done = sum(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
        extra = f" ({row['reason']})" if row and row.get("reason") else ""
        self._print(f"trial {n} {state.lower()}{extra}; {done}/{self.num_samples} trials ended")


def error_line(trial) -> str:
    """The last line of the trial's error file: the exception, without Tune's traceback."""
    try:
        lines = [l for l in Path(trial.error_file).read_text().splitlines() if l.strip()]
        return lines[-1][:300] if lines else "unknown error"
    except (OSError, TypeError):
        return "unknown error"


def checkpoint_paths(trials) -> dict[str, str]:
    """Tune trial id -> the trainer checkpoint of its latest Tune checkpoint."""
    out = {}
    for t in trials:
        ckpt = t.checkpoint
        if ckpt is not None:
            out[t.trial_id] = f"{ckpt.path.rstrip('/')}/checkpoint.pt"
    return out
