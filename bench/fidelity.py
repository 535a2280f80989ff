"""Paper fidelity at CPU scale (issue 8, item 5), on the real cifar10-5k images: every run is a
`drn-train` with the same schedule, then `drn-eval` (hard routing; same-path ratio under
perturbation) and, for DRN runs, `drn-eval --routing sample` (Ber-Dis).

    python bench/fidelity.py run   [--data-dir DIR] [--only PREFIX]   # resumable: finished runs are kept
    python bench/fidelity.py report                                   # tables -> bench/results/fidelity.md, plots -> docs/img/

The runs (ResNet-20 unless --arch; SEEDS seeds each, seed 0 of everything first):
    table2-<target>-s<seed>        DRN at 30 / 50 / 70 % of the full FLOPs; full-s<seed>: the plain ResNet
    table4-<kind>-s<seed>          FirstK, RandomK, DistributedK at the k closest to 50 % (matched FLOPs)
    ablation-<no-cons|no-div>-s<seed>   DRN at 50 % with lambda = 0 / alpha = 0
    fig7-dd<d_d>                   DRN at 50 %, margin d_d = 0 and 1 (seed 0; 0.5 is table2-50-s0)
The consistency experiment reads the same-path ratio of table2-50 (with Eq. 5) and ablation-no-cons
(without), as the paper's 53.4 % vs 22.7 %.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # drn from this checkout, installed or not
RESULTS = ROOT / "bench" / "results" / "fidelity"
RUNS_DIR = ROOT / "bench" / "runs" / "fidelity"
SEEDS = (0, 1)
EPOCHS, FINETUNE = 6, 2           # the same schedule for every run (~6 min per DRN run on 2 cores)
BATCH = 64                        # 62 steps per epoch on the 4068 training images
TARGETS = ("30%", "50%", "70%")
DD_SWEEP = ("0", "1.0")   # plus 0.5, the default, from table2-50%-s0


def plan(arch: str) -> dict[str, list[str]]:
    runs = {}
    for s in SEEDS:   # seed 0 of everything first, then the d_d sweep, then the other seeds
        for t in TARGETS:
            runs[f"table2-{t.rstrip('%')}-s{s}"] = ["--target-flops", t, "--seed", str(s)]
        runs[f"full-s{s}"] = ["--routing", "full", "--seed", str(s)]
        for kind in ("firstk", "randomk", "distributedk"):
            runs[f"table4-{kind}-s{s}"] = ["--routing", kind, "--target-flops", "50%", "--seed", str(s)]
        runs[f"ablation-no-cons-s{s}"] = ["--target-flops", "50%", "--lam", "0", "--seed", str(s)]
        runs[f"ablation-no-div-s{s}"] = ["--target-flops", "50%", "--alpha", "0", "--seed", str(s)]
        if s == SEEDS[0]:
            for dd in DD_SWEEP:
                runs[f"fig7-dd{dd}"] = ["--target-flops", "50%", "--d-d", dd, "--seed", "0"]
    return runs


def _cli(entry: str, args: list[str]) -> subprocess.CompletedProcess:
    code = f"import sys; from drn.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    todo = {k: v for k, v in plan(args.arch).items() if k.startswith(args.only or "")}
    for i, (name, flags) in enumerate(todo.items(), 1):
        out_json = RESULTS / f"{name}.json"
        if out_json.exists():
            continue
        out = RUNS_DIR / name
        common = ["--arch", args.arch, "--dataset", "imagefolder", "--data-dir", args.data_dir, "--epochs",
                  str(EPOCHS), "--finetune-epochs", str(FINETUNE), "--batch-size", str(BATCH), "--device", "cpu", "--json"]
        t0 = time.time()
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        proc = _cli("train_main", [*common, *flags, "--out", str(out), *resume])
        if proc.returncode != 0:
            print(f"{name}: drn-train failed: {proc.stderr[-800:]}", file=sys.stderr)
            return 1
        record = {"name": name, "flags": flags, "arch": args.arch, "epochs": EPOCHS, "finetune_epochs": FINETUNE, "batch_size": BATCH,
                  "train": json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.time() - t0}
        for routing in ("hard", "sample") if "--routing" not in flags else ("hard",):
            ev = _cli("eval_main", [str(out / "checkpoint.pt"), "--routing", routing, "--split", "test", "--device",
                                    "cpu", "--json"])
            if ev.returncode != 0:
                print(f"{name}: drn-eval failed: {ev.stderr[-800:]}", file=sys.stderr)
                return 1
            record[f"eval_{routing}"] = json.loads(ev.stdout.strip().splitlines()[-1])
        out_json.write_text(json.dumps(record, indent=1))
        e = record["eval_hard"]
        print(f"[{i}/{len(todo)}] {name}: val acc {e['accuracy']:.2%}, FLOPs {e['flops']:.3g} "
              f"({e['flops'] / e['flops_full']:.0%}), K {e['k']:.1f}, paths {e['distinct_paths']}, "
              f"same-path {e['same_path_ratio']:.1%} | {record['seconds']:.0f}s", flush=True)
    return 0


def _load() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def _agg(recs: list[dict], key: str, ev: str = "eval_hard") -> str:
    vals = [r[ev][key] for r in recs]
    if not vals:
        return "–"
    m = statistics.mean(vals)
    if key in ("accuracy", "accuracy_perturbed", "same_path_ratio"):
        return f"{100 * m:.1f}" + (f" ± {100 * (max(vals) - min(vals)) / 2:.1f}" if len(vals) > 1 else "")
    if key == "flops":
        return f"{m:.3g}"
    return f"{m:.1f}"


def report(args) -> int:
    res = _load()
    if not res:
        print("no results yet: run `python bench/fidelity.py run` first", file=sys.stderr)
        return 1

    def group(prefix):
        return [r for n, r in res.items() if n.startswith(prefix)]
    lines = [f"Accuracy in % on the held-out test split (the 1017 images of cifar10-5k's val/ folder), mean ± half-range over seeds "
             f"{', '.join(map(str, SEEDS))}; {EPOCHS} + {FINETUNE} epochs at batch {BATCH} for every run.", ""]
    lines += ["**Table 2** (accuracy vs FLOPs)", "", "| model | val acc | FLOPs | of full | K | runs |", "|---|---|---|---|---|---|"]
    full = group("full-")
    rows2 = []
    for t in TARGETS:
        g = group(f"table2-{t.rstrip('%')}-")
        if g:
            rows2.append((t, g))
            lines.append(f"| DRN at {t} | {_agg(g, 'accuracy')} | {_agg(g, 'flops')} | "
                         f"{100 * g[0]['eval_hard']['flops'] / g[0]['eval_hard']['flops_full']:.0f} % | {_agg(g, 'k')} | {len(g)} |")
    if full:
        lines.append(f"| full ResNet (no routers) | {_agg(full, 'accuracy')} | {_agg(full, 'flops')} | 100 % | "
                     f"{_agg(full, 'k')} | {len(full)} |")
    lines += ["", "**Table 4** (at ~50 % FLOPs: heuristics, and Ber-Dis sampling of the DRN's routes)", "",
              "| method | val acc | FLOPs | K | runs |", "|---|---|---|---|---|"]
    drn50 = group("table2-50-")
    for label, g, ev in [("FirstK", group("table4-firstk-"), "eval_hard"), ("RandomK", group("table4-randomk-"), "eval_hard"),
                         ("DistributedK", group("table4-distributedk-"), "eval_hard"),
                         ("DRN, Ber-Dis (sampled routes)", drn50, "eval_sample"), ("DRN", drn50, "eval_hard")]:
        if g:
            lines.append(f"| {label} | {_agg(g, 'accuracy', ev)} | {_agg(g, 'flops', ev)} | {_agg(g, 'k', ev)} | {len(g)} |")
    lines += ["", "**Ablation and the consistency experiment** (DRN at 50 %)", "",
              "| variant | val acc | val acc, perturbed images | FLOPs | same-path ratio under perturbation | distinct paths | runs |",
              "|---|---|---|---|---|---|---|"]
    for label, g in [("full loss", drn50), ("without consistency (λ = 0)", group("ablation-no-cons-")),
                     ("without diversity (α = 0)", group("ablation-no-div-"))]:
        if g:
            lines.append(f"| {label} | {_agg(g, 'accuracy')} | {_agg(g, 'accuracy_perturbed')} | {_agg(g, 'flops')} | "
                         f"{_agg(g, 'same_path_ratio')} % | "
                         f"{_agg(g, 'distinct_paths')} | {len(g)} |")
    fig7 = [(0.5, res[n]) for n in res if n == "table2-50-s0"] + [
        (float(n[len("fig7-dd"):]), r) for n, r in res.items() if n.startswith("fig7-dd")]
    fig7.sort(key=lambda p: p[0])
    lines += ["", "**Fig. 7** (distinct paths on val vs the diversity margin d_d, DRN at 50 %, seed 0)", "",
              "| d_d | distinct paths | val acc | FLOPs |", "|---|---|---|---|"]
    for dd, r in fig7:
        e = r["eval_hard"]
        lines.append(f"| {dd:g} | {e['distinct_paths']} | {100 * e['accuracy']:.1f} | {e['flops']:.3g} |")
    (ROOT / "bench" / "results" / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plots(rows2, full, group, fig7)
    _bars(group, drn50)
    return 0


def _plots(rows2, full, group, fig7) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, g, marker in [("DRN", [r for _, gg in rows2 for r in gg], "o"), ("full ResNet", full, "s"),
                             ("FirstK", group("table4-firstk-"), "v"), ("RandomK", group("table4-randomk-"), "^"),
                             ("DistributedK", group("table4-distributedk-"), "D")]:
        if g:
            ax.scatter([r["eval_hard"]["flops"] for r in g], [100 * r["eval_hard"]["accuracy"] for r in g],
                       marker=marker, label=label)
    ax.set_xlabel("FLOPs per image (val)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("cifar10-5k: accuracy vs FLOPs (Table 2 / 4a)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "fidelity-accuracy-flops.png", dpi=110)
    plt.close(fig)
    if fig7:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([d for d, _ in fig7], [r["eval_hard"]["distinct_paths"] for _, r in fig7], "o-")
        ax.set_xlabel("diversity margin d_d")
        ax.set_ylabel("distinct paths on val")
        ax.set_title("Fig. 7 at CPU scale")
        fig.tight_layout()
        fig.savefig(img / "fidelity-fig7.png", dpi=110)
        plt.close(fig)


def _bars(group, drn50) -> None:
    """Table 4 (a, b), the ablation and the consistency experiment: means over seeds, bars = range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(ax, items, key, title, ylabel, paper=None):
        items = [(label, [r[ev][key] for r in g]) for label, g, ev in items if g]
        xs = range(len(items))
        means = [100 * statistics.mean(v) for _, v in items]
        err = [[100 * (statistics.mean(v) - min(v)) for _, v in items], [100 * (max(v) - statistics.mean(v)) for _, v in items]]
        ax.bar(xs, means, yerr=err, capsize=3, color="tab:blue", label="this run (cifar10-5k)")
        if paper:
            ax.scatter([i for i, (label, _) in enumerate(items) if label in paper],
                       [paper[label] for label, _ in items if label in paper], color="tab:red", marker="_", s=300,
                       zorder=3, label="paper (full CIFAR-10 test set)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(list(xs), [label for label, _ in items], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    bar(axes[0], [("FirstK", group("table4-firstk-"), "eval_hard"), ("RandomK", group("table4-randomk-"), "eval_hard"),
                  ("DistributedK", group("table4-distributedk-"), "eval_hard"),
                  ("Ber-Dis", drn50, "eval_sample"), ("DRN", drn50, "eval_hard")],
        "accuracy", "Table 4: heuristics and Ber-Dis at ~50 % FLOPs", "val accuracy (%)")
    bar(axes[1], [("full loss", drn50, "eval_hard"), ("λ = 0", group("ablation-no-cons-"), "eval_hard"),
                  ("α = 0", group("ablation-no-div-"), "eval_hard")],
        "accuracy", "ablation at 50 % FLOPs", "val accuracy (%)")
    bar(axes[2], [("with Eq. 5", drn50, "eval_hard"), ("without (λ = 0)", group("ablation-no-cons-"), "eval_hard")],
        "same_path_ratio", "consistency: same route after perturbation", "images with the same route (%)",
        paper={"with Eq. 5": 53.4, "without (λ = 0)": 22.7})
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "fidelity-table4-ablation.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--data-dir", default=os.environ.get("DRN_DATA_DIR", str(ROOT.parent / "shared/data/cifar10-5k")))
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--only", help="run only the runs whose name starts with this")
    args = ap.parse_args()
    args.data_dir = str(Path(args.data_dir).absolute())
    return run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
