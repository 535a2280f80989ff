"""Every bad input the console scripts reject, in one table: exit 2, one line on stderr, no
traceback, nothing on stdout, and no file left behind (neither in the paths given nor in the
working directory)."""
import concurrent.futures
import subprocess
from pathlib import Path

import torch

from conftest import cli_command


def _full_checkpoint(arch: str, path: Path, dataset: str = "imagefolder", classes: int = 3) -> None:
    """A checkpoint of a plain `arch` network, as drn-train --routing full writes it."""
    from drn.checkpoint import save_checkpoint
    from drn.config import TrainConfig
    from drn.models import build_model
    cfg = TrainConfig(arch=arch, dataset=dataset, routing="full", out=str(path.parent))
    model = build_model(arch, classes, 32, static_route=(True,) * (len(build_model(arch).blocks)))
    save_checkpoint(path, {"config": cfg.to_dict(), "epoch": 1, "num_classes": classes, "input_size": 32,
                           "model": model.state_dict(), "val_index": [0, 1], "history": []})


def train_and_eval_cases(data: Path, tmp: Path) -> dict[str, tuple]:
    empty = tmp / "empty"
    empty.mkdir()
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    foreign = tmp / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    truncated = tmp / "truncated.pt"
    good = tmp / "good.pt"
    torch.save({"format": "drn-checkpoint", "version": 1, "x": torch.zeros(1000)}, good)
    truncated.write_bytes(good.read_bytes()[:300])
    other_arch = tmp / "resnet14-full.pt"
    _full_checkpoint("resnet14", other_arch)
    _full_checkpoint("resnet8", tmp / "resnet8-cifar10-full.pt", "cifar10", 10)
    out = str(tmp / "out")
    d = str(data)
    common = ("--dataset", "imagefolder", "--data-dir", d, "--out", out, "--epochs", "1", "--device", "cpu")
    return {
        "unknown arch": ("drn-train", "--arch", "resnet9", *common),
        "unknown dataset": ("drn-train", "--dataset", "mnist", "--out", out),
        "missing data dir": ("drn-train", "--arch", "resnet8", "--dataset", "imagefolder",
                             "--data-dir", str(tmp / "nope"), "--out", out),
        "empty data dir": ("drn-train", "--arch", "resnet8", "--dataset", "imagefolder",
                           "--data-dir", str(empty), "--out", out),
        "target zero": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "0"),
        "target negative": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "-2e8"),
        "target above full": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "1e12"),
        "target 100%": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "100%"),
        "target garbage": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "lots"),
        "flops and latency targets": ("drn-train", "--arch", "resnet8", *common, "--target-flops", "50%",
                                      "--target-latency-ms", "1"),
        "latency below fixed cost": ("drn-train", "--arch", "resnet8", *common, "--target-latency-ms", "1e-6"),
        "latency above full": ("drn-train", "--arch", "resnet8", *common, "--target-latency-ms", "1e6"),
        "static k above the blocks": ("drn-train", "--arch", "resnet8", *common, "--routing", "firstk", "--k", "99"),
        "k without a static routing": ("drn-train", "--arch", "resnet8", *common, "--k", "2"),
        "unknown routing": ("drn-train", "--arch", "resnet8", *common, "--routing", "lastk", "--k", "2"),
        "eval threshold out of range": ("drn-eval", str(foreign), "--threshold", "1.5"),
        "epochs zero": ("drn-train", "--arch", "resnet8", *common[:-4], "--epochs", "0", "--out", out),
        "epochs not int": ("drn-train", "--epochs", "two", "--out", out),
        "unknown flag": ("drn-train", "--bogus", "--out", out),
        "resume nothing": ("drn-train", "--resume", "--out", out),
        "cuda without gpu" if not torch.cuda.is_available() else "cuda bad index":
            ("drn-train", "--arch", "resnet8", *common[:-2], "--device",
             "cuda" if not torch.cuda.is_available() else "cuda:99"),
        "val fraction zero": ("drn-train", "--arch", "resnet8", *common, "--val-fraction", "0"),
        "val fraction above half": ("drn-train", "--arch", "resnet8", *common, "--val-fraction", "0.6"),
        "init of another arch": ("drn-train", "--arch", "resnet8", *common, "--init", str(other_arch)),
        "init corrupt file": ("drn-train", "--arch", "resnet8", *common, "--init", str(corrupt)),
        "init missing file": ("drn-train", "--arch", "resnet8", *common, "--init", str(tmp / "none.pt")),
        "full routing with a target": ("drn-train", "--arch", "resnet8", *common, "--routing", "full",
                                       "--target-flops", "50%"),
        "warm-up negative": ("drn-train", "--arch", "resnet8", *common, "--warmup-epochs", "-1"),
        "mu floor above mu": ("drn-train", "--arch", "resnet8", *common, "--mu-min", "0.5"),
        "mu gain zero": ("drn-train", "--arch", "resnet8", *common, "--mu-ki", "0"),
        "mu kp negative": ("drn-train", "--arch", "resnet8", *common, "--mu-kp", "-1"),
        "mu max error zero": ("drn-train", "--arch", "resnet8", *common, "--mu-max-error", "0"),
        "mu scale negative": ("drn-train", "--arch", "resnet8", *common, "--mu-scale", "-0.1"),
        "unknown consistency routes": ("drn-train", "--arch", "resnet8", *common, "--consistency-routes", "hard"),
        "unknown view augment": ("drn-train", "--arch", "resnet8", *common, "--view-augment", "rotate"),
        "perturbed views of one view": ("drn-train", "--arch", "resnet8", *common, "--view-augment", "perturb",
                                        "--views", "1"),
        "unknown train routing": ("drn-train", "--arch", "resnet8", *common, "--train-routing", "hard"),
        "unknown finetune rates": ("drn-train", "--arch", "resnet8", *common, "--finetune-rates", "steer"),
        "rate weight negative": ("drn-train", "--arch", "resnet8", *common, "--rate-weight", "-1"),
        "rate weight not a number": ("drn-train", "--arch", "resnet8", *common, "--rate-weight", "x"),
        "unknown router start": ("drn-train", "--arch", "resnet8", *common, "--router-start", "half"),
        "rate band at one half": ("drn-train", "--arch", "resnet8", *common, "--rate-band", "0.5"),
        "unknown rate routes": ("drn-train", "--arch", "resnet8", *common, "--rate-routes", "hard"),
        "router norm with a value": ("drn-train", "--arch", "resnet8", *common, "--router-norm=yes"),
        "undecided pairs below 0": ("drn-train", "--arch", "resnet8", *common, "--undecided-pairs", "-1"),
        "undecided pairs from undecided": ("drn-train", "--arch", "resnet8", *common, "--undecided-pairs", "1", "--router-start", "undecided"),
        "distill without init": ("drn-train", "--arch", "resnet8", *common, "--distill", "1"),
        "distill from unknown": ("drn-train", "--arch", "resnet8", *common, "--distill", "1", "--distill-from", "self"),
        "distill from full without full pass": ("drn-train", "--arch", "resnet8", *common, "--distill", "1",
                                                "--distill-from", "full"),
        "distill negative": ("drn-train", "--arch", "resnet8", *common, "--distill", "-1"),
        "router lr unknown": ("drn-train", "--arch", "resnet8", *common, "--router-lr", "zero"),
        "eval routes png not a png": ("drn-eval", str(foreign), "--routes-png", str(tmp / "r.jpg")),
        "router open at 1": ("drn-train", "--arch", "resnet8", *common, "--router-open", "1"),
        "budget ramp above 1": ("drn-train", "--arch", "resnet8", *common, "--budget-ramp", "2"),
        "eval missing checkpoint": ("drn-eval", str(tmp / "none.pt")),
        "eval corrupt checkpoint": ("drn-eval", str(corrupt)),
        "eval truncated checkpoint": ("drn-eval", str(truncated)),
        "eval foreign checkpoint": ("drn-eval", str(foreign)),
    }



def search_cases(data: Path, tmp: Path) -> dict[str, tuple]:
    storage = str(tmp / "results")
    bad_key = tmp / "bad-key.yaml"
    bad_key.write_text("learning_rate: {type: float, low: 0.01, high: 0.1}\n")
    low_high = tmp / "low-high.yaml"
    low_high.write_text("d_c: {type: float, low: 0.5, high: 0.1}\n")
    not_yaml = tmp / "not-yaml.yaml"
    not_yaml.write_text("d_c: [0.1, 0.2\n")
    base = ("drn-search", "--target-flops", "50%", "--arch", "resnet8", "--dataset", "imagefolder",
            "--data-dir", str(data), "--epochs", "2", "--batch-size", "12", "--storage", storage, "--name", "b")
    import optuna                                   # another search's study "b", with a trial that ran
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    taken = f"sqlite:///{tmp / 'shared-optuna.db'}"
    optuna.create_study(study_name="b", storage=taken, direction="maximize").optimize(lambda t: 0.5, n_trials=1)
    return {
        "search: no trials": (*base, "--num-samples", "0"),
        "search: unknown space key": (*base, "--space", str(bad_key)),
        "search: space low >= high": (*base, "--space", str(low_high)),
        "search: space not YAML": (*base, "--space", str(not_yaml)),
        "search: missing space file": (*base, "--space", str(tmp / "missing.yaml")),
        "search: target above full": (*base, "--target-flops", "200%"),
        "search: target zero": (*base, "--target-flops", "0"),
        "search: flops and latency targets": (*base, "--target-latency-ms", "3"),
        "search: unknown arch": (*base, "--arch", "resnet7"),
        "search: unknown dataset": (*base, "--dataset", "mnist"),
        "search: missing data dir": (*base, "--data-dir", str(tmp / "nowhere")),
        "search: unreachable address": (*base, "--address", "127.0.0.1:1"),
        "search: malformed address": (*base, "--address", "host"),
        "search: GPU where Ray has none" if not torch.cuda.is_available() else "search: more GPUs than Ray has":
            (*base, "--gpus-per-trial", "1" if not torch.cuda.is_available() else "1000"),
        "search: unknown routing": (*base, "--routing", "bestk"),
        "search: tolerance out of range": (*base, "--tolerance", "2"),
        "search: val fraction out of range": (*base, "--val-fraction", "0.9"),
        "search: unreachable MLflow": (*base, "--mlflow-uri", "http://127.0.0.1:1"),
        "search: malformed MLflow URI": (*base, "--mlflow-uri", "bogus://x"),
        "search: backbone missing file": (*base, "--backbone", str(tmp / "none.pt")),
        "search: backbone of another arch": (*base, "--backbone", str(tmp / "resnet14-full.pt")),
        "search: backbone of another dataset": (*base, "--backbone", str(tmp / "resnet8-cifar10-full.pt")),
        "search: backbone corrupt file": (*base, "--backbone", str(tmp / "corrupt.pt")),
        "search: backbone epochs zero": (*base, "--backbone", "auto", "--backbone-epochs", "0"),
        "search: resume of an unknown name": ("drn-search", "--resume", "nope", "--storage", storage),
        "search: another setting with --resume": ("drn-search", "--resume", "nope", "--storage", storage,
                                                  "--epochs", "3"),
        "search: status of an unknown name": ("drn-search", "status", "nope", "--storage", storage),
        "search: status without a name": ("drn-search", "status"),
        "search: an RDB study of the name that ran trials": (*base, "--optuna-storage", taken),
        "search: a password in --optuna-storage sqlite": (*base, "--optuna-storage", "sqlite://u:pw-x@/o.db"),
        "search: --optuna-storage not a URL": (*base, "--optuna-storage", "optuna.db"),
        "search: --optuna-storage of an unknown database": (*base, "--optuna-storage", "mongodb://h/db"),
        "search: --optuna-storage without its driver": (*base, "--optuna-storage", "mysql://u@127.0.0.1/db"),
        "eval: model URI, no store given": ("drn-eval", "models:/some-model/1"),
        "eval: unknown MLflow model": ("drn-eval", "models:/no-such-model/1", "--mlflow-uri",
                                       f"sqlite:///{tmp / 'mlflow' / 'm.db'}"),
    }


def tree(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def run_case(prog: str, args: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    """drn-train and drn-eval in this process (their console scripts call exactly these functions;
    saves an interpreter and torch import per case); drn-search, which starts Ray, in its own."""
    from drn.cli import train_main
    from search.evaluate import main as eval_main
    entry = {"drn-train": train_main, "drn-eval": eval_main}.get(prog)
    if entry is None:
        proc = subprocess.run([*cli_command(prog), *args], capture_output=True, text=True, cwd=cwd, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    capsys.readouterr()
    try:
        rc = entry(list(args))
    except SystemExit as e:   # argparse's own exit
        rc = e.code
    finally:
        torch.set_grad_enabled(True)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_bad_input_is_one_line_exit_2_and_leaves_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    given, cwd = tmp_path / "given", tmp_path / "cwd"
    given.mkdir()
    cwd.mkdir()
    (given / "mlflow").mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = {**train_and_eval_cases(tiny_data, given), **search_cases(tiny_data, given)}
    assert len(cases) >= 40
    before = tree(given)
    failures = []

    def check(name, rc, out, err):
        lines = err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or "Traceback" in err or out.strip():
            failures.append(f"{name}: rc={rc} stdout={out[-200:]!r} stderr={err[-400:]!r}")

    for name, (prog, *args) in cases.items():       # in this process, one at a time
        if prog == "drn-search":
            continue
        check(name, *run_case(prog, args, cwd, capsys))
        left = (tree(given) - before) | tree(cwd)
        if left:
            failures.append(f"{name}: left {sorted(left)[:5]}")
    # drn-search starts its own interpreter (and Ray): those run side by side, then what they left is read
    search = {name: args for name, (prog, *args) in cases.items() if prog == "drn-search"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(search, pool.map(lambda args: run_case("drn-search", args, cwd, capsys), search.values())))
    for name, result in done.items():
        check(name, *result)
    left = (tree(given) - before) | tree(cwd)
    if left:
        failures.append(f"the drn-search cases left {sorted(left)[:5]}")
    assert not failures, "\n".join(failures)
