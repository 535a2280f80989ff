"""Static routes, which every image runs, chosen without a router and trained as such
(cross-entropy, no routing losses): the plain network, and the paper's heuristic baselines
(Sec. 4.4, Table 4a) of K blocks.

    full          every block: the plain ResNet (the warm start of `--init`)
    firstk        the first K residual blocks
    randomk       K blocks drawn at random (once, from the run's seed); at a FLOPs target, a route
                  drawn at random among those within 5 % of it (equal FLOPs), whatever its K
    distributedk  K blocks spread flatly over the stages (Table 4's caption; "Dis-K"): K/S per
                  stage, the remainder to the deepest stages, evenly spaced inside each stage
    deepk         not the paper's: K blocks where a FLOP buys the most parameters. The stage
                  transitions first (each later stage's first block: it downsamples, and skipping it
                  leaves the stage's input to a bare shortcut), then the other blocks from the deepest
                  stage back, each stage from its last block back. On a CIFAR ResNet a block of the
                  last stage costs the FLOPs of one of the first and has 16x its parameters

Table 4b's Ber-Dis is not a training baseline but a test-time rule of a trained DRN: sample each
gate from Bernoulli(r) instead of thresholding r (`routing="sample"`, `drn-eval --routing sample`).
A static network runs no router, so its cost is the cost table's minus the routers'.
"""
import math

import torch

from .config import TrainConfig, UsageError
from .models import ARCHS

STATIC = ("firstk", "randomk", "distributedk", "deepk")


def _spread(n: int, k: int) -> list[int]:
    """k of n indices, evenly spaced, first and last included when k >= 2."""
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def static_route(kind: str, stages: tuple[int, ...], k: int, seed: int = 0) -> torch.Tensor:
    """(n_blocks,) bool: which blocks the baseline `kind` executes."""
    n = sum(stages)
    if kind not in STATIC:
        raise ValueError(f"unknown static routing {kind!r}; choose one of {', '.join(STATIC)}")
    if not 1 <= k <= n:
        raise ValueError(f"K must be in [1, {n}] for {n} blocks, got {k}")
    route = torch.zeros(n, dtype=torch.bool)
    if kind == "firstk":
        route[:k] = True
    elif kind == "randomk":
        g = torch.Generator().manual_seed(seed)
        route[torch.randperm(n, generator=g)[:k]] = True
    elif kind == "deepk":
        starts = [sum(stages[:s]) for s in range(len(stages))]
        rest = [i for s in reversed(range(len(stages))) for i in reversed(range(starts[s] + 1, starts[s] + stages[s]))]
        route[(starts[1:] + rest + starts[:1])[:k]] = True
    else:
        per = [k // len(stages)] * len(stages)
        for i in range(k % len(stages)):
            per[len(stages) - 1 - i] += 1   # the remainder to the deepest stages
        start = 0
        for size, take in zip(stages, per):
            take = min(take, size)
            for j in _spread(size, take):
                route[start + j] = True
            start += size
        for i in range(n - 1, -1, -1):      # a stage too short for its share: fill from the end
            if int(route.sum()) >= k:
                break
            route[i] = True
    return route


def k_for_budget(kind: str, stages: tuple[int, ...], block_cost: list[float], fixed: float, budget: float,
                 seed: int = 0) -> int:
    """The K whose static route costs closest to `budget` (`fixed`: what every image pays)."""
    n = sum(stages)
    costs = [fixed + sum(c for c, on in zip(block_cost, static_route(kind, stages, k, seed).tolist()) if on)
             for k in range(1, n + 1)]
    return 1 + min(range(n), key=lambda i: abs(costs[i] - budget))


def randomk_at_budget(stages: tuple[int, ...], block_cost: list[float], fixed: float, budget: float,
                      seed: int = 0, tolerance: float = 0.05, draws: int = 10_000) -> tuple[int, ...]:
    """RandomK at equal FLOPs: the seed's generator draws block orders, and an order's prefix whose
    cost is closest to `budget` is its route; the first route within `tolerance` of the budget is
    taken (the closest of all when none is). The first order is `static_route`'s, so a seed whose
    K-for-the-budget route already lands keeps it. Returns the route's blocks, ascending."""
    n = sum(stages)
    g = torch.Generator().manual_seed(seed)
    best, best_err = None, math.inf
    for _ in range(draws):
        order = torch.randperm(n, generator=g).tolist()
        costs = [fixed + sum(block_cost[i] for i in order[:k]) for k in range(1, n + 1)]
        k = 1 + min(range(n), key=lambda i: abs(costs[i] - budget))
        err = abs(costs[k - 1] / budget - 1)
        if err < best_err:
            best, best_err = tuple(sorted(order[:k])), err
        if err <= tolerance:
            break
    return best


def route_of(cfg: TrainConfig) -> tuple[bool, ...] | None:
    """The static route a config asks for (its k resolved), or None for drn. `full` is the plain
    network: every block, no router."""
    if cfg.routing == "drn":
        return None
    stages = ARCHS[cfg.arch].stages
    if cfg.routing == "full":
        return (True,) * sum(stages)
    if cfg.route is not None:
        return tuple(i in cfg.route for i in range(sum(stages)))
    if cfg.k is None or not 1 <= cfg.k <= sum(stages):
        raise UsageError(f"k must be in [1, {sum(stages)}] for {cfg.arch}, got {cfg.k}")
    return tuple(static_route(cfg.routing, stages, cfg.k, cfg.seed).tolist())
