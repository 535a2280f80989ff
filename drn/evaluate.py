"""Hard-routed evaluation (Eq. 11) with gathered execution, and the paper's route statistics.

routing="capacity" (models.py: each block on a fixed share of the batch, static shapes) is
evaluated the same way and also reports what the capacity costs and what it drops:

    flops          the routes that ran, as for gather (padding and dropped images not counted)
    flops_spent    what the capacity forward computes: fixed + sum_b k_b / B * block_b, padded
                   slots included (= torch.utils.flop_counter's count of that forward)
    flops_wanted   the routes the routers asked for (r >= threshold in the same forward)
    dropped        share of the block runs the routers asked for that the capacity dropped
    images_dropped share of the images that lost at least one block

The capacities come from the val split (val_capacity): a factor times each block's execution
rate under the gather forward at the same threshold -- never from the split being reported.
"""
import time

import torch

from .cost import CostTable
from .data import Split, perturb
from .models import RoutedResNet
from .router import hard_route


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_batches(model: RoutedResNet, images: torch.Tensor, batch_size: int, routing: str,
                     threshold: float | None):
    """(output, seconds of its forward) of each batch of uint8 images, in eval mode."""
    model.eval()
    device = images.device
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].float().div_(255)
        _sync(device)
        t0 = time.perf_counter()
        out = model(x, routing=routing, threshold=threshold)
        _sync(device)
        yield out, time.perf_counter() - t0


@torch.inference_mode()
def route_split(model: RoutedResNet, images: torch.Tensor, batch_size: int, routing: str = "hard",
                threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Predictions (N,) and executed gates (N, n) for uint8 images on the model's device,
    plus the seconds spent in forward passes."""
    preds, gates, seconds = [], [], 0.0
    for out, t in _forward_batches(model, images, batch_size, routing, threshold):
        preds.append(out.logits.argmax(1))
        gates.append(out.gates)
        seconds += t
    return torch.cat(preds), torch.cat(gates), seconds


@torch.inference_mode()
def capacity_split(model: RoutedResNet, images: torch.Tensor, batch_size: int,
                   threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """routing="capacity" over uint8 images: predictions (N,), gates that ran (N, n), gates the
    routers asked for (N, n), images each block ran on summed over the batches, padding
    included (n,), and the seconds spent in forward passes."""
    t = model.threshold if threshold is None else threshold
    preds, gates, wanted, slots, seconds = [], [], [], 0, 0.0
    for out, s in _forward_batches(model, images, batch_size, "capacity", threshold):
        preds.append(out.logits.argmax(1))
        gates.append(out.gates)
        wanted.append(hard_route(out.r, t))
        slots = slots + torch.tensor(model.capacity_k(out.r.shape[0]))
        seconds += s
    return torch.cat(preds), torch.cat(gates), torch.cat(wanted), slots, seconds


CAPACITY_FACTOR = 1.25   # routing="capacity": block capacity = this x its val execution rate (MoE's usual factor;
                         # on ResNet-20 / cifar10-5k it kept gather's accuracy at batch 256: BENCHMARKS.md,
                         # "What a capacity drops")


def capacity_from_rates(rates, factor: float) -> torch.Tensor:
    """Per-block capacities (n,): min(1, factor x execution rate)."""
    if not (factor > 0 and factor < float("inf")):
        raise ValueError(f"capacity factor must be finite and > 0, got {factor}")
    return torch.as_tensor(rates, dtype=torch.float32).mul(factor).clamp_(max=1)


@torch.no_grad()
def val_capacity(model: RoutedResNet, val: Split, factor: float, batch_size: int = 500,
                 threshold: float | None = None) -> torch.Tensor:
    """Set (and return) the model's capacities from the val split: factor x each block's execution
    rate under the gather forward at `threshold` (None: the model's), capped at 1."""
    _, gates, _ = route_split(model, val.images.to(model.mean.device), batch_size, "hard", threshold)
    model.set_capacity(capacity_from_rates(gates.float().mean(0).cpu(), factor))
    return model.capacity.clone()


@torch.inference_mode()
def threshold_curve(model: RoutedResNet, images: torch.Tensor, cost: CostTable, lo: float, hi: float,
                    batch_size: int) -> tuple[list[float], list[float]]:
    """The mean hard cost per image of uint8 `images` as the step function of the threshold t that
    it is on (lo, hi], exactly, from one routed pass (RoutedResNet.route_intervals): edges
    lo = e_0 < e_1 < ... < e_m = hi and means c_1 ... c_m, c_k for every t in (e_{k-1}, e_k]."""
    model.eval()
    t_lo, t_hi, costs = [], [], []
    for s in range(0, images.shape[0], batch_size):
        _, a, b, gates = model.route_intervals(images[s:s + batch_size].float().div_(255), lo, hi)
        t_lo.append(a)
        t_hi.append(b)
        costs.append(cost.route_cost(gates).double())
    a, b, c = torch.cat(t_lo), torch.cat(t_hi), torch.cat(costs)
    edges, at = torch.unique(torch.cat([a, b]), return_inverse=True)
    step = torch.zeros(edges.shape[0], dtype=torch.float64, device=c.device)
    step.index_add_(0, at[:a.shape[0]], c).index_add_(0, at[a.shape[0]:], -c)  # a row adds its cost on (lo, hi]
    return edges.tolist(), (step.cumsum(0)[:-1] / images.shape[0]).tolist()


DYNAMIC_RATE = (0.1, 0.9)   # a block is dynamic on a split when it runs on 10-90 % of its images


def path_stats(gates: torch.Tensor, block_cost) -> dict:
    """How much the routes depend on the image. gates (N, n) bool, block_cost (n,) the blocks' costs.

    path_entropy     bits: the entropy of the routes' distribution over the N images (0: one route)
    effective_paths  2 ** path_entropy: the number of equally frequent routes with that entropy
    dynamic_share    the share of the executed routable cost spent in blocks that run on 10-90 % of
                     the images (DYNAMIC_RATE): the compute that depends on the image (0: static)
    """
    _, counts = torch.unique(gates, dim=0, return_counts=True)
    p = counts.double() / gates.shape[0]
    entropy = max(0.0, float(-(p * p.log2()).sum()))
    rate = gates.double().mean(0)
    spent = rate * torch.as_tensor(block_cost, dtype=torch.float64, device=rate.device)
    dynamic = (rate >= DYNAMIC_RATE[0]) & (rate <= DYNAMIC_RATE[1])
    total = spent.sum().item()
    return {"path_entropy": entropy, "effective_paths": 2.0 ** entropy,
            "dynamic_share": spent[dynamic].sum().item() / total if total > 0 else 0.0}


def route_stats(preds: torch.Tensor, gates: torch.Tensor, labels: torch.Tensor, cost: CostTable) -> dict:
    g = gates.float()
    return {
        "accuracy": (preds == labels).float().mean().item(),
        "flops": cost.route_cost(g).mean().item(),
        "flops_full": cost.full,
        "k": g.sum(1).mean().item(),
        "k_full": cost.num_blocks,
        "distinct_paths": int(torch.unique(gates, dim=0).shape[0]),
        **path_stats(gates, cost.block),
        "block_exec_rate": [round(v, 4) for v in g.mean(0).tolist()],
        "images": int(labels.shape[0]),
    }


def evaluate(model: RoutedResNet, split: Split, cost: CostTable, batch_size: int = 500,
             threshold: float | None = None, same_path: bool = False, seed: int = 0,
             routing: str = "hard") -> dict:
    """Accuracy, mean FLOPs and routing length K per image, distinct paths (Fig. 7), per-block
    execution rate and images/s under hard routing (threshold None: the model's own). With
    same_path: the share of images whose route is unchanged when the image is perturbed (the
    paper's consistency experiment). routing="sample": Ber-Dis, gates drawn from Bernoulli(r),
    seeded by `seed`. routing="capacity": the model's capacities (val_capacity), and what they
    spend and drop (module docstring)."""
    device = model.mean.device
    images, labels = split.images.to(device), split.labels.to(device)
    if routing == "sample":
        torch.manual_seed(seed)
    if routing == "capacity":
        preds, gates, wanted, slots, seconds = capacity_split(model, images, batch_size, threshold)
    else:
        preds, gates, seconds = route_split(model, images, batch_size, routing, threshold)
    stats = route_stats(preds, gates, labels, cost)
    stats["images_per_s"] = labels.shape[0] / max(seconds, 1e-9)
    if routing == "capacity":
        dropped = wanted & ~gates
        spent = slots.double() @ torch.tensor(cost.block, dtype=torch.float64)   # padded slots run too
        stats.update(flops_spent=cost.fixed + spent.item() / labels.shape[0],
                     flops_wanted=cost.route_cost(wanted).mean().item(),
                     dropped=dropped.sum().item() / max(wanted.sum().item(), 1),
                     images_dropped=dropped.any(1).float().mean().item(),
                     block_dropped_rate=[round(v, 4) for v in (dropped.sum(0) / wanted.sum(0).clamp(min=1)).tolist()],
                     capacity=[round(v, 4) for v in model.capacity.tolist()])
    if same_path:
        gen = torch.Generator(device=device).manual_seed(seed)
        moved = torch.cat([perturb(images[s:s + batch_size].float().div_(255), gen).mul_(255).round_().to(torch.uint8)
                           for s in range(0, images.shape[0], batch_size)])
        preds_p, gates_p, _ = route_split(model, moved, batch_size, routing, threshold)
        stats["same_path_ratio"] = (gates_p == gates).all(1).float().mean().item()
        stats["accuracy_perturbed"] = (preds_p == labels).float().mean().item()
    return stats
