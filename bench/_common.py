"""What the benchmark runners share: drn-train / drn-eval in a fresh interpreter on this checkout,
the `--` pass-through of extra drn-train flags, a run's history, and timing (drn.cost's)."""
import argparse
import json
import os
import subprocess
import sys
import time
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


DATA_DIR = os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k"))   # the real images


def runner_parser(doc: str, commands: tuple[str, ...], archs: list[str] | None = None,
                  arch_choices: list[str] | None = None) -> argparse.ArgumentParser:
    """A runner's command line: the command, --data-dir, --arch when it has archs (and what it adds)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("what", choices=commands)
    ap.add_argument("--data-dir", default=DATA_DIR)
    if archs is not None:
        ap.add_argument("--arch", nargs="+", default=archs, choices=arch_choices)
    return ap


def run_command(ap: argparse.ArgumentParser, commands: dict) -> int:
    """Parse the command line and run its command (`what`) with the data folder made absolute."""
    args = ap.parse_args()
    args.data_dir = str(Path(args.data_dir).absolute())
    return commands[args.what](args)


def variant_parser(doc: str, archs: list[str]) -> argparse.ArgumentParser:
    """run / report of a variant: the default recipe plus the drn-train flags after `--`."""
    ap = runner_parser(doc, ("run", "report"), archs)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variant", default="default", help="a name for the flags that follow --")
    return ap


def parse_variant_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse argv up to `--`; what follows it becomes `args.flags` (extra drn-train flags)."""
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.flags = argv[cut + 1:]
    args.data_dir = str(Path(args.data_dir).absolute())
    return args


def train_run(name: str, out: Path, flags: list[str], keys: tuple[str, ...]) -> dict | None:
    """drn-train --json into `out` (resumed where it stopped); its final metrics, each epoch's `keys`
    and its seconds, or None (and the error's tail on stderr) when it fails."""
    flags = [*flags, "--device", "cpu", "--json", "--out", str(out)]
    if (out / "checkpoint.pt").exists():
        flags.append("--resume")
    t0 = time.time()
    proc = run_cli("train_main", flags)
    if proc.returncode != 0:
        print(f"{name}: drn-train failed: {proc.stderr[-800:]}", file=sys.stderr)
        return None
    return {"final": json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.time() - t0,
            "history": [{k: h.get(k) for k in keys} for h in history(out)]}


def history(out: Path) -> list[dict]:
    """The per-epoch metrics of the run in `out` (its checkpoint's history)."""
    import torch
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
