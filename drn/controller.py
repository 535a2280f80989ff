"""Adaptive cost weight mu (the paper: "the weight of the cost controlling loss is adjusted
adaptively"). Without a target mu stays at its initial value (0.05, the paper's).

With a target T (FLOPs per image) mu follows integral control on log mu, driven by the cost the
model pays under *hard* routing (Eq. 11) on training batches, smoothed with an EMA:

    e      = flops_hard_ema / T - 1           relative overshoot (> 0: too expensive)
    log mu += gain * e                        per optimisation step, clipped to [mu_min, mu_max]

Working in log mu keeps mu positive and makes the step a relative change, so the same gain
serves mu = 1e-3 and mu = 1. Driving the loop with the hard cost (not the soft expected cost of
Eq. 8) targets what evaluation measures: the soft/hard gap is what makes fixed-mu methods miss.
"""
import math
from dataclasses import asdict, dataclass


@dataclass
class MuController:
    target: float | None = None   # FLOPs per image; None = fixed mu
    mu: float = 0.05              # current weight of Eq. 8
    gain: float = 0.05            # d(log mu) per step per unit of relative error
    ema_decay: float = 0.9        # smoothing of the measured hard cost (per step)
    mu_min: float = 1e-4
    mu_max: float = 10.0
    flops_ema: float | None = None

    def update(self, flops_hard: float) -> float:
        """Feed the mean hard-routed FLOPs per image of one training batch; returns the new mu."""
        self.flops_ema = flops_hard if self.flops_ema is None else (
            self.ema_decay * self.flops_ema + (1 - self.ema_decay) * flops_hard)
        if self.target is not None:
            err = self.flops_ema / self.target - 1.0
            log_mu = math.log(self.mu) + self.gain * err
            self.mu = min(max(math.exp(log_mu), self.mu_min), self.mu_max)
        return self.mu

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
