"""Routed ResNets (drn/models.py) and the router (drn/router.py): shapes, gradients of the full
Eq. 9 objective, soft vs hard vs mask routing, skipped shape-changing blocks, Eq. 11's argmax."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from drn.cost import measure_cost_table
from drn.losses import LossWeights, drn_loss
from drn.models import ModelConfig, PadShortcut, SoftBlend, build_model
from drn.router import Router, hard_route, logit_gap, soft_route

# arch -> (input size, classes, batch, blocks)
ARCH_CASES = {
    "resnet8": (32, 10, 4, 3),
    "resnet20": (32, 10, 4, 9),
    "resnet110": (32, 10, 4, 54),
    "resnet50": (64, 200, 2, 16),
}


def make(arch: str, **kw):
    size, classes, _, _ = ARCH_CASES[arch]
    return build_model(arch, num_classes=classes, input_size=size, **kw)


def randomize_routers(model, std: float = 3.0) -> None:
    """Routers start open (bias 1.1/-1.1): make their decisions depend on the input instead."""
    with torch.no_grad():
        for b in model.blocks:
            nn.init.normal_(b.router.fc2.weight, std=std)
            b.router.fc2.bias.zero_()


def calibrate_bn(model, x) -> None:
    """One train-mode pass with cumulative BN averages, so eval activations stay O(1)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x, routing="mask")
    model.eval()


def router_logits(model, x, routing="mask", gates=None):
    """Logits of every block's router, captured by forward hooks: (B, n, 2)."""
    seen = []
    hooks = [b.router.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model(x, routing=routing, gates=gates)
    finally:
        for h in hooks:
            h.remove()
    return out, torch.stack(seen, 1)


# ----------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("arch", list(ARCH_CASES))
def test_soft_forward_shapes_and_full_loss_gradients(arch):
    torch.manual_seed(0)
    size, classes, B, n_blocks = ARCH_CASES[arch]
    model = make(arch)
    model.train()
    M = 2
    L = B // M
    x = torch.rand(B, 3, size, size)
    labels = torch.randint(0, classes, (L,)).repeat_interleave(M)

    out = model(x, routing="soft")
    assert model.num_blocks == n_blocks
    assert out.logits.shape == (B, classes)
    assert out.r.shape == (B, n_blocks)
    assert out.gates.shape == (B, n_blocks) and out.gates.dtype == torch.bool
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.r).all()
    assert ((out.r > 0) & (out.r < 1)).all()

    cost = measure_cost_table(model).normalized()
    assert model.training  # measure_cost_table must give the mode back
    total, parts = drn_loss(out.logits, labels, out.r.view(L, M, n_blocks), cost, mu=0.05, w=LossWeights())
    assert torch.isfinite(total)
    total.backward()

    router_ids = {id(p) for p in model.router_parameters()}
    assert len(router_ids) == 4 * n_blocks  # fc1/fc2 weight and bias per block
    for name, p in model.named_parameters():
        if name.endswith("router.fc1.weight") or name.endswith("router.fc1.bias"):
            # routers start with a zero last layer (every image at p = router_open): fc1 learns once fc2 has
            assert p.grad is not None and not p.grad.any(), f"{name} moved before fc2 did"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_routers_start_at_their_open_probability_for_every_input_and_then_learn():
    torch.manual_seed(0)
    model = make("resnet8")
    model.train()
    x = torch.rand(8, 3, 32, 32) * torch.linspace(1, 50, 8).view(8, 1, 1, 1)   # large, unlike inputs
    out = model(x, routing="soft")
    assert torch.allclose(out.r, out.r[:1].expand_as(out.r)), "the start depends on the input"
    opt = torch.optim.SGD(model.router_parameters(), lr=0.5)
    labels = torch.randint(0, 10, (8,))
    for _ in range(2):   # fc2 moves first, then fc1 gets a gradient through it
        opt.zero_grad()
        F.cross_entropy(model(x, routing="soft").logits, labels).backward()
        opt.step()
    assert all(b.router.fc1.weight.grad.any() for b in model.blocks)
    out = model(x, routing="soft")
    assert not torch.allclose(out.r, out.r[:1].expand_as(out.r))


def test_stochastic_depth_skips_deeper_blocks_more_in_training_only():
    torch.manual_seed(0)
    model = build_model("resnet20", static_route=(True,) * 9, drop_path=0.5)
    runs = [0] * 9
    for i, b in enumerate(model.blocks):
        b.residual.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    x = torch.rand(2, 3, 32, 32)
    model.train()
    for _ in range(200):
        model(x)
    # block l of 9 runs with probability 1 - 0.5 * l / 9: 0.94 ... 0.5
    assert runs[0] > 170 and 70 < runs[-1] < 130 and runs[0] > runs[4] > runs[-1]
    model.eval()
    runs[:] = [0] * 9
    model(x)
    assert runs == [1] * 9                         # testing runs every block, unscaled (inverted scaling)
    with pytest.raises(ValueError, match="static routes"):
        build_model("resnet20", drop_path=0.5)


def test_block_counts_of_named_archs():
    assert make("resnet110").num_blocks == 54
    assert make("resnet20").num_blocks == 9
    assert make("resnet8").num_blocks == 3
    assert make("resnet50").num_blocks == 16


# ----------------------------------------------------------------------------- soft vs hard

@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_large_beta_soft_routing_matches_hard_routing(arch):
    torch.manual_seed(1)
    size, classes, _, _ = ARCH_CASES[arch]
    model = make(arch, beta=1e4)
    x = torch.rand(8, 3, size, size)
    calibrate_bn(model, x)
    randomize_routers(model)

    with torch.no_grad():
        soft = model(x, routing="soft")
        hard = model(x, routing="hard")
    # the decisions vary with the input, otherwise the comparison says little
    assert (soft.gates != soft.gates[:1]).any(), "routers decide the same for every sample"
    assert 0 < soft.gates.float().mean() < 1
    # precondition: with beta = 1e4 every r is saturated to 0 or 1
    assert torch.minimum(soft.r, 1 - soft.r).max() < 1e-6
    assert torch.equal(soft.gates, hard.gates)
    torch.testing.assert_close(soft.r, hard.r)
    torch.testing.assert_close(soft.logits, hard.logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- hard vs mask

@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_hard_routing_equals_mask_routing_with_router_decisions(arch):
    torch.manual_seed(2)
    size, _, _, _ = ARCH_CASES[arch]
    model = make(arch)
    x = torch.rand(8, 3, size, size)
    calibrate_bn(model, x)
    randomize_routers(model)

    with torch.no_grad():
        hard = model(x, routing="hard")
        mask = model(x, routing="mask")
    assert torch.equal(hard.gates, mask.gates)
    share = hard.gates.float().mean(0)
    assert ((share > 0) & (share < 1)).any(), "no block runs on a strict subset of the batch"
    torch.testing.assert_close(hard.r, mask.r)
    torch.testing.assert_close(hard.logits, mask.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_hard_routing_equals_mask_routing_with_forced_gates(arch):
    torch.manual_seed(3)
    size, _, _, n = ARCH_CASES[arch]
    model = make(arch)
    B = 6
    x = torch.rand(B, 3, size, size)
    calibrate_bn(model, x)

    g = torch.rand(B, n) < 0.5
    g[:, 0] = False   # a block nobody runs
    g[:, 1] = True    # a block everybody runs
    g[0, 2], g[1, 2] = True, False  # and a mixed one for sure
    with torch.no_grad():
        hard = model(x, routing="hard", gates=g)
        mask = model(x, routing="mask", gates=g)
        full = model(x, routing="mask", gates=torch.ones(B, n, dtype=torch.bool))
    assert torch.equal(hard.gates, g) and torch.equal(mask.gates, g)
    torch.testing.assert_close(hard.logits, mask.logits, atol=1e-4, rtol=1e-4)
    # the forced gates really change the network's function
    assert not torch.allclose(hard.logits, full.logits, atol=1e-3)

    for value in (False, True):
        gv = torch.full((B, n), value)
        with torch.no_grad():
            h = model(x, routing="hard", gates=gv)
            m = model(x, routing="mask", gates=gv)
        torch.testing.assert_close(h.logits, m.logits, atol=1e-4, rtol=1e-4)


def test_forced_gates_skip_one_sample_only():
    """Samples are independent in eval: gating a block off for sample 0 leaves sample 1 alone."""
    torch.manual_seed(4)
    model = make("resnet20")
    x = torch.rand(2, 3, 32, 32)
    calibrate_bn(model, x)
    ones = torch.ones(2, 9, dtype=torch.bool)
    g = ones.clone()
    g[0, 4] = False
    with torch.no_grad():
        a = model(x, routing="hard", gates=ones).logits
        b = model(x, routing="hard", gates=g).logits
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], b[0], atol=1e-4)


def test_hard_routing_with_autograd_equals_inference_and_leaves_block_inputs_alone():
    """Without autograd the model scatters into its own activations and hands the pooled features
    of skipped images on; with autograd (the finetune phase) it copies. Same logits either way, and
    a block called from outside does not change its input."""
    torch.manual_seed(10)
    model = make("resnet20")
    x = torch.rand(6, 3, 32, 32)
    calibrate_bn(model, x)
    g = torch.rand(6, 9) < 0.5
    g[0], g[1] = True, False  # every block runs some images and skips others
    with torch.no_grad():
        fast = model(x, routing="hard", gates=g)
    graded = model(x, routing="hard", gates=g)
    torch.testing.assert_close(graded.logits, fast.logits, atol=1e-5, rtol=1e-5)
    graded.logits.sum().backward()
    assert model.blocks[1].residual[0].weight.grad.abs().sum() > 0
    h = torch.randn(6, 16, 32, 32)
    h0 = h.clone()
    with torch.no_grad():
        out = model.blocks[1].gather(h, g[:, 1])
    assert torch.equal(h, h0) and not torch.equal(out, h)


def test_soft_blend_equals_autograd_through_add_relu_lerp():
    torch.manual_seed(11)
    res, sc = (torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.rand(4, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    out = SoftBlend.apply(res, sc, w)
    ref = torch.lerp(sc, F.relu(res + sc), w)  # Eq. 4 as written
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad(out, (res, sc, w), g), torch.autograd.grad(ref, (res, sc, w), g)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(SoftBlend.apply, (res, sc, w))


def test_soft_blend_compiled_has_the_eager_gradients():
    """Under torch.compile the backward writes relu' as sign(h) (a float mask: inductor's CPU code
    stores bool masks slowly); the gradients stay the eager ones, also where h is exactly 0."""
    torch.manual_seed(12)
    sc = torch.randn(4, 3, 5, 5)
    res = torch.where(torch.rand(4, 3, 5, 5) < 0.2, -sc, torch.randn(4, 3, 5, 5))   # h = 0 exactly there
    w, g = torch.rand(4, 1, 1, 1), torch.randn(4, 3, 5, 5)

    def grads(fn):
        xs = [t.clone().requires_grad_() for t in (res, sc, w)]
        return torch.autograd.grad(fn(*xs), xs, g)
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")   # the compiled branch really ran, through inductor
    for a, b in zip(grads(torch.compile(SoftBlend.apply, backend=counter)), grads(SoftBlend.apply)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- skipped blocks

def run_block(block, routing: str, x, g):
    return block.gather(x, g) if routing == "hard" else block.mask(x, g)


@pytest.mark.parametrize("routing", ["hard", "mask"])
def test_skipped_cifar_downsampling_block_outputs_its_pad_shortcut(routing):
    torch.manual_seed(5)
    model = make("resnet20").eval()
    block = model.blocks[3]  # first block of stage 2: 16 -> 32 channels, stride 2
    assert isinstance(block.shortcut, PadShortcut)
    x = torch.randn(3, 16, 32, 32)
    with torch.no_grad():
        out = run_block(block, routing, x, torch.zeros(3, dtype=torch.bool))
        sc = block.shortcut(x)
    assert out.shape == (3, 32, 16, 16)
    assert torch.equal(out, sc)
    # written out: 2x2 average pooling, then 16 zero channels appended
    expected = torch.zeros(3, 32, 16, 16)
    expected[:, :16] = x.view(3, 16, 16, 2, 16, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, 16:], torch.zeros(3, 16, 16, 16))


def test_skipped_cifar_block_via_soft_routing_with_r_zero():
    """Eq. 4 with r ~ 0 (beta large, skip logit far ahead) gives the shortcut too. With beta = 5
    r never drops below sigmoid(-5), so the block's output is only near the shortcut there."""
    torch.manual_seed(6)
    model = make("resnet20", beta=1e4).eval()
    block = model.blocks[3]
    with torch.no_grad():
        block.router.fc2.weight.zero_()
        block.router.fc2.bias.copy_(torch.tensor([-50.0, 50.0]))
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        r = block.route(x, model.cfg.beta)
        out = block.soft(x, r)
    assert (r < 1e-6).all()
    torch.testing.assert_close(out, block.shortcut(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("routing", ["hard", "mask"])
def test_skipped_bottleneck_block_outputs_its_projection_shortcut(routing):
    torch.manual_seed(7)
    model = make("resnet50").eval()
    block = model.blocks[0]  # 64 -> 256 channels: 1x1 projection + BN
    assert isinstance(block.shortcut, nn.Sequential)
    assert isinstance(block.shortcut[0], nn.Conv2d) and block.shortcut[0].kernel_size == (1, 1)
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        out = run_block(block, routing, x, torch.zeros(2, dtype=torch.bool))
        sc = block.shortcut(x)
        proj = block.shortcut[1](F.conv2d(x, block.shortcut[0].weight))
        executed = run_block(block, routing, x, torch.ones(2, dtype=torch.bool))
    assert out.shape == (2, 256, 16, 16)
    assert torch.equal(out, sc)
    torch.testing.assert_close(out, proj)
    assert not torch.allclose(executed, out)

    # stage-2 entry: stride 2 in the projection too
    block = model.blocks[3]
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        out = run_block(block, routing, x, torch.zeros(2, dtype=torch.bool))
    assert out.shape == (2, 512, 8, 8)
    assert torch.equal(out, block.shortcut(x))


def test_skipped_identity_block_passes_input_through():
    torch.manual_seed(8)
    model = make("resnet20").eval()
    block = model.blocks[1]
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        out = block.gather(x, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(out, x)


# ----------------------------------------------------------------------------- Eq. 11 = argmax

@pytest.mark.parametrize("beta", [1e-2, 1.0, 5.0, 1e4])
def test_hard_route_at_half_is_argmax_of_router_logits(beta):
    torch.manual_seed(9)
    logits = torch.randn(2000, 2) * 3
    logits[:5, 1] = logits[:5, 0]  # exact ties: execute (logit[0] >= logit[1])
    r = soft_route(logits, beta)
    assert r.shape == (2000,)
    assert ((r >= 0) & (r <= 1)).all()
    expected = logits[:, 0] >= logits[:, 1]
    assert expected.any() and (~expected).any()
    assert torch.equal(hard_route(r), expected)
    assert torch.equal(hard_route(r, 0.5), expected)
    assert hard_route(r[:5]).all()


def test_soft_route_is_eq3():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-3.0, 1.0]])
    beta = 5.0
    import math
    for row, r in zip(logits.tolist(), soft_route(logits, beta).tolist()):
        e0, e1 = math.exp(row[0]), math.exp(row[1])
        p0, p1 = e0 / (e0 + e1), e1 / (e0 + e1)
        expected = math.exp(beta * p0) / (math.exp(beta * p0) + math.exp(beta * p1))
        assert r == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_model_gates_are_argmax_of_router_logits(arch):
    torch.manual_seed(10)
    size, _, _, n = ARCH_CASES[arch]
    model = make(arch)
    x = torch.rand(8, 3, size, size)
    calibrate_bn(model, x)
    randomize_routers(model)
    for routing in ("hard", "mask", "soft"):
        out, logits = router_logits(model, x, routing)
        assert logits.shape == (8, n, 2)
        argmax = logits[..., 0] >= logits[..., 1]
        assert argmax.any() and (~argmax).any()
        assert torch.equal(out.gates, argmax)
        assert torch.equal(out.r >= 0.5, argmax)
        torch.testing.assert_close(out.r, soft_route(logits, model.cfg.beta))


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_gates_follow_threshold_on_r(threshold):
    """Eq. 11 with another threshold: execute iff r >= threshold, r being that run's own r."""
    torch.manual_seed(11)
    model = make("resnet20")
    x = torch.rand(8, 3, 32, 32)
    calibrate_bn(model, x)
    randomize_routers(model)
    with torch.no_grad():
        out = model(x, routing="hard", threshold=threshold)
    assert torch.equal(out.gates, out.r >= threshold)
    assert out.gates.any() and (~out.gates).any()


def test_unknown_routing_is_rejected():
    model = make("resnet8")
    with pytest.raises(ValueError):
        model(torch.rand(1, 3, 32, 32), routing="sampled")


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw", [
    {"arch": "resnet7"},
    {"arch": "vgg16"},
    {"beta": 0.0},
    {"beta": -1.0},
    {"beta": float("nan")},
    {"num_classes": 1},
    {"num_classes": 0},
])
def test_bad_model_config_raises_value_error(kw):
    args = {"arch": "resnet20", "num_classes": 10, "input_size": 32, "beta": 5.0, **kw}
    with pytest.raises(ValueError):
        ModelConfig(**args)
    with pytest.raises(ValueError):
        build_model(args.pop("arch"), args.pop("num_classes"), args.pop("input_size"), **args)


def test_good_model_config_is_accepted():
    cfg = ModelConfig("resnet20", num_classes=2, input_size=32, beta=1e-3)
    assert cfg.num_classes == 2
    assert build_model("resnet20", num_classes=2, beta=1e-3).cfg == cfg


def test_infinite_beta_is_rejected():
    # softmax(inf * p) is NaN: every r and logit would be NaN and hard routing would skip everything
    with pytest.raises(ValueError, match="beta"):
        build_model("resnet8", beta=float("inf"))


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_route_intervals_are_the_hard_routes_of_every_threshold_in_the_window(arch):
    """One routed pass gives, per image, each route it takes as t sweeps (lo, hi]: at every t,
    the row whose interval holds t is exactly forward(hard, threshold=t)'s route."""
    torch.manual_seed(0)
    model = make(arch).eval()
    randomize_routers(model, std=0.3)       # r spread over (0, 1), many of them inside the window
    size, _, _, n = ARCH_CASES[arch]
    x = torch.rand(6, 3, size, size)
    image, t_lo, t_hi, gates = model.route_intervals(x, 0.25, 0.75)   # float32 values: compared exactly
    assert gates.shape == (image.shape[0], n) and image.shape[0] > 6   # routes did split
    for i in range(6):   # each image's intervals tile (0.25, 0.75] without overlap
        lo, hi = t_lo[image == i].sort().values, t_hi[image == i].sort().values
        assert lo[0] == 0.25 and hi[-1] == 0.75 and torch.equal(lo[1:], hi[:-1])
    # inside each step of the cost curve (at a step's end r itself is t: a batch of another size
    # may round r the other way)
    edges = torch.cat([t_lo, t_hi]).unique()
    for t in ((edges[1:] + edges[:-1]) / 2)[edges.diff() > 1e-5].float().tolist():
        row = (t_lo < t) & (t <= t_hi)
        assert torch.equal(image[row].sort().values, torch.arange(6))    # one route per image
        want = model(x, routing="hard", threshold=t).gates
        assert torch.equal(gates[row][image[row].argsort()], want), t


# ----------------------------------------------------------------------------- router leak

def test_leak_keeps_eq3_values_and_floors_the_gradient_of_a_saturated_router():
    from drn.router import soft_route
    logits = torch.tensor([[-20.0, 20.0], [0.3, -0.2], [20.0, -20.0]], requires_grad=True)
    plain = soft_route(logits, 5.0)
    leaky = soft_route(logits, 5.0, leak=0.05)
    assert torch.equal(plain, leaky)                                    # forward: Eq. 3 exactly
    g_plain, = torch.autograd.grad(plain.sum(), logits)
    g_leaky, = torch.autograd.grad(leaky.sum(), logits)
    assert g_plain[0].abs().max() < 1e-12 and g_plain[2].abs().max() < 1e-12   # closed/open: no gradient
    torch.testing.assert_close(g_leaky[0], torch.tensor([0.05, -0.05]))          # the floor: d(r)/d(gap) = leak
    torch.testing.assert_close(g_leaky[1], g_plain[1] + torch.tensor([0.05, -0.05]))
    with torch.no_grad():
        assert torch.equal(soft_route(logits, 5.0, leak=0.05), plain)


def test_leak_changes_no_forward_of_the_model():
    torch.manual_seed(12)
    a = make("resnet20")
    b = build_model("resnet20", leak=0.05)
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 3, 32, 32)
    for routing in ("soft", "hard", "mask"):
        oa, ob = a(x, routing=routing), b(x, routing=routing)
        assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.gates, ob.gates)


# ----------------------------------------------------------------------------- straight-through training

@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_straight_routing_runs_the_hard_route_forward_and_trains_the_routers(arch):
    """routing="straight": the forward pass is Eq. 11's hard route (the same logits as `mask`),
    the routers get Eq. 3's gradient through r, and a block's weights learn only from the images
    that run it."""
    torch.manual_seed(3)
    model = make(arch)
    randomize_routers(model)
    size = ARCH_CASES[arch][0]
    x = torch.rand(6, 3, size, size)
    model.train()
    out = model(x, routing="straight")
    g = out.gates
    assert 0 < g.float().mean() < 1                              # some blocks run, some are skipped
    with torch.no_grad():
        ref = model(x, routing="mask", gates=g)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    out.logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in model.blocks for p in b.router.parameters())
    # a block that no image runs gets no gradient on its weights, but its router does
    model.zero_grad(set_to_none=True)
    forced = g.clone()
    forced[:, 1] = False
    model(x, routing="straight", gates=forced).logits.square().sum().backward()
    assert model.blocks[1].residual[0].weight.grad.abs().sum() == 0
    assert model.blocks[1].router.fc2.weight.grad.abs().sum() > 0


def test_a_full_pass_trains_the_blocks_the_routers_skip_and_leaves_the_running_statistics():
    """`train_step(full_pass=w)` adds the cross-entropy of the full network (supernet training): a
    block that every router skips trains on every image, while BN's running statistics -- what
    testing normalises with -- stay those of the routed pass."""
    import copy

    from drn.losses import LossWeights
    from drn.train import train_step
    torch.manual_seed(4)
    base = make("resnet8")
    with torch.no_grad():
        base.blocks[1].router.open_(0.1)                          # skipped by every image
    x, y = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    after = {}
    for w in (0.0, 1.0):
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, _, out, _ = train_step(model, opt, x, y, torch.Generator().manual_seed(0), views=2, finetune=False,
                                  cost_norm=torch.full((3,), 1 / 3), mu=0.05, weights=LossWeights(0.2, 0.2, 0.5, 0.2, 0.5),
                                  routing="straight", full_pass=w)
        assert not out.gates[:, 1].any()
        after[w] = model
    w0 = base.blocks[1].residual[0].weight
    assert torch.equal(after[0.0].blocks[1].residual[0].weight, w0)        # skipped: no gradient
    assert not torch.equal(after[1.0].blocks[1].residual[0].weight, w0)    # the full pass trains it
    stats = lambda m: [b for k, b in m.state_dict().items() if "running" in k]
    assert all(torch.equal(a, b) for a, b in zip(stats(after[0.0]), stats(after[1.0])))


def test_logit_gap_inverts_eq3_and_a_router_shift_moves_every_gap_by_the_same_amount():
    torch.manual_seed(0)
    logits = 3 * torch.randn(10_000, 2)
    d = logits[:, 0] - logits[:, 1]
    back = logit_gap(soft_route(logits, 5.0), 5.0)
    near = d.abs() < 4                                  # float32 r resolves the gap well there
    assert near.sum() > 5000 and (back - d)[near].abs().max() < 1e-3
    assert hard_route(soft_route(logits, 5.0), 0.3).equal(back >= logit_gap(torch.tensor(0.3), 5.0) - 1e-6)
    router = Router(16, 8)
    torch.nn.init.normal_(router.fc2.weight)
    z = torch.randn(64, 16, 1, 1)
    before = router(z)
    router.shift_(0.7)
    after = router(z)
    gap = lambda l: l[:, 0] - l[:, 1]
    assert torch.allclose(gap(after) - gap(before), torch.full((64,), 0.7), atol=1e-5)
