"""
Data: the datasets DR-MoE trains and is evaluated on, behind one entry point,
build_dataset(name, split, root, image_size, augment, seed, limit).
This version holds the embedded synthetic benchmark (its generator is
synthetic.py); VOC / COCO loaders will plug into build_dataset.

Every dataset returns ds[i] = (image float32 (3, S, S) normalised with ImageNet
mean/std, target float32 (L,)) with 1 = present, 0 = absent, -1 = ignore, and
has `classes` (L names), `targets` (N, L), `ids` (N strings), `image_size`.

    python data.py --preview            # grid -> assets/synthetic_preview.png
    python data.py --stats --split val  # frequencies, cardinality, co-occurrence
    python -m pytest -q tests/test_data.py
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from tqdm import tqdm

from synthetic import CLASSES, LABEL_GROUPS, SCENES, SPLIT_SIZES, SPLITS, labels_from_objects, render_synthetic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "voc", "coco")
NUM_LABELS = {"synthetic": 20, "voc": 20, "coco": 80}   # L of each, known without reading any data

# -----------------------------------------------------------------------------
# datasets


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(x):
    """uint8 (..., 3, H, W) -> float32, ImageNet-normalised (pretrained backbones expect it)."""
    return (x.float() / 255 - _MEAN) / _STD


def denormalize(x):
    """float32 (..., 3, H, W) -> uint8; the inverse of normalize."""
    return ((x * _STD + _MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


class SyntheticMultiLabel(Dataset):
    """The embedded benchmark, rendered once into memory (8,000 images at 64 px
    are 98 MB of uint8). `size` overrides the split size for tests and
    previews: image i is the same whatever `size` is."""

    def __init__(self, split="train", image_size=64, augment=None, seed=0, size=None, progress=True):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        n = SPLIT_SIZES[split] if size is None else size
        self.split, self.image_size, self.seed = split, image_size, seed
        self.augment = (split == "train") if augment is None else augment
        self.classes, self.scene_names = list(CLASSES), list(SCENES)
        self.label_groups = {g: list(v) for g, v in LABEL_GROUPS.items()}
        self.images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        self.targets = torch.zeros((n, len(CLASSES)), dtype=torch.float32)
        self.scenes = torch.zeros(n, dtype=torch.long)  # latent scene, for analyses
        self.objects = []  # per image, the Obj list actually drawn
        for i in tqdm(range(n), desc=f"synthetic {split}", disable=not progress, mininterval=0.5):
            img, scene, objs = render_synthetic(seed, split, i, image_size)
            self.images[i] = torch.from_numpy(img).permute(2, 0, 1)
            self.targets[i] = torch.from_numpy(labels_from_objects(objs))
            self.scenes[i] = scene
            self.objects.append(objs)
        self.ids = [f"synthetic-{split}-{i:06d}" for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)  # safe: no label depends on left/right
        return normalize(x), self.targets[i]


def build_dataset(name, split, root=None, image_size=None, augment=None, seed=0, limit=None):
    """The one entry point. augment defaults to True for "train" only; seed
    picks the synthetic benchmark (0 = the reported one), not the training
    seed; limit keeps only the first `limit` images (smoke tests)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name != "synthetic":
        raise NotImplementedError(f"dataset {name!r} comes in a later version; only 'synthetic' exists now")
    size = SPLIT_SIZES[split] if limit is None else min(limit, SPLIT_SIZES[split])
    return SyntheticMultiLabel(split, image_size or 64, augment, seed, size=size)


def load_image(path, image_size):
    """Any image file -> float32 (3, S, S), prepared like the dataset images."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes everything: a truncated file fails here, not later
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise RuntimeError(f"cannot read image file {str(path)!r}: {e}") from e
    # squash to a square (no crop: a label's evidence may sit at the border)
    im = im.resize((image_size, image_size), Image.BILINEAR)
    return normalize(torch.from_numpy(np.array(im)).permute(2, 0, 1))

# -----------------------------------------------------------------------------
# command line: look at the data before training on it


def preview(ds, path, rows=4, cols=8, zoom=3):
    """PNG grid of the first rows*cols images, label names under each."""
    n = min(rows * cols, len(ds))
    names = [[ds.classes[j] for j in torch.nonzero(ds.targets[i] == 1).flatten()] for i in range(n)]
    if hasattr(ds, "scenes"):  # synthetic: the latent scene first, in brackets
        names = [[f"[{ds.scene_names[ds.scenes[i]]}]"] + v for i, v in enumerate(names)]
    side, line = ds.image_size * zoom, 12
    cell_h = side + line * max(map(len, names)) + 6
    grid = Image.new("RGB", (cols * (side + 4), rows * cell_h), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * (side + 4), (i // cols) * cell_h
        img = denormalize(ds[i][0]).permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (x, y))  # NEAREST: honest pixels
        for k, name in enumerate(names[i]):
            draw.text((x + 2, y + side + 2 + k * line), name, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def print_stats(ds):
    """Label frequencies, labels per image, co-occurrence: only needs ds.targets."""
    pos = (ds.targets == 1).float()  # (N, L); -1 (ignore) counts as absent here
    N, L = pos.shape
    counts, card = pos.sum(0), pos.sum(1)
    print(f"{N} images, {L} labels")
    for j, c in enumerate(ds.classes):
        print(f"  {j:2d} {c:16s} {int(counts[j]):6d}  {100 * counts[j] / N:5.1f}%")
    hist = torch.bincount(card.long()).tolist()
    print(f"labels per image: mean {card.mean():.2f}; histogram " + ", ".join(f"{k}: {h}" for k, h in enumerate(hist)))
    co = (pos.T @ pos).long()  # (L, L); diagonal = label counts
    print("co-occurrence counts (rows and columns = label index above):")
    print("    " + "".join(f"{j:5d}" for j in range(L)))
    for i in range(L):
        print(f"  {i:2d}" + "".join(f"{int(v):5d}" for v in co[i]))
    never = [f"{ds.classes[i]}+{ds.classes[j]}" for i in range(L) for j in range(i + 1, L) if co[i, j] == 0]
    print(f"{len(never)} pairs never together: " + ", ".join(never))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Inspect a dataset: a preview grid and/or label statistics.")
    ap.add_argument("--dataset", default="synthetic", help=f"one of {', '.join(DATASETS)}")
    ap.add_argument("--data-root", default=None, help="dataset folder (synthetic needs none)")
    ap.add_argument("--split", default="train", choices=SPLITS, help="which split")
    ap.add_argument("--image-size", type=int, default=None, help="image side in pixels (synthetic: 64)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic benchmark id (0 = the reported one)")
    ap.add_argument("--preview", nargs="?", const="assets/synthetic_preview.png", metavar="PATH",
                    help="write a PNG grid of examples (default PATH: assets/synthetic_preview.png)")
    ap.add_argument("--stats", action="store_true", help="print label statistics of the split")
    args = ap.parse_args()
    if not (args.preview or args.stats):
        ap.error("nothing to do: pass --preview [PATH] and/or --stats")
    if args.dataset == "synthetic" and not args.stats:  # a preview needs 32 images, not the split
        ds = SyntheticMultiLabel(args.split, args.image_size or 64, False, args.seed, size=32)
    else:
        ds = build_dataset(args.dataset, args.split, args.data_root, args.image_size, False, args.seed)
    if args.preview:
        preview(ds, args.preview)
        print(f"wrote {args.preview}")
    if args.stats:
        print_stats(ds)
