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
    close too many blocks at once and then leaves them closed (docs/notes/2026-12-01-landing.md, "A signed budget
    loop, and two ways to let routers reopen")."""
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
    """Global average pool -> Linear -> ReLU -> Linear -> 2 logits (execute, skip).

    norm: the logit gap is batch-normalised (BatchNorm1d, running statistics at test): its spread
    over the images is the norm's weight whatever the scale the features give it, so the router is
    decided image by image from the first step (a route per image), and its bias alone sets the
    share of the images that run the block. Without it the gap's spread over images starts at 0
    and grows slowly, and a router pushed to an execution rate between 0 and 1 sits undecided at
    r ~ 0.5 for every image, where noise decides (BENCHMARKS.md, "Routes that depend on the image").
    The spread is fixed (the norm's weight is a buffer, not trained): the straight-through gate
    chatters where a block's benefit meets its price, and a trained spread and bias slide to 0
    together there, giving every image r = 0.5 (BENCHMARKS.md, "Why the dynamic recipe misses its
    landing: a router on the threshold, and a loop that cycles")."""

    # p(execute) = softmax(logits)[0] at the start (TrainConfig.router_open, router_start)
    OPEN = 0.9
    SPREAD = 1.0   # norm: the logit gap's standard deviation over the images at the start

    def __init__(self, channels: int, hidden: int, open_p: float = OPEN, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        self.norm = nn.BatchNorm1d(1) if norm else None
        if self.norm is not None:   # the spread: a buffer under the parameter's name (checkpoints keep their keys)
            weight = self.norm.weight.detach()
            del self.norm.weight
            self.norm.register_buffer("weight", weight)
        self.open_(open_p)

    @torch.no_grad()
    def open_(self, p: float) -> None:
        """Start with p(execute) = p: logit gap log(p / (1 - p)). Without norm, for every input: the
        gap split evenly over the two logits and a zero last layer, so the features cannot move the
        start (trained features, as in a warm start, are large enough to put a random layer's logits
        anywhere); fc2's weights get a gradient from the first step, fc1's once fc2 has grown (as
        zero-init residuals learn). With norm, the median image's: the norm's bias, the spread SPREAD
        (the last layer stays random, so that the gap varies over images from the start)."""
        gap = math.log(p / (1 - p))
        if self.norm is not None:
            self.norm.bias.fill_(gap)
            self.norm.weight.fill_(self.SPREAD)
            self.fc2.bias.zero_()
            return
        self.fc2.bias.copy_(torch.tensor([0.5 * gap, -0.5 * gap]))
        self.fc2.weight.zero_()

    @torch.no_grad()
    def shift_(self, delta: torch.Tensor | float) -> None:
        """Add delta to the logit gap of every input: the same decision function, re-centred."""
        bias = self.fc2.bias if self.norm is None else self.norm.bias
        delta = torch.as_tensor(delta, dtype=bias.dtype, device=bias.device)
        if self.norm is not None:
            bias.add_(delta)
        else:
            bias.add_(torch.stack([0.5 * delta, -0.5 * delta]))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, 2); z: x's global average pool (B, C), when already known."""
        z = x.mean(dim=(2, 3)) if z is None else z
        logits = self.fc2(F.relu(self.fc1(z)))
        if self.norm is None:
            return logits
        gap = self.norm((logits[:, :1] - logits[:, 1:]).float()).to(logits.dtype)   # (B, 1)
        return torch.cat([0.5 * gap, -0.5 * gap], 1)
