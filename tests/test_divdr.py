"""
DivDR and the routing-structure measures (divdr.py).

Covers: the two DivDR terms on hand-made routing vectors (two tight, far clusters: L_within ~ 0 and
L_between at its bound -m; one blob: a larger L_within); the DivDR loss's gradient reaches the gate and
not the classifier, and reaches the routers of MoE backbone layers (a linear head on a MoE ViT trains
with it and logs the backbone's routing structure); NMI and ARI equal a hand computation on a small
contingency table (and scikit-learn's where it is installed), and a checkpoint's NMI equals the entropy
formula on its table; k-means recovers separated clusters, deterministically; the synthetic scenes are
never read by the model or a loss (a run with the scenes shuffled trains identically, only the logged
NMI differs); evaluate.py reports the routing structure and draws routing_clusters.png, and for scale
the same clustering of the label vectors (recomputed from the split) and of the image features; that
clustering standardises feature dimensions (a planted partition at a tiny scale beside a loud noise
dimension is found) and leaves out images without a reference.

    python -m pytest -q tests/test_divdr.py
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from divdr import agreement, ari, contingency, divdr_loss, dominant_label, nmi, routing_signature  # noqa: E402
from lib.kmeans import kmeans  # noqa: E402


def two_clusters(n=8, rows=4, E=3, noise=1e-3):
    """n images routing every row to expert 0, n to expert 1, a little noise: (2n, rows*E), centroids."""
    torch.manual_seed(0)
    a = torch.zeros(rows, E)
    a[:, 0] = 1
    b = torch.zeros(rows, E)
    b[:, 1] = 1
    r = torch.cat([a.flatten().repeat(n, 1), b.flatten().repeat(n, 1)]) + noise * torch.randn(2 * n, rows * E)
    return r, torch.stack([a.flatten(), b.flatten()])


def test_two_tight_far_clusters():
    r, c = two_clusters()
    loss, within, between = divdr_loss(r, c, num_rows=4, margin=1.0)
    assert within.item() < 1e-5
    assert between.item() == pytest.approx(-1.0)   # d = 2 between the two routings, clamped at m = 1
    # Below the margin the term is the distance itself: -d(c_a, c_b) = -2.
    assert divdr_loss(r, c, num_rows=4, margin=5.0)[2].item() == pytest.approx(-2.0, abs=1e-3)


def test_one_blob_has_a_larger_within_term():
    torch.manual_seed(0)
    blob = torch.softmax(torch.randn(16, 4, 3), -1).flatten(1)   # 16 images, routing scattered at random
    _, c = two_clusters()
    tight = divdr_loss(two_clusters()[0], c, 4, 1.0)[1]
    spread = divdr_loss(blob, c, 4, 1.0)[1]
    # The hand value: with assignments a(b), the mean over images of the squared distance to its group's mean / R.
    a = torch.cdist(blob, c).argmin(1)
    hand = np.mean([((blob[i] - blob[a == a[i]].mean(0)) ** 2).sum().item() / 4 for i in range(16)])
    assert spread.item() == pytest.approx(hand, rel=1e-5) and spread > 100 * tight


def test_divdr_gradient_reaches_the_gate_not_the_classifier():
    from model import DRMoE
    from zoo import ModelConfig
    torch.manual_seed(0)
    model = DRMoE(ModelConfig(num_labels=5, backbone="resnet18", feature_layer="layer2", dim=32, heads=2, ff_dim=64,
                              expert_hidden=16))
    for g in model.modules():   # gates start at zero (uniform routing): give them something to move
        if type(g).__name__ == "Gate":
            torch.nn.init.normal_(g.weight, std=0.5)
    logits, info = model(torch.randn(6, 3, 64, 64))
    sig, rows = routing_signature(info["routing"])
    assert sig.shape == (6, 5 * 3) and rows == [("head", 3)] * 5
    centroids = torch.stack([sig[0].detach(), sig[3].detach()])
    divdr_loss(sig, centroids, len(rows), 1.0)[0].backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if "gate" in n]
    assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    assert model.cls_weight.grad is None and model.cls_bias.grad is None   # routing only


def test_divdr_reaches_backbone_routers_and_a_run_logs_their_structure(tmp_path):
    """Backbone MoE routers (backbone_moe.py) route too: the signature holds one row of N per MoE layer (the
    image's mean router probability), DivDR's gradient reaches the routers, and a linear head on a MoE ViT
    trains with --divdr-coef and logs the backbone's routing structure."""
    import train
    from baselines import LinearHead
    from zoo import ModelConfig
    torch.manual_seed(0)
    model = LinearHead(ModelConfig(num_labels=5, backbone="vit_tiny", backbone_moe="last2", backbone_experts=4,
                                   image_size=32))
    for m in model.modules():   # routers start near zero (upcycling): give them something to move
        if type(m).__name__ == "SparseMoE":
            torch.nn.init.normal_(m.router.weight, std=0.5)
    logits, info = model(torch.randn(6, 3, 32, 32))
    sig, rows = routing_signature(info["routing"])
    assert sig.shape == (6, 2 * 4) and rows == [("backbone", 4)] * 2
    assert torch.allclose(sig.sum(1), torch.full((6,), 2.0))   # two rows, each a distribution
    centroids = torch.stack([sig[0].detach(), sig[3].detach()])
    divdr_loss(sig, centroids, len(rows), 1.0)[0].backward()
    router = [p.grad for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert len(router) == 2 and all(g is not None and g.abs().sum() > 0 for g in router)
    out = tmp_path / "run"
    train.main(["--backbone", "vit_tiny", "--backbone-moe", "last2", "--backbone-experts", "4", "--model", "linear",
                "--image-size", "32", "--divdr-coef", "0.5", "--divdr-clusters", "3", "--epochs", "2", "--limit", "48",
                "--batch-size", "16", "--num-workers", "0", "--out-dir", str(out)])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[1]["losses"]["divdr"] != 0 and "nmi" in log[-1]["routing"]
    # The partition's health is logged like any router's (lib/routing.py): K = 3 shares summing to 1.
    part = log[-1]["routers"]["divdr partition"]
    assert len(part["load"]) == 3 and abs(sum(part["load"]) - 1) < 1e-4
    assert "backbone_largest_expert_share" in log[-1]["routing"]


def test_nmi_and_ari_by_hand():
    # clusters (rows) x reference (columns): n = 10
    t = np.array([[3, 1], [0, 4], [1, 1]])
    n, pa, pb = 10, np.array([4, 4, 2]) / 10, np.array([4, 6]) / 10
    p = t / n
    mi = sum(p[i, j] * math.log(p[i, j] / (pa[i] * pb[j])) for i in range(3) for j in range(2) if t[i, j])
    h = lambda q: -sum(v * math.log(v) for v in q)
    assert nmi(t) == pytest.approx(mi / ((h(pa) + h(pb)) / 2))
    c2 = lambda v: v * (v - 1) / 2
    s_ij = sum(c2(v) for v in t.ravel())                       # 3 + 0 + 0 + 6 + 0 + 0 = 9
    s_a, s_b = c2(4) + c2(4) + c2(2), c2(4) + c2(6)            # 13, 21
    expected = s_a * s_b / c2(10)
    assert ari(t) == pytest.approx((s_ij - expected) / ((s_a + s_b) / 2 - expected))
    assert nmi(np.diag([3, 5])) == pytest.approx(1.0) and ari(np.diag([3, 5])) == pytest.approx(1.0)


def test_nmi_and_ari_equal_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    b[:100] = a[:100] % 3   # some agreement
    t = contingency(a, b)
    assert nmi(t) == pytest.approx(metrics.normalized_mutual_info_score(a, b))
    assert ari(t) == pytest.approx(metrics.adjusted_rand_score(a, b))


def test_kmeans_recovers_separated_clusters_deterministically():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    truth = rng.integers(0, 3, 90)
    x = centres[truth] + 0.3 * rng.standard_normal((90, 2))
    c1, a1 = kmeans(x, 3, seed=5)
    c2, a2 = kmeans(x, 3, seed=5)
    assert np.array_equal(a1, a2) and np.allclose(c1, c2)
    assert ari(contingency(a1, truth)) == pytest.approx(1.0)


def test_dominant_label():
    t = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, -1], [0, 0, 1]])   # frequencies 2, 3, 2
    assert dominant_label(t).tolist() == [1, 1, 1, -1, 0, 2]   # not the first positive: the most frequent


def test_scenes_are_never_read_by_training(tmp_path, monkeypatch):
    """Shuffle the synthetic scenes: the training losses are identical, only the logged NMI may move."""
    import data
    import train
    flags = ["--divdr-coef", "0.5", "--divdr-clusters", "3", "--epochs", "2", "--limit", "64", "--batch-size", "16",
             "--num-workers", "0", "--dim", "32", "--heads", "2", "--ff-dim", "64", "--expert-hidden", "16"]
    train.main(flags + ["--out-dir", str(tmp_path / "a")])
    init = data.SyntheticMultiLabel.__init__

    def shuffled(self, *a, **kw):
        init(self, *a, **kw)
        self.scenes = self.scenes[torch.randperm(len(self.scenes), generator=torch.Generator().manual_seed(1))]
    monkeypatch.setattr(data.SyntheticMultiLabel, "__init__", shuffled)
    train.main(flags + ["--out-dir", str(tmp_path / "b")])
    logs = [[json.loads(line) for line in open(tmp_path / r / "log.jsonl")] for r in "ab"]
    for ea, eb in zip(*logs):
        assert ea["train_loss"] == eb["train_loss"] and ea["losses"] == eb["losses"]
        assert ea["val_mAP"] == eb["val_mAP"]
    assert logs[0][1]["losses"]["divdr"] != 0   # the second epoch really trained with the DivDR term
    assert logs[0][-1]["routing"]["contingency"] != logs[1][-1]["routing"]["contingency"]


def test_evaluate_reports_routing_and_draws_the_picture(tmp_path):
    import evaluate
    import train
    out = tmp_path / "run"
    train.main(["--epochs", "1", "--limit", "48", "--batch-size", "16", "--num-workers", "0", "--dim", "32",
                "--heads", "2", "--ff-dim", "64", "--expert-hidden", "16", "--out-dir", str(out)])
    res = evaluate.main(["--checkpoint", str(out / "best.pt"), "--analysis", str(tmp_path / "an")])
    r = res["routing"]
    assert r["reference"] == "scene" and 0 <= r["nmi"] <= 1 and sum(map(sum, r["contingency"])) == 48
    assert (tmp_path / "an" / "routing_clusters.png").stat().st_size > 1000
    # for scale: the same clustering of the label vectors, recomputed here from the split's files
    from data import build_dataset
    ds = build_dataset("synthetic", "test", None, 64, augment=False, limit=48)
    labels = np.stack([ds[i][1].numpy() for i in range(len(ds))]) == 1
    assert r["for_scale"]["labels"] == agreement(labels.astype(float), np.asarray(ds.scenes), 8)
    assert set(r["for_scale"]) == {"labels", "image_feature"}
    # the checkpoint's NMI, independently: its table's columns are the split's scenes, and the NMI from
    # entropies, I = H(A) + H(B) - H(A, B) (scipy), over their mean equals the reported one
    from scipy.stats import entropy
    t = np.array(r["contingency"])
    assert t.sum(0).tolist() == [c for c in np.bincount(np.asarray(ds.scenes)).tolist() if c]
    ha, hb, hab = entropy(t.sum(1)), entropy(t.sum(0)), entropy(t.ravel())
    assert r["nmi"] == pytest.approx((ha + hb - hab) / ((ha + hb) / 2))


def test_agreement_standardises_features_and_finds_a_planted_partition():
    """Five groups planted at a tiny scale in five dimensions, one loud noise dimension: standardised per
    dimension, k-means finds the groups (NMI = ARI = 1); unscaled, it would split on the noise."""
    rng = np.random.default_rng(0)
    ref = np.repeat(np.arange(5), 40)
    x = np.concatenate([0.01 * np.eye(5)[ref] + 1e-4 * rng.standard_normal((200, 5)),
                        100 * rng.standard_normal((200, 1))], 1)
    got = agreement(x, ref, k=5)
    assert got["nmi"] == pytest.approx(1.0) and got["ari"] == pytest.approx(1.0)
    _, raw = kmeans(x, 5, 0)
    assert nmi(contingency(raw, ref)) < 0.5   # the scale really would have misled it
    # images without a reference (-1, photos with no positive label) are left out, not a sixth class
    ref2 = ref.copy()
    ref2[:3] = -1
    assert agreement(x, ref2, k=5)["nmi"] == pytest.approx(1.0)
