"""Cost table for Eq. 7/8: per-block FLOPs measured with torch.utils.flop_counter.

Convention (BlockDrop's): FLOPs = 2 x multiply-accumulates of conv and linear layers; BN, ReLU,
pooling and additions are not counted. Routers are counted: every router runs whatever it
decides, so router FLOPs are part of the fixed cost together with the stem, the head and the
shortcuts of shape-changing blocks. The full CIFAR ResNet-110 is ~5.06e8 FLOPs.

    flops(route) = fixed + sum_i gate_i * block_i
"""
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import RoutedResNet


def _count(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class CostTable:
    block: tuple[float, ...]   # routable cost of each block (its residual branch), per image
    fixed: float               # cost every image pays: stem, head, routers, projection shortcuts
    router: float              # of which routers
    unit: str = "flops"        # "flops", or "ms" for a latency table measured on a device

    @property
    def full(self) -> float:
        return self.fixed + sum(self.block)

    @property
    def num_blocks(self) -> int:
        return len(self.block)

    def block_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.block, dtype=torch.float32, device=device)

    def normalized(self, device=None) -> torch.Tensor:
        """c_i / sum_j c_j: Eq. 8 with these weights is the executed share of routable compute."""
        c = self.block_tensor(device)
        return c / c.sum()

    def route_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Exact cost of hard routes (B, n) 0/1, or expected cost of soft routes r (B, n)."""
        return self.fixed + gates.float() @ self.block_tensor(gates.device)

    def to_dict(self) -> dict:
        u = "flops" if self.unit == "flops" else "latency_ms"
        return {f"{u}_full": self.full, f"{u}_fixed": self.fixed, f"{u}_routers": self.router,
                f"{u}_blocks": list(self.block), "num_blocks": self.num_blocks}


@torch.no_grad()
def measure_cost_table(model: RoutedResNet) -> CostTable:
    """Count each part of `model` once on a 1-image input of the model's input size."""
    if model.cfg.static_route is not None:   # a static baseline runs no routers
        t = measure_cost_table(RoutedResNet(dataclasses.replace(model.cfg, static_route=None, drop_path=0.0)).to(model.mean.device))
        return CostTable(t.block, t.fixed - t.router, 0.0)
    was_training = model.training
    model.eval()
    shapes = []
    hooks = [b.residual.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape)) for b in model.blocks]
    try:
        size = model.cfg.input_size
        x = torch.zeros(1, 3, size, size, device=model.mean.device)
        total = _count(lambda t: model(t, routing="mask"), x)
        block, router, shortcut = [], 0, 0
        for b, shape in zip(model.blocks, shapes):
            z = torch.zeros(shape, device=x.device)
            block.append(float(_count(b.residual, z)))
            router += _count(b.router, z)
            shortcut += _count(b.shortcut, z)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    fixed = total - sum(block)
    assert fixed >= router + shortcut, "cost table does not add up"
    return CostTable(tuple(block), float(fixed), float(router))


def median_seconds(fn, warmup: int, repeats: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_latency_table(model: RoutedResNet, batch_size: int = 64, warmup: int = 3,
                          repeats: int = 10) -> CostTable:
    """Per-block wall-clock cost on the model's device, in milliseconds per image at `batch_size`:
    the median of `repeats` timed runs after `warmup` (perf_counter; on CUDA with a synchronise
    around each run, which is what CUDA events measure too). Block i's cost is its residual
    branch on its own input; `fixed` is the network with every block skipped (stem, routers,
    shortcuts, head and the per-block dispatch), so fixed + sum(block) ~ the full network."""
    was_training = model.training
    model.eval()
    device = model.mean.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    size = model.cfg.input_size
    x = torch.rand(batch_size, 3, size, size, device=device)
    inputs = []
    hooks = [b.residual.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    try:
        model(x, routing="mask")
    finally:
        for h in hooks:
            h.remove()
    for _ in range(warmup):  # allocator, thread pool and cuDNN autotune settle before any block is timed
        model(x, routing="mask")
    sync()
    ms = 1000.0 / batch_size
    block = tuple(ms * median_seconds(lambda b=b, z=z: b.residual(z), warmup, repeats, sync)
                  for b, z in zip(model.blocks, inputs))
    none = torch.zeros(batch_size, model.num_blocks, dtype=torch.bool, device=device)
    fixed = ms * median_seconds(lambda: model(x, routing="hard", gates=none), warmup, repeats, sync)
    router = ms * sum(median_seconds(lambda b=b, z=z: b.router(z), warmup, repeats, sync)
                      for b, z in zip(model.blocks, inputs))
    model.train(was_training)
    return CostTable(block, fixed, router, unit="ms")
