"""Routed ResNets: CIFAR ResNets of depth 6n+2 (basic blocks) and ResNet-50 (bottlenecks).

Every residual block carries a router and can be skipped. Three ways to run the blocks:

    soft  training, Eq. 4:  x' = r * F(x) + (1 - r) * S(x)     every block runs on every sample
    straight  training, straight-through: Eq. 4 with r replaced by Eq. 11's 0/1 decision g in the
          forward pass and by r in the backward (g + r - sg(r)): each image trains on the route it
          will be tested on, and the routers still get Eq. 3's gradient
    stochastic  training, straight-through with g drawn from Bernoulli(r) (the hard Gumbel gate of
          ConvNet-AIG): an undecided router runs its block on a random share of the images, so every
          block trains and its router learns, image by image, where running it lowers the loss
    hard  testing, Eq. 11:  each block runs only on the samples routed through it (gather ->
          block -> scatter), so time falls with FLOPs
    mask  testing, Eq. 11 as the public implementations do it: every block runs on every sample
          and the result is multiplied by the 0/1 gate (reference for `hard`, and a baseline)
    capacity  testing, Eq. 11 with static shapes (Mixture-of-Depths' capacity): block b runs on
          exactly k_b = ceil(capacity_b * B) images of a batch of B, the top k_b of its router's r;
          slots with r < threshold are padding (their output is the shortcut), and images the
          router wants beyond k_b are dropped (shortcut). No host sync and no data-dependent
          shape, so it can be captured (torch.compile, CUDA graphs); with capacities >= the
          routed shares it computes what `hard` does. The capacities are buffers of the
          routers (set_capacity; 1 until set: every block on the whole batch)

F(x) = relu(residual(x) + S(x)) is the whole block, S its shortcut. A skipped block passes x
through its shortcut only: the identity for most blocks; for a shape-changing block (stride 2
and/or more channels) the shortcut still has to change the shape, so a skipped one outputs S(x):
parameter-free 2x2 average pooling plus zero channel padding in CIFAR ResNets (BlockDrop's
choice, no FLOPs), the 1x1 projection + BN in ResNet-50 (its cost is paid whether the block runs
or not, so it belongs to the network's fixed cost, not to the block's routable cost).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router import Router, hard_route, soft_route, straight_through

ROUTINGS = ("soft", "straight", "stochastic", "hard", "mask", "sample", "capacity")


# ----------------------------------------------------------------------------- helpers

def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut of CIFAR ResNets: 2x2 average pool, then zero channels appended."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class SoftBlend(torch.autograd.Function):
    """Eq. 4 of a block: lerp(sc, relu(res + sc), w). res, sc (B, C, H, W), w (B, 1, 1, 1).
    The same values and gradients as autograd through add, relu and lerp, with fewer passes over
    the activations in backward (the routed step's main extra cost over a plain ResNet's)."""

    @staticmethod
    def forward(ctx, res, sc, w):
        h = (res + sc).relu_()
        ctx.save_for_backward(h, sc, w)
        return torch.lerp(sc, h, w)

    @staticmethod
    def backward(ctx, g):
        h, sc, w = ctx.saved_tensors
        if torch.compiler.is_compiling():   # relu' as a float: inductor's C++ code stores a bool mask 14x slower
            g_res = g * w * torch.sign(h)   # than a float one (h >= 0: sign(h) = (h > 0); BENCHMARKS.md, "CPU speed: no regression")
        else:
            g_res = torch.ops.aten.threshold_backward(g * w, h, 0)    # relu' = (h > 0)
        g_sc = torch.addcmul(g_res, g, 1 - w)
        g_w = None
        if ctx.needs_input_grad[2]:                                  # sum over C, H, W of g * (h - sc)
            g_w = torch.linalg.vecdot((h - sc).flatten(1), g.flatten(1)).view_as(w)
        return g_res, g_sc, g_w


# ----------------------------------------------------------------------------- blocks

class RoutedBlock(nn.Module):
    """A residual block with its router. Subclasses define `residual` and `shortcut`; the model
    asks the router (`route`) and then runs the block one way (`soft`, `mask` or `gather`)."""

    residual: nn.Module
    shortcut: nn.Module

    def __init__(self, cin: int, router_hidden: int, router_norm: bool = False):
        super().__init__()
        self.router = Router(cin, router_hidden, norm=router_norm)
        # routing="capacity": the share of a batch this block runs on (RoutedResNet.set_capacity)
        self.router.register_buffer("capacity", torch.ones(()))
        self.always = False   # run on every image, its router unused (ModelConfig.route_transitions)

    def route(self, x: torch.Tensor, beta: float, z: torch.Tensor | None = None, leak: float = 0.0) -> torch.Tensor:
        """x (B, C, H, W) -> r (B,), Eq. 3; z: x's global average pool (B, C) when known; leak:
        router.soft_route's gradient floor (training). A block that always runs: r = 1."""
        if self.always:
            return x.new_ones(x.shape[0])
        return soft_route(self.router(x, z), beta, leak)

    def soft(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Eq. 4: r * F(x) + (1 - r) * S(x), every image through the block."""
        sc = self.shortcut(x)
        return SoftBlend.apply(self.residual(x), sc, r.view(-1, 1, 1, 1).to(sc.dtype))

    def mask(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Eq. 11 as the public implementations run it: F(x) where g, else S(x); every image runs."""
        sc = self.shortcut(x)
        return torch.where(g.view(-1, 1, 1, 1), F.relu(self.residual(x) + sc), sc)

    def gather(self, x: torch.Tensor, g: torch.Tensor, in_place: bool = False,
               z: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 11 with the work that the route saves: F runs on the images with g only (gather ->
        block -> scatter). in_place: x is the model's own (no autograd), scatter into it. z: x's
        global average pool (B, C), updated in place to the output's when the shortcut is the
        identity (only the images that ran are pooled again)."""
        sc = self.shortcut(x)
        idx = g.nonzero().squeeze(1)
        if idx.numel() == g.numel():
            out = self.residual(x).add_(sc).relu_()
            if z is not None and sc is x:
                z.copy_(out.mean(dim=(2, 3)))
            return out
        if idx.numel() == 0:
            return sc
        xs = x.index_select(0, idx)
        # an identity shortcut of the gathered images is the gathered images: no second gather
        ran = self.residual(xs).add_(xs if sc is x else sc.index_select(0, idx)).relu_()
        if z is not None and sc is x:
            z.index_copy_(0, idx, ran.mean(dim=(2, 3)))
        return sc.index_copy_(0, idx, ran) if in_place else sc.index_copy(0, idx, ran)

    def capacity(self, x: torch.Tensor, g: torch.Tensor, score: torch.Tensor, k: int, in_place: bool = False,
                 z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 11 with static shapes: F runs on exactly k images, the top k of `score` (B,); of those,
        the ones without g are padding and output S(x), as do the images with g outside the top k
        (dropped). Returns the output and the gates that ran (B,) bool. in_place, z: as `gather`."""
        sc = self.shortcut(x)
        if k == 0:
            return sc, torch.zeros_like(g)
        if k == x.shape[0]:   # the whole batch: no gather
            out = torch.where(g.view(-1, 1, 1, 1), self.residual(x).add_(sc).relu_(), sc)
            if z is not None and sc is x:
                z.copy_(torch.where(g.view(-1, 1), out.mean(dim=(2, 3)), z))
            return out, g
        top = score.topk(k, sorted=False).indices                       # (k,)
        keep = g.index_select(0, top)                                    # (k,) False: a padding slot
        xs = x.index_select(0, top)
        ss = xs if sc is x else sc.index_select(0, top)
        ran = torch.where(keep.view(-1, 1, 1, 1), self.residual(xs).add_(ss).relu_(), ss)
        if z is not None and sc is x:
            z.index_copy_(0, top, torch.where(keep.view(-1, 1), ran.mean(dim=(2, 3)), z.index_select(0, top)))
        out = sc.index_copy_(0, top, ran) if in_place else sc.index_copy(0, top, ran)
        return out, torch.zeros_like(g).index_copy_(0, top, keep)

    def run(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The whole block on every image, no router (static routes); scale: the residual's factor
        (stochastic depth's 1 / keep probability in training)."""
        res = self.residual(x)
        return (res if scale == 1 else res.mul_(scale)).add_(self.shortcut(x)).relu_()


class BasicBlock(RoutedBlock):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, router_hidden: int, router_norm: bool = False):
        super().__init__(cin, router_hidden, router_norm)
        cout = planes
        self.residual = nn.Sequential(
            conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            conv3x3(cout, cout), nn.BatchNorm2d(cout))
        self.shortcut = PadShortcut(cin, cout, stride) if (stride != 1 or cin != cout) else nn.Identity()


class Bottleneck(RoutedBlock):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, router_hidden: int, router_norm: bool = False):
        super().__init__(cin, router_hidden, router_norm)
        cout = planes * self.expansion
        self.residual = nn.Sequential(
            conv1x1(cin, planes), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            conv3x3(planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            conv1x1(planes, cout), nn.BatchNorm2d(cout))
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ArchSpec:
    block: type
    stages: tuple[int, ...]   # blocks per stage
    widths: tuple[int, ...]   # planes per stage
    stem: str                 # "cifar": 3x3 conv; "imagenet": 7x7/2 conv + 3x3/2 max pool


def _cifar(depth: int) -> ArchSpec:
    n = (depth - 2) // 6
    return ArchSpec(BasicBlock, (n, n, n), (16, 32, 64), "cifar")


ARCHS: dict[str, ArchSpec] = {f"resnet{d}": _cifar(d) for d in (8, 14, 20, 32, 44, 56, 74, 110)}
ARCHS["resnet50"] = ArchSpec(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet110"
    num_classes: int = 10
    input_size: int = 32      # pixels (square inputs)
    beta: float = 5.0         # Eq. 3 temperature of the soft routing variable
    router_hidden: int = 32   # width of the router's hidden linear layer
    router_open: float = 0.9  # p(execute) of every router at initialisation (router.Router.open_)
    router_norm: bool = False # the routers' logit gap batch-normalised (router.Router)
    route_transitions: bool = True  # False: the blocks that change the shape (stride 2, more channels) run on
                              # every image, as ConvNet-AIG leaves its downsampling layers ungated
    leak: float = 0.0         # gradient floor of r w.r.t. the router's logit gap (router.soft_route)
    zero_init_residual: bool = False  # last BN of each residual branch starts at 0: every block starts
                                      # as its shortcut (Goyal et al.), so a deep ResNet trains like a shallow one first
    static_route: tuple[bool, ...] | None = None  # a baseline's fixed route (baselines.py): no routers run
    drop_path: float = 0.0    # stochastic depth of a static route (Huang et al. 2016): in training, block l of
                              # L is skipped for the whole batch with probability drop_path * l / L

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8 pixels, got {self.input_size}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {self.beta}")
        if self.router_hidden < 1:
            raise ValueError(f"router_hidden must be >= 1, got {self.router_hidden}")
        if not 0.5 < self.router_open < 1:
            raise ValueError(f"router_open must be in (0.5, 1), got {self.router_open}")
        if not (math.isfinite(self.leak) and self.leak >= 0):
            raise ValueError(f"leak must be finite and >= 0, got {self.leak}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.drop_path and self.static_route is None:
            raise ValueError("drop_path is for static routes; a routed network's routers choose what to skip")
        if self.static_route is not None and len(self.static_route) != sum(ARCHS[self.arch].stages):
            raise ValueError(f"static_route has {len(self.static_route)} entries, {self.arch} has "
                             f"{sum(ARCHS[self.arch].stages)} blocks")


class RoutedOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes)
    r: torch.Tensor       # (B, blocks) soft routing variables (Eq. 3)
    gates: torch.Tensor   # (B, blocks) bool, the hard decisions (Eq. 11) or the forced ones (capacity: those run)


# ----------------------------------------------------------------------------- model

class RoutedResNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        spec = ARCHS[cfg.arch]
        # Inputs arrive as floats in [0, 1]; the dataset's statistics live in the model so a
        # checkpoint (or an exported model) needs nothing else to be used.
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("std", torch.ones(3))
        # Eq. 11's threshold (0.5); budget calibration may move it after training (controller.py)
        self.register_buffer("threshold", torch.tensor(0.5))
        if spec.stem == "cifar":
            cin = spec.widths[0]
            self.stem = nn.Sequential(conv3x3(3, cin), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        else:
            cin = 64
            self.stem = nn.Sequential(nn.Conv2d(3, cin, 7, 2, 3, bias=False), nn.BatchNorm2d(cin),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks = []
        for i, (n, planes) in enumerate(zip(spec.stages, spec.widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(spec.block(cin, planes, stride, cfg.router_hidden, cfg.router_norm))
                cin = planes * spec.block.expansion
        self.blocks = nn.ModuleList(blocks)
        for b in self.blocks:
            b.router.open_(cfg.router_open)
            b.always = not cfg.route_transitions and not isinstance(b.shortcut, nn.Identity)
        self.fc = nn.Linear(cin, cfg.num_classes)
        # the blocks' capacities (routing="capacity") as Python floats: static shapes under compile
        self._capacity = (1.0,) * len(blocks)
        self.register_load_state_dict_post_hook(_capacity_loaded)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.zero_init_residual:
            for b in self.blocks:
                nn.init.zeros_(b.residual[-1].weight)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def set_normalization(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    @property
    def capacity(self) -> torch.Tensor:
        """(n,) the blocks' capacities: routing="capacity" runs block b on ceil(capacity[b] * B) images."""
        return torch.stack([b.router.capacity for b in self.blocks])

    @torch.no_grad()
    def set_capacity(self, capacity) -> None:
        """capacity (n,) in [0, 1], e.g. a capacity factor times the blocks' execution rates on val."""
        c = torch.as_tensor(capacity, dtype=torch.float32).flatten()
        if c.shape != (self.num_blocks,) or not bool(((c >= 0) & (c <= 1)).all()):
            raise ValueError(f"capacity must be {self.num_blocks} shares in [0, 1], got {capacity}")
        for b, v in zip(self.blocks, c):
            b.router.capacity.copy_(v)
        self._capacity = tuple(c.tolist())

    def capacity_k(self, batch: int) -> list[int]:
        """Images each block runs on under routing="capacity" in a batch of `batch` (1e-6: float noise)."""
        return [min(batch, math.ceil(c * batch - 1e-6)) for c in self._capacity]

    def router_parameters(self):
        return [p for b in self.blocks for p in b.router.parameters()]

    def param_groups(self) -> list[dict]:
        """The optimizer's groups: the network, then the routers (their lr can follow another schedule,
        TrainConfig.router_lr); a static route has no routers, so no second group."""
        routers = {id(p) for p in self.router_parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in routers], "router": False},
                  {"params": self.router_parameters(), "router": True}]
        return [g for g in groups if g["params"]]

    def forward_features(self, x, routing: str = "soft", threshold=None, gates=None):
        """x (B, 3, H, W) in [0, 1] -> features (B, C, h, w), r (B, n), gates (B, n).
        threshold: execute iff r >= threshold (default: the model's own, 0.5 unless calibrated).
        capacity: the returned gates are
        those that ran (the routers' decisions are r >= threshold)."""
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        threshold = self.threshold if threshold is None else threshold
        x = self.stem((x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1))
        if self.cfg.static_route is not None:   # every image the same blocks: no router, no gather
            for i, (block, on) in enumerate(zip(self.blocks, self.cfg.static_route)):
                drop = self.cfg.drop_path * (i + 1) / len(self.blocks) if self.training else 0.0
                if not on or (drop and torch.rand(()).item() < drop):
                    x = block.shortcut(x)
                else:   # inverted scaling: testing runs the plain block
                    x = block.run(x, 1 / (1 - drop))
            g = torch.tensor(self.cfg.static_route, device=x.device).expand(x.shape[0], -1)
            return x, g.to(x.dtype), g
        # inference: x's global average pool goes from block to block -- an image that skips an
        # identity block keeps its pool, so only the images a block ran are pooled again
        fast = routing in ("hard", "sample", "capacity") and not torch.is_grad_enabled()
        ks = self.capacity_k(x.shape[0]) if routing == "capacity" else None
        z, rs, gs = None, [], []
        for i, block in enumerate(self.blocks):
            if fast and z is None:
                z = x.mean(dim=(2, 3))
            r = block.route(x, self.cfg.beta, z, self.cfg.leak)
            if gates is not None:
                g = gates[:, i]
            elif routing in ("sample", "stochastic"):   # Ber-Dis (Table 4b): each gate drawn from Bernoulli(r)
                g = torch.bernoulli(r.detach().float()).bool()
            else:
                g = hard_route(r.detach(), threshold)
            if routing == "soft":
                x = block.soft(x, r)
            elif routing in ("straight", "stochastic"):
                x = block.soft(x, straight_through(g, r))
            elif routing == "mask":
                x = block.mask(x, g)
            elif routing == "capacity":   # the routed images first, by r (forced gates: r's order among them)
                score = torch.where(g, r.detach() + 2, r.detach())
                x, g = block.capacity(x, g, score, ks[i], in_place=fast, z=z)
                if not isinstance(block.shortcut, nn.Identity):
                    z = None
            else:
                x = block.gather(x, g, in_place=fast, z=z)
                if not isinstance(block.shortcut, nn.Identity):
                    z = None   # the shape changed: pool again
            rs.append(r)
            gs.append(g)
        return x, torch.stack(rs, 1), torch.stack(gs, 1)

    @torch.inference_mode()
    def route_intervals(self, x: torch.Tensor, lo: float, hi: float):
        """Every hard route each image takes while the threshold t sweeps (lo, hi], in one pass:
        x (B, 3, H, W) in [0, 1] -> image (R,), t_lo (R,), t_hi (R,) float64, gates (R, n) bool;
        image[j] runs route gates[j] for every t in (t_lo[j], t_hi[j]]. A block runs iff r >= t, so a
        row whose interval holds the block's r splits in two: (t_lo, r] runs it, (r, t_hi] skips it;
        both go on. The routes are exactly those of `forward(routing="hard", threshold=t)`."""
        if self.cfg.static_route is not None:
            raise ValueError("a static route has no threshold to sweep")
        x = self.stem((x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1))
        B = x.shape[0]
        image = torch.arange(B, device=x.device)
        t_lo = torch.full((B,), lo, dtype=torch.float64, device=x.device)
        t_hi = torch.full((B,), hi, dtype=torch.float64, device=x.device)
        gates = torch.zeros(B, 0, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            r = block.route(x, self.cfg.beta).double()   # float32 values, compared exactly
            split = ((t_lo < r) & (r < t_hi)).nonzero().squeeze(1)
            if split.numel():
                x, image, gates = (torch.cat([v, v.index_select(0, split)]) for v in (x, image, gates))
                runs = t_hi.index_copy(0, split, r[split])          # (t_lo, r]: runs the block
                t_lo, t_hi = torch.cat([t_lo, r[split]]), torch.cat([runs, t_hi[split]])  # + (r, t_hi]: skips
                r = torch.cat([r, r[split]])
            on = t_hi <= r                                            # the whole interval runs the block
            x = block.gather(x, on)
            gates = torch.cat([gates, on[:, None]], 1)
        return image, t_lo, t_hi, gates

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x, routing: str = "soft", threshold=None, gates=None) -> RoutedOutput:
        feats, r, g = self.forward_features(x, routing, threshold, gates)
        return RoutedOutput(self.forward_head(feats), r, g)


def _capacity_loaded(model: RoutedResNet, keys) -> None:
    """load_state_dict's post-hook: a state written before routing="capacity" keeps the capacities."""
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.endswith(".router.capacity")]
    model.set_capacity(model.capacity)


def build_model(arch: str, num_classes: int = 10, input_size: int = 32, **kw) -> RoutedResNet:
    return RoutedResNet(ModelConfig(arch, num_classes, input_size, **kw))

