"""SearchConfig: the one place where drn-search's flags (or a resumed search's search.json) become
a validated, typed configuration. Bad input raises UsageError (one line, exit 2)."""
import dataclasses
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from drn.config import TrainConfig, UsageError, build_checked, default_data_dir, is_number, parse_target

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
# what --smoke-test sets, where the command line leaves it unset
# (tolerance 5 %: ResNet-8 has only 3 routable blocks, and the synthetic val split only 250 images)
SMOKE = dict(arch="resnet8", dataset="synthetic", epochs=2, backbone_epochs=4, num_samples=4, max_concurrent=2,
             batch_size=64, tolerance=0.05, target_flops=["50%"])
SCRATCH_EPOCHS = TrainConfig.__dataclass_fields__["epochs"].default   # the paper's 250: drn-train's default
# a trial from a backbone, as shares of the backbone's epochs: a short main phase (the routers find their
# routes; every block runs, two views) and a long finetune (routers frozen, hard routes, one view: an epoch
# costs about the budget's share of a plain one on CPU). On ResNet-20, 30 epochs, it beat the DRN trained
# from scratch for all 30 epochs at 30, 50 and 70 % (BENCHMARKS.md, "The trial's schedule from a backbone")
TRIAL_EPOCHS_SHARE = 1 / 15     # 2 of 30, 17 of 250: enough for the routes to land now that the loop starts at a
                                # warm mu; 5 of 30 gained 1-1.5 points at 30 / 50 % for +0.4 C per trial
TRIAL_FINETUNE_SHARE = 2 / 3    # 20 of 30, 167 of 250


def brief(e: Exception) -> str:
    """An exception as one line of a log: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def results_root(storage: str) -> Path:
    """Where our files of every search under `storage` live: beside Tune's, or ./drn-results for a URI."""
    return Path("drn-results").absolute() if is_uri(storage) else Path(storage).expanduser().absolute()


def is_uri(s: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", s) is not None


def local_store(uri: str) -> Path | None:
    """The file or folder of a local MLflow store -- a sqlite file, a file: URI (file:///abs, file:rel,
    file://host/abs) or a bare path -- else None (a server, a database elsewhere)."""
    if uri.startswith("sqlite:"):
        return Path(unquote(uri.split("sqlite:///", 1)[-1]))
    if uri.startswith("file:"):
        return Path(unquote(urlsplit(uri).path))
    return None if ":" in uri or uri.startswith("databricks") else Path(uri)   # databricks: MLflow's hosted store


DRIVERS = {"postgresql": "psycopg[binary]", "mysql": "mysqlclient"}   # what SQLAlchemy imports for a bare scheme


def check_database_url(url: str) -> None:
    """--optuna-storage: a URL SQLAlchemy parses, of a database kind it knows, whose driver imports here
    (a missing one was a traceback at the first study, after the results dir was made)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        dialect = make_url(url).get_dialect()
    except NoSuchModuleError:
        raise UsageError(f"--optuna-storage {url}: not a database SQLAlchemy knows "
                         f"(postgresql://, mysql://, sqlite:///...)") from None
    except ArgumentError:
        raise UsageError(f"--optuna-storage {url!r} is not a database URL (like postgresql://USER@HOST/DB)") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        scheme = url.split(":", 1)[0]
        hint = DRIVERS.get(scheme.split("+")[0], e.name)
        raise UsageError(f"--optuna-storage {scheme}: its Python driver is not installed ({e.name}); "
                         f"pip install '{hint}'") from None


@dataclass
class SearchConfig:
    target_flops: list[str] = field(default_factory=list)       # absolute (2e8) or share of full (40%)
    target_latency_ms: list[str] = field(default_factory=list)
    tolerance: float = 0.02          # a trial is feasible when |cost / target - 1| <= tolerance
    arch: str = "resnet110"
    dataset: str = "cifar10"
    data_dir: str = field(default_factory=default_data_dir)
    space: str = str(SPACES_DIR / "default.yaml")
    num_samples: int = 20            # trials in all (a resumed search counts the earlier ones)
    max_concurrent: int | None = None  # None: as many as the cluster's resources fit
    epochs: int | None = None        # each trial's main epochs (None: TRIAL_EPOCHS_SHARE x backbone_epochs from
                                     # a backbone, SCRATCH_EPOCHS with --backbone none)
    finetune_epochs: int | None = None  # frozen-router epochs per trial (None: TRIAL_FINETUNE_SHARE x backbone_epochs
                                     # from a backbone, drn-train's max(2, 10 % of epochs) from scratch)
    batch_size: int = 128
    val_fraction: float = 0.1        # share of the training images held out as val: every choice reads it
    cpus_per_trial: float | None = None  # None: 1 without GPUs, else the CPUs per GPU (at most 4)
    gpus_per_trial: float | None = None  # None: 1 when Ray sees GPUs, else 0; fractions share a GPU
    address: str | None = None       # an existing Ray cluster ('auto', or ray://host:port); None: local
    storage: str = "drn-results"     # local dir or cloud URI for Tune's results and checkpoints
    name: str = ""                   # '' -> drn-<arch>-<date>-<time>
    seed: int = 0
    scheduler: str = "auto"          # asha (one ASHA per target: a trial competes only with its own budget's
                                     # trials) | fifo | auto (= asha)
    grace_period: int | None = None  # ASHA: epochs before a trial can be stopped (None: epochs / 4)
    reduction_factor: int = 3        # ASHA: keep the best 1/rf at each rung
    max_failures: int = 2            # retries of a trial that errors (from its last checkpoint)
    optuna_storage: str | None = None  # RDB URL; None: sqlite in the results dir
    mlflow_uri: str | None = None    # MLflow tracking URI (a server: http://host:port); None: sqlite in the results dir
    experiment_name: str | None = None  # MLflow experiment; None: the search's name
    routing: str = "drn"             # drn, or a static baseline (firstk | randomk | distributedk | deepk) at each target
    backbone: str = "auto"           # none: every trial trains from scratch; auto: the plain network of --arch,
                                     # trained once (--backbone-epochs) and cached under <storage>/backbones;
                                     # PATH: a `drn-train --routing full` checkpoint of --arch on --dataset (the
                                     # same val split). Every trial starts from it (--init), handed over through
                                     # Ray's object store
    backbone_epochs: int | None = None  # auto: the plain network's epochs (None: SCRATCH_EPOCHS; for a PATH,
                                     # the epochs it was trained for); the trials' schedule is a share of it
    compile: str = "off"             # each trial's main-epoch step under torch.compile: inductor | cudagraphs | off
                                     # (drn-train's --compile; GPU speed not measured yet)
    smoke_test: bool = False

    def __post_init__(self):
        from .secrets import strip_password   # before anything keeps a URI (search/secrets.py)
        for flag in ("optuna_storage", "mlflow_uri", "address", "storage"):
            setattr(self, flag, strip_password(f"--{flag.replace('_', '-')}", getattr(self, flag)))
        if self.optuna_storage is not None:
            check_database_url(self.optuna_storage)
        if self.smoke_test and not self.target_flops and not self.target_latency_ms:
            self.target_flops = list(SMOKE["target_flops"])
        if bool(self.target_flops) == bool(self.target_latency_ms):
            raise UsageError("give --target-flops or --target-latency-ms (one or several values), not both"
                             if self.target_flops else "give a budget: --target-flops (like 2e8 or 40%) or "
                             "--target-latency-ms")
        for t in self.targets:
            parse_target(t)
        if len(set(self.targets)) != len(self.targets):
            raise UsageError(f"targets repeat: {' '.join(self.targets)}")
        for name in ("tolerance", "cpus_per_trial", "gpus_per_trial"):
            v = getattr(self, name)
            if v is not None and not is_number(v):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {v}")
        for ok, msg in self._checks():
            if not ok:
                raise UsageError(msg)
        # the second and 4 random hex digits: two searches started in one second get two names
        self.name = self.name or f"drn-{self.arch}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UsageError(f"name {self.name!r}: use letters, digits, '.', '_' and '-'")
        self._paths()
        self._schedule()
        self.train_config(self.targets[0], device="auto")   # the shared training settings are valid too
        from .space import check_routing, load_space
        check_routing(load_space(self.space), self.routing)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (0 < self.tolerance < 1, f"tolerance must be in (0, 1), got {self.tolerance}"),
            (self.num_samples >= 1, f"num-samples must be >= 1, got {self.num_samples}"),
            (self.max_concurrent is None or self.max_concurrent >= 1,
             f"max-concurrent must be >= 1, got {self.max_concurrent}"),
            (self.cpus_per_trial is None or self.cpus_per_trial > 0,
             f"cpus-per-trial must be > 0, got {self.cpus_per_trial}"),
            (self.gpus_per_trial is None or self.gpus_per_trial >= 0,
             f"gpus-per-trial must be >= 0, got {self.gpus_per_trial}"),
            (self.gpus_per_trial is None or self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(),
             f"gpus-per-trial above 1 must be whole, got {self.gpus_per_trial}"),
            (self.scheduler in ("asha", "fifo", "auto"), f"scheduler must be asha, fifo or auto, got {self.scheduler!r}"),
            (self.grace_period is None or self.grace_period >= 1, f"grace period must be >= 1, got {self.grace_period}"),
            (self.reduction_factor >= 2, f"reduction factor must be >= 2, got {self.reduction_factor}"),
            (self.max_failures >= 0, f"max-failures must be >= 0, got {self.max_failures}"),
        ]

    def _paths(self) -> None:
        """Absolute paths (Ray runs the trials in other folders); a bare space name is spaces/<name>.yaml."""
        space = Path(self.space)
        if not space.suffix and not space.exists():
            space = SPACES_DIR / f"{self.space}.yaml"
        self.space = str(space.expanduser().absolute())
        self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))
        if not is_uri(self.storage):
            self.storage = os.path.abspath(os.path.expanduser(self.storage))
        if self.backbone not in ("none", "auto"):
            self.backbone = os.path.abspath(os.path.expanduser(self.backbone))
            if not os.path.isfile(self.backbone):
                raise UsageError(f"--backbone {self.backbone} does not exist (give a `drn-train --routing full` "
                                 f"checkpoint.pt, or none)")

    def _schedule(self) -> None:
        """The backbone's epochs, and each trial's as shares of them (or drn-train's from scratch)."""
        if self.backbone_epochs is None and self.backbone not in ("none", "auto"):
            from drn.checkpoint import load_checkpoint   # the trials' schedule follows the given network's
            self.backbone_epochs = int(load_checkpoint(self.backbone).get("epoch") or SCRATCH_EPOCHS)
        if self.backbone_epochs is None:
            self.backbone_epochs = SCRATCH_EPOCHS
        if self.backbone_epochs < 1:
            raise UsageError(f"backbone epochs must be >= 1, got {self.backbone_epochs}")
        if self.backbone != "none":
            if self.epochs is None:
                self.epochs = max(1, round(TRIAL_EPOCHS_SHARE * self.backbone_epochs))
            if self.finetune_epochs is None:
                self.finetune_epochs = round(TRIAL_FINETUNE_SHARE * self.backbone_epochs)
        elif self.epochs is None:
            self.epochs = SCRATCH_EPOCHS

    @property
    def targets(self) -> list[str]:
        return [str(t) for t in (self.target_flops or self.target_latency_ms)]

    @property
    def target_key(self) -> str:
        return "target_flops" if self.target_flops else "target_latency_ms"

    @property
    def cost_key(self) -> str:
        return "flops" if self.target_flops else "latency_ms"

    @property
    def results_dir(self) -> Path:
        """Our files (search.json, optuna.db, trials.parquet): beside Tune's, or local for a URI."""
        return results_root(self.storage) / self.name

    @property
    def study_storage(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.results_dir / 'optuna.db'}"

    @property
    def total_epochs(self) -> int:
        return self.train_config(self.targets[0]).total_epochs

    def train_config(self, target: str, device: str = "cpu", init: str | None = None) -> TrainConfig:
        """`init`: where --backbone auto cached the backbone (its path is known once Ray is up)."""
        return TrainConfig(arch=self.arch, dataset=self.dataset, data_dir=self.data_dir, epochs=self.epochs,
                           finetune_epochs=self.finetune_epochs, batch_size=self.batch_size, seed=self.seed,
                           val_fraction=self.val_fraction,
                           init=init or (None if self.backbone in ("none", "auto") else self.backbone),
                           device=device, routing=self.routing, compile=self.compile, **{self.target_key: target})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        return build_checked(cls, d, "search config")

    @classmethod
    def resumed(cls, name: str, overrides: dict) -> "SearchConfig":
        """Search `name`'s saved settings under --storage, fetched first from a cloud --storage's copy
        on a head that lacks them (search/state.py); `overrides`: where Ray runs and --storage."""
        storage = overrides.get("storage", cls.__dataclass_fields__["storage"].default)
        results = results_root(storage) / name
        load = lambda folder: cls.from_dict({**json.loads((folder / "search.json").read_text()), **overrides})
        if not (results / "search.json").is_file():
            from .state import Unreadable, fetch_state, state_uri
            try:
                found, why = fetch_state(storage, name, results, accept=load), ""   # refused settings: not fetched
            except Unreadable as e:
                found, why = False, f", and {e}"
            if not found:
                copy = f" nor in {state_uri(storage, name)}" if is_uri(storage) and not why else ""
                raise UsageError(f"no search named {name!r} under {results.parent} (no search.json{copy}){why}")
        cfg = load(results)
        if (results / "mlflow.json").is_file():   # none: the search stopped before it started
            from .state import follow_mlflow
            follow_mlflow(results)
        return cfg

    @classmethod
    def from_flags(cls, flags: dict) -> "SearchConfig":
        """`flags`: only what the command line set; --smoke-test fills in the rest of SMOKE."""
        if flags.get("smoke_test"):
            flags = {**{k: v for k, v in SMOKE.items() if k != "target_flops"}, **flags}
        return cls.from_dict(flags)
