"""
Tests for data.py and synthetic.py: the synthetic benchmark and the image loader.

Covers: determinism (bit-identical rebuilds, different splits differ), targets
equal the labels derived from the drawn objects, attributes/shapes/dtypes and
normalisation round-trip, label statistics of 1,500 train images (every label
seen, rare labels rare, documented pairs never together, object counts,
labels per image), clear errors for unknown names/splits, and load_image on a
corrupt file and on a grayscale PNG. Small splits (the `size` keyword) keep
the whole file under ~10 s.

    python -m pytest -q tests/test_data.py
"""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from lib import synthetic


@pytest.fixture(scope="module")
def train_small():  # shared by the statistics tests: rendered once
    return data.SyntheticMultiLabel("train", size=1500, augment=False, progress=False)


def test_deterministic_and_splits_differ():
    a = data.SyntheticMultiLabel("val", size=40, progress=False)
    b = data.SyntheticMultiLabel("val", size=40, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    # image i does not depend on how many images are rendered
    c = data.SyntheticMultiLabel("val", size=10, progress=False)
    assert torch.equal(a.images[:10], c.images)
    t = data.SyntheticMultiLabel("test", size=40, progress=False)
    assert not any(torch.equal(a.images[i], t.images[i]) for i in range(40))
    other = data.SyntheticMultiLabel("val", size=40, seed=1, progress=False)
    assert not torch.equal(a.images, other.images)


def test_targets_match_drawn_objects(train_small):
    ds = train_small
    for i, objs in enumerate(ds.objects):
        expected = synthetic.labels_from_objects(objs)
        assert np.array_equal(ds.targets[i].numpy(), expected), ds.ids[i]
    # and the derivation itself is right on hand-made objects
    mk = lambda kind, fill, cols: synthetic.Obj(kind, fill, cols, 0.0, 0.0, 10.0, 0.0)
    objs = [mk("square", "solid", ("red",)), mk("square", "solid", ("orange",)),
            mk("blob", "dotted", ("red", "blue")), mk("blob", "solid", ("red",)),
            mk("pentagon", "solid", ("red",)), mk("ring", "solid", ("cyan",)),
            mk("tiny_x", "solid", ("white",)), mk("tiny_dot", "solid", ("white",))]
    on = {synthetic.CLASSES[j] for j in np.flatnonzero(synthetic.labels_from_objects(objs))}
    assert on == {"red_square", "dotted", "ring", "tiny_x"}


def test_attributes_shapes_and_normalisation():
    ds = data.SyntheticMultiLabel("val", size=16, progress=False)
    assert len(ds) == 16 and ds.image_size == 64 and not ds.augment
    assert len(ds.classes) == 20 and len(set(ds.classes)) == 20
    assert all(c.replace("_", "").isalpha() and c == c.lower() for c in ds.classes)
    assert ds.targets.shape == (16, 20) and ds.targets.dtype == torch.float32
    assert set(ds.targets.unique().tolist()) <= {0.0, 1.0}
    assert len(set(ds.ids)) == 16 and ds.ids[3] == "synthetic-val-000003"
    assert ds.images.shape == (16, 3, 64, 64) and ds.images.dtype == torch.uint8
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (20,) and y.dtype == torch.float32 and torch.equal(y, ds.targets[5])
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    back = (x * std + mean) * 255
    assert (back - ds.images[5].float()).abs().max() < 0.05  # exact up to float error
    assert data.SyntheticMultiLabel("train", size=2, progress=False).augment
    # geometry scales with image_size
    big = data.SyntheticMultiLabel("val", image_size=96, size=4, progress=False)
    assert big[0][0].shape == (3, 96, 96)
    assert torch.equal(big.targets, ds.targets[:4])  # same objects, larger pixels


def test_flip_augmentation():
    ds = data.SyntheticMultiLabel("train", size=1, progress=False)
    torch.manual_seed(0)
    views = {ds[0][0].sum(dim=0)[:, 0].sum().item() for _ in range(20)}
    assert len(views) == 2  # some calls flip, some don't


def test_label_statistics(train_small):
    ds = train_small
    t = ds.targets
    freq = t.mean(0)
    assert (freq > 0).all(), [c for c, f in zip(ds.classes, freq) if f == 0]
    for name in ("hourglass", "crescent", "rainbow"):
        assert 0.01 <= freq[ds.classes.index(name)] <= 0.06, (name, float(freq[ds.classes.index(name)]))
    assert len(synthetic.NEVER_TOGETHER) >= 5
    for a, b in synthetic.NEVER_TOGETHER:
        both = t[:, ds.classes.index(a)] * t[:, ds.classes.index(b)]
        assert both.sum() == 0, (a, b)
    counts = [len(objs) for objs in ds.objects]
    assert min(counts) >= 1 and max(counts) <= 4
    assert (t.sum(1) >= 1).all() and t.sum(1).mean() > 1.2
    # unlabelled distractors are really drawn
    assert any(synthetic.object_label(o) is None for objs in ds.objects for o in objs)


def test_build_dataset_defaults_and_limit():
    ds = data.build_dataset("synthetic", "val", limit=6)
    assert len(ds) == 6 and ds.image_size == 64 and not ds.augment
    assert data.build_dataset("synthetic", "train", image_size=32, limit=3).augment
    full_start = data.SyntheticMultiLabel("val", size=6, progress=False)
    assert torch.equal(ds.images, full_start.images)  # the first images of the real split


def test_errors():
    with pytest.raises(ValueError, match="synthetic"):
        data.build_dataset("imagenet", "train")
    with pytest.raises(data.DatasetError, match="train"):
        data.build_dataset("synthetic", "training")
    with pytest.raises(ValueError):
        data.SyntheticMultiLabel("dev", size=1)
    with pytest.raises(data.DatasetError, match="--data-root"):
        data.build_dataset("voc", "trainval")


def test_load_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    with pytest.raises((RuntimeError, OSError), match="bad.jpg"):
        data.load_image(bad, 64)
    with pytest.raises((RuntimeError, OSError), match="missing.png"):
        data.load_image(tmp_path / "missing.png", 64)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.arange(50 * 30, dtype=np.uint8).reshape(30, 50) % 255, "L").save(gray)
    x = data.load_image(gray, 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    # a gray pixel normalises differently per channel, but all channels come from one value
    assert torch.allclose(data.denormalize(x)[0].float(), data.denormalize(x)[2].float(), atol=1)
