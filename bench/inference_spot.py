"""Spot check: does gathered hard routing save wall-clock time in proportion to FLOPs?

ResNet-110 (untrained; routes forced at random, each block executed with probability p per
image), batch 256, CPU inference mode: gathered execution vs mask-multiply vs the full network.

    python bench/inference_spot.py
"""

import torch

from _common import median_seconds
from drn.models import build_model


def median_time(fn, repeats: int = 5) -> float:
    return median_seconds(fn, 1, repeats, lambda: None)


def main() -> None:
    torch.manual_seed(0)
    model = build_model("resnet110").eval()
    x = torch.rand(256, 3, 32, 32)
    full = torch.ones(256, model.num_blocks, dtype=torch.bool)
    print("| p (≈ FLOPs ratio) | gathered (hard) | mask-multiply | full network | speedup of gathered vs full |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        t_full = median_time(lambda: model(x, routing="hard", gates=full))
        for p in (0.3, 0.5, 0.7):
            g = torch.rand(256, model.num_blocks) < p
            t_hard = median_time(lambda: model(x, routing="hard", gates=g))
            t_mask = median_time(lambda: model(x, routing="mask", gates=g))
            print(f"| {p} | {t_hard:.2f} s | {t_mask:.2f} s | {t_full:.2f} s | "
                  f"{t_full / t_hard:.2f}× (ideal {1 / p:.2f}×) |")


if __name__ == "__main__":
    main()
