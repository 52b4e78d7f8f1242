"""
Evaluation: the field's metrics for multi-label image classification.

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

Below the metrics: `predict` (a model over a DataLoader -> scores, targets,
gate weights; train.py uses it too) and the command line, which also prints
analysis.gate_statistics (how the gate splits each label's mass between
shared and task experts) and, with --analysis, draws analysis.py's pictures:

    python evaluate.py --checkpoint runs/synthetic/drmoe-dynamic-S2-T1-seed0/best.pt           # test split
    python evaluate.py --checkpoint runs/synthetic/drmoe-dynamic-S2-T1-seed0/best.pt --image cat.jpg
    python evaluate.py --checkpoint RUN/best.pt --images DIR --out predictions.csv   # predictions.py

The first rebuilds the model from the checkpoint alone, prints every metric,
a per-label AP table with gate statistics, and writes them to JSON.
"""
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import analysis
import predictions
from checkpoint import load_checkpoint_model, read_checkpoint
from config import Parser, amp_dtype_for, check_device, pick_device
from distributed import gather_rows, is_main
from divdr import agreement, reference_partition, routing_signature, split_structure

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


# ----------------------------------------------------------------------------- running a model
@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, memory_format=torch.channels_last, features=False,
            routing=False):
    """Run a model over a loader in eval mode.

    -> scores (N, L) probabilities, targets (N, L) in {1, 0, -1}, gate weights (N, L, E) or None,
    with features=True also the pooled image features (N, D) the gate reads (analysis.py uses them), and
    with routing=True also the routing signatures (N, F) or None and their rows (divdr.routing_signature).
    Leaves the model in eval mode; train.py switches it back at the start of every epoch.
    Under torchrun the loader has a DistributedSampler: each rank scores its shard, and the shards are
    gathered back into the whole split, in order and each image once (distributed.gather_rows).
    """
    model.eval()
    scores, targets, gates, feats, sigs, rows = [], [], [], [], [], []
    for x, y in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not is_main()):
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, info = model(x)
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(y)
        if info.get("gate_weights") is not None:
            gates.append(info["gate_weights"].float().cpu())
        if features:
            feats.append(info["image_feature"].float().cpu())
        if routing:
            sig, rows = routing_signature(info, model)
            if sig is not None:
                sigs.append(sig.cpu())
    # (N_r, ...) each: this rank's rows, or all N rows in a single process; None where the model has none
    out = [torch.cat(v) if v else None for v in (scores, targets, gates, feats, sigs)]
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        index, n = torch.tensor(list(loader.sampler)), len(loader.dataset)   # this rank's dataset rows (n_r,)
        out = [gather_rows(v, index, n) if v is not None else None for v in out]
    out = [v.numpy() if v is not None else None for v in out]
    return tuple(out[:3]) + ((out[3],) if features else ()) + ((out[4], rows) if routing else ())


def score_split(path: str, split, data_root, device, ckpt=None):
    """A checkpoint's model over a dataset split -> (scores, targets, gates, features, ckpt, dataset, split name,
    (routing signatures or None, their rows)).

    The dataset is rebuilt from the run's own config (its image size, limit, ...), with the same batch
    size and memory format as training: identical numerics, hence identical metrics.
    """
    from data import build_dataset
    model, ckpt, fmt = load_checkpoint_model(path, device, ckpt)
    tcfg = ckpt["train_config"]
    split = split or tcfg.get("test_split") or "test"
    ds = build_dataset(tcfg["dataset"], split, data_root or tcfg["data_root"], tcfg["image_size"], augment=False,
                       limit=tcfg["limit"], empty=tcfg.get("empty_images", "keep"),
                       size=tcfg.get(f"{split}_images"))   # --budget study's 10,000 test images, for one
    loader = torch.utils.data.DataLoader(ds, batch_size=tcfg["batch_size"], num_workers=tcfg["num_workers"])
    scores, targets, gates, feats, sigs, rows = predict(model, loader, device, amp_dtype_for(device, tcfg["amp"]), fmt,
                                                        features=True, routing=True)
    bad = ~np.isfinite(scores).all(1)
    if bad.any():   # NaN weights (a diverged run) give NaN scores: name the file, not a bare ValueError
        raise ValueError(f"--checkpoint {path}: the model gives non-finite scores on {int(bad.sum())} of {len(bad)} "
                         f"{split} images; its weights hold NaN or inf (a diverged run?); use an earlier checkpoint")
    return scores, targets, gates, feats, ckpt, ds, split, (sigs, rows)


def main(argv=None):
    p = Parser(description="Evaluate a checkpoint on a split, or predict the labels of images.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    p.add_argument("--split", default=None, help="split to evaluate [default: the run's test split]")
    p.add_argument("--data-root", default=None, help="override the dataset folder saved in the checkpoint")
    p.add_argument("--image", nargs="+", default=None, metavar="FILE", help="predict these images instead")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="predict every image under DIR into a CSV (--out) instead (predictions.py)")
    p.add_argument("--out", default="predictions.csv", help="with --images: the CSV to write [predictions.csv]")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a label is predicted")
    p.add_argument("--thresholds", default=None, choices=["best"],
                   help="with --image/--images: per-label thresholds that maximised F1 on the validation "
                        "split in training (saved in best.pt) instead of --threshold")
    p.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    p.add_argument("--json", default=None, help="where to write the metrics [default: next to the checkpoint]")
    p.add_argument("--analysis", default=None, metavar="DIR",
                   help="also draw the gate pictures and training curves into DIR, with analysis.json (analysis.py)")
    p.add_argument("--compare-to", default=None, metavar="CHECKPOINT",
                   help="with --analysis: per-label AP gain over this other run vs label heterogeneity")
    args = p.parse_args(argv)
    if args.compare_to and not args.analysis:
        p.error("--compare-to needs --analysis DIR (where heterogeneity.png goes)")
    if not 0 < args.threshold < 1:
        p.error(f"--threshold must be a probability in (0, 1), got {args.threshold}")
    # Every value is checked before anything is loaded: a typo costs one line, not a traceback.
    try:
        check_device(args.device)
        loaded = {args.checkpoint: read_checkpoint(args.checkpoint)}
        if args.compare_to:
            args.compare_ckpt = read_checkpoint(args.compare_to)
        if args.image:
            for path in args.image:
                if not os.path.isfile(path):
                    raise ValueError(f"--image {path}: no such file")
        if args.images:
            if not os.path.isdir(args.images):
                raise ValueError(f"--images {args.images}: not a folder")
            files = predictions.list_images(args.images)
            if not files:
                raise ValueError(f"--images {args.images}: no image file in it (looked for "
                                 f"{', '.join(predictions.IMAGE_EXTENSIONS)}, subfolders included)")
        if args.thresholds and not (args.image or args.images):
            raise ValueError("--thresholds best applies to --image / --images; the metrics use --threshold")
        if args.image and args.images:
            raise ValueError("--image and --images: pass one (files to print, or a folder to write as CSV)")
        if args.out != "predictions.csv" and not args.images:
            raise ValueError("--out names the CSV of --images DIR; the metrics go to --json")
        thresholds = predictions.thresholds_for(loaded[args.checkpoint], args.thresholds or args.threshold)
    except ValueError as e:
        p.error(str(e))
    device = pick_device(args.device)

    if args.image or args.images:
        model, ckpt, fmt = load_checkpoint_model(args.checkpoint, device, loaded[args.checkpoint])
        try:
            if args.image:
                return predictions.predict_images(model, ckpt, fmt, device, args.image, thresholds)
            tc = ckpt["train_config"]
            probs, bad = predictions.predict_folder(model, files, tc["image_size"], device, fmt, tc["batch_size"],
                                                    tc["num_workers"])
        except predictions.NonFinite:
            sys.exit(f"error: --checkpoint {args.checkpoint}: the model gives non-finite scores; its weights hold "
                     "NaN or inf (a diverged run?); use an earlier checkpoint")
        predictions.write_csv(args.out, args.images, files, probs, ckpt["classes"], thresholds)
        print(f"wrote {args.out}: {len(files) - len(bad)} images"
              + (f"; skipped {len(bad)} unreadable: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "")
                 if bad else ""))
        return {"csv": args.out, "files": files, "probabilities": probs, "unreadable": bad}

    try:
        scores, targets, gates, feats, ckpt, ds, args.split, (sigs, rows) = score_split(
            args.checkpoint, args.split, args.data_root, device, loaded[args.checkpoint])
    except ValueError as e:   # non-finite scores: one line naming the checkpoint
        sys.exit(f"error: {e}")
    classes, mc = ckpt["classes"], ckpt["model_config"]
    print(f"{args.checkpoint}: {run_name(ckpt)}, epoch {ckpt['epoch'] + 1}, {ckpt.get('eval_weights', 'raw')} weights")
    metrics = multilabel_metrics(scores, targets, args.threshold)
    ap = average_precision(scores, targets)
    print(f"{args.split}: {len(ds)} images, {len(classes)} labels")
    print(" | ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    result = {"checkpoint": args.checkpoint, "split": args.split, **metrics,
              "per_label_AP": {c: float(a) * 100 for c, a in zip(classes, ap)}}
    if gates is not None:
        stats = analysis.gate_statistics(gates, targets, mc["shared_experts"], classes)
        result["gate"] = stats
    # One table: each label's AP next to how its gate routes.
    if gates is not None:
        print("\nmass on shared experts: over all images, single- and multi-label ones; then over the images "
              "that contain the label (alone | with others); vary = std of the weights across images")
    print(f"\n{'label':<16}{'AP':>7}{'pos':>6}" + (f"{'shared':>8}{'single':>8}{'multi':>8}{'alone':>8}{'w/ oth':>8}"
                                                 f"{'vary':>8}" if gates is not None else ""))
    for l, c in enumerate(classes):
        row = f"{c:<16}{100 * ap[l]:7.2f}{int((targets[:, l] == 1).sum()):6d}"
        if gates is not None:
            s = stats["per_label"][c]
            row += "".join(f"{s[k]:8.3f}" for k in ("shared_mass", "shared_mass_single", "shared_mass_multi",
                                                     "shared_mass_present_single", "shared_mass_present_multi",
                                                     "variability"))
        print(row)
    if gates is not None:
        o = stats["overall"]
        print(f"\ngate: mass on shared experts {o['shared_mass']:.3f} overall, {o['shared_mass_single']:.3f} on "
              f"{o['num_single_label_images']} single-label images, {o['shared_mass_multi']:.3f} on "
              f"{o['num_multi_label_images']} multi-label images; variability across images {o['variability']:.4f}")
        print("      mean weight per expert (shared first): " + ", ".join(f"{w:.3f}" for w in o["mean_weight_per_expert"]))
    if sigs is not None:   # does routing follow the images' scenes (synthetic) or their most frequent label?
        result["routing"] = routing_structure(sigs, rows, targets, ds, ckpt, feats)
    if args.analysis:
        result["analysis"] = run_analysis(args, targets, gates, feats, ckpt, ds, ap, result.get("gate"), device)
        if sigs is not None:
            draw_routing(args.analysis, result["routing"], ckpt)
    out = args.json or os.path.join(os.path.dirname(args.checkpoint) or ".", f"eval_{args.split}.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {out}")
    return result


def run_name(ckpt) -> str:
    """"drmoe gate=dynamic S=2 T=1" for a mixture, just the model's name for the others: a title for plots."""
    mc = ckpt["model_config"]
    if not mc.get("moe_layers", 1):
        return mc.get("model", "drmoe")
    return f"{mc.get('model', 'drmoe')} gate={mc['gate']} S={mc['shared_experts']} T={mc['task_experts']}"


def routing_structure(sigs, rows, targets, ds, ckpt, feats=None) -> dict:
    """divdr.split_structure on the split: k-means of the routing signatures against the reference partition;
    for scale, the same clustering of the image features the gate reads and of the label vectors."""
    k = ckpt["train_config"].get("divdr_clusters", 8)
    res = split_structure(sigs, rows, ds, targets, k)
    print(f"\nrouting: {res['clusters']} k-means clusters of the routing vs the {res['reference']}: NMI {res['nmi']:.3f}, "
          f"ARI {res['ari']:.3f}; {res['distinct_routes']} distinct top-1 routes ({res['route_entropy_bits']:.2f} bits)")
    ref = reference_partition(ds, targets)[0]
    res["for_scale"] = {"labels": agreement((targets == 1).astype(np.float64), ref, k)}
    if feats is not None:
        res["for_scale"]["image_feature"] = agreement(feats, ref, k)
    shown = {"labels": "label vectors", "image_feature": "image features"}
    print("         for scale, the same k-means of " + "; of ".join(
        f"the {shown[name]}: NMI {v['nmi']:.3f}, ARI {v['ari']:.3f}" for name, v in res["for_scale"].items()))
    return res


def draw_routing(folder, res, ckpt):
    """routing_clusters.png: the clusters x reference table, NMI and ARI in the title."""
    import plots
    os.makedirs(folder, exist_ok=True)
    plots.routing_clusters(os.path.join(folder, "routing_clusters.png"), res["contingency"],
                           [f"cluster {i}" for i in range(len(res["contingency"]))], res["reference_names"],
                           f"Routing clusters vs {res['reference']}: NMI {res['nmi']:.3f}, ARI {res['ari']:.3f}",
                           f"{run_name(ckpt)}; k-means (K = {res['clusters']}) of each image's routing signature (divdr.py)")
    print(f"analysis: wrote routing_clusters.png into {folder}")


def run_analysis(args, targets, gates, feats, ckpt, ds, ap, stats, device) -> dict:
    """--analysis (and --compare-to): the pictures and analysis.json of analysis.py."""
    from gating import expert_names
    mc, tc, classes = ckpt["model_config"], ckpt["train_config"], ckpt["classes"]
    other = None
    if args.compare_to:
        from data import DatasetError
        try:
            o_scores, o_targets, _, o_feats, o_ckpt, o_ds = score_split(args.compare_to, args.split, args.data_root,
                                                                        device, args.compare_ckpt)[:6]
        except ValueError as e:   # non-finite scores: one line naming that checkpoint
            sys.exit(f"error: {e}".replace("--checkpoint", "--compare-to"))
        # The gain is per label and per image set: both runs must have seen the same labels and images.
        if o_ckpt["classes"] != classes or list(o_ds.ids) != list(ds.ids):
            raise DatasetError(f"--compare-to {args.compare_to}: another label set or other images; cannot compare per label")
        other = {"name": run_name(o_ckpt), "ap": average_precision(o_scores, o_targets), "features": o_feats}
    log = analysis.read_log(os.path.join(os.path.dirname(args.checkpoint) or ".", "log.jsonl"))
    res = analysis.write_analysis(args.analysis, classes, targets, gates, feats, stats, ap,
                                  expert_names(mc["shared_experts"], mc["task_experts"]) if gates is not None else [],
                                  mc["shared_experts"], log, tc.get("collapse_threshold", 0.8), run_name(ckpt), other)
    if other is not None:
        h = res["heterogeneity"]
        print(f"\nheterogeneity: AP gain over {other['name']}, mean {h['mean_gain']:+.2f} AP, against the label's "
              f"context heterogeneity: Spearman rho {h['spearman_rho']:+.3f} (p = {h['p_value']:.3f}); against its "
              f"visual heterogeneity: rho {h['visual']['spearman_rho']:+.3f} (p = {h['visual']['p_value']:.3f}); "
              f"{h['num_labels']} labels")
        fixed = h["given_headroom"]   # the same, with each label's headroom (100 - the other's AP) held fixed
        print(f"  with headroom held fixed: context rho {fixed['context']['spearman_rho']:+.3f} "
              f"(p = {fixed['context']['p_value']:.3f}); visual rho {fixed['visual']['spearman_rho']:+.3f} "
              f"(p = {fixed['visual']['p_value']:.3f})")
    print(f"analysis: wrote {', '.join(res['written'])} into {args.analysis}")
    return res


if __name__ == "__main__":
    from data import DatasetError
    try:
        main()
    except (FileNotFoundError, DatasetError) as e:   # setup problems: the message, not a traceback
        msg = str(e).strip()
        sys.exit("error: " + (msg.splitlines()[-1] if "Original Traceback" in msg else msg))
