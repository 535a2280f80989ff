"""Does re-estimating BN's running statistics at the end (precise BN) close the depth gap? (BENCHMARKS.md,
"Learning-rate warm-up and zero-init residuals")

    python bench/precise_bn.py bench/runs/depth/<run>/checkpoint.pt   # one JSON line -> stdout

The checkpoint's val and test accuracy as trained, then after its BN running statistics are
recomputed as a cumulative average over every training image in train mode: plain, and with the
training augmentation (random crop and flip).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drn.checkpoint import load_checkpoint, model_from_checkpoint   # noqa: E402
from drn.cost import measure_cost_table                             # noqa: E402
from drn.data import load_dataset, random_crop_flip                 # noqa: E402
from drn.evaluate import evaluate                                   # noqa: E402


@torch.no_grad()
def main(path: str) -> dict:
    torch.set_num_threads(1)
    ckpt = load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.val_seed, ckpt["val_index"])
    cost = measure_cost_table(model)
    acc = lambda split: evaluate(model, split, cost, 500)["accuracy"]
    out = {"checkpoint": path, "val": acc(data.val), "test": acc(data.test)}
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    for augment in (False, True):
        model.load_state_dict(trained)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None   # cumulative average over every batch
        model.train()
        g = torch.Generator().manual_seed(0)
        for x in data.train.images.split(128):
            x = x.float().div_(255)
            model(random_crop_flip(x, g) if augment else x, routing="hard")
        tag = "augmented" if augment else "plain"
        out[f"val_precise_bn_{tag}"], out[f"test_precise_bn_{tag}"] = acc(data.val), acc(data.test)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
