"""--init: a routed (or static) network starts from a trained plain one, routers open."""

import pytest
import torch

from drn.checkpoint import load_checkpoint
from drn.config import UsageError
from drn.models import Router, build_model
from drn.train import Trainer
from drn.warmstart import IMAGENET_MEAN, warm_start
from test_train import tiny_cfg


@pytest.fixture(scope="module")
def plain(tiny_data, tmp_path_factory):
    """A plain ResNet-20 (`--routing full`), one epoch on the tiny images."""
    out = tmp_path_factory.mktemp("plain")
    trainer = Trainer(tiny_cfg(tiny_data, out, arch="resnet20", routing="full", epochs=1, batch_size=6),
                      log=lambda s: None)
    trainer.run()
    return trainer


def test_routing_full_is_the_plain_network(plain):
    assert plain.model.cfg.static_route == (True,) * 9
    assert plain.cost.router == 0 and plain.history[-1]["k"] == 9


def test_plain_network_with_stochastic_depth_trains_resumes_and_warm_starts(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "sd", arch="resnet20", routing="full", epochs=2, batch_size=6, drop_path=0.5)
    Trainer(cfg, log=lambda s: None).run(on_epoch=lambda m: True)           # stopped after epoch 1
    resumed = Trainer(cfg, resume=True, log=lambda s: None)
    assert resumed.model.cfg.drop_path == 0.5 and resumed.epoch == 1
    resumed.run()
    assert resumed.history[-1]["k"] == 9 and resumed.cost.full == Trainer(
        tiny_cfg(tiny_data, tmp_path / "plain", arch="resnet20", routing="full", epochs=1), log=lambda s: None).cost.full
    warm = Trainer(tiny_cfg(tiny_data, tmp_path / "warm", arch="resnet20", epochs=1, target_flops="50%",
                            init=str(resumed.checkpoint_path)), log=lambda s: None)
    assert (warm.init_info["init_kind"], warm.init_info["init_epoch"]) == ("drn full", 2)
    mine, theirs = warm.model.state_dict(), resumed.model.state_dict()
    copied = [k for k in theirs if ".router." not in k and k != "threshold"]
    assert copied and all(torch.equal(mine[k], theirs[k]) for k in copied)


def test_init_copies_every_weight_but_the_routers_which_start_open(plain, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "warm", arch="resnet20", epochs=1, target_flops="50%",
                   init=str(plain.checkpoint_path), router_start="open")
    warm = Trainer(cfg, log=lambda s: None)
    src, dst = plain.model.state_dict(), warm.model.state_dict()
    shared = [k for k in dst if ".router." not in k and k != "threshold"]
    assert shared and all(torch.equal(src[k], dst[k]) for k in shared)
    for b in warm.model.blocks:
        assert torch.softmax(b.router.fc2.bias, 0)[0].item() == pytest.approx(Router.OPEN)
    assert warm.model.threshold.item() == 0.5
    # every block run: the routed network computes what the plain one does
    x = torch.rand(5, 3, 32, 32)
    warm.model.eval(), plain.model.eval()
    with torch.no_grad():
        routed = warm.model(x, routing="mask", gates=torch.ones(5, 9, dtype=torch.bool)).logits
        torch.testing.assert_close(routed, plain.model(x, routing="hard").logits)
    final = warm.run()
    assert final["init"] == str(plain.checkpoint_path) and load_checkpoint(warm.checkpoint_path)["init_info"]
    # by default the warm routers start on the budget, as from scratch: open, closed or undecided, but
    # further from the middle (0.99 / 0.01)
    on_budget = Trainer(tiny_cfg(tiny_data, tmp_path / "warm-b", arch="resnet20", epochs=1, target_flops="50%",
                                 init=str(plain.checkpoint_path)), log=lambda s: None)
    p = [round(torch.softmax(b.router.fc2.bias, 0)[0].item(), 6) for b in on_budget.model.blocks]
    assert set(p) <= {0.99, 0.01, 0.5} and 0.01 in p and 0.99 in p
    assert torch.equal(on_budget.model.blocks[4].residual[0].weight, plain.model.blocks[4].residual[0].weight)


def test_the_budget_loop_starts_at_a_warm_mu_over_trained_blocks(plain, tiny_data, tmp_path):
    """From --init with the routers on the budget the loop starts at WARM_MU x its scale (1 on ResNet-20):
    a trained block's router moves only at mu ~1-3. From scratch, with open routers, without a target
    or with --mu given, it starts where it always did."""
    from drn.controller import WARM_MU
    init = str(plain.checkpoint_path)
    start = lambda name, **kw: Trainer(tiny_cfg(tiny_data, tmp_path / name, arch="resnet20", epochs=1, **kw),
                                       log=lambda s: None).controller.mu
    assert start("warm", target_flops="70%", init=init) == pytest.approx(WARM_MU * 0.05) == pytest.approx(1.0)
    assert start("greedy", target_flops="70%", init=init, router_start="greedy") == pytest.approx(1.0)
    assert start("scratch", target_flops="70%") == 0.05
    assert start("open", target_flops="70%", init=init, router_start="open") == 0.05
    assert start("fixed", init=init) == 0.05
    assert start("given", target_flops="70%", init=init, mu=0.3) == 0.3
    deep = Trainer(tiny_cfg(tiny_data, tmp_path / "deep", arch="resnet56", epochs=1, target_flops="50%",
                            init=None), log=lambda s: None)
    assert deep.controller.mu == 0.05 and deep.controller.mu_scale == pytest.approx(0.15)


def test_a_static_baseline_warm_starts_too(plain, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "rk", arch="resnet20", epochs=1, routing="randomk", k=4,
                   init=str(plain.checkpoint_path))
    t = Trainer(cfg, log=lambda s: None)
    assert torch.equal(t.model.blocks[3].residual[0].weight, plain.model.blocks[3].residual[0].weight)


def test_init_from_another_val_split_is_refused(plain, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "x", arch="resnet20", epochs=1, val_fraction=0.3,
                   init=str(plain.checkpoint_path))
    with pytest.raises(UsageError, match="val split"):
        Trainer(cfg, log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_resnet50_warm_starts_from_a_torchvision_state_dict(tmp_path):
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=10).eval()
    for m in tv.modules():                       # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet50", 10, 64)
    info = warm_start(model, path, "imagefolder", ())
    assert info["init_kind"] == "torchvision" and info["init_classifier"]
    assert model.mean.tolist() == pytest.approx(IMAGENET_MEAN)
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ours = model(x, routing="mask", gates=torch.ones(2, 16, dtype=torch.bool)).logits
        theirs = tv((x - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="resnet50 only"):
        warm_start(build_model("resnet20"), path, "imagefolder", ())


def test_greedy_route_drops_the_block_the_network_loses_least_by():
    """A block whose residual is zero changes nothing: dropping it is free, so greedy drops it first."""
    from drn.warmstart import greedy_route
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 32).eval()
    with torch.no_grad():
        model.blocks[1].residual[-1].weight.zero_()          # block 1 is its shortcut
        model.fc.weight.mul_(50)                             # confident: any change of route moves the loss
        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        labels = model(images.float() / 255, routing="hard").logits.argmax(1)
    cost = lambda route: float(sum(route))
    route, last = greedy_route(model, images, labels, cost, target=2.0)
    assert route == (True, False, True) and last == 1
    route, last = greedy_route(model, images, labels, cost, target=3.0)
    assert route == (True, True, True) and last is None


def test_routers_start_on_the_greedy_route_of_a_warm_start(plain, tiny_data, tmp_path):
    from drn.warmstart import greedy_route
    t = Trainer(tiny_cfg(tiny_data, tmp_path / "g", arch="resnet20", epochs=1, target_flops="50%",
                         init=str(plain.checkpoint_path), router_start="greedy"), log=lambda s: None)
    cost = lambda route: t.budget.route_cost(torch.tensor(route, dtype=torch.float32)).item()
    route, last = greedy_route(t.model, t.data.val.images, t.data.val.labels, cost, t.target)
    opened = [b.router.fc2.bias.softmax(0)[0].item() for b in t.model.blocks]
    half = last if abs(cost(route) / t.target - 1) > 0.025 else None
    assert [round(q, 3) for q in opened] == [0.5 if i == half else 0.99 if on else 0.01 for i, on in enumerate(route)]
    assert not all(route) and any(route)
    with pytest.raises(UsageError, match="greedy"):
        tiny_cfg(tiny_data, tmp_path / "x", target_flops="50%", router_start="greedy")


@pytest.mark.parametrize("routing", ["drn", "distributedk"])
def test_distill_learns_from_the_frozen_init_network_in_every_phase_and_after_a_resume(plain, tiny_data, tmp_path,
                                                                                        routing):
    """--distill: the teacher is the --init network as trained (its outputs, eval mode), frozen; the
    loss moves the weights (the same run without it ends elsewhere), statics and the finetune too."""
    kw = dict(arch="resnet20", epochs=1, finetune_epochs=1, target_flops="50%", init=str(plain.checkpoint_path),
              routing=routing)
    x = torch.rand(4, 3, 32, 32)
    plain.model.eval()
    with torch.no_grad():
        expected = plain.model(x, routing="hard").logits
    runs = {}
    for w in (0.0, 2.0):
        t = Trainer(tiny_cfg(tiny_data, tmp_path / f"d{w}", distill=w, **kw), log=lambda s: None)
        if w:
            before = {k: v.clone() for k, v in t.teacher.state_dict().items()}
            with torch.no_grad():
                torch.testing.assert_close(t.teacher(x, routing="hard").logits, expected)
        t.run(on_epoch=lambda m: True)   # stopped after the main epoch: the finetune runs on a resume
        resumed = Trainer(tiny_cfg(tiny_data, tmp_path / f"d{w}", distill=w, **kw), resume=True, log=lambda s: None)
        resumed.run()
        runs[w] = resumed.model.state_dict()
        if w:
            assert all(torch.equal(before[k], v) for k, v in t.teacher.state_dict().items())
            assert not resumed.teacher.training and all(torch.equal(before[k], v)
                                                        for k, v in resumed.teacher.state_dict().items())
    assert any(not torch.equal(runs[0.0][k], runs[2.0][k]) for k in runs[0.0] if ".residual." in k)
