"""The training step without host syncs (docs/notes/2026-12-03-gpu-speed-cpu-parts.md, "What was built: a
training step without host syncs, a static-shape hard forward"): compiled = eager to float rounding, the
budget loop's batched readings, channels_last, the flags."""
import copy
import math

import pytest
import torch

from drn.cli import train_main
from drn.cost import measure_cost_table
from drn.losses import LossWeights, diversity_loss
from drn.models import build_model
from drn.step import PARTS, CompiledStep, set_lr, train_step
from drn.train import Trainer

from test_train import tiny_cfg

# fp32 on CPU: inductor fuses and reorders the same float ops, so values agree to rounding
RTOL, ATOL = 1e-4, 1e-5


def test_the_compiled_step_is_the_eager_step_to_float_rounding():
    """Three main-epoch steps (straight-through routing, 2 views, the full Eq. 9, SGD with momentum),
    mu and the lr changing between steps (no recompile: they are tensors). Each step starts both
    sides from the same weights and momenta: the compiled step gives the eager step's views and gates
    exactly, and its loss, parts, logits, r and the updated weights within RTOL / ATOL. (Over several
    steps rounding differences grow ~10x per step on this 16-image batch, as between any two
    summation orders: the comparison is per step.)"""
    torch.manual_seed(0)
    base = build_model("resnet8").train()
    cost_norm = measure_cost_table(base).normalized()
    w = LossWeights(0.2, 0.2, 0.5, 0.2, 0.5)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    eager_opt, compiled_opt = sgd(eager_model), sgd(compiled_model)
    compiled = CompiledStep(compiled_model, compiled_opt, weights=w, routing="straight")
    gen_e, gen_c = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for mu, lr in ((0.05, 0.1), (0.8, 0.05), (-0.3, 0.02)):
        x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (8,))
        for opt in (eager_opt, compiled_opt):
            for g in opt.param_groups:
                set_lr(g, lr)
        l_e, p_e, o_e, y_e = train_step(eager_model, eager_opt, x, y, gen_e, views=2, finetune=False,
                                        cost_norm=cost_norm, mu=mu, weights=w, routing="straight")
        l_c, p_c, o_c, y_c = compiled(x, y, gen_c, views=2, cost_norm=cost_norm, mu=mu)
        assert torch.equal(y_e, y_c) and torch.equal(o_e.gates, o_c.gates)
        assert p_e.shape == (len(PARTS),) and torch.isfinite(l_c)
        for a, b in ((l_e, l_c), (p_e, p_c), (o_e.logits, o_c.logits), (o_e.r, o_c.r)):
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        for (k, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=k)
        # the next step from the same state (in place: the compiled graphs keep their tensors)
        compiled_model.load_state_dict(eager_model.state_dict())
        for p_e_, p_c_ in zip(eager_model.parameters(), compiled_model.parameters()):
            if p_e_ in eager_opt.state:
                compiled_opt.state[p_c_]["momentum_buffer"].copy_(eager_opt.state[p_e_]["momentum_buffer"])
    moved = sum(not torch.equal(a, b) for a, b in zip(eager_model.state_dict().values(), base.state_dict().values()))
    assert moved > 10   # the steps trained


def test_a_compiled_training_run_matches_the_eager_run(tiny_data, tmp_path):
    """drn-train's --compile: one main epoch and one finetune epoch (eager) with a target, the same
    per-epoch metrics as without it, to rounding; the checkpoint resumes without it."""
    kw = dict(epochs=1, finetune_epochs=1, target_flops="60%")
    eager = Trainer(tiny_cfg(tiny_data, tmp_path / "e", **kw), log=lambda s: None)
    eager.run()
    comp = Trainer(tiny_cfg(tiny_data, tmp_path / "c", compile="inductor", **kw), log=lambda s: None)
    comp.run()
    assert comp.compiled is not None and eager.compiled is None
    for a, b in zip(eager.history, comp.history):
        for k in ("loss", "loss_cls", "loss_cost", "train_accuracy", "mu", "accuracy"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), k
        assert b["flops"] == a["flops"]
    rates = torch.tensor(comp.calibration["val"]["block_exec_rate"])   # the static-shape forward's capacities
    torch.testing.assert_close(comp.model.capacity, (1.25 * rates).clamp(max=1))
    again = Trainer(tiny_cfg(tiny_data, tmp_path / "c", **kw), resume=True, log=lambda s: None)
    assert all(isinstance(g["lr"], float) for g in again.optimizer.param_groups)


@pytest.mark.parametrize("every", [1, 5])
def test_the_budget_loop_reads_every_batch_in_order_however_often_it_syncs(tiny_data, tmp_path, monkeypatch, every):
    """--controller-every N: the loop gets one reading per training batch, in the batches' order, in
    bursts of N (one host read per burst; the epoch's rest at its end), and mu moves."""
    t = Trainer(tiny_cfg(tiny_data, tmp_path / "r", epochs=2, target_flops="50%", controller_every=every),
                log=lambda s: None)
    calls, burst, update, mu0 = [], [], t.controller.update, t.controller.mu
    monkeypatch.setattr(t, "_steer", lambda pending: (burst.append(len(pending)), Trainer._steer(t, pending)))
    monkeypatch.setattr(t.controller, "update", lambda c: (calls.append(c), update(c))[1])
    t.train_epoch(finetune=False)
    steps = t.train_split.labels.shape[0] // 12
    assert len(calls) == steps == t.controller.steps and t.controller.mu != mu0
    assert [b for b in burst if b] == [every] * (steps // every) + ([steps % every] if steps % every else [])
    assert all(c > 0 for c in calls)


def test_channels_last_trains_the_same_step():
    """channels_last changes the layout of the activations, not the step: one step from the same
    weights gives the same loss and gradients (to rounding)."""
    torch.manual_seed(1)
    base = build_model("resnet8").train()
    cost_norm = measure_cost_table(base).normalized()
    x, y = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (6,))
    res = []
    for cl in (False, True):
        m = copy.deepcopy(base)
        if cl:
            m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss, *_ = train_step(m, opt, x, y, torch.Generator().manual_seed(0), views=2, finetune=False,
                              cost_norm=cost_norm, mu=0.1, weights=LossWeights(), channels_last=cl)
        res.append((loss, [p.detach().clone() for p in m.parameters()]))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=RTOL, atol=ATOL)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_the_diversity_loss_without_a_mask_index_is_eq6():
    """Eq. 6 over ordered pairs i != j, by a product with the off-diagonal (no boolean index, which
    reads the mask's size back to the host): equal to the explicit double sum, gradient finite at 0."""
    torch.manual_seed(2)
    routes = torch.rand(5, 2, 4, requires_grad=True)
    c = routes.mean(1)
    explicit = sum(torch.relu(0.5 - torch.linalg.vector_norm(c[i] - c[j])) ** 2
                   for i in range(5) for j in range(5) if i != j) / 20
    got = diversity_loss(routes, 0.5)
    torch.testing.assert_close(got, explicit)
    same = torch.zeros(3, 2, 4, requires_grad=True)     # every distance 0
    diversity_loss(same, 0.5).backward()
    assert torch.isfinite(same.grad).all()


@pytest.mark.parametrize("args,msg", [(["--controller-every", "0"], "controller every must be in [1, 1000]"),
                                      (["--channels-last", "yes"], "--channels-last: invalid choice: 'yes'"),
                                      (["--compile", "yes"], "--compile: invalid choice: 'yes'"),
                                      (["--compile", "cudagraphs", "--device", "cpu"], "compile cudagraphs needs a CUDA")])
def test_bad_step_flags_are_one_line_and_exit_2(tmp_path, capsys, args, msg):
    try:
        rc = train_main(["--arch", "resnet8", "--dataset", "synthetic", "--out", str(tmp_path / "x"), *args])
    except SystemExit as e:   # argparse's own refusal of a choice, as the console script exits
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_search_passes_compile_to_its_trials_and_refuses_cudagraphs_without_gpus():
    from drn.config import UsageError
    from search.tuner import resources
    from search.config import SearchConfig
    cfg = SearchConfig.from_flags({"target_flops": ["50%"], "arch": "resnet8", "dataset": "synthetic",
                                   "compile": "cudagraphs"})
    assert cfg.train_config("50%", device="cuda").compile == "cudagraphs"
    assert resources(cfg, {"CPU": 4.0, "GPU": 1.0}) == (4.0, 1.0)
    with pytest.raises(UsageError, match="--compile cudagraphs needs GPUs"):
        resources(cfg, {"CPU": 4.0})


def test_a_step_that_does_not_compile_here_runs_eager_with_one_log_line(tiny_data, tmp_path, monkeypatch):
    """torch.compile failing on this machine (no C++ compiler, an unsupported op): one log line, and
    the run trains on eagerly instead of crashing (a trial's retry would crash again)."""
    from torch._dynamo.exc import BackendCompilerFailed
    import drn.step

    def broken(fn, **kw):
        def call(*a, **k):
            raise BackendCompilerFailed(lambda: None, RuntimeError("InvalidCxxCompiler: no working C++ compiler"), None)
        return call
    monkeypatch.setattr(drn.step.torch, "compile", broken)
    logs = []
    t = Trainer(tiny_cfg(tiny_data, tmp_path / "b", epochs=1, finetune_epochs=0, compile="inductor",
                         target_flops="60%"), log=logs.append)
    t.run()
    failed = [line for line in logs if "--compile inductor failed here" in line]
    assert len(failed) == 1 and "no working C++ compiler" in failed[0] and "run eager" in failed[0]
    assert t.compiled is None and t.compile_failed and t.epoch == t.cfg.total_epochs
    assert all(math.isfinite(h["loss"]) for h in t.history)


def test_inplace_distillation_adds_the_full_pass_teaching_the_routed_first_views():
    """--distill-from full: main_loss adds inplace * distill_loss(routed logits of each image's first
    view, the full pass's logits on it, detached) to what --full-pass alone gives; the full pass gets
    no gradient from it."""
    from drn.losses import distill_loss
    from drn.step import frozen_bn_stats, main_loss
    torch.manual_seed(0)
    model = build_model("resnet8").train()
    cost_norm = measure_cost_table(model).normalized()
    w = LossWeights(0.2, 0.2, 0.5, 0.2, 0.5)
    xs, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (4,))
    kw = dict(routing="straight", full_pass=1.0)
    base, _, out, _ = main_loss(model, xs, labels, 2, cost_norm, 0.1, w, **kw)
    taught, _, _, _ = main_loss(model, xs, labels, 2, cost_norm, 0.1, w, inplace=0.5, **kw)
    with frozen_bn_stats(model), torch.no_grad():
        full = model(xs[::2], routing="mask", gates=torch.ones(4, model.num_blocks, dtype=torch.bool)).logits
    expected = base + 0.5 * distill_loss(out.logits[::2], full)
    torch.testing.assert_close(taught, expected, rtol=RTOL, atol=ATOL)
    assert (taught - base).item() > 0
