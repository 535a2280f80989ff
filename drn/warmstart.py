"""Warm start (`--init`): a routed network begins from a trained plain one; its routers are new.

BlockDrop and SkipNet start their routers from a pretrained ResNet: the blocks already compute
something useful, so a router that skips one sees what that costs from the first step, instead
of judging blocks that are still noise (and closing them for good).

Accepted:
    a drn checkpoint of the same arch, dataset and val split -- normally `drn-train --routing full`
    (the plain network) -- every weight but the routers' is copied; routers keep their fresh
    initialisation (open, or on the budget: TrainConfig.router_start) and the threshold its 0.5. The val split must be the same, or the weights
    would have been trained on this run's val images.
    for resnet50, a torchvision ResNet-50 state_dict (ImageNet weights): the convolutions and
    BNs are mapped onto the blocks, the ImageNet normalisation is taken over, the classifier
    only when it has this dataset's number of classes.
"""
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import FORMAT, load_checkpoint
from .config import UsageError
from .models import ARCHS, RoutedResNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision_names(stages: tuple[int, ...]) -> dict[str, str]:
    """torchvision resnet50 key prefix -> ours."""
    names = {"conv1.": "stem.0.", "bn1.": "stem.1.", "fc.": "fc."}
    i = 0
    for layer, n in enumerate(stages, 1):
        for j in range(n):
            tv, ours = f"layer{layer}.{j}.", f"blocks.{i}."
            for k, pos in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4), ("conv3", 6), ("bn3", 7)):
                names[f"{tv}{k}."] = f"{ours}residual.{pos}."
            names[f"{tv}downsample.0."] = f"{ours}shortcut.0."
            names[f"{tv}downsample.1."] = f"{ours}shortcut.1."
            i += 1
    return names


def _from_torchvision(model: RoutedResNet, state: dict, path: Path) -> dict:
    if model.cfg.arch != "resnet50":
        raise UsageError(f"--init {path} is a torchvision state_dict; those fit resnet50 only, not {model.cfg.arch}")
    names = _torchvision_names(ARCHS["resnet50"].stages)
    own = model.state_dict()
    mapped = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            raise UsageError(f"--init {path}: {key!r} is not a torchvision ResNet-50 weight")
        ours = names[prefix] + key[len(prefix):]
        if ours.startswith("fc.") and value.shape != own[ours].shape:
            continue   # another number of classes: the classifier starts fresh
        if ours not in own or own[ours].shape != value.shape:
            raise UsageError(f"--init {path}: {key!r} {tuple(value.shape)} does not fit resnet50's {ours}")
        mapped[ours] = value
    missing = [k for k in own if ".router." not in k and not k.startswith(("fc.", "mean", "std", "threshold"))
               and k not in mapped]
    if missing:
        raise UsageError(f"--init {path} lacks {len(missing)} ResNet-50 weights (first: {missing[0]})")
    model.load_state_dict(mapped, strict=False)
    model.set_normalization(IMAGENET_MEAN, IMAGENET_STD)
    return {"init": str(path), "init_kind": "torchvision", "init_classifier": "fc.weight" in mapped}


def warm_start(model: RoutedResNet, path: str | os.PathLike, dataset: str, val_index: tuple[int, ...],
               ckpt: dict | None = None) -> dict:
    """Copy the trained weights at `path` into `model` (routers excepted). Bad input: UsageError.
    `ckpt`: the drn checkpoint at `path`, already loaded (a search hands its backbone to every trial
    through Ray's object store); `path` then only names it. Returns what was loaded, for the log and
    the checkpoint."""
    path = Path(path)
    if ckpt is not None:
        return _from_drn(model, ckpt, path, dataset, val_index)
    if not path.is_file():
        raise UsageError(f"--init {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled foreign objects...
        raise UsageError(f"--init {path} is corrupt or not a checkpoint ({type(e).__name__})") from None
    if isinstance(raw, dict) and raw.get("format") != FORMAT and raw and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        return _from_torchvision(model, raw, path)
    return _from_drn(model, load_checkpoint(path), path, dataset, val_index)


def _from_drn(model: RoutedResNet, ckpt: dict, path: Path, dataset: str, val_index: tuple[int, ...]) -> dict:
    cfg = ckpt["config"]
    if cfg["arch"] != model.cfg.arch:
        raise UsageError(f"--init {path} is a {cfg['arch']}, this run trains a {model.cfg.arch}")
    if cfg["dataset"] != dataset or ckpt["num_classes"] != model.cfg.num_classes \
            or ckpt["input_size"] != model.cfg.input_size:
        raise UsageError(f"--init {path} was trained on {cfg['dataset']} ({ckpt['num_classes']} classes, "
                         f"{ckpt['input_size']}px), this run is on {dataset} ({model.cfg.num_classes} classes, "
                         f"{model.cfg.input_size}px)")
    if tuple(ckpt.get("val_index", ())) != tuple(val_index):
        raise UsageError(f"--init {path} was trained with another val split (--val-fraction/--val-seed): its "
                         f"weights have seen this run's val images")
    state = {k: v for k, v in ckpt["model"].items() if ".router." not in k and k != "threshold"}
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UsageError(f"--init {path}: weights do not fit {model.cfg.arch}: {str(e).splitlines()[0]}") from None
    if res.unexpected_keys or [k for k in res.missing_keys if ".router." not in k and k != "threshold"]:
        raise UsageError(f"--init {path}: weights do not fit {model.cfg.arch}")
    return {"init": str(path), "init_kind": f"drn {cfg['routing']}", "init_epoch": ckpt["epoch"],
            "init_val_accuracy": (ckpt.get("history") or [{}])[-1].get("accuracy")}


@torch.no_grad()
def greedy_route(model: RoutedResNet, images: torch.Tensor, labels: torch.Tensor, cost, target: float,
                 batch_size: int = 500) -> tuple[tuple[bool, ...], int | None]:
    """The route a trained network loses least by at the budget, measured on `images` (uint8, the
    val split): from every block, drop the block whose absence raises the cross-entropy least (a
    trained ResNet survives losing a block, Veit et al. 2016), until the route costs at most
    `target` under `cost(route)`. Returns the route and the last block dropped (None if none was)."""
    was_training = model.training
    model.eval()
    n = model.num_blocks

    def loss(route: list[bool]) -> float:
        gates = torch.tensor(route, device=images.device).expand(images.shape[0], n)
        total = 0.0
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].float().div(255)
            out = model(x, routing="hard", gates=gates[s:s + batch_size])
            total += F.cross_entropy(out.logits.float(), labels[s:s + batch_size], reduction="sum").item()
        return total / images.shape[0]

    route, last = [True] * n, None
    while cost(route) > target and any(route):
        trials = {i: loss(route[:i] + [False] + route[i + 1:]) for i, on in enumerate(route) if on}
        last = min(trials, key=trials.get)
        route[last] = False
    model.train(was_training)
    return tuple(route), last
