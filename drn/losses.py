"""The training objective of Eq. 9 and its parts (Eq. 5, 6, 8, 10), vectorised over the batch.

Routes arrive grouped: `routes` is (L, M, n) -- L samples of the batch, M augmented views of
each (the similar inputs of H1), n routable blocks, values r in [0, 1] (Eq. 3).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    lam: float = 0.2     # lambda, consistency weight (0.4 on Tiny-ImageNet)
    alpha: float = 0.2   # diversity weight (0.4 on Tiny-ImageNet)
    gamma: float = 0.5   # regularisation weight
    d_c: float = 0.2     # consistency margin (L2 distance in route space)
    d_d: float = 0.5     # diversity margin (L2 distance in route space)
    rate: float = 0.0    # weight of the per-block execution-rate loss (rate_loss; not in the paper)


def consistency_loss(routes: torch.Tensor, d_c: float) -> torch.Tensor:
    """Eq. 5: mean over samples and views of [||route_ij - mean_j route_ij|| - d_c]_+^2."""
    center = routes.mean(dim=1, keepdim=True)                          # (L, 1, n)
    dist = torch.linalg.vector_norm(routes - center, dim=-1)           # (L, M)
    return F.relu(dist - d_c).square().mean()


def diversity_loss(routes: torch.Tensor, d_d: float) -> torch.Tensor:
    """Eq. 6: mean over ordered pairs i != j of [d_d - ||mean route_i - mean route_j||]_+^2."""
    centers = routes.mean(dim=1)                                       # (L, n)
    L = centers.shape[0]
    if L < 2:
        return centers.sum() * 0.0
    # explicit differences rather than cdist: exact, and the norm's gradient is 0 (not NaN) at 0
    dist = torch.linalg.vector_norm(centers[:, None] - centers[None], dim=-1)  # (L, L)
    off_diagonal = 1 - torch.eye(L, dtype=dist.dtype, device=routes.device)   # a product, not a mask index: no host sync
    return (F.relu(d_d - dist).square() * off_diagonal).sum() / (L * (L - 1))


def cost_loss(r: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Eq. 8 with c_i normalised to sum to 1 (`CostTable.normalized`): the expected share of the
    routable FLOPs that a sample executes, in [0, 1], averaged over the batch. The normalisation
    makes mu comparable across architectures and input sizes.  r (..., n), cost (n,)"""
    return (r @ cost).mean()


def rate_loss(r: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ConvNet-AIG's target-rate loss: mean over blocks of the squared distance of the block's
    execution rate over the batch (the mean of r) to its target, a rate (n,) or a band (2, n) of
    [low; high] rates (0 inside it). Eq. 8 prices the mean route only, so it is as happy with a
    static route as with routes that vary; this term asks every block to run on a share of the
    images, which the routers can only meet by telling images apart.
    r (..., n), target (n,) or (2, n) in [0, 1]"""
    rate = r.reshape(-1, r.shape[-1]).mean(0)
    lo, hi = (target, target) if target.dim() == 1 else target
    return (F.relu(lo - rate).square() + F.relu(rate - hi).square()).mean()


DISTILL_T = 4.0   # distillation temperature (Hinton et al.; 4 is the usual choice on CIFAR)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, t: float = DISTILL_T) -> torch.Tensor:
    """KL(softmax(teacher / t) || softmax(student / t)) * t^2, mean over the batch (Hinton et al.:
    the t^2 keeps its gradient's scale that of the cross-entropy's)."""
    return F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def regularization_loss(routes: torch.Tensor) -> torch.Tensor:
    """Eq. 10: (1/L) sum_i ||r_i - mean(route_{i,:})||_2.

    The paper leaves the indices open. We read route_{i,:} as Eq. 5's route^{i,.} (sample i under
    all of its augmentations) and r_i as each of those routes, giving the mean L2 distance of a
    view's route to its group's mean route -- Eq. 5 without margin and without the square.
    Why this reading: (a) it uses Eq. 5's own notation for "sample i, all augmentations";
    (b) the alternatives fight the other terms -- pulling each route to the batch mean undoes
    Eq. 6 (diversity), pulling a route's entries to their own mean forces all blocks of a sample
    to the same decision; (c) it serves the purpose the paper gives next to it, the gap between
    soft training and hard testing: inside the consistency margin Eq. 5 is silent, while this
    term keeps a constant-size pull towards one path per image, so hard routing (Eq. 11) of an
    augmented image agrees with the original's -- exactly what the same-path experiment
    measures.
    """
    center = routes.mean(dim=1, keepdim=True)
    return torch.linalg.vector_norm(routes - center, dim=-1).mean()


def drn_loss(logits: torch.Tensor, labels: torch.Tensor, routes: torch.Tensor, cost: torch.Tensor,
             mu: float, w: LossWeights, run: torch.Tensor | None = None,
             rate_target: torch.Tensor | None = None,
             rate_run: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 9. logits (L*M, classes) and labels (L*M,) in the same sample-major order as routes
    (L, M, n), the soft r of Eq. 3. run (L, M, n): the routes the views ran, if Eq. 5 and Eq. 10
    are to compare those (TrainConfig.consistency_routes); None: r. rate_target (n,): the blocks'
    target execution rates of rate_loss (weight w.rate; None: no such term); rate_run (L, M, n): the
    routes whose rates it reads (None: r). Returns the total and its detached parts."""
    run = routes if run is None else run
    parts = {
        "cls": F.cross_entropy(logits, labels),
        "consistency": consistency_loss(run, w.d_c),
        "diversity": diversity_loss(routes, w.d_d),
        "cost": cost_loss(routes, cost),
        "reg": regularization_loss(run),
        "rate": rate_loss(routes if rate_run is None else rate_run, rate_target) if rate_target is not None else routes.sum() * 0.0,
    }
    total = (parts["cls"] + w.lam * parts["consistency"] + w.alpha * parts["diversity"]
             + mu * parts["cost"] + w.gamma * parts["reg"])
    if rate_target is not None and w.rate > 0:
        total = total + w.rate * parts["rate"]
    return total, {k: v.detach() for k, v in parts.items()}
