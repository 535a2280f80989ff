"""Paper fidelity at CPU scale (BENCHMARKS.md, "Paper fidelity"): does the DRN earn its budget against static routes?

Every run is one `drn-train` on the real cifar10-5k images (train / a 10 % val carve / the held-out
test folder) with the same schedule, then `drn-eval --split test` (hard routing, and the same-path
ratio under perturbation; for DRN runs also Ber-Dis sampling). Selection inside a run (the budget
loop, the trim) reads val; the tables report test.

    python bench/fidelity.py run    [--arch resnet20 resnet56] [--only SUBSTRING...] [--dry-run]
    python bench/fidelity.py report           # -> bench/results/fidelity.md (+ plots in docs/img/)
    python bench/fidelity.py routes           # the route recipes against the best static routes
    python bench/fidelity.py compute          # does compute buy accuracy? statics and the whole network
    python bench/fidelity.py sweep            # one parameter at a time, in a search trial's split

Several `run`s may work side by side (one per core): each claims a run with a lock file, a crashed
claim is taken over, a finished run (its JSON in bench/results/fidelity/) is never run again and an
interrupted one resumes from its checkpoint. runs/ is scratch space: a plain network whose checkpoint
is gone is trained again for the warm runs still to run (the same code gives the same weights, bit
for bit, on CPU), and a warm record whose start fingerprint (`init_id`) is not the plain network's
(`weights_id`) is moved aside and run again, so that warm runs of a seed always share their start.

The plan, for each arch and seed (seeds 0 of everything first):
    {arch}-full-s{seed}                      the plain network (--routing full): Table 2's reference and
                                             the warm start of every `warm` run of that seed
    {arch}-{start}-{method}-{t}-s{seed}      start: scratch | warm (--init the plain network);
                                             method: drn | firstk | randomk | distributedk | deepk; t: the
                                             budget in % of the full FLOPs (statics at the closest k;
                                             RandomK draws a route within 5 % of it)
    {arch}-{start}-{method}2v-{t}[-k{k}]-s{seed}  RandomK, DistributedK and DeepK trained on two augmented
                                             views per image and step (--views 2), as the DRN is: the
                                             equal-images control (one view is the paper's protocol)
    {arch}-{start}-{method}-{t}-k{k}-s{seed} a deterministic static route (FirstK, DistributedK, DeepK) whose
                                             closest k misses the budget by more than 5 %: the k on the
                                             budget's other side, so that the report reads the method
                                             at the DRN's FLOPs, interpolated between the two
    resnet20-{start}-drn-{t}-soft-s{seed}    the DRN trained with --train-routing soft (Eq. 4, the paper's),
                                             against the default straight-through, in every ResNet-20 cell
    resnet20-scratch-drn-50-{ablation}-s{seed}   soft (the paper's Eq. 4 in training instead of the
                                             straight-through hard routes), nocons (lambda = 0), nodiv
                                             (alpha = 0), and the margin of Eq. 5 at the scale of the
                                             routes (d_c = 0.02), consexec (Eq. 5 and 10 on the routes the
                                             views ran, --consistency-routes executed), perturb (views 2..M
                                             also a crop, h-flip, v-flip or rotation, --view-augment perturb:
                                             views that differ, for Eq. 5 to act on) and perturbnocons (the
                                             same without Eq. 5, lambda = 0)
    resnet56-full-drnrecipe-s{seed}, resnet56-{start}-{method}[2v]-50-drnrecipe-s{seed}
                                             the plain network and the paper's statics on the DRN's init and
                                             warm-up (the usual BN init, 2 warm-up epochs). The main ResNet-56
                                             static rows pin zero-init without warm-up, the statics' default
                                             until 2026-12-02, when these runs made the DRN's recipe
                                             theirs (drn/config.py); the plain network keeps zero-init
    {arch}-scratch-drn-{t}-hold-s{seed}      the DRN with the finetune's rate hold (--finetune-rates hold), the
                                             default since 2026-12-02; every other DRN row ran
                                             with frozen routers and pins --finetune-rates free
    {arch}-{start}-drn-{t}-reset-s{seed}     the same with the loop's integral reset at the crossing
                                             (--mu-integral reset), from scratch and warm: today's default
                                             (since 2026-12-03); the rows before it pin --mu-integral always
    {arch}-{start}-drn-{t}-{recipe}-s{seed}  the route recipes (ROUTE_RECIPES): routes that depend on the image
    resnet20-full2v[-long]-s{seed}, resnet20-scratch-distributedk2v-{t}-long-s{seed}
                                             does compute buy accuracy? the whole network on two views and
                                             the statics at 2.75 times the schedule (18 + 4; `compute`)
    resnet20-warmlong-{method}2v-{t}-s{seed}, resnet20-warmlong-drn-{t}-{recipe}-s{seed}
                                             the statics and the DRN from the whole network trained 18 + 4:
                                             a start whose blocks pay
    resnet20-warmlong-{method}2v-{t}-kd-s{seed}, resnet20-warmlong-drn-{t}-{recipe}kd-s{seed}
                                             the same with distillation from that network (--distill 1)
"""
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import ROOT, run_cli, run_command, runner_parser

RESULTS = ROOT / "bench" / "results" / "fidelity"
RUNS_DIR = ROOT / "bench" / "runs" / "fidelity"
SEEDS = (0, 1, 2)
EPOCHS, FINETUNE = 6, 2           # the same schedule for every run, static or routed, scratch or warm
BATCH = 64                        # 63 steps per epoch on the 3661 training images
TARGETS = {"resnet20": (30, 50, 70), "resnet56": (50,)}
METHODS = ("drn", "firstk", "randomk", "distributedk", "deepk")
STATIC = METHODS[1:]
PAPER = STATIC[:3]                # the paper's Table 4a baselines: the DRN's bar; DeepK is the DRN's start route
TWO_VIEWS = ("randomk", "distributedk", "deepk")   # also trained on 2 views per image, the DRN's images per step
ALT = "soft"                      # the training routing the DRN is also run with, in every ResNet-20 cell
BRACKETED = ("distributedk", "deepk")   # FirstK trails by 3-8 points: its second point would not change the best
# DeepK (the auto start's other route; on ResNet-56 at 50 % the start is DistributedK's) runs on ResNet-20 only
# the DRN rows ran before the finetune held the routers' rates (2026-12-02) and before the loop's
# integral was reset at the crossing (2026-12-03): pinned as they ran; `hold` rows are the default of
# 2026-12-02, `reset` rows today's
FREE = ["--finetune-rates", "free", "--mu-integral", "always"]
HOLD = {"resnet20": (30, 50, 70), "resnet56": (50,)}   # scratch: where blocks stay undecided
RECIPE = ["--no-zero-init-residual", "--warmup-epochs", "2"]   # the DRN's own init and warm-up on ResNet-56
# the statics' recipe before 2026-12-02 (zero-init, no warm-up on ResNet-56), which their main rows
# were run with: pinned so that the records stay what their flags say; `drnrecipe` rows are today's default
ZERO = {"resnet20": [], "resnet56": ["--zero-init-residual"]}
ABLATIONS = {"soft": ["--train-routing", "soft"], "nocons": ["--lam", "0"], "nodiv": ["--alpha", "0"],
             "dc002": ["--d-c", "0.02"], "consexec": ["--consistency-routes", "executed"],
             "perturb": ["--view-augment", "perturb"], "perturbnocons": ["--view-augment", "perturb", "--lam", "0"]}

# routes that depend on the image: routers that start undecided (p = 0.5), gates drawn from Bernoulli(r) in
# training (straight-through) and ConvNet-AIG's per-block rate loss at weight w; in every cell, both starts
# (with the loop's kp 1 and the routers' lr decayed, the defaults for every start when these rows ran;
# undecided routers now get kp 4 and a constant router lr)
UNDECIDED = ["--router-start", "undecided", "--mu-kp", "1", "--router-lr", "decay"]
# the in-place recipe (normktfpip) that the landing experiments vary
INPLACE = [*UNDECIDED, "--router-norm", "--no-route-transitions", "--full-pass", "1", "--distill", "1", "--distill-from", "full"]
LONG = ["--epochs", "18", "--finetune-epochs", "4"]   # 2.75 times the schedule
DROP_PATH = 0.5   # the warmdp backbone's stochastic depth: block l of L skipped with probability 0.5 l / L (Huang et al.)
ROUTE_RECIPES = {"default": [],
                 "stoch": [*UNDECIDED, "--train-routing", "stochastic"],
                 "stochrate1": [*UNDECIDED, "--train-routing", "stochastic", "--rate-weight", "1", "--rate-routes", "soft"],
                 "stochrate5": [*UNDECIDED, "--train-routing", "stochastic", "--rate-weight", "5", "--rate-routes", "soft"],
                 "straightrate1": [*UNDECIDED, "--rate-weight", "1", "--rate-routes", "soft"],
                 "straightrate1x": [*UNDECIDED, "--rate-weight", "1"],
                 "straightrate5x": [*UNDECIDED, "--rate-weight", "5"],
                 "straightrate1xfp": [*UNDECIDED, "--rate-weight", "1", "--full-pass", "1"],
                 "band15": ["--rate-weight", "5", "--rate-band", "0.15"],
                 "band15und": [*UNDECIDED, "--rate-weight", "5", "--rate-band", "0.15"],
                 "norm": [*UNDECIDED, "--router-norm"],
                 "normrate1": [*UNDECIDED, "--router-norm", "--rate-weight", "1"],
                 "normauto": ["--router-norm"],
                 # the search trial's split of a schedule from a backbone: a short main phase, a long finetune
                 "defaultft6": ["--epochs", "2", "--finetune-epochs", "6"],
                 "normft6": [*UNDECIDED, "--router-norm", "--epochs", "2", "--finetune-epochs", "6"],
                 # nearly three times the schedule: does the dynamic network's gap close with training?
                 "defaultlong": LONG,
                 "normlong": [*UNDECIDED, "--router-norm", *LONG],
                 # the stage transitions run on every image (ConvNet-AIG does not gate its downsampling layers)
                 "normkt": [*UNDECIDED, "--router-norm", "--no-route-transitions"],
                 # without Eq. 6: decided routers feel the diversity loss, which pushes routes apart whatever they cost
                 "normktnodiv": [*UNDECIDED, "--router-norm", "--no-route-transitions", "--alpha", "0"],
                 # fewer routes that share more: the budget's static route, with 1 or 2 pairs of blocks undecided
                 "normp1": ["--router-norm", "--undecided-pairs", "1"],
                 "normp2": ["--router-norm", "--undecided-pairs", "2"],
                 # a control: the norm recipe's routers never trained (lr 0): routes that depend on the image,
                 # chosen by a random function of the features
                 "normfrozen": [*UNDECIDED, "--router-norm", "--router-lr", "frozen"],
                 # every block also trained on every image (the whole network on the first view): the split's cost?
                 "normfp": [*UNDECIDED, "--router-norm", "--full-pass", "1"],
                 "normktfp": [*UNDECIDED, "--router-norm", "--no-route-transitions", "--full-pass", "1"],
                 # distillation from the backbone (from a backbone only; against statics distilled alike)
                 "defaultkd": ["--distill", "1"],
                 "normktfpkd": [*UNDECIDED, "--router-norm", "--no-route-transitions", "--full-pass", "1",
                                "--distill", "1"],
                 # in-place distillation (slimmable networks): the full pass teaches the routed one
                 "normktfpip": [*INPLACE],
                 "normfpip": [*UNDECIDED, "--router-norm", "--full-pass", "1", "--distill", "1", "--distill-from", "full"],
                 # the budget loop at a quarter of its warm gain: undecided routers answer mu fast, and
                 # at ki 16 the loop cycles about once an epoch (BENCHMARKS.md, "Why the dynamic recipe misses its landing: a router on the threshold, and a loop that cycles")
                 "normktfpipki4": [*INPLACE, "--mu-ki", "4"],
                 # the routers keep their peak lr through the blocks' milestones: the loop keeps its hold
                 # on the routes while the features settle
                 "normktfpiprc": [*INPLACE, "--router-lr", "constant"],
                 # without Eq. 10 (gamma 0): its pull of a router's two views together, with no margin,
                 # shrinks a batch-normalised router's spread to 0 (BENCHMARKS.md, "Why the dynamic recipe misses its landing: a router on the threshold, and a loop that cycles")
                 "normktfpipg0": [*INPLACE, "--gamma", "0"],
                 # normktfpip's records ran with the router norm's spread trained; normktfpipfs, the same
                 # flags, with it fixed (a buffer; drn/router.py Router)
                 "normktfpipfs": [*INPLACE],
                 # and with the routers at their peak lr to the finetune: the loop keeps its hold after the
                 # blocks' milestones
                 "normktfpipfsrc": [*INPLACE, "--router-lr", "constant"],
                 # and with the loop's integral held while the routes are on course (conditional integration)
                 "normktfpipfshold": [*INPLACE, "--mu-integral", "hold"],
                 # and with the loop's proportional gain at 4: the routers integrate mu (their logits sum its
                 # gradient), so a loop of integral action alone on them cycles; kp damps it
                 # (BENCHMARKS.md, "A damped loop for routes that depend on the image")
                 "normktfpipfskp4": [*INPLACE, "--mu-kp", "4"],
                 # and with the routers at their peak lr to the finetune: the damped loop keeps its hold on
                 # the routes after the blocks' milestones
                 "normktfpipfskp4rc": [*INPLACE, "--mu-kp", "4", "--router-lr", "constant"],
                 # the same in a search trial's split of the schedule (defaultft6: 2 main epochs, 6 finetune)
                 "normktfpipfskp4rcft6": [*INPLACE, "--mu-kp", "4", "--router-lr", "constant", "--epochs", "2",
                                          "--finetune-epochs", "6"],
                 # the budget loop carried into the finetune on the routers' biases (--finetune-rates budget):
                 # the default and the dynamic recipe, at 6 + 2 and in a search trial's splits (2 + 6 from a
                 # 30-epoch backbone, 1 + 7 from a 10-epoch one) (BENCHMARKS.md, "The finetune steers to the budget")
                 "defaultbud": ["--finetune-rates", "budget"],
                 "defaultft6bud": ["--finetune-rates", "budget", "--epochs", "2", "--finetune-epochs", "6"],
                 "defaultft7": ["--epochs", "1", "--finetune-epochs", "7"],
                 "defaultft7bud": ["--finetune-rates", "budget", "--epochs", "1", "--finetune-epochs", "7"],
                 # and with a decided router enlisted when the held ones cannot close the gap (RateHold.steer)
                 "defaultft7e": ["--finetune-rates", "budget", "--epochs", "1", "--finetune-epochs", "7"],
                 "defaulte": ["--finetune-rates", "budget"],
                 "normktfpipfskp4rcbud": [*INPLACE, "--mu-kp", "4", "--router-lr", "constant", "--finetune-rates",
                                          "budget"],
                 "normktfpipfskp4rcft6bud": [*INPLACE, "--mu-kp", "4", "--router-lr", "constant", "--epochs", "2",
                                             "--finetune-epochs", "6", "--finetune-rates", "budget"],
                 # the paper's consistency experiment (Table 3) on a dynamic recipe: Eq. 5 off
                 "normktfpipnocons": [*INPLACE, "--lam", "0"]}
# one-at-a-time sweeps of what a search trial could sample, in a search trial's split from a backbone (the
# defaultft6bud recipe: 2 main + 6 finetune epochs from the 18 + 4 network): the space's four (each at its
# range's ends, spaces/default.yaml) and the recipe's candidates (beta of Eq. 3, the per-block rate loss,
# the lr) (BENCHMARKS.md, "What moves a trial's model")
SWEEP_BASE = ["--epochs", "2", "--finetune-epochs", "6", "--finetune-rates", "budget"]
SWEEP = {"dc005": ["--d-c", "0.05"], "dc05": ["--d-c", "0.5"], "dd02": ["--d-d", "0.2"], "dd10": ["--d-d", "1.0"],
         "lam005": ["--lam", "0.05"], "lam08": ["--lam", "0.8"], "al005": ["--alpha", "0.05"],
         "al08": ["--alpha", "0.8"], "beta2": ["--beta", "2.5"], "beta10": ["--beta", "10"],
         "rate1": ["--rate-weight", "1"], "lr005": ["--lr", "0.05"], "lr02": ["--lr", "0.2"]}
# the recipes that name no finetune ran with the rates held (the default until the finetune steered to the
# budget, 2026-12-07): pinned as they ran
ROUTE_RECIPES = {k: v if "--finetune-rates" in v else [*v, "--finetune-rates", "hold"] for k, v in ROUTE_RECIPES.items()}


@functools.lru_cache(maxsize=None)
def brackets(arch: str, t: float) -> dict[str, int]:
    """For each deterministic static method whose route closest to t % misses it by more than 5 %:
    the k of the route on the other side of the budget (the interpolation's second point)."""
    sys.path.insert(0, str(ROOT))
    from drn.baselines import k_for_budget, static_route
    from drn.cost import measure_cost_table
    from drn.models import ARCHS, build_model
    table, stages = measure_cost_table(build_model(arch)), ARCHS[arch].stages
    fixed = table.fixed - table.router
    budget = t / 100 * (fixed + sum(table.block))
    cost = lambda m, k: fixed + sum(c for c, on in zip(table.block, static_route(m, stages, k).tolist()) if on)
    out = {}
    for m in BRACKETED:
        k = k_for_budget(m, stages, list(table.block), fixed, budget)
        if abs(cost(m, k) / budget - 1) > 0.05:
            other = k + 1 if cost(m, k) < budget else k - 1
            if 1 <= other <= sum(stages):
                out[m] = other
    return out


def plan(archs: list[str]) -> dict[str, list[str]]:
    runs = {}
    for seed in SEEDS:
        for arch in archs:
            s = ["--seed", str(seed)]
            full = f"{arch}-full-s{seed}"
            runs[full] = ["--arch", arch, "--routing", "full", *s]
            for start in ("scratch", "warm"):
                init = ["--init", str(RUNS_DIR / full / "checkpoint.pt"), *WARM_KI] if start == "warm" else []
                for t in TARGETS[arch]:
                    for method in METHODS if arch == "resnet20" else ("drn", *PAPER):
                        routing = FREE if method == "drn" else ["--routing", method, *ZERO[arch]]
                        runs[f"{arch}-{start}-{method}-{t}-s{seed}"] = [
                            "--arch", arch, *routing, "--target-flops", f"{t}%", *init, *s]
                    if start == "scratch" and t in HOLD[arch]:
                        runs[f"{arch}-{start}-drn-{t}-hold-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", "--finetune-rates", "hold",
                            "--mu-integral", "always", *s]
                    if t in HOLD[arch]:   # and the loop's reset at the crossing, from both starts
                        runs[f"{arch}-{start}-drn-{t}-reset-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", "--finetune-rates", "hold",
                            "--mu-integral", "reset", *init, *s]
                    for method, k in brackets(arch, t).items():
                        runs[f"{arch}-{start}-{method}-{t}-k{k}-s{seed}"] = [
                            "--arch", arch, "--routing", method, *ZERO[arch], "--k", str(k), *init, *s]
                    for method in TWO_VIEWS if arch == "resnet20" else TWO_VIEWS[:2]:   # the equal-images control
                        v2 = ["--views", "2", *ZERO[arch], *init, *s]
                        runs[f"{arch}-{start}-{method}2v-{t}-s{seed}"] = [
                            "--arch", arch, "--routing", method, "--target-flops", f"{t}%", *v2]
                        if method in brackets(arch, t):
                            k = brackets(arch, t)[method]
                            runs[f"{arch}-{start}-{method}2v-{t}-k{k}-s{seed}"] = [
                                "--arch", arch, "--routing", method, "--k", str(k), *v2]
            for start in ("scratch", "warm"):   # the route recipes
                init = ["--init", str(RUNS_DIR / full / "checkpoint.pt")] if start == "warm" else []
                for t in TARGETS[arch]:
                    for name, flags in ROUTE_RECIPES.items():
                        if start == "scratch" and "--distill" in flags and "full" not in flags:
                            continue
                        runs[f"{arch}-{start}-drn-{t}-{name}-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", *flags, *init, *s]
            # a backbone trained with stochastic depth (BlockDrop's start: blocks that can be skipped), and the
            # DRN recipes and the statics from it
            fulldp = f"{arch}-fulldp-s{seed}"
            runs[fulldp] = ["--arch", arch, "--routing", "full", "--drop-path", str(DROP_PATH), *s]
            init = ["--init", str(RUNS_DIR / fulldp / "checkpoint.pt")]
            for t in TARGETS[arch]:
                for name in ("default", "norm", "normrate1"):
                    runs[f"{arch}-warmdp-drn-{t}-{name}-s{seed}"] = [
                        "--arch", arch, "--target-flops", f"{t}%", *ROUTE_RECIPES[name], *init, *s]
                for method in TWO_VIEWS:
                    runs[f"{arch}-warmdp-{method}2v-{t}-s{seed}"] = [
                        "--arch", arch, "--routing", method, "--target-flops", f"{t}%", "--views", "2", *init, *s]
            if arch == "resnet56":   # the plain network and the statics on the DRN's recipe
                runs[f"{arch}-full-drnrecipe-s{seed}"] = ["--arch", arch, "--routing", "full", *RECIPE, *s]
                for start in ("scratch", "warm"):
                    init = ["--init", str(RUNS_DIR / full / "checkpoint.pt"), *WARM_KI] if start == "warm" else []
                    for method in PAPER if start == "scratch" else PAPER[1:]:
                        runs[f"{arch}-{start}-{method}-50-drnrecipe-s{seed}"] = [
                            "--arch", arch, "--routing", method, "--target-flops", "50%", *RECIPE, *init, *s]
                for method in TWO_VIEWS[:2]:   # and the equal-images control from scratch
                    runs[f"{arch}-scratch-{method}2v-50-drnrecipe-s{seed}"] = [
                        "--arch", arch, "--routing", method, "--target-flops", "50%", "--views", "2", *RECIPE, *s]
            if arch == "resnet20":
                for start in ("scratch", "warm"):   # the DRN with the other training routing, every cell
                    init = ["--init", str(RUNS_DIR / full / "checkpoint.pt"), *WARM_KI] if start == "warm" else []
                    for t in TARGETS[arch]:
                        runs[f"{arch}-{start}-drn-{t}-{ALT}-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", "--train-routing", ALT, *FREE, *init, *s]
                # does compute buy accuracy at this schedule, and at 2.75 times it? (a DRN can only gain by moving
                # FLOPs between images where FLOPs buy accuracy): the whole network and DistributedK's statics
                for sched, ep in (("", []), ("-long", LONG)):
                    runs[f"{arch}-full2v{sched}-s{seed}"] = ["--arch", arch, "--routing", "full", "--views", "2", *ep, *s]
                for t in TARGETS[arch]:
                    runs[f"{arch}-scratch-distributedk2v-{t}-long-s{seed}"] = [
                        "--arch", arch, "--routing", "distributedk", "--target-flops", f"{t}%", "--views", "2", *LONG, *s]
                # from the longer-trained whole network (BlockDrop's start: a trained network whose blocks pay):
                # do the statics keep a slope over the budgets, and does the DRN then beat them?
                init = ["--init", str(RUNS_DIR / f"{arch}-full2v-long-s{seed}" / "checkpoint.pt")]
                for t in TARGETS[arch]:
                    for method in TWO_VIEWS:
                        runs[f"{arch}-warmlong-{method}2v-{t}-s{seed}"] = [
                            "--arch", arch, "--routing", method, "--target-flops", f"{t}%", "--views", "2", *init, *s]
                        runs[f"{arch}-warmlong-{method}2v-{t}-kd-s{seed}"] = [
                            "--arch", arch, "--routing", method, "--target-flops", f"{t}%", "--views", "2",
                            "--distill", "1", *init, *s]
                    for name in ("default", "norm", "normp1", "normktfp", "defaultkd", "normktfpkd", "normktfpip",
                                 "normktfpipnocons", "normktfpipki4", "normktfpiprc", "normktfpipg0", "normktfpipfs", "normktfpipfsrc", "normktfpipfshold",
                                 "normktfpipfskp4", "normktfpipfskp4rc", "normktfpipfskp4rcft6", "defaultft6",
                                 "defaultbud", "defaultft6bud", "defaultft7", "defaultft7bud", "defaultft7e", "normktfpipfskp4rcbud",
                                 "normktfpipfskp4rcft6bud"):
                        runs[f"{arch}-warmlong-drn-{t}-{name}-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", *ROUTE_RECIPES[name], *init, *s]
                    for name, flags in SWEEP.items():
                        runs[f"{arch}-warmlong-drn-{t}-sw{name}-s{seed}"] = [
                            "--arch", arch, "--target-flops", f"{t}%", *SWEEP_BASE, *flags, *init, *s]
                for name, flags in ABLATIONS.items():
                    runs[f"{arch}-scratch-drn-50-{name}-s{seed}"] = ["--arch", arch, "--target-flops", "50%", *flags,
                                                                     *FREE, *s]
    return runs


# the warm rows ran with the budget loop's ki 8 and start mu 0.05, the defaults for every start before 2026-12-03
# (now 16 and 1 from --init)
WARM_KI = ["--mu-ki", "8", "--mu", "0.05"]


def _claim(name: str) -> bool:
    """Take the run for this process: a lock file with our pid; a dead owner's lock is taken over."""
    lock = RUNS_DIR / f"{name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False                      # alive: someone else's
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)      # its owner died: take it over
            except PermissionError:
                return False
    return False


def _depends(flags: list[str]) -> Path | None:
    return Path(flags[flags.index("--init") + 1]) if "--init" in flags else None


def _weights_id(checkpoint: Path) -> str:
    """A fingerprint of a checkpoint's weights (not of the file: its history holds wall times)."""
    import torch
    h = hashlib.sha256()
    for k, v in sorted(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"].items()):
        if k.endswith(".router.capacity"):   # routing="capacity"'s shares, not weights (checkpoints before it lack them)
            continue
        h.update(k.encode())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def _stale(name: str, flags: list[str]) -> bool:
    """A warm run's record whose start is not the plain network its seed has now: the plain network
    was trained again (runs/ is scratch space) by code that no longer gives the same weights. Judged
    only while the plain network's record is there; a warm record from before fingerprints is kept."""
    dep = _depends(flags)
    if dep is None or not (RESULTS / f"{dep.parent.name}.json").exists() or not (RESULTS / f"{name}.json").exists():
        return False
    init = json.loads((RESULTS / f"{name}.json").read_text()).get("init_id")
    full = RESULTS / f"{dep.parent.name}.json"
    rec = json.loads(full.read_text())
    if "weights_id" not in rec and dep.exists():   # a record from before fingerprints: of this checkpoint
        rec["weights_id"] = _weights_id(dep)
        full.with_suffix(".tmp").write_text(json.dumps(rec, indent=1))
        full.with_suffix(".tmp").replace(full)
    return None not in (init, rec.get("weights_id")) and init != rec["weights_id"]


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    todo = {k: v for k, v in plan(args.arch).items() if not args.only or any(o in k for o in args.only)}
    if args.dry_run:
        left = [k for k in todo if not (RESULTS / f"{k}.json").exists() or _stale(k, todo[k])]
        print(f"{len(todo)} runs planned, {len(todo) - len(left)} done, {len(left)} left:\n" + "\n".join(left))
        return 0
    every = plan(args.arch)
    while True:
        for k in [k for k in todo if _stale(k, todo[k])]:   # paired with another start: run it again
            (RESULTS / f"{k}.json").replace(RUNS_DIR / f"{k}.stale.json")
            shutil.rmtree(RUNS_DIR / k, ignore_errors=True)
            print(f"{k}: its plain network was trained again with other weights; running it again", flush=True)
        pending = [k for k in todo if not (RESULTS / f"{k}.json").exists()]
        if not pending:
            return 0
        # a plain network whose record is kept but whose checkpoint is gone (runs/ is scratch space)
        # is trained again for the warm runs still waiting on it; its old record moves aside. A plain
        # network without a record joins this runner's plan, whatever --only says (another runner
        # may hold it: then this one waits)
        for dep in {_depends(todo[k]) for k in pending} - {None}:
            full = dep.parent.name
            if not dep.exists() and (RESULTS / f"{full}.json").exists():
                (RESULTS / f"{full}.json").replace(RUNS_DIR / f"{full}.previous.json")
            if not (RESULTS / f"{full}.json").exists() and full not in pending:
                todo = {**todo, full: every[full]}
                pending.append(full)
        # a warm run waits for its plain network (its record is written once it is complete)
        ready = [k for k in pending if _depends(todo[k]) is None
                 or (RESULTS / f"{_depends(todo[k]).parent.name}.json").exists()]
        name = next((k for k in ready if _claim(k)), None)
        if name is None:
            if not ready and not any((RUNS_DIR / f"{k}.lock").exists() for k in pending):
                print("nothing can run: a warm start's plain network is missing from the plan", file=sys.stderr)
                return 1
            time.sleep(10)                         # the rest is taken or waits on a running warm start
            continue
        try:
            if _one(name, todo[name], args, len(todo) - len(pending) + 1, len(todo)) != 0:
                return 1
        finally:
            (RUNS_DIR / f"{name}.lock").unlink(missing_ok=True)


def _one(name: str, flags: list[str], args, i: int, n: int) -> int:
    out = RUNS_DIR / name
    common = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--epochs", str(EPOCHS),
              "--finetune-epochs", str(FINETUNE), "--batch-size", str(BATCH), "--device", "cpu", "--json"]
    t0 = time.time()
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    proc = run_cli("train_main", [*common, *flags, "--out", str(out), *resume])
    if proc.returncode != 0:
        print(f"{name}: drn-train failed: {proc.stderr[-800:]}", file=sys.stderr)
        return 1
    record = {"name": name, "flags": flags, "epochs": EPOCHS, "finetune_epochs": FINETUNE, "batch_size": BATCH,
              "train": json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.time() - t0}
    import torch
    hist = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
    keep = ("epoch", "phase", "accuracy", "flops", "train_cost_hard", "mu", "loss_cls", "loss_consistency",
            "loss_diversity", "loss_cost", "loss_reg", "loss_rate", "distinct_paths", "effective_paths",
            "dynamic_share", "block_exec_rate")
    record["history"] = [{k: h.get(k) for k in keep} for h in hist]
    record["weights_id"] = _weights_id(out / "checkpoint.pt")
    if _depends(flags) is not None:   # the start it is paired on (see _stale)
        record["init_id"] = _weights_id(_depends(flags))
    for routing in ("hard", "sample") if "--routing" not in flags else ("hard",):
        ev = run_cli("eval_main", [str(out / "checkpoint.pt"), "--routing", routing, "--split", "test", "--device",
                                "cpu", "--json"])
        if ev.returncode != 0:
            print(f"{name}: drn-eval failed: {ev.stderr[-800:]}", file=sys.stderr)
            return 1
        record[f"eval_{routing}"] = json.loads(ev.stdout.strip().splitlines()[-1])
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(RESULTS / f"{name}.json")
    e, m = record["eval_hard"], record["train"]
    at_half = f", val FLOPs at 0.5 {m['uncalibrated_flops'] / m['flops_full']:.1%}" if "uncalibrated_flops" in m else ""
    print(f"[{i}/{n}] {name}: test acc {e['accuracy']:.2%}, FLOPs {e['flops'] / e['flops_full']:.1%} of full{at_half}, "
          f"K {e['k']:.1f}, paths {e['distinct_paths']}, same-path {e['same_path_ratio']:.1%} | {record['seconds']:.0f}s",
          flush=True)
    return 0


# ----------------------------------------------------------------------------- report

def _load() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def _seeds(res: dict, stem: str, key: str = "accuracy", ev: str = "eval_hard") -> dict[int, float]:
    return {s: res[f"{stem}-s{s}"][ev][key] for s in SEEDS if f"{stem}-s{s}" in res}


def _pm(vals) -> str:
    vals = list(vals)
    if not vals:
        return "–"
    m = statistics.mean(vals)
    return f"{100 * m:.1f}" + (f" ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def _at_flops(res: dict, stem: str, method: str, t: float, drn_share: dict[int, float]) -> tuple[dict, dict, bool]:
    """A static method's test accuracy and FLOPs share per seed at the DRN's FLOPs: interpolated
    linearly between its route at the budget and its bracket route (the k on the budget's other
    side) when both ran and the DRN's share lies between them; else the route at the budget."""
    acc, share, interp = {}, {}, False
    for s in SEEDS:
        main = res.get(f"{stem.format(method)}-s{s}")
        if main is None:
            continue
        e = main["eval_hard"]
        acc[s], share[s] = e["accuracy"], e["flops"] / e["flops_full"]
        other = [v for k, v in res.items() if k.startswith(f"{stem.format(method)}-k") and k.endswith(f"-s{s}")]
        if other and s in drn_share:
            o = other[0]["eval_hard"]
            (f0, a0), (f1, a1) = sorted([(share[s], acc[s]), (o["flops"] / o["flops_full"], o["accuracy"])])
            if f0 <= drn_share[s] <= f1:
                w = (drn_share[s] - f0) / (f1 - f0)
                acc[s], share[s], interp = a0 + w * (a1 - a0), drn_share[s], True
    return acc, share, interp


def _gap(diffs: list[float]) -> str:
    """Paired DRN − static differences as "mean [min, max]" in points, or "–" when there are none."""
    if not diffs:
        return "–"
    return f"{100 * statistics.mean(diffs):+.1f} [{100 * min(diffs):+.1f}, {100 * max(diffs):+.1f}]"


def _drn_share(res: dict, stem: str, seeds) -> dict[int, float]:
    """Each seed's DRN test FLOPs as a share of the full network."""
    ev = lambda s: res[f"{stem.format('drn')}-s{s}"]["eval_hard"]
    return {s: ev(s)["flops"] / ev(s)["flops_full"] for s in seeds}


def _best(per_method: dict[str, dict]) -> str | None:
    """The method whose per-seed values have the best mean, among those with any; None if none has."""
    have = [m for m, v in per_method.items() if v]
    return max(have, key=lambda m: statistics.mean(per_method[m].values())) if have else None


def _static_gaps(res: dict, stem: str, t: float, acc: dict[int, float], share: dict[int, float]) -> list[str]:
    """A DRN's per-seed test accuracy `acc` against the best of the paper's statics and the best 2-view
    static, each read at the DRN's FLOPs `share` and paired by seed: two "mean [min, max] (method)" cells."""
    cols = []
    for methods in (PAPER, tuple(f"{m}2v" for m in TWO_VIEWS)):
        st = {m: _at_flops(res, stem, m, t, share)[0] for m in methods}
        best = _best(st)
        g = [acc[s] - st[best][s] for s in acc if best and s in st[best]]
        cols.append(_gap(g) + (f" ({best})" if g else ""))
    return cols


def compute_report(args) -> int:
    """Does compute buy accuracy? Per schedule, ResNet-20 from scratch: test accuracy of the whole
    network and of the 2-view static routes at 30 / 50 / 70 % (mean ± sd over the seeds that ran).
    A DRN moves FLOPs between images; where more FLOPs buy no accuracy, no such move can gain."""
    res = _load()
    arch = "resnet20"
    print("| schedule | " + " | ".join(f"{m} at {t} %" for t in TARGETS[arch] for m in ("best 2-view static",))
          + " | whole network, 1 view | whole network, 2 views |")
    print("|---|" + "---|" * (len(TARGETS[arch]) + 2))
    for sched, sfx in ((f"{EPOCHS} + {FINETUNE}", ""), ("18 + 4", "-long")):
        cells = []
        for t in TARGETS[arch]:
            per = {m: _seeds(res, f"{arch}-scratch-{m}2v-{t}{sfx}") for m in TWO_VIEWS}
            best = _best(per)
            n = len(per[best]) if best else 0
            cells.append(f"{_pm(per[best].values())} ({best}, {n} seed{'s' * (n > 1)})" if best else "–")
        full = _seeds(res, f"{arch}-full{sfx}") if not sfx else {}
        full2 = _seeds(res, f"{arch}-full2v{sfx}")
        cells += [_pm(full.values()), f"{_pm(full2.values())} ({len(full2)} seed{'s' * (len(full2) > 1)})" if full2 else "–"]
        print(f"| {sched} | " + " | ".join(cells) + " |")
    return 0


def routes_report(args) -> int:
    """The route recipes (ROUTE_RECIPES) per cell, as a markdown table on stdout: val accuracy (what
    chooses), test accuracy and its paired gap to the best static route at the recipe's own FLOPs (the
    paper's statics and the 2-view ones), the landing at threshold 0.5 and the trimmed threshold (val),
    and how much the routes depend on the image on test (effective paths, dynamic share, same-path)."""
    res = _load()
    print("| arch | start | budget | recipe | seeds | val acc | test acc | − best paper static | − best 2-view static "
          "| val error at 0.5 | threshold | effective paths | dynamic share | same-path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in TARGETS:
        for start in ("scratch", "warm", "warmlong"):
            for t in TARGETS[arch]:
                for name in ROUTE_RECIPES:   # a long (distilled) recipe against the long (distilled) statics
                    stem = f"{arch}-{start}-{{}}-{t}" + ("-long" if name.endswith("long") else "") + (
                        "-kd" if name.endswith("kd") else "")
                    rec = {s: res[f"{arch}-{start}-drn-{t}-{name}-s{s}"] for s in SEEDS
                           if f"{arch}-{start}-drn-{t}-{name}-s{s}" in res}
                    if not rec:
                        continue
                    ev = {s: r["eval_hard"] for s, r in rec.items()}
                    acc = {s: e["accuracy"] for s, e in ev.items()}
                    share = {s: e["flops"] / e["flops_full"] for s, e in ev.items()}
                    cols = _static_gaps(res, stem, t, acc, share)
                    err = [r["train"]["uncalibrated_flops"] / r["train"]["target"] - 1 for r in rec.values()]
                    mean = lambda xs: statistics.mean(xs) if xs else float("nan")
                    print(f"| {arch} | {start} | {t} % | {name} | {len(rec)} | "
                          f"{_pm(r['train']['val_accuracy'] for r in rec.values())} | {_pm(acc.values())} | "
                          f"{cols[0]} | {cols[1]} | {', '.join(f'{100 * e:+.1f} %' for e in err)} | "
                          f"{', '.join(format(r['train']['threshold'], '.2f') for r in rec.values())} | "
                          f"{mean([e.get('effective_paths', 1.0) for e in ev.values()]):.1f} | "
                          f"{100 * mean([e.get('dynamic_share', 0.0) for e in ev.values()]):.0f} % | "
                          f"{100 * mean([e['same_path_ratio'] for e in ev.values()]):.0f} % |")
    return 0


def sweep_report(args) -> int:
    """The one-at-a-time sweeps (SWEEP) against their base (defaultft6bud), paired by seed, per budget:
    val accuracy (what a search reads), its paired change, and whether that change is beyond the base's
    seed spread (its val sd over seeds) with one sign in every seed; test, landing and routes beside it."""
    res = _load()
    print("| budget | variant | flags | seeds | val acc | val − base, mean [min, max] | moves val? | test − base "
          "| val FLOPs error at 0.5 | effective paths |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in TARGETS["resnet20"]:
        stem = f"resnet20-warmlong-drn-{t}-{{}}-s{{}}"
        base = {s: res[stem.format("defaultft6bud", s)]["train"] for s in SEEDS if stem.format("defaultft6bud", s) in res}
        if not base:
            continue
        spread = statistics.stdev(b["val_accuracy"] for b in base.values()) if len(base) > 1 else float("nan")
        land = lambda rs: ", ".join(f"{100 * (r['uncalibrated_flops'] / r['target'] - 1):+.1f} %" for r in rs)
        paths = statistics.mean(res[stem.format("defaultft6bud", s)]["eval_hard"].get("effective_paths", 1) for s in base)
        print(f"| {t} % | base (defaultft6bud) | – | {len(base)} | {_pm(b['val_accuracy'] for b in base.values())} "
              f"| seed sd {100 * spread:.1f} | – | – | {land(base.values())} | {paths:.1f} |")
        for name, flags in SWEEP.items():
            rec = {s: res[stem.format(f"sw{name}", s)] for s in SEEDS if stem.format(f"sw{name}", s) in res}
            if not rec:
                continue
            dv = [rec[s]["train"]["val_accuracy"] - base[s]["val_accuracy"] for s in rec if s in base]
            dt = [rec[s]["eval_hard"]["accuracy"] - res[stem.format("defaultft6bud", s)]["eval_hard"]["accuracy"]
                  for s in rec if s in base]
            moves = (len(dv) == len(SEEDS) and abs(statistics.mean(dv)) > spread
                     and (all(d > 0 for d in dv) or all(d < 0 for d in dv)))
            print(f"| {t} % | {name} | `{' '.join(flags)}` | {len(rec)} | {_pm(r['train']['val_accuracy'] for r in rec.values())} "
                  f"| {_gap(dv)} | {'yes' if moves else 'no'} | {_gap(dt)} | {land(r['train'] for r in rec.values())} | "
                  f"{statistics.mean(r['eval_hard'].get('effective_paths', 1) for r in rec.values()):.1f} |")
    return 0


def _variant_table(res: dict, suffix: str, label: str) -> list[str]:
    """The DRN run another way (`{arch}-{start}-drn-{t}-{suffix}` records) against the main DRN rows and
    the statics read at the variant's own FLOPs, paired by seed, with its landing at 0.5."""
    lines = [f"| arch | start | budget | DRN | {label} | FLOPs, {label} | {label} − DRN | {label} − the best of the "
             f"paper's statics | {label} − the best 2-view static | {label} lands | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in TARGETS:
        for start in ("scratch", "warm"):
            for t in TARGETS[arch]:
                stem = f"{arch}-{start}-{{}}-{t}"
                alt = _seeds(res, f"{arch}-{start}-drn-{t}-{suffix}")
                if not alt:
                    continue
                drn = _seeds(res, stem.format("drn"))
                ev = lambda s: res[f"{arch}-{start}-drn-{t}-{suffix}-s{s}"]
                share = {s: ev(s)["eval_hard"]["flops"] / ev(s)["eval_hard"]["flops_full"] for s in alt}
                cols = _static_gaps(res, stem, t, alt, share)
                lands = [abs(ev(s)["train"]["uncalibrated_flops"] / ev(s)["train"]["target"] - 1) <= 0.05 for s in alt]
                lines.append(f"| {arch} | {start} | {t} % | {_pm(drn.values())} | {_pm(alt.values())} | "
                             f"{_pm(share.values())} | {_gap([alt[s] - drn[s] for s in alt if s in drn])} | {cols[0]} | "
                             f"{cols[1]} | {sum(lands)} / {len(lands)} | {len(alt)} |")
    return lines


def report(args) -> int:
    res = _load()
    if not res:
        print("no results yet: run `python bench/fidelity.py run` first", file=sys.stderr)
        return 1
    lines = [f"Test accuracy in % on cifar10-5k's held-out 1017 images (mean ± standard deviation over seeds; the "
             f"runs column counts them); {EPOCHS} + {FINETUNE} epochs at batch {BATCH} for every run. FLOPs are on "
             f"the test images, in % of the full network. Gap to the best method = DRN − the static method with "
             f"the best mean (named in the FLOPs column), paired seed by seed (the warm runs of a seed share "
             f"their start); [min, max] over the seeds. Gap to each seed's best static = "
             f"DRN − the best of the three statics of that seed: a stricter bar, since the maximum of three "
             f"noisy runs sits above each of them. Both gaps are to the paper's three baselines (FirstK, RandomK, "
             f"DistributedK); gap to DeepK = DRN − DeepK, paired by seed: DeepK's route is the one the DRN's "
             f"routers start on (`--router-start deepk`), so this gap is what routing adds to its start. Every static method is read at the DRN's FLOPs: RandomK "
             f"draws its route within 5 % of the budget; a deterministic route that misses it by more is "
             f"interpolated, seed by seed, between its k on either side of the DRN's FLOPs (marked (i)).", ""]
    lines += ["**Tables 2 and 4a: the DRN against static routes at equal FLOPs**", "",
              "| arch | start | budget | DRN | FLOPs | FirstK | RandomK | DistributedK | DeepK | static FLOPs (best of the paper's) | gap to the best method, mean [min, max] | gap to each seed's best static | gap to DeepK | runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in TARGETS:
        full = _seeds(res, f"{arch}-full")
        for start in ("scratch", "warm"):
            for t in TARGETS[arch]:
                stem = f"{arch}-{start}-{{}}-{t}"
                drn = _seeds(res, stem.format("drn"))
                if not drn:
                    continue
                drn_share = _drn_share(res, stem, drn)
                at = {m: _at_flops(res, stem, m, t, drn_share) for m in STATIC}
                static = {m: at[m][0] for m in STATIC}
                ff = {"drn": list(drn_share.values()), **{m: list(at[m][1].values()) for m in STATIC}}
                best = {s: max(static[m][s] for m in PAPER) for s in drn if all(s in static[m] for m in PAPER)}
                best_m = max(PAPER, key=lambda m: statistics.mean(static[m].values()) if static[m] else -1)
                gap = _gap([drn[s] - best[s] for s in best])
                # against the best static method by its mean, paired by seed (same init, same data order)
                gap_m = _gap([drn[s] - static[best_m][s] for s in drn if s in static[best_m]])
                gap_d = _gap([drn[s] - static["deepk"][s] for s in drn if s in static["deepk"]])
                lines.append(f"| {arch} | {start} | {t} % | {_pm(drn.values())} | {_pm(ff['drn'])} | "
                             + " | ".join(_pm(static[m].values()) + (" (i)" if at[m][2] else "") for m in STATIC)
                             + f" | {_pm(ff[best_m])} ({best_m}) | {gap_m} | {gap} | {gap_d} | {len(drn)} |")
        if full:
            lines.append(f"| {arch} | plain network | 100 % | {_pm(full.values())} | 100 | | | | | | | | | {len(full)} |")
    lines += ["", "**The same at equal images per step**: the statics trained on two augmented views per image and step "
              "(`--views 2`), as the DRN's main epochs are (Eq. 5 needs two); the paper trains its baselines on one. "
              "Gap = DRN − the better of RandomK and DistributedK by mean, paired by seed; then DRN − DeepK.", "",
              "| arch | start | budget | DRN | RandomK, 2 views | DistributedK, 2 views | DeepK, 2 views | gap to the best, mean [min, max] | gap to DeepK | runs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arch in TARGETS:
        for start in ("scratch", "warm"):
            for t in TARGETS[arch]:
                stem = f"{arch}-{start}-{{}}-{t}"
                drn = _seeds(res, stem.format("drn"))
                two = {m: _at_flops(res, stem, f"{m}2v", t, _drn_share(res, stem, drn)) for m in TWO_VIEWS}
                if not drn or not any(two[m][0] for m in TWO_VIEWS):
                    continue
                gaps = []
                for ms in (("randomk", "distributedk"), ("deepk",)):
                    best = _best({m: two[m][0] for m in ms})
                    g = [drn[s] - two[best][0][s] for s in drn if best and s in two[best][0]]
                    gaps.append(_gap(g) + (f" ({best})" if g and len(ms) > 1 else ""))
                lines.append(f"| {arch} | {start} | {t} % | {_pm(drn.values())} | "
                             + " | ".join(_pm(two[m][0].values()) + (" (i)" if two[m][2] else "") for m in TWO_VIEWS)
                             + f" | {gaps[0]} | {gaps[1]} | {len(drn)} |")
    lines += ["", f"**Training routing**: the DRN as trained by default (`drn`, straight-through: each image runs its "
              f"0/1 route, Eq. 3's gradient backward) against `--train-routing {ALT}` (Eq. 4, the paper's: every block "
              f"runs on every image, weighted by r; `drn-…-{ALT}` records), the same seeds and starts. Gaps paired by "
              f"seed; the statics read at the {ALT} DRN's own FLOPs; landing = val FLOPs at 0.5 within 5 % of the target.", "",
              *_variant_table(res, ALT, ALT)]
    lines += ["", "**Today's defaults**: the DRN rows above ran with frozen routers in the finetune and a budget loop "
              "that never resets its integral (pinned: `--finetune-rates free --mu-integral always`); `reset` runs "
              "today's defaults (`--finetune-rates hold --mu-integral reset`: the finetune holds each undecided "
              "router's rate, the loop's integral returns to 0 when the routes cross over the target while μ < 0), "
              "the same seeds and starts, read the same way.", "", *_variant_table(res, "reset", "reset")]
    recipe = {m: {st: _seeds(res, f"resnet56-{st}-{m}-50-drnrecipe") for st in ("scratch", "warm")} for m in PAPER}
    if any(v for d in recipe.values() for v in d.values()):
        lines += ["", "**ResNet-56: the statics on the DRN's recipe.** The main rows' statics start zero-init without "
                  "warm-up (pinned: the default before 2026-12-02), the DRN with the usual BN init and 2 "
                  "warm-up epochs. `drnrecipe` runs the statics (and the plain network) on the DRN's, today's "
                  "default for the statics: "
                  f"`{' '.join(RECIPE)}`. Gap = DRN − the best of the three by mean, paired by seed.", "",
                  "| arch | start | budget | DRN | FirstK | RandomK | DistributedK | gap to the best, mean [min, max] | "
                  "the same statics by default (best) | plain network, default → DRN's recipe | "
                  "RandomK, DistributedK on 2 views | gap to the best 2-view static | runs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for st in ("scratch", "warm"):
            drn = _seeds(res, f"resnet56-{st}-drn-50")
            best = _best({m: recipe[m][st] for m in PAPER})
            if not drn or best is None:
                continue
            dflt = {m: _seeds(res, f"resnet56-{st}-{m}-50") for m in PAPER}
            best_d = _best(dflt)
            plain = (f"{_pm(_seeds(res, 'resnet56-full').values())} → {_pm(_seeds(res, 'resnet56-full-drnrecipe').values())}"
                     if st == "scratch" else "")
            two = {m: _seeds(res, f"resnet56-{st}-{m}2v-50-drnrecipe") for m in TWO_VIEWS[:2]}
            have2 = [m for m in two if two[m]]
            best2 = _best(two)
            gap2 = (f"{_gap([drn[s] - two[best2][s] for s in drn if s in two[best2]])} ({best2})" if best2 else "–")
            lines.append(f"| resnet56 | {st} | 50 % | {_pm(drn.values())} | "
                         + " | ".join(_pm(recipe[m][st].values()) if recipe[m][st] else "–" for m in PAPER)
                         + f" | {_gap([drn[s] - recipe[best][st][s] for s in drn if s in recipe[best][st]])} ({best}) | "
                         f"{_pm(dflt[best_d].values())} ({best_d}) | {plain} | "
                         f"{', '.join(_pm(two[m].values()) for m in have2) if have2 else '–'} | {gap2} | "
                         f"{len(recipe[best][st])} |")
    lines += ["", "**Landing (item 2)**: the DRN's val FLOPs at Eq. 11's threshold 0.5 after training, as an error "
              "against the target, per seed; then the threshold the trim chose (inside [0.4, 0.6])", "",
              "| arch | start | budget | finetune | error at 0.5, per seed | within 5 % | trimmed threshold, per seed "
              "| test acc |", "|---|---|---|---|---|---|---|---|"]
    for arch in TARGETS:
        for start in ("scratch", "warm"):
            for t in TARGETS[arch]:
                for suffix, finetune in (("", "frozen routers"), ("-hold", "rates held"),
                                         ("-reset", "rates held, μ reset at the crossing")):
                    stem = f"{arch}-{start}-drn-{t}{suffix}"
                    recs = [res[f"{stem}-s{s}"]["train"] for s in SEEDS if f"{stem}-s{s}" in res]
                    if not recs:
                        continue
                    errs = [m["uncalibrated_flops"] / m["target"] - 1 for m in recs]
                    lines.append(f"| {arch} | {start} | {t} % | {finetune} | {' '.join(f'{100 * e:+.1f} %' for e in errs)} | "
                                 f"{sum(abs(e) <= 0.05 for e in errs)} / {len(errs)} | "
                                 f"{' '.join(format(m['threshold'], '.3f') for m in recs)} | "
                                 f"{_pm(_seeds(res, stem).values())} |")
    lines += ["", "**Ber-Dis (Table 4b), the ablation and the consistency experiment** (ResNet-20, scratch, 50 %)", "",
              "| variant | test acc | test acc, perturbed images | same-path ratio under perturbation | distinct paths | "
              "Eq. 5 loss, last epoch | runs |", "|---|---|---|---|---|---|---|"]
    rows = [("DRN, full loss (Eq. 9)", "resnet20-scratch-drn-50", "eval_hard"),
            ("trained with soft routing (Eq. 4, the paper's)", "resnet20-scratch-drn-50-soft", "eval_hard"),
            ("DRN, Ber-Dis (routes sampled from r)", "resnet20-scratch-drn-50", "eval_sample"),
            ("without consistency (λ = 0)", "resnet20-scratch-drn-50-nocons", "eval_hard"),
            ("without diversity (α = 0)", "resnet20-scratch-drn-50-nodiv", "eval_hard"),
            ("consistency margin at the routes' scale (d_c = 0.02)", "resnet20-scratch-drn-50-dc002", "eval_hard"),
            ("Eq. 5 and 10 on the routes the views ran (`--consistency-routes executed`)",
             "resnet20-scratch-drn-50-consexec", "eval_hard"),
            ("views that differ (`--view-augment perturb`: views 2..M also a crop, h-flip, v-flip or rotation)",
             "resnet20-scratch-drn-50-perturb", "eval_hard"),
            ("the same views without consistency (λ = 0)", "resnet20-scratch-drn-50-perturbnocons", "eval_hard")]
    for label, stem, ev in rows:
        acc = _seeds(res, stem, "accuracy", ev)
        if not acc:
            continue
        same = _seeds(res, stem, "same_path_ratio", ev) if ev == "eval_hard" else {}
        pert = _seeds(res, stem, "accuracy_perturbed", ev) if ev == "eval_hard" else {}
        paths = _seeds(res, stem, "distinct_paths", ev)
        cons = [[h["loss_consistency"] for h in res[f"{stem}-s{s}"]["history"] if h["phase"] == "train"][-1]
                for s in acc]
        lines.append(f"| {label} | {_pm(acc.values())} | {_pm(pert.values())} | {_pm(same.values())} | "
                     f"{statistics.mean(paths.values()):.1f} | {statistics.mean(cons):.4f} | {len(acc)} |" if cons else
                     f"| {label} | {_pm(acc.values())} | {_pm(pert.values())} | {_pm(same.values())} | "
                     f"{statistics.mean(paths.values()):.1f} | – | {len(acc)} |")
    (ROOT / "bench" / "results" / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = runner_parser(__doc__, ("run", "report", "routes", "compute", "sweep"), list(TARGETS), list(TARGETS))
    ap.add_argument("--only", nargs="+", help="run only the runs whose name contains one of these")
    ap.add_argument("--dry-run", action="store_true", help="list what is left to run")
    return run_command(ap, {"run": run, "report": report, "routes": routes_report, "compute": compute_report,
                            "sweep": sweep_report})


if __name__ == "__main__":
    sys.exit(main())
