"""drn-search's parts without a Ray cluster: spaces, the Pareto function, the Optuna searcher, the
per-target ASHA scheduler."""
import json
import math
import pickle
from pathlib import Path

import optuna
import pytest

from drn.config import UsageError
from search.config import SPACES_DIR, SearchConfig
from search.pareto import pareto_front
from search.searcher import OptunaSearcher, budget_violation, dearest_first
from search.space import load_space


# ----------------------------------------------------------------------------- Pareto

def test_pareto_front_on_hand_made_points():
    # (accuracy up, FLOPs down)
    pts = [(0.90, 5.0), (0.85, 3.0), (0.80, 3.0), (0.92, 8.0), (0.70, 1.0), (0.88, 6.0), (0.85, 3.0)]
    assert pareto_front(pts, (True, False)) == [0, 1, 3, 4, 6]  # 2 and 5 are dominated; 6 duplicates 1
    assert pareto_front([], (True, False)) == []
    assert pareto_front([(1.0, 1.0)], (True, True)) == [0]
    # both maximised: only the corner survives
    assert pareto_front([(1, 1), (2, 2), (2, 1)], (True, True)) == [1]


# ----------------------------------------------------------------------------- spaces

@pytest.mark.parametrize("name,sampled", [("default", {"lr"}), ("wide", {"d_c", "d_d", "lam", "alpha", "lr"})])
def test_shipped_spaces_load_around_the_paper_values(name, sampled):
    space = load_space(SPACES_DIR / f"{name}.yaml")
    d = space.distributions()
    paper = {"d_c": 0.2, "d_d": 0.5, "lam": 0.2, "alpha": 0.2, "lr": 0.1}
    assert sampled <= set(d) and not set(paper) - sampled & set(d)
    for k in sampled:
        assert d[k].low < paper[k] < d[k].high
    assert isinstance(d["lr"], optuna.distributions.FloatDistribution) and d["lr"].log


def test_space_with_every_kind_and_a_fixed_value(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("d_c: {type: float, low: 0.1, high: 0.3}\nviews: {type: int, low: 2, high: 4}\n"
                 "beta: {type: categorical, choices: [3.0, 5.0]}\ngamma: 0.25\n")
    space = load_space(f)
    assert [p.name for p in space.params] == ["d_c", "views", "beta"] and space.fixed == {"gamma": 0.25}
    d = space.distributions()
    assert isinstance(d["views"], optuna.distributions.IntDistribution) and d["beta"].choices == (3.0, 5.0)


BAD_SPACES = [
    ("d_c: {type: float, low: 0.1, high: 0.3}\nfoo: {type: float, low: 0, high: 1}\n", ":2: unknown key 'foo'"),
    ("d_c: {type: float, low: 0.5, high: 0.3}\n", ":1: d_c: low (0.5) must be below high (0.3)"),
    ("\n\nlam: {type: float, low: 0.0, high: 1.0, log: true}\n", ":3: lam: a log range needs low > 0"),
    ("d_c: {type: gaussian, low: 0, high: 1}\n", ":1: d_c: type must be one of"),
    ("d_c: {type: float, low: 0.1}\n", ":1: d_c: a float range takes 'low' and 'high'"),
    ("d_c: {type: float, low: 0.1, high: 0.3, step: 2}\n", ":1: d_c: unknown key 'step'"),
    ("views: {type: int, low: 1.5, high: 4}\n", ":1: views: an int range takes whole numbers"),
    ("d_c: {type: float, low: -1.0, high: 0.3}\n", ":1: margins d_c and d_d must be >= 0"),
    ("beta: {type: categorical, choices: []}\n", ":1: beta: a categorical takes a non-empty 'choices'"),
    ("d_c: {type: float, low: 0.1, high: 0.3}\ngamma: fast\n", ":2: gamma takes a number"),
    ("d_c: [1, 2\n", ": not valid YAML"),
    ("- d_c\n", ": a space is a mapping"),
    ("gamma: 0.5\n", ": nothing to search"),
    ("d_c: {type: float, low: 0.1, high: .inf}\n", ":1: d_c takes a number"),
]


@pytest.mark.parametrize("text,message", BAD_SPACES)
def test_bad_space_files_are_one_line_errors_naming_file_and_line(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UsageError) as e:
        load_space(f)
    assert str(e.value).startswith(str(f)) and message in str(e.value) and "\n" not in str(e.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- search config

def test_search_config_validates_once_and_round_trips(tmp_path):
    cfg = SearchConfig(target_flops=["50%", "2e7"], arch="resnet20", storage=str(tmp_path), name="x")
    assert cfg.targets == ["50%", "2e7"] and cfg.cost_key == "flops" and cfg.results_dir == tmp_path / "x"
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SearchConfig(target_flops=["1e8"], space="wide").space == str(SPACES_DIR / "wide.yaml")
    smoke = SearchConfig.from_flags({"smoke_test": True, "epochs": 3})
    assert smoke.arch == "resnet8" and smoke.epochs == 3 and smoke.targets == ["50%"]


@pytest.mark.parametrize("kw,message", [
    ({}, "give a budget"),
    ({"target_flops": ["1e8"], "target_latency_ms": ["2"]}, "not both"),
    ({"target_flops": ["-3"]}, "must be > 0"),
    ({"target_flops": ["1e8", "1e8"]}, "targets repeat"),
    ({"target_flops": ["1e8"], "num_samples": 0}, "num-samples must be >= 1"),
    ({"target_flops": ["1e8"], "gpus_per_trial": 1.5}, "must be whole"),
    ({"target_flops": ["1e8"], "arch": "resnet7"}, "unknown arch"),
    ({"target_flops": ["1e8"], "name": "a/b"}, "name 'a/b'"),
    ({"target_flops": ["1e8"], "epochs": 0}, "epochs must be >= 1"),
])
def test_search_config_rejects_bad_input(kw, message):
    with pytest.raises(UsageError, match=message):
        SearchConfig(**kw)


# ----------------------------------------------------------------------------- searcher

@pytest.fixture
def searcher(tmp_path):
    space = load_space(SPACES_DIR / "wide.yaml")   # the margins and weights: several parameters to ask
    return OptunaSearcher(space, ["50%"], "s", f"sqlite:///{tmp_path / 'optuna.db'}", tolerance=0.02,
                          total_epochs=3, seed=0)


def _final(acc, flops, target=100.0, epoch=3):
    return {"accuracy": acc, "flops": flops, "target_cost": target, "epoch": epoch, "k": 5.0}


def test_searcher_tells_optuna_complete_pruned_and_fail(searcher, tmp_path):
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c", "d", "e")}
    searcher.save(str(tmp_path / "state.json"))                          # Tune's snapshot: all five live
    assert [c["optuna_trial"] for c in configs.values()] == [0, 1, 2, 3, 4]
    assert all(c["target"] == "50%" and 0.05 <= c["d_c"] <= 0.5 for c in configs.values())
    for epoch, acc in ((1, 0.3), (2, 0.4)):
        searcher.on_trial_result("a", {"accuracy": acc, "epoch": epoch})
    searcher.on_trial_complete("a", _final(0.61, 101.0))                 # finished, on budget
    searcher.on_trial_complete("b", _final(0.40, 100.0, epoch=1))        # stopped by ASHA after epoch 1
    searcher.on_trial_complete("c", error=True)                          # crashed
    searcher.on_trial_complete("d", {"diverged": 1.0, "error": "loss is not finite", "accuracy": 0.0,
                                     "flops": float("nan"), "epoch": 2})
    searcher.on_trial_complete("e", _final(0.70, 150.0))                 # finished, 50 % over budget
    S = optuna.trial.TrialState
    study = searcher.studies["50%"]
    assert study.study_name == "s"                                       # one target: the search's name
    assert [t.state for t in study.trials] == [S.COMPLETE, S.PRUNED, S.FAIL, S.FAIL, S.COMPLETE]
    assert study.trials[0].intermediate_values == {1: 0.3, 2: 0.4}
    assert study.trials[1].intermediate_values == {1: 0.40}              # kept as what it is: partial
    assert study.trials[3].user_attrs["reason"] == "loss is not finite"
    # the constraint keeps the more accurate but over-budget trial off the front
    assert [t.number for t in study.best_trials] == [0]
    assert budget_violation(150.0, 100.0, 0.02) == pytest.approx(0.48)
    # a driver restored from the snapshot replays trials Optuna has already been told: ignored (told
    # again, Optuna would raise: the trial has finished)
    replay = pickle.loads(pickle.dumps(searcher))
    replay.restore(str(tmp_path / "state.json"))
    assert set(replay.live) == {"a", "b", "c", "d", "e"}
    replay.on_trial_result("b", {"accuracy": 0.45, "epoch": 2})
    replay.on_trial_complete("a", _final(0.99, 100.0))
    replay.on_trial_complete("b", _final(0.45, 100.0, epoch=2))
    assert "a" not in replay.live and "b" not in replay.live
    study = replay.studies["50%"]
    assert [t.state for t in study.trials] == [S.COMPLETE, S.PRUNED, S.FAIL, S.FAIL, S.COMPLETE]
    assert study.trials[0].value == pytest.approx(0.61) and study.trials[1].intermediate_values == {1: 0.40}


def test_searcher_survives_pickling_and_restores_its_trial_map(searcher, tmp_path):
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.save(str(tmp_path / "state.json"))
    clone = pickle.loads(pickle.dumps(searcher))      # what Tuner.restore does with tuner.pkl
    assert clone._studies is None
    clone.live = {}
    # the driver died after asking for "c" but before Tune recorded it: that trial is FAILed
    searcher.suggest("c")
    clone.restore(str(tmp_path / "state.json"))
    assert clone.live == {"a": ("50%", 0), "b": ("50%", 1)}
    S = optuna.trial.TrialState
    assert [t.state for t in clone.studies["50%"].trials] == [S.RUNNING, S.RUNNING, S.FAIL]
    clone.on_trial_complete("b", _final(0.5, 100.0))
    assert clone.studies["50%"].trials[1].state == S.COMPLETE
    assert clone.suggest("d")["optuna_trial"] == 3


TARGETS = ["30%", "60%", "90%"]


def test_several_targets_get_one_single_objective_study_each(tmp_path):
    db = f"sqlite:///{tmp_path / 'o.db'}"
    s = OptunaSearcher(load_space(SPACES_DIR / "default.yaml"), TARGETS, "m", db, 0.02, 2)
    configs = {str(i): s.suggest(str(i)) for i in range(3)}
    # ties in the first round: the dearest budget first (its trials run longest), after it the cheapest
    assert [c["target"] for c in configs.values()] == ["90%", "60%", "30%"]
    s.on_trial_result("2", {"accuracy": 0.2, "epoch": 1})
    s.on_trial_complete("2", _final(0.2, 30.0, target=30.0, epoch=1))       # stopped by ASHA: PRUNED
    for i in range(3, 6):   # the pruned trial still counts: the budgets stay one trial apart at most
        configs[str(i)] = s.suggest(str(i))
    assert [configs[str(i)]["target"] for i in range(3, 6)] == TARGETS
    s.on_trial_result("1", {"accuracy": 0.5, "epoch": 1})                  # every study hears epochs
    s.on_trial_complete("1", _final(0.6, 60.0, target=60.0, epoch=2))
    s.on_trial_complete("4", _final(0.7, 70.0, target=60.0, epoch=2))      # more accurate, 17 % over
    s.on_trial_complete("0", error=True)
    # the fewest trials first: a study ahead of the others waits for them
    s.studies["30%"].ask()
    s.studies["30%"].ask()
    configs.update({str(i): s.suggest(str(i)) for i in range(8, 13)})
    assert [configs[str(i)]["target"] for i in range(8, 13)] == ["60%", "90%", "60%", "90%", "30%"]

    assert set(optuna.get_all_study_names(db)) == {"m@30%", "m@60%", "m@90%"}
    S = optuna.trial.TrialState
    numbers = []
    for target, study in s.studies.items():
        assert study.study_name == f"m@{target}" and study.directions == [optuna.study.StudyDirection.MAXIMIZE]
        mine = [t for t in study.trials if "search_trial" in t.user_attrs]
        assert {t.user_attrs["target"] for t in mine} == {target}                # only its own target's
        assert [t.number for t in study.trials] == list(range(len(study.trials)))  # Optuna's, per study
        numbers += [t.user_attrs["search_trial"] for t in mine]
        assert all(configs[t.user_attrs["tune_trial_id"]]["optuna_trial"] == t.user_attrs["search_trial"]
                   for t in mine)
    # one search-wide number per trial, counting the two asked by hand (6 and 7)
    assert sorted(numbers) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert [c["optuna_trial"] for c in configs.values()] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert [t.state for t in s.studies["30%"].trials][:1] == [S.PRUNED]
    assert s.studies["30%"].trials[0].intermediate_values == {1: 0.2}
    sixty = s.studies["60%"]
    assert sixty.trials[0].intermediate_values == {1: 0.5}
    assert sixty.best_trial.number == 0 and sixty.best_trial.user_attrs["search_trial"] == 1  # 4 misses its budget
    assert s.studies["90%"].trials[0].state == S.FAIL


def test_dearest_first_orders_targets_of_one_kind_by_cost():
    assert dearest_first(["30%", "70%", "50%"]) == ["70%", "50%", "30%"]
    assert dearest_first(["1e8", "2.5e8"]) == ["2.5e8", "1e8"]
    assert dearest_first(["30%", "2e8"]) == ["30%", "2e8"]     # % and FLOPs: no order without the network


def test_tpe_of_one_target_sees_only_that_targets_trials(tmp_path, monkeypatch):
    seen = []
    sample = optuna.samplers.TPESampler.sample_relative

    def spy(self, study, trial, search_space):
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        seen.append((study.study_name, {t.user_attrs["target"] for t in done}, len(done)))
        return sample(self, study, trial, search_space)
    monkeypatch.setattr(optuna.samplers.TPESampler, "sample_relative", spy)
    s = OptunaSearcher(load_space(SPACES_DIR / "default.yaml"), ["30%", "60%"], "m",
                       f"sqlite:///{tmp_path / 'o.db'}", 0.5, 2)
    for i in range(24):     # 12 per target: both past TPE's 10 random start-up trials
        c = s.suggest(str(i))
        budget = float(c["target"][:-1])
        s.on_trial_complete(str(i), _final(budget / 100 + 0.001 * i, budget, target=budget, epoch=2))
    assert seen and all(targets <= {name.split("@")[1]} for name, targets, _ in seen)
    assert {name for name, _, n in seen if n >= 10} == {"m@30%", "m@60%"}     # TPE modelled each alone


def test_per_target_asha_compares_a_trial_only_with_its_own_budget(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from search.scheduler import PerTargetASHA

    def make(cls, *args):
        sched = cls(*args, time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
        assert sched.set_search_properties("accuracy", "max")   # as the TuneConfig sets them
        return sched

    def trial(tid, target):   # what ASHA reads of a Trial: its id; PerTargetASHA: its config's target
        return SimpleNamespace(trial_id=tid, config={"target": target})

    # budget B's trials score far above budget A's at the first rung (epoch 1)
    steps = [("b1", "B", 0.90), ("b2", "B", 0.92), ("b3", "B", 0.91),
             ("a1", "A", 0.30), ("a2", "A", 0.32), ("a3", "A", 0.85), ("a4", "A", 0.90), ("a5", "A", 0.20)]
    per, one = make(PerTargetASHA, ["A", "B"]), make(ASHAScheduler)
    per.state_path = str(tmp_path / "scheduler.jsonl")          # rewritten at every change
    decisions = {}
    for sched in (per, one):
        for tid, target, acc in steps:
            t = trial(tid, target)
            sched.on_trial_add(None, t)
            decisions[sched is per, tid] = sched.on_trial_result(None, t, {"training_iteration": 1, "accuracy": acc})
    STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # one ASHA for both budgets stops A's first trials: B's set its cut
    assert [decisions[False, t] for t in ("a1", "a2")] == [STOP, STOP]
    # per target: A's weak trials go on (B's do not count), and the weak one among strong A trials stops
    assert [decisions[True, t] for t, _, _ in steps] == [GO] * 7 + [STOP]
    assert set(per.schedulers["A"]._trial_info) == {"a1", "a2", "a3", "a4", "a5"}
    lines = [json.loads(line) for line in (tmp_path / "scheduler.jsonl").read_text().splitlines()]
    assert [d["target"] for d in lines] == ["A", "B"]              # plain data, a line per target, no pickle
    assert lines[0]["trials"] == dict.fromkeys(["a1", "a2", "a3", "a4", "a5"], 0) and lines[0]["num_stopped"] == 1
    saved = per.state()
    clone = make(PerTargetASHA, ["A", "B"])                      # a restored tuner's: empty rungs
    clone.restore(str(tmp_path / "scheduler.jsonl"))
    assert clone.state() == saved
    per.on_trial_complete(None, trial("a1", "A"), {"training_iteration": 1, "accuracy": 0.30})
    per.on_trial_remove(None, trial("b1", "B"))
    assert "a1" not in per.schedulers["A"]._trial_info and "b1" not in per.schedulers["B"]._trial_info
    assert set(per.schedulers["B"]._trial_info) == {"b2", "b3"}
    t = trial("a6", "A")                                          # the clone kept A's rung
    clone.on_trial_add(None, t)
    assert clone.on_trial_result(None, t, {"training_iteration": 1, "accuracy": 0.25}) == STOP
    assert clone.metric == "accuracy" and "target B" in clone.debug_string()
    with pytest.raises(ValueError, match="target 'A'"):          # another schedule's state does not fit
        other = PerTargetASHA(["A"], time_attr="training_iteration", max_t=4, grace_period=1, brackets=2)
        other.set_state(saved)


def test_searcher_with_several_studies_saves_and_restores(tmp_path):
    s = OptunaSearcher(load_space(SPACES_DIR / "default.yaml"), ["30%", "60%"], "m",
                       f"sqlite:///{tmp_path / 'o.db'}", 0.02, 2)
    assert [s.suggest(tid)["target"] for tid in ("a", "b", "c")] == ["60%", "30%", "30%"]
    s.save(str(tmp_path / "state.json"))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["live"] == {"a": ["60%", 0], "b": ["30%", 0], "c": ["30%", 1]}
    assert state["studies"] == {"30%": "m@30%", "60%": "m@60%"}
    assert s.suggest("d")["target"] == "60%"          # asked, but the driver died before Tune recorded it
    clone = pickle.loads(pickle.dumps(s))
    assert clone._studies is None
    clone.live = {}
    clone.restore(str(tmp_path / "state.json"))
    assert clone.live == {"a": ("60%", 0), "b": ("30%", 0), "c": ("30%", 1)}
    S = optuna.trial.TrialState
    assert [t.state for t in clone.studies["30%"].trials] == [S.RUNNING, S.RUNNING]
    assert [t.state for t in clone.studies["60%"].trials] == [S.RUNNING, S.FAIL]
    clone.on_trial_complete("a", _final(0.5, 60.0, target=60.0, epoch=2))
    assert clone.studies["60%"].trials[0].state == S.COMPLETE
    e = clone.suggest("e")                            # the lost trial counts, in its study and in the numbering
    assert (e["target"], e["optuna_trial"]) == ("30%", 4)


def _params(config: dict, space) -> tuple:
    return tuple(config[p.name] for p in space.params)


def test_a_resumed_search_asks_no_parameters_of_earlier_trials_again(tmp_path):
    space = load_space(SPACES_DIR / "default.yaml")
    s = OptunaSearcher(space, ["50%"], "s", f"sqlite:///{tmp_path / 'o.db'}", 0.02, 2, seed=0)
    pickled = pickle.dumps(s)              # Tune pickles the searcher into tuner.pkl before any trial
    state = str(tmp_path / "state.json")
    asked = []
    for session in range(3):               # the first run, then two resumes, each asking 3 trials
        if session:
            s = pickle.loads(pickled)
            s.restore(state)
        for i in range(3 * session, 3 * session + 3):
            config = s.suggest(str(i))
            asked.append(config)
            s.on_trial_complete(str(i), _final(0.5 + 0.01 * i, 100.0, epoch=2))
        s.save(state)
    assert [c["optuna_trial"] for c in asked] == list(range(9))
    # a sampler re-seeded as it first was would ask trial 0's (or 1's) parameters again at each resume
    assert len({_params(c, space) for c in asked}) == 9


def test_the_first_trial_of_each_study_runs_the_paper_values(tmp_path):
    from search.searcher import paper_trial
    f = tmp_path / "space.yaml"
    f.write_text("d_c: {type: float, low: 0.05, high: 0.5}\n"
                 "d_d: {type: float, low: 0.6, high: 1.0}\n"          # the paper's 0.5 is out of range
                 "lam: {type: float, low: 0.05, high: 0.8, log: true}\n"
                 "alpha: {type: categorical, choices: [0.1, 0.4]}\n"  # 0.4 on Tiny-ImageNet only
                 "lr: {type: float, low: 0.02, high: 0.2, log: true}\n"
                 "beta: {type: float, low: 2.0, high: 10.0}\n")       # no paper value: sampled
    space = load_space(f)
    assert paper_trial(space, "cifar10") == {"d_c": 0.2, "lam": 0.2, "lr": 0.1}
    assert paper_trial(space, "tinyimagenet") == {"d_c": 0.2, "lam": 0.4, "alpha": 0.4, "lr": 0.1}
    assert paper_trial(space, None) == {"d_c": 0.2, "lr": 0.1}      # the margins do not depend on the data
    assert paper_trial(load_space(SPACES_DIR / "default.yaml"), "cifar10") == {"lr": 0.1}
    assert paper_trial(load_space(SPACES_DIR / "wide.yaml"), "cifar10") == {
        "d_c": 0.2, "d_d": 0.5, "lam": 0.2, "alpha": 0.2, "lr": 0.1}

    db = f"sqlite:///{tmp_path / 'o.db'}"
    s = OptunaSearcher(space, ["30%", "60%"], "m", db, 0.02, 2, dataset="tinyimagenet")
    pickled = pickle.dumps(s)
    first = [s.suggest(str(i)) for i in range(4)]
    assert [c["target"] for c in first] == ["60%", "30%", "30%", "60%"]
    for c in first[:2]:                                             # each study's first trial
        assert (c["d_c"], c["lam"], c["alpha"], c["lr"]) == (0.2, 0.4, 0.4, 0.1)
        assert 0.6 <= c["d_d"] <= 1.0 and 2.0 <= c["beta"] <= 10.0 and c["optuna_trial"] in (0, 1)
    assert all(c["d_c"] != 0.2 for c in first[2:])                   # then the sampler's
    s.save(str(tmp_path / "state.json"))
    clone = pickle.loads(pickled)                                   # resumed: not enqueued again
    clone.restore(str(tmp_path / "state.json"))
    again = [clone.suggest(str(i)) for i in range(4, 6)]
    assert all(c["d_c"] != 0.2 for c in again)
    for study in clone.studies.values():
        trials = study.get_trials(deepcopy=False)
        assert [t.params["d_c"] == 0.2 for t in trials] == [True, False, False]
        assert not [t for t in trials if t.state == optuna.trial.TrialState.WAITING]


def test_trials_enqueued_before_the_search_come_first_numbered_from_0(tmp_path):
    db = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="q", storage=db, direction="maximize")
    for d_c in (0.1, 0.3):
        study.enqueue_trial({"d_c": d_c})
    s = OptunaSearcher(load_space(SPACES_DIR / "wide.yaml"), ["50%"], "q", db, 0.02, 2, dataset="cifar10")
    got = [s.suggest(str(i)) for i in range(3)]
    assert [c["optuna_trial"] for c in got] == [0, 1, 2]          # a waiting trial is not a trial yet
    assert [c["d_c"] for c in got[:2]] == [0.1, 0.3]
    assert got[2]["d_c"] not in (0.1, 0.2, 0.3)                    # the given trials replace the paper's


def test_concurrent_trials_spread_out_by_the_constant_liar(tmp_path):
    import copy
    from conftest import margins_space
    space = load_space(margins_space(tmp_path))   # four parameters to spread over
    s = OptunaSearcher(space, ["50%"], "s", f"sqlite:///{tmp_path / 'o.db'}", 0.5, 2, seed=3)
    for i in range(12):                                             # past TPE's 10 random start-up trials
        s.suggest(str(i))
        s.on_trial_complete(str(i), _final(0.3 + 0.05 * (i % 7), 100.0, epoch=2))
    study = s.studies["50%"]
    assert study.sampler._constant_liar
    running = [s.suggest(tid) for tid in ("r1", "r2")]              # two trials at once, both RUNNING
    assert _params(running[0], space) != _params(running[1], space)
    # the same model and random state, with and without the lie: only the liar sees r1 and r2
    probe = study.ask()
    trial = study.get_trials(deepcopy=False)[probe.number]
    liar, twin, honest = (copy.deepcopy(study.sampler) for _ in range(3))
    honest._constant_liar = False
    dists = space.distributions()
    lie = liar.sample_relative(study, trial, dists)
    assert lie and lie == twin.sample_relative(study, trial, dists)
    assert lie != honest.sample_relative(study, trial, dists)


def test_several_targets_get_one_front_each_and_one_across(tmp_path):
    from PIL import Image

    from search.results import summary, trial_rows
    from search.tracking import pareto_plot
    space = load_space(SPACES_DIR / "default.yaml")
    s = OptunaSearcher(space, ["30%", "60%"], "m", f"sqlite:///{tmp_path / 'o.db'}", 0.1, 2)
    #        target   acc   flops  K
    final = [("60%", 0.60, 60.0, 9.0),   # 0 (the first round: the dearest budget first)
             ("30%", 0.50, 30.0, 5.0),   # 1
             ("30%", 0.40, 31.0, 5.0),   # 2 dominated by 1 in FLOPs and K
             ("60%", 0.55, 55.0, 8.0),   # 3
             ("30%", 0.52, 33.0, 4.0),   # 4 beats 1 in K, not in FLOPs
             ("60%", 0.45, 50.0, 7.0)]   # 5 on the 60 % front, but 4 dominates it across targets
    for i, (target, acc, flops, k) in enumerate(final):
        assert s.suggest(str(i))["target"] == target
        budget = 30.0 if target == "30%" else 60.0
        s.on_trial_complete(str(i), {"accuracy": acc, "flops": flops, "k": k, "target_cost": budget,
                                     "epoch": 2, "rel_error": flops / budget - 1, "effective_paths": 1.0 + i})
    rows = trial_rows(list(s.studies.values()), [p.name for p in space.params], 0.1)
    assert [(r["trial"], r["target"]) for r in rows] == [(i, f[0]) for i, f in enumerate(final)]
    flags = {c: [i for i, r in enumerate(rows) if r[c]] for c in ("pareto_flops", "pareto_k", "pareto_all")}
    assert flags == {"pareto_flops": [0, 1, 3, 4, 5], "pareto_k": [0, 3, 4, 5], "pareto_all": [0, 1, 3, 4]}
    # each per-target front is the Pareto function's answer on that target's trials alone
    for target in ("30%", "60%"):
        group = [r for r in rows if r["target"] == target]
        front = pareto_front([(r["accuracy"], r["flops"]) for r in group], (True, False))
        assert [r["pareto_flops"] for r in group] == [i in front for i in range(len(group))]
    text = summary(rows, ["30%", "60%"])
    assert "Pareto front of target 30%" in text and "Pareto front of target 60%" in text
    best30 = next(l for l in text.splitlines() if l.split()[:2] == ["30%", "1"])   # trial 1: its effective paths
    assert best30.split()[-1] == "2.0" and "paths" in text
    line5 = next(l for l in text.splitlines() if l.split()[:1] == ["5"] and "45.00%" in l)
    assert line5.endswith("no")                 # on its target's front, not on the front across targets
    pareto_plot(rows, ["30%", "60%"], tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size[0] > 600


@pytest.mark.slow
def test_resume_leaves_errored_trials_failed_and_continues_interrupted_ones(tmp_path):
    """A real search (Ray, resnet8, synthetic data), interrupted, then resumed. Its trials at 1e-7 ms
    raise: the target is below the network's fixed latency, which only the trial measures (ERROR in
    Tune, FAIL in Optuna, no retries). The resume must not run them again; the 90 % trial the interrupt
    caught goes on from its last epoch."""
    import re

    import pyarrow.parquet as pq

    from conftest import interrupt_search, run_cli
    args = ["--target-latency-ms", "1e-7", "90%", "--arch", "resnet8", "--dataset", "synthetic", "--epochs", "3",
            "--finetune-epochs", "0", "--backbone", "none", "--batch-size", "64", "--num-samples", "2",
            "--max-concurrent", "1", "--max-failures", "0", "--scheduler", "fifo", "--storage", str(tmp_path),
            "--name", "e"]
    # trial 0 at 1e-7 ms (first round: the targets as given, % and ms do not compare), trial 1 at 90 %
    # Ctrl-C in trial 1's second epoch: Tune registers an epoch's checkpoint a moment after its result
    rc, first = interrupt_search(args, "trial 1 (target 90%) epoch 1/3", pause=2)
    assert rc == 130, first[-3000:]
    assert re.search(r"trial 0 raised: .*not above the network's fixed cost", first), first[-3000:]

    resumed = run_cli("drn-search", "--resume", "e", "--storage", str(tmp_path))
    assert resumed.returncode == 4, resumed.stderr[-3000:]      # ended, with a failed trial
    assert "some trials failed" in resumed.stderr
    assert "trial 0 (target 1e-7) started" not in resumed.stderr and "trial 0 raised" not in resumed.stderr
    assert "2/2 trials ended" in resumed.stderr
    assert re.search(r"trial 1 \(target 90%\) epoch [23]/3.*\(restarted from its epoch [12] checkpoint\)",
                     resumed.stderr), resumed.stderr[-3000:]
    rows = {r["trial"]: r for r in pq.read_table(tmp_path / "e" / "trials.parquet").to_pylist()}
    assert {n: (r["target"], r["state"]) for n, r in rows.items()} == {0: ("1e-7", "FAIL"), 1: ("90%", "COMPLETE")}
    assert rows[0]["reason"] == "trial raised an error"
    epochs = {}
    for f in (tmp_path / "e").glob("trial-*/result.json"):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if lines:                                # trial 0 raised before its first epoch
            epochs[int(lines[0]["optuna_trial"])] = [int(r["epoch"]) for r in lines]
    # trial 1 went on from its checkpoint (epoch 1, or 2 if the driver stopped late), not from scratch
    assert list(epochs) == [1] and epochs[1].count(1) == 1 and epochs[1][-1] == 3, epochs


def test_help_lists_every_flag(capsys):
    from search.cli import FLAGS, main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(flag in out for group in FLAGS.values() for flag in group) and "--smoke-test" in out and "50%" in out


def test_resume_with_a_cloud_storage_looks_in_the_local_results_dir(tmp_path, monkeypatch, capsys):
    from search.cli import main
    monkeypatch.chdir(tmp_path)   # a cloud --storage keeps our files in ./drn-results/<name>
    assert main(["--resume", "nope", "--storage", "s3://bucket/drn"]) == 2
    err = capsys.readouterr().err
    assert f"no search named 'nope' under {tmp_path / 'drn-results'}" in err and err.count("\n") == 1


@pytest.mark.parametrize("num_samples", [None, SearchConfig.__dataclass_fields__["num_samples"].default])
def test_every_study_of_the_default_search_leaves_random_sampling(tmp_path, monkeypatch, num_samples):
    """The default search (20 trials over three budgets: 7 per study): with Optuna's 10 start-up trials
    no study ever reached TPE; sized to the trials a study gets, each runs 4 or more TPE trials."""
    from search.searcher import startup_trials
    modelled = []
    sample = optuna.samplers.TPESampler.sample_relative

    def spy(self, study, trial, search_space):
        params = sample(self, study, trial, search_space)
        if params:                    # {} during the random start-up
            modelled.append(study.study_name)
        return params
    monkeypatch.setattr(optuna.samplers.TPESampler, "sample_relative", spy)
    targets = ["30%", "50%", "70%"]
    s = OptunaSearcher(load_space(SPACES_DIR / "default.yaml"), targets, "m", f"sqlite:///{tmp_path / 'o.db'}",
                       0.5, 2, num_samples=num_samples)
    for i in range(20):
        c = s.suggest(str(i))
        s.on_trial_complete(str(i), _final(0.3 + 0.01 * (i % 5), float(c["target"][:-1]),
                                           target=float(c["target"][:-1]), epoch=2))
    per_study = {f"m@{t}": modelled.count(f"m@{t}") for t in targets}
    if num_samples is None:
        assert per_study == {f"m@{t}": 0 for t in targets} and startup_trials(None) == 10
    else:
        assert startup_trials(7) == 2 and all(n >= 4 for n in per_study.values()), per_study


def test_asha_ranks_feasible_trials_first_and_does_not_stop_on_noise():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from search.scheduler import PerTargetASHA
    STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE

    def run(tolerance, steps, images):
        sched = PerTargetASHA(["A"], tolerance=tolerance, time_attr="training_iteration", max_t=4, grace_period=1,
                              reduction_factor=2)
        assert sched.set_search_properties("accuracy", "max")
        out = {}
        for tid, acc, flops in steps:
            t = SimpleNamespace(trial_id=tid, config={"target": "A"})
            sched.on_trial_add(None, t)
            out[tid] = sched.on_trial_result(None, t, {"training_iteration": 1, "accuracy": acc, "flops": flops,
                                                       "target_cost": 100.0, "images": images})
        return [out[tid] for tid, _, _ in steps]

    # off-budget trials (12 % over) that buy accuracy with compute, then on-budget ones, then another off one
    steps = [("x1", 0.80, 112.0), ("x2", 0.78, 112.0), ("f1", 0.60, 101.0), ("f2", 0.62, 99.0),
             ("f3", 0.61, 100.0), ("x3", 0.85, 88.0)]
    assert run(None, steps, 10_000) == [GO, STOP, STOP, STOP, STOP, GO]       # accuracy alone: only x1, x3 go on
    assert run(0.02, steps, 10_000) == [GO, STOP, GO, GO, GO, STOP]           # every feasible trial goes on
    # on 407 val images (noise 2.5 points) a trial 1.5 points under the cut goes on, one 10 under stops
    close = [("a", 0.60, 100.0), ("b", 0.62, 100.0), ("c", 0.595, 100.0), ("d", 0.50, 100.0)]
    assert run(None, close, 407) == [GO, GO, STOP, STOP]
    assert run(0.02, close, 407) == [GO, GO, GO, STOP]


@pytest.mark.parametrize("uri,path", [("sqlite:////abs/mlflow.db", "/abs/mlflow.db"), ("sqlite:///rel/m.db", "rel/m.db"),
                                      ("file:///abs/mlruns", "/abs/mlruns"), ("file:rel/mlruns", "rel/mlruns"),
                                      ("file://host/abs/mlruns", "/abs/mlruns"), ("file:///a%20b/mlruns", "/a b/mlruns"),
                                      ("mlruns", "mlruns"), ("http://127.0.0.1:5000", None),
                                      ("postgresql://db/mlflow", None), ("databricks", None)])
def test_local_store_reads_every_form_of_a_local_mlflow_store(uri, path):
    """One helper decides where a local MLflow store is, for the registry and the cluster checks alike."""
    from search.config import local_store
    assert local_store(uri) == (None if path is None else Path(path))


def test_one_number_predicate_for_metrics_and_settings():
    from drn.config import is_number
    assert [is_number(v) for v in (1, 0.5, -3.0, True, math.nan, math.inf, "1", None)] == \
        [True, True, True, False, False, False, False, False]


# ----------------------------------------------------------------------------- exit codes, summary, importance

def _row(trial, target, state="COMPLETE", feasible=True, acc=0.5, flops=10.0, **kw):
    return {"trial": trial, "target": target, "state": state, "feasible": feasible, "accuracy": acc, "flops": flops,
            "rel_error": 0.0, "k": 2.0, "reason": "boom" if state == "FAIL" else None, "pareto_flops": state == "COMPLETE",
            "d_c": 0.2, **kw}


def test_exit_code_is_0_only_with_a_feasible_model_at_every_target_and_no_failure():
    from search.cli import EXIT_FAILED, EXIT_INFEASIBLE, EXIT_INTERRUPTED, EXIT_UPLOAD, exit_code
    ok = [_row(0, "30%"), _row(1, "50%")]
    assert exit_code(ok, ["30%", "50%"], True) == 0
    assert exit_code(ok, ["30%", "50%"], False) == EXIT_INTERRUPTED == 130
    assert exit_code([_row(0, "30%"), _row(1, "50%", feasible=False)], ["30%", "50%"], True) == EXIT_INFEASIBLE == 3
    assert exit_code([*ok, _row(2, "50%", state="FAIL", feasible=False)], ["30%", "50%"], True) == EXIT_FAILED == 4
    assert exit_code(ok, ["30%", "50%"], True, copied=False) == EXIT_UPLOAD == 5   # a cloud copy that failed
    assert exit_code(ok, ["30%", "50%"], True, copied=True) == 0
    assert len({0, EXIT_INFEASIBLE, EXIT_FAILED, EXIT_UPLOAD, EXIT_INTERRUPTED, 2}) == 6


def test_the_summary_object_names_each_targets_best_by_val_and_its_uris():
    from search.results import summary_object
    rows = [_row(0, "50%", acc=0.6, model_uri="models:/m-a", test_accuracy=0.1),
            _row(1, "50%", acc=0.7, model_uri="models:/m-b", test_accuracy=0.0),
            _row(2, "50%", acc=0.9, feasible=False), _row(3, "70%", state="FAIL", feasible=False)]
    models = [{"uri": "models:/drn-s/2", "alias": "best-50pct", "trial": 1}]
    s = summary_object(rows, ["50%", "70%"], ["d_c"], models)
    json.dumps(s)                                            # one JSON object
    assert s["best"]["50%"]["trial"] == 1 and s["best"]["50%"]["model_uri"] == "models:/m-b"   # val, not test
    assert s["best"]["50%"]["alias_uri"] == "models:/drn-s@best-50pct" and s["best"]["50%"]["params"] == {"d_c": 0.2}
    assert s["best"]["70%"] is None and s["failed"] == [{"trial": 3, "reason": "boom"}]
    assert s["trials"] == {"complete": 3, "pruned": 0, "fail": 1, "running": 0}


def test_parameter_importance_needs_enough_complete_trials_that_differ(tmp_path):
    from search.plots import MIN_IMPORTANCE_TRIALS, importance_plot, param_importances
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("d_c", 0, 1) + 0.01 * t.suggest_float("lam", 0, 1),
                   n_trials=MIN_IMPORTANCE_TRIALS + 5)
    flat = optuna.create_study(direction="maximize")
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("d_c", 0, 1), n_trials=MIN_IMPORTANCE_TRIALS)
    few = optuna.create_study(direction="maximize")
    few.optimize(lambda t: t.suggest_float("d_c", 0, 1), n_trials=MIN_IMPORTANCE_TRIALS - 1)
    imp = param_importances({"50%": study, "30%": flat, "70%": few})
    assert list(imp) == ["50%"] and imp["50%"]["d_c"] > 0.8 > imp["50%"]["lam"]   # what moves the value
    importance_plot(imp, tmp_path / "imp.png")
    assert (tmp_path / "imp.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- passwords

@pytest.mark.parametrize("flag, uri, kept, env", [
    ("--mlflow-uri", "http://alice:pa%40ss@127.0.0.1:5000", "http://127.0.0.1:5000",
     {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pa@ss"}),
    ("$MLFLOW_TRACKING_URI", "https://bob:pw-2@mlflow.example", "https://mlflow.example",
     {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw-2"}),
    ("--optuna-storage", "postgresql+psycopg2://bob:pw-3@db.example:5432/optuna",
     "postgresql+psycopg2://bob@db.example:5432/optuna", {"PGPASSWORD": "pw-3"}),
    ("--optuna-storage", "postgresql://bob@db.example/optuna", "postgresql://bob@db.example/optuna", {}),
    ("--storage", "s3://bucket/drn", "s3://bucket/drn", {}),
    ("--mlflow-uri", None, None, {}),
])
def test_a_password_leaves_the_uri_for_its_clients_variable(flag, uri, kept, env):
    from search.secrets import strip_password
    environ = {}
    assert strip_password(flag, uri, environ) == kept and environ == env


@pytest.mark.parametrize("flag, uri", [("--optuna-storage", "mysql://u:pw-4@h/db"),
                                       ("--optuna-storage", "sqlite://u:pw-4@/x.db"),
                                       ("--address", "ray://u:pw-4@head:10001"),
                                       ("--storage", "s3://key:pw-4@bucket/drn")])
def test_a_password_no_client_variable_can_carry_is_refused_without_showing_it(flag, uri):
    from search.secrets import strip_password
    with pytest.raises(UsageError, match="holds a password") as e:
        strip_password(flag, uri, {})
    assert "pw-4" not in str(e.value) and flag in str(e.value)
    with pytest.raises(UsageError, match="holds a password"):   # where the flags become a config
        SearchConfig(target_flops=["50%"], **{flag[2:].replace("-", "_"): uri})
