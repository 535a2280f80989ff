"""The console scripts as a user runs them: outputs, and every bad input -> one line, exit 2."""
import json

import pytest
import torch

from conftest import run_cli


def _train_args(data, out, *extra):
    return ("drn-train", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", str(data),
            "--out", str(out), "--epochs", "1", "--batch-size", "12", "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli(*_train_args(tiny_data, out, "--json", "--target-flops", "70%"))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_prints_progress_and_ends_with_json(trained):
    out, proc = trained
    assert "epoch 1/1" in proc.stderr and "mu" in proc.stderr and "K " in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "flops", "flops_full", "k", "k_full", "distinct_paths"):
        assert key in result
    assert result["k_full"] == 3 and (out / "checkpoint.pt").is_file()


def test_eval_reproduces_training_metrics(trained, tiny_data):
    out, proc = trained
    trained_metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    ev = run_cli("drn-eval", str(out / "checkpoint.pt"), "--json", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    m = json.loads(ev.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "flops", "flops_full", "k", "k_full", "distinct_paths", "same_path_ratio",
                "images_per_s", "block_exec_rate"):
        assert key in m, key
    assert m["accuracy"] == trained_metrics["accuracy"] and m["flops"] == trained_metrics["flops"]
    assert 0 <= m["same_path_ratio"] <= 1 and m["images_per_s"] > 0
    human = run_cli("drn-eval", str(out / "checkpoint.pt"), "--device", "cpu", "--split", "train")
    assert human.returncode == 0 and "accuracy" in human.stdout


def test_cost_only_resnet110():
    proc = run_cli("drn-train", "--arch", "resnet110", "--dataset", "cifar10", "--cost-only", "--json")
    assert proc.returncode == 0, proc.stderr
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cost["flops_full"] == pytest.approx(5.06e8, rel=0.005)
    assert len(cost["flops_blocks"]) == cost["num_blocks"] == 54


def test_help_names_every_flag_with_its_default():
    proc = run_cli("drn-train", "--help")
    assert proc.returncode == 0
    for flag in ("--target-flops", "--finetune-epochs", "--resume", "--cost-only", "--views", "--d-c"):
        assert flag in proc.stdout
    assert "(default: 0.05)" in proc.stdout  # mu


def _bad_inputs(data, tmp):
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
        "eval threshold out of range": ("drn-eval", str(foreign), "--threshold", "1.5"),
        "epochs zero": ("drn-train", "--arch", "resnet8", *common[:-4], "--epochs", "0", "--out", out),
        "epochs not int": ("drn-train", "--epochs", "two", "--out", out),
        "unknown flag": ("drn-train", "--bogus", "--out", out),
        "resume nothing": ("drn-train", "--resume", "--out", out),
        "cuda without gpu" if not torch.cuda.is_available() else "cuda bad index":
            ("drn-train", "--arch", "resnet8", *common[:-2], "--device",
             "cuda" if not torch.cuda.is_available() else "cuda:99"),
        "eval missing checkpoint": ("drn-eval", str(tmp / "none.pt")),
        "eval corrupt checkpoint": ("drn-eval", str(corrupt)),
        "eval truncated checkpoint": ("drn-eval", str(truncated)),
        "eval foreign checkpoint": ("drn-eval", str(foreign)),
    }


def test_every_bad_input_is_one_line_exit_2_nothing_written(tiny_data, tmp_path):
    cases = _bad_inputs(tiny_data, tmp_path)
    failures = []
    for name, args in cases.items():
        proc = run_cli(*args)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or "Traceback" in proc.stderr or proc.stdout.strip():
            failures.append(f"{name}: rc={proc.returncode} stderr={proc.stderr[-300:]!r}")
        if (tmp_path / "out").exists():
            failures.append(f"{name}: wrote {tmp_path / 'out'}")
    assert not failures, "\n".join(failures)


def test_existing_run_is_not_overwritten(trained, tiny_data):
    out, _ = trained
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli(*_train_args(tiny_data, out))
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def test_eval_rejects_data_of_another_shape(trained, tmp_path):
    import numpy as np
    from PIL import Image
    other = tmp_path / "other"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (other / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(other / split / c / "0.png")
    out, _ = trained
    proc = run_cli("drn-eval", str(out / "checkpoint.pt"), "--data-dir", str(other))
    assert proc.returncode == 2 and "classes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
