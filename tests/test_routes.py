"""Routes that depend on the image: the route statistics (drn/evaluate.py path_stats) against
hand-computed cases, the rate loss, and the stochastic straight-through training routing."""
import math

import pytest
import torch

from drn.evaluate import path_stats
from drn.losses import LossWeights, drn_loss, rate_loss
from drn.models import build_model
from drn.router import Router


def gates(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_one_route_has_no_entropy_and_no_dynamic_share():
    s = path_stats(gates([[1, 0, 1]] * 5), [1.0, 1.0, 1.0])
    assert s == {"path_entropy": 0.0, "effective_paths": 1.0, "dynamic_share": 0.0}


def test_path_stats_hand_computed():
    # 8 images, 3 blocks of cost 1, 2, 4; routes: (1,1,0) x4, (1,0,1) x2, (0,0,1) x1, (1,1,1) x1
    # p = 1/2, 1/4, 1/8, 1/8 -> entropy 0.5 + 0.5 + 3/8 + 3/8 = 1.75 bits, 2^1.75 = 3.3636 routes
    # rates: block 0 7/8 (dynamic), block 1 5/8 (dynamic), block 2 4/8 (dynamic) -> share 1
    g = gates([[1, 1, 0]] * 4 + [[1, 0, 1]] * 2 + [[0, 0, 1], [1, 1, 1]])
    s = path_stats(g, [1.0, 2.0, 4.0])
    assert s["path_entropy"] == pytest.approx(1.75)
    assert s["effective_paths"] == pytest.approx(2 ** 1.75)
    assert s["dynamic_share"] == pytest.approx(1.0)


def test_dynamic_share_counts_only_blocks_run_on_10_to_90_percent():
    # 10 images: block 0 on all (static), block 1 on 5 (dynamic), block 2 on 1 = 10 % (dynamic, the edge),
    # block 3 on none. Executed cost per image: 1 * 1 + 0.5 * 2 + 0.1 * 10 = 3; dynamic 0.5 * 2 + 0.1 * 10 = 2
    rows = [[1, i < 5, i == 0, 0] for i in range(10)]
    s = path_stats(gates(rows), [1.0, 2.0, 10.0, 5.0])
    assert s["dynamic_share"] == pytest.approx(2 / 3)
    # the routes: (1,1,1), (1,1,0) x4, (1,0,0) x5 -> p 0.1, 0.4, 0.5
    h = -(0.1 * math.log2(0.1) + 0.4 * math.log2(0.4) + 0.5 * math.log2(0.5))
    assert s["path_entropy"] == pytest.approx(h)


def test_no_block_run_is_no_dynamic_share():
    assert path_stats(gates([[0, 0]] * 3), [1.0, 1.0])["dynamic_share"] == 0.0


def test_rate_loss_hand_computed_and_its_gradient_reaches_r():
    # 2 images x 1 view x 2 blocks; rates (0.5, 0.9) against target 0.5: ((0)^2 + (0.4)^2) / 2 = 0.08
    r = torch.tensor([[[0.2, 1.0]], [[0.8, 0.8]]], dtype=torch.float64, requires_grad=True)
    loss = rate_loss(r, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.08)
    loss.backward()
    # d/dr_ib = 2 (rate_b - t) / n_blocks / n_images: block 0 0, block 1 2 * 0.4 / 2 / 2 = 0.2
    assert torch.allclose(r.grad, torch.tensor([[[0.0, 0.2]], [[0.0, 0.2]]], dtype=torch.float64))


def test_rate_loss_of_a_band_is_zero_inside_it():
    r = torch.tensor([[0.1, 0.5, 0.95], [0.1, 0.5, 0.95]])
    band = torch.tensor([[0.2] * 3, [0.8] * 3])
    # rates 0.1, 0.5, 0.95: 0.1 under the band by 0.1, 0.95 over it by 0.15 -> (0.01 + 0 + 0.0225) / 3
    assert rate_loss(r, band).item() == pytest.approx((0.01 + 0.0225) / 3)
    assert rate_loss(r, torch.tensor([[0.1, 0.5, 0.9], [0.1, 0.5, 1.0]])).item() == 0.0


def test_drn_loss_adds_the_rate_term_at_its_weight_only_with_a_target():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    routes, cost = torch.rand(2, 2, 3), torch.full((3,), 1 / 3)
    t = torch.full((3,), 0.2)
    base, parts = drn_loss(logits, labels, routes, cost, 0.1, LossWeights())
    assert parts["rate"].item() == 0.0
    with_rate, parts = drn_loss(logits, labels, routes, cost, 0.1, LossWeights(rate=3.0), rate_target=t)
    assert parts["rate"].item() == pytest.approx(rate_loss(routes, t).item())
    assert (with_rate - base).item() == pytest.approx(3.0 * parts["rate"].item(), rel=1e-5)


def test_stochastic_routing_draws_gates_from_r_and_trains_every_router():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, input_size=16)
    for b in model.blocks:
        b.router.open_(0.5)
        torch.nn.init.normal_(b.router.fc2.weight, std=0.1)   # image-dependent r
    x = torch.rand(256, 3, 16, 16)
    out = model(x, routing="stochastic")
    # about half the images per block, and the draws differ from image to image
    rate = out.gates.float().mean(0)
    assert ((rate > 0.3) & (rate < 0.7)).all(), rate
    assert torch.unique(out.gates, dim=0).shape[0] > 1
    # each block ran where its gate says: the hard routes with those gates give the same logits
    with torch.no_grad():
        ref = model(x, routing="mask", gates=out.gates)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 10, (256,))).backward()
    for b in model.blocks:   # straight-through: r's gradient reaches every router
        assert b.router.fc2.weight.grad is not None and b.router.fc2.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_a_normalised_router_is_decided_image_by_image_from_the_start():
    from drn.router import Router
    torch.manual_seed(0)
    router = Router(16, 8, open_p=0.7, norm=True).train()
    logits = router(torch.randn(256, 16, 4, 4))
    gap = logits[:, 0] - logits[:, 1]
    # the batch's gaps: centred on the start's log(p / (1 - p)), spread SPREAD, whatever fc2's scale
    assert gap.mean().item() == pytest.approx(math.log(0.7 / 0.3), abs=1e-4)
    assert gap.std(unbiased=False).item() == pytest.approx(Router.SPREAD, rel=1e-3)
    router.shift_(0.5)   # the rate hold's knob moves every image's gap
    assert (router(torch.randn(256, 16, 4, 4))[:, 0] * 2).mean().item() == pytest.approx(math.log(0.7 / 0.3) + 0.5,
                                                                                          abs=1e-4)


def test_normalised_routers_route_hard_as_they_mask_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, input_size=16, router_norm=True)
    for b in model.blocks:
        b.router.open_(0.5)
    x = torch.rand(64, 3, 16, 16)
    model.train()
    with torch.no_grad():
        for _ in range(40):                 # the routers' running statistics settle on this data
            model(x, routing="straight")
    model.eval()
    with torch.no_grad():
        hard, mask = model(x, routing="hard"), model(x, routing="mask")
    assert torch.equal(hard.gates, mask.gates) and torch.allclose(hard.logits, mask.logits, atol=1e-4)
    rate = hard.gates.float().mean(0)
    assert ((rate > 0.05) & (rate < 0.95)).all(), rate   # undecided start: every block on part of the images
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = build_model("resnet8", num_classes=10, input_size=16, router_norm=True)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x, routing="hard").gates, hard.gates)


def test_unrouted_transitions_run_on_every_image_and_the_other_blocks_stay_routed():
    torch.manual_seed(0)
    model = build_model("resnet14", num_classes=10, input_size=16, router_norm=True, route_transitions=False)
    transitions = [i for i, b in enumerate(model.blocks) if not isinstance(b.shortcut, torch.nn.Identity)]
    assert transitions == [2, 4]
    for b in model.blocks:
        b.router.open_(0.5)
    x = torch.rand(64, 3, 16, 16)
    out = model(x, routing="straight")
    assert out.gates[:, transitions].all() and (out.r[:, transitions] == 1).all()
    assert not out.gates[:, [0, 1, 3, 5]].all()
    out.logits.sum().backward()
    assert model.blocks[2].router.fc1.weight.grad is None and model.blocks[1].router.fc1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        _, lo, hi, g = model.route_intervals(x, 0.3, 0.7)   # the threshold sweep never skips them either
        assert g[:, transitions].all()



def test_a_normalised_routers_spread_is_fixed_and_its_bias_trains():
    """The spread is a buffer: a trained spread and bias slide to 0 together where the straight-through
    gate chatters, and every image then gets r = 0.5 (BENCHMARKS.md, "Why the dynamic recipe misses
    its landing: a router on the threshold, and a loop that cycles"). Checkpoints keep the key."""
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, input_size=16, router_norm=True)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("router.norm.weight") for n in names)
    assert any(n.endswith("router.norm.bias") for n in names)
    assert any(k.endswith("router.norm.weight") for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 10, (32,))
    bias = [b.router.norm.bias.item() for b in model.blocks]
    for _ in range(5):
        out = model(x, routing="straight")
        loss = torch.nn.functional.cross_entropy(out.logits, y) + out.r.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b.router.norm.weight.item() == Router.SPREAD for b in model.blocks)
    assert [b.router.norm.bias.item() for b in model.blocks] != bias
