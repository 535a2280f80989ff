"""Search overhead (docs/notes/2026-11-26-search-overhead.md, "Search overhead"): the share of a drn-search's wall time that its trials spend
training. Goal >= 90 % for 8 trials x 2 epochs, 2 concurrent, on CPU.

    python bench/search_overhead.py --data-dir ../shared/data/cifar10-5k

share = sum over trials and epochs of the trainer's epoch time / (concurrent trials x wall time of
the whole `drn-search` command, from its start to its exit). The rest is overhead: starting Python,
Ray and the trial workers, loading data, evaluation and threshold calibration, checkpoints, MLflow
logging (models included), Optuna and the driver's bookkeeping, and idle slots at the end.
Tune's own per-epoch time (`time_this_iter_s`: everything between two reports) splits the
in-trial part from the driver's; the last epoch's `calib_seconds` (the threshold calibration and
its val evaluation, which drn-train runs too) is reported beside the training share.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", "../shared/data/cifar10-5k"))
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="bench/results/search_overhead-cpu.json")
    args = ap.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="drn-overhead-"))
    cmd = [shutil.which("drn-search") or "drn-search", "--target-flops", "50%", "--arch", args.arch,
           "--dataset", "imagefolder", "--data-dir", str(Path(args.data_dir).absolute()),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--num-samples", str(args.trials), "--max-concurrent", str(args.concurrent),
           "--cpus-per-trial", str(max(1, (os.cpu_count() or 2) // args.concurrent)),
           "--scheduler", "fifo", "--tolerance", "0.5", "--backbone", "none", "--storage", str(storage),
           "--name", "overhead"]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    train = calib = tune_iter = 0.0
    per_trial = []
    for f in sorted((storage / "overhead").glob("trial-*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        t = sum(r["epoch_seconds"] for r in rows)
        c = sum(r.get("calib_seconds", 0.0) for r in rows)
        it = sum(r["time_this_iter_s"] for r in rows)
        per_trial.append({"trial": int(rows[0]["optuna_trial"]), "train_s": t, "calib_s": c, "tune_iter_s": it,
                          "tune_total_s": rows[-1]["time_total_s"]})
        train += t
        calib += c
        tune_iter += it
    slots = args.concurrent * wall
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
           "command": " ".join(cmd), "wall_s": wall, "train_s": train, "calib_s": calib, "tune_iter_s": tune_iter,
           "share_training": train / slots, "share_trainer": (train + calib) / slots,
           "share_in_trial_reports": tune_iter / slots,
           "trials": per_trial, "goal_met": train / slots >= 0.9}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    shutil.rmtree(storage, ignore_errors=True)
    print("| trials × epochs | concurrent | wall s | Σ training s | Σ calibration s | Σ between reports s | "
          "training share | trainer share (+ calibration) | goal ≥ 90 % |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.trials} × {args.epochs} | {args.concurrent} | {wall:.0f} | {train:.0f} | {calib:.0f} | {tune_iter:.0f} | "
          f"{out['share_training']:.1%} | {out['share_trainer']:.1%} | {'met' if out['goal_met'] else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
