"""The console scripts as a user runs them: outputs, and every bad input -> one line, exit 2."""
import json
import os
import re
import subprocess

import pytest

from conftest import cli_command, run_cli


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
    # with a target, 2 finetune epochs follow the main one by default
    assert "epoch 1/3" in proc.stderr and "epoch 3/3 finetune" in proc.stderr and "mu" in proc.stderr and "K " in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "flops", "flops_full", "k", "k_full", "distinct_paths", "path_entropy",
                "effective_paths", "dynamic_share", "test_distinct_paths", "test_effective_paths", "test_dynamic_share"):
        assert key in result
    assert result["k_full"] == 3 and (out / "checkpoint.pt").is_file()


def test_eval_reproduces_training_metrics(trained, tiny_data):
    out, proc = trained
    trained_metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    ev = run_cli("drn-eval", str(out / "checkpoint.pt"), "--json", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    m = json.loads(ev.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "flops", "flops_full", "k", "k_full", "distinct_paths", "same_path_ratio",
                "images_per_s", "block_exec_rate", "path_entropy", "effective_paths", "dynamic_share"):
        assert key in m, key
    assert m["effective_paths"] == trained_metrics["test_effective_paths"]
    assert m["dynamic_share"] == trained_metrics["test_dynamic_share"]
    # the default split is test; --split val is the run's own carve, read back from the checkpoint
    assert m["split"] == "test" and m["images"] == trained_metrics["test_images"]
    assert m["accuracy"] == trained_metrics["test_accuracy"] and m["flops"] == trained_metrics["test_flops"]
    val = json.loads(run_cli("drn-eval", str(out / "checkpoint.pt"), "--json", "--device", "cpu", "--split",
                             "val").stdout.strip().splitlines()[-1])
    assert val["accuracy"] == trained_metrics["val_accuracy"] and val["flops"] == trained_metrics["val_flops"]
    assert 0 <= m["same_path_ratio"] <= 1 and m["images_per_s"] > 0
    human = run_cli("drn-eval", str(out / "checkpoint.pt"), "--device", "cpu", "--split", "train")
    assert human.returncode == 0 and "accuracy" in human.stdout


def test_cost_only_resnet110():
    proc = run_cli("drn-train", "--arch", "resnet110", "--dataset", "cifar10", "--cost-only", "--json")
    assert proc.returncode == 0, proc.stderr
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cost["flops_full"] == pytest.approx(5.06e8, rel=0.005)
    assert len(cost["flops_blocks"]) == cost["num_blocks"] == 54


def test_help_groups_every_flag_with_its_default_in_a_screenful(monkeypatch):
    """drn-train --help on an 80-column terminal: at most 120 lines, the flags under their purpose,
    each with its default; enums are refused by argparse with one line."""
    monkeypatch.setenv("COLUMNS", "80")
    from drn.cli import TRAIN_FLAGS
    proc = subprocess.run([*cli_command("drn-train"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(lines) <= 120 and max(map(len, lines)) <= 80
    assert [t for t in TRAIN_FLAGS if f"{t}:" not in lines] == []
    helps, flag = {}, None   # each flag's help, from its line to the next flag or heading
    for line in lines:
        m = re.match(r"  (--[a-z-]+)", line)
        flag = m.group(1) if m else None if not line.startswith("   ") else flag
        if flag:
            helps[flag] = helps.get(flag, "") + " " + (line[m.end():] if m else line).strip()
    for flags in TRAIN_FLAGS.values():
        for flag in flags:
            assert re.search(r"\([^()]+\)$", helps[flag]), flag   # ends with its default
    text = " ".join(proc.stdout.split())
    assert "--mu X weight of Eq. 8; with a target, the loop's start (0.05; 1 from --init)" in text
    assert "--resume" in text and "--cost-only" in text and "--no-calibrate" in text
    bad = run_cli("drn-train", "--router-lr", "zero")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "constant" in bad.stderr


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


def test_drn_imports_nothing_of_the_search_stack():
    """drn/ is the model and its trainer: no search/, Ray, Optuna or MLflow import anywhere in it
    (drn-eval's MLflow URIs are resolved in search.evaluate)."""
    import ast
    from pathlib import Path
    import drn
    banned = ("search", "ray", "optuna", "mlflow")
    for path in Path(drn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_eval_draws_the_routes_png(trained, tmp_path):
    import matplotlib.image
    out, _ = trained
    png = tmp_path / "routes.png"
    ev = run_cli("drn-eval", str(out / "checkpoint.pt"), "--json", "--device", "cpu", "--routes-png", str(png))
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["routes_png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(png).shape
    assert h > 200 and w > 600
    assert [p.name for p in tmp_path.iterdir()] == ["routes.png"]   # no temporary file left


@pytest.mark.parametrize("name, why", [("routes.jpg", "must end in .png"), ("missing/routes.png", "does not exist")])
def test_eval_routes_png_bad_path_is_one_line_and_writes_nothing(trained, tmp_path, name, why):
    out, _ = trained
    ev = run_cli("drn-eval", str(out / "checkpoint.pt"), "--device", "cpu", "--routes-png", str(tmp_path / name))
    assert ev.returncode == 2 and why in ev.stderr and len(ev.stderr.strip().splitlines()) == 1
    assert "Traceback" not in ev.stderr and list(tmp_path.iterdir()) == []


def test_search_version_and_status_help():
    from importlib.metadata import version
    proc = run_cli("drn-search", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"drn-search {version('drn-search')}"
    usage = run_cli("drn-search", "status", "--help")
    assert usage.returncode == 0 and "drn-search status" in usage.stdout and "--json" in usage.stdout
