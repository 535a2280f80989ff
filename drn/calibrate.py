"""Threshold trim: the last, small correction of a budget miss, after training.

The routers are trained to land on the budget at Eq. 11's threshold 0.5 by themselves (the mu
controller, controller.py). What remains -- held-out images differ a little from training
batches, BN switches to running statistics -- may be trimmed by moving the threshold, but only
inside TRIM = [0.4, 0.6]: a block then still runs only where its router leans towards running it
(r >= 0.4), so the routes stay the routers' decisions. A miss that needs more than that is left
as it is and reported (`landed` false), never hidden by a threshold far from the routers'.

The trim reads the val split (carved from the training images), never the test split.
"""
import struct
from typing import Callable, Sequence

TRIM = (0.4, 0.6)
TOLERANCE = 0.0025   # relative: a step within 0.25 % of the target is on it


def float32(x: float) -> float:
    """x as the model's float32 threshold buffer holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def trim_threshold(cost_curve: Callable[[float, float], tuple[Sequence[float], Sequence[float]]],
                   target: float, window: tuple[float, float] = TRIM,
                   tol: float = TOLERANCE) -> tuple[float, float, bool]:
    """The threshold t in `window` whose mean hard cost is on `target` (within a relative `tol`),
    preferring 0.5 and then the steps nearest to it. Returns (t, cost(t), landed).

    `cost_curve(lo, hi)` is the mean cost per image, exactly, as the step function of t on
    (lo, hi] (evaluate.threshold_curve: one routed pass over the images gives edges
    lo = e_0 < ... < e_m = hi and means c_1 ... c_m on (e_{k-1}, e_k]); the cost falls as t rises.
    t = 0.5 when its step is on the target. Otherwise t is the middle of the on-target step
    nearest to 0.5 -- the middle, so that float noise in r cannot flip an image -- or, when no
    step is on target (landed false), of the step whose cost is closest to it."""
    lo, hi = window
    if not 0 < lo < 0.5 < hi < 1:
        raise ValueError(f"trim window must hold 0.5 inside (0, 1), got {window}")
    edges, means = cost_curve(float32(lo), float32(hi))
    err = [abs(c / target - 1) for c in means]
    half = next(k for k in range(len(means)) if edges[k] < 0.5 <= edges[k + 1])
    if err[half] <= tol:
        return 0.5, means[half], True
    on = [k for k in range(len(means)) if err[k] <= tol]
    distance = lambda k: max(edges[k] - 0.5, 0.5 - edges[k + 1], 0.0)
    k = min(on, key=distance) if on else min(range(len(means)), key=lambda k: (err[k], distance(k)))
    mid = float32((edges[k] + edges[k + 1]) / 2)
    return (mid if edges[k] < mid <= edges[k + 1] else edges[k + 1]), means[k], bool(on)
