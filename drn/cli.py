"""drn-train and drn-eval. Bad input: one line on stderr, exit 2, nothing written."""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import TrainConfig, UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we print one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _fmt(name: str, v) -> str:
    if v is None:
        if name == "finetune_epochs":
            return "with a target, max(2, 10%% of --epochs); else 0"
        if name == "finetune_lr":
            return "--lr"
        if name == "mu_ki":
            return "2 with --router-start open, 16 with --init, else 8"
        if name == "mu_kp":
            return "4 with --router-start undecided, else 1"
        if name == "router_lr":
            return "constant with --router-start undecided, else decay"
        if name == "mu":
            return "0.05; with a target from --init, 20 x the loop's --mu-scale: 1 on resnet20"
        if name == "views":
            return "2 for drn, 1 for full and the static routes"
        if name == "router_open":
            return "0.99 for --init on the budget, else 0.9"
        if name == "controller_every":
            return "1 on CPU, 8 on CUDA"
        if name == "warmup_epochs":
            return "2 for resnet56 and deeper and resnet50 unless --zero-init-residual, else 0"
        return "0.2, or 0.4 on tinyimagenet (the paper's)" if name in ("lam", "alpha") else "none"
    return str(v)


# flag -> (TrainConfig field, type, help). Defaults come from TrainConfig, so help cannot drift.
TRAIN_FLAGS = {
    "--arch": ("arch", str, "resnet8/14/20/32/44/56/74/110 (CIFAR, basic blocks) or resnet50 (bottlenecks)"),
    "--dataset": ("dataset", str, "cifar10, cifar100, svhn, tinyimagenet or imagefolder (DIR/train, DIR/val)"),
    "--data-dir": ("data_dir", str, "where the dataset is (torchvision sets are downloaded there if missing)"),
    "--out": ("out", str, "output folder: checkpoint.pt is rewritten after every epoch"),
    "--val-fraction": ("val_fraction", float, "share of the training images held out as val, in (0, 0.5]: the "
                                              "controller, the threshold trim and every choice read val; the "
                                              "dataset's test split is only reported"),
    "--val-seed": ("val_seed", int, "seed of the val carve (stratified by class)"),
    "--init": ("init", str, "warm start from a trained plain network: a `drn-train --routing full` checkpoint of "
                            "the same arch, data and val split (or, for resnet50, a torchvision state_dict); "
                            "the routers start as --router-start says"),
    "--epochs": ("epochs", int, "epochs of the main (soft-routing) schedule"),
    "--finetune-epochs": ("finetune_epochs", int, "extra epochs with frozen routers and hard routing"),
    "--batch-size": ("batch_size", int, "samples per step (each gives --views augmented copies)"),
    "--views": ("views", int, "M of Eq. 5: augmented copies per sample in the main epochs; a static route or "
                              "full trains on every copy too (2 gives it the DRN's images per step)"),
    "--finetune-lr": ("finetune_lr", float, "the finetune epochs restart at this lr and decay to 0 along a "
                                            "half cosine"),
    "--finetune-rates": ("finetune_rates", str, "hold: while the finetune trains the blocks, each router's last-layer "
                                                "bias follows so that its execution rate on training images stays "
                                                "where the main schedule left it (the features it reads move); "
                                                "budget: the same, and after each epoch the held rates move to "
                                                "meet the target on the val images; "
                                                "free: the routers stay frozen as they are"),
    "--lr": ("lr", float, "initial learning rate (x lr-decay at 60%% and 80%% of --epochs)"),
    "--warmup-epochs": ("warmup_epochs", float, "epochs of linear lr warm-up from 0"),
    "--drop-path": ("drop_path", float, "stochastic depth for --routing full and the static routes: block l of L "
                                        "is skipped for a whole training batch with probability drop-path * l / L"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "SGD weight decay"),
    "--lam": ("lam", float, "lambda, weight of the consistency loss (Eq. 5)"),
    "--alpha": ("alpha", float, "alpha, weight of the diversity loss (Eq. 6)"),
    "--gamma": ("gamma", float, "gamma, weight of the regularisation loss (Eq. 10)"),
    "--mu": ("mu", float, "mu, weight of the cost loss (Eq. 8); the start value when --target-flops is set"),
    "--budget-ramp": ("budget_ramp", float, "share of --epochs over which the loop's setpoint moves from the "
                                            "start cost to the target"),
    "--mu-ki": ("mu_ki", float, "integral gain of the budget loop on asinh(mu / mu_scale), per epoch of error"),
    "--mu-kp": ("mu_kp", float, "proportional gain of the budget loop on asinh(mu / mu_scale), per unit of "
                                "relative error"),
    "--mu-min": ("mu_min", float, "the budget controller's floor for mu; < 0 lets it reward compute "
                                  "to reach a target from below (default -20 x the loop's mu scale)"),
    "--mu-integral": ("mu_integral", str, "reset: the budget loop's integral sums every error and "
                                          "returns to 0 when the routes cross over the target while mu < 0 "
                                          "still pulls them up; always: it never resets; hold: it holds while "
                                          "the routes are on course to the target within an epoch"),
    "--mu-max-error": ("mu_max_error", float, "the budget loop clips its relative error to +- this: the most "
                                              "one epoch can move mu is exp(mu-ki x this)"),
    "--mu-scale": ("mu_scale", float, "the budget loop changes mu linearly below this size, relatively "
                                      "above (default 0.05 per nine routers, at least 0.05)"),
    "--d-c": ("d_c", float, "consistency margin d_c"),
    "--d-d": ("d_d", float, "diversity margin d_d"),
    "--beta": ("beta", float, "beta of Eq. 3 (larger: soft routing closer to hard)"),
    "--router-hidden": ("router_hidden", int, "hidden width of each router"),
    "--router-open": ("router_open", float, "p(execute) of an open router at the start, in (0.5, 1); a closed one "
                                          "starts at 1 - this"),
    "--undecided-pairs": ("undecided_pairs", int, "with a start on the budget: N pairs of blocks (an open and a "
                                                  "closed one of a stage, the deepest stage first) start undecided "
                                                  "(p = 0.5), so that about 2N blocks route image by image"),
    "--router-start": ("router_start", str, "open: every router at --router-open; undecided: every router at "
                                            "p = 0.5 (with --train-routing stochastic, each block on a random half "
                                            "of the images at first); auto, deepk, distributedk (with "
                                            "a target): a static route closest to the target open (auto: "
                                            "DistributedK's, or DeepK's where DistributedK's runs the deepest stage "
                                            "on one block), the other "
                                            "routers closed at 1 - --router-open, so training starts on the budget; greedy "
                                            "(with --init): the route the trained blocks lose least by on val"),
    "--consistency-routes": ("consistency_routes", str, "what Eq. 5 and 10 compare between two views of an "
                                                        "image: soft (r, Eq. 3) or executed (the 0/1 routes the "
                                                        "views ran in straight-through training)"),
    "--view-augment": ("view_augment", str, "the views of Eq. 5: same (each view a crop + h-flip) or perturb "
                                            "(views 2..M also one of crop, h-flip, v-flip, +-15 deg rotation: "
                                            "views that differ, for Eq. 5 to act on)"),
    "--train-routing": ("train_routing", str, "soft: Eq. 4 in training (the paper); straight: each image runs its "
                                              "hard route (Eq. 11) forward, Eq. 3's gradient flows back (straight-through); "
                                              "stochastic: straight-through with each gate drawn from Bernoulli(r)"),
    "--router-lr": ("router_lr", str, "decay: the routers' lr steps down with the blocks'; constant: the routers "
                                      "keep the peak lr until the finetune, so the budget loop can still move them; "
                                      "frozen: 0, the routers keep their random start (a control)"),
    "--explore": ("explore", float, "straight-through training: a block its router skips still runs on this share "
                                    "of the images, so that every block trains (the routes and the cost read "
                                    "the routers' decisions; 0: off)"),
    "--routers-first": ("routers_first", int, "main epochs at the start in which only the routers train (the blocks "
                                              "frozen), so the routes settle before the blocks adapt to them; for "
                                              "warm starts (0: off)"),
    "--full-pass": ("full_pass", float, "weight of a second cross-entropy per training step, of the full network "
                                        "(every block) on one view: every block trains on every image, so a router "
                                        "can judge a block it skips (supernet training; 0: off)"),
    "--distill": ("distill", float, "weight of a distillation loss from the --init network (every block, frozen): "
                                    "KL of its softened outputs to this network's, on every step (0: off)"),
    "--distill-from": ("distill_from", str, "the distillation's teacher: init (the --init network, frozen) or full "
                                            "(this network's own full pass of --full-pass, in the main epochs)"),
    "--rate-weight": ("rate_weight", float, "weight of the per-block execution-rate loss (ConvNet-AIG's): with a "
                                            "target, every block is asked to run on the budget's share of the "
                                            "images, so the routers must tell images apart (0: off)"),
    "--rate-band": ("rate_band", float, "0: the rate loss asks every block to run on the budget's share of the "
                                        "images; b > 0: on a share in [b, 1 - b] only"),
    "--rate-routes": ("rate_routes", str, "what the rate loss reads: executed (the 0/1 routes the images ran, "
                                          "straight-through) or soft (r)"),
    "--router-leak": ("router_leak", float, "gradient floor of the routing variable w.r.t. its router's logits "
                                            "in training, in [0, 0.1]: lets closed routers reopen (0: Eq. 3 as is)"),
    "--target-flops": ("target_flops", str, "FLOPs budget per image, absolute (2e8) or share of full (40%%); "
                                            "mu is then adapted to land there"),
    "--target-latency-ms": ("target_latency_ms", str, "latency budget, ms per image at --latency-batch on this "
                                                      "device (or %% of full); per-block times replace FLOPs in Eq. 8"),
    "--latency-batch": ("latency_batch", int, "batch size at which block latencies are measured"),
    "--routing": ("routing", str, "drn (routers); full (the plain network, every block: the warm start of --init); "
                                  "or a static baseline: firstk, randomk, distributedk (the paper's Table 4a), deepk "
                                  "(every image runs the same k blocks; no routers, cross-entropy)"),
    "--k": ("k", int, "blocks a static baseline runs (default: the k closest to --target-flops)"),
    "--seed": ("seed", int, "random seed (initialisation, shuffling, augmentation; randomk's blocks)"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--eval-batch-size": ("eval_batch_size", int, "batch size of the per-epoch evaluation"),
    "--compile": ("compile", str, "the main epochs' training step under torch.compile, the same step to float "
                                  "rounding: inductor (fused kernels, CUDA graphs on CUDA; the first steps compile, "
                                  "about a minute), cudagraphs (CUDA only: the eager kernels captured) or off"),
    "--channels-last": ("channels_last", str, "NHWC activations: auto (on CUDA, off on CPU), on or off"),
    "--controller-every": ("controller_every", int, "the budget loop reads the batches' hard cost every N steps "
                                                    "(one host sync per N)"),
}


def _train_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig.__dataclass_fields__
    p = _Parser(prog="drn-train", description="Train a dynamic-routing ResNet (soft routing with "
                "consistency, diversity, cost and regularisation losses; hard routing at test time).")
    for flag, (name, typ, help_) in TRAIN_FLAGS.items():
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        p.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS,
                       help=f"{help_} (default: {_fmt(name, default)})")
    p.add_argument("--zero-init-residual", dest="zero_init_residual", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS, help="start each residual branch's last BN at 0, so every block "
                   "starts as its shortcut (default: on for --routing full of resnet56 and deeper and resnet50, off "
                   "for drn and the static routes)")
    p.add_argument("--router-norm", dest="router_norm", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS, help="batch-normalise each router's logit gap to a fixed spread, so that it "
                   "is decided image by image throughout and its bias sets its execution rate (default: off)")
    p.add_argument("--route-transitions", dest="route_transitions", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS, help="route the blocks that change the shape (the first of each "
                   "stage after the stem); --no-route-transitions runs them on every image (default: routed)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=argparse.SUPPRESS,
                   help="disable bfloat16 autocast on CUDA (default: on for CUDA, off on CPU)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=argparse.SUPPRESS,
                   help="with a target, keep the routing threshold at 0.5 instead of calibrating it on the "
                        "training images after training (default: calibrate)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt, with the config stored there")
    p.add_argument("--cost-only", action="store_true",
                   help="print the cost table of --arch for --dataset's input size and exit")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of the final metrics")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drn-eval", description="Evaluate a trained dynamic-routing ResNet with hard routing "
                "(Eq. 11): accuracy, FLOPs, routing length K, distinct paths, same-path ratio, speed.")
    p.add_argument("checkpoint", help="a checkpoint.pt written by drn-train, or an MLflow URI of a drn-search "
                   "trial's model, as the MLflow UI shows it: models:/m-<id> (a logged model), "
                   "models:/<name>/<version>, models:/<name>@<alias> (e.g. @best-50pct) or runs:/<run id>")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI for a runs:/ or models:/ URI "
                   "(default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--dataset", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", help="data folder (default: the one it was trained on)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="test: the dataset's held-out split (CIFAR/SVHN test set, Tiny-ImageNet val, ImageFolder "
                        "test/ or val/), only ever reported; val: the training images the run held out for its "
                        "choices (the checkpoint's own carve); train: the rest (default: test)")
    p.add_argument("--threshold", type=float,
                   help="execute a block iff r >= this (default: the model's, 0.5 unless calibrated to a target)")
    p.add_argument("--sweep-threshold", type=float, nargs="*", metavar="T",
                   help="evaluate at each threshold T (default list: 0.1 0.2 ... 0.9) and print accuracy, FLOPs "
                        "and K for each: a cost/accuracy curve from one model")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default: 500)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations for the same-path ratio "
                   "(and of the draws of --routing sample)")
    p.add_argument("--routing", choices=("hard", "sample"), default="hard",
                   help="hard: Eq. 11, execute iff r >= threshold; sample: Ber-Dis (Table 4b), each gate drawn "
                        "from Bernoulli(r) (default: hard)")
    p.add_argument("--hard-forward", choices=("gather", "capacity"), default="gather",
                   help="how --routing hard runs the blocks: gather: each block on exactly the images routed "
                        "through it (shapes depend on the data); capacity: each block on a fixed share of the "
                        "batch, ceil(capacity x batch) images, the top of its router's r, the slots under the "
                        "threshold padded and the images beyond it dropped to the shortcut: static shapes, for "
                        "torch.compile and CUDA graphs; reports flops_spent (padding included), flops (the routes "
                        "that ran) and the share dropped (default: gather)")
    p.add_argument("--capacity-factor", type=float, metavar="F",
                   help="with --hard-forward capacity: block b's capacity is min(1, F x its execution rate on the "
                        "run's val split at the evaluation's threshold), measured with the gather forward; never "
                        "from the split evaluated (default: 1.25)")
    p.add_argument("--routes-png", metavar="FILE",
                   help="also draw the split's routes to FILE (.png): its images grouped by route, a row per "
                        "frequent route (its blocks, share and accuracy), and the distinct routes per epoch of "
                        "the training history (the paper's Fig. 5 and 7)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of the metrics")
    return p


def _emit(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics))
        return
    for k, v in metrics.items():
        if k not in ("block_exec_rate", "block_dropped_rate", "capacity"):
            print(f"{k:>20}  {v:.4g}" if isinstance(v, float) else f"{k:>20}  {v}")


def _emit_sweep(rows: list[dict], flops_full: float, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"flops_full": flops_full, "sweep": rows}))
        return
    print(f"{'threshold':>9}  {'accuracy':>8}  {'FLOPs':>9}  {'of full':>7}  {'K':>6}  {'paths':>5}")
    for r in rows:
        print(f"{r['threshold']:>9.3g}  {r['accuracy']:>8.2%}  {r['flops']:>9.3g}  {r['flops'] / flops_full:>7.1%}  "
              f"{r['k']:>6.2f}  {r['distinct_paths']:>5}")


def _run(fn, prog: str) -> int:
    try:
        return fn()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last finished epoch is in the checkpoint", file=sys.stderr)
        return 130


def _cost_only(cfg: TrainConfig) -> dict:
    from .data import DATASETS, load_dataset
    from .models import build_model
    from .cost import measure_cost_table
    info = DATASETS[cfg.dataset]
    classes, size = info.num_classes, info.input_size
    if size is None:  # imagefolder: read it off the data
        data = load_dataset(cfg.dataset, cfg.data_dir)
        classes, size = data.num_classes, data.input_size
    from .baselines import route_of
    if cfg.routing != "drn" and cfg.k is None:
        raise UsageError("--cost-only of a static routing needs --k")
    model = build_model(cfg.arch, classes, size, beta=cfg.beta, router_hidden=cfg.router_hidden, leak=cfg.router_leak, router_open=cfg.router_open,
                        router_norm=cfg.router_norm, route_transitions=cfg.route_transitions,
                        static_route=route_of(cfg))
    return {"arch": cfg.arch, "dataset": cfg.dataset, "input_size": size,
            **measure_cost_table(model).to_dict()}


def train_main(argv=None) -> int:
    args = vars(_train_parser().parse_args(argv))
    resume, cost_only, as_json = args.pop("resume"), args.pop("cost_only"), args.pop("json")

    def go():
        from .train import Trainer
        cfg = TrainConfig(**args)
        if cost_only:
            _emit(_cost_only(cfg), as_json)
            return 0
        if not resume and (Path(cfg.out) / "checkpoint.pt").exists():
            raise UsageError(f"{cfg.out} already holds a run; continue it with --resume or pick another --out")
        trainer = Trainer(cfg, resume=resume)
        _emit(trainer.run(), as_json)
        return 0

    return _run(go, "drn-train")


def eval_main(argv=None, fetch=None) -> int:
    """drn-eval. fetch(uri, tracking_uri) -> local checkpoint path, for MLflow URIs (search.evaluate)."""
    args = _eval_parser().parse_args(argv)

    def go():
        import torch
        from .checkpoint import load_checkpoint, model_from_checkpoint
        from .cost import measure_cost_table
        from .data import load_source, split_source
        from .evaluate import CAPACITY_FACTOR, evaluate, val_capacity
        from .train import select_device
        sweep = args.sweep_threshold
        if sweep is not None and not sweep:
            sweep = [round(0.1 * i, 1) for i in range(1, 10)]
        for t in ([args.threshold] if args.threshold is not None else []) + (sweep or []):
            if not 0 < t < 1:
                raise UsageError(f"threshold must be in (0, 1), got {t}")
        if args.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {args.batch_size}")
        capacity = args.hard_forward == "capacity"
        if args.capacity_factor is not None and not capacity:
            raise UsageError("--capacity-factor is for --hard-forward capacity")
        factor = CAPACITY_FACTOR if args.capacity_factor is None else args.capacity_factor
        if not 0 < factor < float("inf"):
            raise UsageError(f"capacity factor must be finite and > 0, got {args.capacity_factor}")
        if args.routes_png is not None:
            png = Path(args.routes_png)
            if png.suffix.lower() != ".png":
                raise UsageError(f"--routes-png {png}: the file name must end in .png")
            if not png.parent.is_dir():
                raise UsageError(f"--routes-png {png}: folder {png.parent} does not exist")
            if sweep:
                raise UsageError("--routes-png draws the routes at one threshold: not with --sweep-threshold")
        if capacity and (args.routing != "hard" or sweep):
            raise UsageError("--hard-forward capacity runs --routing hard at one threshold (no --sweep-threshold)")
        if args.checkpoint.startswith(("runs:/", "models:/")):
            # drn knows nothing of MLflow: the caller (search.evaluate) fetches the checkpoint artifact
            if fetch is None:
                raise UsageError(f"{args.checkpoint}: this drn-eval reads checkpoint files only")
            uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise UsageError(f"{args.checkpoint}: give --mlflow-uri (or set MLFLOW_TRACKING_URI)")
            args.checkpoint = str(fetch(args.checkpoint, uri))
        ckpt = load_checkpoint(args.checkpoint)
        model, cfg = model_from_checkpoint(ckpt)
        dataset = args.dataset or cfg.dataset
        src = load_source(dataset, args.data_dir or cfg.data_dir)
        classes, size = len(src.classes), src.train.images.shape[-1]
        if (classes, size) != (ckpt["num_classes"], ckpt["input_size"]):
            raise UsageError(f"the data has {classes} classes of {size}px images, the model "
                             f"was trained on {ckpt['num_classes']} classes of {ckpt['input_size']}px")
        # the run's own val carve; on another dataset, the same fraction and seed
        carve = lambda: split_source(src, cfg.val_fraction, cfg.val_seed, ckpt["val_index"] if dataset == cfg.dataset else None)
        split = src.test if args.split == "test" else getattr(carve(), args.split)
        model.to(select_device(args.device))
        torch.set_grad_enabled(False)
        cost = measure_cost_table(model)
        if capacity:
            val_capacity(model, carve().val, factor, args.batch_size, args.threshold)
        if sweep:
            rows = []
            for t in sweep:
                m = evaluate(model, split, cost, args.batch_size, t)
                rows.append({k: m[k] for k in ("accuracy", "flops", "k", "distinct_paths")} | {"threshold": t})
            _emit_sweep(rows, cost.full, args.json)
            return 0
        metrics = evaluate(model, split, cost, args.batch_size, args.threshold, same_path=True, seed=args.seed,
                           routing="capacity" if capacity else args.routing)
        if capacity:
            metrics.update(hard_forward="capacity", capacity_factor=factor)
        if args.routes_png is not None:
            from .evaluate import route_split
            from .routemap import routes_png
            images = split.images.to(model.mean.device)
            if args.routing == "sample":
                torch.manual_seed(args.seed)
            preds, gates, _ = route_split(model, images, args.batch_size, "capacity" if capacity else args.routing,
                                          args.threshold)
            routes_png(args.routes_png, split.images, split.labels, preds, gates, ckpt.get("history"),
                       title=f"{cfg.arch}, {args.split} split")
            metrics.update(routes_png=str(Path(args.routes_png).absolute()))
        metrics.update(checkpoint=str(Path(args.checkpoint).absolute()), split=args.split, routing=args.routing,
                       threshold=model.threshold.item() if args.threshold is None else args.threshold,
                       epoch=ckpt["epoch"])
        _emit(metrics, args.json)
        return 0

    return _run(go, "drn-eval")
