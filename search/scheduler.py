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

Plain state (the ASHAs and their rungs): Tuner.restore unpickles it with the tuner.
"""
import math
import pickle

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from drn.config import is_number

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

    def __init__(self, targets: list[str], tolerance: float | None = None, cost_key: str = "flops", **asha):
        super().__init__()
        self.tolerance, self.cost_key = tolerance, cost_key
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
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)

    def _scored(self, result: dict) -> dict:
        if self.tolerance is None or self.metric not in result:
            return result
        for b in (b for s in self.schedulers.values() for b in s._brackets if isinstance(b, _NoisyBracket)):
            if result.get("images"):
                b.margin = 0.5 / math.sqrt(result["images"])
        return {**result, self.metric: asha_score(result, self.cost_key, self.tolerance)}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, self._scored(result))

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._of(trial).on_trial_complete(tune_controller, trial, self._scored(result))

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"target {t}: {s.debug_string()}" for t, s in self.schedulers.items())

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
