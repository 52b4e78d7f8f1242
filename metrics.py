"""
The one home of this codebase's metrics: the field's metrics for multi-label image classification.

Concept
-------
A multi-label classifier outputs, for every image, an independent score per
label. Two families of metrics are standard (MS-COCO, VOC 2007, NUS-WIDE):

* Ranking quality per label, threshold-free: average precision (AP) and its
  mean over labels, mAP. AP here is the non-interpolated one (the mean of the
  precision measured at the rank of every positive), as in
  `sklearn.metrics.average_precision_score` and in ML-GCN's
  AveragePrecisionMeter -- NOT the 11-point interpolated AP of the original
  VOC 2007 devkit, whose numbers are not comparable.
* Decision quality at a fixed threshold (0.5 on probabilities): per-class
  (C) and overall (O) precision, recall and F1 -- CP, CR, CF1, OP, OR, OF1 --
  and their "top-3" variants where each image may predict at most its three
  highest-scoring labels (reported since CNN-RNN, Wang et al., CVPR 2016,
  and by most papers after it).

Definitions follow ML-GCN (Chen, Wei, Wang, Guo, "Multi-Label Image
Recognition with Graph Convolutional Networks", CVPR 2019), official code
github.com/Megvii-Nanjing/ML-GCN, `util.py`, AveragePrecisionMeter
(`evaluation`, `overall_topk`), with two deliberate differences, documented
where they are implemented in `multilabel_metrics`:
  (a) entries whose target is -1 ("ignore", e.g. VOC "difficult" objects or
      unannotated labels) are excluded from every metric;
  (b) labels with no positive are excluded from mAP, CP and CR.
ML-GCN also breaks score ties in an arbitrary (sort-order) way; here ties are
handled deterministically (AP: like sklearn; top-3: by label index).

Target encoding of THIS codebase: 1 = present, 0 = absent, -1 = ignore.
Beware when porting numbers or code: ML-GCN's loaders use 1 = present,
-1 = absent, 0 = difficult.

Shapes (N = number of images here, not tokens; L = labels)
------------------------------------------------------------
    average_precision(scores (N, L), targets (N, L))   -> (L,) float64, NaN if
                                                         a label has no positive
    multilabel_metrics(scores (N, L), targets (N, L))  -> dict of floats in
                                                         percent (0-100)
Inputs may be numpy arrays, torch tensors (any device/dtype) or nested lists;
everything is computed in float64 on the CPU.

The script that applies them to a checkpoint is evaluate.py; train.py calls them after every epoch.
Tests: tests/test_metrics.py (hand cases, a brute-force reference, sklearn where installed).
"""
import numpy as np
import torch

# Number of labels an image may predict in the "top-k" protocol. 3 is the
# value used since CNN-RNN (COCO images carry ~2.9 labels on average).
TOPK = 3


# -----------------------------------------------------------------------------
# input handling

def _to_float64(x, name):
    """Array-like (numpy / torch / list) -> (N, L) float64 numpy array."""
    if isinstance(x, torch.Tensor):
        # .double() first: bfloat16 (autocast outputs) has no numpy equivalent
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N images, L labels), got shape {x.shape}")
    return x


def _check_inputs(scores, targets):
    """Convert and validate; returns (scores (N, L), targets (N, L)) float64."""
    scores = _to_float64(scores, "scores")
    targets = _to_float64(targets, "targets")
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    # A NaN score would silently sort to one end and compare False with any
    # threshold; better to fail loudly (usually a diverged model).
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    # Catch soft / smoothed labels or class indices early: every metric below
    # would be silently wrong with them. (ML-GCN's 1/-1/0 encoding passes
    # this check and cannot be caught here: convert it before calling.)
    if not np.isin(targets, (-1.0, 0.0, 1.0)).all():
        raise ValueError("targets must only contain 1 (present), 0 (absent), -1 (ignore)")
    return scores, targets


# -----------------------------------------------------------------------------
# average precision

def _average_precision_1d(s, y):
    """AP of one label. s: (n,) scores, y: (n,) bool positives; ignored
    entries are already removed. Returns a float (NaN if no positive)."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")  # recall is undefined without a positive
    order = np.argsort(-s, kind="stable")  # descending score
    s, y = s[order], y[order]
    tp = np.cumsum(y)  # tp[i] = #positives among the i+1 highest scores
    # A group of tied scores is ONE threshold: every entry of the group is
    # "retrieved" together, so a positive inside it sees the precision at the
    # END of the group. Without this, AP would depend on the arbitrary order
    # of tied entries (ML-GCN's meter has that flaw). Index of the last
    # element of each tie group = where the next score differs, plus the end.
    last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    tp_end = tp[last]  # #positives with score >= s_group
    precision = tp_end / (last + 1)  # P(s) = #{pos: score >= s} / #{all: score >= s}
    new_pos = np.diff(tp_end, prepend=0)  # positives inside each group
    # AP = (1/n_pos) Σ_positives P(score of that positive)
    #    = Σ_groups (R_g - R_{g-1}) P_g     -- sklearn's formula, same number
    return float(np.sum(new_pos * precision) / n_pos)


def average_precision(scores, targets):
    """Per-label non-interpolated average precision.

    scores: (N, L) real scores (probabilities or logits: only the order
    matters). targets: (N, L) in {1, 0, -1}. Returns (L,) float64; entries
    with target -1 are removed for that label, a label without any positive
    gets NaN. Ties are handled as sklearn's average_precision_score does.
    """
    scores, targets = _check_inputs(scores, targets)
    ap = np.full(scores.shape[1], np.nan)
    # Loop over labels (L ~ 20-80), vectorised over images: each label has its
    # own set of ignored entries, hence its own length after removal.
    for l in range(scores.shape[1]):
        keep = targets[:, l] != -1
        ap[l] = _average_precision_1d(scores[keep, l], targets[keep, l] == 1)
    return ap


# -----------------------------------------------------------------------------
# precision / recall / F1 at a threshold

def _f1(p, r):
    # harmonic mean; 0 (not NaN) when nothing is right, as the limit suggests
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _precision_recall_f1(pred, valid, pos, evaluated):
    """CP, CR, CF1, OP, OR, OF1 as fractions (0-1).

    pred: (N, L) bool predicted positives; valid: (N, L) bool target != -1;
    pos: (N, L) bool target == 1; evaluated: (L,) bool labels with a positive.
    """
    # Per-label counts of ML-GCN's `evaluation`, restricted to valid entries.
    # Difference (a): ML-GCN maps ignored entries to negatives here (its AP
    # already skipped them), so a confident prediction on an unannotated /
    # difficult object counted as a false positive; we drop those entries.
    Nc = (pred & pos).sum(axis=0)  # correct positive predictions (pos implies valid)
    Np = (pred & valid).sum(axis=0)  # predicted positives
    Ng = pos.sum(axis=0)  # ground-truth positives
    # Overall (micro) scores pool the counts of ALL labels: a label with no
    # positive still contributes its false positives to ΣNp.
    # ML-GCN applies `Np[Np == 0] = 1` BEFORE summing, which adds one phantom
    # prediction per never-predicted label to ΣNp and so slightly lowers OP;
    # we use the true ΣNp. Nothing predicted at all -> OP = 0.
    OP = Nc.sum() / Np.sum() if Np.sum() > 0 else 0.0  # OP = ΣNc / ΣNp
    OR = Nc.sum() / Ng.sum()  # OR = ΣNc / ΣNg (ΣNg > 0: the caller checked)
    # Per-class (macro) scores: mean over the evaluated labels only.
    # Difference (b): ML-GCN divides by all labels, where a label with Ng = 0
    # gives Nc/Ng = 0/0 = NaN; we drop such labels from CP and CR, exactly as
    # from mAP, so all class averages run over the same labels.
    Nc, Np, Ng = Nc[evaluated], Np[evaluated], Ng[evaluated]
    # Precision of a never-predicted label counts as 0, as ML-GCN's
    # Np[Np == 0] = 1 gives (Nc = 0 then): it penalises silent labels.
    CP = np.mean(Nc / np.maximum(Np, 1))  # CP = (1/L') Σ_l Nc_l / Np_l
    CR = np.mean(Nc / Ng)  # CR = (1/L') Σ_l Nc_l / Ng_l
    # CF1 is the harmonic mean of the AVERAGED CP and CR (as in ML-GCN), not
    # the mean of per-label F1s; the two differ.
    return {"CP": CP, "CR": CR, "CF1": _f1(CP, CR), "OP": OP, "OR": OR, "OF1": _f1(OP, OR)}


def _topk_mask(scores, k):
    """(N, L) bool: True for the k highest scores of each image (row).
    Ties broken by label index (lower index wins): a stable sort of -scores
    keeps equal scores in their original, i.e. index, order. torch.topk, used
    by ML-GCN, leaves that choice unspecified."""
    k = min(k, scores.shape[1])  # fewer than k labels: all of them
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k) label ids
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def multilabel_metrics(scores, targets, threshold=0.5):
    """The standard multi-label benchmark numbers, in percent.

    scores: (N, L) probabilities; targets: (N, L) in {1, 0, -1}.
    A label is predicted for an image when its score >= threshold; in the
    top-3 variants only if it is also among the image's 3 highest scores.
    Returns a dict with mAP, CP, CR, CF1, OP, OR, OF1, the same six with a
    `_top3` suffix (floats, 0-100, NaN when there is no positive at all), and
    num_labels_evaluated (int, labels with >= 1 positive = the labels averaged
    over by mAP, CP and CR).
    """
    scores, targets = _check_inputs(scores, targets)
    valid = targets != -1  # (N, L) entries that count
    pos = targets == 1  # (N, L)
    # Difference (b): a label with no (non-ignored) positive has undefined AP
    # and recall, so it is left out of every class average (mAP, CP, CR).
    # ML-GCN never met such labels on the COCO/VOC test sets; they do occur
    # with small validation splits or after label filtering.
    evaluated = pos.any(axis=0)  # (L,)
    num_labels = int(evaluated.sum())

    names = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    names += [f"{n}_top{TOPK}" for n in names[1:]]
    if num_labels == 0:
        # N = 0, everything ignored, or no positive anywhere: no recall can be
        # measured, so report NaN everywhere rather than a misleading 0.
        out = dict.fromkeys(names, float("nan"))
        out["num_labels_evaluated"] = 0
        return out

    ap = average_precision(scores, targets)
    out = {"mAP": float(np.mean(ap[evaluated]))}  # mAP = (1/L') Σ_l AP_l
    pred = scores >= threshold  # (N, L); ">=" as in ML-GCN
    out.update(_precision_recall_f1(pred, valid, pos, evaluated))
    # Top-k (ML-GCN's overall_topk): keep a thresholded prediction only if it
    # is also among the image's k highest scores. The top-k is chosen over
    # ALL labels, ignored ones included, because a prediction cannot know
    # which entries were left unannotated; ignored entries are only dropped
    # afterwards, when counting.
    pred_topk = pred & _topk_mask(scores, TOPK)
    topk = _precision_recall_f1(pred_topk, valid, pos, evaluated)
    out.update({f"{n}_top{TOPK}": v for n, v in topk.items()})

    out = {n: 100.0 * float(v) for n, v in out.items()}  # fractions -> percent
    out["num_labels_evaluated"] = num_labels
    return out
