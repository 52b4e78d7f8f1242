"""
Data: the datasets DR-MoE trains and is evaluated on, behind one entry point,
build_dataset(name, split, root, image_size, augment, seed, limit, ...).

- synthetic: the embedded benchmark (generator in lib/synthetic.py), rendered in memory, no download.
- voc: PASCAL VOC 2007 from the devkit layout VOCdevkit/VOC2007/{JPEGImages, ImageSets/Main}; labels
  from the official classification files <class>_<split>.txt (1 present, -1 absent, 0 difficult).
- coco: MS-COCO 2014 from train2014/, val2014/, annotations/instances_{train,val}2014.json, read with
  the standard library's json (no pycocotools); the 80 classes in category-id order.
- csv, cocojson: your own data, a CSV per split or COCO-style json (readers in lib/owndata.py).

label_cooccurrence (lib/spectral.py, imported here) counts which labels appear together in a split's targets:
ML-GCN's label graph and the label groups of ML-VPT and DR-MoE are built from it, and `--stats` prints it.

Every dataset returns ds[i] = (image float32 (3, S, S) normalised with ImageNet mean/std, target
float32 (L,)) with 1 = present, 0 = absent, -1 = ignore (VOC's difficult; every metric skips it), and
has `classes` (L names), `targets` (N, L), `ids` (N strings), `image_size`. Photos are read lazily (in
DataLoader workers) through the papers' transforms: build_transform below. Any setup problem raises
DatasetError with a message that says where it looked and how to get the data.

    python data.py --preview                                 # grid -> runs/preview_synthetic.png
    python data.py --preview assets/synthetic_preview.png    # the README's picture
    python data.py --stats --split val                       # frequencies, cardinality, co-occurrence
    python data.py --dataset voc --data-root R --stats       # split sizes and label statistics of VOC
    python data.py --dataset voc --data-root R --download    # fetch VOC 2007 (both archives, md5 checked)
    python data.py --dataset csv --data-root DIR --stats     # your own data: checked, then its statistics
    python -m pytest -q tests/test_data.py tests/test_real_data.py
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from lib.distributed import is_main
from lib.spectral import label_cooccurrence  # noqa: F401  (data.label_cooccurrence: counts of label pairs)
from lib.owndata import OWN_SPLITS, DatasetError, check_images, holdout, own_source, read_coco_json, read_own
from lib.synthetic import (CLASSES, LABEL_GROUPS, SCENES, SOURCE_CLASSES, SOURCE_SEED, SPLIT_SIZES, SPLITS, labels_from_objects,
                       render_synthetic, source_labels_from_objects)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "synthetic-pretrain", "voc", "coco", "csv", "cocojson")
NUM_LABELS = {"synthetic": 20, "synthetic-pretrain": len(SOURCE_CLASSES), "voc": 20, "coco": 80}   # L, without reading data

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

    def __init__(self, split="train", image_size=64, augment=None, seed=0, size=None, progress=True, source=False):
        # source=True: the pretraining task (lib/synthetic.py, "source task"): SOURCE_SEED's images, SOURCE_CLASSES.
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        n = SPLIT_SIZES[split] if size is None else size
        self.split, self.image_size, self.seed = split, image_size, seed
        self.augment = (split == "train") if augment is None else augment
        self.classes, self.scene_names = list(SOURCE_CLASSES if source else CLASSES), list(SCENES)
        seed = SOURCE_SEED + seed if source else seed
        to_target = source_labels_from_objects if source else labels_from_objects
        self.label_groups = {} if source else {g: list(v) for g, v in LABEL_GROUPS.items()}
        self.images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        self.targets = torch.zeros((n, len(self.classes)), dtype=torch.float32)
        self.scenes = torch.zeros(n, dtype=torch.long)  # latent scene, for analyses
        self.objects = []  # per image, the Obj list actually drawn
        # Under torchrun every rank renders the split; only rank 0 shows it.
        progress = progress and is_main()
        for i in tqdm(range(n), desc=f"synthetic {split}", disable=None if progress else True, mininterval=0.5):
            img, scene, objs = render_synthetic(seed, split, i, image_size)
            self.images[i] = torch.from_numpy(img).permute(2, 0, 1)
            self.targets[i] = torch.from_numpy(to_target(objs))
            self.scenes[i] = scene
            self.objects.append(objs)
        self.ids = [f"synthetic{'-pretrain' if source else ''}-{split}-{i:06d}" for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)  # safe: no label depends on left/right
        return normalize(x), self.targets[i]


# -----------------------------------------------------------------------------
# real photographs: PASCAL VOC 2007 and MS-COCO 2014 in their standard layouts


def load_rgb(path, size_hint=None):
    """Any image file -> PIL RGB image; grayscale, CMYK, palette and alpha all become plain RGB."""
    try:
        with Image.open(path) as im:
            if size_hint and im.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; draft() keeps the result >= size_hint,
                # so a 96-px CPU run does not pay for decoding 500x375 photos at full size.
                im.draft("RGB", (size_hint, size_hint))
            if im.mode in ("P", "PA", "LA") or "transparency" in im.info:
                im = im.convert("RGBA")   # via RGBA: a palette's transparency survives the conversion
            return im.convert("RGB")      # decodes everything: a truncated file fails here, not later
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DatasetError(f"cannot read image file {str(path)!r}: {type(e).__name__}: {e}") from None


class Cutout:
    """ASL's CutoutPIL (Ridnik et al. 2021; Q2L's code ships it too): one rectangle of `factor` x each side, centred at a
    random point (clipped at the border), filled with one random colour. On PIL images, as ASL's."""

    def __init__(self, factor=0.5):
        self.factor = factor

    def __call__(self, im):
        W, H = im.size
        h, w = int(self.factor * H + 0.5), int(self.factor * W + 0.5)
        cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()   # torch RNG: seeded per worker
        y1, y2, x1, x2 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
        im = im.copy()
        if y2 > y1 and x2 > x1:   # PIL's box is inclusive of its last pixel: rows y1..y2-1, as a slice
            ImageDraw.Draw(im).rectangle([x1, y1, x2 - 1, y2 - 1], fill=tuple(torch.randint(256, (3,)).tolist()))
        return im


def build_transform(image_size, train, randaugment=True, cutout=0.0, hflip=True):
    """Train: resize, [flip], [Cutout], [RandAugment]. Eval: resize. Both end in ImageNet normalisation.

    What each source does (checked against the official code):
    - ASL (Alibaba-MIIL/ASL train.py): Resize, CutoutPIL(cutout_factor=0.5), RandAugment, ToTensor; no flip.
    - Q2L (SlongLiu/query2labels, lib/dataset/get_dataset.py): Resize, [SLCutoutPIL], RandAugment, ToTensor,
      Normalize; no flip. Its README passes --cutout --cut_fact 0.5, but cut_fact never reaches the cutout,
      whose length stays -1: in effect no usable Cutout (on current Pillow the inverted box even raises).
    - ML-GCN (train transforms): MultiScaleCrop, RandomHorizontalFlip.
    Here: the flip of ML-GCN (--no-hflip for ASL's and Q2L's pipeline), then ASL's Cutout 0.5 before
    RandAugment, as ASL and Q2L order them, so the patch is recoloured like the rest.
    The resize squashes to a square without cropping, as ML-GCN's test transform and Q2L do: a label's only
    evidence may sit at the border. Everything before the tensor conversion runs on PIL images, as in ASL's
    and Q2L's code: RandAugment's geometric ops take 2 ms on a 448-px PIL image and 10 ms on a uint8 tensor
    (studies/bench.py --only loader measures it)."""
    t = [v2.Resize((image_size, image_size), antialias=True)]
    if train and hflip:
        t.append(v2.RandomHorizontalFlip())
    if train and cutout > 0:
        t.append(Cutout(cutout))
    if train and randaugment:
        t.append(v2.RandAugment())                              # 2 random ops of magnitude 9 (the defaults)
    t += [v2.PILToTensor(),                                     # uint8 (3, S, S)
          v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(t)


class ImageList(Dataset):
    """Image files with known targets; an image is read (and augmented) only when asked for.

    Unlike the synthetic set, photos are not held in memory: COCO's 82,783 training images at 448 px
    would be 50 GB of uint8. Decoding happens in the DataLoader's worker processes, in parallel."""

    def __init__(self, paths, targets, ids, classes, image_size, transform):
        self.paths, self.ids, self.classes, self.image_size = list(paths), list(ids), list(classes), image_size
        self.targets = torch.as_tensor(targets, dtype=torch.float32)   # (N, L) in {1, 0, -1}
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.paths[i], self.image_size)), self.targets[i]

    def check_readable(self, name: str):
        """Every file's header read once (PIL opens lazily: the format, the size, no pixels), so that an empty,
        truncated-at-the-start or non-image file stops the run at start-up, named, not in epoch 7's worker.
        About 0.1 ms a file (a VOC split: ~1 s, COCO's train: ~10 s); a file whose header is fine but whose
        pixels are broken is still found only when read, and the message then says what --resume keeps."""
        bad = []
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    im.size
            except Exception as e:   # PIL raises OSError, SyntaxError, ValueError...
                bad.append(f"{path} ({type(e).__name__})")
        if bad:
            raise DatasetError(f"{len(bad)} image file(s) of the {name} split cannot be read: {', '.join(bad[:3])}"
                               + (" ..." if len(bad) > 3 else "") + "; replace or remove them from the split's list")


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")   # the standard order of the devkit and of every paper's tables
VOC_SPLITS = ("trainval", "train", "val", "test")
# The two archives of VOC 2007 (same URLs and md5 sums as torchvision.datasets.VOCDetection).
VOC_ARCHIVES = {"trainval": ("https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
                             "c52e279531787c972589f7e41ab4ae64"),
                "test": ("https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar",
                         "b6e924de25625d8de591ea690078ad9f")}
VOC_HELP = ("get it with: python train.py --dataset voc --data-root DIR --download (or fetch "
            "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar and untar both in DIR; see README)")
COCO_SPLITS = ("train", "val")
COCO_HELP = "see docs/datasets.md ('MS-COCO 2014') for the download commands and the layout"


def find_voc_root(root):
    """--data-root may be the folder holding VOCdevkit, VOCdevkit itself, or VOC2007 itself."""
    if not root:
        raise DatasetError(f"--dataset voc needs --data-root; {VOC_HELP}")
    tried = [os.path.join(root, "VOCdevkit", "VOC2007"), os.path.join(root, "VOC2007"), root]
    for d in tried:
        if os.path.isdir(os.path.join(d, "JPEGImages")) and os.path.isdir(os.path.join(d, "ImageSets", "Main")):
            return d
    raise DatasetError("no PASCAL VOC 2007 found. Looked for JPEGImages/ and ImageSets/Main/ in:\n  "
                       + "\n  ".join(tried) + f"\n{VOC_HELP}")


def read_voc(root, split):
    """VOC 2007 classification labels -> (paths, targets (N, 20) with 1 present, 0 absent, -1 difficult, ids).

    The official per-class files ImageSets/Main/<class>_<split>.txt hold one line per image: "000005 -1"
    (absent), "000005  1" (present) or "000005  0" (only difficult instances: ignored by the metrics)."""
    d = find_voc_root(root)
    main = os.path.join(d, "ImageSets", "Main")
    listing = os.path.join(main, f"{split}.txt")
    if not os.path.isfile(listing):
        raise DatasetError(f"VOC 2007 split {split!r} is missing: no {listing}\n"
                           f"(the test split comes in its own archive, VOCtest_06-Nov-2007.tar); {VOC_HELP}")
    # The split listing fixes the row order (the devkit's order), so row k of `targets` is the k-th id of
    # <split>.txt whatever order the per-class files use.
    ids = open(listing).read().split()
    row = {i: k for k, i in enumerate(ids)}
    # A class file the 20 classes do not explain means a different or modified dataset: stop, do not guess.
    unknown = sorted(f[:-len(f"_{split}.txt")] for f in os.listdir(main)
                     if f.endswith(f"_{split}.txt") and f[:-len(f"_{split}.txt")] not in VOC_CLASSES)
    if unknown:
        raise DatasetError(f"{main}: unknown class name(s) {unknown}; VOC 2007 has exactly {list(VOC_CLASSES)}")
    targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.float32)
    # The devkit's 0 means "only difficult instances": neither a clear positive nor a negative, so it
    # becomes -1, the value every metric (and --difficult ignore) skips.
    to_target = {"1": 1.0, "-1": 0.0, "0": -1.0}
    for j, c in enumerate(VOC_CLASSES):
        path = os.path.join(main, f"{c}_{split}.txt")
        if not os.path.isfile(path):
            raise DatasetError(f"VOC 2007 is incomplete: no {path}; {VOC_HELP}")
        seen = 0
        for n, line in enumerate(open(path), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[0] not in row or parts[1] not in to_target:
                raise DatasetError(f"{path}, line {n}: expected '<image id in {split}.txt> <1|0|-1>', got {line.strip()!r}")
            targets[row[parts[0]], j] = to_target[parts[1]]
            seen += 1
        # Every image must appear in every class file; fewer lines means a damaged or mixed-up file, and
        # its missing rows would silently read as "absent".
        if seen != len(ids):
            raise DatasetError(f"{path} lists {seen} images but {listing} has {len(ids)}")
    paths = check_images(os.path.join(d, "JPEGImages"), [f"{i}.jpg" for i in ids], listing, VOC_HELP)
    return paths, targets, ids


def download_voc(root):
    """Fetch and untar both VOC 2007 archives into root (md5 checked by torchvision); skip what is there."""
    from torchvision.datasets.utils import download_and_extract_archive
    for split, (url, md5) in VOC_ARCHIVES.items():
        if os.path.isfile(os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main", f"{split}.txt")):
            print(f"VOC 2007 {split}: already in {root}")
            continue
        try:
            download_and_extract_archive(url, download_root=root, md5=md5)
        except Exception as e:   # URLError offline, md5 mismatch, server down
            raise DatasetError(f"downloading {url} failed ({type(e).__name__}: {e}).\n"
                               f"Offline? Fetch the archive elsewhere and untar it in {root}.") from None


def read_coco(root, split, empty="keep"):
    """COCO 2014 instances json -> (paths, targets (N, 80), ids, class names ordered by category id).

    A category is a label if any instance of it is annotated, crowd instances included. Images with no
    annotation at all are all-negative rows (empty="keep": 82,783 train / 40,504 val images, as Q2L) or
    left out (empty="drop", as ML-GCN's lists)."""
    if split not in COCO_SPLITS:
        raise DatasetError(f"unknown COCO split {split!r}; expected one of {COCO_SPLITS} (2014)")
    if not root:
        raise DatasetError(f"--dataset coco needs --data-root; {COCO_HELP}")
    ann = os.path.join(root, "annotations", f"instances_{split}2014.json")
    folder = os.path.join(root, f"{split}2014")
    if not (os.path.isfile(ann) and os.path.isdir(folder)):
        raise DatasetError(f"no MS-COCO 2014 {split} split in {root}: expected {ann} and {folder}/; {COCO_HELP}")
    print(f"reading {ann} (the train json takes ~20 s and a few GB of memory)")
    return read_coco_json(ann, [folder], empty, COCO_HELP)


def build_dataset(name, split, root=None, image_size=None, augment=None, seed=0, limit=None,
                  randaugment=True, cutout=0.0, empty="keep", hflip=True, size=None):
    """The one entry point. Splits: synthetic train/val/test; voc trainval/train/val/test; coco train/val.
    augment defaults to True for training splits; seed picks the synthetic benchmark (0 = the reported
    one), not the training seed; limit keeps only the first `limit` images (smoke tests). randaugment,
    cutout, hflip and empty (COCO's unannotated images: keep | drop) apply to the photo datasets; size
    (synthetic only) renders that many images for the split instead of SPLIT_SIZES[split] (image i is the
    same image whatever the size, so a larger split extends the smaller one)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    splits = {"synthetic": SPLITS, "synthetic-pretrain": SPLITS, "voc": VOC_SPLITS, "coco": COCO_SPLITS, "csv": OWN_SPLITS, "cocojson": OWN_SPLITS}[name]
    if split not in splits:
        raise DatasetError(f"unknown {name} split {split!r}; expected one of {', '.join(splits)}")
    if augment is None:
        augment = split in ("train", "trainval")
    if name.startswith("synthetic"):
        size = size or SPLIT_SIZES[split]
        size = size if limit is None else min(limit, size)
        return SyntheticMultiLabel(split, image_size or 64, augment, seed, size=size, source=name == "synthetic-pretrain")
    image_size = image_size or 448
    if name == "voc":
        paths, targets, ids = read_voc(root, split)
        classes = VOC_CLASSES
    elif name == "coco":
        paths, targets, ids, classes = read_coco(root, split, empty)
    else:   # your own data (lib/owndata.py)
        paths, targets, ids, classes = read_own(name, root, split, empty)
    n = len(paths) if limit is None else min(limit, len(paths))
    ds = ImageList(paths[:n], targets[:n], ids[:n], classes, image_size,
                   build_transform(image_size, augment, randaugment, cutout, hflip))
    # Where the split comes from, in words (train.py says it at start): a file, a part of one, a folder.
    ds.source = (own_source(name, root, split) if name in ("csv", "cocojson") else
                 f"VOC 2007 {split}" if name == "voc" else f"{split}2014")
    return ds


def hold_out(train: ImageList, plain: ImageList):
    """--val-split holdout: the training split, read with and without augmentation -> (its 90 % to train on,
    the other 10 % to choose the best epoch and the thresholds on, with the evaluation transform). The rows
    are lib/owndata.holdout's (seed 0: the same images for every --seed), as own data without a val file."""
    if not isinstance(train, ImageList):
        raise DatasetError("--val-split holdout holds images out of a dataset of files (voc, coco, csv, cocojson); "
                           "the synthetic benchmark has its own val split")
    keep, held = holdout(len(train))
    part = lambda d, rows: ImageList([d.paths[i] for i in rows], d.targets[rows], [d.ids[i] for i in rows],
                                     d.classes, d.image_size, d.transform)
    return part(train, keep), part(plain, held)


def load_image(path, image_size):
    """Any image file -> float32 (3, S, S), prepared as evaluation prepares dataset images."""
    return build_transform(image_size, train=False)(load_rgb(path, image_size))

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
    """Label frequencies, labels per image, co-occurrence (ML-GCN's graph is built from it): needs ds.targets."""
    pos = (ds.targets == 1).float()  # (N, L); -1 (difficult / ignore) counts as absent here
    N, L = pos.shape
    counts, card, ignored = pos.sum(0), pos.sum(1), (ds.targets == -1).sum(0)
    print(f"{N} images, {L} labels")
    print(f"  {'':2s} {'label':16s} {'images':>6s}  {'share':>5s}" + (f"  {'ignored (difficult)':>19s}" if ignored.any() else ""))
    for j, c in enumerate(ds.classes):
        print(f"  {j:2d} {c:16s} {int(counts[j]):6d}  {100 * counts[j] / N:5.1f}%"
              + (f"  {int(ignored[j]):19d}" if ignored.any() else ""))
    hist = torch.bincount(card.long()).tolist()
    print(f"labels per image (cardinality): mean {card.mean():.2f}; histogram " + ", ".join(f"{k}: {h}" for k, h in enumerate(hist)))
    co = (pos.T @ pos).long()  # (L, L); diagonal = label counts
    if L <= MATRIX_LABELS:   # the whole matrix fits a terminal
        print("co-occurrence counts (rows and columns = label index above; diagonal = images with the label):")
        print("    " + "".join(f"{j:6d}" for j in range(L)))
        for i in range(L):
            print(f"  {i:2d}" + "".join(f"{int(v):6d}" for v in co[i]))
    else:   # COCO's 80 labels: an 80 x 80 matrix is 80 lines of 480 characters; the pairs that matter instead
        pairs = sorted(((int(co[i, j]), i, j) for i in range(L) for j in range(i + 1, L)), reverse=True)[:TOP_PAIRS]
        print(f"co-occurrence: the {TOP_PAIRS} most frequent pairs (images with both; data.label_cooccurrence has all):")
        for k in range(0, len(pairs), 2):   # two pairs a line
            print("  " + "   ".join(f"{ds.classes[i]}+{ds.classes[j]} {n}" for n, i, j in pairs[k:k + 2]))
    never = [f"{ds.classes[i]}+{ds.classes[j]}" for i in range(L) for j in range(i + 1, L) if co[i, j] == 0]
    print(f"{len(never)} pairs never together" + (": " + ", ".join(never) if len(never) <= 40 else ""))


MATRIX_LABELS, TOP_PAIRS = 20, 20   # --stats prints the whole co-occurrence matrix up to 20 labels, else the top pairs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Inspect a dataset: a preview grid and/or label statistics.")
    ap.add_argument("--dataset", default="synthetic", help=f"one of {', '.join(DATASETS)}")
    ap.add_argument("--data-root", default=None, help="dataset folder (synthetic needs none)")
    ap.add_argument("--split", default=None, help="which split [default: all standard splits for --stats, "
                    "the training split for --preview]")
    ap.add_argument("--image-size", type=int, default=None, help="image side in pixels (synthetic 64, photos 448)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic benchmark id (0 = the reported one)")
    # The default path is under runs/ (ignored by git), named after the dataset: a preview of VOC must not
    # overwrite the README's tracked assets/synthetic_preview.png. The README names that path explicitly.
    ap.add_argument("--preview", nargs="?", const="", metavar="PATH",
                    help="write a PNG grid of examples (default PATH: runs/preview_<dataset>.png)")
    ap.add_argument("--stats", action="store_true", help="print split sizes and label statistics")
    ap.add_argument("--download", action="store_true", help="voc: fetch VOC 2007 into --data-root first")
    args = ap.parse_args()
    if args.preview == "":
        args.preview = os.path.join("runs", f"preview_{args.dataset}.png")
    if not (args.preview is not None or args.stats or args.download):
        ap.error("nothing to do: pass --preview [PATH], --stats and/or --download")
    standard = {"synthetic": SPLITS, "synthetic-pretrain": SPLITS, "voc": ("trainval", "test"), "coco": ("train", "val"),
                "csv": OWN_SPLITS, "cocojson": OWN_SPLITS}
    try:
        if args.download:
            if args.dataset != "voc":
                ap.error("--download fetches VOC 2007 only; for COCO see the README")
            download_voc(args.data_root or ".")
        if args.preview is not None:
            split = args.split or standard[args.dataset][0]
            if args.dataset.startswith("synthetic"):  # a preview needs 32 images, not the split
                ds = SyntheticMultiLabel(split, args.image_size or 64, False, args.seed, size=32,
                                         source=args.dataset == "synthetic-pretrain")
            else:
                ds = build_dataset(args.dataset, split, args.data_root, args.image_size or 128, False, limit=32)
            os.makedirs(os.path.dirname(args.preview) or ".", exist_ok=True)
            preview(ds, args.preview)
            print(f"wrote {args.preview}")
        if args.stats:
            splits = [args.split] if args.split else standard[args.dataset]
            sets = {s: build_dataset(args.dataset, s, args.data_root, args.image_size, False, args.seed) for s in splits}
            print("split sizes: " + ", ".join(f"{s} {len(d)}" for s, d in sets.items()))
            for s, d in sets.items():
                print(f"\n== {args.dataset} {s} ==")
                print_stats(d)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
