"""The cost table of Eq. 7/8 (drn/cost.py): FLOPs per block, fixed cost, route FLOPs, all
checked against torch.utils.flop_counter and against the FLOPs written out by hand."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from drn.cost import CostTable, measure_cost_table
from drn.models import build_model

HIDDEN = 32  # router hidden width (ModelConfig default)


def counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn(*args)
    return int(counter.get_total_flops())


def router_flops(cin: int, hidden: int = HIDDEN) -> int:
    return 2 * (cin * hidden + hidden * 2)


def cifar_flops(depth: int, classes: int = 10):
    """FLOPs (2 x MACs) of a routed CIFAR ResNet of `depth` on a 32x32 image, by hand:
    (blocks, stem, head, routers)."""
    n = (depth - 2) // 6
    stem = 2 * 3 * 16 * 9 * 32 * 32
    blocks, routers = [], 0
    cin, size = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for j in range(n):
            stride = 2 if (stage > 0 and j == 0) else 1
            out = size // stride
            conv1 = cin * width * 9 * out * out
            conv2 = width * width * 9 * out * out
            blocks.append(2 * (conv1 + conv2))
            routers += router_flops(cin)
            cin, size = width, out
    head = 2 * 64 * classes
    return blocks, stem, head, routers


def resnet50_flops(size: int = 64, classes: int = 200):
    """Same for ResNet-50 (bottlenecks, stride in the 3x3 conv): (blocks, stem, head, routers,
    projection shortcuts)."""
    s = size // 2                                   # 7x7/2 conv
    stem = 2 * 3 * 64 * 49 * s * s
    s //= 2                                         # 3x3/2 max pool
    blocks, routers, shortcuts = [], 0, 0
    cin = 64
    for stage, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(n):
            stride = 2 if (stage > 0 and j == 0) else 1
            out = s // stride
            cout = 4 * planes
            macs = cin * planes * s * s + planes * planes * 9 * out * out + planes * cout * out * out
            blocks.append(2 * macs)
            routers += router_flops(cin)
            if stride != 1 or cin != cout:
                shortcuts += 2 * cin * cout * out * out
            cin, s = cout, out
    head = 2 * 2048 * classes
    return blocks, stem, head, routers, shortcuts


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20")


@pytest.fixture(scope="module")
def resnet110():
    torch.manual_seed(0)
    return build_model("resnet110")


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_model("resnet50", num_classes=200, input_size=64)


# ----------------------------------------------------------------------------- known numbers

def test_basic_block_16_channels_32px(resnet20):
    analytic = 2 * (2 * 16 * 16 * 9 * 32 * 32)    # two 3x3 convs, 2 FLOPs per MAC
    assert analytic == 9437184
    table = measure_cost_table(resnet20)
    assert table.block[0] == 9437184
    assert table.block[0] == pytest.approx(2 * 4.72e6, rel=1e-3)
    assert all(table.block[i] == 9437184 for i in range(3))  # the whole first stage


def test_resnet20_table_matches_hand_count(resnet20):
    blocks, stem, head, routers = cifar_flops(20)
    table = measure_cost_table(resnet20)
    assert table.num_blocks == 9
    assert list(table.block) == [float(b) for b in blocks]
    assert table.router == routers
    # parameter-free pad shortcuts cost nothing: fixed = stem + head + routers exactly
    assert table.fixed == stem + head + routers
    assert table.full == stem + head + routers + sum(blocks)


def test_resnet110_full_flops(resnet110):
    table = measure_cost_table(resnet110)
    assert table.num_blocks == 54
    assert table.full == pytest.approx(5.06e8, rel=5e-3)
    assert 0 < table.router < 0.01 * table.full
    assert table.fixed + sum(table.block) == table.full
    assert table.fixed >= table.router
    blocks, stem, head, routers = cifar_flops(110)
    assert list(table.block) == [float(b) for b in blocks]
    assert table.fixed == stem + head + routers
    d = table.to_dict()
    assert d["flops_full"] == table.full and d["num_blocks"] == 54 and d["flops_routers"] == table.router
    assert d["flops_blocks"] == list(table.block)


def test_router_cost_below_one_percent_of_its_block(resnet110):
    """Fig. 2b: a router costs less than 1% of the convolutional block."""
    table = measure_cost_table(resnet110)
    cins = [16] * 18 + [16] + [32] * 17 + [32] + [64] * 17
    for cin, b in zip(cins, table.block):
        assert router_flops(cin) < 0.01 * b


# ----------------------------------------------------------------------------- flop counter

def test_full_equals_flop_counter_of_mask_routing(resnet20):
    table = measure_cost_table(resnet20)
    torch.manual_seed(1)
    resnet20.eval()
    x = torch.rand(1, 3, 32, 32)
    assert counted(lambda t: resnet20(t, routing="mask"), x) == table.full
    # mask routing runs every block whatever the gates say
    gates = torch.zeros(1, 9, dtype=torch.bool)
    assert counted(lambda t: resnet20(t, routing="mask", gates=gates), x) == table.full


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_route_cost_equal_flop_counter_of_hard_routing(arch, resnet20, resnet50):
    """What the table predicts for a route is what gather/scatter routing actually computes."""
    model = resnet20 if arch == "resnet20" else resnet50
    model.eval()
    table = measure_cost_table(model)
    size = model.cfg.input_size
    n = model.num_blocks
    torch.manual_seed(2)
    x = torch.rand(1, 3, size, size)
    routes = [torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool),
              torch.rand(1, n) < 0.5, torch.arange(n).view(1, n) % 3 == 0]
    for g in routes:
        flops = counted(lambda t: model(t, routing="hard", gates=g), x)
        assert flops == pytest.approx(table.route_cost(g).item(), rel=1e-6)
    assert counted(lambda t: model(t, routing="hard", gates=routes[0]), x) == table.fixed
    assert counted(lambda t: model(t, routing="hard", gates=routes[1]), x) == table.full


def test_measure_cost_table_leaves_model_alone(resnet20):
    resnet20.train()
    state = {k: v.clone() for k, v in resnet20.state_dict().items()}
    measure_cost_table(resnet20)
    assert resnet20.training
    for k, v in resnet20.state_dict().items():
        assert torch.equal(v, state[k]), k
    resnet20.eval()
    measure_cost_table(resnet20)
    assert not resnet20.training
    # no hooks left behind
    assert all(not b._forward_pre_hooks for b in resnet20.blocks)


# ----------------------------------------------------------------------------- resnet50

def test_resnet50_projection_shortcuts_are_fixed_cost(resnet50):
    table = measure_cost_table(resnet50)
    assert table.num_blocks == 16
    resnet50.eval()
    x = torch.rand(1, 3, 64, 64)
    assert table.fixed + sum(table.block) == counted(lambda t: resnet50(t, routing="mask"), x)
    blocks, stem, head, routers, shortcuts = resnet50_flops()
    assert list(table.block) == [float(b) for b in blocks]
    assert table.router == routers
    assert shortcuts > 0
    # fixed = stem + head + routers + the four 1x1 projections, nothing else
    assert table.fixed == stem + head + routers + shortcuts
    n_proj = sum(isinstance(b.shortcut, nn.Sequential) for b in resnet50.blocks)
    assert n_proj == 4


# ----------------------------------------------------------------------------- route_cost

def small_table() -> CostTable:
    return CostTable(block=(10.0, 20.0, 30.0, 40.0), fixed=5.0, router=1.0)


def test_route_cost_extremes_and_hand_route(resnet110):
    table = measure_cost_table(resnet110)
    n = table.num_blocks
    ones = torch.ones(3, n, dtype=torch.bool)
    zeros = torch.zeros(3, n, dtype=torch.bool)
    torch.testing.assert_close(table.route_cost(ones), torch.full((3,), table.full), rtol=1e-6, atol=0)
    torch.testing.assert_close(table.route_cost(zeros), torch.full((3,), table.fixed), rtol=1e-6, atol=0)
    pick = [0, 17, 18, 53]
    g = torch.zeros(1, n, dtype=torch.bool)
    g[0, pick] = True
    expected = table.fixed + sum(table.block[i] for i in pick)
    assert table.route_cost(g).item() == pytest.approx(expected, rel=1e-6)


def test_route_cost_small_table_hard_and_soft():
    table = small_table()
    assert table.full == 105.0
    gates = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert table.route_cost(gates).tolist() == [45.0, 5.0, 105.0]
    # soft r: expected FLOPs
    r = torch.tensor([[0.5, 0.25, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    expected = [5 + 0.5 * 10 + 0.25 * 20 + 0 + 40, 5 + 1 + 4 + 9 + 16]
    torch.testing.assert_close(table.route_cost(r), torch.tensor(expected))
    # integer 0/1 routes too
    assert table.route_cost(gates.long()).tolist() == [45.0, 5.0, 105.0]


def test_normalized_costs():
    table = small_table()
    c = table.normalized()
    torch.testing.assert_close(c, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert table.block_tensor().dtype == torch.float32
    assert table.num_blocks == 4
