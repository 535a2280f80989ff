"""What are a trained DRN's input-dependent decisions worth? (BENCHMARKS.md, "Routes that depend on the image")

For every block that a trained model runs on some test images but not all (execution rate in
(3 %, 97 %), hard routing at the model's threshold), the test accuracy under four gate choices for
that block, the other blocks' gates kept:

    routed      the routers' own decisions
    shuffled    the same decisions handed to other images (same rate, no input dependence)
    all-run     the block runs on every image
    all-skip    it runs on none

routed − shuffled is what the router's choice of images adds (and the first row's "every block
shuffled" what all of them add together); all-run < routed means the block
only helps the images it was trained on (the block specialised).

Then Eq. 5's view of the same model: two views of each of 512 training images, either the training
augmentation (crop + h-flip, what Eq. 5 compares in training) or that plus the same-path test's
perturbation (crop, h-flip, v-flip or rotation); the mean L2 distance of a view's route to its
pair's mean (Eq. 10), Eq. 5 at d_c = 0.2 and 0.02, and the share of pairs on the same hard route.

    python bench/route_value.py CHECKPOINT [CHECKPOINT ...] [--data-dir DIR]
"""
import argparse
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def route_value(path: str, data_dir: str) -> list[str]:
    from drn.checkpoint import load_checkpoint, model_from_checkpoint
    from drn.data import load_dataset
    ck = load_checkpoint(path)
    model, _ = model_from_checkpoint(ck)
    model.eval()
    data = load_dataset(ck["config"]["dataset"], data_dir, ck["config"]["val_fraction"], ck["config"]["val_seed"],
                        ck["val_index"])
    x, y = data.test.images.float().div(255), data.test.labels
    acc = lambda gates: (model(x, routing="mask", gates=gates).logits.argmax(1) == y).float().mean().item()
    gates = model(x, routing="mask").gates.bool()
    rates = gates.float().mean(0).tolist()
    # every block's decisions handed to other images, each block its own shuffle: the same rates, no image in it
    gen = torch.Generator().manual_seed(1)
    shuffled = torch.stack([gates[torch.randperm(len(y), generator=gen), i] for i in range(gates.shape[1])], 1)
    rows = [f"| {Path(path).parent.name} | {' '.join(f'{r:.2f}' for r in rates)} | {100 * acc(gates):.1f} "
            f"(every block shuffled: {100 * acc(shuffled):.1f}) |"]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for i, rate in enumerate(rates):
        if not 0.03 < rate < 0.97:
            continue
        variants = {}
        for name, col in (("shuffled", gates[perm, i]), ("all-run", torch.ones_like(gates[:, i])),
                          ("all-skip", torch.zeros_like(gates[:, i]))):
            g = gates.clone()
            g[:, i] = col
            variants[name] = acc(g)
        rows.append(f"| ↳ block {i} at {rate:.2f} | routed {100 * acc(gates):.1f} | shuffled {100 * variants['shuffled']:.1f}"
                    f" · all-run {100 * variants['all-run']:.1f} · all-skip {100 * variants['all-skip']:.1f} |")
    return rows


@torch.no_grad()
def view_spread(path: str, data_dir: str) -> list[str]:
    from drn.checkpoint import load_checkpoint, model_from_checkpoint
    from drn.data import load_dataset, make_views, perturb
    from drn.losses import consistency_loss, regularization_loss
    ck = load_checkpoint(path)
    model, _ = model_from_checkpoint(ck)
    model.train()      # training's routing, BN in batch mode: what Eq. 5 sees
    data = load_dataset(ck["config"]["dataset"], data_dir, ck["config"]["val_fraction"], ck["config"]["val_seed"],
                        ck["val_index"])
    x = data.train.images[:512].float().div(255)
    rows = []
    for name in ("crop_flip", "perturb"):
        gen = torch.Generator().manual_seed(0)
        v = make_views(x, 2, gen)
        if name == "perturb":
            v[1::2] = perturb(v[1::2], gen)
        r = model(v, routing="straight").r.view(x.shape[0], 2, -1)
        g = r >= model.threshold
        rows.append(f"| {Path(path).parent.name} | {name} | {regularization_loss(r):.4f} | "
                    f"{consistency_loss(r, 0.2):.5f} | {consistency_loss(r, 0.02):.5f} | "
                    f"{100 * (g[:, 0] == g[:, 1]).all(1).float().mean():.1f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k")))
    args = ap.parse_args()
    print("| run | execution rate per block (test) | test acc |\n|---|---|---|")
    for c in args.checkpoints:
        print("\n".join(route_value(c, args.data_dir)))
    print("\n| run | views | route distance to the pair's mean | Eq. 5, d_c = 0.2 | Eq. 5, d_c = 0.02 "
          "| same hard route % |\n|---|---|---|---|---|---|")
    for c in args.checkpoints:
        print("\n".join(view_spread(c, args.data_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
