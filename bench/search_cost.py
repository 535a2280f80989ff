"""Search cost (BENCHMARKS.md, "Search cost"): a 3-budget front for at most 3 x one full training, from one backbone.

    python bench/search_cost.py prep     # the references: the plain network (the backbone), the DRN from
                                         # scratch at each budget, and fine-tunes of several lengths from it
    python bench/search_cost.py diag     # the search's 70 % trial's main phase, one change at a time
    python bench/search_cost.py goal     # C, then the search, timed side by side on an idle machine
    python bench/search_cost.py report   # the tables of BENCHMARKS.md, "Search cost", from bench/results/search_cost/

ResNet-20 on cifar10-5k (DRN_DATA_DIR), batch 128, seed 0; E = the backbone's (scratch) schedule.
`prep` runs two trainings at a time, one thread each (accuracy only: its times are not used);
`goal` runs alone: C = `drn-train --routing full --epochs E` (every core), then
`drn-search --target-flops 30% 50% 70% --backbone-epochs E --num-samples 4 ...` (the default backbone
and trial schedule) on a fresh storage, and reads where its time went from each trial's result.json
and the driver's progress lines.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, run_cli, run_command, runner_parser

RESULTS = ROOT / "bench" / "results" / "search_cost"
RUNS = ROOT / "bench" / "runs" / "search_cost"
E = 30                      # epochs of the backbone = the scratch DRN's schedule
BATCH = 128
TARGETS = (30, 50, 70)      # % of the full network's FLOPs
FINETUNES = (3, 6, 10)      # candidate trial lengths (epochs before the frozen-router finetune), at 30 %
FINETUNE_LRS = (0.02, 0.05)  # candidate peak lrs of a fine-tune (drn-train's default: 0.1), at 30 %


def plan(data_dir: str) -> dict[str, list[str]]:
    full = str(RUNS / "full" / "checkpoint.pt")
    runs = {"full": ["--routing", "full", "--epochs", str(E)]}
    for t in TARGETS:
        runs[f"scratch-{t}"] = ["--target-flops", f"{t}%", "--epochs", str(E)]
    for t, f, lr in [(30, f, 0.1) for f in FINETUNES] + [(30, 6, lr) for lr in FINETUNE_LRS]:
        name = f"ft{f}-{t}" + (f"-lr{lr:g}" if lr != 0.1 else "")
        runs[name] = ["--init", full, "--target-flops", f"{t}%", "--epochs", str(f), "--lr", str(lr)]
    # a short main phase (routers learn; every block runs, two views) and a long finetune (routers
    # frozen, hard routes, one view): at 30 % a finetune epoch costs ~1/6 of a main one
    for t, f, ff in [(30, 3, 15), (30, 3, 30), (30, 2, 20)] + [(t, 3, 15) for t in (50, 70)] + \
            [(70, 2, 20), (70, 5, 15), (50, 2, 20), (30, 5, 20)]:
        runs[f"ft{f}+{ff}-{t}"] = ["--init", full, "--target-flops", f"{t}%", "--epochs", str(f),
                                   "--finetune-epochs", str(ff)]
    for t, f, ff in [(70, 3, 15), (70, 2, 20)]:   # the routers keep their peak lr through a short main phase
        runs[f"ft{f}+{ff}-{t}-rc"] = ["--init", full, "--target-flops", f"{t}%", "--epochs", str(f),
                                      "--finetune-epochs", str(ff), "--router-lr", "constant"]
    for t, f, ff, ki in [(70, 2, 20, 32), (70, 5, 20, 16), (30, 5, 20, 16), (50, 5, 20, 16)]:   # a faster loop
        runs[f"ft{f}+{ff}-{t}-ki{ki}"] = ["--init", full, "--target-flops", f"{t}%", "--epochs", str(f),
                                          "--finetune-epochs", str(ff), "--mu-ki", str(ki)]
    # the searches' 70 % trial: its sampled loss weights, and the same with the paper's d_d
    trial2 = ["--d-c", "0.246", "--lam", "0.23", "--alpha", "0.167"]
    for name, dd in (("trial2", "0.221"), ("trial2-dd0.5", "0.5")):
        runs[f"ft5+20-70-{name}"] = ["--init", full, "--target-flops", "70%", "--epochs", "5",
                                     "--finetune-epochs", "20", *trial2, "--d-d", dd]
    # the loop's start mu: 0.05 (the scratch value) or 1 (a trained block's router moves at mu ~1-3,
    # which the loop from 0.05 reaches only after the short main phase's lr has decayed)
    for t in TARGETS:
        runs[f"ft2+20-{t}-mu1"] = ["--init", full, "--target-flops", f"{t}%", "--epochs", "2",
                                   "--finetune-epochs", "20", "--mu", "1"]
    runs["ft2+20-70-trial2-mu1"] = ["--init", full, "--target-flops", "70%", "--epochs", "2",
                                    "--finetune-epochs", "20", *trial2, "--d-d", "0.221", "--mu", "1"]
    common = ["--arch", "resnet20", "--dataset", "imagefolder", "--data-dir", data_dir, "--batch-size", str(BATCH),
              "--seed", "0", "--device", "cpu", "--json"]
    return {k: [*common, *v] for k, v in runs.items()}


def _one(name: str, flags: list[str]) -> str:
    out = RUNS / name
    t0 = time.time()
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    proc = run_cli("train_main", [*flags, "--out", str(out), *resume])
    if proc.returncode != 0:
        return f"{name}: drn-train failed: {proc.stderr[-800:]}"
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    ev = run_cli("eval_main", [str(out / "checkpoint.pt"), "--split", "test", "--device", "cpu", "--json"])
    if ev.returncode != 0:
        return f"{name}: drn-eval failed: {ev.stderr[-800:]}"
    rec = {"name": name, "flags": flags, "train": m, "test": json.loads(ev.stdout.strip().splitlines()[-1]),
           "seconds": time.time() - t0}
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(RESULTS / f"{name}.json")
    e = rec["test"]
    return (f"{name}: val {m['accuracy']:.2%}, test {e['accuracy']:.2%}, FLOPs {e['flops'] / e['flops_full']:.1%} "
            f"of full | {rec['seconds']:.0f}s")


def prep(args) -> int:
    from concurrent.futures import ThreadPoolExecutor
    RESULTS.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    todo = {k: v for k, v in plan(args.data_dir).items() if not (RESULTS / f"{k}.json").exists()}
    if "full" in todo:                      # every fine-tune starts from it
        print(_one("full", todo.pop("full")), flush=True)
    started = [k for k in todo if (RUNS / k / "checkpoint.pt").exists()]
    first = started + [k for k in todo if "+" in k and k not in started]   # the recipe questions first
    todo = {k: todo[k] for k in [*first, *[k for k in todo if k not in first]]}
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda kv: _one(*kv), todo.items()):
            print(line, flush=True)
    return 0


# why the search's 70 % trial stayed a block over its target: the trial's loss weights, main phase only
# (5 epochs, no finetune), one thing changed at a time; the per-epoch mu and routes are the record
DIAG = {"A-dd0.221-mu-scale0.2": ["--d-d", "0.221", "--mu-scale", "0.2"],     # mu's ceiling 20 (100 x scale)
        "B-dd0.221-alpha0": ["--d-d", "0.221", "--alpha", "0"],              # no diversity loss
        "C-dd0.35": ["--d-d", "0.35"],
        "D-dd0.3": ["--d-d", "0.3"],
        "E-paper-2ep-mu1": ["--d-c", "0.2", "--lam", "0.2", "--alpha", "0.2", "--d-d", "0.5", "--epochs", "2",
                            "--mu", "1"],
        "F-dd0.221-2ep-mu1": ["--d-d", "0.221", "--epochs", "2", "--mu", "1"]}


def diag_flags(data_dir: str) -> dict[str, list[str]]:
    trial2 = ["--d-c", "0.246", "--lam", "0.23", "--alpha", "0.167"]
    base = ["--arch", "resnet20", "--dataset", "imagefolder", "--data-dir", data_dir, "--batch-size", str(BATCH),
            "--seed", "0", "--device", "cpu", "--json", "--init", str(RUNS / "full" / "checkpoint.pt"),
            "--target-flops", "70%", "--epochs", "5", "--finetune-epochs", "0", *trial2]
    return {name: [*base, *extra] for name, extra in DIAG.items()}   # a later flag wins


def diag_record(name: str, flags: list[str], checkpoint: Path) -> dict:
    import torch
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    full = ck["cost"]["full"] if isinstance(ck.get("cost"), dict) and "full" in ck["cost"] else None
    hist = []
    for h in ck["history"]:
        full = h.get("flops_full", full)
        hist.append({"epoch": h["epoch"], "mu": h["mu"], "val_flops_share": h["flops"] / full,
                     "train_flops_share": h["train_cost_hard"] / full, "val_accuracy": h["accuracy"],
                     "loss_diversity": h["loss_diversity"], "block_exec_rate": h["block_exec_rate"]})
    return {"name": name, "flags": flags, "history": hist}


def diag(args) -> int:
    """The 70 % trial's main phase, one change at a time (two runs at a time, one thread each)."""
    from concurrent.futures import ThreadPoolExecutor
    RESULTS.mkdir(parents=True, exist_ok=True)

    def one(kv):
        name, flags = kv
        out = RUNS / f"diag-{name}"
        shutil.rmtree(out, ignore_errors=True)
        proc = run_cli("train_main", [*flags, "--out", str(out)])
        if proc.returncode != 0:
            return f"{name}: drn-train failed: {proc.stderr[-800:]}"
        rec = diag_record(name, flags, out / "checkpoint.pt")
        (RESULTS / f"diag-{name}.json").write_text(json.dumps(rec, indent=1))
        return f"{name}: " + ", ".join(f"mu {h['mu']:.2f} val {h['val_flops_share']:.1%}" for h in rec["history"])

    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(one, diag_flags(args.data_dir).items()):
            print(line, flush=True)
    return 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def goal(args) -> int:
    """C, then the search, one after the other on an otherwise idle machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="drn-search-cost-"))
    common = ["--arch", "resnet20", "--dataset", "imagefolder", "--data-dir", args.data_dir, "--batch-size", str(BATCH),
              "--seed", "0"]
    threads = str(os.cpu_count() or 1)
    t0 = time.perf_counter()   # C: drn-train on every core, as a user runs it
    proc = run_cli("train_main", [*common, "--routing", "full", "--epochs", str(E), "--device", "cpu", "--json",
                               "--out", str(work / "full")], threads=int(threads))
    c = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"C = {c:.0f}s (drn-train --routing full --epochs {E})", flush=True)
    search = [shutil.which("drn-search") or "drn-search", "--target-flops", *[f"{t}%" for t in TARGETS], *common,
              "--backbone-epochs", str(E), "--num-samples", str(args.trials),
              *(["--epochs", str(args.trial_epochs)] if args.trial_epochs else []),
              *(["--finetune-epochs", str(args.trial_finetune)] if args.trial_finetune else []),
              "--storage", str(work / "storage"), "--name", "goal",
              *(["--max-concurrent", str(args.concurrent)] if args.concurrent else [])]
    print(" ".join(search), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(search, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    (RESULTS / f"goal{args.tag}-search.log").write_text(proc.stderr + "\n" + proc.stdout)
    import pyarrow.parquet as pq
    import torch
    backbone = next((work / "storage" / "backbones").glob("*/checkpoint.pt"))
    b_hist = torch.load(backbone, map_location="cpu", weights_only=True)
    b_seconds = b_hist["history"][-1]["backbone_seconds"]
    trials = []
    for f in sorted((work / "storage" / "goal").glob("trial-*/result.json")):
        rows = _rows(f)
        last = rows[-1]
        trials.append({"trial": int(last["optuna_trial"]), "target": None, "epochs": len(rows),
                       "epoch_s": sum(r["epoch_seconds"] for r in rows), "calib_s": sum(r.get("calib_seconds", 0.0) for r in rows),
                       "setup_s": rows[0].get("setup_seconds", 0.0), "export_s": last.get("export_seconds", 0.0),
                       "tune_total_s": last["time_total_s"]})
    table = pq.read_table(work / "storage" / "goal" / "trials.parquet").to_pylist()
    by_trial = {r["trial"]: r for r in table}
    for t in trials:
        t["target"] = by_trial[t["trial"]]["target"]
        t["state"] = by_trial[t["trial"]]["state"]
    import re                                   # the driver's view: when each trial started and ended
    for line in proc.stderr.splitlines():
        m = re.match(r"\[drn-search\s+(\d+)s\] trial (\d+) (?:\(target \S+\) started|(\w+).*trials ended)", line)
        if m:
            t = next((t for t in trials if t["trial"] == int(m.group(2))), None)
            if t is not None:
                t["ended_at" if m.group(3) else "started_at"] = int(m.group(1))
    slots = args.concurrent or os.cpu_count() or 1   # drn-search's default: one 1-CPU trial per core
    occupied = sum(t["ended_at"] - t["started_at"] for t in trials)
    window = max(t["ended_at"] for t in trials) - min(t["started_at"] for t in trials)
    search_s = wall - b_seconds                    # from the backbone's end to the command's
    train = sum(t["epoch_s"] + t["calib_s"] for t in trials)
    budgets = {}
    for t in TARGETS:
        feas = [r for r in table if r["target"] == f"{t}%" and r["feasible"]]
        best = max(feas, key=lambda r: r["accuracy"]) if feas else None
        ref = json.loads((RESULTS / f"scratch-{t}.json").read_text()) if (RESULTS / f"scratch-{t}.json").exists() else None
        budgets[f"{t}%"] = {"trial": best and best["trial"], "val": best and best["accuracy"],
                            "test": best and best["test_accuracy"], "flops_error": best and best["rel_error"],
                            "scratch_test": ref and ref["test"]["accuracy"], "scratch_val": ref and ref["train"]["accuracy"]}
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
           "C_s": c, "command": " ".join(search), "wall_s": wall, "backbone_s": b_seconds,
           "backbone_val": b_hist["history"][-1]["accuracy"], "backbone_test": (b_hist.get("test") or {}).get("test_accuracy"),
           "slots": slots, "after_backbone_s": search_s, "train_calib_s": train,
           "training_share": train / (slots * search_s), "trial_occupied_s": occupied, "trial_window_s": window,
           "share_of_trials_time": train / occupied, "share_of_slots_window": train / (slots * window),
           "trials": trials, "budgets": budgets,
           "within_3C": wall <= 3 * c}
    (RESULTS / f"goal{args.tag}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "trials"}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args) -> int:
    recs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
            if not p.stem.startswith(("goal", "diag"))}
    print("| run | start | budget | epochs (+ finetune) | peak lr | val acc | test acc | test FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in sorted(recs.items(), key=lambda kv: (kv[0] != "full", kv[0].split("-")[1:2], kv[0])):
        f, m, e = r["flags"], r["train"], r["test"]
        ep = f[f.index("--epochs") + 1]
        lr = f[f.index("--lr") + 1] if "--lr" in f else "0.1"
        budget = f[f.index("--target-flops") + 1] if "--target-flops" in f else "full"
        start = "backbone" if "--init" in f else "scratch"
        total = m.get("epoch", int(ep))
        print(f"| {name} | {start} | {budget} | {ep} (+{int(total) - int(ep)}) | {lr} | {m['accuracy']:.1%} | "
              f"{e['accuracy']:.1%} | {e['flops'] / e['flops_full']:.1%} |")
    for path in sorted(RESULTS.glob("goal*.json")):
        _goal_report(path)
    diags = sorted(RESULTS.glob("diag-*.json"))
    if diags:
        print("\n| run | changed | mu after each main epoch | val FLOPs after each main epoch | "
              "the undecided block's rate at the end |")
        print("|---|---|---|---|---|")
    for path in diags:
        d = json.loads(path.read_text())
        h = d["history"]
        mus = ", ".join(f"{e['mu']:.2f}" for e in h)
        shares = ", ".join(f"{e['val_flops_share']:.1%}" for e in h)
        print(f"| {d['name']} | {' '.join(DIAG[d['name']])} | {mus} | {shares} | {h[-1]['block_exec_rate'][7]:.2f} |")
    return 0


def _goal_report(path: Path) -> None:
    g = json.loads(path.read_text())
    print(f"\n{path.name}: {g['command'].split('drn-search', 1)[-1].split(' --storage')[0]}")
    print(f"C = {g['C_s']:.0f} s; search {g['wall_s']:.0f} s = {g['wall_s'] / g['C_s']:.2f} C (backbone "
          f"{g['backbone_s']:.0f} s)")
    print(f"training (epochs + calibration) {g['train_calib_s']:.0f} s: {g['share_of_trials_time']:.1%} of the time "
          f"trials held their slots ({g['trial_occupied_s']:.0f} s, start to end as the driver saw them), "
          f"{g['share_of_slots_window']:.1%} of {g['slots']} slots from the first trial's start to the last one's end "
          f"({g['trial_window_s']:.0f} s), {g['training_share']:.1%} of {g['slots']} slots from the backbone's end to "
          f"the command's ({g['after_backbone_s']:.0f} s)")
    print("\n| budget | trial | val acc | test acc | FLOPs error | scratch DRN test acc | search − scratch |")
    print("|---|---|---|---|---|---|---|")
    for t, b in g["budgets"].items():
        if b["trial"] is None:
            print(f"| {t} | none feasible | | | | {b['scratch_test']:.1%} | |")
            continue
        print(f"| {t} | {b['trial']} | {b['val']:.1%} | {b['test']:.1%} | {b['flops_error']:+.1%} | "
              f"{b['scratch_test']:.1%} | {100 * (b['test'] - b['scratch_test']):+.1f} |")
    print("\n| trial | target | state | epochs | epochs s | calibration s | setup s | model export s | Tune's total s "
          "| slot held s | rest s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in sorted(g["trials"], key=lambda t: t["trial"]):
        held = t["ended_at"] - t["started_at"]
        rest = held - t["epoch_s"] - t["calib_s"] - t["setup_s"] - t["export_s"]
        print(f"| {t['trial']} | {t['target']} | {t['state']} | {t['epochs']} | {t['epoch_s']:.0f} | {t['calib_s']:.1f} | "
              f"{t['setup_s']:.1f} | {t['export_s']:.1f} | {t['tune_total_s']:.0f} | {held} | {rest:.0f} |")


def main() -> int:
    ap = runner_parser(__doc__, ("prep", "diag", "goal", "report"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=4, help="goal: --num-samples")
    ap.add_argument("--concurrent", type=int, default=None, help="goal: trial slots (default: one per core)")
    ap.add_argument("--trial-epochs", type=int, help="goal: the trials' --epochs (default: drn-search's)")
    ap.add_argument("--trial-finetune", type=int, help="goal: the trials' --finetune-epochs (default: drn-search's)")
    ap.add_argument("--tag", default="", help="goal: suffix of the result files (goal<tag>.json)")
    return run_command(ap, {"prep": prep, "diag": diag, "goal": goal, "report": report})


if __name__ == "__main__":
    sys.exit(main())
