"""Where does a routed model lose to a static route? (BENCHMARKS.md, "Which images a dynamic network loses")

On the held-out test images, for a DRN checkpoint and a static route's checkpoint trained from the
same start on the same images:
  - the DRN's FLOPs per image (quantiles) and, by bins of it, the DRN's accuracy beside the static
    route's on the very same images, and the same by class;
  - whether the routes need their own batch-norm statistics: the test images of each frequent route
    with the network's running statistics, with statistics recomputed on all training images
    (a control) and with statistics recomputed on the training images of that route only.

    python bench/route_why.py DRN_CHECKPOINT STATIC_CHECKPOINT [--data-dir DIR]
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load(path: str, data_dir: str, data=None):
    from drn.checkpoint import load_checkpoint, model_from_checkpoint
    from drn.data import load_dataset
    ck = load_checkpoint(path)
    model, _ = model_from_checkpoint(ck)
    model.eval()
    if data is None:
        c = ck["config"]
        data = load_dataset(c["dataset"], data_dir, c["val_fraction"], c["val_seed"], ck["val_index"])
    return model, data


def flops_share(model, gates: torch.Tensor) -> torch.Tensor:
    from drn.cost import measure_cost_table
    t = measure_cost_table(model)
    block = torch.tensor(t.block)
    return (t.fixed + gates.float() @ block) / (t.fixed + block.sum())


def recompute_bn(model, x: torch.Tensor, gates: torch.Tensor):
    """A copy of the model whose BN running statistics are the exact means over x on its routes."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None   # cumulative average
    m.train()
    for i in range(0, len(x), 256):
        m(x[i:i + 256], routing="hard", gates=gates[i:i + 256])
    return m.eval()


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("drn")
    ap.add_argument("static")
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k")))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    model, data = load(a.drn, a.data_dir)
    static, _ = load(a.static, a.data_dir, data)
    x, y = data.test.images.float().div(255), data.test.labels
    out, sout = model(x, routing="mask"), static(x, routing="mask")
    ok, sok = out.logits.argmax(1) == y, sout.logits.argmax(1) == y
    cost, scost = flops_share(model, out.gates), flops_share(static, sout.gates)
    q = torch.quantile(cost, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
    print(f"DRN {ok.float().mean():.3f} at {cost.mean():.3f} of the FLOPs (quantiles {' '.join(f'{v:.2f}' for v in q)}); "
          f"static {sok.float().mean():.3f} at {scost.mean():.3f}")
    print("| DRN FLOPs | images | DRN acc | static acc, same images |\n|---|---|---|---|")
    edges = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 1.01]
    for lo, hi in zip(edges[:-1], edges[1:]):
        s = (cost >= lo) & (cost < hi)
        if s.any():
            print(f"| {lo:.1f}–{min(hi, 1):.1f} | {s.float().mean():.0%} | {ok[s].float().mean():.1%} | {sok[s].float().mean():.1%} |")
    print("| class | DRN FLOPs | DRN acc | static acc |\n|---|---|---|---|")
    for k, name in enumerate(data.classes):
        s = y == k
        print(f"| {name} | {cost[s].mean():.2f} | {ok[s].float().mean():.1%} | {sok[s].float().mean():.1%} |")
    xr = data.train.images.float().div(255)
    gr = model(xr, routing="mask").gates.bool()
    gt = out.gates.bool()
    pooled = recompute_bn(model, xr, gr)
    pok = pooled(x, routing="mask", gates=gt).logits.argmax(1) == y
    routes, counts = torch.unique(gt, dim=0, return_counts=True)
    print("| route | test images | running BN | recomputed, all routes | recomputed, this route |\n|---|---|---|---|---|")
    for j in counts.argsort(descending=True)[:8].tolist():
        st, sr = (gt == routes[j]).all(1), (gr == routes[j]).all(1)
        if sr.sum() < 64:
            continue
        own = recompute_bn(model, xr[sr], gr[sr])
        rok = own(x[st], routing="mask", gates=gt[st]).logits.argmax(1) == y[st]
        name = "".join("1" if b else "0" for b in routes[j].tolist())
        print(f"| {name} | {int(st.sum())} | {ok[st].float().mean():.1%} | {pok[st].float().mean():.1%} | "
              f"{rok.float().mean():.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
