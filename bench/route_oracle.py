"""Can per-image compute pay on this data at all, and do the DRN's routers spend it where it pays?
(BENCHMARKS.md, "What per-image compute can buy here, and where the routers spend it")

Two static routes trained from the same start, a small one and a large one, bracket a budget t. An
image-adaptive network at t can at best run the large route on the images that need it and the small
one on the rest. On the held-out test images, at t of the whole network's FLOPs on average:

    random       a share q of the images, drawn at random, take the large route (what a DRN whose routes
                 do not depend on difficulty gets; the expectation, exact)
    confidence   the q images the small route is least sure of (max softmax) take the large one; the
                 threshold is set on val, where the mean FLOPs land on t (a router that knew each
                 image's difficulty up front; the cost of running the small route first is not counted)
    oracle       the images the small route gets wrong and the large one right go first (a ceiling that
                 reads the labels)
    mid          the static route at t itself, when given

and for each DRN given: its own test accuracy at its FLOPs, and how it spends them: its mean FLOPs on
the quarter of the test images the small route is least sure of against the quarter it is surest of
(a DRN that spends where compute pays gives the unsure quarter more). With --probe, whether its routers
could see where compute pays: the AUC, for the images only the large route gets right ("gain"), of the
DRN's own FLOPs share and of the best linear probe on one routed block's router input (the pooled
features it reads; 5-fold cross-validated on the test images, so an upper bound on what a linear
router could learn from them); the same probe for the small route's unsure quarter.

    python bench/route_oracle.py SMALL LARGE [--mid MID] [--drn DRN ...] [--target 0.5] [--seeds 0 1 2] [--probe]

Paths may hold `{seed}`: the figures are then the mean over --seeds, one row per seed first.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.route_why import flops_share, load  # noqa: E402


@torch.no_grad()
def predict(model, split):
    """(probabilities, correct, FLOPs share per image) of a model on a split."""
    x, y = split.images.float().div(255), split.labels
    out = model(x, routing="mask")
    p = out.logits.softmax(1)
    return p, p.argmax(1) == y, flops_share(model, out.gates)


def auc(label: torch.Tensor, score: torch.Tensor) -> float:
    """The area under the ROC curve of score for the bool label (Mann-Whitney, ties counted half)."""
    pos, neg = score[label].double(), score[~label].double()
    return ((pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean()).item()


def probe_auc(z: torch.Tensor, label: torch.Tensor, folds: int = 5, l2: float = 1e-2) -> float:
    """A linear probe's cross-validated AUC: logistic regression (L2 `l2`, standardised inputs) fit on
    four folds of (z (N, C), label (N,)), scored on the fifth."""
    score = torch.empty(len(z), dtype=torch.float64)
    fold = torch.arange(len(z)) % folds
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = z[tr].mean(0), z[tr].std(0) + 1e-6
        x, y = ((z[tr] - mu) / sd).double(), label[tr].double()
        w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y) + l2 * w[:-1].square().sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        score[te] = (((z[te] - mu) / sd).double() @ w[:-1] + w[-1]).detach()
    return auc(label, score)


@torch.no_grad()
def router_inputs(model, split) -> list[torch.Tensor]:
    """The pooled features (N, C) each routed block's router reads, under the DRN's own hard routes."""
    zs = {}
    hooks = [b.router.register_forward_pre_hook(
        lambda mod, args, i=i: zs.__setitem__(i, args[1] if len(args) > 1 and args[1] is not None
                                              else args[0].mean(dim=(2, 3))))
        for i, b in enumerate(model.blocks) if not b.always]
    model(split.images.float().div(255), routing="mask")
    for h in hooks:
        h.remove()
    return [z.float() for _, z in sorted(zs.items())]


def one_seed(a, seed: int) -> dict:
    path = lambda p: p.format(seed=seed)
    small, data = load(path(a.small), a.data_dir)
    large, _ = load(path(a.large), a.data_dir, data)
    (pv, _, sv), (pt, okt, _) = predict(small, data.val), predict(small, data.test)
    _, oklt, lt = predict(large, data.test)
    s, l = sv.mean().item(), lt.mean().item()
    if not s < a.target < l:
        raise SystemExit(f"error: the target {a.target} is not between the small route's FLOPs ({s:.3f}) "
                         f"and the large one's ({l:.3f})")
    q = (a.target - s) / (l - s)                              # the share of images that take the large route
    threshold = torch.quantile(pv.max(1).values, q).item()    # set on val
    big = pt.max(1).values < threshold                       # these images take the large route
    conf_acc = torch.where(big, oklt, okt).float().mean().item()
    conf_flops = (s + big.float().mean().item() * (l - s))
    rand_acc = ((1 - q) * okt.float() + q * oklt.float()).mean().item()
    gain = (oklt.float() - okt.float())                       # +1: only the large route is right
    n = round(q * len(gain))
    oracle_acc = okt.float().mean().item() + gain.sort(descending=True).values[:n].clamp(min=0).sum().item() / len(gain)
    row = {"seed": seed, "small": okt.float().mean().item(), "large": oklt.float().mean().item(), "q": q,
           "random": rand_acc, "confidence": conf_acc, "confidence_flops": conf_flops, "oracle": oracle_acc}
    if a.mid:
        mid, _ = load(path(a.mid), a.data_dir, data)
        _, okm, sm = predict(mid, data.test)
        row["mid"], row["mid_flops"] = okm.float().mean().item(), sm.mean().item()
    conf = pt.max(1).values
    lo, hi = conf <= torch.quantile(conf, 0.25), conf >= torch.quantile(conf, 0.75)
    for i, d in enumerate(a.drn):
        drn, _ = load(path(d), a.data_dir, data)
        _, okd, sd = predict(drn, data.test)
        row[f"drn{i}"], row[f"drn{i}_flops"] = okd.float().mean().item(), sd.mean().item()
        row[f"drn{i}_unsure"], row[f"drn{i}_sure"] = sd[lo].mean().item(), sd[hi].mean().item()
        if a.probe:
            only_large = oklt & ~okt
            zs = router_inputs(drn, data.test)
            row[f"drn{i}_share_auc_gain"] = auc(only_large, sd)
            row[f"drn{i}_probe_auc_gain"] = max(probe_auc(z, only_large) for z in zs)
            row[f"drn{i}_probe_auc_unsure"] = max(probe_auc(z, lo) for z in zs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("small")
    ap.add_argument("large")
    ap.add_argument("--mid", help="the static route at the target, for reference")
    ap.add_argument("--drn", nargs="*", default=[], help="DRN checkpoints at the target")
    ap.add_argument("--target", type=float, default=0.5, help="the budget, a share of the whole network's FLOPs")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--probe", action="store_true", help="could the DRNs' routers see where compute pays?")
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k")))
    a = ap.parse_args(argv)
    rows = [one_seed(a, s) for s in a.seeds]
    keys = [k for k in rows[0] if k != "seed"]
    pct = lambda k, v: f"{v:.3f}" if "flops" in k or k in ("q",) or k.endswith(("unsure", "_sure")) and "auc" not in k else f"{100 * v:.1f}"
    print("| seed | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(pct(k, r[k]) for k in keys) + " |")
    if len(rows) > 1:
        print("| mean | " + " | ".join(pct(k, statistics.mean(r[k] for r in rows)) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
