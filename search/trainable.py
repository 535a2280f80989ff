"""One search trial = one drn training (drn.train.Trainer), run by Ray Tune.

Every epoch the trial reports its metrics and hands Tune the trainer's checkpoint; a trial that
Tune restarts (node lost, driver resumed) continues from that checkpoint, bit for bit. A trial
whose loss diverges reports `diverged` and ends: retrying it would diverge again, so it is not an
error for Tune's retry logic, and the searcher marks it FAIL.
"""
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from drn.config import TrainConfig, is_number
from drn.train import CHECKPOINT, Trainer

from .config import brief
from .tracking import Tracking, TrialRun, use_login

# keys of the trial config that are not TrainConfig fields
META = ("target", "optuna_trial")


def scalar_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class BestEffort:
    """A trial's MLflow logging that never fails the trial: an MLflow that does not answer costs the
    trial its log lines, not its training. `missing` says something was not logged; the driver logs
    it at the search's end from the trial's checkpoint (tracking.Tracking.backfill)."""

    def __init__(self, track: Tracking, trial: int, target: str, params: dict):
        self.args, self.run, self.missing = (track, trial, target, params), None, False
        self._try("its run", lambda: None)   # the run exists from the start, also for a trial that fails

    def _try(self, what: str, log):
        try:
            if self.run is None:
                self.run = TrialRun(*self.args)
            return log()
        except Exception as e:   # MLflow's own errors, requests', sqlite's: a log line is not worth a trial
            if not self.missing:
                print(f"trial {self.args[1]}: MLflow did not take {what} ({brief(e)}); logged from its checkpoint "
                      f"at the end",
                      file=sys.stderr, flush=True)
            self.missing = True
            return None

    def report(self, metrics: dict, step: int, trainer=None) -> str | None:
        return self._try(f"epoch {step}", lambda: self.run.report(metrics, step, trainer))


def run_trial(config: dict, base: dict, data, backbone: dict | None = None,
              login: tuple[str, str] | None = None) -> None:
    """`base`: TrainConfig fields shared by every trial, plus `target_key` (target_flops or
    target_latency_ms) and `threads`; `config`: what the searcher sampled, plus META; `data`: the
    images (drn.data.Dataset), decoded once by the driver; `backbone`: the checkpoint at base's
    `init`, loaded once by the driver (both from Ray's object store). Besides the trainer's metrics
    each report carries where the trial's own time went: `setup_seconds` (config, model, cost table,
    warm start, MLflow run) and, at the end, `export_seconds` (the logged model and artifacts)."""
    t_entry = time.perf_counter()
    base = dict(base)
    target_key, threads = base.pop("target_key"), base.pop("threads")
    use_login(login)   # the search's MLflow user (tracking.trial_login), in this process alone
    track = Tracking(**base.pop("tracking")) if base.get("tracking") else None
    base.pop("tracking", None)
    torch.set_num_threads(max(1, int(threads)))
    params = {k: v for k, v in config.items() if k not in META}
    # the trainer's own folder, outside Tune's trial dir: Tune copies that dir to the storage while the
    # trainer rewrites its checkpoint (checkpoint.pt.tmp -> checkpoint.pt), and a file that vanishes
    # mid-copy failed the experiment state's save; Tune gets each epoch's checkpoint by tune.report
    out = Path(tempfile.mkdtemp(prefix=f"drn-trial-{config['optuna_trial']}-"))
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / CHECKPOINT, out / CHECKPOINT)
        resume = True
    cfg = TrainConfig.from_dict({**base, **params, target_key: config["target"], "out": str(out)})
    trainer = Trainer(cfg, data=data, resume=resume, log=lambda s: None, init_checkpoint=backbone)
    cost_key = "latency_ms" if target_key == "target_latency_ms" else "flops"
    start_epoch = trainer.epoch   # > 0 when Tune restarted the trial (node lost, driver resumed)
    node = ray.get_runtime_context().get_node_id()
    mlflow = BestEffort(track, config["optuna_trial"], config["target"], {**params, "seed": cfg.seed}) if track else None
    setup = time.perf_counter() - t_entry

    def report(m: dict) -> None:
        m = scalar_metrics(m)
        m.update(target_cost=trainer.target, optuna_trial=config["optuna_trial"],
                 rel_error=m[cost_key] / trainer.target - 1, done=float(trainer.epoch >= cfg.total_epochs),
                 checkpoint_epoch=trainer.epoch, setup_seconds=setup)
        if mlflow is not None:
            final = trainer.epoch >= cfg.total_epochs   # finished: the model, before Tune hears the end
            t0 = time.perf_counter()
            uri = mlflow.report({k: v for k, v in m.items() if is_number(v)}, int(trainer.epoch),
                                trainer if final else None)
            if final:
                m["export_seconds"] = time.perf_counter() - t0
                if uri is not None:
                    m["model_uri"] = uri   # kept by the study: `drn-search status` names it without MLflow
                m["mlflow_missing"] = float(mlflow.missing)   # the driver logs it from the checkpoint
        m.update(start_epoch=start_epoch, node_id=node)  # where this attempt ran, and from which epoch
        tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(out)))

    try:
        if resume and trainer.epoch >= cfg.total_epochs:  # finished, but its last report was lost
            report(trainer.final_metrics())
        else:
            trainer.run(on_epoch=report)
    except FloatingPointError as e:
        tune.report({"diverged": 1.0, "error": str(e), "epoch": float(trainer.epoch + 1), "accuracy": 0.0,
                     cost_key: math.nan, "target_cost": trainer.target, "optuna_trial": config["optuna_trial"]})
    finally:   # every epoch's checkpoint is in Tune's storage by now (tune.report persists it)
        shutil.rmtree(out, ignore_errors=True)
