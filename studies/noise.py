"""
Measurement noise: how far a test mAP moves for reasons that are not the method, and how large a difference
a study can therefore tell from luck. Three sources, each measured here (results/noise/README.md):

    evaluation   one trained model, another draw of test images: the bootstrap over the test images
                 (Efron & Tibshirani 1993). Its std shrinks like 1/sqrt(test images).
    training     the same test images, another run: the seed moves the initial weights (--init-seed) and
                 the data order, flips and dropout (--seed); std over runs, one source at a time or both.
    per label    which labels the training noise sits in: Var(mAP) = (1/L^2) sum_{l,m} Cov(AP_l, AP_m),
                 so label l's share is (1/L^2) sum_m Cov(AP_l, AP_m) / Var(mAP); the shares sum to 1.

The bootstrap without copying the data. A resample with replacement is a count w_i per image (multinomial,
N draws over N images), and AP on the resample is AP on the original images with those weights: copies of
an image have the same score, so they fall into one tie group (metrics._average_precision_1d treats a tie
group as one threshold), and every count in AP's formula becomes a weighted count,
    P_g = (sum_{i: s_i >= s_g} w_i y_i) / (sum_{i: s_i >= s_g} w_i),   AP = sum_g dTP_g P_g / TP_total.
The order of the scores is fixed, so each label is sorted once and every resample is a cumulative sum.
tests/test_noise.py checks this against metrics.multilabel_metrics' mAP on explicitly resampled data.

The paired bootstrap (the confidence interval of a difference in compare.py's tables, tables.bootstrap):
both models' scores on the same resampled images, so what the two runs share (easy and hard images)
cancels in the difference.
The minimal detectable difference of a test at level alpha with power 1 - beta (Cohen 1988), from the
spread the study observed: for the paired t over n seeds with per-seed differences of sd s_d,
    MDD_t = (t_{1-alpha/2, n-1} + t_{1-beta, n-1}) * s_d / sqrt(n),
and for the bootstrap with standard error se of the difference, MDD_boot = (z_{1-alpha/2} + z_{1-beta}) * se.
A true difference smaller than the MDD is more likely missed than found.

    python -m studies.noise --groups "seeds=runs/study/drmoe" "init fixed=runs/noise/drmoe-init0" ...
        # each folder holds run folders (*/test_scores.npz, */metrics.json: compare.py's seed*/); prints and writes
        # the evaluation / training / per-label table (--out results/noise/variance.md)
    python -m studies.noise --compact runs/compare-study results/compare-study   # scores kept beside the results

Shapes: scores (N, L) probabilities, targets (N, L) in {1, 0, -1}, weights (R, N) resample counts.
"""
import argparse
import glob
import json
import os

import numpy as np
from scipy import stats


def resample_weights(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) counts: how often each of n images appears in each bootstrap resample of size n."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)


def weighted_map(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mAP (percent) of one model on every resample: (N, L), (N, L), (R, N) -> (R,).

    A label without a positive in a resample is left out of that resample's mean, as multilabel_metrics
    leaves it out of the mAP; entries with target -1 are dropped for their label, as everywhere.
    """
    aps = np.full((weights.shape[0], scores.shape[1]), np.nan)   # (R, L)
    for l in range(scores.shape[1]):
        keep = targets[:, l] != -1
        s, y, w = scores[keep, l], targets[keep, l] == 1, weights[:, keep]
        order = np.argsort(-s, kind="stable")                      # descending score, once per label
        s, y, w = s[order], y[order].astype(np.float64), w[:, order]
        last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)   # end of each tie group (G,)
        tp = np.cumsum(w * y, axis=1)[:, last]                      # (R, G) weighted positives with s >= s_g
        seen = np.cumsum(w, axis=1)[:, last]                        # (R, G) weighted images with s >= s_g
        precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
        new_pos = np.diff(tp, axis=1, prepend=0.0)                  # (R, G) positives entering at group g
        total = tp[:, -1]                                           # (R,) positives in the resample
        with np.errstate(invalid="ignore", divide="ignore"):
            aps[:, l] = np.where(total > 0, (new_pos * precision).sum(1) / total, np.nan)
    return 100.0 * np.nanmean(aps, axis=1)


def bootstrap_map(scores, targets, draws=1000, seed=0, chunk=100) -> np.ndarray:
    """(draws,) mAP over bootstrap resamples of the test images: the evaluation noise of one model."""
    w = resample_weights(len(scores), draws, seed)
    return np.concatenate([weighted_map(scores, targets, w[i:i + chunk]) for i in range(0, draws, chunk)])


def paired_bootstrap(a: list, b: list, targets, draws=1000, seed=0, level=0.95, chunk=100) -> dict:
    """Confidence interval of mean_k [mAP(a_k) - mAP(b_k)] under resampling of the test images.

    a, b: score arrays (N, L) of the two configurations, one per seed, paired by position (seed k of a with
    seed k of b); every array is scored on the same resample, so the interval reflects the test images
    only (the seeds' own spread is the paired t's business). -> {difference, low, high, se, samples}.
    """
    w = resample_weights(len(targets), draws, seed)
    diffs = []
    for i in range(0, draws, chunk):
        wc = w[i:i + chunk]
        diffs.append(np.mean([weighted_map(sa, targets, wc) - weighted_map(sb, targets, wc)
                              for sa, sb in zip(a, b)], axis=0))   # (chunk,) mean over the seed pairs
    samples = np.concatenate(diffs)
    ones = np.ones((1, len(targets)))                                # the observed test set: every weight 1
    observed = float(np.mean([weighted_map(sa, targets, ones)[0] - weighted_map(sb, targets, ones)[0]
                              for sa, sb in zip(a, b)]))
    # Percentile interval: the simplest bootstrap interval, adequate for a mean of many images' effects.
    low, high = np.percentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"difference": observed, "low": float(low), "high": float(high), "se": float(samples.std(ddof=1)),
            "samples": samples}


def detectable_t(sd_diff: float, n: int, alpha=0.05, power=0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test over n seeds finds with this power."""
    if n < 2 or not np.isfinite(sd_diff):
        return float("nan")
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd_diff / np.sqrt(n))


def detectable_z(se: float, alpha=0.05, power=0.8) -> float:
    """The same for a difference with known standard error se (the bootstrap's): (1.96 + 0.84) se."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def label_shares(ap: np.ndarray) -> np.ndarray:
    """(runs, L) per-label AP -> (L,) each label's share of Var(mAP) over the runs (sums to 1)."""
    ap = ap - ap.mean(0)
    cov = ap.T @ ap / (len(ap) - 1)                      # (L, L) covariance of the labels' APs over runs
    return cov.sum(1) / cov.sum()                        # row sums over the total = Var(mAP) * L^2


def compact(src: str, dst: str):
    """A run's test_scores.npz (float32 probabilities) -> test_logits.npz for results/: float16 logits, a
    third of the size. AP needs only the order of the scores and the logit keeps it (float16 ties move this
    benchmark's mAP by about 0.002), so the bootstrap can be re-checked from results/ without retraining."""
    d = np.load(src)
    p = np.clip(d["scores"].astype(np.float64), 1e-12, 1 - 1e-12)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    np.savez_compressed(dst, logits=(np.log(p) - np.log1p(-p)).astype(np.float16), targets=d["targets"])


def read_scores(path: str):
    """test_scores.npz or test_logits.npz -> (scores (N, L) float32, targets (N, L)); any order-keeping
    score does for AP, so the logits are used as they are."""
    d = np.load(path)
    return (d["scores"] if "scores" in d else d["logits"].astype(np.float32)), d["targets"]


def load_group(folder: str):
    """A folder of runs (compare.py's seed*/, or any run folders), or a glob of run folders such as
    results/noise/initorder/init0-order* -> (scores list, targets, classes, run folders)."""
    runs_glob = folder if any(c in folder for c in "*?[") else os.path.join(folder, "*")
    runs = sorted(glob.glob(os.path.join(runs_glob, "test_scores.npz")) or
                  glob.glob(os.path.join(runs_glob, "test_logits.npz")))
    if not runs:
        raise SystemExit(f"error: no */test_scores.npz (or test_logits.npz) under {folder}; this code's "
                         "train.py writes the first, noise.py --compact the second")
    data = [read_scores(p) for p in runs]
    classes = list(json.load(open(os.path.join(os.path.dirname(runs[0]), "metrics.json")))["AP"])
    return [d[0] for d in data], data[0][1], classes, [os.path.dirname(p) for p in runs]


def variance_table(groups: dict, subset: int = 2000, draws: int = 1000) -> str:
    """The markdown variance table: per group, seed spread on all test images and on the first `subset`
    (the demo's test split is the study's first 2,000 images), the bootstrap spread of a single run, and
    the labels that carry most of the seed variance."""
    lines = ["| runs | n | minutes per run (median) | test mAP mean ± std (all test images) | std on the first "
             f"{subset} | bootstrap std of one run (all / first {subset}) | labels with the largest share "
             "of the seed variance |", "|---|---|---|---|---|---|---|"]
    for name, folder in groups.items():
        scores, targets, classes, names = load_group(folder)
        minutes = np.median([json.load(open(os.path.join(d, "metrics.json")))["train_minutes_this_session"]
                             for d in names])   # the median: a run that shared the machine does not drag it
        ones = np.ones((1, len(targets)))
        full = np.array([weighted_map(s, targets, ones)[0] for s in scores])
        sub = np.array([weighted_map(s[:subset], targets[:subset], ones[:, :subset])[0] for s in scores])
        boot = np.mean([bootstrap_map(s, targets, draws).std(ddof=1) for s in scores])
        boot_sub = np.mean([bootstrap_map(s[:subset], targets[:subset], draws).std(ddof=1) for s in scores])
        from metrics import average_precision   # here: metrics pulls in torch, the bootstrap does not
        ap = np.array([average_precision(s, targets) for s in scores]) * 100   # (runs, L)
        top = ""
        if len(scores) > 2:
            share = label_shares(ap)
            top = ", ".join(f"{classes[l]} {100 * share[l]:.0f} %" for l in np.argsort(-share)[:4])
        sd = lambda v: f"{v.std(ddof=1):.2f}" if len(v) > 1 else "-"
        lines.append(f"| {name} | {len(scores)} | {minutes:.1f} | {full.mean():.2f} ± {sd(full)} | {sd(sub)} | "
                     f"{boot:.2f} / {boot_sub:.2f} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compact", nargs=2, metavar=("RUNS", "RESULTS"), default=None,
                   help="only copy every RUNS/**/test_scores.npz to RESULTS/**/test_logits.npz (compact())")
    p.add_argument("--groups", nargs="+", default=None, metavar="NAME=FOLDER",
                   help="configurations to measure: a name, '=', a folder of seed*/ runs (or a glob of run folders)")
    p.add_argument("--subset", type=int, default=2000, help="also measure on the first N test images [2000]")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples [1000]")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--plot", default=None, help="also draw each label's AP std per group into this PNG")
    args = p.parse_args(argv)
    if args.compact:
        src_root, dst_root = args.compact
        for src in sorted(glob.glob(os.path.join(src_root, "**", "test_scores.npz"), recursive=True)):
            dst = os.path.join(dst_root, os.path.relpath(os.path.dirname(src), src_root), "test_logits.npz")
            if not os.path.exists(dst):
                compact(src, dst)
                print(f"wrote {dst}")
        return
    if not args.groups:
        p.error("pass --groups NAME=FOLDER ... (or --compact RUNS RESULTS)")
    groups = dict(g.split("=", 1) for g in args.groups)
    table = variance_table(groups, args.subset, args.draws)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(table)
    if args.plot:
        from metrics import average_precision
        from lib import plots
        std, runs, classes, positives = {}, {}, None, None
        for name, folder in groups.items():
            scores, targets, classes, _ = load_group(folder)
            runs[name] = len(scores)
            if len(scores) > 1:
                std[name] = (np.array([average_precision(s, targets) for s in scores]) * 100).std(0, ddof=1)
            positives = (targets == 1).sum(0)
        # One short line (the legend names the series): the run count once when every series has the same.
        counts = (f"{next(iter(runs.values()))} runs per series" if len(set(runs.values())) == 1
                  else "runs per series: " + ", ".join(map(str, runs.values())))
        plots.label_noise(args.plot, classes, positives, std, "Where the seed noise sits: each label's AP std over runs",
                          subtitle=f"{len(targets)} test images; {counts}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
