"""Ray and Ray Tune for a search: join or start Ray (a clear error where it cannot be reached), the
trials' resources from what Ray sees, Tune's environment, and the Tuner (new, or the interrupted
one restored)."""
import dataclasses
import logging
import os
import socket

from drn.config import UsageError

from .config import SearchConfig


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ray.init retries an unreachable host:port for ever: try a TCP connection first."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--address {address!r}: give 'auto', host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def connect(cfg: SearchConfig) -> dict:
    """Start or join Ray; return its resources. An unreachable address is a usage error."""
    import ray
    if cfg.address not in (None, "auto"):
        check_reachable(cfg.address)
    # "token authentication is enabled": it stays on (README, "Run on a cluster"); not news per run
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # no runtime env: Ray logs and shows it; the trials' MLflow login travels in the object store
    # (tracking.trial_login, handed to each trial by tune.with_parameters)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    try:
        if cfg.address is None:   # "local": a Ray of its own, not whatever cluster this machine last started
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=cfg.address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot reach Ray at {cfg.address}: {why}") from None
    return ray.cluster_resources()


def max_pending_trials(num_samples: int, max_concurrent: int | None) -> int:
    """Trials Tune keeps waiting for resources at once (TUNE_MAX_PENDING_TRIALS_PG): the autoscaler
    starts a node for each, so a cluster grows by up to --max-concurrent nodes at once. Without it,
    one (Tune's own default for a searcher like ours): each waiting trial is an Optuna suggestion
    made before the running trials report, so none is asked further ahead than it may run."""
    return max(1, min(num_samples, max_concurrent or 1))


def resources(cfg: SearchConfig, cluster: dict) -> tuple[float, float]:
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    g = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    if g > 0 and gpus == 0:
        raise UsageError(f"--gpus-per-trial {g:g} asked for, but the Ray cluster has no GPUs "
                         f"(it has {cpus:g} CPUs); use --gpus-per-trial 0")
    if g > gpus:
        raise UsageError(f"--gpus-per-trial {g:g} is more than the cluster's {gpus:g} GPUs")
    if cfg.compile == "cudagraphs" and g == 0:
        raise UsageError("--compile cudagraphs needs GPUs, and the trials get none; use --compile inductor or off")
    c = cfg.cpus_per_trial if cfg.cpus_per_trial is not None else (
        1.0 if g == 0 else max(1.0, min(4.0, cpus // max(gpus / g, 1))))
    if c > cpus:
        raise UsageError(f"--cpus-per-trial {c:g} is more than the cluster's {cpus:g} CPUs")
    return c, g


def _trial_dirname(trial) -> str:
    return f"trial-{trial.config.get('optuna_trial', 'x')}-{trial.trial_id}"


def tune_settings(cfg: SearchConfig) -> None:
    """Tune's environment for a search (set before Ray Tune is imported; a user's own values win)."""
    # Tune's warning that per-epoch checkpoints snapshot its state often: that is the intent here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # a trial's error is one line from Progress (with the path of its traceback), not Tune's traceback
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # the experiment state (which trials ended, their checkpoints) saved every 2 s, not Tune's
    # adaptive >= 10 s: a killed driver loses at most 2 s of it, so --resume re-runs nothing finished
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # waiting trials are what the autoscaler adds nodes for: up to --max-concurrent at once
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max_pending_trials(cfg.num_samples, cfg.max_concurrent)))
    # Tune's console output engine prints an experiment banner and a TensorBoard hint even at verbose 0;
    # the search reports its own progress lines (search/progress.py)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def make_tuner(cfg: SearchConfig, resume: bool, p):
    """A new Tuner (our searcher, one ASHA per target), or the interrupted one restored; p: the
    search's cli.Prepared."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .progress import Progress
    from .scheduler import PerTargetASHA, restore_scheduler
    from .state import SCHEDULER_STATE
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import Extendable, OptunaSearcher
    from .tracking import trial_login
    from .trainable import run_trial

    base = {**cfg.train_config(cfg.targets[0], device="cuda" if p.gpus > 0 else "cpu", init=p.init).to_dict(),
            "target_key": cfg.target_key, "threads": max(1, int(p.cpus)), "tracking": dataclasses.asdict(p.track)}
    for k in ("target_flops", "target_latency_ms", "out"):
        base.pop(k)
    # the images, the backbone and the trials' MLflow login go into Ray's object store once; each trial
    # reads them from there
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, data=p.data, backbone=p.backbone,
                                                         login=trial_login(p.track)),
                                    {"cpu": p.cpus, "gpu": p.gpus})
    progress = Progress(cfg.study_storage, cfg.name, [q.name for q in p.space.params], cfg.tolerance,
                        str(cfg.results_dir / "trials.parquet"), cfg.num_samples, cfg.total_epochs, cfg.cost_key,
                        dataclasses.asdict(p.track), cfg.targets, cfg.max_failures, p.state_copy)
    experiment = cfg.storage.rstrip("/") + "/" + cfg.name
    # a search stopped before its first trial (in the backbone's training, say) starts its Tuner now
    if resume and tune.Tuner.can_restore(experiment):
        # errored trials stay ERROR (Optuna was told FAIL): only the interrupted ones go on
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        # Tuner.restore takes no callbacks nor searcher (ray-project/ray#41364): it unpickles the first
        # driver's, with the paths of that head's results dir (./drn-results of where it ran). Ours replace
        # them: this run's Progress, and the study this run's results dir holds (an --optuna-storage RDB
        # is the same URL). Under Ray Client the driver is an actor that unpickled them itself
        restored = tuner._local_tuner   # private, but ray is pinned (2.60) and tests/test_search_state.py runs it
        if restored is not None:
            run_config = restored.get_run_config()
            run_config.callbacks = [progress if isinstance(c, Progress) else c for c in run_config.callbacks]
            tc = restored._tune_config
            tc.search_alg.storage, tc.search_alg.num_samples = cfg.study_storage, cfg.num_samples
            # Tune restores the trial count it was given with its saved state: a search extended with
            # --num-samples runs its new trials through a generator that takes the larger count
            limited = (ConcurrencyLimiter(tc.search_alg, tc.max_concurrent_trials) if tc.max_concurrent_trials
                       else tc.search_alg)
            tc.search_alg, tc.num_samples = Extendable(limited, cfg.num_samples), cfg.num_samples
            tc.max_concurrent_trials = None   # the limiter is inside the generator
            if isinstance(tc.scheduler, PerTargetASHA):   # its rungs, from their JSON (tuner.pkl has the start's)
                restore_scheduler(tc.scheduler, cfg.results_dir / SCHEDULER_STATE)
        return tuner
    searcher = OptunaSearcher(p.space, cfg.targets, cfg.name, cfg.study_storage, cfg.tolerance,
                              cfg.total_epochs, cfg.cost_key, cfg.seed, dataset=cfg.dataset,
                              num_samples=cfg.num_samples)
    # auto = asha: one ASHA per target, a trial competes only with its own budget's trials, the feasible
    # ones first, and stops only when it trails by more than the val split's noise (search/scheduler.py)
    scheduler = (PerTargetASHA(cfg.targets, tolerance=cfg.tolerance, cost_key=cfg.cost_key,
                               state_path=str(cfg.results_dir / SCHEDULER_STATE),
                               time_attr="training_iteration", max_t=cfg.total_epochs,
                               grace_period=cfg.grace_period or max(1, cfg.total_epochs // 4),
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler in ("asha", "auto") else FIFOScheduler())
    # reuse_actors: a trial after the first on a worker skips the new process, its imports and MLflow's
    # package scan (BENCHMARKS.md, "Worker reuse"); a trial that does not end within Tune's 2 s gets a
    # fresh worker, so nothing of a stopped trial runs on beside the next
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric="accuracy", mode="max",
                                    num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent,
                                    trial_dirname_creator=_trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=cfg.storage, verbose=0, callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
