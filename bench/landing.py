"""Do the routers land the budget themselves? (BENCHMARKS.md, "Landing on the budget")

Each run is one `drn-train` to a FLOPs target with the default recipe (plus the variant's flags),
on the real cifar10-5k images. What counts is `uncalibrated_flops`: the val cost of the trained
model at Eq. 11's own threshold 0.5, before any trim; the goal is within 5 % of the target. The
trim that may follow (inside [0.4, 0.6]) and the test accuracy are recorded beside it.

    python bench/landing.py run [--arch resnet20 resnet56] [--targets 30 50 70] [--variant NAME -- FLAGS...]
    python bench/landing.py report          # Markdown table of every result -> stdout

Resumable: a run whose JSON is in bench/results/landing/ is not run again; an interrupted one
resumes from its checkpoint.
"""
import json
import sys

from _common import ROOT, parse_variant_args, train_run, variant_parser

RESULTS = ROOT / "bench" / "results" / "landing"
RUNS = ROOT / "bench" / "runs" / "landing"
SCHEDULE = ["--epochs", "6", "--finetune-epochs", "2", "--batch-size", "64"]   # the fidelity benchmark's


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        for t in args.targets:
            for seed in args.seeds:
                name = f"{args.variant}-{arch}-{t:g}-s{seed}"
                if (RESULTS / f"{name}.json").exists():
                    continue
                flags = ["--arch", arch, "--dataset", "imagefolder", "--data-dir", args.data_dir, *SCHEDULE,
                         "--target-flops", f"{t:g}%", "--seed", str(seed), *args.flags]
                flags = [f.format(arch=arch, seed=seed, runs=RUNS) if "{" in f else f for f in flags]
                done = train_run(name, RUNS / name, flags,
                                 ("epoch", "phase", "flops", "train_cost_hard", "mu", "mu_rho", "accuracy"))
                if done is None:
                    return 1
                m = done["final"]
                rec = {"name": name, "variant": args.variant, "arch": arch, "target_pct": t, "seed": seed,
                       "flags": args.flags, **done}
                (RESULTS / f"{name}.json").write_text(json.dumps(rec, indent=1))
                if "uncalibrated_flops" not in m:   # a static route (--routing ...): nothing lands
                    print(f"{name}: static, {m['val_flops'] / m['flops_full']:.1%} of full, val {m['val_accuracy']:.2%}, "
                          f"test {m['test_accuracy']:.2%} | {rec['seconds']:.0f}s", flush=True)
                    continue
                err = m["uncalibrated_flops"] / m["target"] - 1
                print(f"{name}: at 0.5 {m['uncalibrated_flops'] / m['flops_full']:.1%} of full ({err:+.1%}), "
                      f"threshold {m['threshold']:.3f}, val {m['val_accuracy']:.2%}, test {m['test_accuracy']:.2%} "
                      f"| {rec['seconds']:.0f}s", flush=True)
    return 0


def report(args) -> int:
    recs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    print("| variant | arch | target | seed | val FLOPs at 0.5 (of full) | error at 0.5 | within 5 % | trimmed threshold "
          "| val acc | test acc | peak μ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(recs, key=lambda r: (r["variant"], r["arch"], r["target_pct"], r["seed"])):
        m = r["final"]
        if "uncalibrated_flops" not in m:   # a static route
            print(f"| {r['variant']} | {r['arch']} | {r['target_pct']:g} % | {r['seed']} | "
                  f"{m['val_flops'] / m['flops_full']:.1%} (static) | | | | {m['val_accuracy']:.1%} | "
                  f"{m['test_accuracy']:.1%} | |")
            continue
        err = m["uncalibrated_flops"] / m["target"] - 1
        print(f"| {r['variant']} | {r['arch']} | {r['target_pct']:g} % | {r['seed']} | "
              f"{m['uncalibrated_flops'] / m['flops_full']:.1%} | {err:+.1%} | {'yes' if abs(err) <= 0.05 else 'no'} | "
              f"{m['threshold']:.3f} | {m['val_accuracy']:.1%} | {m['test_accuracy']:.1%} | "
              f"{max(h['mu'] for h in r['history']):.2f} |")
    return 0


def main() -> int:
    ap = variant_parser(__doc__, ["resnet20"])
    ap.add_argument("--targets", type=float, nargs="+", default=[30, 50, 70])
    ap.epilog = ("extra drn-train flags go after --; {arch}, {seed} and {runs} (the runs folder) in a value are "
                 "filled in, e.g. -- --init {runs}/full-{arch}-s{seed}/checkpoint.pt")
    args = parse_variant_args(ap)
    return run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
