"""drn-search end to end on a real local Ray cluster (tiny data, CPU): trials, ASHA -> PRUNED,
Parquet, summary, resume after an interrupt of a two-target search (one Optuna study and one ASHA
per target), extending it (operating one safely: test_operate.py; its backbone: test_backbone.py;
bad input: test_bad_input.py)."""
import json
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from conftest import enqueued_study, interrupt_search, run_cli, search_args

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETE", "PRUNED", "FAIL"}


def tune_epochs(experiment: Path) -> dict[int, list[int]]:
    """Optuna trial number -> the epochs Tune recorded for it (result.json of each trial dir)."""
    out = {}
    for f in experiment.glob("trial-*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[int(rows[0]["optuna_trial"])] = [int(r["epoch"]) for r in rows]
    return out


# the wide space with the learning rate a choice between one that learns and one that cannot, each
# trial's rate given (enqueued in the study, not drawn): trials 0, 1 and 3 lr 0.05 (epoch-1 val
# accuracy 55-90 % on the generated set), trial 2 lr 1e-5 (chance, ~10 %). With 2 trials at a time
# trial 2 starts only after trial 0 or 1 has passed ASHA's rung, so it meets a cut it is far below
# on any machine and with any seed: the test does not hang on float-exact accuracies
ASHA_LRS = [0.05, 0.05, 1.0e-5, 0.05]
ASHA_SPACE = """\
d_c:   {type: float, low: 0.05, high: 0.5}
d_d:   {type: float, low: 0.2, high: 1.0}
lam:   {type: float, low: 0.05, high: 0.8, log: true}
alpha: {type: float, low: 0.05, high: 0.8, log: true}
beta:  {type: float, low: 2.0, high: 10.0}
lr:    {type: categorical, choices: [0.05, 1.0e-5]}
views: {type: int, low: 2, high: 4}
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    # the generated 10-class set (250 val images), not tiny_data: its shapes are learnt to 100 % in
    # one epoch, so every trial would tie at ASHA's rung, and ASHA keeps ties
    storage = tmp_path_factory.mktemp("search")
    space = storage / "asha.yaml"
    space.write_text(ASHA_SPACE)
    study = enqueued_study(storage / "optuna-given.db", "s4", [{"lr": lr} for lr in ASHA_LRS])
    args = search_args(Path("unused"), storage, "s4", "--num-samples", "4", "--max-concurrent", "2",
                       "--reduction-factor", "2", "--space", str(space), "--dataset", "synthetic",
                       "--batch-size", "64", "--optuna-storage", study)
    proc = run_cli("drn-search", *args)
    return proc, storage / "s4"


def test_a_real_search_ends_every_trial_and_writes_parquet(search):
    proc, results = search
    assert proc.returncode in (0, 3), proc.stderr[-3000:]   # 3: ended without a feasible model
    table = pq.read_table(results / "trials.parquet").to_pylist()
    assert proc.returncode == (0 if any(r["feasible"] for r in table) else 3)   # 0: a feasible model
    assert sorted(r["trial"] for r in table) == [0, 1, 2, 3]
    assert {r["state"] for r in table} <= TERMINAL - {"FAIL"}
    for r in table:
        assert r["target"] == "50%" and 0.05 <= r["d_c"] <= 0.5 and 2 <= r["views"] <= 4
        assert 0 <= r["accuracy"] <= 1 and r["flops"] > 0 and Path(r["checkpoint"]).is_file()
    assert any(r["pareto_flops"] for r in table if r["state"] == "COMPLETE")
    assert "Pareto front of target 50%, val accuracy vs FLOPs" in proc.stdout and "4 trials:" in proc.stdout
    out = proc.stdout + proc.stderr   # the search's own lines, not Tune's banner or MLflow's schema set-up
    assert "Configuration for experiment" not in out and "tensorboard" not in out and "INFO mlflow" not in out
    assert "epoch 2/2" in proc.stderr                                     # progress while it ran
    json.loads((results / "search.json").read_text())                    # its settings, for --resume
    # the default MLflow store: sqlite in the results dir, by an absolute URI
    tracking = json.loads((results / "mlflow.json").read_text())
    assert tracking["uri"] == f"sqlite:///{results / 'mlflow.db'}" and (results / "mlflow.db").is_file()
    assert tracking["uri"].startswith("sqlite:////")


def test_asha_stopped_trials_are_pruned_in_optuna_not_complete(search):
    proc, results = search
    study = optuna.load_study(study_name="s4", storage=f"sqlite:///{results.parent / 'optuna-given.db'}")
    epochs = tune_epochs(results)
    assert sorted(epochs) == [0, 1, 2, 3]
    for t in study.trials:
        stopped_early = epochs[t.number][-1] < 2
        assert t.state == (optuna.trial.TrialState.PRUNED if stopped_early else optuna.trial.TrialState.COMPLETE)
        if stopped_early:                        # its partial accuracy is an intermediate value only
            assert t.intermediate_values == {1: pytest.approx(t.user_attrs["accuracy"])}
    assert study.metric_names == ["val_accuracy"]   # optuna-dashboard names the objective
    lrs = {t.number: t.params["lr"] for t in study.trials}
    assert lrs == dict(enumerate(ASHA_LRS)), lrs   # as enqueued: see the fixture
    assert epochs[2] == [1], epochs              # the trial that cannot learn stopped at the rung
    assert 2 not in [t.number for t in study.best_trials]


def test_resume_after_an_interrupt_keeps_finished_trials_and_counts_none_twice(tiny_data, tmp_path):
    # two targets: a study each, numbered once across both; ASHA per target, its only rung at the
    # last epoch (nothing pruned), restored with the tuner
    args = search_args(tiny_data, tmp_path, "r", "--num-samples", "4", "--max-concurrent", "1",
                       "--target-flops", "50%", "70%", "--scheduler", "asha", "--grace-period", "2")
    rc, err = interrupt_search(args, "2/4 trials ended")     # two trials have ended: Ctrl-C
    assert rc == 130, err[-3000:]
    before = {r["trial"]: r for r in pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()}
    finished = {n: r for n, r in before.items() if r["state"] in TERMINAL}
    assert len(finished) >= 2

    resumed = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path))
    after = pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()
    feasible = all(any(r["feasible"] for r in after if r["target"] == t) for t in ("50%", "70%"))
    assert resumed.returncode == (0 if feasible else 3), resumed.stderr[-3000:]   # 3: a target has no model
    assert sorted(r["trial"] for r in after) == [0, 1, 2, 3] and {r["state"] for r in after} == {"COMPLETE"}
    assert len({r["tune_trial_id"] for r in after}) == 4
    for r in after:                               # finished trials kept as they were, not re-run
        if r["trial"] in finished:
            assert r["accuracy"] == finished[r["trial"]]["accuracy"]
            assert r["tune_trial_id"] == finished[r["trial"]]["tune_trial_id"]
    for n, epochs in tune_epochs(tmp_path / "r").items():
        assert epochs == [1, 2], (n, epochs)      # an interrupted trial went on from its checkpoint
    # ASHA's rungs (JSON) kept the trials that ended before the interrupt: tuner.pkl has the start's
    rungs = {d["target"]: d for d in map(json.loads, (tmp_path / "r" / "scheduler.jsonl").read_text().splitlines())}
    recorded = {t: set(rungs[t]["brackets"][0][0]["recorded"]) for t in ("50%", "70%")}
    assert recorded == {t: {r["tune_trial_id"] for r in after if r["target"] == t} for t in ("50%", "70%")}
    db = f"sqlite:///{tmp_path / 'r' / 'optuna.db'}"
    assert sorted(optuna.get_all_study_names(db)) == ["r@50%", "r@70%"]
    for target in ("50%", "70%"):                 # each study holds its own target's trials, two each
        study = optuna.load_study(study_name=f"r@{target}", storage=db)
        assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
        assert {t.user_attrs["target"] for t in study.trials} == {target} and len(study.trials) == 2
        assert sorted(t.user_attrs["search_trial"] for t in study.trials) == sorted(
            r["trial"] for r in after if r["target"] == target)


    # extended: --num-samples grows the search; its trials go on counting, its other settings stay
    saved = (tmp_path / "r" / "search.json").read_text()
    for flag in (["--epochs", "3"], ["--num-samples", "3"]):   # another setting, or fewer trials: refused
        refused = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path), *flag)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (tmp_path / "r" / "search.json").read_text() == saved
    more = run_cli("drn-search", "--resume", "r", "--storage", str(tmp_path), "--num-samples", "5", "--json")
    summary = json.loads(more.stdout)                        # --json: stdout is one object
    assert more.returncode == summary["exit_code"] in (0, 3), more.stderr[-3000:]
    assert summary["trials"] == {"complete": 5, "pruned": 0, "fail": 0, "running": 0} and summary["complete"]
    rows = pq.read_table(tmp_path / "r" / "trials.parquet").to_pylist()
    assert sorted(r["trial"] for r in rows) == [0, 1, 2, 3, 4]
    assert {r["trial"]: r["accuracy"] for r in rows if r["trial"] < 4} == {r["trial"]: r["accuracy"] for r in after}
    assert json.loads((tmp_path / "r" / "search.json").read_text())["num_samples"] == 5
    status = json.loads(run_cli("drn-search", "status", "r", "--storage", str(tmp_path), "--json").stdout)
    assert status["state"] == "finished" and status["ended"] == 5 and status["trials"] == summary["trials"]
    for t in ("50%", "70%"):                                 # the best per target, with its model's URI
        best = status["best"][t]
        assert (best is None) == (summary["best"][t] is None)
        if best is not None:
            assert best["model_uri"].startswith("models:/m-") and best["trial"] == summary["best"][t]["trial"]


def test_an_existing_name_is_not_overwritten(search, tiny_data):
    proc, results = search
    again = run_cli("drn-search", *search_args(tiny_data, results.parent, "s4", "--space", "wide"))
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume s4" in again.stderr
