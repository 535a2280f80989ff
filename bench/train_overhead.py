"""Training overhead of routing (BENCHMARKS.md, "Training overhead of routing", "CPU speed: no regression"):
the routed training step -- the
trainer's own step (`drn.step`: M = 2 augmented views as one batch, straight-through routing, the
full Eq. 9 loss, SGD) -- per image-view, vs the plain ResNet of the same depth: the same stem, blocks
and head without routers (`PlainResNet`), trained by the same kind of step (the same augmentation
on tensors, CE, the same SGD) on as many images per step as the routed step has views. Both sides
get the same treatment: eager, or --compile (torch.compile of the forward + loss and of the
optimizer's update; mode reduce-overhead on CUDA: CUDA graphs), channels_last as the trainer
chooses it (on CUDA), fused SGD on CUDA when eager. Goals: <= 1.10x on CPU (BENCHMARKS.md,
"Training overhead of routing"), <= 1.2x on a GPU at batch 128 (BENCHMARKS.md, "GPU speed").

    PYTHONPATH=. python bench/train_overhead.py                                 # CPU: ResNet-20/56/110, batch 128
    PYTHONPATH=. python bench/train_overhead.py --device cuda --compile --batches 128 512
    PYTHONPATH=. python bench/train_overhead.py --archs resnet56 --profile      # where the time goes
    PYTHONPATH=. python bench/train_overhead.py --archs resnet20 --profile --compile   # ... per generated kernel

Each step is timed alone (synchronised on CUDA), routed and plain steps interleaved; the figure is
the median over steps after warm-up (which includes compiling), divided by the image-views of the step.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import env, parse_common, setup  # noqa: E402

from drn.cost import measure_cost_table  # noqa: E402
from drn.losses import LossWeights  # noqa: E402
from drn.models import RoutedOutput, RoutedResNet, build_model  # noqa: E402
from drn.data import random_crop_flip  # noqa: E402
from drn.step import CompiledStep, autocast, train_step  # noqa: E402


class PlainResNet(nn.Module):
    """A routed model's stem, blocks (residual + shortcut) and head without the routers: the
    ResNet it gates. Same modules, so the same conv layers and the same initialisation."""

    def __init__(self, routed: RoutedResNet):
        super().__init__()
        self.register_buffer("mean", routed.mean.clone())
        self.register_buffer("std", routed.std.clone())
        self.stem, self.fc = routed.stem, routed.fc
        self.residuals = nn.ModuleList(b.residual for b in routed.blocks)
        self.shortcuts = nn.ModuleList(b.shortcut for b in routed.blocks)

    def forward(self, x, routing=None) -> RoutedOutput:
        x = self.stem((x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1))
        for res, sc in zip(self.residuals, self.shortcuts):
            x = F.relu(res(x) + sc(x))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        none = logits.new_zeros(x.shape[0], 0)
        return RoutedOutput(logits, none, none.bool())


def sgd(model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)  # the trainer's


def plain_loss(model, xs, y, amp: bool):
    with autocast(xs.device, amp):
        return F.cross_entropy(model(xs).logits.float(), y)


class CompiledPlain:
    """The plain side under the routed side's treatment (drn.step.CompiledStep): augmentation outside
    the graph, forward + CE compiled (its backward by AOTAutograd), the optimizer's update compiled."""

    def __init__(self, model, opt, amp: bool, channels_last: bool, backend: str):
        self.model, self.opt, self.amp, self.channels_last = model, opt, amp, channels_last
        cuda = next(model.parameters()).is_cuda
        mode = None if backend == "cudagraphs" else "reduce-overhead" if cuda else "default"
        self.graphs = cuda
        for g in opt.param_groups:
            g["lr"], g["foreach"], g["fused"] = torch.tensor(float(g["lr"])), True, False
        self.loss = torch.compile(plain_loss, backend=backend, mode=mode)
        self.update = torch.compile(opt.step, backend=backend, mode=mode)

    def __call__(self, images, labels, gen):
        xs = random_crop_flip(images.float().div_(255), gen)
        if self.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = self.loss(self.model, xs, labels, self.amp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.update()
        return loss.detach()


def make_steps(arch: str, batch: int, views: int, device: torch.device, amp: bool, compile_: str | None = None,
               channels_last: bool | None = None, routing: str = "straight"):
    """Closures doing one routed step (batch samples x views) and one plain step (batch*views images),
    under the same treatment: eager or compiled (backend `compile_`: inductor or cudagraphs),
    channels_last (None: on CUDA), fused SGD (CUDA, eager)."""
    cuda = device.type == "cuda"
    channels_last = cuda if channels_last is None else channels_last
    torch.manual_seed(0)
    routed = build_model(arch)
    torch.manual_seed(0)
    plain = PlainResNet(build_model(arch))
    cost_norm = measure_cost_table(routed).normalized(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    routed.to(device, memory_format=fmt).train()
    plain.to(device, memory_format=fmt).train()
    opt_r, opt_p = sgd(routed, cuda and not compile_), sgd(plain, cuda and not compile_)
    n = 4096
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = LossWeights()
    amp = amp and cuda

    def batch_of(size):
        idx = torch.randint(0, n, (size,), generator=gen, device=device)
        return images[idx], labels[idx]

    if compile_:
        routed_compiled = CompiledStep(routed, opt_r, weights=weights, amp=amp, routing=routing,
                                       channels_last=channels_last, backend=compile_)
        plain_compiled = CompiledPlain(plain, opt_p, amp, channels_last, compile_)

        def routed_step():
            x, y = batch_of(batch)
            return routed_compiled(x, y, gen, views=views, cost_norm=cost_norm, mu=0.05)

        def plain_step():
            x, y = batch_of(batch * views)
            return plain_compiled(x, y, gen)
        return routed_step, plain_step

    def routed_step():
        x, y = batch_of(batch)
        return train_step(routed, opt_r, x, y, gen, views=views, finetune=False, cost_norm=cost_norm,
                          mu=0.05, weights=weights, amp=amp, routing=routing, channels_last=channels_last)

    def plain_step():  # CE on one view per image: the finetune branch of the same step
        x, y = batch_of(batch * views)
        return train_step(plain, opt_p, x, y, gen, views=1, finetune=True, cost_norm=cost_norm,
                          mu=0.05, weights=weights, amp=amp, channels_last=channels_last)

    return routed_step, plain_step


def time_steps(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Seconds of each step, `repeats` samples each after `warmup` (also returned: compiling is in
    them), the steps interleaved."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples, warm = {k: [] for k in steps}, {k: [] for k in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            (samples if i >= warmup else warm)[name].append(time.perf_counter() - t0)
    return samples, warm


def profile(steps: dict, device, n: int = 3, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in steps.items():
        for _ in range(3):   # compiled: the first steps compile (the update graph too)
            fn()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n## profile: {name} step, {n} steps", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=110), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--archs", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    p.add_argument("--batches", type=int, nargs="+", default=[128], help="samples per step (x views)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 5 on CPU, 30 on CUDA)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA (the trainer's default is on)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    p.add_argument("--compile", nargs="?", const="inductor", choices=("inductor", "cudagraphs"), default=None,
                   help="both sides under torch.compile: inductor (reduce-overhead on CUDA: CUDA graphs) or cudagraphs "
                        "(CUDA: the eager kernels captured); the warm-up steps compile")
    p.add_argument("--train-routing", choices=("straight", "soft"), default="straight",
                   help="the routed step's routing (the trainer's default: straight; BENCHMARKS.md, \"Training overhead of routing\", measured soft)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="both sides' activations NHWC (auto: on CUDA, as the trainer)")
    args = parse_common(p, "train_overhead")
    device, kept = setup(args)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 5)
    out_path = Path(args.out or f"bench/results/train_overhead-{device.type}{'-' + args.compile if args.compile else ''}.json")
    cl = None if args.channels_last == "auto" else args.channels_last == "on"
    treatment = {"routing": args.train_routing, "compile": args.compile, "channels_last": cuda if cl is None else cl, "fused_sgd": cuda and not args.compile}
    goal = 1.2 if cuda else 1.10
    info = env(device) | {"malloc_keeps_freed_memory": kept}
    amp = args.amp and cuda
    print(f"# {info['machine']} | torch {info['torch']} | {info['threads']} threads | "
          f"{'bf16 autocast' if amp else 'fp32'} | views {args.views} | {treatment}"
          f"{' | malloc keeps freed memory' if kept else ''}",
          flush=True)
    if args.profile:
        if args.compile == "inductor" and not cuda:   # name inductor's generated C++ kernels in the tables
            import torch._inductor.config
            torch._inductor.config.cpp.enable_kernel_profile = True
        for arch in args.archs:
            for b in args.batches:
                r, pl = make_steps(arch, b, args.views, device, args.amp, args.compile, cl, args.train_routing)
                profile({f"routed {arch} b{b}": r, f"plain {arch} b{b * args.views}": pl}, device)
        return
    rows = []
    print("| arch | batch × views | routed ms/step | plain ms/step | routed µs/view | plain µs/view | overhead |",
          flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for arch in args.archs:
        for b in args.batches:
            t0 = time.perf_counter()
            routed_step, plain_step = make_steps(arch, b, args.views, device, args.amp, args.compile, cl, args.train_routing)
            s, warm = time_steps({"routed": routed_step, "plain": plain_step}, device, warmup, repeats)
            t = {k: statistics.median(v) for k, v in s.items()}
            v = b * args.views
            # overhead: median over rounds of routed / plain in the same round (robust to drift)
            row = {"arch": arch, "batch": b, "views": args.views, "image_views": v, "t_routed_s": t["routed"],
                   "t_plain_s": t["plain"], "overhead": statistics.median(u / w for u, w in zip(s["routed"], s["plain"])),
                   "samples_s": s, "warmup_s": warm, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"| {arch} | {b} × {args.views} | {1e3 * t['routed']:.1f} | {1e3 * t['plain']:.1f} | "
                  f"{1e6 * t['routed'] / v:.1f} | {1e6 * t['plain'] / v:.1f} | {row['overhead']:.3f}× |", flush=True)
    worst = max(r["overhead"] for r in rows)
    print(f"goal: routed step <= {goal}x plain per image-view: {'met' if worst <= goal else 'MISSED'} "
          f"(worst {worst:.3f}x)", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({**info, "amp": amp, **treatment, "warmup": warmup, "repeats": repeats,
                                    "rows": rows, "goal": goal, "goal_met": worst <= goal,
                                    "command": "python bench/train_overhead.py " + " ".join(sys.argv[1:])},
                                   indent=1))
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
