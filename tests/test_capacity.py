"""routing="capacity" (drn/models.py): the static-shape hard forward. Block b runs on exactly
k_b = ceil(capacity_b * B) images, the top k_b of its router's r; with room for every route it
computes what routing="hard" does (gates exactly, logits and r within float32's default
assert_close, rtol 1.3e-6 / atol 1e-5: the gathered batches differ, so conv kernels may sum in
another order), with less room it drops the lowest-r images to the shortcut; torch.compile
captures it whole. Evaluation reports the FLOPs it spends; drn-eval --hard-forward capacity."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from drn.cost import measure_cost_table
from drn.data import Split
from drn.evaluate import capacity_from_rates, evaluate, val_capacity
from drn.models import build_model
from test_bad_input import run_case


def routed(arch: str, batch: int, seed: int = 0, size: int = 32, classes: int = 10):
    """An eval-mode model whose every router sends half of the batch x through its block."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, size)
    x = torch.rand(batch, 3, size, size)
    for m in model.modules():   # BN statistics of x, so activations stay O(1)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(x, routing="mask")
        model.eval()
        for b in model.blocks:
            nn.init.normal_(b.router.fc2.weight, std=3.0)
        for b in model.blocks:   # one at a time: a router's input depends on the routes before it
            seen = []
            hook = b.router.register_forward_hook(lambda m, a, out: seen.append(out))
            model(x, routing="hard")
            hook.remove()
            d = (seen[0][:, 0] - seen[0][:, 1]).sort().values
            b.router.shift_(-(d[batch // 2 - 1] + d[batch // 2]) / 2)   # the median gap between two images
    return model, x


@pytest.mark.parametrize("arch,size", [("resnet20", 32), ("resnet50", 64)])
def test_capacity_with_room_for_every_route_computes_the_hard_forward(arch, size):
    model, x = routed(arch, 8, size=size)
    with torch.inference_mode():
        hard = model(x, routing="hard")
    share = hard.gates.float().mean(0)
    assert ((share > 0) & (share < 1)).all(), "every block should run on a strict subset"
    # 1: the whole batch (the default: where, no gather); the exact shares (no padding); 1.5 x (padding)
    for capacity in (torch.ones_like(share), share, capacity_from_rates(share, 1.5)):
        model.set_capacity(capacity)
        assert all(k >= n for k, n in zip(model.capacity_k(8), hard.gates.sum(0).tolist()))   # room for every route
        for grad in (False, True):   # inference (in place, pooled features carried) and autograd
            with torch.set_grad_enabled(grad):
                h, c = model(x, routing="hard"), model(x, routing="capacity")
            assert torch.equal(c.gates, h.gates)
            torch.testing.assert_close(c.r, h.r)
            torch.testing.assert_close(c.logits, h.logits)


def test_small_capacity_runs_exactly_k_images_and_drops_the_lowest_r_to_the_shortcut():
    model, x = routed("resnet20", 8, seed=1)
    capacity = [0.75] + [0.25] * 8   # block 0: 6 slots for 4 routed images (2 padding); the others 2 for 4
    model.set_capacity(capacity)
    ks = model.capacity_k(8)
    assert ks == [6] + [2] * 8
    ran = []
    hooks = [b.residual.register_forward_pre_hook(lambda m, a: ran.append(a[0].shape[0])) for b in model.blocks]
    with torch.inference_mode():
        out = model(x, routing="capacity")
    for h in hooks:
        h.remove()
    assert ran == ks   # every block ran on exactly k_b images, padding included
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.r).all()
    wanted = out.r >= model.threshold
    assert not (out.gates & ~wanted).any(), "a block ran on an image its router skipped"
    assert (out.gates.sum(0) == torch.minimum(wanted.sum(0), torch.tensor(ks))).all()
    dropped = wanted & ~out.gates
    assert dropped.any()
    for b in range(model.num_blocks):   # the images a block ran on are the routed ones of highest r
        if dropped[:, b].any():
            assert out.r[out.gates[:, b], b].min() >= out.r[dropped[:, b], b].max()
    # padded and dropped images took the shortcut: the gather forward of the gates that ran agrees
    with torch.inference_mode():
        same = model(x, routing="hard", gates=out.gates)
    torch.testing.assert_close(out.logits, same.logits)
    torch.testing.assert_close(out.r, same.r)
    # forced gates: the forced images are the routed ones, ordered by r
    forced = torch.zeros_like(out.gates)
    forced[:5, 3] = True
    with torch.inference_mode():
        f = model(x, routing="capacity", gates=forced)
    assert f.gates[:, 3].sum() == 2 and not (f.gates & ~forced).any()


def test_zero_capacity_skips_the_block_and_bad_capacities_are_rejected():
    model, x = routed("resnet8", 4)
    model.set_capacity([0.0, 1.0, 0.5])
    with torch.inference_mode():
        out = model(x, routing="capacity")
        skip = model(x, routing="hard", gates=torch.stack([torch.zeros(4, dtype=torch.bool), out.gates[:, 1],
                                                           out.gates[:, 2]], 1))
    assert not out.gates[:, 0].any()
    torch.testing.assert_close(out.logits, skip.logits)
    for bad in ([0.5, 0.5], [0.5, 1.5, 0.5], [-0.1, 0.5, 0.5], [float("nan")] * 3):
        with pytest.raises(ValueError):
            model.set_capacity(bad)
    with pytest.raises(ValueError):
        capacity_from_rates([0.5] * 3, 0.0)


def test_capacities_travel_in_the_state_dict_and_old_ones_without_them_load():
    from drn.checkpoint import model_from_checkpoint
    from drn.config import TrainConfig
    model, x = routed("resnet8", 4)
    model.set_capacity([0.5, 0.25, 1.0])
    again = build_model("resnet8")
    again.load_state_dict(model.state_dict())   # each router holds its block's capacity
    assert again.capacity.tolist() == [0.5, 0.25, 1.0] and again.capacity_k(8) == [4, 2, 8]
    assert model.state_dict()["blocks.1.router.capacity"].item() == 0.25
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(".capacity")}   # a checkpoint from before
    ckpt = {"config": TrainConfig(arch="resnet8").to_dict(), "num_classes": 10, "input_size": 32, "model": old}
    loaded = model_from_checkpoint(ckpt)[0].eval()
    assert loaded.capacity.tolist() == [1.0] * 3 and loaded.capacity_k(8) == [8] * 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in old.items())
    with torch.inference_mode():   # capacity 1: every block on the whole batch, the hard forward's outputs
        torch.testing.assert_close(loaded(x, routing="capacity").logits, loaded(x, routing="hard").logits)


def test_torch_compile_captures_the_capacity_forward_whole_and_matches_eager():
    """fullgraph=True: one graph, so no data-dependent shape and no host sync in it. Tolerance:
    float32's default assert_close (rtol 1.3e-6, atol 1e-5); the gates exactly."""
    model, x = routed("resnet8", 8)
    model.set_capacity([1.0, 0.5, 0.25])   # the whole batch, a gather with padding, one with drops
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        eager = model(x, routing="capacity")
        got = compiled(x, routing="capacity")
    assert (eager.gates != (eager.r >= 0.5)).any(), "the capacities should drop some images"
    assert torch.equal(got.gates, eager.gates)
    torch.testing.assert_close(got.r, eager.r)
    torch.testing.assert_close(got.logits, eager.logits)


def test_evaluate_reports_the_flops_the_capacity_spends_as_the_flop_counter_counts_them():
    model, x = routed("resnet20", 16, seed=2)
    cost = measure_cost_table(model)
    images = (x * 255).round().to(torch.uint8)
    split = Split(images, torch.arange(16) % 10)
    gather = evaluate(model, split, cost, batch_size=16)
    assert val_capacity(model, split, 10.0, batch_size=16).tolist() == [min(1.0, 10 * r) for r in gather["block_exec_rate"]]
    roomy = evaluate(model, split, cost, batch_size=16, routing="capacity")
    assert roomy["accuracy"] == gather["accuracy"] and roomy["flops"] == gather["flops"] and roomy["dropped"] == 0
    val_capacity(model, split, 0.75, batch_size=16)
    m = evaluate(model, split, cost, batch_size=6, routing="capacity")   # batches of 6, 6 and 4
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        for s in range(0, 16, 6):
            model(images[s:s + 6].float() / 255, routing="capacity")
    assert m["flops_spent"] == pytest.approx(counter.get_total_flops() / 16, rel=1e-9)
    assert m["flops"] <= m["flops_wanted"] and m["flops"] <= m["flops_spent"]
    assert 0 < m["dropped"] < 1 and 0 < m["images_dropped"] <= 1 and len(m["block_dropped_rate"]) == 9


def _eval(argv, capsys) -> tuple[int, str, str]:
    """drn-eval in this process, as test_bad_input runs it."""
    return run_case("drn-eval", argv, Path.cwd(), capsys)


def test_drn_eval_hard_forward_capacity_and_its_bad_values(tiny_data, tmp_path, capsys):
    from drn.checkpoint import save_checkpoint
    from drn.config import TrainConfig
    from drn.data import load_dataset
    cfg = TrainConfig(arch="resnet8", dataset="imagefolder", data_dir=str(tiny_data), out=str(tmp_path))
    data = load_dataset("imagefolder", str(tiny_data), cfg.val_fraction, cfg.val_seed)
    model, _ = routed("resnet8", 8, classes=3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "epoch": 1, "num_classes": 3, "input_size": 32,
                           "model": model.state_dict(), "val_index": list(data.val_index), "history": []})
    common = [str(path), "--device", "cpu", "--json", "--batch-size", "8"]
    # on val itself, whose routes set the capacities, a factor of 100 leaves room for every route
    rc, out, err = _eval(common + ["--split", "val"], capsys)
    assert rc == 0, err
    gather = json.loads(out.splitlines()[-1])
    rc, out, err = _eval(common + ["--split", "val", "--hard-forward", "capacity", "--capacity-factor", "100"], capsys)
    assert rc == 0, err
    roomy = json.loads(out.splitlines()[-1])
    assert roomy["hard_forward"] == "capacity" and roomy["capacity_factor"] == 100
    assert roomy["accuracy"] == gather["accuracy"] and roomy["flops"] == gather["flops"] and roomy["dropped"] == 0
    rc, out, err = _eval(common + ["--hard-forward", "capacity"], capsys)   # the default factor, 1.25
    assert rc == 0, err
    m = json.loads(out.splitlines()[-1])
    assert m["capacity_factor"] == 1.25 and m["flops"] <= m["flops_spent"] <= m["flops_full"]
    for key in ("flops_wanted", "dropped", "images_dropped", "block_dropped_rate", "capacity"):
        assert key in m
    rc, out, _ = _eval([str(path), "--device", "cpu", "--hard-forward", "capacity"], capsys)
    keys = [line.split()[0] for line in out.splitlines()]
    assert rc == 0 and "flops_spent" in keys and "capacity" not in keys   # lists are for --json
    for bad in (["--hard-forward", "scatter"], ["--capacity-factor", "0", "--hard-forward", "capacity"],
                ["--capacity-factor", "nan", "--hard-forward", "capacity"], ["--capacity-factor", "x"],
                ["--capacity-factor", "1.5"], ["--hard-forward", "capacity", "--routing", "sample"],
                ["--hard-forward", "capacity", "--sweep-threshold"]):
        rc, out, err = _eval([str(path), "--device", "cpu"] + bad, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and not out and "Traceback" not in err, (bad, err)
