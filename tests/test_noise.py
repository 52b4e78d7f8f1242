"""
noise.py: the weighted-count bootstrap equals AP on explicitly resampled data, the paired bootstrap's
interval on cases whose answer is known (identical models; a difference that no resample can change; the
spread of independent test sets drawn from a known world), and the minimal detectable difference against
its formula. Run: python -m pytest -q tests/test_noise.py
"""
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import multilabel_metrics  # noqa: E402
from studies.noise import (bootstrap_map, detectable_t, detectable_z, label_shares, paired_bootstrap,  # noqa: E402
                   resample_weights, weighted_map)


def toy(n=300, labels=5, seed=0, skill=1.5, ignore=True):
    """Scores that rank positives higher with some noise, a few ties, and some ignored (-1) entries."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.05, 0.4, labels)).astype(float)
    s = 1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(size=(n, labels)))))
    s[:20] = np.round(s[:20], 1)                       # ties inside a label
    if ignore:
        y[rng.random((n, labels)) < 0.03] = -1
    return s, y


def test_weighted_map_equals_resampled_data():
    """Every resample's weighted mAP equals multilabel_metrics on the images copied out by np.repeat."""
    s, y = toy()
    w = resample_weights(len(s), 20, seed=3)
    fast = weighted_map(s, y, w)
    for r in range(len(w)):
        idx = np.repeat(np.arange(len(s)), w[r].astype(int))   # the resample as explicit copies
        assert fast[r] == pytest.approx(multilabel_metrics(s[idx], y[idx])["mAP"], abs=1e-9)
    # weights all 1: the plain mAP of the test set
    assert weighted_map(s, y, np.ones((1, len(s))))[0] == pytest.approx(multilabel_metrics(s, y)["mAP"], abs=1e-9)


def test_identical_models_give_a_zero_interval():
    s, y = toy()
    res = paired_bootstrap([s, s], [s, s], y, draws=200)
    assert res["difference"] == 0 and res["low"] == 0 and res["high"] == 0 and res["se"] == 0


def test_a_difference_no_resample_can_change():
    """A ranks every label perfectly; B is A with label 0's scores reversed and every image positive or
    negative for label 0 in one fixed ratio... simpler: B is A with ONE label whose AP is 100 in A and
    whose scores in B are a constant (one tie group: AP = the resample's prevalence, which varies). So
    instead: B is perfect too except label 0, where B scores every image 0.5 and label 0 is positive on
    every image: AP 100 for both, whatever the resample -> difference exactly 0 but B != A."""
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(float)
    y[:, 0] = 1
    a = np.where(y == 1, 0.9, 0.1) + rng.random((200, 4)) * 0.01    # perfect ranking on every label
    b = a.copy()
    b[:, 0] = 0.5
    res = paired_bootstrap([a], [b], y, draws=100)
    assert res["difference"] == 0 and res["low"] == res["high"] == 0
    # and a known positive difference: B's label 1 inverted on half the positives can only lose AP
    b[:, 1] = np.where((y[:, 1] == 1) & (np.arange(200) % 2 == 0), 0.0, b[:, 1])
    res = paired_bootstrap([a], [b], y, draws=200)
    assert res["low"] > 0 and res["difference"] > 0


def test_interval_matches_the_spread_of_fresh_test_sets():
    """The known answer by simulation: in a world we can sample, the std of the mAP difference over many
    independently drawn test sets is the truth; the bootstrap from ONE test set must estimate it (within
    the bootstrap's own error, here 30 %), and its 95 % interval must cover the true mean difference."""
    def world(seed, n=400):
        rng = np.random.default_rng(seed)
        y = (rng.random((n, 4)) < 0.2).astype(float)
        z = rng.normal(size=(n, 4))                               # image difficulty, shared by both models
        a = 1.6 * (2 * y - 1) + z + 0.5 * rng.normal(size=(n, 4))
        b = 1.2 * (2 * y - 1) + z + 0.5 * rng.normal(size=(n, 4))
        return a, b, y
    one = lambda a, b, y: weighted_map(a, y, np.ones((1, len(y))))[0] - weighted_map(b, y, np.ones((1, len(y))))[0]
    fresh = np.array([one(*world(1000 + k)) for k in range(300)])
    a, b, y = world(7)
    res = paired_bootstrap([a], [b], y, draws=600)
    assert res["se"] == pytest.approx(fresh.std(ddof=1), rel=0.3)
    assert res["low"] < fresh.mean() < res["high"]


def test_bootstrap_std_shrinks_with_the_test_set():
    s, y = toy(n=2000, ignore=False)
    small, large = bootstrap_map(s[:500], y[:500], 300).std(), bootstrap_map(s, y, 300).std()
    assert large / small == pytest.approx(0.5, rel=0.25)    # 1/sqrt(4)


def test_detectable_difference_formulas():
    n, sd = 5, 0.8
    assert detectable_t(sd, n) == pytest.approx((stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / np.sqrt(5))
    assert detectable_z(0.1) == pytest.approx(0.2802, abs=1e-3)
    assert np.isnan(detectable_t(sd, 1))
    # more seeds detect smaller differences
    assert detectable_t(sd, 10) < detectable_t(sd, 5) < detectable_t(sd, 3)


def test_label_shares_sum_to_one_and_find_the_noisy_label():
    rng = np.random.default_rng(0)
    ap = 80 + 0.1 * rng.normal(size=(8, 5))
    ap[:, 3] += 3 * rng.normal(size=8)                      # label 3 carries the noise
    share = label_shares(ap)
    assert share.sum() == pytest.approx(1.0)
    assert np.argmax(share) == 3 and share[3] > 0.9
    # covariances count, not only variances: two labels whose APs cancel add nothing to Var(mAP)
    swing, other = 3.0 * np.array([1, -1] * 4), 0.5 * np.array([1, 1, -1, -1] * 2)   # orthogonal, zero mean
    ap2 = np.stack([80 + swing, 70 - swing, 60 + other], axis=1)
    assert np.allclose(label_shares(ap2), [0, 0, 1], atol=1e-9)
    # the definition: Var(mAP) equals the mean's variance, label by label
    mean = ap.mean(1)
    cov = np.cov(ap.T)
    assert mean.var(ddof=1) == pytest.approx(cov.sum() / 25)


def test_compact_logits_keep_the_map(tmp_path):
    """results/ keeps float16 logits (noise.compact); their mAP is the float32 scores' to 0.05 points."""
    from studies.noise import compact, read_scores
    s, y = toy(n=2000, ignore=False)
    np.savez(tmp_path / "test_scores.npz", scores=s.astype(np.float32), targets=y.astype(np.int8))
    compact(str(tmp_path / "test_scores.npz"), str(tmp_path / "out" / "test_logits.npz"))
    logits, targets = read_scores(str(tmp_path / "out" / "test_logits.npz"))
    assert np.array_equal(targets, y)
    assert multilabel_metrics(logits, targets)["mAP"] == pytest.approx(multilabel_metrics(s, y)["mAP"], abs=0.05)
