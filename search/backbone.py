"""One backbone per search: the plain network of --arch, trained once and cached, that
every trial starts from (drn-train's --init).

`--backbone auto` trains it as a Ray task the first time a (arch, dataset, schedule, seed, val
split) needs it -- with one trial's resources on GPUs, with every CPU of a node without (nothing
else runs until it is done) -- and keeps it under <storage>/backbones/<arch>-<dataset>-<key>/
checkpoint.pt; later searches and `--resume` find it there. With a cloud --storage (s3://...) it is
uploaded there too, so a new head finds it. A cache that cannot be read is trained again, with a
one-line note. Each finished epoch is kept beside it (partial.pt, also in the cloud copy): a training
stopped by Ctrl-C, a crash or a lost node goes on from there at `--resume` (or at the next search that
needs it). Two searches on one machine that need one backbone train it once: the second waits.
"""
import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path

from drn.checkpoint import load_checkpoint, save_checkpoint, temp_beside
from drn.config import TrainConfig, UsageError

from .cloud import fetch, publish, remove
from .config import SearchConfig, is_uri, results_root

KEY_VERSION = 1   # bump when what a backbone is trained with changes meaning


def backbone_config(cfg: SearchConfig, device: str = "cpu") -> TrainConfig:
    """The plain network's training: the search's arch, data, batch, seed and val split."""
    base = cfg.train_config(cfg.targets[0], device=device)
    return TrainConfig(arch=cfg.arch, dataset=cfg.dataset, data_dir=cfg.data_dir, routing="full",
                       epochs=cfg.backbone_epochs, finetune_epochs=0, batch_size=cfg.batch_size, seed=cfg.seed,
                       val_fraction=base.val_fraction, val_seed=base.val_seed, device=device)


def backbone_key(cfg: SearchConfig) -> str:
    tc = backbone_config(cfg)
    what = {"v": KEY_VERSION, "arch": tc.arch, "dataset": tc.dataset, "data_dir": tc.data_dir, "epochs": tc.epochs,
            "batch_size": tc.batch_size, "seed": tc.seed, "val_fraction": tc.val_fraction, "val_seed": tc.val_seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _relpath(cfg: SearchConfig) -> str:
    return f"backbones/{cfg.arch}-{cfg.dataset}-{backbone_key(cfg)}/checkpoint.pt"


def backbone_path(cfg: SearchConfig) -> Path:
    """The local cache: under --storage, or under ./drn-results beside a cloud --storage's copy."""
    return results_root(cfg.storage) / _relpath(cfg)


def backbone_uri(cfg: SearchConfig) -> str | None:
    """A cloud --storage's copy (what a new head finds), or None for a local --storage."""
    return f"{cfg.storage.rstrip('/')}/{_relpath(cfg)}" if is_uri(cfg.storage) else None


def _cached(path: Path, epochs: int, log) -> dict | None:
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path)
    except UsageError:
        log(f"backbone cache {path} is corrupt: training it again")
        return None
    if ckpt.get("epoch") != epochs or ckpt["config"].get("routing") != "full":
        log(f"backbone cache {path} is unfinished or not a plain network: training it again")
        return None
    return ckpt


PARTIAL = "partial.pt"   # beside the cache's checkpoint.pt: the training's last finished epoch


def _train(tc_dict: dict, data, queue, threads: int, partial: str) -> dict:
    """In a Ray task: train the plain network, going on from `partial` (a path, or a cloud URI) where a
    stopped training left it, and saving each finished epoch there; every epoch's line goes to the
    driver through `queue`."""
    import shutil
    import tempfile

    import torch
    from drn.train import CHECKPOINT, Trainer
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        ckpt = Path(out) / CHECKPOINT
        resume = fetch(partial, ckpt) if is_uri(partial) else Path(partial).is_file() and bool(
            shutil.copyfile(partial, ckpt))
        if resume:
            try:
                load_checkpoint(ckpt)
            except UsageError:   # a copy cut short: start again
                resume = False
        tc = TrainConfig.from_dict({**tc_dict, "out": out})
        trainer = Trainer(tc, data=data, resume=resume, log=lambda s: queue.put(s))
        if resume:
            queue.put(f"going on from epoch {trainer.epoch}, where a stopped training left it")

        def keep(_metrics) -> None:   # the epoch's checkpoint, saved by now, outlives this task
            if is_uri(partial):
                publish(partial.rsplit("/", 1)[0], [ckpt], [PARTIAL])
            else:
                tmp = temp_beside(Path(partial))
                shutil.copyfile(ckpt, tmp)
                tmp.replace(partial)
        trainer.run(on_epoch=keep)
        return trainer.state()


@contextlib.contextmanager
def cache_lock(folder: Path, log):
    """One trainer per cached backbone on this machine: a second search that needs the same one waits
    for the first, then finds it in the cache."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"backbone: another search is training it; waiting for {folder}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_backbone(cfg: SearchConfig, data, cpus: float, gpus: float, log) -> tuple[Path, dict, str]:
    """The cached backbone of this search, trained now if it is not cached yet (going on from the epoch
    where a stopped training left it); and which of the two."""
    with cache_lock(backbone_path(cfg).parent, log):
        return _ensure(cfg, data, cpus, gpus, log)


def _ensure(cfg: SearchConfig, data, cpus: float, gpus: float, log) -> tuple[Path, dict, str]:
    path, uri = backbone_path(cfg), backbone_uri(cfg)
    if uri is not None and not path.is_file() and fetch(uri, path):
        log(f"backbone: fetched {uri}")
    ckpt = _cached(path, cfg.backbone_epochs, log)
    if ckpt is not None:
        log(f"backbone: reusing {uri or path}")
        return path, ckpt, "cached"
    import ray
    from ray.util.queue import Queue
    if gpus == 0:   # nothing else runs until it is done: every CPU of the largest node
        cpus = max([cpus] + [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")])
    tc = backbone_config(cfg, device="cuda" if gpus > 0 else "cpu")
    log(f"backbone: training the plain {cfg.arch} for {cfg.backbone_epochs} epochs on {cpus:g} CPU, {gpus:g} GPU "
        f"(once; cached in {uri or path.parent})")
    queue = Queue()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_train)
    partial = f"{uri.rsplit('/', 1)[0]}/{PARTIAL}" if uri else str(path.with_name(PARTIAL))
    ref = task.remote(tc.to_dict(), data, queue, max(1, int(cpus)), partial)
    t0 = time.time()
    while True:
        done, _ = ray.wait([ref], timeout=2.0)
        while not queue.empty():
            log(f"backbone: {queue.get()}")
        if done:
            break
    ckpt = ray.get(ref)
    ckpt["history"][-1]["backbone_seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, ckpt)   # atomic: a crash leaves no half-written cache
    if uri is not None:
        publish(uri.rsplit("/", 1)[0], [path])   # path and uri end in the same checkpoint.pt
    path.with_name(PARTIAL).unlink(missing_ok=True)
    if uri is not None:
        remove(partial)
    log(f"backbone: done in {time.time() - t0:.0f}s, val accuracy {ckpt['history'][-1]['accuracy']:.2%}")
    return path, ckpt, "trained"


def describe(path, ckpt: dict, origin: str) -> dict:
    """What the summary and MLflow say of a backbone. origin: trained (now), cached (reused) or given (PATH)."""
    last = (ckpt.get("history") or [{}])[-1]
    return {"path": str(path), "origin": origin, "epochs": ckpt.get("epoch"), "val_accuracy": last.get("accuracy"),
            "test_accuracy": (ckpt.get("test") or {}).get("test_accuracy"), "seconds": last.get("backbone_seconds")}


def summary_line(info: dict) -> str:
    pct = lambda v: f"{v:.2%}" if isinstance(v, float) else "-"
    took = f", trained in {info['seconds']:.0f}s" if info["origin"] == "trained" and info.get("seconds") else ""
    return (f"backbone ({info['origin']}): {info['path']}, {info['epochs']} epochs, val acc {pct(info['val_accuracy'])}, "
            f"test acc {pct(info['test_accuracy'])}{took}")
