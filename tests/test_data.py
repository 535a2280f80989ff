"""Data loading and batch augmentation (drn/data.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drn.config import UsageError
from drn.data import carve_val, load_dataset, load_source, make_views, perturb, random_crop_flip, rotate


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def windows(img: torch.Tensor, pad: int = 4, flips=(False, True)):
    """Every (dy, dx, flip) crop of the zero-padded image: {(dy, dx, flip): window}."""
    C, H, W = img.shape
    xp = F.pad(img, (pad, pad, pad, pad))
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = xp[:, dy:dy + H, dx:dx + W]
            for flip in flips:
                out[(dy, dx, flip)] = win.flip(-1) if flip else win
    return out


def draws_of(out: torch.Tensor, img: torch.Tensor, pad: int = 4, flips=(False, True)):
    """The (dy, dx, flip) draws under which `out` is a crop of `img`."""
    return [k for k, w in windows(img, pad, flips).items() if torch.equal(out, w)]


# ----------------------------------------------------------------------------- random_crop_flip

def test_random_crop_flip_outputs_are_windows_of_padded_input():
    torch.manual_seed(0)
    x = torch.rand(12, 3, 10, 12)  # non-square on purpose; distinct values make draws unique
    out = random_crop_flip(x, gen(1), pad=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = []
    for i in range(x.shape[0]):
        found = draws_of(out[i], x[i])
        assert len(found) == 1, f"image {i} is not a (flipped) crop of its input"
        seen.append(found[0])
    # different images get different draws; both flip outcomes happen
    assert len(set(seen)) > 1
    assert {f for _, _, f in seen} == {False, True}


def test_random_crop_flip_identical_images_get_independent_draws():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 8, 8).expand(16, 3, 8, 8).contiguous()
    out = random_crop_flip(x, gen(2))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 4


def test_random_crop_flip_is_reproducible_per_generator_seed():
    torch.manual_seed(2)
    x = torch.rand(8, 3, 16, 16)
    a = random_crop_flip(x, gen(7))
    b = random_crop_flip(x, gen(7))
    c = random_crop_flip(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the input is not modified
    x0 = x.clone()
    random_crop_flip(x, gen(7))
    assert torch.equal(x, x0)


def test_random_crop_flip_uint8_and_no_flip():
    torch.manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, gen(3), pad=2, flip=False)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    xf = x.float() + torch.arange(64).view(1, 1, 8, 8) * 1000  # make windows distinguishable
    outf = random_crop_flip(xf, gen(3), pad=2, flip=False)
    for i in range(6):
        assert len(draws_of(outf[i], xf[i], pad=2, flips=(False,))) == 1
    # pad 0, no flip: the identity
    assert torch.equal(random_crop_flip(x, gen(0), pad=0, flip=False), x)


def test_random_crop_flip_pad_zero_with_flip_is_identity_or_mirror():
    torch.manual_seed(4)
    x = torch.rand(10, 3, 5, 5)
    out = random_crop_flip(x, gen(5), pad=0)
    kinds = []
    for o, xi in zip(out, x):
        if torch.equal(o, xi):
            kinds.append("same")
        else:
            assert torch.equal(o, xi.flip(-1))
            kinds.append("flip")
    assert set(kinds) == {"same", "flip"}


# ----------------------------------------------------------------------------- make_views

@pytest.mark.parametrize("m", [1, 2, 3])
def test_make_views_are_sample_major_crops(m):
    torch.manual_seed(5)
    L = 4
    x = torch.rand(L, 3, 8, 8)
    v = make_views(x, m, gen(m))
    assert v.shape == (L * m, 3, 8, 8)
    for i in range(L):
        for j in range(m):
            assert draws_of(v[i * m + j], x[i]), f"row {i * m + j} is not a view of image {i}"
            for k in range(L):
                if k != i:
                    assert not draws_of(v[i * m + j], x[k])


def test_make_views_of_one_image_differ():
    torch.manual_seed(6)
    x = torch.rand(2, 3, 8, 8)
    v = make_views(x, 6, gen(0))
    assert len({tuple(t.flatten().tolist()) for t in v[:6]}) > 1


def test_perturbed_views_keep_the_first_view_and_vary_the_others():
    """augment="perturb": each image's first view is the plain crop + h-flip drawn for it; views 2..M
    are that view perturbed -- among them h-flips, v-flips and rotations of it (Eq. 5's tau_j)."""
    torch.manual_seed(8)
    L, m = 64, 3
    x = torch.rand(L, 3, 8, 8)
    same, pert = make_views(x, m, gen(4)), make_views(x, m, gen(4), "perturb")
    first = torch.arange(L) * m
    torch.testing.assert_close(pert[first], same[first], rtol=0, atol=0)
    rest = [i for i in range(L * m) if i % m]
    eq = lambda a, b: torch.equal(a, b)
    assert any(eq(pert[i], same[i].flip(1)) for i in rest)                 # vertical flips
    assert any(eq(pert[i], same[i].flip(2)) for i in rest)                 # horizontal flips
    unchanged = sum(eq(pert[i], same[i]) for i in rest)
    assert unchanged < len(rest) // 2, "most later views must differ from the plain ones"


# ----------------------------------------------------------------------------- rotate / perturb

def test_rotate_zero_is_identity():
    torch.manual_seed(7)
    x = torch.rand(3, 3, 9, 9)
    out = rotate(x, torch.zeros(3))
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_rotate_quarter_and_half_turns():
    torch.manual_seed(8)
    x = torch.rand(2, 3, 8, 8)
    half = rotate(x, torch.full((2,), 180.0))
    torch.testing.assert_close(half, x.flip(2, 3), atol=1e-4, rtol=0)
    quarter = rotate(x, torch.full((2,), 90.0))
    ccw, cw = torch.rot90(x, 1, (2, 3)), torch.rot90(x, -1, (2, 3))
    assert torch.allclose(quarter, ccw, atol=1e-4) or torch.allclose(quarter, cw, atol=1e-4)
    # per-image angles: the first image unrotated, the second turned half way
    mixed = rotate(x, torch.tensor([0.0, 180.0]))
    torch.testing.assert_close(mixed[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], x[1].flip(1, 2), atol=1e-4, rtol=0)


def test_rotate_small_angle_is_finite_and_changes_image():
    torch.manual_seed(9)
    x = torch.rand(4, 3, 16, 16)
    out = rotate(x, torch.tensor([5.0, -5.0, 15.0, -15.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, x, atol=1e-3)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6  # bilinear with zero fill stays in range


def test_perturb_shapes_finite_and_one_of_four_kinds():
    torch.manual_seed(10)
    x = torch.rand(40, 3, 8, 8)
    out = perturb(x, gen(11))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # with no rotation the kinds are recognisable: crop, h-flip, v-flip, or unrotated
    out = perturb(x, gen(12), max_degrees=0.0)
    kinds = set()
    for o, xi in zip(out, x):
        if torch.equal(o, xi.flip(2)):
            kinds.add("hflip")
        elif torch.equal(o, xi.flip(1)):
            kinds.add("vflip")
        elif torch.allclose(o, xi, atol=1e-5) and not draws_of(o, xi, flips=(False,)):
            kinds.add("rotate0")
        else:
            assert draws_of(o, xi, flips=(False,)), "neither crop, flip nor rotation"
            kinds.add("crop")
    assert kinds >= {"hflip", "vflip", "crop"}


def test_perturb_is_reproducible():
    torch.manual_seed(13)
    x = torch.rand(6, 3, 8, 8)
    assert torch.equal(perturb(x, gen(1)), perturb(x, gen(1)))


# ----------------------------------------------------------------------------- imagefolder

CLASSES = ["cat", "ant", "bee"]  # written out of order on purpose


def write_png(path, size=(32, 32), value=0, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[0, 0] = value  # marks which image this is
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def make_tree(root, per_class=(2, 1), size=(32, 32)):
    """root/train/<class>/*.png and root/val/<class>/*.png; returns {split: [(array, class)]}."""
    written = {"train": [], "val": []}
    for s_i, (split, count) in enumerate(zip(("train", "val"), per_class)):
        for c_i, c in enumerate(CLASSES):
            for k in range(count):
                seed = 100 * s_i + 10 * c_i + k
                arr = write_png(root / split / c / f"img{k}.png", size, value=10 * c_i + k, seed=seed)
                written[split].append((arr, c))
    return written


def test_load_imagefolder(tmp_path):
    written = make_tree(tmp_path, per_class=(3, 2))
    ds = load_source("imagefolder", tmp_path)
    assert ds.classes == sorted(CLASSES) == ["ant", "bee", "cat"]
    written["test"] = written["val"]   # without DIR/test, DIR/val is the held-out split
    for split, n in (("train", 9), ("test", 6)):
        s = getattr(ds, split)
        assert s.images.dtype == torch.uint8 and s.images.shape == (n, 3, 32, 32)
        assert s.labels.dtype == torch.int64
        # labels in class order: all of ant, then bee, then cat
        assert s.labels.tolist() == sorted(s.labels.tolist())
        assert s.labels.tolist() == [i for i in range(3) for _ in range(n // 3)]
        # every image came through intact (HWC -> CHW) with the label of its folder
        for img, label in zip(s.images, s.labels):
            hwc = img.permute(1, 2, 0).numpy()
            matches = [c for arr, c in written[split] if np.array_equal(arr, hwc)]
            assert matches == [ds.classes[label]]


def test_load_imagefolder_converts_grayscale_to_rgb(tmp_path):
    from PIL import Image
    make_tree(tmp_path)
    Image.fromarray(np.full((32, 32), 77, dtype=np.uint8), mode="L").save(tmp_path / "val" / "ant" / "gray.png")
    ds = load_source("imagefolder", tmp_path)
    assert ds.test.images.shape == (4, 3, 32, 32)
    assert (ds.test.images == 77).all(dim=(1, 2, 3)).sum() == 1


def test_load_imagefolder_missing_dir(tmp_path):
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path / "nope")


def test_load_imagefolder_empty_dir(tmp_path):
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_missing_val(tmp_path):
    for c in CLASSES:
        write_png(tmp_path / "train" / c / "a.png")
    with pytest.raises(UsageError, match="val"):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_val_without_images(tmp_path):
    for c in CLASSES:
        write_png(tmp_path / "train" / c / "a.png")
        (tmp_path / "val" / c).mkdir(parents=True)
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_unknown_val_class(tmp_path):
    make_tree(tmp_path)
    write_png(tmp_path / "val" / "dog" / "a.png")
    with pytest.raises(UsageError, match="dog"):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_images_of_different_sizes(tmp_path):
    make_tree(tmp_path)
    write_png(tmp_path / "train" / "bee" / "big.png", size=(40, 40))
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_non_square_images(tmp_path):
    make_tree(tmp_path, size=(32, 24))
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path)


def test_load_imagefolder_unreadable_image(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "ant" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UsageError):
        load_dataset("imagefolder", tmp_path)


def test_load_unknown_dataset_name(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(UsageError):
        load_dataset("imagenet22k", tmp_path)


def test_channel_stats(tmp_path):
    make_tree(tmp_path)
    ds = load_dataset("imagefolder", tmp_path)
    mean, std = ds.channel_stats()
    assert len(mean) == 3 and len(std) == 3
    assert all(0 <= v <= 1 for v in mean + std)
    x = ds.train.images.double() / 255
    for c in range(3):
        assert mean[c] == pytest.approx(x[:, c].mean().item(), rel=1e-5)
        assert std[c] == pytest.approx(x[:, c].std().item(), rel=1e-4)
    assert torch.equal(ds.train.images, load_dataset("imagefolder", tmp_path).train.images)  # not modified


def make_tinyimagenet(root, wnids=("n01443537", "n01629819"), per_class=2):
    """The Tiny-ImageNet-200 layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    lines = []
    for k, w in enumerate(wnids):
        for i in range(per_class):
            write_png(root / "train" / w / "images" / f"{w}_{i}.JPEG", size=(64, 64), value=40 * k, seed=i)
            name = f"val_{k}_{i}.JPEG"
            write_png(root / "val" / "images" / name, size=(64, 64), value=40 * k + 1, seed=10 + i)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_load_tinyimagenet_layout(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny-imagenet-200")
    data = load_source("tinyimagenet", root)
    assert data.classes == ["n01443537", "n01629819"]
    assert data.train.images.shape == (4, 3, 64, 64) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (4, 3, 64, 64)     # Tiny-ImageNet's val/ is the held-out split
    assert data.train.labels.tolist() == [0, 0, 1, 1] and data.test.labels.tolist() == [0, 0, 1, 1]
    assert load_dataset("tinyimagenet", root, val_fraction=0.5).input_size == 64


def test_load_tinyimagenet_without_annotations(tmp_path):
    root = make_tinyimagenet(tmp_path / "t")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UsageError, match="val_annotations.txt"):
        load_dataset("tinyimagenet", root)


# ----------------------------------------------------------------------------- train / val / test

def _rows(split) -> set[bytes]:
    return {img.numpy().tobytes() for img in split.images}


def test_val_is_a_stratified_seeded_carve_of_train_disjoint_from_test(tmp_path):
    make_tree(tmp_path, per_class=(10, 5))   # (images of make_tree are distinct up to 10 a class)
    source = load_source("imagefolder", tmp_path)
    ds = load_dataset("imagefolder", tmp_path, val_fraction=0.2, val_seed=3)
    assert (ds.train.labels.shape[0], ds.val.labels.shape[0], ds.test.labels.shape[0]) == (24, 6, 15)
    assert torch.bincount(ds.val.labels).tolist() == [2, 2, 2]           # stratified
    train, val, test = _rows(ds.train), _rows(ds.val), _rows(ds.test)
    assert len(val) == 6 and not val & train and not val & test and not train & test
    assert val | train == _rows(source.train)                          # carved from the training images
    assert torch.equal(ds.val.images, source.train.images[list(ds.val_index)])
    again = load_dataset("imagefolder", tmp_path, val_fraction=0.2, val_seed=3)
    other = load_dataset("imagefolder", tmp_path, val_fraction=0.2, val_seed=4)
    assert again.val_index == ds.val_index != other.val_index          # seeded
    stored = load_dataset("imagefolder", tmp_path, val_index=ds.val_index)   # a checkpoint's carve
    assert torch.equal(stored.val.images, ds.val.images) and torch.equal(stored.train.images, ds.train.images)


def test_imagefolder_test_folder_is_the_held_out_split_when_present(tmp_path):
    make_tree(tmp_path, per_class=(6, 2))
    for c in CLASSES:
        write_png(tmp_path / "test" / c / "t.png", value=200, seed=99)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.test.labels.shape[0] == 3 and (ds.test.images == ds.test.images[0]).all()


@pytest.mark.parametrize("n, fraction, k", [(4068, 0.1, 407), (36, 0.1, 4), (10, 0.01, 1), (7, 0.5, 4)])
def test_carve_size(n, fraction, k):
    labels = torch.arange(n) % 3
    idx = carve_val(labels, fraction, 0)
    assert idx.numel() == k and idx.unique().numel() == k and bool((idx[1:] > idx[:-1]).all())
    per_class = torch.bincount(labels[idx], minlength=3)
    assert int(per_class.max() - per_class.min()) <= 1                 # every class in proportion


def test_a_stored_carve_that_does_not_fit_is_refused(tmp_path):
    make_tree(tmp_path, per_class=(3, 2))
    with pytest.raises(UsageError, match="val split"):
        load_dataset("imagefolder", tmp_path, val_index=(0, 99))
