"""
Seeing inside the gate (analysis.py, evaluate.py --analysis / --compare-to) and the collapse watch.

- the heterogeneity scores on hand-made examples equal a hand computation: the context entropy of a
  label matrix, and the visual share of feature variance;
- gate statistics on hand-made examples: shared mass over single- and multi-label images, variability,
  and the same restricted to the images that contain the label;
- lib/routing.py: a router's health record by hand (load, entropies, dead, dropped), the alarm only above the threshold;
- evaluate.py --analysis on a tiny trained checkpoint writes PNG files that open and JSON whose numbers
  equal the gate statistics evaluate.py prints and returns (and the curves equal log.jsonl);
- --compare-to between two real checkpoints: each label's gain is the difference of the two runs' own
  per-label APs, and the Spearman correlation equals scipy's on those numbers;
- the headroom-adjusted (partial) Spearman equals the correlation of rank residuals.

Run: python -m pytest -q tests/test_analysis.py
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from lib import analysis
import evaluate
import train
from tiny import TINY_MODEL

TINY = TINY_MODEL + ["--limit", "64", "--batch-size", "16", "--ema-decay", "0.9", "--epochs", "2"]


def test_context_heterogeneity_by_hand():
    # a with b; a with c; a alone; b with c; plus one ignored (-1) entry that must not count as present
    t = np.array([[1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 1, 1], [-1, 0, 0]])
    het = analysis.context_heterogeneity(t)
    # a: companions b 1, c 1, alone 1 -> uniform over 3 outcomes -> log 3 / log 3 = 1
    # b: a 1, c 1 -> log 2 / log 3; c likewise
    assert het == pytest.approx([1.0, math.log(2) / math.log(3), math.log(2) / math.log(3)])
    # a label always seen with the same companion has entropy 0; a never-present label has none (NaN)
    het = analysis.context_heterogeneity(np.array([[1, 1, 0], [1, 1, 0]]))
    assert het[0] == pytest.approx(0.0) and het[1] == pytest.approx(0.0) and np.isnan(het[2])


def test_visual_heterogeneity_by_hand():
    # 1-D features; label a on images 0, 1 (features 0, 2), label b on images 1, 2, 3 (2, 4, 6)
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    t = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, -1]])
    total = np.var([0, 2, 4, 6])                                     # population variance: 5
    het = analysis.visual_heterogeneity(f, t)
    assert het[0] == pytest.approx(np.var([0, 2]) / total)          # 1 / 5
    assert het[1] == pytest.approx(np.var([2, 4, 6]) / total)       # (8/3) / 5
    assert np.isnan(het[2])                                         # never present: no variance to measure


def test_partial_spearman_equals_rank_residual_correlation():
    # Independent computation: regress the ranks of z out of the ranks of x and of y (least squares with
    # an intercept), correlate the residuals; its p-value from the t distribution on n - 3 df.
    rng = np.random.default_rng(0)
    z = rng.normal(size=20)
    x, y = z + rng.normal(size=20), 0.5 * z + rng.normal(size=20)
    x[3] = np.nan                                                    # a label without a score is left out
    got = analysis.partial_spearman(x, y, z)
    ok = np.isfinite(x)
    rx, ry, rz = (sps.rankdata(v[ok]) for v in (x, y, z))
    Z = np.stack([np.ones(ok.sum()), rz], 1)
    res = lambda v: v - Z @ np.linalg.lstsq(Z, v, rcond=None)[0]
    r = np.corrcoef(res(rx), res(ry))[0, 1]
    n = ok.sum()
    assert got["num_labels"] == n == 19
    assert got["spearman_rho"] == pytest.approx(r)
    assert got["p_value"] == pytest.approx(2 * sps.t.sf(abs(r) * np.sqrt((n - 3) / (1 - r ** 2)), n - 3))


def test_gate_statistics_by_hand():
    # 2 images x 2 labels x 3 experts (S = 2 shared first); image 0 has one label, image 1 two.
    gates = torch.tensor([[[0.5, 0.25, 0.25]], [[0.1, 0.1, 0.8]]]).numpy().repeat(2, axis=1)   # (2, 2, 3)
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).numpy()
    s = analysis.gate_statistics(gates, targets, num_shared=2, classes=["a", "b"])
    assert s["per_label"]["a"]["shared_mass_single"] == pytest.approx(0.75)
    assert s["per_label"]["a"]["shared_mass_multi"] == pytest.approx(0.2)
    assert s["per_label"]["a"]["shared_mass"] == pytest.approx(0.475)
    assert s["per_label"]["a"]["variability"] == pytest.approx((0.2 + 0.075 + 0.275) / 3)   # population std per expert


def test_gate_statistics_on_present_labels_by_hand():
    # 3 images x 2 labels x 2 experts (S = 1 shared first): a alone; a and b; nothing.
    gates = np.array([[[0.9, 0.1], [0.3, 0.7]],
                      [[0.6, 0.4], [0.5, 0.5]],
                      [[0.2, 0.8], [0.1, 0.9]]])
    targets = np.array([[1, 0], [1, 1], [0, 0]])
    s = analysis.gate_statistics(gates, targets, num_shared=1, classes=["a", "b"])
    a, b, o = s["per_label"]["a"], s["per_label"]["b"], s["overall"]
    assert a["shared_mass"] == pytest.approx((0.9 + 0.6 + 0.2) / 3)
    assert (a["shared_mass_present_single"], a["shared_mass_present_multi"]) == pytest.approx((0.9, 0.6))
    assert b["shared_mass_single"] == pytest.approx(0.3)          # image 0 is single-label, though not b's
    assert math.isnan(b["shared_mass_present_single"])            # b is never alone
    assert b["shared_mass_present_multi"] == pytest.approx(0.5)
    assert o["shared_mass_single"] == pytest.approx((0.9 + 0.3) / 2)
    assert o["shared_mass_present_single"] == pytest.approx(0.9)
    assert o["shared_mass_present_multi"] == pytest.approx((0.6 + 0.5) / 2)


def test_routing_health_by_hand_and_collapse_only_above_the_threshold():
    """lib/routing.py: the health record against numbers worked out by hand, and the alarm."""
    from lib.routing import Watch, route
    # Two steps of a soft gate over E = 2 experts: mean weights (0.2, 0.8) and (0.4, 0.6) -> load (0.3, 0.7).
    watch = Watch()
    for w in ([0.2, 0.8], [0.4, 0.6]):
        watch.add({"gate": route(torch.tensor(w).expand(3, 4, 2), names=["shared0", "task0"])})
    rec, warnings = watch.health(collapse=0.8, dead_share=0.1)
    r = rec["gate"]
    assert r["load"] == pytest.approx([0.3, 0.7]) and r["experts"] == ["shared0", "task0"]
    assert r["entropy"] == pytest.approx(-(0.3 * math.log(0.3) + 0.7 * math.log(0.7)))
    assert r["max_entropy"] == pytest.approx(math.log(2)) and r["dead"] == [] and not r["collapsed"]
    # mean row entropy: the rows are (0.2, 0.8) and (0.4, 0.6), half of the steps each
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert r["row_entropy"] == pytest.approx((h(0.2) + h(0.4)) / 2, rel=1e-5) and not warnings
    # One expert over the threshold: the alarm, naming it; an expert under dead_share / E: dead.
    watch = Watch()
    watch.add({"gate": route(torch.tensor([0.04, 0.96]).expand(2, 3, 2), names=["shared0", "task0"])})
    rec, warnings = watch.health(collapse=0.8, dead_share=0.1)
    assert rec["gate"]["collapsed"] and rec["gate"]["dead"] == [0]
    assert "task0" in warnings[0] and "--aux-loss-coef" in warnings[0]
    # A top-2 router over 4 experts: its load sums to 1, each expert at most 1/2; collapse reads k * load.
    watch = Watch()
    watch.add({"moe": route(torch.full((2, 1, 4), 0.25), load=torch.tensor([0.45, 0.45, 0.05, 0.05]), k=2,
                            dropped=torch.tensor(0.1), kind="backbone")})
    rec, warnings = watch.health(collapse=0.8, dead_share=0.1)
    assert rec["moe"]["collapsed"] and rec["moe"]["dropped"] == pytest.approx(0.1) and rec["moe"]["dead"] == []
    # One expert: nothing to route, nothing to collapse.
    watch = Watch()
    watch.add({"one": route(torch.ones(2, 3, 1))})
    assert not watch.health(0.8, 0.1)[0]["one"]["collapsed"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for gate in ("dynamic", "static"):
        train.main(TINY + ["--gate", gate, "--out-dir", str(root / gate)])
    return root


def test_analysis_pictures_and_numbers(two_runs, capsys):
    out = two_runs / "analysis"
    result = evaluate.main(["--checkpoint", str(two_runs / "dynamic" / "best.pt"), "--analysis", str(out)])
    printed = capsys.readouterr().out
    for name in ("gate_heatmap.png", "gate_shared_vs_task.png", "curves.png"):
        with Image.open(out / name) as im:
            im.verify()                                            # a complete, valid PNG
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
    saved = json.load(open(out / "analysis.json"))
    # The JSON's gate numbers are the ones evaluate.py returned and printed.
    assert json.dumps(saved["gate_statistics"], sort_keys=True) == json.dumps(result["gate"], sort_keys=True)
    o = result["gate"]["overall"]
    assert f"mass on shared experts {o['shared_mass']:.3f} overall" in printed
    row = next(line for line in printed.splitlines() if line.startswith("circle "))
    assert f"{result['gate']['per_label']['circle']['variability']:.3f}" in row
    # The heatmap's cells average to the overall mean weight per expert; each label's row sums to 1.
    cells = np.array([list(saved["mean_gate_weight"][c].values()) for c in saved["classes"]])   # (L, E)
    assert np.allclose(cells.sum(1), 1, atol=1e-5)
    assert np.allclose(cells.mean(0), o["mean_weight_per_expert"], atol=1e-6)
    # The curves are the run's log, epoch by epoch.
    log = [json.loads(line) for line in open(two_runs / "dynamic" / "log.jsonl")]
    assert saved["curves"]["train_loss"] == [r["train_loss"] for r in log]
    assert saved["curves"]["expert_mass"]["shared0"] == [r["routers"]["gate"]["load"][0] for r in log]
    # Every epoch's record holds the gate's health (lib/routing.py), and the run drew routing.png.
    assert all({"load", "entropy", "dead"} <= set(r["routers"]["gate"]) for r in log)
    with Image.open(two_runs / "dynamic" / "routing.png") as im:
        assert im.format == "PNG" and im.width > 300


def test_heterogeneity_between_two_checkpoints(two_runs, capsys):
    out = two_runs / "compare"
    a = evaluate.main(["--checkpoint", str(two_runs / "dynamic" / "best.pt"), "--analysis", str(out),
                       "--compare-to", str(two_runs / "static" / "best.pt")])
    # What the two runs differ in, said and in the picture's title: the gate, nothing else (same code).
    assert "the runs differ in gate dynamic vs static" in capsys.readouterr().out
    b = evaluate.main(["--checkpoint", str(two_runs / "static" / "best.pt")])
    with Image.open(out / "heterogeneity.png") as im:
        im.verify()
    het = json.load(open(out / "analysis.json"))["heterogeneity"]
    gains, scores = [], []
    for c, v in het["per_label"].items():
        ap_a, ap_b = a["per_label_AP"][c], b["per_label_AP"][c]
        if np.isfinite(ap_a):
            assert v["gain"] == pytest.approx(ap_a - ap_b) and v["AP_other"] == pytest.approx(ap_b)
            gains.append(v["gain"])
            scores.append(v["heterogeneity"])
    rho, p = sps.spearmanr(scores, gains)
    assert het["spearman_rho"] == pytest.approx(rho) and het["p_value"] == pytest.approx(p)
    vis = np.array([het["per_label"][c]["visual_heterogeneity"] for c in het["per_label"] if np.isfinite(a["per_label_AP"][c])])
    ok = np.isfinite(vis)                                            # labels with >= 2 positive images
    assert het["visual"]["spearman_rho"] == pytest.approx(sps.spearmanr(vis[ok], np.array(gains)[ok])[0])
    assert "static" in het["other"]
