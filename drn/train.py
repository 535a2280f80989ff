"""The trainer: the same code for drn-train and for every search trial.

    train(cfg, on_epoch=callback)  ->  final metrics

The caller learns about each epoch through `on_epoch(metrics)`; returning True stops training
after that epoch's checkpoint is written (how a scheduler stops a trial, or a test interrupts).
"""
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .baselines import k_for_budget, randomk_at_budget, static_route
from .calibrate import TRIM, trim_threshold
from .checkpoint import load_checkpoint, model_for, model_from_checkpoint, save_checkpoint
from .config import TrainConfig, UsageError, resolve_target
from .controller import RateHold, controller_for
from .cost import CostTable, measure_cost_table, measure_latency_table
from .data import Dataset, load_dataset, random_crop_flip
from .evaluate import CAPACITY_FACTOR, capacity_from_rates, evaluate, threshold_curve
from .losses import LossWeights
from .models import ARCHS, build_model
from .router import logit_gap
from .step import PARTS, CompiledStep, set_lr, train_step  # noqa: F401 (train_step: drn.train's API)
from .step import autocast as _autocast
from .warmstart import greedy_route, warm_start

CHECKPOINT = "checkpoint.pt"


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {spec} asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(spec)


def _progress(m: dict, total_epochs: int) -> str:
    target = f" target {m['target']:.3g}{'ms' if m['target_unit'] == 'ms' else ''}" if m.get("target") else ""
    latency = f" {m['latency_ms']:.3g}ms" if "latency_ms" in m else ""
    return (f"epoch {m['epoch']}/{total_epochs} {m['phase']:<8} lr {m['lr']:.3g} "
            f"loss {m['loss']:.3f} (cls {m['loss_cls']:.3f} cons {m['loss_consistency']:.3f} "
            f"div {m['loss_diversity']:.3f} cost {m['loss_cost']:.3f} reg {m['loss_reg']:.3f}) "
            f"train {m['train_accuracy']:.1%} | val {m['accuracy']:.2%} "
            f"flops {m['flops']:.3g} ({m['flops'] / m['flops_full']:.0%}){latency}{target} "
            f"K {m['k']:.1f}/{m['k_full']} paths {m['distinct_paths']} mu {m['mu']:.3g} "
            f"| {m['epoch_seconds']:.1f}s" + (f" | test {m['test_accuracy']:.2%}" if "test_accuracy" in m else ""))


def _regrouped(state: dict, optimizer: torch.optim.Optimizer, params: list) -> dict:
    """An optimizer state saved before the routers had their own parameter group (one group, in
    `model.parameters()` order), re-indexed into `optimizer`'s groups: every momentum buffer stays
    with its parameter. Any other state is returned as it is."""
    if len(state["param_groups"]) == len(optimizer.param_groups) or len(state["param_groups"]) != 1:
        return state
    old = {id(p): i for i, p in enumerate(params)}
    groups, moved, j = [], {}, 0
    for g in optimizer.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": []})
        for p in g["params"]:
            if old[id(p)] in state["state"]:
                moved[j] = state["state"][old[id(p)]]
            groups[-1]["params"].append(j)
            j += 1
    return {"state": moved, "param_groups": groups}


def _resumed(cfg: TrainConfig) -> dict:
    if not (Path(cfg.out) / CHECKPOINT).exists():
        raise UsageError(f"nothing to resume: {Path(cfg.out) / CHECKPOINT} does not exist")
    return load_checkpoint(Path(cfg.out) / CHECKPOINT)


def _data(cfg: TrainConfig, data: Dataset | None, ckpt: dict | None) -> Dataset:
    """The run's images (given, or loaded with a resumed run's own val carve)."""
    data = data if data is not None else load_dataset(
        cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.val_seed, None if ckpt is None else ckpt["val_index"])
    if ckpt is not None and tuple(ckpt["val_index"]) != data.val_index:
        raise UsageError("the data's val split is not the one this run was trained with")
    return data


class Trainer:
    """Holds the state of one training run; `run()` trains to the end (or until stopped)."""

    def __init__(self, cfg: TrainConfig, data: Dataset | None = None, resume: bool = False,
                 log: Callable[[str], None] | None = None, init_checkpoint: dict | None = None):
        """`init_checkpoint`: the checkpoint at cfg.init, already loaded (drn-search's backbone)."""
        ckpt = _resumed(cfg) if resume else None
        self.cfg = cfg = cfg if ckpt is None else TrainConfig.from_dict(ckpt["config"])
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.device = select_device(cfg.device)
        self.data = _data(cfg, data, ckpt)
        torch.manual_seed(cfg.seed)
        self.model = self._build(ckpt, init_checkpoint)
        cfg, cuda = self.cfg, self.device.type == "cuda"   # a static route's k is settled in _build
        self.static = cfg.routing != "drn"
        self.teacher = self._teacher(init_checkpoint) if cfg.distill > 0 and cfg.distill_from == "init" else None
        self._place(cuda)
        self.cost = measure_cost_table(self.model)
        self.budget = self._budget_table(ckpt)
        # a static baseline is trained at its k: the target only chose k, it is not steered to
        self.target = resolve_target(cfg.target, self.budget.full, self.budget.fixed,
                                     "FLOPs" if self.budget.unit == "flops" else "ms")
        if ckpt is None:
            self._start_routers()
        n = self.data.train.labels.shape[0]
        self.controller = controller_for(cfg, self.target, self.cost.num_blocks, max(1, n // min(cfg.batch_size, n)),
                                         warm=self._warm_mu())
        # the finetune's rate hold (BENCHMARKS.md, "The finetune holds the routers' rates: ResNet-56 lands 3
        # of 3"); None: frozen routers only. budget: it also lands the held rates on the target
        held = cfg.finetune_rates != "free" and self.target is not None and not self.static and cfg.finetune_epochs > 0
        self.hold, self.steer_finetune = RateHold() if held else None, held and cfg.finetune_rates == "budget"
        self.step_options = self._step_options()
        # fused on CUDA: one kernel per update instead of one per parameter (a compiled step fuses its own)
        self.optimizer = torch.optim.SGD(self.model.param_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, fused=cuda and cfg.compile == "off")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.epoch, self.history, self.calibration = 0, [], None   # completed epochs, their metrics, the trim
        self.test_metrics: dict | None = None
        if ckpt is not None:
            self._restore(ckpt, cuda)
        self.train_split, self.val_split = (d._replace(images=d.images.to(self.device), labels=d.labels.to(self.device))
                                            for d in (self.data.train, self.data.val))

    def _build(self, ckpt: dict | None, init_checkpoint: dict | None):
        """The model: the checkpoint's, or a new one (a static baseline's k from the FLOPs target; the
        normalisation from the training images; the --init weights)."""
        self.init_info = None if ckpt is None else ckpt.get("init_info")
        if ckpt is not None:
            return model_from_checkpoint(ckpt)[0]
        cfg = self.cfg
        if cfg.routing not in ("drn", "full") and cfg.k is None:   # a static baseline at the FLOPs target
            k, route = self._k_for_target(cfg)
            cfg = self.cfg = dataclasses.replace(cfg, k=k, route=route)
        model = model_for(cfg, self.data.num_classes, self.data.input_size)
        model.set_normalization(*self.data.channel_stats())
        if cfg.init is not None:
            self.init_info = warm_start(model, cfg.init, cfg.dataset, self.data.val_index, init_checkpoint)
        return model

    def _place(self, cuda: bool) -> None:
        """The model on the device, in its memory format; how the step runs there."""
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.compile == "cudagraphs" and not cuda:
            raise UsageError(f"--compile cudagraphs needs a CUDA device, and this run is on {self.device}")
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the loop's reading of the batches' cost is a host sync: every step on CPU, where it costs nothing
        self.controller_every = cfg.controller_every or (8 if cuda else 1)
        self.compiled: CompiledStep | None = None   # the main epochs' step under torch.compile, made on first use
        self.compile_failed = False   # it did not compile here: the run goes on eager

    def _budget_table(self, ckpt: dict | None) -> CostTable:
        """The budget's cost table: FLOPs, or per-block latency measured once on this device (kept in
        the checkpoint, so a resumed run optimises the same Eq. 8 weights)."""
        if ckpt is not None and ckpt.get("budget_table"):
            return CostTable(**{**ckpt["budget_table"], "block": tuple(ckpt["budget_table"]["block"])})
        if self.cfg.target_latency_ms is not None:
            return measure_latency_table(self.model, self.cfg.latency_batch)
        return self.cost

    def _start_routers(self) -> None:
        cfg = self.cfg
        if cfg.router_start == "undecided" and not self.static:
            for block in self.model.blocks:
                block.router.open_(0.5)
            self.log("routers start undecided (p = 0.5)")
        elif cfg.router_start != "open" and self.target is not None and not self.static:
            route, undecided = self._start_on_budget()
            self.log(f"routers start on the budget: blocks {[i for i, on in enumerate(route) if on and i not in undecided]}"
                     f" open, {undecided} undecided (p = 0.5), the others closed")

    def _warm_mu(self) -> bool:
        """Whether the loop starts at the warm mu: from --init with the routers on the budget
        (controller.controller_for)."""
        cfg = self.cfg
        return (cfg.init is not None and self.target is not None and not self.static
                and cfg.router_start not in ("open", "undecided"))

    def _step_options(self) -> dict:
        """What every main step is run with, eager or compiled (step.train_step, step.CompiledStep)."""
        cfg = self.cfg
        rate_target = None   # the rate loss's: every block at the budget's share of the routable cost, or in a band
        if self.target is not None and not self.static and cfg.rate_weight > 0:
            share = min(1.0, max(0.0, (self.target - self.budget.fixed) / sum(self.budget.block)))
            lo, hi = (cfg.rate_band, 1 - cfg.rate_band) if cfg.rate_band > 0 else (share, share)
            rate_target = torch.tensor([lo, hi], device=self.device).view(2, 1).expand(2, self.cost.num_blocks)
        return dict(weights=LossWeights(cfg.lam, cfg.alpha, cfg.gamma, cfg.d_c, cfg.d_d, cfg.rate_weight),
                    amp=cfg.amp, routing=cfg.train_routing, consistency_routes=cfg.consistency_routes,
                    full_pass=cfg.full_pass, view_augment=cfg.view_augment, channels_last=self.channels_last,
                    rate_target=rate_target, rate_routes=cfg.rate_routes, teacher=self.teacher,
                    distill=cfg.distill, inplace=cfg.distill if cfg.distill_from == "full" else 0.0)

    def _restore(self, ckpt: dict, cuda: bool) -> None:
        """Where the checkpoint's run stopped: optimizer, loop, hold, random state, history."""
        self.optimizer.load_state_dict(_regrouped(ckpt["optimizer"], self.optimizer, list(self.model.parameters())))
        for g in self.optimizer.param_groups:   # this device's implementation, not the saving run's
            g["lr"], g["fused"], g["foreach"] = float(g["lr"]), cuda and self.cfg.compile == "off", None
        self.controller.load_state_dict(ckpt["controller"])
        self.generator.set_state(ckpt["rng"]["data"].to("cpu"))
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.epoch, self.history = ckpt["epoch"], ckpt["history"]
        self.calibration, self.test_metrics = ckpt.get("calibration"), ckpt.get("test")
        if self.hold is not None and ckpt.get("rate_hold"):
            self.hold.load_state_dict(ckpt["rate_hold"])

    @torch.no_grad()
    def _teacher(self, ckpt: dict | None):
        """--distill's teacher: the drn checkpoint at --init as it was trained (every block of a
        plain network), frozen, in eval mode (its running BN statistics)."""
        teacher, _ = model_from_checkpoint(ckpt if ckpt is not None else load_checkpoint(self.cfg.init))
        return teacher.to(self.device).eval().requires_grad_(False)

    def _start_on_budget(self) -> tuple[tuple[bool, ...], list[int]]:
        """Start the routers on the budget rather than at the full network: a route's routers open
        (router_open), the others close (1 - router_open). greedy (a warm start): the route that the
        trained blocks lose least by on val (warmstart.greedy_route). deepk / distributedk: that
        static route whose cost is closest to the target; auto: DistributedK's, or DeepK's where
        DistributedK's runs the deepest stage on a single block (docs/notes/2026-12-02-static-routes.md, "The start
        route decides the DRN at this schedule; what it gains over static routes is its second view"). When the route misses the target by more
        than 2.5 %, one more block starts undecided (p = 0.5, about half the images: the next
        static route's, or the last block greedy dropped): its router is where Eq. 3 is
        steepest, so the budget loop can steer it to the target without a saturated router's cliff.
        TrainConfig.undecided_pairs more pairs start undecided (_undecided_pairs).
        Returns the start route and its undecided blocks."""
        b, target = self.budget, self.target
        cost = lambda route: b.route_cost(torch.tensor(route, dtype=torch.float32)).item()
        if self.cfg.router_start == "greedy":   # the route the trained blocks lose least by on val
            val = self.data.val
            route, last = greedy_route(self.model, val.images.to(self.device), val.labels.to(self.device), cost, target)
            # the last block dropped runs on about half the images: on the budget
            half = last if last is not None and abs(cost(route) / target - 1) > 0.025 else None
        else:
            kind = self.cfg.router_start
            route, half = self._static_start("distributedk" if kind == "auto" else kind, cost)
            last = ARCHS[self.cfg.arch].stages[-1]
            if kind == "auto" and last > 1 and sum(route[-last:]) + (half is not None and half >= len(route) - last) <= 1:
                route, half = self._static_start("deepk", cost)   # DistributedK's runs the deepest stage on one block
        undecided = sorted(({half} - {None}) | self._undecided_pairs(route, half))
        for i, (block, on) in enumerate(zip(self.model.blocks, route)):
            block.router.open_(0.5 if i in undecided else self.cfg.router_open if on else 1 - self.cfg.router_open)
        return route, undecided

    def _undecided_pairs(self, route: tuple[bool, ...], half: int | None) -> set[int]:
        """TrainConfig.undecided_pairs: an open and a closed block of the same stage and cost, the deepest
        stage first, both at p = 0.5: the expected cost stays the route's. Routed blocks only (a block
        that always runs has no router to start)."""
        out = set()
        starts = [sum(ARCHS[self.cfg.arch].stages[:s]) for s in range(len(ARCHS[self.cfg.arch].stages))]
        for s in reversed(range(len(starts))):
            if len(out) >= 2 * self.cfg.undecided_pairs:
                break
            idx = [j for j in range(starts[s], starts[s] + ARCHS[self.cfg.arch].stages[s])
                   if j != half and not self.model.blocks[j].always]
            cost = lambda j: self.budget.block[j]
            opened = [j for j in idx if route[j]]
            closed = [j for j in idx if not route[j]]
            pair = next(((a, b) for a in opened for b in closed if abs(cost(a) - cost(b)) <= 1e-6 * cost(a)), None)
            if pair:
                out.update(pair)
        return out

    def _static_start(self, kind: str, cost) -> tuple[tuple[bool, ...], int | None]:
        """The static route of `kind` nearest the target, or the one under it plus an undecided block."""
        stages, target = ARCHS[self.cfg.arch].stages, self.target
        routes = [tuple(static_route(kind, stages, k).tolist()) for k in range(1, len(self.budget.block) + 1)]
        route, half = min(routes, key=lambda r: abs(cost(r) - target)), None
        below = [r for r in routes if cost(r) <= target]
        if abs(cost(route) / target - 1) > 0.025 and below and len(below) < len(routes):
            route = max(below, key=cost)
            above = min((r for r in routes if cost(r) > cost(route)), key=cost)
            extra = [i for i, (a, o) in enumerate(zip(above, route)) if a and not o]
            half = min(extra, key=lambda i: abs(cost(route) + 0.5 * self.budget.block[i] - target))
        return route, half

    def _k_for_target(self, cfg: TrainConfig) -> tuple[int, tuple[int, ...] | None]:
        # the twin draws from a forked RNG: a static route then starts from the very weights that a
        # DRN of the same seed starts from (scratch against scratch from the same start)
        with torch.random.fork_rng(devices=[]):
            twin = build_model(cfg.arch, self.data.num_classes, self.data.input_size)
        table = measure_cost_table(twin)
        fixed = table.fixed - table.router                 # a static route runs no routers
        target = resolve_target(cfg.target_flops, fixed + sum(table.block), fixed, "FLOPs")
        stages = ARCHS[cfg.arch].stages
        if cfg.routing == "randomk":   # equal FLOPs: a random route within 5 % of the target
            route = randomk_at_budget(stages, list(table.block), fixed, target, cfg.seed)
            return len(route), route
        return k_for_budget(cfg.routing, stages, list(table.block), fixed, target, cfg.seed), None

    @property
    def cost_key(self) -> str:
        """The evaluation metric the budget is in."""
        return "latency_ms" if self.budget.unit == "ms" else "flops"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.out) / CHECKPOINT

    def state(self) -> dict:
        return {"config": self.cfg.to_dict(), "epoch": self.epoch,
                "num_classes": self.data.num_classes, "input_size": self.data.input_size,
                "classes": self.data.classes, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "controller": self.controller.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state()},
                "cost": self.cost.to_dict(), "budget_table": dataclasses.asdict(self.budget),
                "target": self.target, "calibration": self.calibration, "history": self.history,
                "val_index": list(self.data.val_index), "init_info": self.init_info, "test": self.test_metrics,
                "rate_hold": None if self.hold is None else self.hold.state_dict()}

    def train_epoch(self, finetune: bool) -> dict:
        """One epoch over the training images: the main phase (routers learn, the loop steers mu) or the
        finetune (routers frozen, hard routes, the rate hold). Returns the epoch's training metrics."""
        cfg, model, dev = self.cfg, self.model, self.device
        model.train()
        for p in model.router_parameters():
            p.requires_grad_(not finetune)
        images, labels = self.train_split
        n_img, L = labels.shape[0], min(cfg.batch_size, labels.shape[0])
        cost_norm, block_cost = self.budget.normalized(dev), self.budget.block_tensor(dev)
        steering = self.target is not None and not finetune and not self.static
        pending: list[torch.Tensor] = []   # batch costs the loop has not read yet (one host sync per controller_every)
        compiled = not finetune and self._compiled()
        names = ["loss", *PARTS, "correct"]
        sums, gate_sum, seen = torch.zeros(len(names), device=dev), torch.zeros(self.cost.num_blocks, device=dev), 0
        perm = torch.randperm(n_img, generator=self.generator, device=dev)
        steps = max(1, n_img // L)
        hold, d_t = self._hold_for(finetune)
        for i, s in enumerate(range(0, n_img - L + 1, L)):  # drop the last partial batch
            lr = cfg.lr_at(self.epoch, (i + 1) / steps)
            for group in self.optimizer.param_groups:
                set_lr(group, cfg.lr_at(self.epoch, (i + 1) / steps, router=True) if group["router"] else lr)
            idx = perm[s:s + L]
            out = self._compiled_step(images[idx], labels[idx], cost_norm) if compiled and self.compiled else None
            if out is None:   # a static baseline trains like the finetune: its route, cross-entropy, no routing losses
                out = train_step(model, self.optimizer, images[idx], labels[idx], self.generator,
                                 views=1 if finetune else cfg.views, finetune=finetune or self.static,
                                 cost_norm=cost_norm, mu=self.controller.mu, **self.step_options)
            loss, parts, out, y = out
            gates = out.gates.float()
            if hold is not None:   # a decided block's shift is 0
                for block, delta in zip(model.blocks, hold.update(logit_gap(out.r.detach().float(), model.cfg.beta), d_t)):
                    block.router.shift_(delta)
            if steering:
                pending.append((self.budget.fixed + gates @ block_cost).mean())
                if len(pending) == self.controller_every:
                    self._steer(pending)
            sums += torch.cat([loss.view(1), parts, (out.logits.argmax(1) == y).sum().float().view(1)])
            gate_sum += gates.sum(0)
            seen += y.shape[0]
        self._steer(pending)
        v = dict(zip(names, sums.tolist()))
        if not math.isfinite(v["loss"]):
            raise FloatingPointError(f"loss is not finite in epoch {self.epoch + 1} (diverged); lower --lr")
        held = {} if hold is None else {"router_shift": hold.state_dict()["shift"]}
        return {**held, "lr": lr, **{("loss" if k == "loss" else f"loss_{k}"): v[k] / steps for k in ["loss", *PARTS]},
                "train_accuracy": v["correct"] / max(seen, 1),
                "train_cost_hard": self.budget.route_cost(gate_sum / max(seen, 1)).item()}

    def _compiled(self) -> bool:
        """Whether the main step runs compiled (made on first use; a compile failure falls back to eager)."""
        if self.static or self.cfg.compile == "off" or self.compile_failed:
            return False
        if self.compiled is None:
            self.compiled = CompiledStep(self.model, self.optimizer, backend=self.cfg.compile, **self.step_options)
        return True

    def _hold_for(self, finetune: bool) -> tuple[RateHold | None, float]:
        """The rate hold of a finetune epoch (started at the finetune's first step, on the rates the main
        phase left at the finetune's threshold) and that threshold's logit gap."""
        hold = self.hold if finetune else None
        if hold is not None and hold.ref is None:
            hold.start(self.batch_gates_now(1024, routing="hard").float().mean(0).tolist())
            if self.steer_finetune and self.history:   # the main phase's last val cost, at this threshold
                hold.steer(self.history[-1][self.cost_key], self.target, self.budget.block)
        return hold, logit_gap(self.model.threshold.detach().float(), self.model.cfg.beta).item()

    def _compiled_step(self, images, labels, cost_norm):
        """The compiled main step; None (and eager from now on, with a log line) when it does not
        compile here, e.g. without a C++ compiler for inductor."""
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError
        try:
            return self.compiled(images, labels, self.generator, views=self.cfg.views, cost_norm=cost_norm,
                                 mu=self.controller.mu)
        except (TorchDynamoException, InductorError) as e:
            if self.compiled.calls:   # it ran before: not a compile failure
                raise
            inner = getattr(e, "inner_exception", None) or e.__cause__ or e   # the compiler's own words
            why = next((line for line in str(inner).splitlines() if line.strip()), type(inner).__name__)
            self.log(f"--compile {self.cfg.compile} failed here ({why[:200]}); the main epochs run eager")
            self.compiled, self.compile_failed = None, True
            return None

    def _steer(self, pending: list[torch.Tensor]) -> None:
        """The budget loop reads the batches' costs (one host sync) and updates mu once per batch, in order."""
        if pending:
            for cost in torch.stack(pending).tolist():
                self.controller.update(cost)
            pending.clear()

    def run(self, on_epoch: Callable[[dict], bool | None] | None = None) -> dict:
        cfg = self.cfg
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        trimming = self.target is not None and cfg.calibrate and not self.static
        while self.epoch < cfg.total_epochs:
            t0 = time.perf_counter()
            finetune = self.epoch >= cfg.epochs
            if finetune and trimming and self.calibration is None and not self.steer_finetune:
                # land first, then finetune the blocks under the routes the landed model runs
                self.calibrate()
            metrics = self.train_epoch(finetune)
            metrics.update(self.evaluate(self.val_split))
            if finetune and self.steer_finetune:
                self.hold.steer(metrics[self.cost_key], self.target, self.budget.block)
            if not finetune and not self.static:   # the loop learns how val's routes differ from training's
                self.controller.observe_val(metrics[self.cost_key],
                                            self.batch_cost_now())
            self.epoch += 1
            metrics.update(epoch=self.epoch, phase="finetune" if finetune else "train", mu=self.controller.mu,
                           mu_rho=self.controller.rho,
                           target=self.target, target_unit=self.budget.unit,
                           epoch_seconds=time.perf_counter() - t0)
            if self.epoch == cfg.total_epochs:
                if trimming:   # the routers' own landing at 0.5 is kept beside the trimmed one
                    half = self.evaluate(self.val_split, threshold=0.5)
                    metrics.update(uncalibrated_accuracy=half["accuracy"], uncalibrated_flops=half["flops"],
                                   uncalibrated_k=half["k"])
                    metrics.update(self.calibrate(save=False), calib_seconds=self.calibration["seconds"],
                                   trim_landed=float(self.calibration["landed"]))
                metrics.update(self.measure_test())
            metrics.update(threshold=self.model.threshold.item(), val_accuracy=metrics["accuracy"],
                           val_flops=metrics["flops"], val_k=metrics["k"])
            self.history.append(metrics)
            save_checkpoint(self.checkpoint_path, self.state())
            self.log(_progress(metrics, cfg.total_epochs))
            if on_epoch is not None and on_epoch(metrics):
                return self.final_metrics()
        if trimming and (self.calibration is None or self.calibration.get("epoch", self.epoch) < self.epoch):
            self.calibrate()  # (again) after a finetune: frozen routers see features that moved
        return self.final_metrics()

    def batch_cost_now(self, n: int = 256) -> float:
        """What a training batch costs the current model: the mean hard-route cost of a fixed sample
        of n training images, augmented, in train mode (BN batch statistics) as the loop sees batches."""
        return self.budget.route_cost(self.batch_gates_now(n)).mean().item()

    @torch.no_grad()
    def batch_gates_now(self, n: int = 256, routing: str | None = None) -> torch.Tensor:
        """The routes (n, blocks) bool that a fixed sample of n training images takes now, augmented,
        in train mode (BN batch statistics) under `routing` (None: the main epochs'). The BN running
        statistics are put back, and the training data stream is not touched."""
        images = self.train_split.images
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919)
        idx = torch.randperm(images.shape[0], generator=g, device=self.device)[:n]
        x = random_crop_flip(images[idx].float().div_(255), g)
        stats = {k: v.clone() for k, v in self.model.named_buffers() if "running" in k or "num_batches" in k}
        was = self.model.training
        self.model.train()
        gates = []
        with _autocast(self.device, self.cfg.amp):
            for chunk in x.split(256):   # 256 at a time (memory)
                gates.append(self.model(chunk, routing=routing or self.cfg.train_routing).gates)
        for k, v in self.model.named_buffers():
            if k in stats:
                v.copy_(stats[k])
        self.model.train(was)
        return torch.cat(gates)

    def evaluate(self, split, threshold=None) -> dict:
        m = evaluate(self.model, split, self.cost, self.cfg.eval_batch_size, threshold)
        if self.budget.unit == "ms":
            m["latency_ms"] = self.budget.route_cost(torch.tensor([m["block_exec_rate"]])).item()
        return m

    def measure_test(self) -> dict:
        """The held-out split, once, at the end of the run: reported, never read by a choice."""
        m = self.evaluate(self.data.test)
        self.test_metrics = {f"test_{k}": m[k] for k in ("accuracy", "flops", "k", "latency_ms", "images",
                                                                "distinct_paths", "path_entropy", "effective_paths",
                                                                "dynamic_share") if k in m}
        return self.test_metrics

    @torch.no_grad()
    def calibrate(self, save: bool = True) -> dict:
        """Trim the routing threshold inside calibrate.TRIM so the mean hard cost on the val images
        equals the target, if the routers at 0.5 are not on it already; returns the val metrics.
        Runs after the main schedule and, with --finetune-epochs, once more after the finetune."""
        t0 = time.perf_counter()
        images = self.val_split.images
        batch = max(1, self.cfg.eval_batch_size // 4)   # a sweep holds a few routes per image
        curve = lambda lo, hi: threshold_curve(self.model, images, self.budget, lo, hi, batch)
        threshold, calib_cost, landed = trim_threshold(curve, self.target)
        self.model.threshold.fill_(threshold)
        threshold = self.model.threshold.item()   # as the float32 buffer holds it
        val = self.evaluate(self.val_split)
        # routing="capacity" (the static-shape hard forward): CAPACITY_FACTOR x each block's val rate
        self.model.set_capacity(capacity_from_rates(val["block_exec_rate"], CAPACITY_FACTOR))
        self.calibration = {"epoch": self.epoch, "threshold": threshold, "landed": landed,
                            "calib_images": int(images.shape[0]), "calib_cost": calib_cost, "val": val,
                            "seconds": time.perf_counter() - t0}   # with the val evaluation
        if save:
            save_checkpoint(self.checkpoint_path, self.state())
        cost = val["latency_ms"] if self.budget.unit == "ms" else val["flops"]
        how = "kept at 0.5" if threshold == 0.5 else f"trimmed to {threshold:.3f}"
        miss = "" if landed else f" (the target is out of the trim window {TRIM[0]}-{TRIM[1]}: the routers missed it)"
        self.log(f"threshold {how}: val cost {cost:.4g} (target {self.target:.4g}, {cost / self.target - 1:+.1%}), "
                 f"val accuracy {val['accuracy']:.2%}{miss}")
        return val

    def final_metrics(self) -> dict:
        last = dict(self.history[-1]) if self.history else {}
        if self.calibration is not None:
            last.update(self.calibration["val"])
        last.update(self.test_metrics or {})
        if "accuracy" in last:
            last.update(val_accuracy=last["accuracy"], val_flops=last["flops"], val_k=last["k"])
        last.update(checkpoint=str(self.checkpoint_path), arch=self.cfg.arch, dataset=self.cfg.dataset,
                    threshold=self.model.threshold.item())
        if self.init_info:
            last.update(self.init_info)
        return last


def train(cfg: TrainConfig, on_epoch=None, resume: bool = False, data: Dataset | None = None,
          log=None) -> dict:
    return Trainer(cfg, data=data, resume=resume, log=log).run(on_epoch)

