"""Threshold calibration: exact threshold sweeps (drn/controller.py now) against the point-by-point
false position they replaced (taken from git history), on trained ResNet-20 checkpoints.

    python bench/calibration.py CHECKPOINT ... --data-dir ../shared/data/cifar10-5k

Every (checkpoint, target) pair: the threshold each method picks, the cost it lands at on the 2048
calibration images (re-measured with an ordinary hard pass at that threshold), and its seconds,
on one thread (what a search trial gets with 2 of them on 2 cores).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from drn.checkpoint import load_checkpoint, model_from_checkpoint
from drn.controller import calibrate_threshold
from drn.cost import measure_cost_table
from drn.data import load_dataset
from drn.evaluate import route_split, threshold_curve

POINTWISE_COMMIT = "aece67d"   # the last commit with point-by-point calibration (Illinois on single passes)
IMAGES = 2048                  # calibration images, as Trainer.calibrate
BATCH = 500                    # TrainConfig.eval_batch_size's default


def pointwise():
    """calibrate_threshold as of POINTWISE_COMMIT: mean_cost(t) -> (t, cost)."""
    src = subprocess.run(["git", "show", f"{POINTWISE_COMMIT}:drn/controller.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent).stdout
    ns: dict = {}
    exec(compile(src, f"{POINTWISE_COMMIT}:drn/controller.py", "exec"), ns)
    return ns["calibrate_threshold"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", "../shared/data/cifar10-5k"))
    ap.add_argument("--targets", default="0.3,0.45,0.6,0.8", help="fractions of the full FLOPs")
    ap.add_argument("--out", default="bench/results/calibration-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = pointwise()
    data = load_dataset("imagefolder", args.data_dir)
    pick = torch.randperm(data.train.images.shape[0], generator=torch.Generator().manual_seed(0))[:IMAGES]
    images = data.train.images[pick]
    rows = []
    for path in args.checkpoints:
        model, _ = model_from_checkpoint(load_checkpoint(path))
        model.eval()
        cost = measure_cost_table(model)
        every, none = cost.full, cost.fixed       # the cost at t = 0 (every block runs) and t = 1 (none does)

        def real(t: float) -> float:
            return cost.route_cost(route_split(model, images, BATCH, "hard", t)[1]).double().mean().item()

        for frac in map(float, args.targets.split(",")):
            target = frac * cost.full
            t0 = time.perf_counter()
            passes = []
            t_old, _ = old(lambda t: passes.append(t) or real(t), target, cost_at_0=every, cost_at_1=none)
            s_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            t_new, _, sweeps = calibrate_threshold(
                lambda lo, hi: threshold_curve(model, images, cost, lo, hi, BATCH), target, every, none,
                coarse_curve=lambda lo, hi: threshold_curve(model, images[:IMAGES // 4], cost, lo, hi, BATCH))
            s_new = time.perf_counter() - t0
            t1 = time.perf_counter()
            real(0.5)
            s_pass = time.perf_counter() - t1
            row = {"checkpoint": Path(path).parent.name, "target": frac, "pass_s": s_pass,
                   "pointwise": {"threshold": t_old, "error": real(t_old) / target - 1, "passes": len(passes),
                                 "seconds": s_old},
                   "sweeps": {"threshold": t_new, "error": real(t_new) / target - 1, "windows": sweeps,
                              "seconds": s_new}}
            rows.append(row)
            print(f"{row['checkpoint']:<16} {frac:.0%}: pointwise {row['pointwise']['error']:+.3%} "
                  f"{len(passes)} passes {s_old:.1f}s | sweeps {row['sweeps']['error']:+.3%} {sweeps} windows "
                  f"{s_new:.1f}s | one pass {s_pass:.1f}s", flush=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, 1 thread",
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| model | target | point-by-point: error | passes | s | sweeps: error | windows (512 + 2048 images) | s "
          "| speedup |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, s = r["pointwise"], r["sweeps"]
        print(f"| {r['checkpoint']} | {r['target']:.0%} | {p['error']:+.2%} | {p['passes']} | {p['seconds']:.1f} | "
              f"{s['error']:+.2%} | {s['windows']} | {s['seconds']:.1f} | {p['seconds'] / s['seconds']:.1f}× |")
    old_s, new_s = (sum(r[k]["seconds"] for r in rows) for k in ("pointwise", "sweeps"))
    print(f"in all {old_s:.0f} s -> {new_s:.0f} s ({old_s / new_s:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
