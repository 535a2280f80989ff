"""The static-shape hard forward (BENCHMARKS.md, "What a capacity drops"): routing="capacity" (drn/models.py) against the
gathered one (routing="hard") and the full network. Block b runs on exactly k_b = ceil(c_b x B)
images of a batch of B, the top k_b of its router's r; slots under the threshold are padding, and
routed images beyond k_b are dropped to the shortcut. c_b = min(1, factor x b's execution rate on
val under the gather forward at the model's threshold) (drn/evaluate.py, val_capacity).

Accuracy and FLOPs of a trained checkpoint (any device; the test split is only reported, val sets
the capacities), gather vs capacity at each --factors and --batches:

    PYTHONPATH=. python bench/capacity.py --checkpoint RUN/checkpoint.pt [RUN2/checkpoint.pt ...]   # -> bench/results/capacity-cpu.json

    flops         the routes that ran (gather: all the routers asked for)
    flops_spent   what the forward computes, padded slots included (gather: = flops)
    dropped       share of the block runs the routers asked for that the capacity dropped

Speed (--time; for CUDA): full vs gather vs capacity, per batch, for ResNet-110 (32 px) and
ResNet-50 (64 px, 200 classes) untrained, routes forced as bench/inference_speed.py forces them
(every image runs the k blocks nearest --fraction of the FLOPs, at random), capacities from a
second draw of such routes (the "val" of forced routes) x --factor. "full" is the routed model
with every gate open run as routing="mask" (no host sync, so it can be captured too). --capture:
eager; cudagraph (torch.cuda.CUDAGraph of the eager forward); compile (torch.compile, fullgraph,
mode reduce-overhead on CUDA: CUDA graphs). full and capacity get the same treatment; gather
cannot be captured (its shapes depend on the routes) and is always eager.

    PYTHONPATH=. python bench/capacity.py --time --device cuda                      # eager + cudagraph
    PYTHONPATH=. python bench/capacity.py --time --device cuda --capture eager compile
    PYTHONPATH=. python bench/capacity.py --time --archs resnet8 --batches 16 --repeats 2 --out /tmp/c.json  # CPU smoke

Times: median over interleaved rounds after warm-up (inference_speed.interleaved_samples).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import env, forced_gates, interleaved_samples, parse_common, setup  # noqa: E402

from drn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from drn.cost import measure_cost_table  # noqa: E402
from drn.data import load_source, split_source  # noqa: E402
from drn.evaluate import capacity_from_rates, evaluate, val_capacity  # noqa: E402
from drn.models import build_model  # noqa: E402

TIME_ARCHS = {"resnet50": (64, 200)}   # arch -> (input size, classes); CIFAR ones: (32, 10)


# ----------------------------------------------------------------------------- accuracy and FLOPs

def accuracy_rows(ckpt_path: str, data_dir: str | None, batches, factors, device) -> tuple[dict, list[dict]]:
    ckpt = load_checkpoint(ckpt_path)
    model, cfg = model_from_checkpoint(ckpt)
    data = split_source(load_source(cfg.dataset, data_dir or cfg.data_dir), cfg.val_fraction, cfg.val_seed,
                        ckpt["val_index"])
    model.to(device).eval()
    cost = measure_cost_table(model)
    keys = ("accuracy", "flops", "flops_spent", "flops_wanted", "dropped", "images_dropped", "k")
    rows = []
    for b in batches:
        for split in ("val", "test"):
            m = evaluate(model, getattr(data, split), cost, b)
            rows.append({"batch": b, "split": split, "forward": "gather", "factor": None,
                         **{k: m.get(k) for k in keys}, "flops_spent": m["flops"], "flops_wanted": m["flops"],
                         "dropped": 0.0, "images_dropped": 0.0, "block_exec_rate": m["block_exec_rate"],
                         "distinct_paths": m["distinct_paths"]})
        for f in factors:
            capacity = val_capacity(model, data.val, f, b)   # val only
            for split in ("val", "test"):
                m = evaluate(model, getattr(data, split), cost, b, routing="capacity")
                rows.append({"batch": b, "split": split, "forward": "capacity", "factor": f,
                             **{k: m[k] for k in keys}, "capacity": capacity.tolist(),
                             "block_dropped_rate": m["block_dropped_rate"]})
    info = {"checkpoint": str(Path(ckpt_path).absolute()), "arch": cfg.arch, "dataset": cfg.dataset,
            "threshold": model.threshold.item(), "flops_full": cost.full, "flops_fixed": cost.fixed,
            "val_images": int(data.val.labels.shape[0]), "test_images": int(data.test.labels.shape[0]),
            "epochs": ckpt["epoch"], "target": cfg.target_flops}
    return info, rows


def print_accuracy(info: dict, rows: list[dict]) -> None:
    full = info["flops_full"]
    print(f"# {info['arch']} on {info['dataset']}, threshold {info['threshold']:.4g}, full {full:.4g} FLOPs; "
          f"capacities from val ({info['val_images']} images), test ({info['test_images']}) reported", flush=True)
    g = next(r for r in rows if r["split"] == "val" and r["forward"] == "gather")
    print(f"# val: {g['distinct_paths']} distinct routes, execution rate per block {g['block_exec_rate']}", flush=True)
    print("| batch | forward | factor | test accuracy | FLOPs spent | routed FLOPs | dropped | images dropped "
          "| val dropped |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    val = {(r["batch"], r["forward"], r["factor"]): r for r in rows if r["split"] == "val"}
    for r in rows:
        if r["split"] != "test":
            continue
        v = val[r["batch"], r["forward"], r["factor"]]
        print(f"| {r['batch']} | {r['forward']} | {r['factor'] or '–'} | {r['accuracy']:.2%} | "
              f"{r['flops_spent'] / full:.1%} | {r['flops'] / full:.1%} | {r['dropped']:.2%} | "
              f"{r['images_dropped']:.1%} | {v['dropped']:.2%} |", flush=True)


# ----------------------------------------------------------------------------- speed

@torch.inference_mode()
def counted(fn) -> float:
    """FLOPs of one call of fn, as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def cuda_graph(fn):
    """fn (no arguments, static inputs) captured in a CUDA graph: returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        fn()
    return graph.replay


def captured(fn, how: str, device):
    if how == "eager":
        return fn
    if how == "cudagraph":
        return cuda_graph(fn)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def time_rows(archs, batches, fraction: float, factor: float, captures, repeats: int, device) -> list[dict]:
    rows = []
    for arch in archs:
        size, classes = TIME_ARCHS.get(arch, (32, 10))
        torch.manual_seed(0)
        model = build_model(arch, classes, size).eval()
        cost = measure_cost_table(model)
        model.to(device)
        n = model.num_blocks
        k = max(0, min(n, round((fraction * cost.full - cost.fixed) / (sum(cost.block) / n))))
        gen = torch.Generator().manual_seed(0)
        # the capacities: a factor x the per-block rates of another draw of the forced routes (their "val")
        model.set_capacity(capacity_from_rates(forced_gates(4096, n, k, gen).float().mean(0), factor))
        for b in batches:
            x = torch.rand(b, 3, size, size, generator=gen).to(device)
            g = forced_gates(b, n, k, gen).to(device)
            ones = torch.ones_like(g)
            fns = {"full": lambda: model(x, routing="mask", gates=ones),
                   "gather": lambda: model(x, routing="hard", gates=g),
                   "capacity": lambda: model(x, routing="capacity", gates=g)}
            flops = {name: counted(fn) / b for name, fn in fns.items()}
            with torch.inference_mode():
                ran = model(x, routing="capacity", gates=g).gates
            routed, dropped = cost.route_cost(ran.cpu()).mean().item(), (g & ~ran).sum().item() / max(g.sum().item(), 1)
            timed = {"gather/eager": fns["gather"]}
            for how in captures:
                for name in ("full", "capacity"):
                    timed[f"{name}/{how}"] = captured(fns[name], how, device)
            with torch.inference_mode():
                s = interleaved_samples(timed, device, repeats)
            t = {name: statistics.median(v) for name, v in s.items()}
            speedup = lambda a, ref: statistics.median(u / w for u, w in zip(s[ref], s[a]))
            for how in captures:
                row = {"arch": arch, "batch": b, "capture": how, "blocks_per_image": k, "factor": factor,
                       "flops_full": flops["full"], "flops_gather": flops["gather"],
                       "flops_capacity_spent": flops["capacity"], "flops_capacity_routed": routed, "dropped": dropped,
                       "t_full_s": t[f"full/{how}"], "t_capacity_s": t[f"capacity/{how}"],
                       "t_gather_eager_s": t["gather/eager"],
                       "speedup_capacity": speedup(f"capacity/{how}", f"full/{how}"),
                       "speedup_gather_eager_vs_full_eager": speedup("gather/eager", "full/eager")
                       if "eager" in captures else None,
                       "samples_s": {name: v for name, v in s.items() if name.endswith(how) or name == "gather/eager"}}
                rows.append(row)
                print(f"| {arch} | {b} | {how} | {flops['gather'] / flops['full']:.1%} | "
                      f"{flops['capacity'] / flops['full']:.1%} | {dropped:.2%} | {1e3 * row['t_full_s']:.2f} | "
                      f"{1e3 * row['t_gather_eager_s']:.2f} | {1e3 * row['t_capacity_s']:.2f} | "
                      f"{row['speedup_capacity']:.2f}× | {flops['full'] / flops['capacity']:.2f}× |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", help="accuracy/FLOPs of these trained checkpoints (drn-train's "
                   "checkpoint.pt)")
    p.add_argument("--data-dir", help="the checkpoint's data (default: where it was trained)")
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.1, 1.25, 1.5])
    p.add_argument("--time", action="store_true", help="time full vs gather vs capacity (for CUDA)")
    p.add_argument("--archs", nargs="+", default=["resnet110", "resnet50"])
    p.add_argument("--fraction", type=float, default=0.5, help="forced routes' share of the full FLOPs")
    p.add_argument("--factor", type=float, default=1.25, help="the timed capacity's factor")
    p.add_argument("--capture", nargs="+", choices=("eager", "cudagraph", "compile"), default=None,
                   help="default: eager and cudagraph on CUDA, eager on CPU")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    args = parse_common(p, "capacity")
    if not args.checkpoint and not args.time:
        p.error("give --checkpoint (accuracy/FLOPs) and/or --time (speed)")
    device, kept = setup(args)
    captures = args.capture or (["eager", "cudagraph"] if device.type == "cuda" else ["eager"])
    if "cudagraph" in captures and device.type != "cuda":
        p.error("--capture cudagraph needs --device cuda")
    out_path = Path(args.out or f"bench/results/capacity-{device.type}.json")
    result = env(device) | {"malloc_keeps_freed_memory": kept,
                            "command": "python bench/capacity.py " + " ".join(sys.argv[1:])}
    print(f"# {result['machine']} | torch {result['torch']} | {result['threads']} threads", flush=True)
    result["accuracy"] = []
    for path in args.checkpoint or []:
        info, rows = accuracy_rows(path, args.data_dir, args.batches, args.factors, device)
        print_accuracy(info, rows)
        result["accuracy"].append(info | {"rows": rows})
    if args.time:
        print(f"forced routes at {args.fraction:.0%} of the FLOPs, capacity factor {args.factor}", flush=True)
        print("| arch | batch | capture | gather FLOPs | capacity FLOPs spent | dropped | full ms | gather ms (eager) "
              "| capacity ms | capacity speedup | FLOPs ratio |", flush=True)
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        result["time"] = {"fraction": args.fraction, "factor": args.factor, "repeats": args.repeats,
                          "rows": time_rows(args.archs, args.batches, args.fraction, args.factor, captures,
                                            args.repeats, device)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
