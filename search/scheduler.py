"""Early stopping per budget: one Ray Tune ASHA per target, so that a trial is compared only with
the trials of its own target (`trial.config["target"]`, set by the searcher). A 30 % trial is not
stopped because 70 % trials, which run more blocks, score higher at the same epoch.

Plain state (the ASHAs and their rungs): Tuner.restore unpickles it with the tuner.
"""
import pickle

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


class PerTargetASHA(FIFOScheduler):
    """`asha`: ASHAScheduler's arguments (time_attr, max_t, grace_period, reduction_factor, ...),
    the same for every target; metric and mode come from the TuneConfig."""

    def __init__(self, targets: list[str], **asha):
        super().__init__()
        self.schedulers = {str(t): ASHAScheduler(**asha) for t in targets}

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[str(trial.config["target"])]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        return super().set_search_properties(metric, mode, **spec) and all(ok)

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

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
