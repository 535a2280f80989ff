"""The training step: one optimisation step of the trainer, eager or compiled.

    train_step(model, optimizer, images, labels, generator, ...)    eager, every phase
    CompiledStep(model, optimizer, ...)(images, labels, generator, ...)
                                                                     the main epochs under torch.compile

A main-epoch step: M augmented views of each of the L images, drawn on the device as one batch
of L*M (data.make_views: sample-major, the groups of Eq. 5), one forward under soft or
straight-through routing, Eq. 9, backward, SGD. Nothing in it reads a value back to the host: the
budget loop reads the batches' hard cost every few steps (TrainConfig.controller_every), mu and the
learning rate enter as tensors. CompiledStep runs the forward and Eq. 9 as one compiled graph
(AOTAutograd compiles its backward too) and the optimizer's update as another; on CUDA under
mode="reduce-overhead", so that each is replayed as a CUDA graph instead of ~2k kernel launches.
The views are augmented outside the graph: their draws come from the trainer's seeded generator,
so a compiled run sees the very images an eager one does.
"""
import contextlib

import torch
import torch.nn.functional as F

from .data import make_views, random_crop_flip
from .losses import LossWeights, distill_loss, drn_loss
from .router import straight_through

PARTS = ("cls", "consistency", "diversity", "cost", "reg", "rate")


def distilled(loss: torch.Tensor, logits: torch.Tensor, xs: torch.Tensor, teacher, weight: float) -> torch.Tensor:
    """loss + weight * the distillation loss from a frozen `teacher` (eval mode: its running BN
    statistics) on the same views xs; loss as it is when there is no teacher."""
    if teacher is None or weight == 0:
        return loss
    with torch.no_grad():
        target = teacher(xs, routing="hard").logits.float()
    return loss + weight * distill_loss(logits.float(), target)


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_bn_stats(model):
    """Batch norm normalises with the batch's statistics but leaves its running ones as they are."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, v in zip(bns, saved):
            m.momentum = v


def main_loss(model, xs: torch.Tensor, labels: torch.Tensor, views: int, cost_norm: torch.Tensor, mu,
              weights: LossWeights, *, amp: bool = True, routing: str = "soft", consistency_routes: str = "soft",
              full_pass: float = 0.0, rate_target: torch.Tensor | None = None,
              rate_routes: str = "executed", teacher=None, distill: float = 0.0, inplace: float = 0.0):
    """The main epochs' forward and Eq. 9: xs (L*M, C, H, W) the views, sample-major; labels (L,);
    rate_target (n,): the blocks' target execution rates (losses.rate_loss), or None; rate_routes: whose
    rates it reads, the routes the views ran ("executed", straight-through) or r ("soft"); teacher,
    distill: a frozen network and the weight of the distillation loss from it (distilled); inplace: the
    weight of the distillation loss from the full pass (detached) to the routed pass of the same views.
    Returns the loss, its parts stacked in PARTS order (detached), the model output, the labels (L*M,)."""
    L, dev = labels.shape[0], xs.device
    y = labels.repeat_interleave(views)
    with autocast(dev, amp):
        out = model(xs, routing=routing)
        r, run, rate_run = out.r.float(), None, None
        ran = routing in ("straight", "stochastic")   # a view ran its 0/1 route g; r's gradient (straight-through)
        if consistency_routes == "executed":
            run = (straight_through(out.gates, r) if ran else r).view(L, views, -1)
        if rate_target is not None and rate_routes == "executed" and ran:
            rate_run = straight_through(out.gates, r)
        loss, parts = drn_loss(out.logits.float(), y, r.view(L, views, -1), cost_norm, mu, weights, run, rate_target,
                               rate_run)
        if full_pass > 0:
            first = xs[::views]
            with frozen_bn_stats(model):
                full = model(first, routing="mask", gates=torch.ones(first.shape[0], model.num_blocks,
                                                                     dtype=torch.bool, device=dev))
            loss = loss + full_pass * F.cross_entropy(full.logits.float(), labels)
            if inplace > 0:
                loss = loss + inplace * distill_loss(out.logits.float()[::views], full.logits.float().detach())
        loss = distilled(loss, out.logits, xs, teacher, distill)
    return loss, torch.stack([parts[k] for k in PARTS]), out, y


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
               views: int, finetune: bool, cost_norm: torch.Tensor, mu: float, weights: LossWeights,
               amp: bool = True, routing: str = "soft", consistency_routes: str = "soft",
               full_pass: float = 0.0, view_augment: str = "same", channels_last: bool = False,
               rate_target: torch.Tensor | None = None, rate_routes: str = "executed", teacher=None,
               distill: float = 0.0, inplace: float = 0.0):
    """One optimisation step on a batch of L uint8 images (L, C, H, W) and labels (L,): M = `views`
    augmented views of each, forward under `routing` (soft, Eq. 4, or straight-through), Eq. 9 (or
    CE under hard routing when finetuning or for a static route), Eq. 5 and 10 on r or on the routes the views ran
    (`consistency_routes`), backward, SGD; full_pass: the weight of a second cross-entropy, of the
    full network (every block) on the first view of each image, so that every block trains on every
    image whatever the routes (BN running statistics are left to the routed pass); teacher, distill:
    the distillation loss's frozen network and weight, in every phase; inplace: main_loss's. Returns the loss
    (detached), its parts (PARTS order, stacked), the model output and the labels (L*M,)."""
    dev = images.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.float().div_(255)
    if finetune:  # frozen routers (or none), hard routing: train what testing will run
        y = labels.repeat_interleave(views)
        xs = random_crop_flip(x.repeat_interleave(views, 0) if views > 1 else x, generator)
        with autocast(dev, amp):
            out = model(xs.contiguous(memory_format=fmt), routing="hard")
            loss = F.cross_entropy(out.logits.float(), y)
            loss = distilled(loss, out.logits, xs, teacher, distill)
        parts = torch.cat([loss.detach().view(1), torch.zeros(len(PARTS) - 1, device=dev)])
    else:
        xs = make_views(x, views, generator, view_augment).contiguous(memory_format=fmt)
        loss, parts, out, y = main_loss(model, xs, labels, views, cost_norm, mu, weights, amp=amp, routing=routing,
                                        consistency_routes=consistency_routes, full_pass=full_pass,
                                        rate_target=rate_target, rate_routes=rate_routes, teacher=teacher,
                                        distill=distill, inplace=inplace)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts, out, y


def set_lr(group: dict, lr: float) -> None:
    """A parameter group's lr: in place when it is a tensor (a compiled optimizer step reads it as
    an input, so a new value recompiles nothing)."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class CompiledStep:
    """The main epochs' step with the forward + Eq. 9 and the optimizer's update compiled: backend
    inductor (mode "reduce-overhead" on CUDA: its kernels replayed as CUDA graphs; its default on CPU)
    or cudagraphs (CUDA: the eager kernels captured and replayed, nothing generated). The same
    computation as train_step(finetune=False), to float rounding (tests/test_step.py)."""

    def __init__(self, model, optimizer, *, weights: LossWeights, amp: bool = True, routing: str = "soft",
                 consistency_routes: str = "soft", full_pass: float = 0.0,
                 view_augment: str = "same", channels_last: bool = False, backend: str = "inductor",
                 mode: str | None = None, rate_target: torch.Tensor | None = None, rate_routes: str = "executed",
                 teacher=None, distill: float = 0.0, inplace: float = 0.0):
        self.model, self.optimizer = model, optimizer
        self.view_augment, self.channels_last = view_augment, channels_last
        device = next(model.parameters()).device
        cuda = device.type == "cuda"
        if backend not in ("inductor", "cudagraphs") or (backend == "cudagraphs" and not cuda):
            raise ValueError(f"backend must be inductor, or cudagraphs on CUDA; got {backend!r}")
        mode = None if backend == "cudagraphs" else mode or ("reduce-overhead" if cuda else "default")
        self.graphs = backend == "cudagraphs" or (cuda and mode == "reduce-overhead")
        compile_ = lambda fn: torch.compile(fn, backend=backend, mode=mode)
        self.kw = dict(weights=weights, amp=amp, routing=routing, consistency_routes=consistency_routes,
                       full_pass=full_pass, rate_target=rate_target, rate_routes=rate_routes,
                       teacher=teacher, distill=distill, inplace=inplace)
        for g in optimizer.param_groups:   # tensors, so that a new lr is an input, not a recompile
            g["lr"] = torch.tensor(float(g["lr"]))
            g["foreach"], g["fused"] = True, False
        self.mu = torch.zeros((), device=device)
        self.calls = 0   # steps done: the first one compiles
        self._loss = compile_(main_loss)
        self._update = compile_(optimizer.step)

    def __call__(self, images, labels, generator, *, views: int, cost_norm: torch.Tensor, mu: float):
        x = images.float().div_(255)
        xs = make_views(x, views, generator, self.view_augment)
        if self.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        self.mu.fill_(mu)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, parts, out, y = self._loss(self.model, xs, labels, views, cost_norm, self.mu, **self.kw)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._update()
        self.calls += 1
        if self.graphs:   # the graphs' outputs live in their memory pool until the next replay
            loss, parts, out = loss.detach().clone(), parts.clone(), type(out)(*(t.clone() for t in out))
        return loss.detach(), parts, out, y
