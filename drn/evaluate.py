"""Hard-routed evaluation (Eq. 11) with gathered execution, and the paper's route statistics."""
import time

import torch

from .cost import CostTable
from .data import Split, perturb
from .models import RoutedResNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def route_split(model: RoutedResNet, images: torch.Tensor, batch_size: int, routing: str = "hard",
                threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Predictions (N,) and executed gates (N, n) for uint8 images on the model's device,
    plus the seconds spent in forward passes."""
    model.eval()
    device = images.device
    preds, gates, seconds = [], [], 0.0
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].float().div_(255)
        _sync(device)
        t0 = time.perf_counter()
        out = model(x, routing=routing, threshold=threshold)
        _sync(device)
        seconds += time.perf_counter() - t0
        preds.append(out.logits.argmax(1))
        gates.append(out.gates)
    return torch.cat(preds), torch.cat(gates), seconds


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


def route_stats(preds: torch.Tensor, gates: torch.Tensor, labels: torch.Tensor, cost: CostTable) -> dict:
    g = gates.float()
    return {
        "accuracy": (preds == labels).float().mean().item(),
        "flops": cost.route_cost(g).mean().item(),
        "flops_full": cost.full,
        "k": g.sum(1).mean().item(),
        "k_full": cost.num_blocks,
        "distinct_paths": int(torch.unique(gates, dim=0).shape[0]),
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
    seeded by `seed`."""
    device = model.mean.device
    images, labels = split.images.to(device), split.labels.to(device)
    if routing == "sample":
        torch.manual_seed(seed)
    preds, gates, seconds = route_split(model, images, batch_size, routing, threshold)
    stats = route_stats(preds, gates, labels, cost)
    stats["images_per_s"] = labels.shape[0] / max(seconds, 1e-9)
    if same_path:
        gen = torch.Generator(device=device).manual_seed(seed)
        moved = torch.cat([perturb(images[s:s + batch_size].float().div_(255), gen).mul_(255).round_().to(torch.uint8)
                           for s in range(0, images.shape[0], batch_size)])
        preds_p, gates_p, _ = route_split(model, moved, batch_size, routing, threshold)
        stats["same_path_ratio"] = (gates_p == gates).all(1).float().mean().item()
        stats["accuracy_perturbed"] = (preds_p == labels).float().mean().item()
    return stats
