"""A Ray Tune `Searcher` over a persistent Optuna study, by ask/tell.

Not Ray's `OptunaSearch`: that one tells ASHA-stopped trials to Optuna as COMPLETE with their
truncated metrics (polluting the study and its Pareto front) and ignores constraints. Here:

    finished trial              -> COMPLETE, with the budget constraint set
    stopped early (ASHA)        -> PRUNED (its last accuracy kept only as an intermediate value)
    error, or diverged (NaN)    -> FAIL

One target: maximise val accuracy subject to |cost / target - 1| <= tolerance. Several targets:
trial n gets targets[n % len(targets)]; objectives (accuracy up, cost down), so
`study.best_trials` is the accuracy/cost front. The study lives in an RDB (sqlite by default),
so a resumed search and its restored searcher keep asking the same study.
"""
import json
import math
import optuna
from ray.tune.search import Searcher

from .space import Space

TERMINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def budget_violation(cost: float, target: float, tolerance: float) -> float:
    """Optuna constraint value: <= 0 when the cost lands within `tolerance` of the target."""
    return abs(cost / target - 1.0) - tolerance


class OptunaSearcher(Searcher):
    def __init__(self, space: Space, targets: list[str], study_name: str, storage: str, tolerance: float,
                 total_epochs: int, cost_key: str = "flops", seed: int = 0):
        super().__init__(metric="accuracy", mode="max")
        self.space, self.targets, self.study_name, self.storage = space, list(targets), study_name, storage
        self.tolerance, self.total_epochs, self.cost_key, self.seed = tolerance, total_epochs, cost_key, seed
        self.live: dict[str, int] = {}   # Tune trial id -> Optuna trial number, while it runs
        self._study: optuna.Study | None = None

    # the restored Tuner unpickles its searcher: reconnect to the study rather than pickle it
    def __getstate__(self):
        return {**self.__dict__, "_study": None}

    @property
    def multi(self) -> bool:
        return len(self.targets) > 1

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=10, multivariate=True)
            self._study = optuna.create_study(
                study_name=self.study_name, storage=self.storage, load_if_exists=True, sampler=sampler,
                directions=["maximize", "minimize"] if self.multi else ["maximize"])
        return self._study

    def _trial(self, number: int) -> optuna.Trial:
        frozen = self.study.trials[number]
        return optuna.Trial(self.study, frozen._trial_id)  # a live handle on a running trial

    def suggest(self, trial_id: str) -> dict:
        trial = self.study.ask(self.space.distributions())
        target = self.targets[trial.number % len(self.targets)]
        trial.set_user_attr("target", target)
        trial.set_user_attr("tune_trial_id", trial_id)
        self.live[trial_id] = trial.number
        return {**self.space.fixed, **trial.params, "target": target, "optuna_trial": trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        number = self.live.get(trial_id)
        if number is None or self.multi or not _finite(result.get("accuracy")):
            return
        trial = self._trial(number)
        if result["epoch"] not in self.study.trials[number].intermediate_values:
            trial.report(result["accuracy"], step=int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.live.pop(trial_id, None)
        if number is None or self.study.trials[number].state in TERMINAL:
            return  # not ours, or already told (a restored driver replays)
        trial = self._trial(number)
        result = result or {}
        from .results import METRICS
        for k in (*METRICS, "checkpoint_epoch"):
            if _finite(result.get(k)):
                trial.set_user_attr(k, float(result[k]))
        cost = result.get(self.cost_key)
        if error or result.get("diverged") or not (_finite(result.get("accuracy")) and _finite(cost)):
            trial.set_user_attr("reason", result.get("error", "trial raised an error") if error or
                                result.get("diverged") else "no final metrics")
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        elif result.get("epoch", 0) < self.total_epochs:
            # Tune skips on_trial_result for the result that made the scheduler stop the trial
            if not self.multi and result["epoch"] not in self.study.trials[number].intermediate_values:
                trial.report(result["accuracy"], step=int(result["epoch"]))
            trial.set_user_attr("reason", f"stopped by the scheduler after epoch {int(result.get('epoch', 0))}")
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_constraint("budget", budget_violation(cost, result["target_cost"], self.tolerance))
            self.study.tell(number, [result["accuracy"], cost] if self.multi else result["accuracy"])

    # Tune checkpoints the searcher beside its experiment state: the id map, as JSON
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"live": self.live, "study_name": self.study_name, "storage": self.storage}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.live = {k: int(v) for k, v in state["live"].items()}
        # asked but never handed to Tune before the driver stopped: Tune will ask anew
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in self.live.values():
                self._trial(t.number).set_user_attr("reason", "lost when the driver stopped before it started")
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
