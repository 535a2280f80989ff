"""Budget control: the adaptive cost weight mu, and the final routing-threshold calibration.

The paper says only that mu "is adjusted adaptively". Here it is a PI controller on log mu --
dual ascent on the constraint cost <= target with a proportional term for damping, the
PID-Lagrangian recipe of constrained RL (Stooke et al., 2020) -- driven by the cost the model
pays under *hard* routing (Eq. 11) on training batches, smoothed by an EMA, and aimed at a
setpoint that ramps from the starting cost down to the target:

    s_k     = start + min(1, k / ramp) * (target - start)       ramp = 30 % of the main epochs
    e_k     = clip(cost_ema_k / s_k - 1, -0.5, 0.5)             relative overshoot (> 0: too expensive)
    I_k     = I_{k-1} + ki / S * e_k                            S = optimisation steps per epoch
    log mu  = log mu_0 + kp * e_k + I_k                         kept in [mu_min, mu_max]

* log mu: mu stays positive and a step is a relative change, so one gain serves mu = 1e-3 and 1.
* hard cost, not Eq. 8's soft expectation: the soft/hard gap is what makes fixed-mu methods miss.
* the ramp and the error clip: a network that starts at 95 % of full and is told "30 %" at once
  sees e = +2.2; a first version without them multiplied mu by ~80 within an epoch, every router
  closed (K = 0) and -- with r near 0 the routers get almost no gradient -- never reopened.
  Moving the setpoint gradually keeps e small, so the routers follow instead of collapsing.
* gains are per epoch (ki is divided by the steps in an epoch), so the loop's time constant is
  the same on 4k images and on 50k. ki = 2 / epoch: a sustained 10 % overshoot multiplies mu by
  e^0.2 = 1.22 per epoch, slower than the routers adapt; kp = 1 damps the integral's overshoot
  without passing much batch-to-batch noise into mu. The benchmark (bench/controller.py,
  BENCHMARKS.md) measures the result on real training.
* anti-windup: the integral is clamped so that it never pushes log mu past a clip.
* no target: mu stays at its initial value (0.05, the paper's).

Training cost and held-out cost differ a little, and the learning rate decays to nothing at the
end, so a residual error remains; `calibrate_threshold` removes it after training by moving the
routing threshold of Eq. 11 (0.5) so the mean hard cost on a calibration split equals the target
(within 0.25 %, from about one routed pass over it that gives the exact cost of every threshold
in a window).
It is calibrated on the training images and judged on the val split, never on the split it is
judged on.
"""
import math
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Sequence


@dataclass
class MuController:
    target: float | None = None   # cost per image (FLOPs, or ms for latency tables); None = fixed mu
    mu: float = 0.05              # current weight of Eq. 8 (initial value until the first update)
    kp: float = 1.0               # proportional gain on log mu, per unit relative error
    ki: float = 2.0               # integral gain on log mu, per epoch per unit relative error
    steps_per_epoch: int = 1
    ema_decay: float = 0.9        # smoothing of the measured hard cost, per step
    mu_min: float = 1e-4
    mu_max: float = 5.0           # Eq. 8 is normalised to [0, 1]: mu = 5 already outweighs the CE
    ramp_steps: int = 0           # the setpoint moves linearly from the first measured cost to
                                  # the target over this many steps (0: the target from the start)
    max_error: float = 0.5        # |relative error| fed to the loop is clipped to this
    mu0: float | None = None      # set on the first update
    integral: float = 0.0
    cost_ema: float | None = None
    start_cost: float | None = None
    steps: int = 0

    @property
    def setpoint(self) -> float | None:
        if self.target is None or self.start_cost is None or self.steps >= self.ramp_steps:
            return self.target
        frac = self.steps / self.ramp_steps
        return self.start_cost + frac * (self.target - self.start_cost)

    def update(self, cost_hard: float) -> float:
        """Feed the mean hard-routed cost per image of one training batch; returns the new mu."""
        self.cost_ema = cost_hard if self.cost_ema is None else (
            self.ema_decay * self.cost_ema + (1 - self.ema_decay) * cost_hard)
        if self.target is None:
            return self.mu
        if self.mu0 is None:
            self.mu0, self.start_cost = self.mu, max(self.cost_ema, self.target)
        self.steps += 1
        err = min(max(self.cost_ema / self.setpoint - 1.0, -self.max_error), self.max_error)
        lo, hi = math.log(self.mu_min), math.log(self.mu_max)
        base = math.log(self.mu0) + self.kp * err
        integral = self.integral + self.ki / max(self.steps_per_epoch, 1) * err
        self.integral = min(max(integral, lo - base), hi - base)  # anti-windup: never past a clip
        self.mu = math.exp(base + self.integral)
        return self.mu

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _search(curve, f, a: float, fa, b: float, fb, lo: float, hi: float, tol: float, window: float,
            max_sweeps: int):
    """Windows of `curve` from (lo, hi] on, until one holds the target (f = 0): Illinois false
    position on the bracket (a, b), f(cost) known or None at its ends. Returns the window that
    landed (or came closest) as (edges, means), and the sweeps taken."""
    best, side, sweeps = None, 0, 0
    while sweeps < max_sweeps and b - a > 1e-6:   # (a bracket this narrow has closed on a jump)
        edges, means = curve(_float32(lo), _float32(hi))
        errs = [f(c) for c in means]
        sweeps += 1
        if best is None or min(map(abs, errs)) < min(map(abs, best[2])):
            best = (edges, means, errs)
        if any(abs(e) <= tol for e in errs) or min(errs) < 0 < max(errs):   # landed, or jumps over
            break
        if errs[-1] > 0:        # still too expensive at hi: the target lies above the window
            a, fa = hi, errs[-1]
            if side == +1 and fb is not None:
                fb /= 2         # Illinois: the same end moved twice, so halve the stale one's value
            side = +1
        else:                   # already too cheap at lo: below it
            b, fb = lo, errs[0]
            if side == -1 and fa is not None:
                fa /= 2
            side = -1
        t = a - fa * (b - a) / (fb - fa) if fa is not None and fb is not None and fa > 0 > fb else (a + b) / 2
        lo, hi = max(a, t - window / 2), min(b, t + window / 2)
    return best[0], best[1], sweeps


def calibrate_threshold(cost_curve: Callable[[float, float], tuple[Sequence[float], Sequence[float]]],
                        target: float, cost_at_0: float | None = None, cost_at_1: float | None = None,
                        coarse_curve: Callable[[float, float], tuple[Sequence[float], Sequence[float]]] | None = None,
                        tol: float = 0.0025, window: float = 0.2, noise: float = 0.03,
                        max_sweeps: int = 10) -> tuple[float, float, int]:
    """The routing threshold t whose mean hard cost is closest to `target` (within a relative `tol`
    is enough). Returns (t, cost(t), windows swept).

    `cost_curve(lo, hi)` gives the mean cost per image exactly on a window of thresholds, as a step
    function (evaluate.threshold_curve, one routed pass over the calibration images: edges
    lo = e_0 < ... < e_m = hi, means c_1 ... c_m on (e_{k-1}, e_k]); the cost falls as t rises.
    A model trained to the target usually lands in the first window, around 0.5. Otherwise the
    window's ends narrow the bracket and the next window is centred on the Illinois false-position
    estimate. With `coarse_curve` (the same on fewer images) that search runs on it first, and
    cost_curve starts from the part of its last window within `noise` of the target (512 of 2048
    images: a standard error of ~1 %). A sweep costs about one forward pass per route it finds in
    its window, and routers saturate near 0 and 1, so that r's pile up there: sweeping all of
    [0, 1] at once cost 4-14 passes of all images on the fidelity benchmark's ResNet-20s.
    The picked t is the middle of the widest step within tol -- the one farthest from flipping an
    image on float noise -- or of the closest step when the cost jumps over the target.
    cost_at_0 / cost_at_1: the cost at t = 0 (every block runs) and t = 1 (none does), when known
    without a pass.
    """
    f = lambda c: c / target - 1   # > 0: too expensive, so raise t
    ends = (0.0, None if cost_at_0 is None else f(cost_at_0), 1.0, None if cost_at_1 is None else f(cost_at_1))
    lo, hi, sweeps = 0.5 - window / 2, 0.5 + window / 2, 0
    if coarse_curve is not None:
        edges, means, sweeps = _search(coarse_curve, f, *ends, lo, hi, noise, window, max_sweeps)
        errs = [f(c) for c in means]
        near = [k for k, e in enumerate(errs) if abs(e) <= noise] or [min(range(len(errs)), key=lambda k: abs(errs[k]))]
        lo, hi = edges[min(near)], edges[max(near) + 1]
    edges, means, n = _search(cost_curve, f, *ends, lo, hi, tol, window, max_sweeps)
    within = [k for k in range(len(means)) if abs(f(means[k])) <= tol]
    k = (max(within, key=lambda k: edges[k + 1] - edges[k]) if within
         else min(range(len(means)), key=lambda k: abs(f(means[k]))))
    mid = _float32((edges[k] + edges[k + 1]) / 2)
    return (mid if edges[k] < mid <= edges[k + 1] else edges[k + 1]), means[k], sweeps + n
