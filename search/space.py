"""Search spaces: spaces/*.yaml -> a typed, validated `Space` -> Optuna distributions.

    d_c:   {type: float, low: 0.05, high: 0.5}          # sampled
    lam:   {type: float, low: 0.02, high: 1.0, log: true}
    views: {type: int, low: 2, high: 4}
    beta:  {type: categorical, choices: [3.0, 5.0, 8.0]}
    gamma: 0.5                                           # fixed for every trial

Keys are TrainConfig fields (the hyper-parameters below). Errors name the file and line.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from drn.config import TrainConfig, UsageError, is_number

# TrainConfig fields a space may sample or fix (the rest belong to the search's command line)
SEARCHABLE = ("d_c", "d_d", "lam", "alpha", "gamma", "mu", "beta", "lr", "momentum", "weight_decay",
              "views", "batch_size", "router_hidden", "lr_decay", "drop_path")
# what only the routers read (Eq. 3-10, the router MLP): a static route has none
ROUTER_ONLY = ("d_c", "d_d", "lam", "alpha", "gamma", "mu", "beta", "router_hidden")
STATIC_ONLY = ("drop_path",)   # stochastic depth: a routed network's routers choose what to skip
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                      # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.CategoricalDistribution(self.choices)


@dataclass(frozen=True)
class Space:
    path: str
    params: tuple[Param, ...]
    fixed: dict

    def distributions(self) -> dict:
        return {p.name: p.distribution() for p in self.params}

    def to_dict(self) -> dict:
        return {"path": self.path, "params": [dataclasses.asdict(p) for p in self.params], "fixed": self.fixed}


def _check_value(name: str, value, where: str) -> None:
    """A value the trainer would reject is an error now, not in trial 37."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    want_int = field.type in (int, "int")
    if want_int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UsageError(f"{where}: {name} takes whole numbers, got {value!r}")
    if not want_int and not is_number(value):
        raise UsageError(f"{where}: {name} takes a number, got {value!r}")
    # drop_path is valid only on a static route: check it on one
    context = dict(routing="firstk", k=1) if name in STATIC_ONLY else {}
    try:
        TrainConfig(**{name: value}, **context)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


def load_space(path: str | Path) -> Space:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"space file {path} does not exist")
    text = path.read_text()
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path}: a space is a mapping of hyper-parameter names to ranges or values")
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    params, fixed = [], {}
    for name, spec in data.items():
        where = f"{path}:{lines.get(name, 1)}"
        if name not in SEARCHABLE:
            raise UsageError(f"{where}: unknown key {name!r}; a space may set {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict):
            _check_value(name, spec, where)
            fixed[name] = spec
            continue
        unknown = sorted(set(spec) - {"type", "low", "high", "log", "choices"})
        if unknown:
            raise UsageError(f"{where}: {name}: unknown key {unknown[0]!r} (allowed: type, low, high, log, choices)")
        kind = spec.get("type")
        if kind not in KINDS:
            raise UsageError(f"{where}: {name}: type must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
                raise UsageError(f"{where}: {name}: a categorical takes a non-empty 'choices' list and nothing else")
            for c in choices:
                _check_value(name, c, where)
            params.append(Param(name, kind, choices=tuple(choices)))
            continue
        if "choices" in spec or "low" not in spec or "high" not in spec:
            raise UsageError(f"{where}: {name}: a {kind} range takes 'low' and 'high' (and optionally 'log')")
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        if not isinstance(log, bool):
            raise UsageError(f"{where}: {name}: log must be true or false, got {log!r}")
        for v in (low, high):
            if kind == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
                raise UsageError(f"{where}: {name}: an int range takes whole numbers, got {v!r}")
            _check_value(name, float(v) if kind == "float" and is_number(v) else v, where)
        if low >= high:
            raise UsageError(f"{where}: {name}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise UsageError(f"{where}: {name}: a log range needs low > 0, got {low}")
        params.append(Param(name, kind, float(low) if kind == "float" else low,
                            float(high) if kind == "float" else high, log))
    if not params:
        raise UsageError(f"{path}: nothing to search: every key is fixed (give at least one range)")
    return Space(str(path.resolve()), tuple(params), fixed)


def check_routing(space: Space, routing: str) -> None:
    """A space must search what the route trains: a static one has no routers, a routed one no
    stochastic depth. Sampling what a trial ignores spends its trials on noise."""
    keys = [p.name for p in space.params] + list(space.fixed)
    if routing == "drn":
        wrong = [k for k in keys if k in STATIC_ONLY]
        if wrong:
            raise UsageError(f"space {space.path}: {', '.join(wrong)} is for the static routes (--routing firstk, "
                             f"randomk, distributedk, deepk); a routed network's routers choose what to skip")
        return
    used = [p.name for p in space.params if p.name not in ROUTER_ONLY]
    if not used:
        sampled = ", ".join(p.name for p in space.params)
        raise UsageError(f"--routing {routing} has no routers, so space {space.path} samples nothing it uses "
                         f"({sampled}); give --space static (lr, weight_decay, drop_path) or a space of "
                         f"{', '.join(k for k in SEARCHABLE if k not in ROUTER_ONLY)}")
