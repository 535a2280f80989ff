"""Budget controller benchmark: does a trained model land on its FLOPs target?

For each target (share of the full network's FLOPs) one run with the adaptive mu controller, and
for comparison a small grid of fixed mu (the paper's and its peers' way); the best fixed mu for a
target is the grid run whose val FLOPs come closest to it. Finished runs are reused, so an
interrupted benchmark continues where it stopped.

    DRN_DATA_DIR=../shared/data/cifar10-5k python bench/controller.py

Writes bench/results/controller.json, bench/results/controller_mu.png, and prints a Markdown
table (docs/notes/2026-11-25-budget-controller.md, "Budget controller: landing on a FLOPs target").
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from drn.checkpoint import load_checkpoint, model_from_checkpoint
from drn.config import TrainConfig
from drn.cost import measure_cost_table
from drn.data import load_dataset
from drn.evaluate import evaluate
from drn.train import CHECKPOINT, Trainer

HERE = Path(__file__).resolve().parent


def run(cfg: TrainConfig, data) -> dict:
    """Train cfg to the end, reusing (or resuming) what is already in cfg.out."""
    path = Path(cfg.out) / CHECKPOINT
    resume = path.exists()
    if resume and load_checkpoint(path)["epoch"] >= cfg.total_epochs:
        print(f"[bench] reuse {cfg.out}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        Trainer(cfg, data=data, resume=resume).run()
        print(f"[bench] trained {cfg.out} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return load_checkpoint(path)


def val_metrics(ckpt: dict, data) -> dict:
    model, cfg = model_from_checkpoint(ckpt)
    cost = measure_cost_table(model)
    m = evaluate(model, data.val, cost)                      # at the model's (calibrated) threshold
    raw = evaluate(model, data.val, cost, threshold=0.5)     # what the controller alone achieved
    return {"accuracy": m["accuracy"], "flops": m["flops"], "flops_full": cost.full, "k": m["k"],
            "threshold": model.threshold.item(), "flops_at_0.5": raw["flops"], "accuracy_at_0.5": raw["accuracy"],
            "mu_final": ckpt["controller"]["mu"],
            "mu_per_epoch": [h["mu"] for h in ckpt["history"]],
            "val_flops_per_epoch": [h["flops"] for h in ckpt["history"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR"))
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--targets", type=float, nargs="+", default=[30, 45, 60, 80], help="percent of full FLOPs")
    p.add_argument("--mus", type=float, nargs="+", default=[0.01, 0.05, 0.15, 0.25, 0.45], help="fixed-mu grid")
    p.add_argument("--only", choices=("fixed", "target"), help="train only this half (the report needs both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "runs" / "controller"))
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("pass --data-dir or set DRN_DATA_DIR (an ImageFolder tree with train/ and val/)")
    data = load_dataset("imagefolder", args.data_dir)
    base = dict(arch=args.arch, dataset="imagefolder", data_dir=args.data_dir, epochs=args.epochs,
                finetune_epochs=args.finetune_epochs, seed=args.seed)
    fixed, targeted = {}, {}
    if args.only != "target":
        for mu in args.mus:
            cfg = TrainConfig(**base, mu=mu, out=f"{args.out}/fixed-mu{mu:g}")
            fixed[mu] = val_metrics(run(cfg, data), data)
    if args.only != "fixed":
        for t in args.targets:
            cfg = TrainConfig(**base, target_flops=f"{t:g}%", out=f"{args.out}/target{t:g}")
            targeted[t] = val_metrics(run(cfg, data), data)
    if args.only:
        return 0

    rows = []
    for t, m in targeted.items():
        goal = t / 100 * m["flops_full"]
        mu_best, f = min(fixed.items(), key=lambda kv: abs(kv[1]["flops"] / goal - 1))
        rows.append({"target_pct": t, "target_flops": goal,
                     "controller": {**m, "rel_error": m["flops"] / goal - 1},
                     "fixed_mu": {**f, "mu": mu_best, "rel_error": f["flops"] / goal - 1}})
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores, torch {torch.__version__}, CPU",
              "command": "python bench/controller.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "arch": args.arch, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
              "rows": rows, "fixed_grid": {str(k): v for k, v in fixed.items()}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "controller.json").write_text(json.dumps(result, indent=1))
    plot(targeted, fixed, HERE / "results" / "controller_mu.png")
    print("| target | controller FLOPs (val) | error | acc | best fixed mu | its FLOPs | error | acc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, f = r["controller"], r["fixed_mu"]
        print(f"| {r['target_pct']:g}% = {r['target_flops']:.3g} | {c['flops']:.3g} | {c['rel_error']:+.1%} | "
              f"{c['accuracy']:.1%} | {f['mu']:g} | {f['flops']:.3g} | {f['rel_error']:+.1%} | {f['accuracy']:.1%} |")
    return 0


def plot(targeted: dict, fixed: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for t, m in targeted.items():
        epochs = range(1, len(m["mu_per_epoch"]) + 1)
        a.plot(epochs, m["mu_per_epoch"], marker="o", label=f"target {t:g}%")
        line, = b.plot(epochs, [f / m["flops_full"] * 100 for f in m["val_flops_per_epoch"]], marker="o")
        b.axhline(t, color=line.get_color(), ls="--", lw=0.8)
    a.set_yscale("log")
    a.set(xlabel="epoch", ylabel="mu (end of epoch)", title="adaptive mu")
    a.legend()
    b.set(xlabel="epoch", ylabel="val FLOPs, % of full (threshold 0.5)", title="cost vs target (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
