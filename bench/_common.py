"""What the benchmark runners share: drn-train / drn-eval in a fresh interpreter on this checkout,
the `--` pass-through of extra drn-train flags, a run's history, and timing (drn.cost's)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drn.cost import median_seconds  # noqa: E402,F401  (the one timing loop: warm-up, then the median)


def run_cli(entry: str, args: list[str], threads: int | None = None) -> subprocess.CompletedProcess:
    """drn.cli's `entry` (train_main, eval_main) on `args`, in a fresh interpreter that imports this
    checkout; threads: OMP_NUM_THREADS (default: the caller's, else 1: one run per core)."""
    code = f"import sys; from drn.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
    omp = str(threads) if threads is not None else os.environ.get("OMP_NUM_THREADS", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": omp}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def parse_variant_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse argv up to `--`; what follows it becomes `args.flags` (extra drn-train flags)."""
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.flags = argv[cut + 1:]
    args.data_dir = str(Path(args.data_dir).absolute())
    return args


def history(out: Path) -> list[dict]:
    """The per-epoch metrics of the run in `out` (its checkpoint's history)."""
    import torch
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
