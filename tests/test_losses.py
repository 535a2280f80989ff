"""The Eq. 9 objective and its parts (drn/losses.py), against hand-computed numbers and plain
Python reference loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from drn.losses import (LossWeights, consistency_loss, cost_loss, distill_loss, diversity_loss, drn_loss,
                        regularization_loss)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def py_mean(vectors):
    n = len(vectors[0])
    return [sum(v[k] for v in vectors) / len(vectors) for k in range(n)]


def py_dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


# ----------------------------------------------------------------------------- consistency (Eq. 5)

def test_consistency_is_zero_inside_the_margin():
    torch.manual_seed(0)
    L, M, n, d_c = 6, 4, 5, 0.2
    base = torch.rand(L, 1, n)
    routes = base + (torch.rand(L, M, n) - 0.5) * 0.02   # every view within 0.045 of its mean
    routes.requires_grad_(True)
    loss = consistency_loss(routes, d_c)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(routes.grad, torch.zeros_like(routes))


def test_consistency_hand_computed():
    # L = 2 samples, M = 2 views, n = 2 blocks
    # group 0: (0, 0) and (0.6, 0.8): mean (0.3, 0.4), both views 0.5 away
    # group 1: (1, 0) and (1, 0.2):   mean (1, 0.1),  both views 0.1 away (inside d_c = 0.2)
    routes = t([[[0.0, 0.0], [0.6, 0.8]],
                [[1.0, 0.0], [1.0, 0.2]]])
    expected = ((0.5 - 0.2) ** 2 + (0.5 - 0.2) ** 2 + 0.0 + 0.0) / (2 * 2)   # = 0.045
    assert consistency_loss(routes, 0.2).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.045)
    # M = 3, uneven distances: (0, 0), (0, 0), (0.9, 0) -> mean (0.3, 0): distances 0.3, 0.3, 0.6
    routes = t([[[0.0, 0.0], [0.0, 0.0], [0.9, 0.0]]])
    expected = (2 * (0.3 - 0.2) ** 2 + (0.6 - 0.2) ** 2) / 3
    assert consistency_loss(routes, 0.2).item() == pytest.approx(expected, abs=1e-12)
    # no margin: the mean squared distance to the group mean
    assert consistency_loss(routes, 0.0).item() == pytest.approx((0.09 + 0.09 + 0.36) / 3, abs=1e-12)


def test_consistency_matches_python_loops_on_random_routes():
    torch.manual_seed(1)
    L, M, n, d_c = 5, 3, 4, 0.1
    routes = torch.rand(L, M, n, dtype=torch.float64)
    rows = routes.tolist()
    total = 0.0
    for i in range(L):
        center = py_mean(rows[i])
        for j in range(M):
            total += max(0.0, py_dist(rows[i][j], center) - d_c) ** 2
    assert consistency_loss(routes, d_c).item() == pytest.approx(total / (L * M), rel=1e-12)


# ----------------------------------------------------------------------------- diversity (Eq. 6)

def py_diversity(routes, d_d):
    centers = [py_mean(group) for group in routes]
    L = len(centers)
    total = 0.0
    for i in range(L):
        for j in range(L):
            if i != j:
                total += max(0.0, d_d - py_dist(centers[i], centers[j])) ** 2
    return total / (L * (L - 1))


def test_diversity_is_zero_when_group_means_are_far_apart():
    # group means on corners of the unit cube: pairwise distances >= 1 > d_d = 0.5
    corners = t([[0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    jitter = t([[0.05, -0.05, 0.0], [-0.05, 0.05, 0.0]])  # two views, mean jitter 0
    routes = corners[:, None, :] + jitter[None]
    assert diversity_loss(routes, 0.5).item() == 0.0
    # exactly at the margin counts as far enough
    routes = t([[[0.0, 0.0]], [[0.3, 0.4]]])
    assert diversity_loss(routes, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_diversity_hand_computed():
    # group means (0, 0), (0.3, 0.4), (0, 0.1), each from two views +-(0.1, 0)
    # distances: d01 = 0.5 (no penalty at d_d = 0.5), d02 = 0.1, d12 = sqrt(0.09 + 0.09)
    centers = [(0.0, 0.0), (0.3, 0.4), (0.0, 0.1)]
    routes = t([[[cx - 0.1, cy], [cx + 0.1, cy]] for cx, cy in centers])
    d02 = 0.1
    d12 = math.sqrt(0.3 ** 2 + 0.3 ** 2)
    pair_sum = 0.0 + (0.5 - d02) ** 2 + (0.5 - d12) ** 2      # unordered pairs
    expected = 2 * pair_sum / (3 * 2)                         # ordered pairs, 1/(L(L-1))
    assert diversity_loss(routes, 0.5).item() == pytest.approx(expected, abs=1e-12)
    # two groups only: ((0.7 - 0.5)^2 * 2) / 2 = 0.04
    assert diversity_loss(routes[:2], 0.7).item() == pytest.approx(0.04, abs=1e-12)


def test_diversity_matches_double_loop_on_random_routes():
    torch.manual_seed(2)
    L, M, n = 7, 3, 5
    routes = torch.rand(L, M, n, dtype=torch.float64)
    for d_d in (0.5, 1.0, 2.0):
        expected = py_diversity(routes.tolist(), d_d)
        assert expected > 0
        assert diversity_loss(routes, d_d).item() == pytest.approx(expected, rel=1e-12)
    # float32 input agrees as well
    assert diversity_loss(routes.float(), 1.0).item() == pytest.approx(py_diversity(routes.tolist(), 1.0), rel=1e-5)


def test_diversity_of_single_group_is_zero_and_differentiable():
    routes = torch.rand(1, 3, 4, requires_grad=True)
    loss = diversity_loss(routes, 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(routes.grad, torch.zeros_like(routes))


def test_diversity_gradients_finite_when_group_means_coincide():
    torch.manual_seed(3)
    routes = torch.rand(4, 2, 5)
    routes[1] = routes[0]                 # groups 0 and 1 have the same mean route
    routes[3] = routes[2].flip(0)         # different views, same mean
    routes.requires_grad_(True)
    loss = diversity_loss(routes, 0.5)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(routes.grad).all()


def test_diversity_gradients_finite_when_all_views_identical():
    routes = torch.full((3, 2, 4), 0.5, requires_grad=True)  # every distance is zero
    loss = diversity_loss(routes, 0.5)
    assert loss.item() == pytest.approx(0.25)             # every pair pays d_d^2
    loss.backward()
    assert torch.isfinite(routes.grad).all()


def test_diversity_gradient_pushes_group_means_apart():
    routes = t([[[0.4, 0.5]], [[0.6, 0.5]]]).requires_grad_(True)
    diversity_loss(routes, 0.5).backward()
    # descending the loss moves group 0 left and group 1 right along the first block
    assert routes.grad[0, 0, 0] > 0 and routes.grad[1, 0, 0] < 0


# ----------------------------------------------------------------------------- regularisation (Eq. 10)

def test_regularization_hand_computed():
    # group 0: (0, 0), (0.6, 0.8) -> 0.5 each; group 1: (1, 1) twice -> 0
    routes = t([[[0.0, 0.0], [0.6, 0.8]],
                [[1.0, 1.0], [1.0, 1.0]]])
    assert regularization_loss(routes).item() == pytest.approx((0.5 + 0.5 + 0 + 0) / 4, abs=1e-12)
    # M = 3: (0, 0), (0, 0), (0.9, 0) -> 0.3, 0.3, 0.6 -- no square, no margin
    routes = t([[[0.0, 0.0], [0.0, 0.0], [0.9, 0.0]]])
    assert regularization_loss(routes).item() == pytest.approx(0.4, abs=1e-12)


def test_regularization_matches_python_loops_on_random_routes():
    torch.manual_seed(4)
    routes = torch.rand(4, 3, 6, dtype=torch.float64)
    rows = routes.tolist()
    dists = [py_dist(v, py_mean(group)) for group in rows for v in group]
    assert regularization_loss(routes).item() == pytest.approx(sum(dists) / len(dists), rel=1e-12)


def test_regularization_is_zero_for_identical_views_with_finite_gradient():
    torch.manual_seed(5)
    routes = torch.rand(3, 1, 4).expand(3, 2, 4).clone().requires_grad_(True)
    loss = regularization_loss(routes)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(routes.grad).all()


# ----------------------------------------------------------------------------- cost (Eq. 8)

def normalized_cost(n: int) -> torch.Tensor:
    c = torch.arange(1.0, n + 1) ** 2
    return c / c.sum()


def test_cost_loss_bounds_and_extremes():
    torch.manual_seed(6)
    n = 6
    cost = normalized_cost(n)
    assert cost.sum().item() == pytest.approx(1.0)
    assert cost_loss(torch.ones(4, 2, n), cost).item() == pytest.approx(1.0, abs=1e-6)
    assert cost_loss(torch.zeros(4, 2, n), cost).item() == 0.0
    for _ in range(5):
        r = torch.rand(4, 2, n)
        v = cost_loss(r, cost).item()
        assert 0.0 <= v <= 1.0
    # a hand example: one sample runs blocks 0 and 5, the other nothing
    r = torch.zeros(2, n)
    r[0, 0] = r[0, 5] = 1
    assert cost_loss(r, cost).item() == pytest.approx((1 + 36) / 91 / 2, rel=1e-6)


def test_cost_loss_weights_expensive_blocks_more():
    cost = normalized_cost(3)  # 1/14, 4/14, 9/14
    cheap = torch.tensor([[1.0, 0.0, 0.0]])
    dear = torch.tensor([[0.0, 0.0, 1.0]])
    assert cost_loss(cheap, cost).item() == pytest.approx(1 / 14)
    assert cost_loss(dear, cost).item() == pytest.approx(9 / 14)


# ----------------------------------------------------------------------------- total (Eq. 9)

@pytest.mark.parametrize("w,mu", [
    (LossWeights(), 0.05),
    (LossWeights(lam=0.4, alpha=0.4, gamma=0.1, d_c=0.05, d_d=1.5), 0.7),
    (LossWeights(lam=0.0, alpha=0.0, gamma=0.0), 0.0),
])
def test_drn_loss_is_the_weighted_sum_of_its_parts(w, mu):
    torch.manual_seed(7)
    L, M, n, classes = 5, 2, 6, 4
    logits = torch.randn(L * M, classes, requires_grad=True)
    labels = torch.randint(0, classes, (L,)).repeat_interleave(M)
    routes = torch.rand(L, M, n, requires_grad=True)
    cost = normalized_cost(n)

    total, parts = drn_loss(logits, labels, routes, cost, mu, w)
    assert set(parts) == {"cls", "consistency", "diversity", "cost", "reg", "rate"}
    assert parts["rate"].item() == 0.0   # no rate target: no rate term
    for name, v in parts.items():
        assert v.grad_fn is None and not v.requires_grad, f"{name} is not detached"
        assert v.dim() == 0

    # each part recomputed independently
    ce = -sum(torch.log_softmax(logits[k], 0)[labels[k]].item() for k in range(L * M)) / (L * M)
    assert parts["cls"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["consistency"].item() == pytest.approx(consistency_loss(routes, w.d_c).item(), rel=1e-6)
    assert parts["diversity"].item() == pytest.approx(py_diversity(routes.tolist(), w.d_d), rel=1e-5, abs=1e-7)
    assert parts["cost"].item() == pytest.approx(cost_loss(routes, cost).item(), rel=1e-6)
    assert parts["reg"].item() == pytest.approx(regularization_loss(routes).item(), rel=1e-6)

    expected = (parts["cls"] + w.lam * parts["consistency"] + w.alpha * parts["diversity"]
                + mu * parts["cost"] + w.gamma * parts["reg"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["diversity"].item() > 0 or w.d_d <= 0.5

    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert routes.grad is not None and torch.isfinite(routes.grad).all()
    if mu == 0 and w.lam == w.alpha == w.gamma == 0:
        assert torch.equal(routes.grad, torch.zeros_like(routes))
    else:
        assert routes.grad.abs().sum() > 0


def test_drn_loss_weights_each_term_separately():
    """Switch on one weight at a time: total - cls is exactly that weighted term."""
    torch.manual_seed(8)
    L, M, n = 4, 3, 5
    logits = torch.randn(L * M, 3)
    labels = torch.randint(0, 3, (L,)).repeat_interleave(M)
    routes = torch.rand(L, M, n)
    cost = normalized_cost(n)
    zero = dict(lam=0.0, alpha=0.0, gamma=0.0, d_c=0.0, d_d=1.0)
    cls = F.cross_entropy(logits, labels).item()
    cases = [("lam", "consistency"), ("alpha", "diversity"), ("gamma", "reg")]
    for weight, part in cases:
        total, parts = drn_loss(logits, labels, routes, cost, 0.0, LossWeights(**{**zero, weight: 3.0}))
        assert parts[part].item() > 0
        assert total.item() - cls == pytest.approx(3.0 * parts[part].item(), rel=1e-5)
    total, parts = drn_loss(logits, labels, routes, cost, 3.0, LossWeights(**zero))
    assert total.item() - cls == pytest.approx(3.0 * parts["cost"].item(), rel=1e-5)


def test_consistency_on_executed_routes_sees_views_that_run_different_blocks():
    """Two views of an image whose block 0 sits either side of Eq. 11's 0.5: their soft routes are
    0.04 apart (Eq. 5 silent at d_c = 0.2), the routes they ran differ by a whole block. On the
    executed routes Eq. 5 is (0.5 - 0.2)^2 per view, and its gradient, through the straight-through
    r, pulls the two views' r of that block towards each other -- and only that block's."""
    from drn.router import hard_route, straight_through
    r = t([[[0.52, 0.9, 0.1], [0.48, 0.9, 0.1]]]).requires_grad_()   # (L=1, M=2, n=3)
    ran = straight_through(hard_route(r.detach()), r)
    assert consistency_loss(r, 0.2).item() == 0.0
    loss = consistency_loss(ran, 0.2)
    assert loss.item() == pytest.approx(0.3 ** 2)
    loss.backward()
    g = r.grad[0]
    assert g[0, 0] > 0 > g[1, 0]                     # descent: view 0's r down, view 1's up
    assert torch.all(g[:, 1:] == 0)
    w = LossWeights()
    logits, labels, cost = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), t([0.5, 0.3, 0.2])
    _, soft = drn_loss(logits, labels, r, cost, 0.05, w)
    _, executed = drn_loss(logits, labels, r, cost, 0.05, w, run=ran)
    assert executed["consistency"] == pytest.approx(0.09) and soft["consistency"] == 0
    assert executed["reg"] == pytest.approx(0.5) and soft["reg"] == pytest.approx(0.02)
    assert executed["diversity"] == soft["diversity"] and executed["cost"] == soft["cost"]


def test_distill_loss_hand_computed_and_zero_on_the_teachers_own_outputs():
    """t^2 KL(p_teacher || p_student) at temperature t, mean over the batch."""
    s, t = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    ps, pt = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-0.5))  # softmax of (2, 0) / 4
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))      # row 2: equal, 0
    assert distill_loss(s, t, 4.0).item() == pytest.approx(16 * kl.item() / 2, rel=1e-5)
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(5, 10, requires_grad=True)
    distill_loss(logits, torch.randn(5, 10)).backward()
    assert logits.grad.abs().sum() > 0
