"""Spread of the latency cost table (`--target-latency-ms`) across repeated measurements.

Measures the ResNet-20 table N times on this machine's device and prints, per entry, the mean and
the coefficient of variation (std / mean) of the measurements, plus the max/min ratio of the totals.

    python bench/latency_spread.py [--n 10] [--batch 64] [--arch resnet20]
"""
import argparse
import platform
import statistics

import torch

from drn.cost import measure_latency_table
from drn.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="number of tables measured (default 10)")
    ap.add_argument("--batch", type=int, default=64, help="batch size timed (default 64)")
    ap.add_argument("--arch", default="resnet20", help="model (default resnet20)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(args.arch).to(device)
    tables = [measure_latency_table(model, batch_size=args.batch) for _ in range(args.n)]
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"{args.arch}, batch {args.batch}, {args.n} tables on {device} ({name}, {torch.get_num_threads()} threads)")

    def row(label, values):
        m = statistics.mean(values)
        print(f"| {label} | {m:.4f} | {statistics.stdev(values) / m:.1%} |")

    print("| entry (ms / image) | mean | CV |\n|---|---|---|")
    row("full network (table total)", [t.full for t in tables])
    row("fixed (stem, head, shortcuts, routers)", [t.fixed for t in tables])
    row("block 0 (16 ch)", [t.block[0] for t in tables])
    row(f"block {model.num_blocks - 1} (last)", [t.block[-1] for t in tables])
    totals = [t.full for t in tables]
    print(f"max/min of totals: {max(totals) / min(totals):.2f}")


if __name__ == "__main__":
    main()
