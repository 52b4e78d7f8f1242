"""
Tests for metrics.py: `average_precision` and
`multilabel_metrics` (mAP, CP/CR/CF1, OP/OR/OF1 and their top-3 variants).

Covered: hand-computed cases (written out in the comments), tie handling,
ignored (-1) entries, labels without positives, never-predicted labels,
degenerate inputs (N = 0 images, everything ignored, bad inputs), torch
inputs, an independent brute-force reference (plain Python loops over the
definitions) on many random inputs, and an optional sklearn cross-check.

Run from the repository root:  python -m pytest -q tests/test_metrics.py
"""

import math

import numpy as np
import pytest
import torch

from metrics import average_precision, multilabel_metrics

KEYS = {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1",
        "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3",
        "num_labels_evaluated"}


# -----------------------------------------------------------------------------
# brute-force reference: a direct transcription of the definitions, written
# with plain Python loops and no sorting, so that it shares no code path (and
# no tie-group trick) with the vectorised module.

def ref_average_precision(scores, targets):
    N, L = scores.shape
    scores, targets = scores.tolist(), targets.tolist()  # plain Python from here
    out = []
    for l in range(L):
        # entries of this label that are not ignored
        entries = [(scores[i][l], targets[i][l]) for i in range(N) if targets[i][l] != -1]
        positives = [s for s, t in entries if t == 1]
        if not positives:
            out.append(math.nan)
            continue
        total = 0.0
        for s in positives:
            # P(s) = #{positives with score >= s} / #{entries with score >= s}
            pos_above = sum(1 for s2, t2 in entries if t2 == 1 and s2 >= s)
            all_above = sum(1 for s2, _ in entries if s2 >= s)
            total += pos_above / all_above
        out.append(total / len(positives))
    return out


def ref_multilabel_metrics(scores, targets, threshold=0.5):
    N, L = scores.shape
    ap = ref_average_precision(scores, targets)
    scores, targets = scores.tolist(), targets.tolist()
    names = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    names += [n + "_top3" for n in names[1:]]

    def in_top3(i, l):
        # rank of label l in image i; equal scores: lower label index first
        rank = sum(1 for m in range(L)
                   if scores[i][m] > scores[i][l] or (scores[i][m] == scores[i][l] and m < l))
        return rank < 3

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def prf(predicted):
        Nc, Np, Ng = [0] * L, [0] * L, [0] * L
        for l in range(L):
            for i in range(N):
                t = targets[i][l]
                if t == -1:
                    continue
                p = predicted(i, l)
                Np[l] += p
                Ng[l] += t == 1
                Nc[l] += p and t == 1
        ev = [l for l in range(L) if Ng[l] > 0]
        OP = sum(Nc) / sum(Np) if sum(Np) > 0 else 0.0
        OR = sum(Nc) / sum(Ng)
        CP = sum(Nc[l] / Np[l] if Np[l] > 0 else 0.0 for l in ev) / len(ev)
        CR = sum(Nc[l] / Ng[l] for l in ev) / len(ev)
        return {"CP": CP, "CR": CR, "CF1": f1(CP, CR), "OP": OP, "OR": OR, "OF1": f1(OP, OR)}, ev

    evaluated = [l for l in range(L) if not math.isnan(ap[l])]
    if not evaluated:
        out = {n: math.nan for n in names}
        out["num_labels_evaluated"] = 0
        return out
    out = {"mAP": sum(ap[l] for l in evaluated) / len(evaluated)}
    plain, ev = prf(lambda i, l: scores[i][l] >= threshold)
    assert ev == evaluated  # AP defined <=> label has a positive
    out.update(plain)
    top, _ = prf(lambda i, l: scores[i][l] >= threshold and in_top3(i, l))
    out.update({k + "_top3": v for k, v in top.items()})
    out = {k: 100.0 * v for k, v in out.items()}
    out["num_labels_evaluated"] = len(evaluated)
    return out


def assert_same(a, b, tol=1e-9):
    """Equal dicts / arrays of floats, NaN == NaN."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            if isinstance(a[k], int):
                assert a[k] == b[k], k
            else:
                assert_same(a[k], b[k], tol)
        return
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol, equal_nan=True)


# -----------------------------------------------------------------------------
# average precision: hand-computed cases (one label, so arrays are (N, 1))

def col(*xs):
    return np.array(xs, dtype=float)[:, None]


def test_ap_basic():
    # 5 images ranked 0.9 > 0.8 > 0.7 > 0.6 > 0.5, positives at ranks 1 and 3
    # precision at rank 1 = 1/1, at rank 3 = 2/3  ->  AP = (1 + 2/3) / 2 = 5/6
    ap = average_precision(col(0.9, 0.8, 0.7, 0.6, 0.5), col(1, 0, 1, 0, 0))
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(5 / 6, abs=1e-12)


def test_ap_perfect_ranking_is_one():
    # all positives above all negatives: precision 1 at every positive
    ap = average_precision(col(0.9, 0.8, 0.3, 0.1), col(1, 1, 0, 0))
    assert ap[0] == pytest.approx(1.0, abs=1e-12)
    # reversed ranking: positives at ranks 3, 4 -> AP = (1/3 + 2/4) / 2 = 5/12
    ap = average_precision(col(0.1, 0.3, 0.8, 0.9), col(1, 1, 0, 0))
    assert ap[0] == pytest.approx(5 / 12, abs=1e-12)


def test_ap_tie_group_spanning_positive_and_negative():
    # scores 0.9 (pos), 0.7 (neg), 0.7 (pos), 0.2 (neg): {0.7, 0.7} is one
    # threshold. Positive at 0.9: P = 1/1. Positive at 0.7: entries with
    # score >= 0.7 are 3, positives 2 -> P = 2/3.  AP = (1 + 2/3)/2 = 5/6,
    # whatever the order of the tied rows. A sort-order AP (ML-GCN's meter)
    # would give 1 if the tied positive came first, 5/6 otherwise.
    s, t = col(0.9, 0.7, 0.7, 0.2), col(1, 0, 1, 0)
    assert average_precision(s, t)[0] == pytest.approx(5 / 6, abs=1e-12)
    assert average_precision(s[[0, 2, 1, 3]], t[[0, 2, 1, 3]])[0] == pytest.approx(5 / 6, abs=1e-12)
    # all scores tied: one threshold, P = #pos / N = 2/4 at both positives
    assert average_precision(col(0.5, 0.5, 0.5, 0.5), col(0, 1, 0, 1))[0] == pytest.approx(0.5, abs=1e-12)


def test_ap_ignored_entry_equals_removed_row():
    # row 1 (score 0.8) ignored -> same as the 3 images 0.9(+) 0.7(+) 0.6(-):
    # AP = 1. Were it a negative instead: (1/1 + 2/3)/2 = 5/6.
    s = col(0.9, 0.8, 0.7, 0.6)
    ap_ignored = average_precision(s, col(1, -1, 1, 0))[0]
    ap_removed = average_precision(s[[0, 2, 3]], col(1, 1, 0))[0]
    assert ap_ignored == pytest.approx(1.0, abs=1e-12)
    assert ap_ignored == ap_removed
    assert average_precision(s, col(1, 0, 1, 0))[0] == pytest.approx(5 / 6, abs=1e-12)


def test_ap_no_positive_is_nan():
    s = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.4, 0.3, 0.5]])
    t = np.array([[0, 1, -1], [0, 0, -1], [0, 1, -1]])  # label 0: no positive; label 2: all ignored
    ap = average_precision(s, t)
    assert math.isnan(ap[0]) and math.isnan(ap[2])
    # label 1: 0.8(-) 0.3(+) 0.1(+) -> (1/2 + 2/3)/2 = 7/12
    assert ap[1] == pytest.approx(7 / 12, abs=1e-12)


# -----------------------------------------------------------------------------
# multilabel_metrics: hand-computed cases

# 4 images x 4 labels, threshold 0.5
HAND_S = np.array([
    [0.9, 0.6, 0.1, 0.3],
    [0.8, 0.4, 0.3, 0.2],
    [0.2, 0.7, 0.6, 0.1],
    [0.6, 0.1, 0.4, 0.4],
])
HAND_T = np.array([
    [1, 1, 0, 0],
    [0, 1, 0, 1],
    [1, 0, 0, 0],
    [1, 1, 0, 0],
])


def test_multilabel_hand_case():
    m = multilabel_metrics(HAND_S, HAND_T)
    assert set(m) == KEYS
    # Per label (predicted = score >= 0.5):
    #   label 0: predicted imgs 0,1,3; positives 0,2,3 -> Nc=2 Np=3 Ng=3
    #   label 1: predicted imgs 0,2;   positives 0,1,3 -> Nc=1 Np=2 Ng=3
    #   label 2: predicted img 2;      no positive     -> Nc=0 Np=1 Ng=0 (excluded
    #            from class averages, but its false positive counts in OP)
    #   label 3: never predicted;      positive img 1  -> Nc=0 Np=0 Ng=1 (P = 0)
    # OP = ΣNc/ΣNp = 3/6 (ML-GCN's Np[Np==0]=1 would make it 3/7)
    # OR = ΣNc/ΣNg = 3/7,  OF1 = 2(1/2)(3/7)/(1/2 + 3/7) = 6/13
    # CP = (2/3 + 1/2 + 0)/3 = 7/18,  CR = (2/3 + 1/3 + 0)/3 = 1/3
    # CF1 = 2(7/18)(1/3)/(7/18 + 6/18) = 14/39
    # AP: label 0 ranking 0.9+ 0.8- 0.6+ 0.2+ -> (1 + 2/3 + 3/4)/3 = 29/36
    #     label 1 ranking 0.7- 0.6+ 0.4+ 0.1+ -> (1/2 + 2/3 + 3/4)/3 = 23/36
    #     label 3 ranking 0.4- 0.3- 0.2+ 0.1- -> 1/3 = 12/36
    #     mAP = (29 + 23 + 12)/(36 * 3) = 16/27
    expected = {"mAP": 16 / 27, "CP": 7 / 18, "CR": 1 / 3, "CF1": 14 / 39,
                "OP": 1 / 2, "OR": 3 / 7, "OF1": 6 / 13}
    for k, v in expected.items():
        assert m[k] == pytest.approx(100 * v, abs=1e-9), k
    # no image has more than 2 labels >= 0.5, so the top-3 cut changes nothing
    for k in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert m[k + "_top3"] == pytest.approx(m[k], abs=1e-9), k
    assert m["num_labels_evaluated"] == 3
    assert isinstance(m["num_labels_evaluated"], int)
    assert all(isinstance(m[k], float) for k in KEYS - {"num_labels_evaluated"})
    np.testing.assert_allclose(average_precision(HAND_S, HAND_T),
                               [29 / 36, 23 / 36, np.nan, 1 / 3], atol=1e-12)


def test_top3_cut_and_tie_break_by_label_index():
    # 2 images x 5 labels, threshold 0.5
    s = np.array([[0.9, 0.8, 0.7, 0.6, 0.1],
                  [0.6, 0.6, 0.6, 0.6, 0.6]])  # image 1: five-way tie
    t = np.array([[1, 0, 0, 1, 0],
                  [0, 0, 0, 1, 1]])
    m = multilabel_metrics(s, t)
    # Thresholded only: image 0 predicts labels 0-3, image 1 all five.
    #   Nc = (1, 0, 0, 2, 1), Np = (2, 2, 2, 2, 1), Ng = (1, 0, 0, 2, 1)
    #   evaluated labels 0, 3, 4: CP = (1/2 + 1 + 1)/3 = 5/6, CR = 1
    #   OP = 4/9, OR = 4/4 = 1
    assert m["CP"] == pytest.approx(100 * 5 / 6, abs=1e-9)
    assert m["CR"] == pytest.approx(100.0, abs=1e-9)
    assert m["OP"] == pytest.approx(100 * 4 / 9, abs=1e-9)
    assert m["OR"] == pytest.approx(100.0, abs=1e-9)
    # Top-3: image 0 keeps 0,1,2 (label 3 cut); image 1's tie is broken by
    # label index -> keeps 0,1,2 (all negatives; highest-index-first would
    # have kept 4,3,2 and found both positives).
    #   Nc = (1, 0, 0, 0, 0), Np = (2, 2, 2, 0, 0), Ng = (1, 0, 0, 2, 1)
    #   CP = (1/2 + 0 + 0)/3 = 1/6, CR = (1 + 0 + 0)/3 = 1/3
    #   OP = 1/6, OR = 1/4, OF1 = 2(1/6)(1/4)/(1/6 + 1/4) = 1/5
    assert m["CP_top3"] == pytest.approx(100 / 6, abs=1e-9)
    assert m["CR_top3"] == pytest.approx(100 / 3, abs=1e-9)
    assert m["CF1_top3"] == pytest.approx(100 * 2 / 9, abs=1e-9)  # 2(1/6)(1/3)/(1/2)
    assert m["OP_top3"] == pytest.approx(100 / 6, abs=1e-9)
    assert m["OR_top3"] == pytest.approx(100 / 4, abs=1e-9)
    assert m["OF1_top3"] == pytest.approx(100 / 5, abs=1e-9)


def test_ignored_entries_are_not_negatives():
    # One label, 3 images. Image 2 has a confident score on an ignored entry.
    s = col(0.9, 0.2, 0.8)
    m_ign = multilabel_metrics(s, col(1, 0, -1))
    # ignored: Nc=1 Np=1 Ng=1 -> every P/R/F1 = 100; ranking 0.9+ 0.2- -> AP 1
    for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert m_ign[k] == pytest.approx(100.0, abs=1e-9), k
    # ... and exactly equal to deleting that image
    assert_same(m_ign, multilabel_metrics(s[:2], col(1, 0)))
    # as a negative (what ML-GCN's evaluation would do): OP = CP = 1/2
    m_neg = multilabel_metrics(s, col(1, 0, 0))
    assert m_neg["OP"] == pytest.approx(50.0, abs=1e-9)
    assert m_neg["CP"] == pytest.approx(50.0, abs=1e-9)


def test_label_without_positive_excluded_from_class_averages():
    s = np.array([[0.9, 0.7], [0.1, 0.2]])
    t = np.array([[1, 0], [0, 0]])  # label 1: no positive, one false positive
    m = multilabel_metrics(s, t)
    assert m["num_labels_evaluated"] == 1
    assert m["mAP"] == pytest.approx(100.0, abs=1e-9)  # only label 0: AP 1
    assert m["CP"] == pytest.approx(100.0, abs=1e-9)  # label 1 not averaged
    assert m["CR"] == pytest.approx(100.0, abs=1e-9)
    assert m["OP"] == pytest.approx(50.0, abs=1e-9)  # its FP still counts: 1/2


def test_never_predicted_label_has_precision_zero():
    s = np.array([[0.9, 0.4], [0.2, 0.3]])
    t = np.array([[1, 1], [0, 0]])  # label 1 has a positive but no score >= 0.5
    m = multilabel_metrics(s, t)
    # CP = (1/1 + 0)/2 = 1/2, CR = (1 + 0)/2 = 1/2, OP = 1/1, OR = 1/2
    assert m["CP"] == pytest.approx(50.0, abs=1e-9)
    assert m["CR"] == pytest.approx(50.0, abs=1e-9)
    assert m["OP"] == pytest.approx(100.0, abs=1e-9)
    assert m["OR"] == pytest.approx(50.0, abs=1e-9)
    # nothing predicted at all: precisions and F1s are 0, not NaN
    m0 = multilabel_metrics(s * 0, t)
    for k in ("CP", "CR", "CF1", "OP", "OR", "OF1", "OP_top3", "OF1_top3"):
        assert m0[k] == 0.0, k


def test_degenerate_inputs_give_nan_not_crash():
    for s, t in [(np.zeros((0, 4)), np.zeros((0, 4))),  # N = 0 images
                 (np.random.rand(5, 4), -np.ones((5, 4))),  # everything ignored
                 (np.random.rand(5, 4), np.zeros((5, 4))),  # no positive anywhere
                 (np.zeros((5, 0)), np.zeros((5, 0)))]:  # L = 0 labels
        ap = average_precision(s, t)
        assert ap.shape == (s.shape[1],) and np.isnan(ap).all()
        m = multilabel_metrics(s, t)
        assert set(m) == KEYS and m["num_labels_evaluated"] == 0
        assert all(math.isnan(m[k]) for k in KEYS - {"num_labels_evaluated"})


def test_bad_inputs_raise():
    s = np.random.rand(4, 3)
    with pytest.raises(ValueError):
        average_precision(s, np.zeros((4, 2)))  # shape mismatch
    with pytest.raises(ValueError):
        average_precision(s[:, 0], np.zeros(4))  # 1-D
    with pytest.raises(ValueError):
        multilabel_metrics(s, np.full((4, 3), 2))  # not in {1, 0, -1}
    with pytest.raises(ValueError):
        multilabel_metrics(s, np.full((4, 3), 0.5))  # soft labels
    s[0, 0] = np.nan
    with pytest.raises(ValueError):
        multilabel_metrics(s, np.zeros((4, 3)))


def test_torch_inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(20, 5, generator=g, requires_grad=True)
    t = torch.randint(-1, 2, (20, 5), generator=g)
    assert_same(multilabel_metrics(s, t), multilabel_metrics(s.detach().numpy(), t.numpy()))
    assert_same(average_precision(s, t), average_precision(s.detach().numpy(), t.numpy()))
    # bfloat16 (autocast output) has no numpy dtype: must still work
    sb = s.detach().to(torch.bfloat16)
    assert_same(multilabel_metrics(sb, t.float()), multilabel_metrics(sb.float().numpy(), t.numpy()))


# -----------------------------------------------------------------------------
# reference equivalence on random inputs

def random_case(rng):
    N = int(rng.integers(0, 25))
    L = int(rng.integers(1, 7))
    kind = rng.integers(4)
    u = rng.random((N, L))
    if kind == 0:
        s = u  # continuous: (almost) no ties
    elif kind == 1:
        s = np.round(u, 1)  # 11 levels: many ties, exact 0.5 hits the threshold
    elif kind == 2:
        s = np.floor(u * 3) / 2  # {0, 0.5, 1}: heavy ties across and within images
    else:
        s = np.full((N, L), 0.5)  # everything tied
    t = (rng.random((N, L)) < rng.uniform(0.1, 0.7)).astype(int)
    t[rng.random((N, L)) < rng.choice([0.0, 0.2, 0.6])] = -1  # random ignore mask
    for l in range(L):  # random labels with no positive (negatives or all ignored)
        if rng.random() < 0.2:
            t[:, l] = rng.choice([0, -1], size=N) if rng.random() < 0.5 else 0
    return s, t


def test_matches_bruteforce_reference_on_random_inputs():
    rng = np.random.default_rng(12345)
    for _ in range(400):
        s, t = random_case(rng)
        threshold = float(rng.choice([0.5, 0.3, 0.7]))
        assert_same(average_precision(s, t), ref_average_precision(s, t))
        got = multilabel_metrics(s, t, threshold=threshold)
        assert_same(got, ref_multilabel_metrics(s, t, threshold=threshold))


def test_invariances_on_random_inputs():
    rng = np.random.default_rng(7)
    for _ in range(100):
        s, t = random_case(rng)
        if s.shape[0] < 2:
            continue
        m = multilabel_metrics(s, t)
        # order of the images is irrelevant (tie handling must not depend on it)
        perm = rng.permutation(s.shape[0])
        assert_same(multilabel_metrics(s[perm], t[perm]), m)
        # an image whose entries are all -1 is exactly an image that is absent
        t2 = t.copy()
        t2[0] = -1
        assert_same(multilabel_metrics(s, t2), multilabel_metrics(s[1:], t[1:]))
        assert_same(average_precision(s, t2), average_precision(s[1:], t[1:]))


def test_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(50):
        s, t = random_case(rng)
        ap = average_precision(s, t)
        for l in range(s.shape[1]):
            keep = t[:, l] != -1
            y = t[keep, l] == 1
            if y.any():
                assert ap[l] == pytest.approx(skm.average_precision_score(y, s[keep, l]), abs=1e-9)
        # P/R with nothing ignored: OP/OR are sklearn's micro averages, CP/CR
        # its macro averages over the labels that have a positive. (sklearn
        # reads a single column as a binary problem, where "micro" means
        # accuracy, hence the L >= 2 conditions.)
        t = np.maximum(t, 0)
        ev = (t == 1).any(axis=0)
        if s.shape[1] < 2 or ev.sum() < 2:
            continue
        m = multilabel_metrics(s, t)
        pred = s >= 0.5
        assert m["OP"] == pytest.approx(100 * skm.precision_score(t, pred, average="micro", zero_division=0), abs=1e-9)
        assert m["OR"] == pytest.approx(100 * skm.recall_score(t, pred, average="micro"), abs=1e-9)
        assert m["CP"] == pytest.approx(100 * skm.precision_score(t[:, ev], pred[:, ev], average="macro", zero_division=0), abs=1e-9)
        assert m["CR"] == pytest.approx(100 * skm.recall_score(t[:, ev], pred[:, ev], average="macro"), abs=1e-9)
