"""Real CIFAR-10 images (DRN_DATA_DIR, CI: ../shared/data/cifar10-5k): a routed ResNet-20 learns."""
import json

from conftest import run_cli


def test_resnet20_learns_real_images_with_hard_routing(real_data, tmp_path):
    out = tmp_path / "r20"
    proc = run_cli("drn-train", "--arch", "resnet20", "--dataset", "imagefolder", "--data-dir", str(real_data),
                   "--epochs", "3", "--out", str(out), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("epoch ") == 3
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    # 10 classes: chance is 10 %. Three epochs on 3661 images reach ~27-35 % (hard routing, on the
    # 407 val images carved from train/ and on the 1017 held-out test images of val/)
    assert m["accuracy"] > 0.22 and m["test_accuracy"] > 0.22, m
    assert m["flops"] < m["flops_full"] and m["k"] <= 9
    ev = run_cli("drn-eval", str(out / "checkpoint.pt"), "--json", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    e = json.loads(ev.stdout.strip().splitlines()[-1])
    assert e["accuracy"] == m["test_accuracy"] and e["images"] == 1017 == m["test_images"]   # drn-eval: test


def test_normalised_routers_route_real_images_per_image_and_land_the_budget(real_data, tmp_path):
    """--router-norm from undecided routers (BENCHMARKS.md, "Routes that depend on the image"): the
    routes depend on the image on the held-out split, and the budget is landed with the threshold
    inside its trim window."""
    out = tmp_path / "r14"
    proc = run_cli("drn-train", "--arch", "resnet14", "--dataset", "imagefolder", "--data-dir", str(real_data),
                   "--epochs", "3", "--finetune-epochs", "1", "--batch-size", "64", "--target-flops", "50%",
                   "--router-norm", "--router-start", "undecided", "--out", str(out), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["test_effective_paths"] >= 4 and m["test_dynamic_share"] >= 0.3, m
    assert abs(m["flops"] / m["target"] - 1) <= 0.02 and 0.4 <= m["threshold"] <= 0.6, m
    assert m["accuracy"] > 0.2   # chance: 10 %


def test_the_readmes_python_snippet_runs_as_written(real_data, tmp_path, monkeypatch):
    """The README's Python section, run as a reader would paste it (one epoch instead of five, the data
    folder DRN_DATA_DIR names, `images_0_to_1` a batch of real val images)."""
    import re
    from pathlib import Path

    import torch

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Python\s+```python\n(.*?)```", readme, re.S).group(1)
    assert 'data_dir="../shared/data/cifar10-5k"' in code and "epochs=5" in code
    code = code.replace('"../shared/data/cifar10-5k"', repr(str(real_data))).replace("epochs=5", "epochs=1")
    monkeypatch.chdir(tmp_path)
    from drn.data import load_dataset
    scope = {"images_0_to_1": load_dataset("imagefolder", real_data).val.images[:8].float() / 255}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["gates"].shape == (8, 9) and scope["gates"].dtype == torch.bool
    assert scope["logits"].shape == (8, 10) and torch.isfinite(scope["logits"]).all()
    assert 0 < scope["final"]["accuracy"] <= 1
