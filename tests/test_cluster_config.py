"""cluster.yaml, checked the way `ray up` checks it, without AWS.

`ray up` (ray/autoscaler/_private/commands.py: create_or_update_cluster -> _bootstrap_config)
does: yaml.safe_load -> prepare_config (defaults merged, setup commands merged, min/max workers)
-> look up the provider -> fillout_available_node_types_resources (asks AWS for instance types;
skipped: our node types declare `resources`) -> validate_config (Ray's JSON schema + head/worker
checks) -> provider bootstrap_config (IAM, key pair, subnets: AWS calls; not run here).
"""
import base64
import contextlib
import copy
import fnmatch
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

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


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:          # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile() -> tuple[dict[str, str], list[list[str]]]:
    """cluster/Dockerfile: its ARG defaults and its RUN commands as token lists."""
    text = (ROOT / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    args, runs = {}, []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        elif word == "RUN":
            runs.extend(shlex.split(part) for part in rest.split("&&"))
    return args, runs


def checkout_mount(raw) -> str:
    mount = [remote for remote, local in raw["file_mounts"].items()
             if (ROOT / Path(local).expanduser()).resolve() == ROOT]
    assert len(mount) == 1, "file_mounts does not carry this checkout"
    return mount[0]


def test_the_image_has_rays_version_and_pyprojects_torch_pair_for_cuda_12():
    args, runs = dockerfile()
    tag = args["RAY_IMAGE"].rpartition(":")[2]          # 2.60.0-py311-cu128
    version, py, cuda = tag.split("-")
    assert version == ray.__version__, f"image Ray {version} != this Ray {ray.__version__} (the launcher needs both equal)"
    python = f"{py[2]}.{py[3:]}"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python)
    assert cuda.startswith("cu12"), f"image {args['RAY_IMAGE']} is not a CUDA 12 build"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX"])
    deps = {r.name.lower(): r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    [torch_install] = [t for t in runs if t[:2] == ["pip", "install"] and "torch" in requirements(t)]
    assert option(torch_install, "--index-url") == "$TORCH_INDEX"
    reqs = requirements(torch_install)
    for name in ("torch", "torchvision"):
        assert reqs[name].specifier == deps[name].specifier, \
            f"Dockerfile: {name} not pinned as in pyproject.toml ({deps[name].specifier})"
    # then the package itself, with its pinned dependencies, and MLflow's auth app for the head
    [package] = [t for t in runs if t[:2] == ["pip", "install"] and "/tmp/drn-search" in t]
    assert "auth" in requirements(package)["mlflow"].extras


def test_nodes_boot_the_image_and_install_only_this_checkout(raw, cfg):
    docker = cfg["docker"]
    assert docker["image"] and docker["container_name"]
    assert re.search(r"/drn-search@sha256:\w+$", docker["image"]), "the image is not pinned by its digest"
    remote = checkout_mount(raw)
    for role in ("head_setup_commands", "worker_setup_commands"):
        installs = [t for t in commands_with(cfg[role], "pip", "install")]
        assert [t for t in installs if option(t, "-e", "--editable") == remote and "--no-deps" in t], \
            f"{role}: no `pip install --no-deps -e {remote}`"
        for t in installs:
            assert not {"torch", "torchvision", "ray"} & set(requirements(t)), \
                f"{role} installs {' '.join(t)}: the image has it"


def test_gpu_workers_get_the_gpus_and_check_their_driver(raw, cfg):
    head = cfg["head_node_type"]
    assert not any("--gpus" in o for o in cfg["docker"].get("run_options", []) +
                   cfg["docker"].get("head_run_options", [])), "the head (no GPU) is started with --gpus"
    for name, t in cfg["available_node_types"].items():
        if name != head and t["resources"].get("GPU", 0) >= 1:
            assert "--gpus all" in t["docker"]["worker_run_options"], f"{name}: its container sees no GPU"
    remote = checkout_mount(raw)
    checks = commands_with(cfg["worker_setup_commands"], "python", f"{remote}/cluster/check_gpu.py")
    assert checks and (ROOT / "cluster" / "check_gpu.py").is_file()
    assert not commands_with(cfg["head_setup_commands"], "python", f"{remote}/cluster/check_gpu.py")


def test_head_state_lives_on_the_hosts_disk(cfg):
    # a new container (new image, restarted head) must find the MLflow store and the searches' files
    mounts = [o.split()[1].split(":")[1] for o in cfg["docker"]["head_run_options"] if o.startswith("-v ")]
    assert {"/home/ray/mlflow", "/home/ray/drn-results"} <= set(mounts)
    assert commands_with(cfg["initialization_commands"], "mkdir", "-p")    # owned by the ssh user, not root


def test_token_auth_reaches_every_node(raw, cfg):
    assert "~/.ray/auth_token" in raw["file_mounts"], "the auth token is not copied to the nodes"
    for setup, start in (("head_setup_commands", "head_start_ray_commands"),
                         ("worker_setup_commands", "worker_start_ray_commands")):
        [ray_start] = [c for c in cfg[start] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in ray_start or any("RAY_AUTH_MODE=token" in c for c in cfg[setup]), \
            f"{start}: Ray not started with RAY_AUTH_MODE=token"


# ----------------------------------------------------------------------------- IAM

def policy(name: str) -> list[dict]:
    doc = json.loads((ROOT / "cluster" / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def allowed(statements: list[dict], action: str, resource: str = "*") -> bool:
    """Whether an Allow statement grants `action` on `resource` (IAM's wildcards; conditions aside)."""
    as_list = lambda v: v if isinstance(v, list) else [v]   # noqa: E731
    return any(s["Effect"] == "Allow"
               and any(fnmatch.fnmatchcase(action, a) for a in as_list(s["Action"]))
               and any(fnmatch.fnmatchcase(resource, r) for r in as_list(s["Resource"]))
               for s in statements)


def autoscaler_ec2_actions() -> set[str]:
    """The EC2 calls of Ray's AWS node provider (what the head's autoscaler makes), as IAM actions."""
    src = (Path(ray.__file__).parent / "autoscaler/_private/aws/node_provider.py").read_text()
    calls = set(re.findall(r"\b(?:client|ec2|ec2_fail_fast)\.([a-z]\w+)", src)) - {"meta"}
    named = {"create_instances": "RunInstances", "instances": "DescribeInstances"}
    return {"ec2:" + named.get(c, c.title().replace("_", "")) for c in calls}


def profile(cfg, node_type: str) -> str:
    p = cfg["available_node_types"][node_type]["node_config"]["IamInstanceProfile"]
    return p.get("Name") or p["Arn"].rpartition("/")[2]


def bucket(cfg) -> str:
    [server] = commands_with(cfg["head_start_ray_commands"], "mlflow", "server")
    return option(server, "--artifacts-destination").split("/")[2]


def test_both_node_types_have_their_own_instance_profile(cfg):
    head = cfg["head_node_type"]
    [worker] = [n for n in cfg["available_node_types"] if n != head]
    assert profile(cfg, head) == "drn-search-head" and profile(cfg, worker) == "drn-search-worker"


def test_head_policy_lets_the_autoscaler_start_workers_with_their_profile(cfg):
    head = policy("iam-head.json")
    actions = autoscaler_ec2_actions()
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances"} <= actions
    assert not [a for a in actions if not allowed(head, a)], "the head role lacks an EC2 call of the autoscaler"
    worker_role = f"arn:aws:iam::ACCOUNT_ID:role/{profile(cfg, 'gpu')}"
    assert allowed(head, "iam:PassRole", worker_role), "no iam:PassRole on the workers' role"
    assert not allowed(head, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/Admin"), "PassRole on any role"


def test_worker_policy_is_the_bucket_and_the_image_only(cfg):
    worker, b = policy("iam-worker.json"), bucket(cfg)
    trial = f"arn:aws:s3:::{b}/drn/NAME/trial-3-a1b2c3d4/checkpoint_000002/checkpoint.pt"
    backbone = f"arn:aws:s3:::{b}/drn/backbones/resnet20-cifar10-0123456789abcdef/partial.pt"
    for p in (worker, policy("iam-head.json")):   # what a trial and the backbone's task write, on any node
        assert allowed(p, "s3:PutObject", trial) and allowed(p, "s3:PutObject", backbone)
        assert allowed(p, "s3:GetObject", f"arn:aws:s3:::{b}/drn/NAME/drn-state/search.json")
        assert allowed(p, "s3:ListBucket", f"arn:aws:s3:::{b}")
        assert allowed(p, "ecr:BatchGetImage", "arn:aws:ecr:us-west-2:ACCOUNT_ID:repository/drn-search")
    assert not allowed(worker, "s3:GetObject", "arn:aws:s3:::another-bucket/x")
    for key in ("drn-state/search.json", "drn-state/mlflow.json", "drn-state/optuna.db", "tuner.pkl",
                "experiment_state-2026-12-07_12-00-00.json", "searcher-state-2026-12-07_12-00-00.pkl"):
        what = f"arn:aws:s3:::{b}/drn/NAME/{key}"   # what the head reads back at --resume: only the head writes it
        assert allowed(policy("iam-head.json"), "s3:PutObject", what)
        assert not allowed(worker, "s3:PutObject", what) and not allowed(worker, "s3:DeleteObject", what), key
    services = {a.split(":")[0] for s in worker for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert services == {"s3", "ecr"}
    trust = policy("iam-trust.json")
    assert trust[0]["Principal"] == {"Service": "ec2.amazonaws.com"} and trust[0]["Action"] == "sts:AssumeRole"


# ----------------------------------------------------------------------------- MLflow login

def env_assignments(toks: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in toks if re.fullmatch(r"[A-Z_]+=.*", t))


def test_head_mlflow_server_asks_for_a_login(raw, cfg):
    [toks] = commands_with(cfg["head_start_ray_commands"], "mlflow", "server")
    assert option(toks, "--app-name") == "basic-auth"
    env = env_assignments(toks)
    remote = checkout_mount(raw)
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert ini.startswith(remote + "/") and (ROOT / ini[len(remote) + 1:]).is_file()
    # the secrets come from the head's files, never from this config
    for k in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[k].startswith("$"), f"{k} written in cluster.yaml"
    made = [c for c in cfg["head_setup_commands"] if "auth.env" in c and "MLFLOW_TRACKING_PASSWORD" in c]
    assert made and "umask 077" in made[0] and "MLFLOW_TRACKING_USERNAME" in made[0]
    assert commands_with(cfg["head_setup_commands"], "echo", ". ~/mlflow/auth.env", ">>", "~/.bashrc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@contextlib.contextmanager
def auth_server(folder: Path, user: str, password: str):
    """cluster/basic_auth.ini under a real `mlflow server --app-name basic-auth`, as the head runs it;
    yields its URI."""
    from conftest import mlflow_server_env
    port = free_port()
    env = mlflow_server_env(MLFLOW_AUTH_CONFIG_PATH=str(ROOT / "cluster" / "basic_auth.ini"),
                            MLFLOW_AUTH_ADMIN_USERNAME=user, MLFLOW_AUTH_ADMIN_PASSWORD=password,
                            MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret")
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)   # unprotected: the head's health check
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
                time.sleep(1)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_shipped_auth_config_refuses_strangers_and_lets_the_login_in(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="MLflow's auth app needs mlflow[auth] (the image has it)")
    from mlflow import MlflowClient
    user, password = "admin", "a-long-test-password"
    with auth_server(tmp_path, user, password) as uri:
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert anonymous.value.code == 401
        assert (tmp_path / "basic_auth.db").is_file(), "users not kept beside the server (~/mlflow on the head)"
        wrong = urllib.request.Request(uri + "/api/2.0/mlflow/experiments/search?max_results=1", headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:wrong-password-1234".encode()).decode()})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=10)
        assert refused.value.code == 401
        # the client (the driver) logs in from the two variables alone
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(uri)
        exp = client.create_experiment("logged-in")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "accuracy", 0.5)
        assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.5}


@pytest.mark.slow
def test_trials_log_as_a_user_of_their_search_alone_and_the_admin_password_is_stored_nowhere(
        tmp_path, tiny_data, monkeypatch):
    """A real search against the basic-auth server, the driver logged in as admin: its trials log as
    drn-<experiment id>, a user with edit rights on that experiment only; the admin password is in no
    file of the results, the storage or Ray's session (its runtime env, logs), nor in the output."""
    pytest.importorskip("flask_wtf", reason="MLflow's auth app needs mlflow[auth] (the image has it)")
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient
    from conftest import files_holding, ray_sessions, run_cli
    password = "admin-pw-Planted-91c2"
    (tmp_path / "server").mkdir()
    before = ray_sessions()
    with auth_server(tmp_path / "server", "admin", password) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        proc = run_cli("drn-search", "--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder",
                       "--data-dir", str(tiny_data), "--epochs", "1", "--finetune-epochs", "0", "--backbone", "none",
                       "--batch-size", "12", "--num-samples", "1", "--storage", str(tmp_path / "st"), "--name", "au",
                       "--mlflow-uri", uri)
        assert proc.returncode in (0, 3), proc.stderr[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("au").experiment_id
        [child] = client.search_runs([exp], filter_string="tags.optuna_trial = '0'")
        assert child.data.metrics.get("accuracy") is not None and child.data.tags.get("model_uri")   # it logged
        assert child.data.tags["logged_in_as"] == f"drn-{exp}"    # as the search's user, not as admin
        auth, name = AuthServiceClient(uri), f"drn-{exp}"
        assert not auth.get_user(name).is_admin
        other = client.create_experiment("another-search")
        assert auth.get_user_permission(name, "experiment", exp).permission == "EDIT"
        assert auth.get_user_permission(name, "experiment", other).permission == "READ"   # the server's default
    seen, holding = files_holding(password, tmp_path / "st", *(ray_sessions() - before))
    assert seen > 20 and holding == [], holding
    assert password not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- pending trials

@pytest.mark.parametrize("num_samples, max_concurrent, pending", [
    (20, 8, 8),       # a cluster of up to 8 GPU nodes: 8 requests for the autoscaler at once
    (4, 8, 4),        # never more than there are trials
    (20, None, 1),    # no --max-concurrent: one ahead, as Tune does for a custom searcher
    (1, None, 1),
])
def test_pending_trials_follow_max_concurrent(num_samples, max_concurrent, pending):
    from search.tuner import max_pending_trials
    assert max_pending_trials(num_samples, max_concurrent) == pending


def test_tune_reads_the_pending_trials_we_set(monkeypatch):
    """Tune 2.60 keeps one trial pending for a custom searcher (no ConcurrencyLimiter); the variable
    run_search sets raises that."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator, Searcher
    from search.tuner import max_pending_trials
    searcher = SearchGenerator(Searcher(metric="accuracy", mode="max"))
    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    assert _get_max_pending_trials(searcher) == 1
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", str(max_pending_trials(20, 8)))
    assert _get_max_pending_trials(searcher) == 8


# ----------------------------------------------------------------------------- GPU driver check

SMI = """Thu Dec  3 11:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {v}              Driver Version: {v}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A10G                    On  |   00000000:00:1E.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


def gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "cluster" / "check_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("torch_cuda, driver, driver_cuda, ok", [
    ("12.8", "570.86.15", "12.8", True),
    ("12.8", "580.65.06", "13.0", True),      # a newer major runs older builds
    ("12.6", "565.57.01", "12.7", True),
    ("12.8", "550.54.15", "12.4", False),     # older minor: refused (no PTX JIT for 12.8 code)
    ("13.0", "570.86.15", "12.8", False),
    ("12.1", "470.82.01", "11.4", False),
])
def test_gpu_check_compares_torchs_cuda_with_the_drivers(torch_cuda, driver, driver_cuda, ok):
    why = gpu_check().problem(torch_cuda, SMI.format(v=driver, cuda=driver_cuda), driver)
    if ok:
        assert why is None
    else:
        assert driver in why and driver_cuda in why and torch_cuda in why and "\n" not in why


def test_gpu_check_names_what_is_missing():
    problem = gpu_check().problem
    assert "CPU-only" in problem(None, SMI.format(v="570.86.15", cuda="12.8"), "570.86.15")
    assert "--gpus all" in problem("12.8", None, None)
    assert "cannot read" in problem("12.8", "NVIDIA-SMI has failed", "570.86.15")


def test_gpu_check_fails_with_one_line_on_a_node_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "cluster" / "check_gpu.py")], capture_output=True,
                          text=True, timeout=300, env={"PATH": "/nonexistent", "HOME": "/tmp"})
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("check_gpu: "), proc.stderr
