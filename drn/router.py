"""The per-block router of Fig. 2b and the routing variables of Eq. 3 and Eq. 11."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_route(logits: torch.Tensor, beta: float, leak: float = 0.0) -> torch.Tensor:
    """Eq. 3: r = softmax(beta * softmax(R(x)))[0], index 0 = execute.  (B, 2) -> (B,)

    leak > 0 (training): r's value is Eq. 3's exactly, but its gradient with respect to the logit
    gap d = R_0 - R_1 gets a floor of `leak`. Eq. 3 saturates twice: dr/dd = 2 beta r(1-r) p(1-p)
    with p = sigmoid(d), which vanishes as |d| grows. So a router that has closed cannot reopen,
    and an open one needs a large cost weight before it moves: hysteresis, which makes the mu loop
    close too many blocks at once and then leaves them closed (BENCHMARKS.md, issue 14)."""
    r = F.softmax(beta * F.softmax(logits, dim=-1), dim=-1)[..., 0]
    if leak and torch.is_grad_enabled():
        d = logits[..., 0] - logits[..., 1]
        r = r + leak * (d - d.detach())
    return r


def logit_gap(r: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 3 inverted: the logit gap d = R_0 - R_1 that gives r = sigmoid(beta (2 sigmoid(d) - 1)),
    clamped to |d| <= 13.8 where sigmoid(d) rounds to 0 or 1.  r (...) in (0, 1) -> d (...)"""
    p = 0.5 + torch.logit(r.double()) / (2 * beta)
    return torch.logit(p.clamp(1e-6, 1 - 1e-6)).to(r.dtype)


def hard_route(r: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Eq. 11: execute iff r >= threshold. At 0.5 this is the paper's argmax for any beta > 0."""
    return r >= threshold


def straight_through(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The 0/1 decision g forward, r's gradient backward: g + r - sg(r).  g bool, r float, same shape."""
    return g.to(r.dtype) + (r - r.detach())


class Router(nn.Module):
    """Global average pool -> Linear -> ReLU -> Linear -> 2 logits (execute, skip)."""

    # p(execute) = softmax(logits)[0] at the start (TrainConfig.router_open, router_start)
    OPEN = 0.9

    def __init__(self, channels: int, hidden: int, open_p: float = OPEN):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        self.open_(open_p)

    @torch.no_grad()
    def open_(self, p: float) -> None:
        """Start with p(execute) = p for every input: logit gap log(p / (1 - p)), split evenly, and
        a zero last layer, so the features cannot move the start (trained features, as in a warm
        start, are large enough to put a random layer's logits anywhere). fc2's weights get a
        gradient from the first step, fc1's once fc2 has grown (as zero-init residuals learn)."""
        half = 0.5 * math.log(p / (1 - p))
        self.fc2.bias.copy_(torch.tensor([half, -half]))
        self.fc2.weight.zero_()

    @torch.no_grad()
    def shift_(self, delta: torch.Tensor | float) -> None:
        """Add delta to the logit gap of every input: the same decision function, re-centred."""
        delta = torch.as_tensor(delta, dtype=self.fc2.bias.dtype, device=self.fc2.bias.device)
        self.fc2.bias.add_(torch.stack([0.5 * delta, -0.5 * delta]))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, 2); z: x's global average pool (B, C), when already known."""
        z = x.mean(dim=(2, 3)) if z is None else z
        return self.fc2(F.relu(self.fc1(z)))
