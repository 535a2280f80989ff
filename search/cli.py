"""drn-search: find the routed ResNet with the best accuracy at a compute budget.

Bad input (flags, space file, data, Ray address, resources): one line on stderr, exit 2, nothing
written. Everything else of a search lives in <storage>/<name>/ (see README, "Results").
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time

from drn.cli import EXIT_USAGE, OneLineParser, formatter
from drn.config import UsageError, resolve_target

from . import state, tracking
from .config import SMOKE, SearchConfig, brief
from .tuner import connect, make_tuner, resources, tune_settings

# drn-search's flags by purpose: flag -> (SearchConfig field, type, nargs, help). Defaults are read from
# SearchConfig.
FLAGS = {
    "budget": {
        "--target-flops": ("target_flops", str, "+", "FLOPs budget(s) per image: absolute (2e8) or share of the full "
                           "network (40%%); several values search a front, one target per trial"),
        "--target-latency-ms": ("target_latency_ms", str, "+", "latency budget(s), ms per image on the trial's "
                                "device (or %% of full), instead of FLOPs"),
        "--tolerance": ("tolerance", float, None, "a trial is feasible when |cost/target - 1| <= this"),
    },
    "data": {
        "--dataset": ("dataset", str, None, "cifar10, cifar100, svhn, tinyimagenet, imagefolder or synthetic"),
        "--data-dir": ("data_dir", str, None, "where the dataset is (torchvision sets are downloaded there)"),
        "--val-fraction": ("val_fraction", float, None, "share of the training images held out as val, in (0, 0.5]: "
                           "ASHA, TPE, the Pareto flags and the best trial read val; the test split is only reported"),
    },
    "model": {
        "--arch": ("arch", str, None, "resnet8/14/20/32/44/56/74/110 or resnet50"),
        "--routing": ("routing", str, None, "drn, or a static baseline trained at each target: "
                      "firstk, randomk, distributedk (Table 4a), deepk"),
        "--backbone": ("backbone", str, None, "auto (the plain --arch trained once and cached under --storage), "
                       "PATH (a `drn-train --routing full` checkpoint of --arch on --dataset) or none (every trial "
                       "trains from scratch): every trial fine-tunes it"),
        "--backbone-epochs": ("backbone_epochs", int, None, "--backbone auto: epochs of the plain network "
                              "(default: drn-train's 250, the paper's schedule)"),
    },
    "search": {
        "--space": ("space", str, None, "search space YAML, or a name in spaces/ (default, wide)"),
        "--num-samples": ("num_samples", int, None, "trials in all (a resumed search counts the earlier ones)"),
        "--scheduler": ("scheduler", str, None, "asha (early stopping; each target's trials compared only with "
                        "each other), fifo (none), or auto (asha)"),
        "--grace-period": ("grace_period", int, None, "ASHA: epochs before a trial may be stopped (default: "
                           "a quarter of the epochs)"),
        "--reduction-factor": ("reduction_factor", int, None, "ASHA: keep the best 1/N at each rung"),
        "--seed": ("seed", int, None, "seed of the sampler and of every trial's training"),
    },
    "trial schedule": {
        "--epochs": ("epochs", int, None, "epochs of each trial's main phase, in which the routers find their routes "
                     "(default: 1/15 of --backbone-epochs, or 250 from scratch with --backbone none)"),
        "--finetune-epochs": ("finetune_epochs", int, None, "frozen-route epochs per trial after the main phase "
                              "(default: 2/3 of --backbone-epochs, or drn-train's max(2, 10%% of --epochs) with "
                              "--backbone none)"),
        "--batch-size": ("batch_size", int, None, "samples per step"),
        "--compile": ("compile", str, None, "each trial's main-epoch training step under torch.compile: inductor (CUDA "
                      "graphs on GPUs), cudagraphs (GPUs only) or off; the same step to float rounding"),
    },
    "cluster": {
        "--address": ("address", str, None, "an existing Ray cluster: 'auto', host:port or ray://host:port "
                      "(default: start a local one)"),
        "--cpus-per-trial": ("cpus_per_trial", float, None, "CPUs per trial (default: 1 without GPUs, else the "
                             "CPUs per GPU, at most 4)"),
        "--gpus-per-trial": ("gpus_per_trial", float, None, "GPUs per trial, fractions share one (default: 1 when "
                             "Ray sees GPUs, else 0)"),
        "--max-concurrent": ("max_concurrent", int, None, "trials at once (default: as many as resources fit)"),
        "--max-failures": ("max_failures", int, None, "retries of a crashed trial from its last checkpoint"),
    },
    "output": {
        "--storage": ("storage", str, None, "results dir or cloud URI (s3://...) for trials and checkpoints"),
        "--name": ("name", str, None, "search name: the folder under --storage (default: drn-<arch>-<time>)"),
        "--mlflow-uri": ("mlflow_uri", str, None, "MLflow tracking URI, e.g. a server http://127.0.0.1:5000 "
                         "(default: $MLFLOW_TRACKING_URI, else sqlite:///<results dir>/mlflow.db)"),
        "--experiment-name": ("experiment_name", str, None, "MLflow experiment of the search (default: --name)"),
        "--optuna-storage": ("optuna_storage", str, None, "Optuna RDB URL (default: sqlite in the results dir)"),
    },
}


METAVARS = {int: "N", float: "X", str: "S", "--target-flops": "T", "--target-latency-ms": "T",
            "--dataset": "NAME", "--data-dir": "DIR", "--arch": "NAME", "--routing": "NAME",
            "--backbone": "auto|PATH|none", "--space": "YAML", "--scheduler": "MODE", "--compile": "MODE",
            "--address": "ADDR", "--storage": "DIR|URI", "--name": "NAME", "--mlflow-uri": "URI",
            "--experiment-name": "NAME", "--optuna-storage": "URL"}


def parser() -> argparse.ArgumentParser:
    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    p = OneLineParser(prog="drn-search", usage=USAGE, formatter_class=formatter, description="Search the margins and loss weights of dynamic-routing ResNets "
                "(Optuna, trials run by Ray Tune) for the best val accuracy at a compute budget.")
    for title, flags in FLAGS.items():
        g = p.add_argument_group(title)
        for flag, (name, typ, nargs, help_) in flags.items():
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "none" if default in (None, [], "") else default
            if name == "space":
                shown = "spaces/default.yaml"
            elif name == "data_dir":
                shown = str(shown).replace(os.path.expanduser("~"), "~", 1)
            g.add_argument(flag, dest=name, type=typ, nargs=nargs, default=argparse.SUPPRESS, metavar=METAVARS.get(flag, METAVARS[typ]),
                           help=help_ if "(default:" in help_ else f"{help_} (default: {shown})")
        if title == "output":
            g.add_argument("--resume", metavar="NAME", help="continue the search NAME under --storage with its own "
                           "settings: finished trials are kept, unfinished ones go on from their last epoch; with "
                           "--num-samples N, a search extended to N trials (only --address, --storage and "
                           "--num-samples go with --resume)")
            g.add_argument("--json", dest="json", action="store_true", default=argparse.SUPPRESS,
                           help="print the end-of-search summary as one JSON object on stdout (the text goes to "
                                "stderr)")
            g.add_argument("--version", action="version", version=f"drn-search {tracking.version()}")
            g.add_argument("--smoke-test", dest="smoke_test", action="store_true", default=argparse.SUPPRESS,
                           help="a tiny search that finishes in minutes on a laptop CPU: " +
                                ", ".join(f"{k}={v}" for k, v in SMOKE.items()).replace("%", "%%") +
                                " (flags given still win)")
    return p


# exit codes (README, "Operating a search"): 2 is bad input (drn.cli.EXIT_USAGE)
EXIT_INFEASIBLE = 3     # the search ended, and some target has no feasible model
EXIT_FAILED = 4         # the search ended, and some trial failed (its error in the summary)
EXIT_UPLOAD = 5         # the search ended, but the final copy of its files to a cloud --storage failed
EXIT_INTERRUPTED = 130  # Ctrl-C: the state is saved, --resume continues it
EXIT_TERMINATED = 143   # SIGTERM (ray job stop, a scheduler's kill): ends as Ctrl-C does
USAGE = ("drn-search [options]\n       drn-search --resume NAME [--num-samples N] [--json]\n"
         "       drn-search status NAME [--storage URI] [--json]")
RESUME_FLAGS = ("address", "storage", "num_samples", "json")   # what --resume takes: where, how many, how shown


def status_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="drn-search status", formatter_class=formatter,
                      description="A running or finished search, from its files: its driver, trials by state, "
                                  "what is running, the best feasible trial per target and its model URI.")
    p.add_argument("name", metavar="NAME", help="the search's name (its folder under --storage)")
    p.add_argument("--storage", default=SearchConfig.__dataclass_fields__["storage"].default, metavar="DIR|URI",
                   help="where the search was run (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return p


def _log(msg: str) -> None:
    print(f"[drn-search] {msg}", file=sys.stderr, flush=True)


def load_data(cfg: SearchConfig):
    """The images every trial trains on, decoded once here (a torchvision set is downloaded now, and
    unreadable data fails here): the trials get them through Ray's object store."""
    from drn.data import load_dataset
    tc = cfg.train_config(cfg.targets[0])
    return load_dataset(tc.dataset, tc.data_dir, tc.val_fraction, tc.val_seed)


def check_budget(cfg: SearchConfig, data) -> None:
    """Every target must be reachable by the architecture on the dataset's input size: checked on
    the FLOPs table here (latency targets in ms are checked on the trial's device)."""
    from drn.cost import measure_cost_table
    from drn.models import build_model
    cost = measure_cost_table(build_model(cfg.arch, data.num_classes, data.input_size))
    for t in cfg.targets:
        if cfg.target_flops or str(t).endswith("%"):
            resolve_target(t, cost.full, cost.fixed if cfg.target_flops else 0.0,
                           "FLOPs" if cfg.target_flops else "ms")


def load_backbone(cfg: SearchConfig, data) -> dict | None:
    """The --backbone checkpoint, checked here as each trial will load it (arch, dataset, val split):
    a backbone that does not fit is a usage error before anything is written."""
    if cfg.backbone in ("none", "auto"):   # auto: trained (or found in the cache) once Ray is up
        return None
    from drn.checkpoint import load_checkpoint, model_for
    from drn.warmstart import warm_start
    ckpt = load_checkpoint(cfg.backbone)
    tc = cfg.train_config(cfg.targets[0])
    model = model_for(tc, data.num_classes, data.input_size)
    try:
        warm_start(model, cfg.backbone, tc.dataset, data.val_index, ckpt)
    except UsageError as e:   # drn-train's words, for this flag
        raise UsageError(str(e).replace("--init", "--backbone", 1)) from None
    if ckpt["config"].get("routing") != "full":
        raise UsageError(f"--backbone {cfg.backbone} is a {ckpt['config'].get('routing')} network; give a "
                         f"plain one (`drn-train --routing full`)")
    return ckpt


def check_study_free(cfg: SearchConfig) -> None:
    """A new search's studies in a shared --optuna-storage must be its own: a study of that name whose
    trials ran is another search's (joining it would mix their trials). A study holding only enqueued
    trials (parameters given for the first trials) is taken."""
    if cfg.optuna_storage is None:
        return
    import optuna
    from .searcher import studies_by_target
    for target, study in studies_by_target(cfg.optuna_storage, cfg.name, cfg.targets).items():
        if any(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            raise UsageError(f"--optuna-storage already holds a study {study.study_name!r} with trials (another "
                             f"search's?); continue it with --resume {cfg.name}, or pick another --name")


@dataclasses.dataclass
class Prepared:
    """What a search has checked and set up before its first trial."""
    space: object                 # search.space.Space
    data: object                  # drn.data.Dataset, decoded once, for the object store
    backbone: dict | None         # the backbone checkpoint every trial starts from
    init: str | None              # its path
    backbone_info: dict | None
    track: tracking.Tracking
    cpus: float
    gpus: float
    state_copy: str | None        # where our files are kept beside a cloud --storage
    lock: object = None           # the driver lock (search/monitor.py): held while this process runs the search


def prepare(cfg: SearchConfig, resume: bool) -> Prepared:
    """Every check that can fail on bad input (before anything is written), then Ray, MLflow and
    the backbone."""
    from .space import load_space
    from .monitor import claim
    space = load_space(cfg.space)
    results = cfg.results_dir
    if not resume and results.exists():
        raise UsageError(f"search {cfg.name!r} already exists in {results.parent}; "
                         f"continue it with --resume {cfg.name} or pick another --name")
    lock = claim(results, cfg.name) if resume else None   # a second driver on one search is refused
    if not resume:
        state.check_new(cfg.storage, cfg.name)
        check_study_free(cfg)
    data = load_data(cfg)
    check_budget(cfg, data)
    backbone = load_backbone(cfg, data)
    mlflow_target = None if resume else tracking.check(cfg, results)
    cluster = connect(cfg)
    on_sigterm()   # ray.init installs its own SIGTERM handler in the driver, which aborts with a stack dump
    state.check_shared(cfg.address, cfg.storage, mlflow_target[0] if mlflow_target else tracking.resumed(results).uri,
                       state.cluster_machines())
    cpus, gpus = resources(cfg, cluster)
    _log(f"Ray: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; "
         f"each trial {cpus:g} CPU, {gpus:g} GPU")
    if not resume:
        try:   # claimed atomically: of two searches started at once under one name, one goes on
            results.mkdir(parents=True)
        except FileExistsError:
            raise UsageError(f"search {cfg.name!r} was started meanwhile in {results.parent}; pick another "
                             f"--name") from None
        lock = claim(results, cfg.name)
        cfg.save(results / "search.json")
        track = tracking.create(cfg, results, *mlflow_target)
    else:
        if cfg.num_samples != json.loads((results / "search.json").read_text())["num_samples"]:
            cfg.save(results / "search.json")   # extended (--resume NAME --num-samples N)
        track = tracking.resumed(results)
    _log(f"MLflow: experiment {cfg.experiment_name or cfg.name!r} at {track.uri}")
    state_copy = state.state_uri(cfg.storage, cfg.name)   # a cloud --storage: our files survive the head
    state.upload(results, state_copy, _log)
    init, backbone_info = None, None
    if cfg.backbone != "none":
        from .backbone import describe, ensure_backbone, summary_line
        if cfg.backbone == "auto":
            path, backbone, origin = ensure_backbone(cfg, data, cpus, gpus, _log)
            init = str(path)
        else:
            path, origin = cfg.backbone, "given"
        backbone_info = describe(path, backbone, origin)
        track.log_backbone(backbone_info)
        _log(summary_line(backbone_info) + ": every trial starts from it")
    return Prepared(space, data, backbone, init, backbone_info, track, cpus, gpus, state_copy, lock)


def finish(cfg: SearchConfig, p: Prepared, grid, out=sys.stdout) -> tuple[list[dict], dict]:
    """The trials table (Parquet, the cloud copy), MLflow's tags, registry and importance plot, and the
    summary (printed on `out`); returns the trials and the summary object."""
    from .results import summary, summary_object, trial_rows, write_parquet
    from .searcher import studies_by_target
    checkpoints = {}
    for r in grid:
        tid = (r.metrics or {}).get("trial_id")
        if tid and r.checkpoint is not None:
            checkpoints[tid] = f"{r.checkpoint.path.rstrip('/')}/checkpoint.pt"
    studies = studies_by_target(cfg.study_storage, cfg.name, cfg.targets)
    names = [q.name for q in p.space.params]
    rows = trial_rows(list(studies.values()), names, cfg.tolerance, checkpoints)
    write_parquet(rows, cfg.results_dir / "trials.parquet")
    copied = state.upload(cfg.results_dir, p.state_copy, _log) if p.state_copy else None
    models, missing = record_end(cfg, p, rows, studies, names)
    print(summary(rows, cfg.targets, cfg.cost_key, models), file=out)
    for line in missing:
        print(line, file=out)
    if p.backbone_info is not None:
        from .backbone import summary_line
        print("\n" + summary_line(p.backbone_info), file=out)
    uri, url = p.track.uri, tracking.front_url(p.track.uri, p.track.experiment_id)
    if uri.startswith(("http://", "https://")):
        print(f"\nMLflow, the fronts' runs: {url}", file=out)
    else:
        print(f"\nMLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then the fronts' runs: {url}", file=out)
    return rows, {"name": cfg.name, "results_dir": str(cfg.results_dir), "mlflow_uri": uri, "mlflow_url": url,
                  "targets": cfg.targets, "state_copied": copied, "mlflow_missing": missing,
                  **summary_object(rows, cfg.targets, names, models)}


def record_end(cfg: SearchConfig, p: Prepared, rows: list[dict], studies: dict, names: list[str]):
    """MLflow at the search's end, best effort (every result is in trials.parquet already): the runs of
    trials that could not log themselves, from their checkpoints; the tags and the registry; the
    importance plot. Returns the registered models (None when MLflow failed) and what MLflow lacks."""
    try:
        missing = p.track.complete(rows, {**p.space.fixed, **dict.fromkeys(names)}, p.data)
        models = p.track.update(rows, cfg.results_dir / "trials.parquet", cfg.targets, cfg.cost_key)   # and the registry
    except Exception as e:
        return None, [f"MLflow at {p.track.uri} did not take the search's end ({brief(e)}); every result is "
                      f"in trials.parquet, and `drn-search --resume {cfg.name}` records it once MLflow is back"]
    try:
        p.track.log_importance(studies)
    except Exception as e:   # a figure, not a result: the search's end does not hang on it
        _log(f"warning: no parameter-importance plot: {brief(e)}")
    return models, missing


@dataclasses.dataclass
class Outcome:
    """What a search ended with (`run_search`; drn-search --json prints `summary` with `exit_code`)."""
    rows: list[dict]      # one per trial, as in trials.parquet
    summary: dict         # the summary object: trials by state, best per target with its URIs, fronts
    complete: bool        # every trial ended (False: interrupted; --resume continues it)
    exit_code: int        # drn-search's: 0, EXIT_INFEASIBLE, EXIT_FAILED, EXIT_UPLOAD or EXIT_INTERRUPTED


def exit_code(rows: list[dict], targets: list[str], complete: bool, copied: bool | None = None) -> int:
    """0 only when the search ended with a feasible model at every target and no trial failed (and the
    copy of its files under a cloud --storage, where there is one, was made)."""
    if not complete:
        return EXIT_INTERRUPTED
    if copied is False:
        return EXIT_UPLOAD
    if any(r["state"] == "FAIL" for r in rows):
        return EXIT_FAILED
    from .results import best_feasible
    return EXIT_INFEASIBLE if any(best_feasible(rows, t) is None for t in targets) else 0


def run_search(cfg: SearchConfig, resume: bool = False, out=sys.stdout) -> Outcome:
    """Run (or resume) the search, and print its summary on `out`. An interrupt (Ctrl-C, SIGTERM) is an
    early return of Tune's fit(): the trials so far are summarised and kept for --resume."""
    tune_settings(cfg)
    p = prepare(cfg, resume)
    tuner = make_tuner(cfg, resume, p)
    t0 = time.time()
    grid = tuner.fit()
    rows, obj = finish(cfg, p, grid, out)
    ended = sum(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    complete = ended >= cfg.num_samples
    if not complete:
        _log(f"interrupted after {time.time() - t0:.0f}s with {ended}/{cfg.num_samples} trials ended; "
             f"continue with: drn-search --resume {cfg.name} --storage {cfg.storage}")
    else:
        _log(f"done in {time.time() - t0:.0f}s; trials: {cfg.results_dir / 'trials.parquet'}; "
             f"checkpoints under {cfg.storage.rstrip('/')}/{cfg.name}")
    code = exit_code(rows, cfg.targets, complete, obj["state_copied"])
    return Outcome(rows, {**obj, "complete": complete, "exit_code": code}, complete, code)


def resumed_config(name: str, args: dict) -> SearchConfig:
    """--resume NAME: the search's saved settings; only where Ray runs, --storage and a larger
    --num-samples (an extended search) may be given with it: any other flag is refused, not ignored."""
    flag = {f[0]: k for group in FLAGS.values() for k, f in group.items()} | {"smoke_test": "--smoke-test"}
    other = [flag.get(k, k) for k in args if k not in RESUME_FLAGS]
    if other:
        raise UsageError(f"--resume {name} continues the search with its own settings: {other[0]} cannot change "
                         f"them (with --resume give only --address, --storage or --num-samples)")
    cfg = SearchConfig.resumed(name, {k: args[k] for k in ("address", "storage") if k in args})
    n = args.get("num_samples", cfg.num_samples)
    if n < cfg.num_samples:
        raise UsageError(f"--num-samples {n}: search {name!r} has {cfg.num_samples} trials planned already; "
                         f"a resumed search can grow, not shrink")
    if n > cfg.num_samples and str(cfg.address).startswith("ray://"):   # Tune's driver is then a remote actor
        raise UsageError(f"--num-samples cannot extend a search through Ray Client ({cfg.address}): resume it "
                         f"on the cluster's head (--address auto)")
    cfg.num_samples = n
    return cfg


def on_sigterm() -> None:
    """SIGTERM ends the search as Ctrl-C does (see _terminate_as_interrupt); from the main thread only
    (Python's rule for signal handlers: the Python API may run a search in another thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM ends the search as Ctrl-C does (Tune saves its state and returns, the summary is
    printed): it is handed on as SIGINT, to Tune's handler while trials run."""
    global _terminated
    _terminated = True
    os.kill(os.getpid(), signal.SIGINT)


_terminated = False


def status_main(argv: list[str]) -> int:
    from .monitor import read, text
    args = status_parser().parse_args(argv)
    try:
        s = read(args.name, args.storage)
    except UsageError as e:
        print(f"drn-search status: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(s) if args.json else text(s))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    args = vars(parser().parse_args(argv))
    resume, as_json = args.pop("resume"), "json" in args
    on_sigterm()
    outcome, cfg = None, None
    try:
        cfg = resumed_config(resume, args) if resume else SearchConfig.from_flags(
            {k: v for k, v in args.items() if k != "json"})
        outcome = run_search(cfg, resume=bool(resume), out=sys.stderr if as_json else sys.stdout)
    except UsageError as e:
        print(f"drn-search: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:   # Ctrl-C before Tune runs (once it runs, Tune stops on it and returns)
        pass
    finally:
        if "ray" in sys.modules:
            import ray
            if ray.is_initialized():
                ray.shutdown()
    code = outcome.exit_code if outcome is not None else EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED and _terminated:
        code = EXIT_TERMINATED
    if as_json and outcome is not None:
        print(json.dumps({**outcome.summary, "exit_code": code}))
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        why = "terminated (SIGTERM)" if _terminated else "interrupted"
        how = (f"continue with: drn-search --resume {cfg.name} --storage {cfg.storage}"
               if cfg is not None and cfg.results_dir.exists() else "see --resume")
        print(f"drn-search: {why}; what ran so far is kept ({how})", file=sys.stderr)
    elif code == EXIT_UPLOAD:
        print("drn-search: the search's files were not copied to --storage (see the line above); a new head "
              "could not resume it from there", file=sys.stderr)
    elif code == EXIT_FAILED:
        print("drn-search: some trials failed (their errors are in the summary)", file=sys.stderr)
    elif code == EXIT_INFEASIBLE:
        print("drn-search: no feasible model at some target (see the summary; more --num-samples with --resume, "
              "or a wider --tolerance)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
