"""Early stopping per budget: one Ray Tune ASHA per target, so that a trial is compared only with
the trials of its own target (`trial.config["target"]`, set by the searcher). A 30 % trial is not
stopped because 70 % trials, which run more blocks, score higher at the same epoch.

Within a budget ASHA reads a score, not the bare val accuracy:
* every trial on its budget (cost within the tolerance of the target at the rung) ranks above every
  trial off it: the accuracy, minus 1 off the budget. Ranked by accuracy alone, an off-budget trial that
  buys accuracy with compute stopped on-budget ones, which left budgets with no feasible model.
* a trial stops only when it trails the rung's cut by more than the val split's noise: one standard
  error of a val accuracy at its largest, 0.5 / sqrt(val images) (2.5 points on 407 images). ASHA
  once stopped a trial one image behind another on the same route.

Its state -- each target's rungs, which trial is in which bracket, how many were stopped -- is JSON
Lines, one line per target, `scheduler.jsonl` in the results dir, rewritten after every change
(`state_path`). Tune pickles the scheduler into tuner.pkl once, when the search starts, so a restored
tuner's ASHAs had forgotten every rung recorded before the resume; `restore` puts them back, from data,
not from a pickle. (Not `.json`: at a restore Tune copies every .json and .pkl of the experiment dir to
its staging dir, and its later syncs wrote that stale copy back over the live file.)
"""
import json
import math
import os
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from drn.checkpoint import temp_beside
from drn.config import UsageError, is_number

from .searcher import budget_violation


class _NoisyBracket(_Bracket):
    """ASHA's bracket with the rung's cut lowered by `margin` (ray is pinned: the bracket is private)."""
    margin: float = 0.0

    def cutoff(self, recorded):
        cut = super().cutoff(recorded)
        return None if cut is None else cut - self.margin


def asha_score(result: dict, cost_key: str, tolerance: float | None) -> float:
    """What ASHA ranks: the val accuracy, minus 1 when the cost is off its budget (or not measured)."""
    acc = result["accuracy"]
    if tolerance is None:
        return acc
    cost, target = result.get(cost_key), result.get("target_cost")
    on = is_number(cost) and is_number(target) and target > 0 and budget_violation(cost, target, tolerance) <= 0
    return acc if on else acc - 1.0


class PerTargetASHA(FIFOScheduler):
    """`asha`: ASHAScheduler's arguments (time_attr, max_t, grace_period, reduction_factor, ...),
    the same for every target; metric and mode come from the TuneConfig (val accuracy, max).
    tolerance: the search's; None ranks by accuracy alone, with no noise margin."""
    # for a scheduler unpickled from a search started before these existed
    tolerance: float | None = None
    cost_key: str = "flops"
    state_path: str | None = None
    _assigned: dict | None = None

    def __init__(self, targets: list[str], tolerance: float | None = None, cost_key: str = "flops",
                 state_path: str | None = None, **asha):
        super().__init__()
        self.tolerance, self.cost_key, self.state_path = tolerance, cost_key, state_path
        self.schedulers = {str(t): ASHAScheduler(**asha) for t in targets}
        if tolerance is not None:
            for s in self.schedulers.values():
                for b in s._brackets:
                    b.__class__ = _NoisyBracket

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[str(trial.config["target"])]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        return super().set_search_properties(metric, mode, **spec) and all(ok)

    def on_trial_add(self, tune_controller, trial):
        asha = self._of(trial)
        bracket = (self._assigned or {}).get(trial.trial_id)   # a restored trial keeps its bracket
        if bracket is not None and bracket < len(asha._brackets):
            asha._trial_info[trial.trial_id] = asha._brackets[bracket]
        else:
            asha.on_trial_add(tune_controller, trial)
        self._changed()

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)
        self._changed()

    def _scored(self, result: dict) -> dict:
        if self.tolerance is None or self.metric not in result:
            return result
        for b in (b for s in self.schedulers.values() for b in s._brackets if isinstance(b, _NoisyBracket)):
            if result.get("images"):
                b.margin = 0.5 / math.sqrt(result["images"])
        return {**result, self.metric: asha_score(result, self.cost_key, self.tolerance)}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self._of(trial).on_trial_result(tune_controller, trial, self._scored(result))
        self._changed()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._of(trial).on_trial_complete(tune_controller, trial, self._scored(result))
        self._changed()

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)
        self._changed()

    def debug_string(self) -> str:
        return "\n".join(f"target {t}: {s.debug_string()}" for t, s in self.schedulers.items())

    # ---------------------------------------------------------------- state, as JSON
    def state(self) -> dict:
        """Per target: each bracket's rungs (milestone, trial id -> the score it had there), the bracket
        of each trial ASHA follows, and how many it stopped."""
        return {"version": 1, "targets": {t: {
            "num_stopped": s._num_stopped,
            "brackets": [[{"milestone": m, "recorded": dict(rec)} for m, rec in b._rungs] for b in s._brackets],
            "trials": {tid: s._brackets.index(b) for tid, b in s._trial_info.items()},
        } for t, s in self.schedulers.items()}}

    def set_state(self, state: dict) -> None:
        """The rungs of `state()` back into this scheduler's ASHAs (same targets and schedule)."""
        self._assigned = {}
        for t, saved in state["targets"].items():
            s = self.schedulers.get(t)
            if s is None or len(saved["brackets"]) != len(s._brackets):
                raise ValueError(f"scheduler state for target {t!r} does not fit this search's ASHA")
            s._num_stopped = int(saved["num_stopped"])
            for b, rungs in zip(s._brackets, saved["brackets"]):
                by_milestone = {r["milestone"]: r["recorded"] for r in rungs}
                for milestone, recorded in b._rungs:
                    recorded.clear()
                    recorded.update({k: float(v) for k, v in by_milestone.get(milestone, {}).items()})
            s._trial_info = {tid: s._brackets[i] for tid, i in saved["trials"].items()}
            self._assigned.update(saved["trials"])

    def _changed(self) -> None:
        if self.state_path:
            self.save(self.state_path)

    def save(self, checkpoint_path: str):
        path = Path(checkpoint_path)
        tmp = temp_beside(path)
        state = self.state()
        try:
            tmp.write_text("".join(json.dumps({"version": state["version"], "target": t, **s}) + "\n"
                                   for t, s in state["targets"].items()))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def restore(self, checkpoint_path: str):
        lines = [json.loads(line) for line in Path(checkpoint_path).read_text().splitlines() if line.strip()]
        self.set_state({"version": 1, "targets": {d.pop("target"): d for d in lines if d.pop("version") == 1}})


def restore_scheduler(scheduler: PerTargetASHA, path: Path) -> None:
    """A restored tuner's scheduler: its state from `path` (none there: a search stopped before a trial
    reported), and its writes go there from now on (this head's results dir, not the first head's)."""
    scheduler.state_path = str(path)
    if not path.is_file():
        return
    try:
        scheduler.restore(str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as e:   # json's errors are ValueErrors
        raise UsageError(f"{path} is not this search's scheduler state ({type(e).__name__}: {e}); "
                         f"move it away to resume with ASHA's rungs empty") from None
