"""Datasets as whole tensors, and augmentation of whole batches on the device.

Every split is held as one uint8 tensor (N, 3, H, W) plus int64 labels; the training loop
indexes it, augments on the device and never touches a Python image.

Three roles, whatever the source:
    train   what the weights see
    val     what every choice reads (mu controller, threshold trim, ASHA, TPE, Pareto flags, "best"):
            a stratified, seeded share (--val-fraction) carved from the source's training images
    test    the source's held-out split, only measured and reported

Sources (train images / held-out test images):
    cifar10, cifar100, svhn   torchvision train / test (downloaded into --data-dir when missing)
    tinyimagenet              the Tiny-ImageNet-200 folder layout: train/<wnid>/images/*.JPEG /
                              val/images/*.JPEG + val/val_annotations.txt
    imagefolder               DIR/train/<class>/* / DIR/test/<class>/* when DIR/test exists, else
                              DIR/val/<class>/*; images of one size
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class Split(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None   # None: read from the data (imagefolder)
    input_size: int | None
    test_split: str           # the name of the held-out split the source provides


DATASETS = {
    "cifar10": DatasetInfo(10, 32, "test"),
    "cifar100": DatasetInfo(100, 32, "test"),
    "svhn": DatasetInfo(10, 32, "test"),
    "tinyimagenet": DatasetInfo(200, 64, "val"),
    "imagefolder": DatasetInfo(None, None, "test/ or val/"),
    "synthetic": DatasetInfo(10, 32, "generated"),  # no files: for --smoke-test and first tries
}


@dataclass
class Source:
    """A dataset as its source provides it: training images and the held-out split."""
    train: Split
    test: Split
    classes: list[str]


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    val_index: tuple[int, ...]   # positions in the source's training images that val took

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> int:
        return self.train.images.shape[-1]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        x = self.train.images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


# ----------------------------------------------------------------------------- loading

def _stack(arrays: list[np.ndarray], labels: list[int], where: Path) -> Split:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UsageError(f"images under {where} differ in size ({sorted(shapes)[:3]}...); resize them to one size")
    (h, w, _), = shapes
    if h != w:
        raise UsageError(f"images under {where} are {h}x{w}; square images are required")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return Split(x, torch.tensor(labels, dtype=torch.int64))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e}") from None


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise UsageError(f"missing folder {split_dir}: expected DIR/train/<class>/ and DIR/val/<class>/")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>")
    return classes


def load_imagefolder(root: Path) -> Source:
    classes = _class_dirs(root / "train")
    held_out = "test" if (root / "test").is_dir() else "val"
    splits = {}
    for name in ("train", held_out):
        found = _class_dirs(root / name)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UsageError(f"{root / name} has classes not in train/: {', '.join(unknown[:5])}")
        arrays, labels = [], []
        for idx, c in enumerate(classes):
            for p in _list_images(root / name / c):
                arrays.append(_read_rgb(p))
                labels.append(idx)
        if not arrays:
            raise UsageError(f"no images under {root / name} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        splits[name] = _stack(arrays, labels, root / name)
    return Source(splits["train"], splits[held_out], classes)


def load_tinyimagenet(root: Path) -> Source:
    classes = _class_dirs(root / "train")
    index = {c: i for i, c in enumerate(classes)}
    arrays, labels = [], []
    for c in classes:
        for p in _list_images(root / "train" / c):
            arrays.append(_read_rgb(p))
            labels.append(index[c])
    if not arrays:
        raise UsageError(f"no images under {root / 'train'}")
    train = _stack(arrays, labels, root / "train")
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UsageError(f"missing {ann}: is {root} the Tiny-ImageNet-200 folder?")
    arrays, labels = [], []
    for line in ann.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] in index:
            arrays.append(_read_rgb(root / "val" / "images" / fields[0]))
            labels.append(index[fields[1]])
    if not arrays:
        raise UsageError(f"{ann} names no image of a known class")
    return Source(train, _stack(arrays, labels, root / "val"), classes)


def load_torchvision(name: str, root: Path) -> Source:
    import torchvision.datasets as tvd
    try:
        if name == "svhn":
            parts = [tvd.SVHN(str(root), split=s, download=True) for s in ("train", "test")]
            splits = [Split(torch.from_numpy(d.data), torch.from_numpy(d.labels).long()) for d in parts]
            classes = [str(i) for i in range(10)]
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            parts = [cls(str(root), train=t, download=True) for t in (True, False)]
            splits = [Split(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                            torch.tensor(d.targets, dtype=torch.int64)) for d in parts]
            classes = list(parts[0].classes)
    except (OSError, RuntimeError) as e:  # no network, bad archive, unwritable dir
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load {name} from {root} ({msg}); put the dataset there or pass "
                         f"--data-dir to a folder holding it") from None
    return Source(splits[0], splits[1], classes)


def load_synthetic(train: int = 1000, test: int = 250, size: int = 32, seed: int = 0) -> Source:
    """Ten classes of generated 32x32 images that a small ResNet learns in a few epochs: each class
    is a colour plus an oriented stripe pattern, shifted in phase per image, under pixel noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(10, 3, 1, 1, generator=g) * 0.6 + 0.2
    angles = torch.arange(10) * math.pi / 10
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")

    def split(n: int) -> Split:
        labels = torch.arange(n) % 10
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        a = angles[labels].view(n, 1, 1)
        stripes = torch.sin((xx * torch.cos(a) + yy * torch.sin(a)) * 0.8 + phase)
        x = colours[labels] + 0.25 * stripes.unsqueeze(1) + 0.15 * torch.randn(n, 3, size, size, generator=g)
        return Split(x.clamp(0, 1).mul(255).round().to(torch.uint8), labels)

    return Source(split(train), split(test), [f"class{i}" for i in range(10)])


def load_source(name: str, data_dir: str | os.PathLike) -> Source:
    """The training images and the held-out split of `name`, in memory. Bad input: UsageError."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return load_synthetic()
    root = Path(data_dir).expanduser().absolute()
    if name in ("imagefolder", "tinyimagenet"):
        if not root.is_dir():
            raise UsageError(f"data dir {root} does not exist")
        if not any(root.iterdir()):
            raise UsageError(f"data dir {root} is empty")
        return load_imagefolder(root) if name == "imagefolder" else load_tinyimagenet(root)
    return load_torchvision(name, root)


def carve_val(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted positions of a stratified, seeded `fraction` of the training images: each class gives
    its share (rounded so the total is round(fraction * N), at least 1), at random."""
    n = labels.shape[0]
    k = max(1, round(fraction * n))
    if k >= n:
        raise UsageError(f"{n} training images are too few to carve a val split of {fraction:g}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # rank of each image inside its class (in random order), as a share of its class:
    # taking the k smallest shares takes every class in proportion
    order = perm[torch.argsort(labels[perm], stable=True)]
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(n, dtype=torch.float64) - starts[labels[order]].double()
    share = (rank + 0.5) / counts[labels].double()
    share += torch.rand(n, generator=g, dtype=torch.float64) * 1e-9     # ties between classes: at random
    return torch.sort(torch.argsort(share)[:k]).values


def split_source(src: Source, val_fraction: float = 0.1, val_seed: int = 0,
                 val_index: list[int] | tuple[int, ...] | None = None) -> Dataset:
    """train / val / test of a source; `val_index` (from a checkpoint) replaces the carve."""
    n = src.train.labels.shape[0]
    if val_index is None:
        idx = carve_val(src.train.labels, val_fraction, val_seed)
    else:
        idx = torch.as_tensor(list(val_index), dtype=torch.int64)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n or idx.unique().numel() != idx.numel():
            raise UsageError(f"the stored val split does not fit these {n} training images; is this the data it "
                             f"was trained on?")
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    take = lambda s, i: Split(s.images[i], s.labels[i])
    return Dataset(take(src.train, keep), take(src.train, idx), src.test, src.classes, tuple(idx.tolist()))


def load_dataset(name: str, data_dir: str | os.PathLike, val_fraction: float = 0.1, val_seed: int = 0,
                 val_index=None) -> Dataset:
    """train, val (carved from the training images) and test of `name`, in memory."""
    return split_source(load_source(name, data_dir), val_fraction, val_seed, val_index)


# ----------------------------------------------------------------------------- augmentation

def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Standard ResNet augmentation on a whole batch: zero-pad `pad`, random crop back to the
    input size, random horizontal flip; one draw per image.  (B, C, H, W) -> (B, C, H, W)"""
    B, C, H, W = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    rows = dy + torch.arange(H, device=dev)                                 # (B, H)
    cols = dx + torch.arange(W, device=dev)                                 # (B, W)
    if flip:
        flipped = torch.rand(B, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    out = xp[torch.arange(B, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()                             # (B, H, W, C) -> (B, C, H, W)


def make_views(x: torch.Tensor, m: int, generator: torch.Generator, augment: str = "same") -> torch.Tensor:
    """M augmented views of each image, sample-major: (L, C, H, W) -> (L*M, C, H, W), rows
    i*M ... i*M+M-1 are the views of image i (the groups of Eq. 5). augment "same": every view a pad-4
    crop + h-flip, drawn independently; "perturb": views 2..M also get one of the paper's consistency
    perturbations (`perturb`: crop, h-flip, v-flip or a rotation) -- Eq. 5's tau_j as different
    augmentation methods. The first view of each image is the same in both."""
    views = random_crop_flip(x.repeat_interleave(m, dim=0), generator)
    if augment == "perturb" and m > 1:
        later = views.view(-1, m, *views.shape[1:])[:, 1:]                  # (L, M-1, C, H, W), a view
        later.copy_(perturb(later.flatten(0, 1), generator).view_as(later))
    return views


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle (zero fill).  degrees (B,)"""
    a = degrees * (math.pi / 180)
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def perturb(x: torch.Tensor, generator: torch.Generator, max_degrees: float = 15.0) -> torch.Tensor:
    """The paper's consistency experiment: each image gets one of random crop (pad 4), horizontal
    flip, vertical flip or rotation (uniform in +-max_degrees), chosen uniformly."""
    B, dev = x.shape[0], x.device
    kind = torch.randint(0, 4, (B,), generator=generator, device=dev).view(B, 1, 1, 1)
    crop = random_crop_flip(x, generator, flip=False)
    degrees = (torch.rand(B, generator=generator, device=dev) * 2 - 1) * max_degrees
    out = torch.where(kind == 0, crop, x.flip(3))
    out = torch.where(kind == 2, x.flip(2), out)
    return torch.where(kind == 3, rotate(x, degrees), out)
