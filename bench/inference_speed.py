"""Inference speed of hard routing (BENCHMARKS.md, "Inference speed vs FLOPs"): gathered execution (routing="hard") vs
mask-multiply (routing="mask") vs the full network, at batch 1, 64, 256, for routes at ~30/50/70 %
of the full network's FLOPs. Goal: speedup >= 0.85 x FLOPs ratio at batch 256 on CPU.

    PYTHONPATH=. python bench/inference_speed.py                    # CPU, ResNet-110
    PYTHONPATH=. python bench/inference_speed.py --device cuda      # fp32 and bf16 autocast rows

Routes are forced (untrained model): every image executes the same number k of blocks, picked at
random per image, k chosen so the route's FLOPs land near the fraction. The FLOPs are measured:
torch.utils.flop_counter counts the gathered forward itself (per image, averaged over the batch),
and that count is checked against the project's cost table (drn/cost.py). "Full" is the routed
model with every gate open (routers included, as in its FLOPs). Times are per batch: median over
interleaved rounds after warm-up, each sample long enough to be timed (synchronised on CUDA).
"""
import argparse
import ctypes
import json
import platform
import sys
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from drn.cost import measure_cost_table
from drn.models import build_model


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def env(device: torch.device) -> dict:
    return {"machine": machine(device), "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def keep_freed_memory() -> bool:
    """glibc hands freed blocks of >= 128 KiB-32 MiB back to the OS and page-faults them in again on
    the next forward (ResNet-110, batch 256: ~2e5 minor faults, ~0.9 s of system time per forward
    on a 2-core VM, and most of the run-to-run spread). Keep freed memory in the heap instead, as
    jemalloc or tcmalloc do: the times then measure the network. CPU only; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, (1 << 31) - 1))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    return torch.device(spec)


def interleaved_samples(fns: dict, device, repeats: int, warmup: int = 2, min_sample_s: float = 0.05) -> dict:
    """Seconds per call of each fn, `repeats` samples each, timed in interleaved rounds so that
    drift hits all alike. A sample loops a fn enough times to last >= min_sample_s (small batches)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, min(200, round(min_sample_s / max(time.perf_counter() - t0, 1e-6))))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return samples


def forced_gates(b: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(b, n) bool, exactly k open gates per row at random positions."""
    return torch.rand(b, n, generator=g).argsort(1) < k


@torch.no_grad()
def counted_flops(model, x, gates) -> float:
    """FLOPs per image of the gathered forward, counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        model(x, routing="hard", gates=gates)
    return counter.get_total_flops() / x.shape[0]


def parse_common(p: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """The flags every speed benchmark takes (malloc, threads, out), then parse."""
    p.add_argument("--glibc-malloc", action="store_true", help="leave glibc's malloc thresholds as they are "
                   "(default on CPU: keep freed memory in the heap, see inference_speed.keep_freed_memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help=f"JSON path (default: bench/results/{name}-<device>.json)")
    return p.parse_args()


def setup(args) -> tuple[torch.device, bool]:
    """The device, torch's threads, and whether freed memory is kept in the heap (CPU)."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, device.type == "cpu" and not args.glibc_malloc and keep_freed_memory()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--arch", default="resnet110")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median)")
    p.add_argument("--dtypes", nargs="+", default=None, help="fp32, bf16 (default: fp32 on CPU, both on CUDA)")
    args = parse_common(p, "inference_speed")
    device, kept = setup(args)
    dtypes = args.dtypes or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    out_path = Path(args.out or f"bench/results/inference_speed-{device.type}.json")
    info = env(device) | {"malloc_keeps_freed_memory": kept}
    print(f"# {info['machine']} | torch {info['torch']} | {info['threads']} threads | {args.arch}"
          f"{' | malloc keeps freed memory' if kept else ''}", flush=True)

    torch.manual_seed(0)
    model = build_model(args.arch).eval()
    cost = measure_cost_table(model)
    model.to(device)
    n = model.num_blocks
    mean_block = sum(cost.block) / n
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("| batch | dtype | target | FLOPs/img (counted) | of full | full ms | hard ms | mask ms "
          "| speedup hard | FLOPs ratio | hard / ideal | speedup mask |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for b in args.batches:
        x = torch.rand(b, 3, model.cfg.input_size, model.cfg.input_size, generator=gen).to(device)
        full = torch.ones(b, n, dtype=torch.bool, device=device)
        routes = {}
        for f in args.fractions:
            k = max(0, min(n, round((f * cost.full - cost.fixed) / mean_block)))
            g = forced_gates(b, n, k, gen).to(device)
            flops = counted_flops(model, x, g)
            table = cost.route_cost(g.cpu()).mean().item()
            assert abs(flops / table - 1) < 1e-6, f"flop counter {flops:.6g} != cost table {table:.6g}"
            routes[f] = (k, g, flops)
        for dt in dtypes:
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if dt == "bf16" else torch.autocast(device.type, enabled=False)
            with torch.inference_mode(), amp:
                fns = {"full": lambda: model(x, routing="hard", gates=full)}
                for f, (k, g, _) in routes.items():
                    fns[f"hard{f}"] = lambda g=g: model(x, routing="hard", gates=g)
                    fns[f"mask{f}"] = lambda g=g: model(x, routing="mask", gates=g)
                s = interleaved_samples(fns, device, args.repeats)
            t = {name: statistics.median(v) for name, v in s.items()}
            # speedup: median over rounds of the same round's full / routed time (robust to drift)
            speedup = {name: statistics.median(u / w for u, w in zip(s["full"], v)) for name, v in s.items()}
            for f, (k, g, flops) in routes.items():
                ratio = cost.full / flops
                row = {"batch": b, "dtype": dt, "target_fraction": f, "blocks_per_image": k,
                       "flops": flops, "flops_fraction": flops / cost.full, "flops_ratio": ratio,
                       "t_full_s": t["full"], "t_hard_s": t[f"hard{f}"], "t_mask_s": t[f"mask{f}"],
                       "speedup_hard": speedup[f"hard{f}"], "speedup_mask": speedup[f"mask{f}"],
                       "samples_s": {m: s[f"{m}{f}"] for m in ("hard", "mask")} | {"full": s["full"]}}
                row["hard_vs_ideal"] = row["speedup_hard"] / ratio
                rows.append(row)
                print(f"| {b} | {dt} | {f:.0%} | {flops:.3e} | {row['flops_fraction']:.1%} | "
                      f"{1e3 * row['t_full_s']:.2f} | {1e3 * row['t_hard_s']:.2f} | {1e3 * row['t_mask_s']:.2f} | "
                      f"{row['speedup_hard']:.2f}× | {ratio:.2f}× | {row['hard_vs_ideal']:.2f} | "
                      f"{row['speedup_mask']:.2f}× |", flush=True)
    goal = [r for r in rows if r["batch"] == 256 and r["dtype"] == "fp32"]
    met = all(r["hard_vs_ideal"] >= 0.85 for r in goal) if goal else None
    if goal:
        print(f"goal (batch 256, fp32): speedup >= 0.85 x FLOPs ratio: {'met' if met else 'MISSED'} "
              f"(worst {min(r['hard_vs_ideal'] for r in goal):.2f})", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({**info, "arch": args.arch, "flops_full": cost.full, "flops_fixed": cost.fixed,
                                    "repeats": args.repeats, "goal_met_batch256": met, "rows": rows,
                                    "command": "python bench/inference_speed.py " + " ".join(sys.argv[1:])},
                                   indent=1))
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
