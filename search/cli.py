"""drn-search: find the routed ResNet with the best accuracy at a compute budget.

Bad input (flags, space file, data, Ray address, resources): one line on stderr, exit 2, nothing
written. Everything else of a search lives in <storage>/<name>/ (see README, "Results").
"""
import argparse
import dataclasses
import os
import sys
import time

from drn.cli import EXIT_USAGE, OneLineParser, formatter
from drn.config import UsageError, resolve_target

from . import state, tracking
from .config import SMOKE, SearchConfig
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
    p = OneLineParser(prog="drn-search", usage="drn-search [options]", formatter_class=formatter, description="Search the margins and loss weights of dynamic-routing ResNets "
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
            g.add_argument("--resume", metavar="NAME", help="continue the interrupted search NAME under --storage "
                           "with its own settings: finished trials are kept, unfinished ones go on from their last "
                           "epoch")
            g.add_argument("--smoke-test", dest="smoke_test", action="store_true", default=argparse.SUPPRESS,
                           help="a tiny search that finishes in minutes on a laptop CPU: " +
                                ", ".join(f"{k}={v}" for k, v in SMOKE.items()).replace("%", "%%") +
                                " (flags given still win)")
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


def prepare(cfg: SearchConfig, resume: bool) -> Prepared:
    """Every check that can fail on bad input (before anything is written), then Ray, MLflow and
    the backbone."""
    from .space import load_space
    space = load_space(cfg.space)
    results = cfg.results_dir
    if not resume and results.exists():
        raise UsageError(f"search {cfg.name!r} already exists in {results.parent}; "
                         f"continue it with --resume {cfg.name} or pick another --name")
    if not resume:
        state.check_new(cfg.storage, cfg.name)
    data = load_data(cfg)
    check_budget(cfg, data)
    backbone = load_backbone(cfg, data)
    mlflow_target = None if resume else tracking.check(cfg, results)
    cluster = connect(cfg)
    state.check_shared(cfg.address, cfg.storage, mlflow_target[0] if mlflow_target else tracking.resumed(results).uri,
                       state.cluster_machines())
    cpus, gpus = resources(cfg, cluster)
    _log(f"Ray: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; "
         f"each trial {cpus:g} CPU, {gpus:g} GPU")
    results.mkdir(parents=True, exist_ok=True)
    if not resume:
        cfg.save(results / "search.json")
        track = tracking.create(cfg, results, *mlflow_target)
    else:
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
    return Prepared(space, data, backbone, init, backbone_info, track, cpus, gpus, state_copy)


def finish(cfg: SearchConfig, p: Prepared, grid) -> list[dict]:
    """The trials table (Parquet, the cloud copy), MLflow's tags and registry, and the summary."""
    from .results import summary, trial_rows, write_parquet
    from .searcher import load_studies
    checkpoints = {}
    for r in grid:
        tid = (r.metrics or {}).get("trial_id")
        if tid and r.checkpoint is not None:
            checkpoints[tid] = f"{r.checkpoint.path.rstrip('/')}/checkpoint.pt"
    studies = load_studies(cfg.study_storage, cfg.name, cfg.targets)
    rows = trial_rows(studies, [q.name for q in p.space.params], cfg.tolerance, checkpoints)
    write_parquet(rows, cfg.results_dir / "trials.parquet")
    state.upload(cfg.results_dir, p.state_copy, _log)
    models = p.track.update(rows, cfg.results_dir / "trials.parquet", cfg.targets, cfg.cost_key)   # and the registry
    print(summary(rows, cfg.targets, cfg.cost_key, models))
    if p.backbone_info is not None:
        from .backbone import summary_line
        print("\n" + summary_line(p.backbone_info))
    uri, url = p.track.uri, tracking.front_url(p.track.uri, p.track.experiment_id)
    if uri.startswith(("http://", "https://")):
        print(f"\nMLflow, the fronts' runs: {url}")
    else:
        print(f"\nMLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then the fronts' runs: {url}")
    return rows


def run_search(cfg: SearchConfig, resume: bool = False) -> tuple[list[dict], bool]:
    """Run (or resume) the search; returns its trials and whether every one of them has ended
    (False: interrupted, e.g. by Ctrl-C, which Tune turns into an early return of fit())."""
    tune_settings(cfg)
    p = prepare(cfg, resume)
    tuner = make_tuner(cfg, resume, p)
    t0 = time.time()
    grid = tuner.fit()
    rows = finish(cfg, p, grid)
    ended = sum(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    if ended < cfg.num_samples:
        _log(f"interrupted after {time.time() - t0:.0f}s with {ended}/{cfg.num_samples} trials ended; "
             f"continue with: drn-search --resume {cfg.name} --storage {cfg.storage}")
        return rows, False
    _log(f"done in {time.time() - t0:.0f}s; trials: {cfg.results_dir / 'trials.parquet'}; "
         f"checkpoints under {cfg.storage.rstrip('/')}/{cfg.name}")
    return rows, True


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    resume = args.pop("resume")
    try:
        if resume:
            # a resumed search keeps its settings; where Ray runs may change
            cfg = SearchConfig.resumed(resume, {k: args[k] for k in ("address", "storage") if k in args})
        else:
            cfg = SearchConfig.from_flags(args)
        _, complete = run_search(cfg, resume=bool(resume))
    except UsageError as e:
        print(f"drn-search: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:   # Ctrl-C before Tune runs (once it runs, Tune stops on it and returns)
        complete = False
    finally:
        if "ray" in sys.modules:
            import ray
            if ray.is_initialized():
                ray.shutdown()
    if not complete:
        print("drn-search: interrupted (trials and checkpoints so far are kept; see --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
