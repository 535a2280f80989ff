"""cluster.yaml, checked the way `ray up` checks it, without AWS.

`ray up` (ray/autoscaler/_private/commands.py: create_or_update_cluster -> _bootstrap_config)
does: yaml.safe_load -> prepare_config (defaults merged, setup commands merged, min/max workers)
-> look up the provider -> fillout_available_node_types_resources (asks AWS for instance types;
skipped: our node types declare `resources`) -> validate_config (Ray's JSON schema + head/worker
checks) -> provider bootstrap_config (IAM, key pair, subnets: AWS calls; not run here).
"""
import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
WILDCARD = {"0.0.0.0", "::", "[::]", "*"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does with the config before its first cloud call; returns the prepared config."""
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config
    assert _NODE_PROVIDERS.get(config["provider"]["type"]), "unknown provider type"
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    return ray_up_checks(raw)


def tokens(cmd: str) -> list[str]:
    return shlex.split(cmd.replace(";", " ; "))


def option(toks: list[str], *names: str) -> str | None:
    for i, t in enumerate(toks):
        for n in names:
            if t == n and i + 1 < len(toks):
                return toks[i + 1]
            if t.startswith(n + "="):
                return t.split("=", 1)[1]
    return None


def commands_with(cmds: list[str], *words: str) -> list[list[str]]:
    """Token lists of the commands that contain `words` as consecutive tokens."""
    out = []
    for c in cmds:
        t = tokens(c)
        if any(t[i:i + len(words)] == list(words) for i in range(len(t))):
            out.append(t)
    return out


def requirements(cmd_tokens: list[str]) -> dict[str, Requirement]:
    reqs = {}
    for t in cmd_tokens:
        try:
            r = Requirement(t)
        except InvalidRequirement:
            continue
        reqs[r.name.lower()] = r
    return reqs


def test_ray_up_validation_passes(cfg):
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(unknown_key=1), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu"].pop("resources"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nope"), ValueError),
    (lambda c: c.update(max_workers=0), ValueError),            # < the GPU type's min_workers
])
def test_broken_copies_fail_the_same_validation(raw, breakage, error):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(error):
        ray_up_checks(broken)


def test_head_runs_mlflow_on_a_private_address(cfg):
    servers = commands_with(cfg["head_setup_commands"] + cfg["head_start_ray_commands"], "mlflow", "server")
    assert len(servers) == 1, "the head starts exactly one MLflow server"
    toks = servers[0]
    host = option(toks, "--host", "-h")
    assert host is not None, "no --host: MLflow binds 127.0.0.1 and the workers' trials cannot reach it"
    assert host not in WILDCARD | LOOPBACK, f"MLflow bound to {host}"
    assert option(toks, "--backend-store-uri").startswith("sqlite:///")
    artifacts = option(toks, "--artifacts-destination") or option(toks, "--default-artifact-root")
    assert artifacts and artifacts.startswith("s3://")
    assert not any(commands_with(cfg[k], "mlflow", "server") for k in ("worker_setup_commands",
                                                                       "worker_start_ray_commands"))


def test_dashboard_stays_on_loopback(cfg):
    heads = commands_with(cfg["head_start_ray_commands"], "ray", "start")
    assert len(heads) == 1 and "--head" in heads[0]
    host = option(heads[0], "--dashboard-host")     # None: Ray's default, localhost
    assert host in LOOPBACK | {None}, f"dashboard (and job server) bound to {host}: use ray dashboard's tunnel"


def test_gpu_worker_autoscales_and_declares_gpus(cfg):
    head = cfg["head_node_type"]
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != head}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type declares GPU resources: the autoscaler would never start one for a trial"
    t = gpu[0]
    assert t["min_workers"] < t["max_workers"] <= cfg["max_workers"]
    assert t["resources"].get("CPU", 0) >= 1


def test_every_node_installs_this_package_with_the_pinned_pair(raw, cfg):
    mount = {remote: local for remote, local in raw["file_mounts"].items()
             if (ROOT / Path(local).expanduser()).resolve() == ROOT}
    assert mount, "file_mounts does not carry this checkout"
    [remote] = mount
    try:
        import tomllib
    except ModuleNotFoundError:          # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {r.name.lower(): r for r in map(Requirement, pyproject["project"]["dependencies"])}
    for role in ("head_setup_commands", "worker_setup_commands"):
        installs = [t for t in commands_with(cfg[role], "pip", "install")
                    if option(t, "-e", "--editable") == remote]
        assert installs, f"{role}: no `pip install -e {remote}`"
        reqs = requirements(installs[0])
        for name in ("torch", "torchvision"):
            assert name in reqs and reqs[name].specifier == deps[name].specifier, \
                f"{role}: {name} not pinned as in pyproject.toml ({deps[name].specifier})"
        assert reqs["ray"].specifier.contains(ray.__version__), \
            f"cluster Ray {reqs['ray'].specifier} != this Ray {ray.__version__} (the launcher needs both equal)"


def test_token_auth_reaches_every_node(raw, cfg):
    assert "~/.ray/auth_token" in raw["file_mounts"], "the auth token is not copied to the nodes"
    for setup, start in (("head_setup_commands", "head_start_ray_commands"),
                         ("worker_setup_commands", "worker_start_ray_commands")):
        [ray_start] = [c for c in cfg[start] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in ray_start or any("RAY_AUTH_MODE=token" in c for c in cfg[setup]), \
            f"{start}: Ray not started with RAY_AUTH_MODE=token"
