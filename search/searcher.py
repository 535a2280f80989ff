"""A Ray Tune `Searcher` over persistent Optuna studies, by ask/tell.

Not Ray's `OptunaSearch`: that one tells ASHA-stopped trials to Optuna as COMPLETE with their
truncated metrics (polluting the study and its Pareto front) and ignores constraints. Here:

    finished trial              -> COMPLETE, with the budget constraint set
    stopped early (ASHA)        -> PRUNED (its last accuracy kept only as an intermediate value)
    error, or diverged (NaN)    -> FAIL

One single-objective study per target: TPE maximises val accuracy subject to
|cost / target - 1| <= tolerance, and sees only the trials of its own budget. The study of a
search NAME is named NAME when it has one target, `NAME@TARGET` (e.g. `s@30%`) for each target when
it has several (`study_names`). Each new trial goes to the target whose study holds the fewest
trials, so the budgets stay balanced whatever the scheduler prunes. Ties (`dearest_first`): in the
first round the dearest budget first -- its trials run longest, and started first they end with the
cheaper ones, not after them (longest-first scheduling: on 2 slots a 30/50/70 % front ends ~20 %
sooner, BENCHMARKS.md, "The 70 % miss, found: the loop started too low for trained blocks (fix: μ starts
at 1 from a backbone)") -- after that the cheapest first.

Optuna numbers trials per study; the search numbers them once across its studies, at ask time
(the count of trials in all the studies before it), kept as the user attr `search_trial` and handed
to Tune as `optuna_trial`: Tune's trial dirs, MLflow's child runs, Parquet's `trial` and the
progress lines use this number. The studies live in one RDB (sqlite by default), so a resumed
search and its restored searcher keep asking the same studies and counting on.

The first trial of each study runs the paper's values (`paper_trial`), enqueued: TPE starts from the
published setting. Its random start-up is sized to the trials a study gets (`startup_trials`): Optuna's
10 would have kept every study of the default search (20 trials over three budgets, 7 each) random to
its end. Each study's TPE is seeded anew from the trials the study holds whenever this
searcher (re)connects to it, and lies about running trials (constant liar) so that concurrent
trials spread out.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import optuna
from ray.tune.search import SearchGenerator, Searcher

from drn.config import TrainConfig, is_number, parse_target

from .space import Param, Space

OBJECTIVE = "val_accuracy"   # what every study maximises: the trial's accuracy on the carved val split
TERMINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def budget_violation(cost: float, target: float, tolerance: float) -> float:
    """Optuna constraint value: <= 0 when the cost lands within `tolerance` of the target."""
    return abs(cost / target - 1.0) - tolerance


def study_names(name: str, targets: list[str]) -> dict[str, str]:
    """Target -> the Optuna study of its trials: `name` itself for one target, `name@target` for several."""
    return {t: name for t in targets} if len(targets) <= 1 else {t: f"{name}@{t}" for t in targets}


def studies_by_target(storage: str, name: str, targets: list[str]) -> dict[str, optuna.Study]:
    """Target -> its study, for the search's studies that exist in `storage`, in the targets' order."""
    rdb = optuna.storages.RDBStorage(storage)
    have = set(optuna.get_all_study_names(rdb))
    return {t: optuna.load_study(study_name=n, storage=rdb) for t, n in study_names(name, targets).items()
            if n in have}


def load_studies(storage: str, name: str, targets: list[str]) -> list[optuna.Study]:
    """The search's studies that exist in `storage`, in the targets' order."""
    return list(studies_by_target(storage, name, targets).values())


def search_trial(t: optuna.trial.FrozenTrial) -> int:
    """The search-wide number of an Optuna trial."""
    return t.user_attrs.get("search_trial", t.number)


# Sec. 4.1's margins and loss weights: drn-train's defaults
PAPER = ("d_c", "d_d", "lam", "alpha", "lr")


def paper_values(dataset: str | None) -> dict[str, float]:
    """d_c 0.2, d_d 0.5, lam and alpha 0.2 (0.4 on Tiny-ImageNet), lr 0.1 (Sec. 4.1); the margins and
    the lr only without a dataset."""
    if dataset is None:
        return {k: TrainConfig.__dataclass_fields__[k].default for k in ("d_c", "d_d", "lr")}
    cfg = TrainConfig(dataset=dataset)
    return {k: getattr(cfg, k) for k in PAPER}


def _holds(p: Param, value) -> bool:
    return value in p.choices if p.kind == "categorical" else p.low <= value <= p.high


def paper_trial(space: Space, dataset: str | None) -> dict:
    """The paper's values of the space's sampled parameters, where their ranges hold them; the rest
    (a value out of range, a parameter the paper does not set, like beta) is the sampler's."""
    values = paper_values(dataset)
    return {p.name: values[p.name] for p in space.params if p.name in values and _holds(p, values[p.name])}


def startup_trials(per_study: int | None) -> int:
    """TPE's random start-up for a study of `per_study` trials: a third of them, at least 2 (the paper's
    values and one random draw give TPE a good and a bad group), at most Optuna's 10; None: 10."""
    return 10 if per_study is None else max(2, min(10, per_study // 3))


def dearest_first(targets: list[str]) -> list[str]:
    """The targets by cost, dearest first, where they share a kind (all % or all absolute); else as given."""
    parsed = [parse_target(t) for t in targets]
    if len({kind for kind, _ in parsed}) > 1:
        return list(targets)
    return [t for _, t in sorted(zip(parsed, targets), key=lambda pt: -pt[0][1])]


class OptunaSearcher(Searcher):
    # for a searcher unpickled from a search started before these existed
    dataset: str | None = None
    num_samples: int | None = None

    def __init__(self, space: Space, targets: list[str], study_name: str, storage: str, tolerance: float,
                 total_epochs: int, cost_key: str = "flops", seed: int = 0, dataset: str | None = None,
                 num_samples: int | None = None):
        super().__init__(metric="accuracy", mode="max")
        self.space, self.targets, self.study_name, self.storage = space, list(targets), study_name, storage
        self.tolerance, self.total_epochs, self.cost_key, self.seed = tolerance, total_epochs, cost_key, seed
        self.dataset = dataset   # whose paper values the first trials run
        self.num_samples = num_samples   # the search's trials in all: sizes each study's start-up
        self.live: dict[str, tuple[str, int]] = {}   # Tune trial id -> (target, its study's trial number)
        self._studies: dict[str, optuna.Study] | None = None

    # the restored Tuner unpickles its searcher: reconnect to the studies rather than pickle them
    def __getstate__(self):
        return {**self.__dict__, "_studies": None}

    @property
    def studies(self) -> dict[str, optuna.Study]:
        """Target -> its study, all created (or reconnected to) at the first use."""
        if self._studies is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            rdb = optuna.storages.RDBStorage(self.storage)
            self._studies = {t: optuna.create_study(study_name=name, storage=rdb, load_if_exists=True,
                                                    direction="maximize")
                             for t, name in study_names(self.study_name, self.targets).items()}
            for i, study in enumerate(self._studies.values()):
                study.sampler = self._sampler(i, len(study.get_trials(deepcopy=False)))
                if study.metric_names is None:   # optuna-dashboard's name for the objective
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        study.set_metric_names([OBJECTIVE])
        return self._studies

    def _sampler(self, index: int, n_trials: int) -> optuna.samplers.TPESampler:
        # seeded by the study's trial count too: a sampler re-created with its first seed (a resumed
        # search unpickles this searcher) would ask the first trials' parameters again
        seed = int(np.random.SeedSequence([self.seed % 2**32, index, n_trials]).generate_state(1)[0])
        # constant liar: running trials count as bad ones, so concurrent trials do not crowd one region
        per_study = None if self.num_samples is None else -(-self.num_samples // len(self.targets))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(per_study), multivariate=True,
                                          constant_liar=True)

    def _frozen(self, target: str, number: int) -> optuna.trial.FrozenTrial:
        return self.studies[target].get_trials(deepcopy=False)[number]

    def _trial(self, target: str, number: int) -> optuna.Trial:
        # a live handle on a running trial
        return optuna.Trial(self.studies[target], self._frozen(target, number)._trial_id)

    def suggest(self, trial_id: str) -> dict:
        trials = {t: s.get_trials(deepcopy=False) for t, s in self.studies.items()}
        # asked trials only: an enqueued one (WAITING) takes its number when it is asked
        counts = {t: sum(x.state != optuna.trial.TrialState.WAITING for x in ts) for t, ts in trials.items()}
        rank = {t: i for i, t in enumerate(dearest_first(self.targets))}
        # the fewest first; ties: the dearest in the first round, the cheapest after it
        target = min(self.targets, key=lambda t: (counts[t], rank[t] if counts[t] == 0 else -rank[t]))
        study = self.studies[target]
        paper = paper_trial(self.space, self.dataset) if not trials[target] else {}
        if paper:   # the study's first trial (unless trials were enqueued before): enqueued as it is asked
            study.enqueue_trial(paper)
        trial = study.ask(self.space.distributions())
        number = sum(counts.values())
        trial.set_user_attr("search_trial", number)
        trial.set_user_attr("target", target)
        trial.set_user_attr("tune_trial_id", trial_id)
        self.live[trial_id] = (target, trial.number)
        return {**self.space.fixed, **trial.params, "target": target, "optuna_trial": number}

    def _report(self, target: str, number: int, result: dict) -> None:
        if result["epoch"] not in self._frozen(target, number).intermediate_values:
            self._trial(target, number).report(result["accuracy"], step=int(result["epoch"]))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live and is_number(result.get("accuracy")):
            target, number = self.live[trial_id]
            if self._frozen(target, number).state not in TERMINAL:   # a restored driver replays
                self._report(target, number, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        target, number = self.live.pop(trial_id, (None, None))
        if target is None or self._frozen(target, number).state in TERMINAL:
            return  # not ours, or already told (a restored driver replays)
        study, trial = self.studies[target], self._trial(target, number)
        result = result or {}
        from .results import METRICS
        for k in (*METRICS, "checkpoint_epoch"):
            if is_number(result.get(k)):
                trial.set_user_attr(k, float(result[k]))
        if isinstance(result.get("model_uri"), str):
            trial.set_user_attr("model_uri", result["model_uri"])
        cost = result.get(self.cost_key)
        if error or result.get("diverged") or not (is_number(result.get("accuracy")) and is_number(cost)):
            trial.set_user_attr("reason", result.get("error", "trial raised an error") if error or
                                result.get("diverged") else "no final metrics")
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        elif result.get("epoch", 0) < self.total_epochs:
            self._report(target, number, result)  # Tune skips on_trial_result for the result that stopped it
            trial.set_user_attr("reason", f"stopped by the scheduler after epoch {int(result.get('epoch', 0))}")
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_constraint("budget", budget_violation(cost, result["target_cost"], self.tolerance))
            study.tell(number, result["accuracy"])

    # Tune checkpoints the searcher beside its experiment state: the id map, as JSON
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"live": self.live, "studies": study_names(self.study_name, self.targets),
                       "storage": self.storage}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        # an int: a one-study state written before the studies were per target
        self.live = {k: (v[0], int(v[1])) if isinstance(v, list) else (self.targets[0], int(v))
                     for k, v in state["live"].items()}
        self.reconcile(tune_trials(Path(checkpoint_path).parent))

    def reconcile(self, tune: dict[str, tuple[str, dict, dict]]) -> None:
        """The studies made to agree with Tune's own record of its trials (`tune_trials`), which a
        restored driver trusts: a study copied before some trials ended (a lost head, a stale copy) is
        told how they ended instead of failing them, and a trial the copy never saw is added."""
        seen = set()
        for target, study in self.studies.items():
            for t in study.get_trials(deepcopy=False):
                tid = t.user_attrs.get("tune_trial_id")
                seen.add(tid)
                if t.state != optuna.trial.TrialState.RUNNING or (target, t.number) in self.live.values():
                    continue
                status, last, _ = tune.get(tid, (None, {}, {}))
                if status in ("TERMINATED", "ERROR"):   # it ended after the copy was made
                    self.live[tid] = (target, t.number)
                    self.on_trial_complete(tid, last, error=status == "ERROR")
                elif status in ("RUNNING", "PENDING", "PAUSED"):   # Tune goes on with it: follow it
                    self.live[tid] = (target, t.number)
                else:   # asked but never handed to Tune before the driver stopped: Tune will ask anew
                    self._trial(target, t.number).set_user_attr(
                        "reason", "lost when the driver stopped before it started")
                    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        for tid, (status, last, config) in tune.items():   # ended, but asked after the copy was made
            if tid not in seen and status in ("TERMINATED", "ERROR") and config.get("target") in self.studies:
                self._add_ended(tid, status, last, config)

    def _add_ended(self, tid: str, status: str, last: dict, config: dict) -> None:
        target = config["target"]
        study = self.studies[target]
        dists = {k: d for k, d in self.space.distributions().items() if k in config}
        study.enqueue_trial({k: config[k] for k in dists})   # the parameters Tune ran: the ask takes them
        trial = study.ask(dists)
        trial.set_user_attr("search_trial", int(config.get("optuna_trial", trial.number)))
        trial.set_user_attr("target", target)
        trial.set_user_attr("tune_trial_id", tid)
        self.live[tid] = (target, trial.number)
        if is_number(last.get("accuracy")) and is_number(last.get("epoch")):
            self._report(target, trial.number, last)
        self.on_trial_complete(tid, last, error=status == "ERROR")


def tune_trials(folder: Path) -> dict[str, tuple[str, dict, dict]]:
    """Tune trial id -> (status, last result, config), from the newest experiment state Tune saved in
    `folder` (beside the searcher's own state, where a restored driver reads both)."""
    files = sorted(folder.glob("experiment_state-*.json"))
    if not files:
        return {}
    out = {}
    for state, meta in json.loads(files[-1].read_text()).get("trial_data", []):
        st = json.loads(state) if isinstance(state, str) else state
        md = json.loads(meta) if isinstance(meta, str) else meta
        out[st["trial_id"]] = (st.get("status"), md.get("last_result") or {}, st.get("config") or {})
    return out


class Extendable(SearchGenerator):
    """Tune's generator of trials from a searcher, whose restored trial count (Tune's saved state)
    grows to `num_samples`: how `--resume NAME --num-samples N` extends a search."""

    def __init__(self, searcher, num_samples: int):
        super().__init__(searcher)
        self.num_samples = num_samples

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self.num_samples > self._total_samples:
            self._total_samples, self._finished = self.num_samples, False
