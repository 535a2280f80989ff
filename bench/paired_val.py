"""Is recipe A's val lead over recipe B more than the val split's noise? (BENCHMARKS.md, "The in-place
recipe at 30 %, without Eq. 5, and the default by val")

Every run carves the same val images, so a lead averaged over seeds and budgets still rests on one
set of images. For pairs of checkpoints (A, B) trained alike, the mean paired val difference and its
bootstrap over the val images: one resample of the images, applied to every pair at once.

    python bench/paired_val.py A_TEMPLATE B_TEMPLATE [--budgets 30 50 70] [--seeds 0 1 2] [--draws 2000]

A template is a checkpoint path holding {t} (the budget) and {seed}, e.g.
    bench/runs/fidelity/resnet20-warmlong-drn-{t}-normktfpip-s{seed}/checkpoint.pt
"""
import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.route_oracle import predict  # noqa: E402
from bench.route_why import load  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="checkpoint path template of recipe A, with {t} and {seed}")
    ap.add_argument("b", help="the same for recipe B")
    ap.add_argument("--budgets", nargs="+", default=["30", "50", "70"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k")))
    a = ap.parse_args(argv)
    diffs, data = [], None
    pairs = [(t, seed) for t in a.budgets for seed in a.seeds]
    for t, seed in pairs:
        ma, data = load(a.a.format(t=t, seed=seed), a.data_dir, data)
        mb, _ = load(a.b.format(t=t, seed=seed), a.data_dir, data)
        (_, oka, _), (_, okb, _) = predict(ma, data.val), predict(mb, data.val)
        diffs.append(oka.float() - okb.float())
    d = torch.stack(diffs)                                         # (pairs, val images)
    g = torch.Generator().manual_seed(0)
    n = d.shape[1]
    boot = torch.stack([d[:, torch.randint(0, n, (n,), generator=g)].mean() for _ in range(a.draws)])
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).mul(100).tolist()
    print("per pair: " + " ".join(f"{t} % s{seed} {100 * x:+.1f}" for (t, seed), x in zip(pairs, d.mean(1).tolist())))
    print(f"A - B on {n} val images, {len(pairs)} pairs: {100 * d.mean():+.2f} points, bootstrap over the images "
          f"sd {100 * boot.std():.2f}, 95 % [{lo:+.1f}, {hi:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
