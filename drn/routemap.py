"""The routes as a picture (the paper's Fig. 5 and Fig. 7): images grouped by the route they take,
and the number of distinct routes per epoch of training.

    routes_png(path, images, labels, preds, gates, history)

Left: a row per frequent route, most frequent first -- its blocks (filled: executed), the share
of the split's images that take it, their accuracy, and images that take it, spread over the split. Right: the
distinct routes and effective paths (2^entropy) on val after each epoch of the training history.
"""
from pathlib import Path

import torch

from .checkpoint import temp_beside
from .evaluate import path_stats


def frequent_routes(gates: torch.Tensor, top: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `top` most frequent routes of gates (N, n) bool, most frequent first (ties: the route
    seen first): [(route (n,) bool, indices (k,) of the images that take it)]."""
    routes, inverse, counts = torch.unique(gates, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((routes.shape[0],), gates.shape[0], dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(gates.shape[0]), "amin")
    order = sorted(range(routes.shape[0]), key=lambda i: (-counts[i].item(), first[i].item()))[:top]
    return [(routes[i], (inverse == i).nonzero().squeeze(1)) for i in order]


def routes_png(path, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, gates: torch.Tensor,
               history: list[dict] | None = None, title: str = "",
               top: int = 8, per_route: int = 12) -> None:
    """Draw the figure to `path` (PNG), written whole or not at all. images (N, 3, H, W) uint8,
    labels and preds (N,), gates (N, n) bool: a split's hard routes; history: the training's
    per-epoch metrics (distinct_paths, effective_paths), or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images, labels, preds, gates = (t.detach().cpu() for t in (images, labels, preds, gates))
    rows = frequent_routes(gates, top)
    n, N = gates.shape[1], gates.shape[0]
    fig = plt.figure(figsize=(3 + 0.25 * n + 0.6 * per_route + 4, 0.75 * max(len(rows), 4) + 1.2))
    grid = fig.add_gridspec(max(len(rows), 1), 3, width_ratios=[0.25 * n, 0.6 * per_route, 4], wspace=0.08)
    for j, (route, idx) in enumerate(rows):
        strip = fig.add_subplot(grid[j, 0])
        strip.imshow(route.float().view(1, -1).numpy(), cmap="Greys", vmin=0, vmax=1.4, aspect="auto")
        strip.set_xticks(range(n) if n <= 20 else [])
        strip.set_yticks([])
        strip.tick_params(labelsize=6, length=0)
        share, acc = idx.numel() / N, (preds[idx] == labels[idx]).float().mean().item()
        strip.set_ylabel(f"{share:.0%}\nacc {acc:.0%}", rotation=0, ha="right", va="center", fontsize=8)
        pick = torch.linspace(0, idx.numel() - 1, min(per_route, idx.numel())).round().long().unique()
        shown = images[idx[pick]]   # spread over the split (folders are often sorted by class)
        tiles = torch.zeros(per_route, *images.shape[1:], dtype=torch.uint8) + 255
        tiles[:shown.shape[0]] = shown
        row = torch.cat(list(tiles.permute(0, 2, 3, 1)), dim=1)          # (H, per_route * W, 3)
        ax = fig.add_subplot(grid[j, 1])
        ax.imshow(row.numpy())
        ax.axis("off")
        if j == 0:
            ax.set_title("images on each route", fontsize=8)
    fig.axes[0].set_title("blocks run", fontsize=8)
    stats = path_stats(gates, [1.0] * n)
    right = fig.add_subplot(grid[:, 2])
    epochs = [h for h in (history or []) if "distinct_paths" in h]
    if epochs:
        x = [h["epoch"] for h in epochs]
        right.plot(x, [h["distinct_paths"] for h in epochs], "o-", label="distinct routes (val)")
        if all("effective_paths" in h for h in epochs):
            right.plot(x, [h["effective_paths"] for h in epochs], "s--", label="effective paths (val)")
        right.set_xlabel("epoch")
        right.set_ylim(bottom=0)
        right.xaxis.get_major_locator().set_params(integer=True)
        right.legend(fontsize=8)
        right.set_title("routes per epoch of training", fontsize=9)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "no training history", ha="center", va="center")
    fig.suptitle(f"{title}{' -- ' if title else ''}{N} images, {int(torch.unique(gates, dim=0).shape[0])} "
                 f"distinct routes, {stats['effective_paths']:.1f} effective paths; top {len(rows)} routes shown",
                 fontsize=10)
    path = Path(path)
    tmp = temp_beside(path)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
