"""The budget loop step by step: each training batch's hard cost, the loop's smoothed cost and mu, and
at each epoch's end the val cost beside the training batches' (BENCHMARKS.md, "Why the dynamic recipe
misses its landing: a router on the threshold, and a loop that cycles"). Runs drn-train's main phase with the loop instrumented.

    python bench/loop_trace.py OUT.json -- <drn-train flags, --out included>

OUT.json: {"steps": [[step, batch cost, smoothed cost, mu, rho], ...], "val": [[epoch, val cost, training
batches' cost], ...]}, costs as relative errors to the target (+0.1: 10 % over).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import drn.controller as controller  # noqa: E402
from drn.cli import train_parser  # noqa: E402
from drn.config import TrainConfig  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out, flags = Path(argv[0]), argv[2:]
    trace = {"steps": [], "val": []}
    update, observe = controller.MuController.update, controller.MuController.observe_val

    def traced_update(self, cost_hard):
        mu = update(self, cost_hard)
        trace["steps"].append([self.steps, cost_hard / self.target - 1, self.cost_ema / self.target - 1, mu, self.rho])
        return mu

    def traced_observe(self, val_cost, train_cost=None):
        trace["val"].append([len(trace["val"]) + 1, val_cost / self.target - 1, (train_cost or 0) / self.target - 1])
        return observe(self, val_cost, train_cost)

    controller.MuController.update, controller.MuController.observe_val = traced_update, traced_observe
    from drn.train import Trainer
    args = vars(train_parser().parse_args(flags))
    for k in ("resume", "cost_only", "json"):
        args.pop(k)
    cfg = TrainConfig(**args)
    Trainer(cfg).run(on_epoch=lambda m: m["epoch"] >= cfg.epochs)   # the main phase only
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(trace))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
