"""drn-train and drn-eval. Bad input: one line on stderr, exit 2, nothing written."""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from typing import NamedTuple

from .config import MODES, TrainConfig, UsageError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2 (argparse prints the usage first)."""
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=30)


def _fmt(name: str, v) -> str:
    """A flag's default as --help shows it: TrainConfig's value, or what None derives to."""
    derived = {"finetune_epochs": "10%% of --epochs, >= 2",
               "finetune_lr": "--lr", "mu_ki": "16 from --init, 2 open, else 8",
               "mu_kp": "4 undecided, else 1", "router_lr": "constant undecided, else decay",
               "mu": "0.05; 1 from --init",
               "views": "2 for drn, else 1", "router_open": "0.99 from --init, else 0.9",
               "controller_every": "1 on CPU, 8 on CUDA", "mu_scale": "0.05 per 9 routers",
               "mu_min": "-20 x --mu-scale",
               "warmup_epochs": "2 for resnet56+", "zero_init_residual": "on for full resnet56+",
               "k": "closest to the target",
               "lam": "0.2; 0.4 tinyimagenet", "alpha": "0.2; 0.4 tinyimagenet"}
    if v is None:
        return derived.get(name, "none")
    return str(v).replace(os.path.expanduser("~"), "~", 1).replace("%", "%%")


class Flag(NamedTuple):
    field: str                  # the TrainConfig field it sets
    type: type
    help: str                   # one or two lines; the default is appended
    metavar: str | None = None  # (a mode's choices: config.MODES)


# drn-train's flags by purpose. Defaults come from TrainConfig, so the help cannot drift from them.
TRAIN_FLAGS: dict[str, dict[str, Flag]] = {
    "data": {
        "--dataset": Flag("dataset", str, "cifar10/100, svhn, tinyimagenet or imagefolder (DIR/train, "
                          "DIR/test)", metavar="NAME"),
        "--data-dir": Flag("data_dir", str, "dataset folder (torchvision sets download there)", metavar="DIR"),
        "--val-fraction": Flag("val_fraction", float, "training images held out as val: every choice reads "
                               "val, test is only reported"),
        "--val-seed": Flag("val_seed", int, "seed of the (stratified) val carve"),
    },
    "model and routing": {
        "--arch": Flag("arch", str, "resnet8/14/20/32/44/56/74/110 or resnet50", metavar="NAME"),
        "--routing": Flag("routing", str, "drn, full (every block), or a static route: firstk, randomk, "
                          "distributedk, deepk", metavar="NAME"),
        "--k": Flag("k", int, "blocks a static route runs"),
        "--init": Flag("init", str, "warm start: a --routing full checkpoint", metavar="PATH"),
        "--router-start": Flag("router_start", str, "auto, deepk, distributedk (a static route at the budget), "
                               "open, undecided (p=0.5), greedy", metavar="NAME"),
        "--router-open": Flag("router_open", float, "an open router's start p"),
        "--undecided-pairs": Flag("undecided_pairs", int, "N block pairs start at p=0.5"),
        "--router-hidden": Flag("router_hidden", int, "hidden width of each router"),
        "--beta": Flag("beta", float, "beta of Eq. 3 (larger: nearer hard routing)"),
        "--router-leak": Flag("router_leak", float, "gradient floor of Eq. 3, in [0, 0.1]"),
        "--train-routing": Flag("train_routing", str, "soft (Eq. 4), straight (hard forward, Eq. 3 back) or "
                                "stochastic", metavar="MODE"),
        "--drop-path": Flag("drop_path", float, "stochastic depth of full and static routes"),
    },
    "budget": {
        "--target-flops": Flag("target_flops", str, "FLOPs per image, 2e8 or 40%% of full", metavar="T"),
        "--target-latency-ms": Flag("target_latency_ms", str, "ms per image here (or %% of full)", metavar="T"),
        "--latency-batch": Flag("latency_batch", int, "batch the latencies are timed at"),
        "--mu": Flag("mu", float, "weight of Eq. 8; with a target, the loop's start"),
        "--mu-kp": Flag("mu_kp", float, "the loop's proportional gain"),
        "--mu-ki": Flag("mu_ki", float, "its integral gain, per epoch"),
        "--mu-min": Flag("mu_min", float, "its floor for mu"),
        "--mu-max-error": Flag("mu_max_error", float, "its relative error's clip"),
        "--mu-scale": Flag("mu_scale", float, "mu moves linearly below X"),
        "--mu-integral": Flag("mu_integral", str, "its integral: reset, always or hold", metavar="MODE"),
        "--budget-ramp": Flag("budget_ramp", float, "share of --epochs of the setpoint's ramp"),
        "--controller-every": Flag("controller_every", int, "the loop reads the cost every N steps"),
        "--finetune-rates": Flag("finetune_rates", str, "the finetune's router biases: land on val "
                                 "(budget), hold the rates, or free", metavar="MODE"),
    },
    "schedule": {
        "--epochs": Flag("epochs", int, "main epochs: the routers learn"),
        "--finetune-epochs": Flag("finetune_epochs", int, "then epochs on frozen routes"),
        "--batch-size": Flag("batch_size", int, "samples per step"),
        "--views": Flag("views", int, "M of Eq. 5: copies of each sample"),
        "--lr": Flag("lr", float, "lr, x 0.1 at 60 and 80 %% of --epochs"),
        "--finetune-lr": Flag("finetune_lr", float, "the finetune's lr (cosine to 0)"),
        "--warmup-epochs": Flag("warmup_epochs", float, "linear lr warm-up"),
        "--momentum": Flag("momentum", float, "SGD momentum"),
        "--weight-decay": Flag("weight_decay", float, "SGD weight decay"),
        "--router-lr": Flag("router_lr", str, "the routers' lr: decay, constant or frozen", metavar="MODE"),
        "--seed": Flag("seed", int, "seed of init, order, augmentation"),
    },
    "loss weights": {
        "--lam": Flag("lam", float, "lambda: consistency (Eq. 5)"),
        "--alpha": Flag("alpha", float, "alpha: diversity (Eq. 6)"),
        "--gamma": Flag("gamma", float, "gamma: regularisation (Eq. 10)"),
        "--d-c": Flag("d_c", float, "consistency margin d_c"),
        "--d-d": Flag("d_d", float, "diversity margin d_d"),
        "--consistency-routes": Flag("consistency_routes", str, "Eq. 5, 10 compare soft or executed", metavar="MODE"),
        "--view-augment": Flag("view_augment", str, "views of Eq. 5: same or perturb", metavar="MODE"),
        "--rate-weight": Flag("rate_weight", float, "ConvNet-AIG's per-block rate loss"),
        "--rate-band": Flag("rate_band", float, "b > 0: rates in [b, 1 - b] only"),
        "--rate-routes": Flag("rate_routes", str, "the rate loss reads executed or soft", metavar="MODE"),
        "--full-pass": Flag("full_pass", float, "loss of a full-network pass"),
        "--distill": Flag("distill", float, "distillation from --distill-from"),
        "--distill-from": Flag("distill_from", str, "init network or full pass", metavar="FROM"),
    },
    "runtime": {
        "--device": Flag("device", str, "auto, cpu, cuda or cuda:N", metavar="DEV"),
        "--compile": Flag("compile", str, "torch.compile: inductor, cudagraphs, off", metavar="MODE"),
        "--channels-last": Flag("channels_last", str, "NHWC: auto (CUDA), on, off", metavar="MODE"),
        "--eval-batch-size": Flag("eval_batch_size", int, "batch of the evaluations"),
    },
    "output": {
        "--out": Flag("out", str, "run folder (checkpoint.pt every epoch)", metavar="DIR"),
    },
}
# on/off flags: (the form that changes the default, field, help); the other form is accepted too
TRAIN_SWITCHES = {
    "model and routing": [("--router-norm", "router_norm", "normalise each router's logit gap"),
                          ("--no-route-transitions", "route_transitions", "run each stage's first block always"),
                          ("--zero-init-residual", "zero_init_residual", "residual branches start at 0 (on for "
                                                                         "full resnet56+; --no-: off)")],
    "budget": [("--no-calibrate", "calibrate", "keep the threshold at 0.5 (no trim on val)")],
    "runtime": [("--no-amp", "amp", "no bfloat16 autocast on CUDA")],
}
_METAVAR = {int: "N", float: "X", str: "S"}


def train_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig.__dataclass_fields__
    default = lambda name: (defaults[name].default_factory() if defaults[name].default_factory is not
                            dataclasses.MISSING else defaults[name].default)
    p = OneLineParser(prog="drn-train", usage="drn-train [options]", formatter_class=formatter,
                      description="Train a dynamic-routing ResNet (the paper's losses, a budget loop on mu; hard "
                                  "routes at test time).")
    for title, flags in TRAIN_FLAGS.items():
        g = p.add_argument_group(title)
        for flag, f in flags.items():
            metavar = f.metavar or _METAVAR[f.type]
            g.add_argument(flag, dest=f.field, type=f.type, choices=MODES.get(f.field), metavar=metavar,
                           default=argparse.SUPPRESS, help=f"{f.help} ({_fmt(f.field, default(f.field))})")
        for flag, name, help_ in TRAIN_SWITCHES.get(title, []):
            off = flag.startswith("--no-")
            other = "--" + flag[5:] if off else "--no-" + flag[2:]
            g.add_argument(flag, dest=name, action="store_false" if off else "store_true", default=argparse.SUPPRESS,
                           help=help_)
            g.add_argument(other, dest=name, action="store_true" if off else "store_false",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if title == "output":
            g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
            g.add_argument("--cost-only", action="store_true", help="print --arch's cost table and exit")
            g.add_argument("--json", action="store_true", help="end stdout with the final metrics as JSON")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="drn-eval", description="Evaluate a trained dynamic-routing ResNet with hard routing "
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
    args = vars(train_parser().parse_args(argv))
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
    args = eval_parser().parse_args(argv)

    def go():
        import torch
        from .cost import measure_cost_table
        from .evaluate import evaluate, val_capacity
        from .train import select_device
        sweep, factor = _check_eval_args(args)
        ckpt, model, split, carve = _eval_split(args, fetch)
        model.to(select_device(args.device))
        torch.set_grad_enabled(False)
        cost = measure_cost_table(model)
        capacity = args.hard_forward == "capacity"
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
            metrics.update(routes_png=_routes_png(args, model, split, ckpt))
        metrics.update(checkpoint=str(Path(args.checkpoint).absolute()), split=args.split, routing=args.routing,
                       threshold=model.threshold.item() if args.threshold is None else args.threshold,
                       epoch=ckpt["epoch"])
        _emit(metrics, args.json)
        return 0

    return _run(go, "drn-eval")


def _check_eval_args(args) -> tuple[list[float] | None, float]:
    """drn-eval's flags that argparse cannot check alone; returns the thresholds of a sweep and the
    capacity factor."""
    from .evaluate import CAPACITY_FACTOR
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
    return sweep, factor


def _eval_split(args, fetch):
    """The checkpoint (fetched first for an MLflow URI), its model, the split to evaluate and the
    run's own val carve (a function: carved only when needed)."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .data import load_source, split_source
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
    return ckpt, model, split, carve


def _routes_png(args, model, split, ckpt) -> str:
    """--routes-png: the split's images grouped by route (routemap.routes_png); returns the file."""
    import torch
    from .evaluate import route_split
    from .routemap import routes_png
    images = split.images.to(model.mean.device)
    if args.routing == "sample":
        torch.manual_seed(args.seed)
    preds, gates, _ = route_split(model, images, args.batch_size,
                                  "capacity" if args.hard_forward == "capacity" else args.routing, args.threshold)
    routes_png(args.routes_png, split.images, split.labels, preds, gates, ckpt.get("history"),
               title=f"{ckpt['config']['arch']}, {args.split} split")
    return str(Path(args.routes_png).absolute())
