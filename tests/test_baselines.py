"""The static routes of the paper's heuristic baselines (Table 4a)."""
import pytest
import torch

from drn.baselines import STATIC, k_for_budget, static_route


def test_firstk_and_distributedk_pick_the_blocks_the_paper_describes():
    stages = (3, 3, 3)
    assert static_route("firstk", stages, 4).tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    # K/S per stage, the remainder to the deepest stages, evenly spaced inside each stage
    assert static_route("distributedk", stages, 3).tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert static_route("distributedk", stages, 5).tolist() == [1, 0, 0, 1, 0, 1, 1, 0, 1]
    assert static_route("distributedk", stages, 9).all()


def test_deepk_keeps_the_transitions_then_fills_from_the_deepest_stage():
    on = lambda stages, k: static_route("deepk", stages, k).nonzero().flatten().tolist()
    assert on((3, 3, 3), 2) == [3, 6]                      # the downsampling blocks first
    assert on((3, 3, 3), 3) == [3, 6, 8]                   # then the last stage, from its end
    assert on((3, 3, 3), 5) == [3, 5, 6, 7, 8]
    assert on((3, 3, 3), 7) == [2, 3, 4, 5, 6, 7, 8]       # the first stage last
    assert on((2, 2, 2), 1) == [2]
    # nested: every k's route holds the one before (the start rule steps along this order)
    routes = [static_route("deepk", (9, 9, 9), k) for k in range(1, 28)]
    assert all((a <= b).all() for a, b in zip(routes, routes[1:]))


@pytest.mark.parametrize("kind", STATIC)
@pytest.mark.parametrize("k", [1, 7, 18])
def test_every_static_route_runs_exactly_k_blocks(kind, k):
    route = static_route(kind, (6, 6, 6), k, seed=3)
    assert route.dtype == torch.bool and route.shape == (18,) and int(route.sum()) == k


def test_randomk_depends_on_the_seed_only():
    a, b = static_route("randomk", (18, 18, 18), 16, seed=0), static_route("randomk", (18, 18, 18), 16, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, static_route("randomk", (18, 18, 18), 16, seed=1))


def test_k_for_budget_picks_the_closest_cost():
    cost = [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]          # deeper blocks are cheaper here
    assert k_for_budget("firstk", (2, 2, 2), cost, 1.0, budget=1.0 + 8.0) == 2
    assert k_for_budget("firstk", (2, 2, 2), cost, 1.0, budget=1.0 + 9.9) == 3
    assert k_for_budget("firstk", (2, 2, 2), cost, 1.0, budget=1e9) == 6


@pytest.mark.parametrize("kind,k", [("lastk", 3), ("firstk", 0), ("firstk", 10)])
def test_bad_arguments_fail_fast(kind, k):
    with pytest.raises(ValueError):
        static_route(kind, (3, 3, 3), k)


# ----------------------------------------------------------------------------- in the package

def test_a_static_model_runs_its_route_and_costs_what_the_flop_counter_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from drn.cost import measure_cost_table
    from drn.models import build_model
    route = tuple(static_route("distributedk", (3, 3, 3), 5).tolist())
    model = build_model("resnet20", static_route=route).eval()
    drn = build_model("resnet20").eval()
    x = torch.rand(4, 3, 32, 32)
    out = model(x, routing="hard")
    assert out.logits.shape == (4, 10) and torch.isfinite(out.logits).all()
    assert out.gates.tolist() == [list(route)] * 4
    with FlopCounterMode(display=False) as counter:
        model(x[:1], routing="hard")
    table, full = measure_cost_table(model), measure_cost_table(drn)
    assert table.route_cost(out.gates[:1]).item() == counter.get_total_flops()   # routers do not run
    assert table.router == 0 and table.fixed == full.fixed - full.router and table.block == full.block


def test_static_training_gets_every_conv_a_gradient_and_no_router_one():
    from drn.models import build_model
    model = build_model("resnet8", static_route=(True, False, True))
    model(torch.rand(2, 3, 32, 32), routing="soft").logits.sum().backward()
    for name, p in model.named_parameters():
        if ".router." in name or name.startswith("blocks.1."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_a_static_baseline_trains_at_the_k_of_its_flops_target_and_reloads(tiny_data, tmp_path):
    from drn.checkpoint import load_checkpoint, model_from_checkpoint
    from drn.config import TrainConfig
    from drn.cost import measure_cost_table
    from drn.evaluate import evaluate
    from drn.train import Trainer
    cfg = TrainConfig(arch="resnet20", dataset="imagefolder", data_dir=str(tiny_data), out=str(tmp_path / "r"),
                      epochs=2, batch_size=12, device="cpu", routing="firstk", target_flops="50%")
    trainer = Trainer(cfg, log=lambda s: None)
    final = trainer.run()
    k = trainer.cfg.k
    full = measure_cost_table(trainer.model)
    assert 1 <= k < 9 and abs(final["flops"] / full.full - 0.5) < 0.1     # landed near 50 % by its k
    assert final["k"] == k and final["distinct_paths"] == 1 and final["loss_consistency"] == 0
    assert trainer.calibration is None and final["threshold"] == 0.5       # no trim of a static net
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    model, cfg2 = model_from_checkpoint(ckpt)
    assert cfg2.k == k and model.cfg.static_route == tuple([True] * k + [False] * (9 - k))
    again = evaluate(model, trainer.data.val, measure_cost_table(model))
    assert again["accuracy"] == final["accuracy"] and again["flops"] == final["flops"]


def test_ber_dis_samples_gates_from_r_reproducibly():
    from drn.cost import measure_cost_table
    from drn.data import load_synthetic
    from drn.evaluate import evaluate
    from drn.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet8")
    for b in model.blocks:                         # routers near 50/50: sampling differs from thresholding
        torch.nn.init.zeros_(b.router.fc2.bias)
    data = load_synthetic(train=10, test=200)
    cost = measure_cost_table(model)
    a = evaluate(model, data.test, cost, routing="sample", seed=1)
    b = evaluate(model, data.test, cost, routing="sample", seed=1)
    c = evaluate(model, data.test, cost, routing="sample", seed=2)
    h = evaluate(model, data.test, cost)
    assert a == {**b, "images_per_s": a["images_per_s"]} and a["block_exec_rate"] != c["block_exec_rate"]
    assert a["distinct_paths"] > h["distinct_paths"]


@pytest.mark.parametrize("kw,message", [
    (dict(routing="lastk", k=2), "unknown routing 'lastk'"),
    (dict(routing="firstk"), "needs --k"),
    (dict(routing="firstk", target_latency_ms="5"), "not a latency target"),
    (dict(k=3), "not drn"),
    (dict(routing="firstk", k=0), "k must be >= 1"),
])
def test_bad_baseline_settings_are_usage_errors(kw, message):
    from drn.config import TrainConfig, UsageError
    with pytest.raises(UsageError, match=message):
        TrainConfig(**kw)


def test_randomk_at_a_budget_draws_a_route_at_equal_flops():
    """RandomK's K-for-the-budget route of a seed can miss the budget by 10 % or more when its blocks
    are dear (33 % of full for a 30 % target on ResNet-20); at a budget it draws among the routes
    within 5 %, so it is compared with the DRN at equal FLOPs."""
    from drn.baselines import randomk_at_budget
    cost = [4.0, 4.0, 4.0, 3.0, 4.0, 4.0, 3.0, 4.0, 4.0]     # the two cheap blocks downsample
    fixed, budget = 0.5, 0.5 + 10.0                          # only routes with both cheap blocks land
    for seed in range(6):
        route = randomk_at_budget((3, 3, 3), cost, fixed, budget, seed)
        spent = fixed + sum(cost[i] for i in route)
        assert abs(spent / budget - 1) <= 0.05 and list(route) == sorted(set(route))
        assert randomk_at_budget((3, 3, 3), cost, fixed, budget, seed) == route        # the seed decides
    routes = {randomk_at_budget((3, 3, 3), cost, fixed, budget, s) for s in range(12)}
    assert len(routes) > 2                                   # still drawn at random among them
    # a seed whose first draw lands keeps static_route's route
    k = k_for_budget("randomk", (3, 3, 3), cost, fixed, 0.5 + 20.0, seed=1)
    first = tuple(static_route("randomk", (3, 3, 3), k, seed=1).nonzero().squeeze(1).tolist())
    if abs(fixed + sum(cost[i] for i in first) - 20.5) / 20.5 <= 0.05:
        assert randomk_at_budget((3, 3, 3), cost, fixed, 20.5, seed=1) == first


def test_a_static_route_trains_on_m_views_only_when_asked(tiny_data, tmp_path):
    """A static route trains on one view per image by default; --views 2 gives it the DRN's two
    augmented copies per image and step (the equal-images control of BENCHMARKS.md, "ResNet-56 at 50 %: the
    DRN's lead from scratch was the statics' recipe and its second view"), and the finetune
    epochs stay at one."""
    from drn.config import TrainConfig
    from drn.train import Trainer
    base = dict(arch="resnet8", dataset="imagefolder", data_dir=str(tiny_data), batch_size=12, device="cpu",
                routing="distributedk", k=2, epochs=1, finetune_epochs=1)
    assert TrainConfig(**base, out=str(tmp_path / "a")).views == 1 and TrainConfig(out=str(tmp_path)).views == 2
    seen = {}
    for views in (1, 2):
        trainer = Trainer(TrainConfig(**base, out=str(tmp_path / f"v{views}"), views=views), log=lambda s: None)
        sizes = []
        trainer.model.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]) if mod.training else None)
        trainer.run()
        steps = len(sizes) // 2                                  # main epoch, then the finetune epoch
        seen[views] = (sizes[:steps], sizes[steps:])
    assert all(n == 12 for n in seen[1][0] + seen[1][1] + seen[2][1])
    assert all(n == 24 for n in seen[2][0])
