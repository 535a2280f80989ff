import math

import pytest
import torch

from drn.checkpoint import load_checkpoint
from drn.config import TrainConfig, UsageError, parse_target, resolve_target
from drn.train import Trainer, train


def tiny_cfg(data, out, **kw) -> TrainConfig:
    base = dict(arch="resnet8", dataset="imagefolder", data_dir=str(data), out=str(out), epochs=2,
                batch_size=12, views=2, eval_batch_size=64, device="cpu", seed=1, val_fraction=0.25)
    return TrainConfig(**{**base, **kw})


ROUTES = dict(router_start="undecided", router_norm=True, rate_weight=1.0, target_flops="50%", finetune_epochs=0)


@pytest.mark.parametrize("routing,cons,augment,extra", [
    ("straight", "soft", "same", {}), ("soft", "soft", "same", {}), ("straight", "executed", "same", {}),
    ("straight", "soft", "perturb", {}), ("stochastic", "soft", "same", {}), ("straight", "soft", "same", ROUTES),
    ("straight", "soft", "same", dict(full_pass=1.0, distill=1.0, distill_from="full", target_flops="50%", finetune_epochs=0))])
def test_train_writes_checkpoint_and_reports_every_epoch(tiny_data, tmp_path, routing, cons, augment, extra):
    seen = []
    cfg = tiny_cfg(tiny_data, tmp_path / "run", train_routing=routing, consistency_routes=cons, view_augment=augment,
                   **extra)
    result = train(cfg, on_epoch=lambda m: seen.append(m), log=lambda s: None)
    assert [m["epoch"] for m in seen] == [1, 2]
    for key in ("accuracy", "flops", "flops_full", "k", "k_full", "distinct_paths", "mu", "loss_cls",
                "loss_consistency", "loss_diversity", "loss_cost", "loss_reg", "loss_rate", "path_entropy",
                "effective_paths", "dynamic_share"):
        assert key in result and math.isfinite(result[key]), key
    if extra.get("rate_weight"):   # the rate loss acted in the main epochs
        assert seen[0]["loss_rate"] > 0
    assert 0 < result["flops"] <= result["flops_full"]
    assert 0 <= result["k"] <= result["k_full"] == 3
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("stop", [1, 3])
def test_resume_continues_to_the_same_state(tiny_data, tmp_path, stop):
    """Interrupt after epoch `stop` (the main schedule, the finetune), resume: identical weights,
    optimizer, mu, rate hold and metrics to an uninterrupted run -- across the main schedule, the
    controller and the finetune phase."""
    kw = dict(epochs=2, finetune_epochs=2, target_flops="60%")
    straight = Trainer(tiny_cfg(tiny_data, tmp_path / "a", **kw), log=lambda s: None)
    straight.run()
    interrupted = Trainer(tiny_cfg(tiny_data, tmp_path / "b", **kw), log=lambda s: None)
    interrupted.run(on_epoch=lambda m: m["epoch"] == stop)
    assert interrupted.epoch == stop
    resumed = Trainer(tiny_cfg(tiny_data, tmp_path / "b", **kw), resume=True, log=lambda s: None)
    assert resumed.epoch == stop
    assert (resumed.hold.ref is None) == (stop <= 2)
    resumed.run()
    assert resumed.epoch == straight.epoch == 4
    assert straight.hold.state_dict() == resumed.hold.state_dict() and straight.hold.ref is not None
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.controller.state_dict() == resumed.controller.state_dict()
    for ma, mb in zip(straight.history, resumed.history):
        assert ma["accuracy"] == mb["accuracy"] and ma["loss"] == mb["loss"] and ma["mu"] == mb["mu"]
    mom_a = straight.optimizer.state_dict()["state"]
    mom_b = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(mom_a[k]["momentum_buffer"], mom_b[k]["momentum_buffer"]) for k in mom_a)


def test_resume_from_a_checkpoint_saved_before_routers_had_their_own_optimizer_group(tiny_data, tmp_path):
    """Checkpoints written before --router-lr kept one SGD group in model.parameters() order:
    they resume, and every momentum buffer lands on its own parameter."""
    kw = dict(epochs=2, finetune_epochs=1, target_flops="60%")
    first = Trainer(tiny_cfg(tiny_data, tmp_path / "old", **kw), log=lambda s: None)
    first.run(on_epoch=lambda m: m["epoch"] == 1)
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    now = [p for g in first.optimizer.param_groups for p in g["params"]]
    assert len(ckpt["optimizer"]["param_groups"]) == 2            # blocks, routers
    old_index = {id(p): i for i, p in enumerate(first.model.parameters())}
    ckpt["optimizer"] = {"state": {old_index[id(now[j])]: v for j, v in ckpt["optimizer"]["state"].items()},
                         "param_groups": [{**first.optimizer.param_groups[0], "lr": 0.1,
                                           "params": list(range(len(now)))}]}
    ckpt["optimizer"]["param_groups"][0].pop("router")
    torch.save(ckpt, path)
    resumed = Trainer(tiny_cfg(tiny_data, tmp_path / "old", **kw), resume=True, log=lambda s: None)
    assert [g["router"] for g in resumed.optimizer.param_groups] == [False, True]
    names = {id(p): n for n, p in first.model.named_parameters()}
    want = {names[id(p)]: first.optimizer.state[p]["momentum_buffer"] for p in now}
    got = {n: resumed.optimizer.state[p]["momentum_buffer"] for n, p in resumed.model.named_parameters()}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    resumed.run()
    assert resumed.epoch == 3


def test_finetune_freezes_routers_and_trains_blocks(tiny_data, tmp_path):
    snap = {}

    def grab(m):
        if m["epoch"] == 1:
            snap.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "ft", epochs=1, finetune_epochs=1), log=lambda s: None)
    trainer.run(on_epoch=grab)
    after = trainer.model.state_dict()
    routers = [k for k in after if ".router." in k]
    others = [k for k in after if ".router." not in k and after[k].is_floating_point() and "mean" not in k.split(".")[-1]]
    assert routers and all(torch.equal(snap[k], after[k]) for k in routers)
    assert any(not torch.equal(snap[k], after[k]) for k in others)
    assert trainer.history[-1]["phase"] == "finetune"


def test_batch_cost_now_measures_without_touching_training(tiny_data, tmp_path):
    """The loop's val/train probe: train-mode routes of a fixed sample, and nothing of the run moves
    (BN running statistics, the data stream, the weights, the mode)."""
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "p", target_flops="60%"), log=lambda s: None)
    trainer.model.eval()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = trainer.generator.get_state()
    cost = trainer.batch_cost_now()
    assert trainer.budget.fixed < cost <= trainer.budget.full
    assert cost == trainer.batch_cost_now()                      # a fixed sample: the same figure
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.equal(rng, trainer.generator.get_state()) and not trainer.model.training


def test_lr_follows_the_scaled_paper_milestones():
    cfg = TrainConfig(epochs=250, warmup_epochs=0)
    assert [cfg.lr_at(e) for e in (0, 149, 150, 199, 200, 249)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    short = TrainConfig(arch="resnet20", epochs=10, finetune_epochs=2)
    assert short.lr_at(5) == pytest.approx(0.1) and short.lr_at(6) == pytest.approx(0.01) and short.lr_at(9) == pytest.approx(0.001)
    # the finetune restarts at --finetune-lr (default --lr) and decays along a half cosine to 0
    assert [short.lr_at(10, 0.0), short.lr_at(11, 0.0), short.lr_at(11, 1.0)] == pytest.approx([0.1, 0.05, 0.0])
    ft = TrainConfig(arch="resnet20", epochs=10, finetune_epochs=2, finetune_lr=0.05)
    assert ft.lr_at(9) == short.lr_at(9)
    assert [ft.lr_at(10, 0.0), ft.lr_at(11, 0.0), ft.lr_at(11, 1.0)] == pytest.approx([0.05, 0.025, 0.0])


@pytest.mark.parametrize("spec,expected", [("2e8", 2e8), ("40%", 0.4 * 5e8), (" 1.5e8 ", 1.5e8)])
def test_targets_absolute_or_relative(spec, expected):
    assert resolve_target(spec, full=5e8, fixed=1e6) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["0", "-1e8", "0%", "abc", "100%", "5e8", "1e12", "1e5", "nan"])
def test_bad_targets_are_usage_errors(spec):
    with pytest.raises(UsageError):
        resolve_target(spec, full=5e8, fixed=1e6)


def test_parse_target_none():
    assert parse_target(None) is None


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(epochs=-3), dict(batch_size=1), dict(views=0), dict(lr=0),
                                 dict(arch="resnet9"), dict(dataset="mnist"), dict(beta=0), dict(beta=float("inf")), dict(lr=float("nan")), dict(d_c=-1),
                                 dict(target_flops="x"), dict(device="tpu"),
                                 dict(drop_path=0.2), dict(routing="full", drop_path=1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(UsageError):
        TrainConfig(**bad)


@pytest.mark.parametrize("routing", ["distributedk", "randomk"])
def test_a_static_route_starts_from_the_weights_of_its_drn_twin(tiny_data, tmp_path, routing):
    """Scratch against scratch from the same start: choosing k for the target must not draw from the
    run's RNG, or the static network of seed s starts from other weights than the DRN of seed s (it
    did, and one such draw was worth 1.5 test points at 30 %, docs/notes/2026-12-02-static-routes.md, "The scratch gap
    at 30 % was the static runs' start")."""
    drn = Trainer(tiny_cfg(tiny_data, tmp_path / "d", target_flops="60%"), log=lambda s: None)
    static = Trainer(tiny_cfg(tiny_data, tmp_path / "s", target_flops="60%", routing=routing), log=lambda s: None)
    a, b = drn.model.state_dict(), static.model.state_dict()
    shared = [k for k in a if ".router." not in k and a[k].is_floating_point()]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)


def test_randomk_at_a_target_runs_a_route_at_equal_flops_and_reloads_it(tiny_data, tmp_path):
    from drn.baselines import route_of
    from drn.checkpoint import model_from_checkpoint
    t = Trainer(tiny_cfg(tiny_data, tmp_path / "rk", arch="resnet20", target_flops="30%", routing="randomk",
                         seed=1), log=lambda s: None)
    route = t.cfg.route
    assert route is not None and t.cfg.k == len(route) and t.model.cfg.static_route == route_of(t.cfg)
    spent = t.cost.route_cost(torch.tensor(t.model.cfg.static_route, dtype=torch.float32)).item()
    assert abs(spent / t.target - 1) <= 0.05
    from drn.checkpoint import save_checkpoint
    t.checkpoint_path.parent.mkdir(parents=True)
    save_checkpoint(t.checkpoint_path, t.state())
    model, cfg = model_from_checkpoint(load_checkpoint(t.checkpoint_path))
    assert cfg.route == route and model.cfg.static_route == t.model.cfg.static_route


@pytest.mark.parametrize("bad", [dict(route=(0, 3)), dict(routing="randomk", k=3, route=(0, 3)),
                                 dict(routing="randomk", k=2, route=(3, 0)), dict(routing="randomk", k=1, route=(9,)),
                                 dict(routing="drn", route=(0,))])
def test_config_rejects_a_bad_route(bad):
    with pytest.raises(UsageError, match="route"):
        TrainConfig(arch="resnet20", **bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(UsageError, match="unknown config keys: nope"):
        TrainConfig.from_dict({"nope": 1})


def test_config_from_dict_reads_a_removed_setting_only_at_the_behaviour_left():
    d = {**TrainConfig(arch="resnet20").to_dict(), "finetune_routers": "frozen"}
    assert TrainConfig.from_dict(d) == TrainConfig(arch="resnet20")
    with pytest.raises(UsageError, match="finetune_routers"):
        TrainConfig.from_dict({**d, "finetune_routers": "steer"})
    gone = {**TrainConfig(arch="resnet20").to_dict(), "router_detach": False, "block_grad": "batch", "cost_price": 0.0,
            "explore": 0.0, "routers_first": 0}
    assert TrainConfig.from_dict(gone) == TrainConfig(arch="resnet20")
    with pytest.raises(UsageError, match="block_grad"):
        TrainConfig.from_dict({**gone, "block_grad": "routed"})
    with pytest.raises(UsageError, match="cost_price"):
        TrainConfig.from_dict({**gone, "cost_price": 1.0})


def test_tinyimagenet_doubles_the_route_loss_weights():
    assert (TrainConfig(dataset="tinyimagenet").lam, TrainConfig(dataset="tinyimagenet").alpha) == (0.4, 0.4)
    assert (TrainConfig().lam, TrainConfig(lam=0.3).lam) == (0.2, 0.3)


def test_warm_up_defaults_by_depth_and_ramps_linearly():
    assert TrainConfig(arch="resnet20").warmup_epochs == 0
    assert TrainConfig(arch="resnet56").warmup_epochs == TrainConfig(arch="resnet110").warmup_epochs == 2
    assert TrainConfig(arch="resnet50").warmup_epochs == 2
    cfg = TrainConfig(arch="resnet110", epochs=10)
    assert [cfg.lr_at(0, 0.5), cfg.lr_at(1, 0.0), cfg.lr_at(1, 1.0), cfg.lr_at(5)] == pytest.approx([0.025, 0.05, 0.1, 0.1])
    assert cfg.lr_at(6) == pytest.approx(0.01)    # warm-up and milestones compose


def test_warm_up_sets_each_steps_lr(tiny_data, tmp_path):
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "w", epochs=2, warmup_epochs=1, batch_size=4, milestones=(1.0,)),
                      log=lambda s: None)
    lrs, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **kw: (lrs.append(trainer.optimizer.param_groups[0]["lr"]), step(*a, **kw))[1]
    trainer.run()
    n = len(lrs) // 2                                # 27 training images, batch 4: 6 steps an epoch
    assert lrs[:n] == pytest.approx([0.1 * (i + 1) / n for i in range(n)]) and lrs[n:] == pytest.approx([0.1] * n)


def test_constant_router_lr_skips_the_milestones_only(tiny_data, tmp_path):
    cfg = TrainConfig(arch="resnet110", epochs=10, finetune_epochs=2, router_lr="constant")
    assert [cfg.lr_at(e, router=True) for e in (0, 1, 2, 6, 9)] == pytest.approx([0, 0.05, 0.1, 0.1, 0.1])
    assert [cfg.lr_at(e) for e in (6, 9)] == pytest.approx([0.01, 0.001])          # the blocks' steps down
    assert cfg.lr_at(11, 0.5, router=True) == cfg.lr_at(11, 0.5)                  # finetune: routers frozen
    assert TrainConfig(epochs=10).lr_at(9, router=True) == pytest.approx(0.001)   # decay: as the blocks
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "r", epochs=2, finetune_epochs=0, batch_size=4,
                               milestones=(0.5,), router_lr="constant"), log=lambda s: None)
    groups = trainer.optimizer.param_groups
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainer.model.router_parameters()}
    lrs, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **kw: (lrs.append((groups[0]["lr"], groups[1]["lr"])), step(*a, **kw))[1]
    trainer.run()
    assert lrs[0] == pytest.approx((0.1, 0.1)) and lrs[-1] == pytest.approx((0.01, 0.1))
    with pytest.raises(UsageError, match="router lr must be decay, constant or frozen"):
        TrainConfig(router_lr="cosine")


def test_undecided_routers_get_the_damped_loop_and_keep_their_lr_by_default():
    """Undecided routers integrate mu: kp 4 and a constant router lr land them (BENCHMARKS.md, "A damped
    loop for routes that depend on the image"); routers that start on a route keep kp 1 and the decay."""
    undecided = TrainConfig(arch="resnet20", target_flops="50%", router_start="undecided")
    on_route = TrainConfig(arch="resnet20", target_flops="50%")
    assert (undecided.mu_kp, undecided.router_lr) == (4.0, "constant")
    assert (on_route.mu_kp, on_route.router_lr) == (1.0, "decay")
    assert TrainConfig(router_start="undecided", mu_kp=1.0, router_lr="decay").router_lr == "decay"
    assert TrainConfig.from_dict(undecided.to_dict()) == undecided          # a checkpoint's config


def test_no_choice_reads_the_test_split(tiny_data, tmp_path):
    """Train twice, once with the test split replaced by noise with other labels: every per-epoch
    figure the controller, the trim, ASHA, TPE or the Pareto flags read, the threshold and the
    weights are identical; only the test_* figures differ."""
    import dataclasses
    from drn.data import Split, load_dataset
    cfg = tiny_cfg(tiny_data, tmp_path / "a", arch="resnet20", epochs=2, finetune_epochs=1, batch_size=4,
                   target_flops="50%")
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.val_seed)
    g = torch.Generator().manual_seed(5)
    noise = Split(torch.randint(0, 256, data.test.images.shape, generator=g, dtype=torch.uint8),
                  torch.randint(0, 3, data.test.labels.shape, generator=g))
    a = Trainer(cfg, data=data, log=lambda s: None)
    b = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "b")), data=dataclasses.replace(data, test=noise),
                log=lambda s: None)
    fa, fb = a.run(), b.run()
    timing = ("epoch_seconds", "images_per_s", "calib_seconds")
    for ha, hb in zip(a.history, b.history):
        same = lambda h: {k: v for k, v in h.items() if not k.startswith("test_") and k not in timing}
        assert same(ha) == same(hb)
    assert "test_accuracy" in a.history[-1] and not any("test_accuracy" in h for h in a.history[:-1])
    assert fa["threshold"] == fb["threshold"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    test_a, test_b = ({k: v for k, v in f.items() if k.startswith("test_")} for f in (fa, fb))
    assert test_a["test_images"] == test_b["test_images"] == len(data.test.labels)
    assert test_a != test_b   # the noise was evaluated: the test figures, and only they, differ
    assert fa["test_flops"] != fb["test_flops"] or fa["test_accuracy"] != fb["test_accuracy"]


@pytest.mark.parametrize("routing", ["drn", "firstk", "randomk", "distributedk", "deepk"])
def test_deep_plain_networks_start_as_their_shortcuts_and_routes_train_as_the_drn(routing):
    """Measured (BENCHMARKS.md, "Learning-rate warm-up and zero-init residuals"): zero-init residuals without warm-up train the plain ResNet-110 best in
    10 epochs; the routed network keeps its BN init and the warm-up, and so do the static routes,
    which score 2-7 points higher that way on ResNet-56 at 50 % (9 of 9 seed and method pairs)."""
    plain = TrainConfig(arch="resnet110", routing="full")
    routed = TrainConfig(arch="resnet110", routing=routing, target_flops="50%")
    assert (plain.zero_init_residual, plain.warmup_epochs) == (True, 0)
    assert (routed.zero_init_residual, routed.warmup_epochs) == (False, 2)
    assert not TrainConfig(arch="resnet20", routing="full").zero_init_residual
    from drn.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet56", zero_init_residual=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ran = model(x, routing="mask", gates=torch.ones(2, 27, dtype=torch.bool)).logits
        skipped = model(x, routing="mask", gates=torch.zeros(2, 27, dtype=torch.bool)).logits
        usual = build_model("resnet56").eval()   # the BN init: running a block changes the output
        assert not torch.allclose(usual(x, routing="mask", gates=torch.ones(2, 27, dtype=torch.bool)).logits,
                                  usual(x, routing="mask", gates=torch.zeros(2, 27, dtype=torch.bool)).logits)
    assert all(b.residual[-1].weight.abs().sum() == 0 for b in model.blocks)
    torch.testing.assert_close(ran, skipped)   # every block is its shortcut at the start


@pytest.mark.parametrize("kind", ["auto", "deepk", "distributedk"])
def test_routers_can_start_on_the_budget(tiny_data, tmp_path, kind):
    """--router-start auto (the default with a target), deepk or distributedk: at step 0 every image
    runs that static route; one undecided block (p = 0.5) may be added so the start cost straddles
    the target rather than missing it by a block."""
    from drn.baselines import static_route
    x = None
    for target in ("30%", "50%", "70%"):
        extra = {} if kind == "auto" else {"router_start": kind}
        cfg = tiny_cfg(tiny_data, tmp_path / target, arch="resnet14", epochs=1, finetune_epochs=0,
                       target_flops=target, **extra)
        assert cfg.router_start == kind and cfg.mu_ki == 8 and cfg.router_open == 0.9
        trainer = Trainer(cfg, log=lambda s: None)
        route, undecided = trainer._start_on_budget()
        half = undecided[0] if undecided else None
        assert len(undecided) <= 1
        kinds = ("deepk", "distributedk") if kind == "auto" else (kind,)
        assert any(route == tuple(static_route(m, (2, 2, 2), k).tolist()) for m in kinds for k in range(1, 7))
        x = trainer.train_split.images[:16].float() / 255
        with torch.no_grad():
            out = trainer.model(x, routing="hard")
        fixed = [i for i in range(6) if i != half]
        assert torch.equal(out.gates[:, fixed], torch.tensor(route)[fixed].expand(16, -1))
        b, t = trainer.budget, trainer.target
        if half is None:
            assert abs(b.route_cost(torch.tensor(route)[None].float()).item() / t - 1) <= 0.025
        else:
            assert not route[half] and (out.r[:, half] - 0.5).abs().max() < 0.2   # undecided: r near 0.5
            low = b.route_cost(torch.tensor(route)[None].float()).item()
            assert low <= t <= low + b.block[half]
    opened = Trainer(tiny_cfg(tiny_data, tmp_path / "o", arch="resnet14", target_flops="50%", router_start="open"),
                     log=lambda s: None)
    assert opened.cfg.mu_ki == 2
    # from a trained network the loop is twice as fast: its trained blocks' routers are pulled open
    assert TrainConfig(target_flops="70%", init=str(tmp_path / "plain.pt"), out=str(tmp_path)).mu_ki == 16
    with torch.no_grad():
        assert opened.model(x, routing="hard").gates.all()
    with pytest.raises(UsageError):
        TrainConfig(router_start="random")


@pytest.mark.parametrize("target,route,undecided,pairs", [("30%", [3, 6, 8], [], 0), ("50%", [0, 3, 6, 8], [5], 0),
                                                          ("50%", [0, 3, 6, 8], [5, 7, 8], 1),
                                                          ("50%", [0, 3, 6, 8], [0, 1, 5, 7, 8], 2),
                                                          ("50%", [0, 3, 6, 8], [0, 1, 5, 7, 8], 3)])
def test_auto_start_takes_deepk_where_distributedk_runs_the_last_stage_on_one_block(tiny_data, tmp_path, target,
                                                                                    route, undecided, pairs):
    """ResNet-20 at 30 %: DistributedK's route (0, 3, 6) runs stage 3 on its transition alone, so the
    routers start on DeepK's (3, 6, 8); at 50 % DistributedK's route (0, 3, 6, 8, block 5 undecided).
    undecided_pairs: an open and a closed block of equal cost per stage, deepest first (stage 2 has
    none: its open block is the cheaper transition, its closed one's pair is the undecided block 5),
    at most one pair per stage; every image starts at the route's expected cost."""
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path, arch="resnet20", target_flops=target, undecided_pairs=pairs),
                      log=lambda s: None)
    got, got_undecided = trainer._start_on_budget()
    assert [i for i, on in enumerate(got) if on] == route and got_undecided == undecided
    b = trainer.budget
    expected = [0.5 if i in undecided else float(on) for i, on in enumerate(got)]
    if target == "50%":   # the pairs move no expected cost: the same as block 5 alone undecided
        single = [0.5 if i == 5 else float(on) for i, on in enumerate(got)]
        assert b.route_cost(torch.tensor(expected)[None]).item() == pytest.approx(
            b.route_cost(torch.tensor(single)[None]).item())


def test_warm_starts_on_the_budget_start_their_routers_further_from_the_middle(tmp_path):
    base = dict(dataset="imagefolder", data_dir=str(tmp_path), out=str(tmp_path / "o"))
    assert TrainConfig(**base, target_flops="30%", init=str(tmp_path / "p.pt")).router_open == 0.99
    assert TrainConfig(**base, target_flops="30%").router_open == 0.9
    assert TrainConfig(**base, init=str(tmp_path / "p.pt")).router_open == 0.9          # no budget: open
    assert TrainConfig(**base, target_flops="30%", init=str(tmp_path / "p.pt"), router_start="open").router_open == 0.9
    assert TrainConfig(**base, target_flops="30%", init=str(tmp_path / "p.pt"), router_open=0.8).router_open == 0.8


def test_frozen_routers_keep_their_start_while_the_blocks_train(tiny_data, tmp_path):
    """--router-lr frozen (a control: routes that depend on the image, not learned): lr 0 for the
    routers in every main step, so their parameters stay as they started; the blocks train."""
    t = Trainer(tiny_cfg(tiny_data, tmp_path / "f", epochs=1, finetune_epochs=0, router_lr="frozen",
                         router_start="undecided", router_norm=True, target_flops="50%"), log=lambda s: None)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    end = t.model.state_dict()
    routers = [k for k in start if ".router." in k and not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked", "capacity"))]
    assert routers and all(torch.equal(start[k], end[k]) for k in routers)
    assert any(not torch.equal(start[k], end[k]) for k in start if ".residual." in k)
