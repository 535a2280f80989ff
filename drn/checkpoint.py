"""Checkpoints: written atomically (a crash never leaves half a file), read with
weights_only=True (no unpickling of arbitrary objects), recognised by a format tag."""
import os
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig, UsageError
from .models import RoutedResNet, build_model

FORMAT = "drn-checkpoint"
VERSION = 2   # 2: val split indices (val_index), test metrics, init_info


def temp_beside(path: Path) -> Path:
    """A temporary name in `path`'s folder that no other writer of `path` uses (two processes saving
    one file each write their own, and the last rename wins whole)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    tmp = temp_beside(path)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled foreign objects...
        raise UsageError(f"checkpoint {path} is corrupt or not a drn checkpoint "
                         f"({type(e).__name__}); retrain, or point at another checkpoint.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} is not a drn checkpoint (written by drn-train?)")
    if ckpt.get("version") != VERSION:
        raise UsageError(f"checkpoint {path} has version {ckpt.get('version')}, this drn reads {VERSION}")
    return ckpt


def model_for(cfg: TrainConfig, num_classes: int, input_size: int) -> RoutedResNet:
    """The network a training config describes (its static route's k already resolved)."""
    from .baselines import route_of
    return build_model(cfg.arch, num_classes, input_size, beta=cfg.beta, router_hidden=cfg.router_hidden,
                       leak=cfg.router_leak, router_open=cfg.router_open, router_norm=cfg.router_norm,
                       route_transitions=cfg.route_transitions, static_route=route_of(cfg),
                       zero_init_residual=cfg.zero_init_residual, drop_path=cfg.drop_path)


def model_from_checkpoint(ckpt: dict) -> tuple[RoutedResNet, TrainConfig]:
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = model_for(cfg, ckpt["num_classes"], ckpt["input_size"])
    state = dict(ckpt["model"])
    state.setdefault("threshold", torch.tensor(0.5))  # checkpoints written before calibration existed
    # checkpoints written before routing="capacity" lack the routers' capacities: the model keeps 1 (the whole batch)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"checkpoint weights do not fit {cfg.arch}: {str(e).splitlines()[0]}") from None
    return model, cfg
