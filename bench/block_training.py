"""How far each block's weights moved in training: does a block its router skips ever train?
(docs/notes/2026-12-02-static-routes.md, "From scratch the routers never leave their start route: a skipped
block never trains")

For each checkpoint, ||W - W0|| / ||W0|| over the two 3x3 convolutions of every residual block,
W0 being the run's start: the initial weights re-drawn from the run's seed (`torch.manual_seed`,
then `drn.checkpoint.model_for`, as `drn.train.Trainer` does), or, for a warm start, the plain network it was
initialised from (`--init`). A block that no image ran moved by weight decay alone.

    python bench/block_training.py bench/runs/fidelity/resnet20-scratch-drn-30-s0/checkpoint.pt ...
"""
import sys

import torch

from drn.checkpoint import load_checkpoint, model_for
from drn.config import TrainConfig


def start_weights(ckpt: dict) -> dict:
    cfg = ckpt["config"]
    if cfg.get("init"):
        return load_checkpoint(cfg["init"])["model"]
    torch.manual_seed(cfg["seed"])
    return model_for(TrainConfig.from_dict(cfg), ckpt["num_classes"], ckpt["input_size"]).state_dict()


def moved(ckpt: dict) -> list[float]:
    w0, w = start_weights(ckpt), ckpt["model"]
    out = []
    for b in range(sum(1 for k in w if k.endswith(".residual.0.weight"))):
        keys = [f"blocks.{b}.residual.0.weight", f"blocks.{b}.residual.3.weight"]
        num = sum(((w[k] - w0[k]) ** 2).sum() for k in keys) ** 0.5
        den = sum((w0[k] ** 2).sum() for k in keys) ** 0.5
        out.append((num / den).item())
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(path, " ".join(f"{b}:{m:.2f}" for b, m in enumerate(moved(load_checkpoint(path)))))
