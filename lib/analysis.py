"""
Seeing inside the gate: where each label's routing goes over a whole test set, whether it differs between
single- and multi-label images, how training went, and whether the input-conditioned gate helps the
heterogeneous labels most (the paper's claim "particularly for labels with high heterogeneity", tested).

    python evaluate.py --checkpoint runs/synthetic/drmoe-dynamic-S2-T1-seed0/best.pt --analysis runs/synthetic/analysis
    python evaluate.py --checkpoint A/best.pt --analysis OUT --compare-to B/best.pt   # + heterogeneity.png

writes into OUT (pictures drawn with pillow alone, as the design card's packages say):
    gate_heatmap.png         labels x experts: mean gate weight over the split (shared columns, then the
                             label's task-specific ones), and beside it each label's routing variability
    gate_shared_vs_task.png  mass on shared vs task-specific experts, single-label vs multi-label images, per label
    curves.png               training loss, validation mAP and the mass per expert slot, per epoch (log.jsonl)
    heterogeneity.png        with --compare-to: each label's AP gain over the other model vs its heterogeneity
    analysis.json            every number behind the pictures

Two heterogeneity scores, because the papers do not define the word (each is tested on its own):
- context (context_heterogeneity), from the labels alone, so the same whichever models are compared:
  for label l, the distribution of what else is in its images,
      c[l, j] = #images with l and j (j != l),   c[l, l] = #images where l is alone,   q_l = c[l] / sum(c[l])
      het_ctx(l) = -sum_j q_l[j] log q_l[j] / log L        in [0, 1]
  A label that always comes with the same companion (a zebra on grass) scores low; one that turns up in
  every kind of scene, alone or with anything (a person), scores high.
- visual (visual_heterogeneity), from the pooled image features g[b] (what the dynamic gate reads):
      het_vis(l) = sum_d Var(g[b, d] : l in b) / sum_d Var(g[b, d] : all b)
  the label's own images' feature variance relative to the whole split's: lower when its images look alike,
  near 1 when they are as varied as the data, above 1 when they are more varied than the split (a ratio, not
  a share: a label whose images sit at the far ends of the feature space can exceed 1). (On the synthetic benchmark g[b]
  mostly encodes the scene around the objects, so the scores sit between about 0.6 and 0.95, not near 0:
  a red square appears in every kind of scene.) This is the variation an input-conditioned gate can route on and a static
  gate cannot. It is averaged over the two compared models' features, so that neither model's own
  representation decides the score (a score from the winner's features alone could track its wins).
The claim predicts that the AP gain of an input-conditioned gate over a static or label-only one rises
with heterogeneity: a positive Spearman correlation across labels (scipy.stats.spearmanr; with L = 20
labels only a strong one can be told from 0).

One confound is checked beside it: headroom. A label the other model already gets at 99 AP cannot gain
more than 1 point, so if easy labels are also the homogeneous ones, gain and heterogeneity correlate
through headroom alone. partial_spearman() therefore also reports the rank correlation of gain and
heterogeneity with headroom (100 - the other model's AP) held fixed.

Shapes (legend in experts.py; N = images here): scores/targets (N, L), gates (N, L, E) with the S shared
experts first, features (N, D).
"""
import json
import math
import os

import numpy as np
from scipy import stats as sps

from lib import plots

# ----------------------------------------------------------------------------- the numbers
def gate_statistics(gates: np.ndarray, targets: np.ndarray, num_shared: int, classes) -> dict:
    """How the gate splits each label's mass between shared and task experts, and how much that varies.

    gates (N, L, E) with the S shared experts first; targets (N, L). For every label, over all test images
    (the gate runs for every label on every image): the mean mass on shared experts, separately for
    single-label images (one positive) and multi-label images (two or more), and the routing variability:
    the std across images of each expert's weight, averaged over the label's E experts. A static gate
    has variability 0 by construction; an input-conditioned gate that learned nothing is close to 0 too.
    The "_present" variants look only at images that contain the label: how a label routes when it is
    there, alone (single) or with others (multi); "overall" then averages over (image, present label) pairs.
    """
    shared = gates[..., :num_shared].sum(-1)                       # (N, L) mass on shared experts
    present = targets == 1                                         # (N, L)
    n_pos = present.sum(1)                                         # (N,) labels present per image
    single, multi = n_pos == 1, n_pos >= 2
    variability = gates.std(axis=0).mean(-1)                       # (N, L, E) -> (L, E) -> (L,)
    mean_or_nan = lambda a: float(a.mean()) if a.size else float("nan")
    per_label = {name: {"shared_mass": mean_or_nan(shared[:, l]),
                        "shared_mass_single": mean_or_nan(shared[single, l]),
                        "shared_mass_multi": mean_or_nan(shared[multi, l]),
                        "shared_mass_present_single": mean_or_nan(shared[single & present[:, l], l]),
                        "shared_mass_present_multi": mean_or_nan(shared[multi & present[:, l], l]),
                        "variability": float(variability[l])}
                 for l, name in enumerate(classes)}
    overall = {"shared_mass": mean_or_nan(shared), "shared_mass_single": mean_or_nan(shared[single]),
               "shared_mass_multi": mean_or_nan(shared[multi]),
               "shared_mass_present_single": mean_or_nan(shared[present & single[:, None]]),
               "shared_mass_present_multi": mean_or_nan(shared[present & multi[:, None]]),
               "variability": float(variability.mean()),
               "num_single_label_images": int(single.sum()), "num_multi_label_images": int(multi.sum()),
               "mean_weight_per_expert": gates.mean(axis=(0, 1)).tolist()}
    return {"overall": overall, "per_label": per_label}


def context_heterogeneity(targets) -> np.ndarray:
    """targets (N, L) in {1, 0, -1} -> (L,) normalised entropy of each label's co-occurrence context (NaN: never present)."""
    pos = (np.asarray(targets) == 1).astype(np.int64)                # (N, L); -1 (ignored) is not present
    L = pos.shape[1]
    ctx = pos.T @ pos                                                  # (L, L) co-occurrence counts
    np.fill_diagonal(ctx, (pos * (pos.sum(1, keepdims=True) == 1)).sum(0))   # diagonal: images where l is alone
    total = ctx.sum(1, keepdims=True)                                  # (L, 1)
    q = np.divide(ctx, total, out=np.zeros(ctx.shape), where=total > 0)
    ent = -(q * np.log(np.where(q > 0, q, 1))).sum(1) / math.log(L)   # 0 log 0 = 0
    return np.where(total[:, 0] > 0, ent, np.nan)


def visual_heterogeneity(features, targets) -> np.ndarray:
    """features (N, D), targets (N, L) -> (L,) within-label feature variance / whole-split variance (NaN: < 2 images)."""
    f, pos = np.asarray(features, dtype=np.float64), np.asarray(targets) == 1
    total = f.var(axis=0).sum()                                        # sum_d Var over all N images
    out = np.full(pos.shape[1], np.nan)
    for l in range(pos.shape[1]):
        if pos[:, l].sum() >= 2:
            out[l] = f[pos[:, l]].var(axis=0).sum() / total            # (N_l, D) -> scalar
    return out


def spearman(x, y) -> dict:
    """Spearman's rank correlation over the labels where both are defined (NaN below 3 labels)."""
    ok = np.isfinite(x) & np.isfinite(y)
    rho, p = sps.spearmanr(x[ok], y[ok]) if ok.sum() >= 3 else (float("nan"), float("nan"))
    return {"spearman_rho": float(rho), "p_value": float(p), "num_labels": int(ok.sum())}


def partial_spearman(x, y, z) -> dict:
    """Spearman's rho of x and y with z held fixed, over the labels where all three are defined.

    The partial correlation of the ranks (Conover 1999; the usual first-order formula):
        r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2) (1 - r_yz^2)),   r = Pearson correlation of ranks
    which equals the correlation of the rank residuals after regressing the ranks of z out of both.
    p-value: t = r sqrt((n - 3) / (1 - r^2)) on n - 3 degrees of freedom (one more spent on z).
    """
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    n = int(ok.sum())
    if n < 5:
        return {"spearman_rho": float("nan"), "p_value": float("nan"), "num_labels": n}
    rx, ry, rz = (sps.rankdata(np.asarray(v)[ok]) for v in (x, y, z))
    r = np.corrcoef([rx, ry, rz])                                  # (3, 3) Pearson correlations of the ranks
    rho = (r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))
    t = rho * math.sqrt((n - 3) / max(1 - rho ** 2, 1e-12))
    return {"spearman_rho": float(rho), "p_value": float(2 * sps.t.sf(abs(t), n - 3)), "num_labels": n}


def heterogeneity_test(het, ap, ap_other, classes, het_visual=None) -> dict:
    """Per-label AP gain (this - other, in AP points) against each heterogeneity score, with Spearman's rho.

    The context score's correlation sits at the top level ("spearman_rho", "p_value"); the visual one,
    when features were given, under "visual"; both again with headroom held fixed under "given_headroom".
    """
    gain = 100 * (np.asarray(ap) - np.asarray(ap_other))
    headroom = 100 * (1 - np.asarray(ap_other))                    # (L,) the most this label could gain
    vis = np.full(len(gain), np.nan) if het_visual is None else np.asarray(het_visual)
    per_label = {c: {"heterogeneity": float(het[l]), "visual_heterogeneity": float(vis[l]), "AP": 100 * float(ap[l]),
                     "AP_other": 100 * float(ap_other[l]), "gain": float(gain[l]), "headroom": float(headroom[l])}
                 for l, c in enumerate(classes)}
    return {"score": "context_heterogeneity (analysis.py)", **spearman(het, gain), "visual": spearman(vis, gain),
            "given_headroom": {"context": partial_spearman(het, gain, headroom),
                               "visual": partial_spearman(vis, gain, headroom)},
            "mean_gain": float(np.nanmean(gain)), "per_label": per_label}


def read_log(path: str) -> dict:
    """A run's log.jsonl -> per-epoch lists (what curves.png draws); {} when there is no log."""
    if not os.path.isfile(path):
        return {}
    rows = [json.loads(line) for line in open(path)]
    out = {"epoch": [r["epoch"] for r in rows], "train_loss": [r["train_loss"] for r in rows]}
    for which in rows[0]["val_mAP"]:
        out[f"val_mAP_{which}"] = [r["val_mAP"].get(which) for r in rows]
    if "gate" in rows[0]:   # the head gate's mass per expert slot (logs written before lib/routing.py)
        out["expert_mass"] = {e: [r["gate"]["expert_mass"][e] for r in rows] for e in rows[0]["gate"]["expert_mass"]}
    gate = rows[0].get("routers", {}).get("gate")
    if gate is not None:    # the same from a router's health record (lib/routing.py)
        names = gate.get("experts") or [str(e) for e in range(len(gate["load"]))]
        out["expert_mass"] = {e: [r["routers"]["gate"]["load"][i] for r in rows] for i, e in enumerate(names)}
    return out


def read_routers(path: str) -> dict:
    """A run's log.jsonl -> {router: {"epoch": [...], "load": {expert: [share per epoch]}}}, what routing.png
    draws; {} for a run whose log has no router (a linear head) or no log."""
    if not os.path.isfile(path):
        return {}
    rows = [json.loads(line) for line in open(path)]
    out = {}
    for name in dict.fromkeys(n for r in rows for n in r.get("routers", {})):
        have = [r for r in rows if name in r.get("routers", {})]
        first = have[0]["routers"][name]
        names = first.get("experts") or [f"expert {e}" for e in range(len(first["load"]))]
        out[name] = {"epoch": [r["epoch"] for r in have],
                     "load": {e: [r["routers"][name]["load"][i] for r in have] for i, e in enumerate(names)}}
    return out


# ----------------------------------------------------------------------------- everything, for evaluate.py
def write_analysis(out_dir, classes, targets, gates, features, gate_stats, ap, experts, num_shared, log, threshold,
                   title, other=None) -> dict:
    """Draw the pictures into out_dir and write analysis.json; returns the numbers.

    ap (L,) per-label AP in [0, 1]; features (N, D) or None; other = None or {"name": str, "ap": (L,),
    "features": (N, D') or None} for the heterogeneity test.
    """
    os.makedirs(out_dir, exist_ok=True)
    result = {"title": title, "classes": list(classes), "per_label_AP": {c: 100 * float(a) for c, a in zip(classes, ap)}}
    written = []
    if gates is not None:
        mean_w = gates.mean(axis=0)              # (N, L, E) -> (L, E): each label's mean weight per expert
        variability = np.array([gate_stats["per_label"][c]["variability"] for c in classes])
        result.update({"experts": list(experts), "num_shared": num_shared, "gate_statistics": gate_stats,
                       "mean_gate_weight": {c: dict(zip(experts, map(float, mean_w[l]))) for l, c in enumerate(classes)}})
        plots.heatmap(os.path.join(out_dir, "gate_heatmap.png"), mean_w, variability, classes, experts, num_shared,
                     f"Gate routing: {title}")
        plots.shared_vs_task(os.path.join(out_dir, "gate_shared_vs_task.png"), gate_stats, classes,
                            f"Shared vs task-specific experts: {title}")
        written += ["gate_heatmap.png", "gate_shared_vs_task.png"]
    if log:
        result["curves"] = log
        plots.curves(os.path.join(out_dir, "curves.png"), log, threshold, f"Training: {title}")
        written.append("curves.png")
    if other is not None:
        vis = [visual_heterogeneity(f, targets) for f in (features, other.get("features")) if f is not None]
        het = heterogeneity_test(context_heterogeneity(targets), ap, other["ap"], classes,
                                 np.mean(vis, axis=0) if vis else None)   # (L,): both models' scores averaged
        het["other"] = other["name"]
        result["heterogeneity"] = het
        plots.heterogeneity(os.path.join(out_dir, "heterogeneity.png"), het,
                            f"{title} minus {other['name']}, per label; the runs differ in {other.get('differs', '?')}")
        written.append("heterogeneity.png")
    with open(os.path.join(out_dir, "analysis.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    result["written"] = written + ["analysis.json"]
    return result
