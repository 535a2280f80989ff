"""Does depth pay in a short schedule? (BENCHMARKS.md, "Learning-rate warm-up and zero-init residuals")

The goal: on cifar10-5k, the plain ResNet-110 trained 10 epochs reaches at least the val accuracy
of the plain ResNet-20 trained 10 epochs, with drn-train's defaults. Each run is one
`drn-train --routing full --epochs 10` with the default recipe plus the variant's flags; the
per-epoch val accuracy is kept, so where a deep network falls behind shows.

    python bench/depth.py run [--arch resnet20 resnet110] [--seeds 0] [--variant NAME -- FLAGS...]
    python bench/depth.py report          # Markdown table of every result -> stdout

Resumable: a run whose JSON is in bench/results/depth/ is not run again; an interrupted one
resumes from its checkpoint.
"""
import json
import statistics
import sys

from _common import ROOT, parse_variant_args, train_run, variant_parser

RESULTS = ROOT / "bench" / "results" / "depth"
RUNS = ROOT / "bench" / "runs" / "depth"
EPOCHS = 10


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arch in args.arch:
            name = f"{args.variant}-{arch}-s{seed}"
            if (RESULTS / f"{name}.json").exists():
                continue
            flags = ["--arch", arch, "--routing", "full", "--dataset", "imagefolder", "--data-dir", args.data_dir,
                     "--epochs", str(EPOCHS), "--seed", str(seed), *args.flags]
            done = train_run(name, RUNS / name, flags, ("epoch", "lr", "loss_cls", "train_accuracy", "accuracy"))
            if done is None:
                return 1
            rec = {"name": name, "variant": args.variant, "arch": arch, "seed": seed, "flags": args.flags, **done}
            (RESULTS / f"{name}.json").write_text(json.dumps(rec, indent=1))
            m = rec["final"]
            print(f"{name}: val {m['val_accuracy']:.2%}, test {m['test_accuracy']:.2%} | {rec['seconds']:.0f}s",
                  flush=True)
    return 0


def report(args) -> int:
    recs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    groups: dict[tuple, list] = {}
    for r in recs:
        groups.setdefault((r["variant"], r["arch"]), []).append(r)
    print("| variant | flags | arch | val acc per epoch (seed 0) | val acc | test acc | seeds | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    pm = lambda v: f"{100 * statistics.mean(v):.1f}" + (f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else "")
    for (variant, arch), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        curve = " ".join(f"{100 * h['accuracy']:.0f}" for h in rs[0]["history"])
        print(f"| {variant} | `{' '.join(rs[0]['flags']) or '(defaults)'}` | {arch} | {curve} | "
              f"{pm([r['final']['val_accuracy'] for r in rs])} | {pm([r['final']['test_accuracy'] for r in rs])} | "
              f"{' '.join(str(r['seed']) for r in rs)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return 0


def main() -> int:
    args = parse_variant_args(variant_parser(__doc__, ["resnet20", "resnet110"]))
    return run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
