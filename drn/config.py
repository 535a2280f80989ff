"""TrainConfig: the one place where CLI flags (and later search-trial dicts) become a validated,
typed configuration. Bad input raises UsageError, which the CLIs print as one line, exit 2."""
import dataclasses
import math
import os
from dataclasses import dataclass, field


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def parse_target(spec: str | float | None) -> tuple[str, float] | None:
    """'2e8' -> ('abs', 2e8); '40%' -> ('frac', 0.4). Range checks need the cost table: see
    `resolve_target`."""
    if spec is None:
        return None
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            kind, value = "frac", float(s[:-1]) / 100
        else:
            kind, value = "abs", float(s)
    except ValueError:
        raise UsageError(f"target {spec!r} is neither FLOPs (like 2e8) nor a percentage (like 40%)") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"target {spec!r} must be > 0")
    return kind, value


def resolve_target(spec: str | float | None, full: float, fixed: float, unit: str = "FLOPs") -> float | None:
    """Absolute cost per image for `spec`, checked against what the network can reach."""
    parsed = parse_target(spec)
    if parsed is None:
        return None
    kind, value = parsed
    cost = value * full if kind == "frac" else value
    if cost >= full:
        raise UsageError(f"target {spec} is not below the full network's {full:.4g} {unit}; "
                         f"ask for less, or train without a target")
    if cost <= fixed:
        raise UsageError(f"target {spec} ({cost:.4g} {unit}) is not above the network's fixed cost "
                         f"{fixed:.4g} {unit} (stem, head, routers), which every image pays")
    return cost


def is_number(v) -> bool:
    """A real, finite number (a bool is not one): what a metric or a numeric setting must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_checked(cls, d: dict, what: str):
    """cls(**d) for a dataclass, with unknown keys as a UsageError rather than a TypeError."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UsageError(f"unknown {what} keys: {', '.join(unknown)}")
    return cls(**d)


ROUTER_STARTS = ("auto", "open", "undecided", "deepk", "distributedk", "greedy")
# the settings that take one of a few modes (the first is what the help lists first)
MODES = {"router_start": ROUTER_STARTS, "train_routing": ("soft", "straight", "stochastic"),
         "consistency_routes": ("soft", "executed"), "view_augment": ("same", "perturb"),
         "router_lr": ("decay", "constant", "frozen"), "mu_integral": ("reset", "always", "hold"),
         "finetune_rates": ("budget", "hold", "free"), "distill_from": ("init", "full"),
         "rate_routes": ("executed", "soft"), "compile": ("off", "inductor", "cudagraphs"),
         "channels_last": ("auto", "on", "off")}


def default_data_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "drn", "data")


@dataclass
class TrainConfig:
    # what to train
    arch: str = "resnet110"
    dataset: str = "cifar10"
    data_dir: str = field(default_factory=default_data_dir)
    out: str = "runs/drn"
    val_fraction: float = 0.1     # share of the training images carved out as val (selection reads it)
    val_seed: int = 0             # seed of that carve: the same val split whatever the training seed
    init: str | None = None       # warm start: a `--routing full` checkpoint of the same arch and data
                                  # (or, for resnet50, a torchvision state_dict); routers: router_start
    # schedule (paper Sec. 4.1: SGD 0.9, wd 1e-4, lr 0.1, x0.1 at epochs 150 and 200 of 250)
    epochs: int = 250
    finetune_epochs: int | None = None  # extra epochs with frozen routers and hard routing (None: with a
                                  # target, max(2, 10 % of epochs), measured to lift accuracy; else 0)
    finetune_lr: float | None = None  # the finetune restarts at this lr and decays to 0 along a half cosine
                                  # (None: lr). The route settles late in a short schedule, when the main
                                  # lr has decayed: the restart trains it (docs/notes/2026-12-01-static-routes.md, "Why the DRN loses
                                  # to RandomK at 30 %: the route is right, its training is short")
    finetune_rates: str = "budget"  # budget: the budget loop goes on through the finetune on the routers'
                                  # biases: each undecided router's rate on training images is held while the
                                  # finetune trains the blocks it reads (controller.RateHold), and the held
                                  # rates move after each epoch so that the val cost at the routers' own
                                  # threshold meets the target (RateHold.steer): a short main phase ends before
                                  # the loop has landed (BENCHMARKS.md, "The finetune steers to the budget");
                                  # hold: the rates stay where the main phase left them, at a threshold
                                  # trimmed first; free: frozen routers only
    batch_size: int = 128         # samples per step; each contributes `views` augmented copies
    views: int | None = None      # M of Eq. 5: augmented copies per sample in the main epochs (None: 2 for drn,
                                  # 1 for full and the static routes, which train on cross-entropy alone)
    lr: float = 0.1
    warmup_epochs: float | None = None  # linear lr warm-up from 0 (None: 2 for resnet56 and deeper and
                                  # resnet50 unless zero_init_residual, else 0)
    zero_init_residual: bool | None = None  # each residual branch's last BN starts at 0 (None: on for the plain
                                  # network of resnet56 and deeper and resnet50; off for drn and the static
                                  # routes, which train as the DRN does: +2 to +7 points, BENCHMARKS.md, "ResNet-56 at
                                  # 50 %: the DRN's lead from scratch was the statics' recipe and its second view")
    drop_path: float = 0.0        # stochastic depth for full and static routes: block l of L skipped for a
                                  # whole training batch with probability drop_path * l / L (Huang et al.)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of `epochs` (= 150/250, 200/250)
    lr_decay: float = 0.1
    # Eq. 9 (None: the paper's value for the dataset -- 0.2, or 0.4 on Tiny-ImageNet)
    lam: float | None = None
    alpha: float | None = None
    gamma: float = 0.5
    mu: float | None = None       # the cost weight: its start value with a target (the loop adapts it), fixed
                                  # without one. None: 0.05, or WARM_MU x the loop's mu scale (1 on ResNet-20)
                                  # when the routers start on the budget from --init (BENCHMARKS.md, "The 70 % miss,
                                  # found: the loop started too low for trained blocks (fix: μ starts at 1 from a backbone)")
    budget_ramp: float = 0.3      # the loop's setpoint moves from the start cost to the target over this
                                  # share of --epochs (controller.py)
    mu_ki: float | None = None    # the controller's integral gain on asinh(mu / mu_scale), per epoch (controller.py;
                                  # None: 8 when the routers start on the budget, 16 when they do so from
                                  # --init (docs/notes/2026-12-03-search-cost.md, "The 70 % miss: the loop was too slow for trained
                                  # blocks (fix: ki 16 from a backbone)"), 2 when they start open)
    mu_kp: float | None = None    # the controller's proportional gain on asinh(mu / mu_scale), per unit relative
                                  # error (controller.py; None: 4 when the routers start undecided -- they
                                  # integrate mu, and an integral loop on them cycles (BENCHMARKS.md, "A damped
                                  # loop for routes that depend on the image") -- else 1)
    mu_integral: str = "reset"    # reset: the loop's integral sums every error and returns to 0 when the routes
                                  # cross over the target while mu < 0 still pulls them up; always: it never
                                  # resets; hold: it holds while the routes are on course to the setpoint
                                  # within an epoch (conditional integration; controller.py; docs/notes/2026-12-02-landing.md,
                                  # "A held integral for the wind-up")
    mu_max_error: float = 0.5     # the loop's relative error is clipped to +- this (controller.py)
    mu_scale: float | None = None # the loop changes mu linearly below this size, relatively above (controller.py;
                                  # None: 0.05 per nine routers, at least 0.05 -- Eq. 8 splits one share over all blocks)
    mu_min: float | None = None   # the controller's floor: < 0 lets it reward compute to reach a target
                                  # from below (controller.py; None: -20 x mu_scale, -1 on ResNet-20)
    d_c: float = 0.2
    d_d: float = 0.5
    # routers
    beta: float = 5.0
    router_hidden: int = 32
    router_norm: bool = False     # each router's logit gap batch-normalised (router.Router): decided image by image
    route_transitions: bool = True  # False: the shape-changing blocks run on every image (models.ModelConfig)
    router_open: float | None = None  # p(execute) of an open router at the start, in (0.5, 1) (a closed one:
                                  # 1 - this); None: 0.99 for a warm start on the budget (--init: trained
                                  # blocks pull closed routers open within an epoch at 0.9, docs/notes/2026-12-02-static-routes.md,
                                  # "The start route decides the DRN at this schedule; what it gains over static routes is its second
                                  # view"), else 0.9
    undecided_pairs: int = 0      # with a start on the budget: this many pairs of blocks (an open and a closed one of
                                  # a stage, the deepest stage first) start undecided (p = 0.5) instead: routes that
                                  # vary on about 2 x this many blocks at the start route's expected cost
    router_start: str = "auto"    # with a target: the blocks of a static route (baselines.py) closest to the
                                  # target start open (router_open), the others closed (1 - router_open), so
                                  # training starts on the budget (docs/notes/2026-12-01-landing.md, "Routers that start on
                                  # the budget"). auto: DistributedK's
                                  # route, or DeepK's where DistributedK's runs the deepest stage on one block
                                  # (30 % on ResNet-20); deepk, distributedk: that route; greedy (with --init):
                                  # the route the trained blocks lose least by on val (warmstart.greedy_route);
                                  # open: every router at router_open, training starts as the full network
    consistency_routes: str = "soft"  # what Eq. 5 and 10 compare between views: soft r, or the routes the
                                      # views ran ("executed": the 0/1 g under straight-through training)
    view_augment: str = "same"    # the views of Eq. 5 (data.make_views): same (each a crop + h-flip) or perturb
                                  # (views 2..M also a crop, h-flip, v-flip or +-15 deg rotation, the paper's
                                  # consistency test: views that differ, so that Eq. 5 has something to act on)
    train_routing: str = "straight"  # straight: Eq. 11's 0/1 decisions forward, Eq. 3's gradient backward
                                  # (models.py), so training runs the routes testing will (lands closer, and
                                  # level with soft in accuracy over 18 runs, BENCHMARKS.md, "Training routing, views
                                  # that differ, and the warm rows on today's plain networks");
                                  # soft: Eq. 4, the paper's
    router_lr: str | None = None  # decay: the routers' lr follows the blocks' (milestones); constant: the
                                  # routers keep the peak lr until the finetune freezes them, so the budget
                                  # loop can still move them after the blocks' lr has decayed; frozen: 0, the
                                  # routers keep their random start (a control: routes that depend on the
                                  # image but are not learned). None: constant when the routers start
                                  # undecided (their routes stayed wherever the lr fall caught them: BENCHMARKS.md,
                                  # "A damped loop for routes that depend on the image"), else decay
    full_pass: float = 0.0        # main epochs: weight of the cross-entropy of a second pass through the full
                                  # network (every block, on one view), so that every block trains on every
                                  # image and a router can judge a block it skips (supernet training; 0: off;
                                  # measured at 1: docs/notes/2026-12-02-static-routes.md, "Three ways to let the routers judge
                                  # trained blocks, and none that pays at 8 epochs"; BENCHMARKS.md, "Six more experiments: what the loss
                                  # is not, and what it is")
    distill: float = 0.0          # weight of the distillation loss (Hinton et al.): KL from the --init network's
                                  # outputs (every block, frozen) to this network's, at temperature losses.DISTILL_T,
                                  # on every training step (statics and the finetune too); 0: off
    distill_from: str = "init"    # the teacher: init (the --init network, frozen) or full (in-place distillation,
                                  # Yu et al.'s slimmable networks: this network's own full pass of --full-pass,
                                  # detached, teaches the routed pass in the main epochs; no --init needed)
    rate_weight: float = 0.0      # weight of the per-block execution-rate loss (losses.rate_loss): with a target,
                                  # every block is asked to run on the budget's share of the images
    rate_band: float = 0.0        # 0: the rate loss asks every block for the budget's share; b > 0: for a rate in
                                  # [b, 1 - b] only (the budget loop places the blocks' rates inside it)
    rate_routes: str = "executed" # what the rate loss reads: the routes the images ran (executed: straight-through,
                                  # the rate testing will see) or soft r
    router_leak: float = 0.0      # gradient floor of r w.r.t. the router logits (router.soft_route): lets
                                  # closed routers reopen; 0 = Eq. 3's own gradient (docs/notes/2026-12-01-landing.md, "A signed
                                  # budget loop, and two ways to let routers reopen")
    # budget: FLOPs per image ('2e8') or share of the full network ('40%'), or milliseconds per
    # image on this device at `latency_batch` (then a measured latency table replaces FLOPs in Eq. 8)
    target_flops: str | None = None
    target_latency_ms: str | None = None
    latency_batch: int = 64
    calibrate: bool = True        # with a target: move the routing threshold to land on it (controller.py)
    # drn, or a static route (baselines.py): full (the plain network: every block, no routers), or a
    # baseline of Table 4a, firstk | randomk | distributedk, running k blocks (None: the k whose
    # FLOPs are closest to target_flops)
    routing: str = "drn"
    k: int | None = None
    route: tuple[int, ...] | None = None  # a static route's blocks (0-based), set when randomk draws its route
                                  # at a FLOPs target (baselines.randomk_at_budget); None: the routing's rule
    # runtime
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    amp: bool = True              # bfloat16 autocast on CUDA; ignored on CPU
    compile: str = "off"          # the main epochs' step under torch.compile (drn/step.py), the same step to float
                                  # rounding: inductor (fused kernels; on CUDA replayed as CUDA graphs) | cudagraphs
                                  # (CUDA only: the eager kernels captured, seconds to compile) | off. Off by
                                  # default: its GPU speed is not measured yet (BENCHMARKS.md, "GPU speed")
    channels_last: str = "auto"   # NHWC activations: auto (on CUDA, where cuDNN converts NCHW around every conv;
                                  # off on CPU) | on | off
    controller_every: int | None = None  # the budget loop reads the batches' hard cost every N steps, one host sync
                                  # per N, and replays the N readings in order (None: 1 on CPU, where a read costs
                                  # nothing; 8 on CUDA)
    eval_batch_size: int = 500

    def __post_init__(self):
        from .baselines import STATIC
        from .data import DATASETS
        from .models import ARCHS
        for name, known in (("arch", ARCHS), ("dataset", DATASETS), ("routing", ("drn", "full", *STATIC))):
            if getattr(self, name) not in known:
                raise UsageError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(known)}")
        self._derive()
        for name, modes in MODES.items():
            if getattr(self, name) not in modes:
                raise UsageError(f"{name.replace('_', ' ')} must be {', '.join(modes[:-1])} or {modes[-1]}, "
                                 f"got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not is_number(v):
                raise UsageError(f"{f.name.replace('_', ' ')} must be a finite number, got {v}")
        for ok, msg in self._checks(sum(ARCHS[self.arch].stages)):
            if not ok:
                raise UsageError(msg)
        parse_target(self.target_flops)
        parse_target(self.target_latency_ms)

    def _derive(self) -> None:
        """The defaults that depend on other settings (None in the fields above), and absolute paths."""
        default_w = 0.4 if self.dataset == "tinyimagenet" else 0.2
        routed_target = self.routing == "drn" and self.target is not None
        if self.finetune_epochs is None:
            self.finetune_epochs = max(2, round(0.1 * self.epochs)) if routed_target else 0
        deep = self.arch == "resnet50" or int(self.arch[6:]) >= 56
        if self.zero_init_residual is None:
            self.zero_init_residual = deep and self.routing == "full"
        if self.warmup_epochs is None:
            self.warmup_epochs = 2.0 if deep and not self.zero_init_residual else 0.0
        self.finetune_lr = self.lr if self.finetune_lr is None else self.finetune_lr
        if self.mu_ki is None:   # warm: a trained block's router is pulled open, and mu must get there fast
            self.mu_ki = 2.0 if self.router_start == "open" else 16.0 if self.init is not None else 8.0
        if self.mu_kp is None:
            self.mu_kp = 4.0 if self.router_start == "undecided" else 1.0
        if self.router_lr is None:
            self.router_lr = "constant" if self.router_start == "undecided" else "decay"
        if self.views is None:
            self.views = 2 if self.routing == "drn" else 1
        if self.router_open is None:
            on_budget = self.router_start not in ("open", "undecided") and self.target is not None
            self.router_open = 0.99 if on_budget and self.init is not None else 0.9
        self.lam = default_w if self.lam is None else self.lam
        self.alpha = default_w if self.alpha is None else self.alpha
        self.milestones = tuple(self.milestones)
        self.route = None if self.route is None else tuple(self.route)
        self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))
        self.out = os.path.abspath(os.path.expanduser(self.out))
        if self.init is not None:
            self.init = os.path.abspath(os.path.expanduser(self.init))

    def _checks(self, blocks: int) -> list[tuple[bool, str]]:
        """(holds, what to say when it does not), in the order they are reported; blocks: the arch's."""
        drn, static, mu = self.routing == "drn", self.routing not in ("drn", "full"), self.mu
        route = self.route
        return [
            (0 < self.val_fraction <= 0.5, f"val fraction must be in (0, 0.5], got {self.val_fraction}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be >= 0, got {self.warmup_epochs}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.finetune_epochs >= 0, f"finetune epochs must be >= 0, got {self.finetune_epochs}"),
            (self.finetune_lr > 0, f"finetune lr must be > 0, got {self.finetune_lr}"),
            (self.batch_size >= 2, f"batch size must be >= 2 (Eq. 6 needs pairs), got {self.batch_size}"),
            (self.views >= 1, f"views must be >= 1, got {self.views}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (all(0 < m <= 1 for m in self.milestones), f"milestones are fractions in (0, 1], got {self.milestones}"),
            (0 < self.lr_decay <= 1, f"lr decay must be in (0, 1], got {self.lr_decay}"),
            (min(self.lam, self.alpha, self.gamma, 0.0 if mu is None else mu) >= 0, "loss weights must be >= 0"),
            (0 <= self.budget_ramp <= 1, f"budget ramp must be in [0, 1], got {self.budget_ramp}"),
            (0 < self.mu_ki <= 50, f"mu integral gain must be in (0, 50], got {self.mu_ki}"),
            (0 <= self.mu_kp <= 20, f"mu proportional gain must be in [0, 20], got {self.mu_kp}"),
            (0 < self.mu_max_error <= 2, f"mu max error must be in (0, 2], got {self.mu_max_error}"),
            (self.mu_scale is None or 0 < self.mu_scale <= 10, f"mu scale must be in (0, 10], got {self.mu_scale}"),
            (self.mu_min is None or -50 <= self.mu_min <= (0.05 if mu is None else mu),
             f"mu floor must be in [-50, mu], got {self.mu_min}"),
            (self.d_c >= 0 and self.d_d >= 0, "margins d_c and d_d must be >= 0"),
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (0 <= self.drop_path < 1, f"drop path must be in [0, 1), got {self.drop_path}"),
            (self.router_hidden >= 1, f"router hidden width must be >= 1, got {self.router_hidden}"),
            (0.5 < self.router_open < 1, f"router open must be in (0.5, 1), got {self.router_open}"),
            (0 <= self.full_pass <= 10, f"full pass must be in [0, 10], got {self.full_pass}"),
            (0 <= self.distill <= 10, f"distill must be in [0, 10], got {self.distill}"),
            (0 <= self.rate_weight <= 100, f"rate weight must be in [0, 100], got {self.rate_weight}"),
            (0 <= self.rate_band < 0.5, f"rate band must be in [0, 0.5), got {self.rate_band}"),
            (0 <= self.router_leak <= 0.1, f"router leak must be in [0, 0.1], got {self.router_leak}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}"),
            (self.latency_batch >= 1, f"latency batch must be >= 1, got {self.latency_batch}"),
            (self.controller_every is None or 1 <= self.controller_every <= 1000,
             f"controller every must be in [1, 1000] steps, got {self.controller_every}"),
            (self.compile != "cudagraphs" or self.device != "cpu", "compile cudagraphs needs a CUDA device"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}"),
            (self.target_flops is None or self.target_latency_ms is None,
             "give a FLOPs target or a latency target, not both"),
            (self.undecided_pairs >= 0, f"undecided pairs must be >= 0, got {self.undecided_pairs}"),
            (not self.undecided_pairs or self.router_start not in ("open", "undecided"),
             f"undecided pairs need a start on the budget, not router start {self.router_start}"),
            (self.router_start != "greedy" or self.init is not None or not drn,
             "router start greedy measures trained blocks: it needs --init (a warm start)"),
            (self.distill == 0 or self.distill_from != "init" or self.init is not None,
             "distill needs --init: the trained network to distill from (or --distill-from full)"),
            (self.distill == 0 or self.distill_from != "full" or (self.full_pass > 0 and drn),
             "distill from full needs a routed network (--routing drn) with --full-pass > 0: the full pass is the "
             "teacher"),
            (self.view_augment != "perturb" or (self.views >= 2 and drn),
             "view augment perturb varies the views Eq. 5 compares: it needs --views 2 or more and a drn"),
            (self.routing != "full" or (self.target is None and self.k is None),
             "routing full trains the plain network (every block): it takes no target and no --k"),
            (not static or self.target_latency_ms is None,
             f"routing {self.routing} takes --k or --target-flops, not a latency target"),
            (not static or self.k is not None or self.target_flops is not None,
             f"routing {self.routing} needs --k (blocks to run) or --target-flops"),
            (not drn or not self.drop_path,
             "--drop-path is for full and static routes: a routed network's routers choose what to skip"),
            (not drn or self.k is None, "--k is for the static routings (firstk, randomk, distributedk), not drn"),
            (route is None or (static and route and list(route) == sorted(set(route))
                               and all(isinstance(i, int) and 0 <= i < blocks for i in route)
                               and self.k in (None, len(route))),
             f"route must be ascending distinct blocks in [0, {blocks}) of a static routing, with k its length; "
             f"got {route} (routing {self.routing}, k {self.k})"),
            (self.k is None or self.k >= 1, f"k must be >= 1, got {self.k}"),
        ]

    @property
    def target(self) -> str | None:
        return self.target_flops if self.target_flops is not None else self.target_latency_ms

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        # settings that existed briefly and were removed, kept readable at the value whose behaviour is
        # the only one left (`--finetune-routers frozen`: the steered finetune collapsed the routes;
        # `--router-detach`, `--block-grad routed`: no effect on the routes, BENCHMARKS.md "Six more
        # experiments: what the loss is not, and what it is"; `--cost-price`: no effect on where the routers spend, BENCHMARKS.md "What
        # per-image compute can buy here, and where the routers spend it"); `--explore`, `--routers-first`: no
        # gain, docs/notes/2026-12-02-static-routes.md, "Three ways to let the routers judge trained blocks, and
        # none that pays at 8 epochs")
        removed = {"finetune_routers": "frozen", "router_detach": False, "block_grad": "batch", "cost_price": 0.0,
                   "explore": 0.0, "routers_first": 0}
        d = {k: v for k, v in d.items() if not (k in removed and v == removed[k])}
        return build_checked(cls, d, "config")

    def lr_at(self, epoch: int, frac: float = 0.0, router: bool = False) -> float:
        """Learning rate at `frac` of the way through 0-based `epoch`: a linear warm-up over
        `warmup_epochs`, then steps at the milestones; the finetune phase restarts at `finetune_lr`
        and decays along a half cosine to 0. router: the routers' lr, which skips the milestone
        steps with router_lr = constant, and is 0 with frozen (the finetune freezes the routers)."""
        if router and self.router_lr == "frozen":
            return 0.0
        if epoch >= self.epochs:
            t = (epoch - self.epochs + frac) / max(self.finetune_epochs, 1)
            return self.finetune_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        e = min(epoch, self.epochs - 1)
        passed = 0 if router and self.router_lr == "constant" else sum(e >= round(m * self.epochs) for m in self.milestones)
        warm = min(1.0, (epoch + frac) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return self.lr * self.lr_decay ** passed * warm
