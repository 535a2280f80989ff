"""Training overhead of routing (issue 8, item 2): the routed training step -- the trainer's own
`drn.train.train_step`: M = 2 augmented views, soft routing, the full Eq. 9 loss (consistency,
diversity, cost, reg), SGD -- per image-view, vs the plain ResNet of the same depth: the same stem,
blocks and head without routers (`PlainResNet`), trained by the same step (same augmentation on
tensors, CE, same SGD) on as many images per step as the routed step has views. Goal: <= 1.10x.

    PYTHONPATH=. python bench/train_overhead.py                                 # CPU: ResNet-20/56/110, batch 128
    PYTHONPATH=. python bench/train_overhead.py --device cuda --batches 128 512
    PYTHONPATH=. python bench/train_overhead.py --archs resnet56 --profile      # where the time goes

Each step is timed alone (synchronised on CUDA), routed and plain steps interleaved; the figure is
the median over steps after warm-up, divided by the image-views of the step.
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
from drn.train import train_step  # noqa: E402


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


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # the trainer's


def make_steps(arch: str, batch: int, views: int, device: torch.device, amp: bool):
    """Closures doing one routed step (batch samples x views) and one plain step (batch*views images)."""
    torch.manual_seed(0)
    routed = build_model(arch)
    torch.manual_seed(0)
    plain = PlainResNet(build_model(arch))
    cost_norm = measure_cost_table(routed).normalized(device)
    routed.to(device).train()
    plain.to(device).train()
    opt_r, opt_p = sgd(routed), sgd(plain)
    n = 4096
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = LossWeights()

    def batch_of(size):
        idx = torch.randint(0, n, (size,), generator=gen, device=device)
        return images[idx], labels[idx]

    def routed_step():
        x, y = batch_of(batch)
        return train_step(routed, opt_r, x, y, gen, views=views, finetune=False, cost_norm=cost_norm,
                          mu=0.05, weights=weights, amp=amp)

    def plain_step():  # CE on one view per image: the finetune branch of the same step
        x, y = batch_of(batch * views)
        return train_step(plain, opt_p, x, y, gen, views=1, finetune=True, cost_norm=cost_norm,
                          mu=0.05, weights=weights, amp=amp)

    return routed_step, plain_step


def time_steps(steps: dict, device, warmup: int, repeats: int) -> dict:
    """Seconds of each step, `repeats` samples each after `warmup`, the steps interleaved."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def profile(steps: dict, device, n: int = 3, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in steps.items():
        fn()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n## profile: {name} step, {n} steps", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


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
    args = parse_common(p, "train_overhead")
    device, kept = setup(args)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 5)
    out_path = Path(args.out or f"bench/results/train_overhead-{device.type}.json")
    info = env(device) | {"malloc_keeps_freed_memory": kept}
    amp = args.amp and cuda
    print(f"# {info['machine']} | torch {info['torch']} | {info['threads']} threads | "
          f"{'bf16 autocast' if amp else 'fp32'} | views {args.views}{' | malloc keeps freed memory' if kept else ''}",
          flush=True)
    if args.profile:
        for arch in args.archs:
            for b in args.batches:
                r, pl = make_steps(arch, b, args.views, device, args.amp)
                profile({f"routed {arch} b{b}": r, f"plain {arch} b{b * args.views}": pl}, device)
        return
    rows = []
    print("| arch | batch × views | routed ms/step | plain ms/step | routed µs/view | plain µs/view | overhead |",
          flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for arch in args.archs:
        for b in args.batches:
            t0 = time.perf_counter()
            routed_step, plain_step = make_steps(arch, b, args.views, device, args.amp)
            s = time_steps({"routed": routed_step, "plain": plain_step}, device, warmup, repeats)
            t = {k: statistics.median(v) for k, v in s.items()}
            v = b * args.views
            # overhead: median over rounds of routed / plain in the same round (robust to drift)
            row = {"arch": arch, "batch": b, "views": args.views, "image_views": v, "t_routed_s": t["routed"],
                   "t_plain_s": t["plain"], "overhead": statistics.median(u / w for u, w in zip(s["routed"], s["plain"])),
                   "samples_s": s, "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"| {arch} | {b} × {args.views} | {1e3 * t['routed']:.1f} | {1e3 * t['plain']:.1f} | "
                  f"{1e6 * t['routed'] / v:.1f} | {1e6 * t['plain'] / v:.1f} | {row['overhead']:.3f}× |", flush=True)
    worst = max(r["overhead"] for r in rows)
    print(f"goal: routed step <= 1.10x plain per image-view: {'met' if worst <= 1.10 else 'MISSED'} "
          f"(worst {worst:.3f}x)", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({**info, "amp": amp, "warmup": warmup, "repeats": repeats, "rows": rows,
                                    "goal_met": worst <= 1.10,
                                    "command": "python bench/train_overhead.py " + " ".join(sys.argv[1:])},
                                   indent=1))
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
