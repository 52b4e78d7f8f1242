"""
Predictions for your own images from a checkpoint alone: a few files printed, or a whole folder written to a
CSV, with one threshold for every label or per-label thresholds chosen on the validation split in training.

    python evaluate.py --checkpoint RUN/best.pt --image cat.jpg dog.png              # print each file's labels
    python evaluate.py --checkpoint RUN/best.pt --images DIR --out predictions.csv   # a folder -> one CSV row each
    python evaluate.py --checkpoint RUN/best.pt --images DIR --thresholds best       # per-label thresholds

    best_f1_thresholds(scores (N, L), targets (N, L)) -> (L,)   the thresholds train.py saves in best.pt
    predict_folder(model, files, load, ...)           -> (probabilities (n, L), unreadable files)

`load(path) -> image (3, S, S)` is data.load_image at the run's size (evaluate.py passes it): this file
reads no dataset code, so the scripts above it may use it.

Per-label thresholds. 0.5 is a convention, not an optimum: a rare label's probabilities rarely reach it,
a common one's pass it too easily. At the end of training, train.py scores the validation split with the
best weights and keeps, per label, the threshold that maximises that label's F1 there (F1 = 2 TP / (2 TP +
FP + FN)), as a threshold-tuning practice the multi-label literature reports beside the fixed 0.5. The
threshold is placed halfway between the last score it accepts and the next lower one: the same validation
decisions, less tied to one image's score. A label without a validation positive keeps 0.5.
"""
import csv
import os

import numpy as np
import torch
from tqdm import tqdm

from lib.owndata import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def best_f1_thresholds(scores, targets, default=0.5) -> np.ndarray:
    """(N, L) probabilities, (N, L) targets in {1, 0, -1} -> (L,) per-label F1-maximising thresholds."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    out = np.full(scores.shape[1], default)
    for l in range(scores.shape[1]):
        keep = targets[:, l] != -1                       # unknown entries are no evidence either way
        s, y = scores[keep, l], targets[keep, l] == 1
        if not y.any():
            continue
        order = np.argsort(-s, kind="stable")
        s, y = s[order], y[order]
        last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)   # end of each tie group: one threshold
        tp = np.cumsum(y)[last]                          # positives with score >= s_g
        predicted = last + 1                             # images with score >= s_g
        f1 = 2 * tp / (predicted + y.sum())              # 2TP / (2TP + FP + FN) = 2TP / (#predicted + #positive)
        g = int(np.argmax(f1))                           # the first maximum: the highest such threshold
        # halfway to the next lower score (the same decisions on val); the lowest group keeps its own score
        out[l] = (s[last[g]] + s[last[g] + 1]) / 2 if last[g] + 1 < s.size else s[last[g]]
    return out


def list_images(folder: str) -> list:
    """Every image file under folder (subfolders included), sorted: the CSV's row order."""
    found = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


class NonFinite(ValueError):
    """The model gives NaN or inf: its weights do (a diverged run); evaluate.py names the checkpoint."""


class _Files(torch.utils.data.Dataset):
    """Image files -> (image, index, readable); an unreadable file gives zeros and readable = False, so one
    corrupt photo is reported and skipped instead of stopping the folder."""

    def __init__(self, files, load, image_size):
        self.files, self.load, self.image_size = files, load, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.load(self.files[i]), i, True
        except DatasetError:
            return torch.zeros(3, self.image_size, self.image_size), i, False


@torch.no_grad()
def predict_folder(model, files, load, image_size, device, fmt, batch_size=32, num_workers=0):
    """-> probabilities (n, L) for the readable files in order (NaN rows for the others), unreadable files."""
    loader = torch.utils.data.DataLoader(_Files(files, load, image_size), batch_size=batch_size, num_workers=num_workers)
    probs, bad = None, []
    for x, index, ok in tqdm(loader, desc="predict", dynamic_ncols=True, disable=None):   # bars on a terminal only
        logits = model(x.to(device, memory_format=fmt))[0].float()          # (B, L)
        p = torch.sigmoid(logits).cpu().numpy()
        if not np.isfinite(p[ok.numpy()]).all():
            raise NonFinite()
        if probs is None:
            probs = np.full((len(files), p.shape[1]), np.nan)
        probs[index[ok].numpy()] = p[ok.numpy()]
        bad += [files[i] for i in index[~ok].tolist()]
    return probs, bad


def write_csv(path, folder, files, probs, classes, thresholds):
    """One row per readable image: its path (relative to the folder), the predicted labels joined by '|'
    (the format --dataset csv reads back), then each label's probability."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "labels", *classes])
        for f, p in zip(files, probs):
            if np.isnan(p).any():
                continue                                                # unreadable: listed, not written
            labels = "|".join(c for c, v, t in zip(classes, p, thresholds) if v >= t)
            w.writerow([os.path.relpath(f, folder), labels, *(f"{v:.6f}" for v in p)])


def thresholds_for(ckpt, which) -> np.ndarray:
    """--thresholds best -> the checkpoint's per-label thresholds; a number -> that number for every label."""
    L = len(ckpt["classes"])
    if which == "best":
        if ckpt.get("thresholds") is None:
            raise ValueError("--thresholds best: this checkpoint has no per-label thresholds (train.py saves them "
                             "in best.pt at the end of a run); pass --threshold P instead")
        return np.asarray(ckpt["thresholds"], np.float64)
    return np.full(L, float(which))


def predict_images(model, ckpt, fmt, device, files, thresholds, load):
    """--image: each file's labels above its threshold, or, when none passes, that fact and the 3 most likely.

    A label below the threshold is not a prediction: printing the top-1 as if it were one would turn "the
    model sees nothing it knows" into a confident answer, hence the explicit "no label above" line.
    """
    classes = ckpt["classes"]
    print(f"the model knows {len(classes)} classes: {', '.join(classes)}")
    out = {}
    for path in files:
        try:
            x = load(path).unsqueeze(0).to(device, memory_format=fmt)
        except DatasetError as e:  # an unreadable file is reported and skipped, the others still run
            print(f"{path}: skipped, {e}")
            continue
        with torch.no_grad():
            probs = torch.sigmoid(model(x)[0].float())[0].cpu()                   # (1, L) -> (L,)
        if not torch.isfinite(probs).all():
            raise NonFinite()
        order = probs.argsort(descending=True).tolist()
        hits = [l for l in order if probs[l] >= thresholds[l]]
        if hits:
            print(f"{path}: " + ", ".join(f"{classes[l]} {probs[l]:.3f}" for l in hits))
        else:
            shown = f"{thresholds[0]:g}" if np.all(thresholds == thresholds[0]) else "its label's threshold"
            print(f"{path}: no label above {shown}; most likely: "
                  + ", ".join(f"{classes[l]} {probs[l]:.3f}" for l in order[:3]))
        out[path] = {c: float(probs[l]) for l, c in enumerate(classes)}
    return out
