"""
compare.py and tables.py: the sets of configurations, the tables built from finished runs, and the
heterogeneity pooling.

- the ablation set is the full grid gate kind x S in {0, 1, 2, 4} x T in {1, 2}, with one run standing for
  the four kinds where S + T = 1 (the gate is then the constant 1);
- from run folders written here (metrics.json + log.jsonl, no training), the grid shows mean ± sample std
  per cell, repeats the S + T = 1 run in every gate column, and its paired differences and p-values equal
  scipy's paired t-test on the same numbers, with Holm's adjustment (checked by hand) over the grid's
  tests; the flat table reads the largest expert share from the log;
- the models table's bootstrap interval and detectable differences: from fake runs with test_scores.npz,
  the interval equals noise.paired_bootstrap on the same scores and the detectable differences equal
  noise's formulas on the observed spread;
- --heterogeneity on tiny trained runs for 2 seeds: the pooled Spearman correlations equal scipy's on
  the per-label gains averaged over the seeds' analysis.json files (context and visual heterogeneity,
  plain and with headroom held fixed);
- the transfer sets (mlvpt, sweetspot, sweetspot-convnext, routing-backbone) pretrain on the source task first, whatever
  --extra says, and every row starts from that run's best.pt; each backbone of a set (vit_tiny,
  convnext_mini) gets its own source-task run and its rows start from it;
- --report over a folder without runs of the set stops with one line that says so;
- a finished or interrupted run is reused or resumed only by the flags that made it (command.json), a
  folder without a checkpoint is started afresh, and no two rows of any sets share a folder with
  different flags; --report reads a run only under the flags that made it;
- the routing table: NMI / ARI as mean ± sample std, and the paired NMI tests equal scipy's with Holm's;
- the sweet-spot sets: the backbone experts an image uses, and the grid view (placement x N by k) whose
  families of paired tests (k = 2 - k = 1, last2 - every2, DR-MoE head - linear head) equal scipy's with
  Holm's per family;
- the ML-VPT set's picture: each row's point is its mean and sample std over seeds at its trainable
  parameters.

Run: python -m pytest -q tests/test_compare.py
"""
import json
import os

import numpy as np
import pytest
from scipy import stats

from lib import analysis
from studies import compare
from studies import sets
from studies import tables
import train
from gating import GATE_KINDS
from tiny import TINY_MODEL


def fake_run(out, name, seed, m_ap, share=0.5, nmi=None):
    d = compare.run_dir(str(out), name, seed)
    os.makedirs(d)
    routing = {"routing": {"nmi": nmi, "ari": nmi / 2, "distinct_routes": 10}} if nmi is not None else {}
    json.dump({"mAP": m_ap, "CF1": m_ap - 5, "OF1": m_ap - 4, "parameters": 6.77e6, "gflops": 0.286, **routing},
              open(os.path.join(d, "metrics.json"), "w"))
    with open(os.path.join(d, "log.jsonl"), "w") as fh:
        for epoch in (1, 2):
            fh.write(json.dumps({"epoch": epoch, "img_per_s": 100.0 + epoch, "routers": {"gate": {
                "load": [share, 1 - share], "kind": "head", "experts": ["shared0", "task0"]}}}) + "\n")


def test_ablation_set_is_the_full_grid():
    assert len(sets.ABLATION) == 4 * 4 * 2 - 3                 # S + T = 1: one run, not four
    assert "dynamic S=0 T=1" in sets.ABLATION and "static S=0 T=1" not in sets.ABLATION
    assert sets.ABLATION["label S=4 T=2"] == ["--gate", "label", "--shared-experts", "4", "--task-experts", "2"]


def test_grid_and_paired_tests_from_finished_runs(tmp_path):
    maps = {"dynamic S=0 T=1": [70.0, 71.0, 72.5], "dynamic S=2 T=1": [80.0, 81.5, 79.0],
            "static S=2 T=1": [79.0, 80.0, 78.6], "label S=2 T=1": [80.5, 80.9, 79.2]}
    for name, values in maps.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, name, seed, v, share=0.9 if name.startswith("static") else 0.5)
    compare.main(["--set", "ablation", "--report", "--out", str(tmp_path)])
    md = open(tmp_path / "results_ablation.md").read()
    row = lambda s, t: next(line for line in md.splitlines() if line.startswith(f"| {s} | {t} |"))
    cell = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}"
    # S + T = 1: the one run in every gate column
    assert row(0, 1).count(cell(maps["dynamic S=0 T=1"])) == len(GATE_KINDS)
    r = row(2, 1)
    assert cell(maps["static S=2 T=1"]) in r and cell(maps["dynamic S=2 T=1"]) in r
    p = {other: stats.ttest_rel(maps["dynamic S=2 T=1"], maps[f"{other} S=2 T=1"]).pvalue for other in ("static", "label")}
    p_holm = dict(zip(p, tables.holm(list(p.values()))))           # the grid's only two tests
    for other in ("static", "label"):
        diff = np.mean(np.subtract(maps["dynamic S=2 T=1"], maps[f"{other} S=2 T=1"]))
        assert f"{diff:+.2f} ({p[other]:.2f}, {p_holm[other]:.2f})" in r
    assert "| 4 | 2 |" not in md                                     # no finished run, no row
    flat = next(line for line in md.splitlines() if line.startswith("| static S=2 T=1 |"))
    assert "| 0.90 |" in flat                                        # largest expert share, last epoch


def test_models_table_has_bootstrap_interval_and_detectable_difference(tmp_path):
    from studies import noise
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < 0.3).astype(np.int8)
    scores = {}
    for name, skill, maps in (("drmoe", 2.0, [81.0, 82.0, 80.5]), ("linear", 1.0, [79.0, 80.5, 79.4])):
        for seed, v in enumerate(maps):
            fake_run(tmp_path, name, seed, v)
            s = (1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(size=y.shape))))).astype(np.float32)
            np.savez(os.path.join(compare.run_dir(str(tmp_path), name, seed), "test_scores.npz"), scores=s, targets=y)
            scores.setdefault(name, []).append(s)
    compare.main(["--report", "--only", "drmoe", "linear", "--out", str(tmp_path), "--draws", "200"])
    line = next(l for l in open(tmp_path / "results_models.md").read().splitlines() if l.startswith("| linear |") and "[" in l)
    ref = noise.paired_bootstrap(scores["drmoe"], scores["linear"], y, draws=200)
    assert f"[{ref['low']:+.2f}, {ref['high']:+.2f}]" in line
    d = np.subtract([81.0, 82.0, 80.5], [79.0, 80.5, 79.4])
    assert f"{noise.detectable_t(d.std(ddof=1), 3):.2f} / {noise.detectable_z(ref['se']):.2f}" in line


def test_holm_by_hand():
    # sorted p: 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert tables.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert tables.holm([0.5, 0.6]).tolist() == pytest.approx([1.0, 1.0])      # capped at 1
    assert tables.holm([0.02]).tolist() == pytest.approx([0.02])              # one test: unchanged


def test_heterogeneity_pooled_over_seeds(tmp_path):
    tiny = TINY_MODEL + ["--limit", "48", "--batch-size", "16", "--ema-decay", "0.9", "--epochs", "1"]
    a, b = "dynamic S=2 T=1", "static S=2 T=1"
    for seed in (0, 1):
        for name in (a, b):
            train.main(tiny + sets.ABLATION[name] + ["--seed", str(seed),
                                                        "--out-dir", compare.run_dir(str(tmp_path), name, seed)])
    table = compare.heterogeneity(str(tmp_path), a, b, [0, 1])
    folder = tmp_path / "heterogeneity" / "dynamic-S-2-T-1-vs-static-S-2-T-1"
    per_seed = [json.load(open(folder / f"seed{k}" / "analysis.json"))["heterogeneity"] for k in (0, 1)]
    labels = [c for c in per_seed[0]["per_label"]
              if all(np.isfinite(h["per_label"][c]["gain"]) for h in per_seed)]
    het = [per_seed[0]["per_label"][c]["heterogeneity"] for c in labels]
    vis = [np.mean([h["per_label"][c]["visual_heterogeneity"] for h in per_seed]) for c in labels]
    mean_gain = [np.mean([h["per_label"][c]["gain"] for h in per_seed]) for c in labels]
    room = [np.mean([h["per_label"][c]["headroom"] for h in per_seed]) for c in labels]
    pooled = next(line for line in table.splitlines() if line.startswith("| pooled"))
    for score in (np.array(het), np.array(vis)):
        ok = np.isfinite(score)                                      # visual: labels with >= 2 positive images
        rho, p = stats.spearmanr(score[ok], np.array(mean_gain)[ok])
        assert f"{rho:+.2f} (p = {p:.3f})" in pooled
        # the headroom-fixed column: the partial test on the same pooled numbers
        fixed = analysis.partial_spearman(score, np.array(mean_gain), np.array(room))
        assert f"{fixed['spearman_rho']:+.2f} (p = {fixed['p_value']:.3f})" in pooled
    assert (folder / "seed1" / "heterogeneity.png").exists()


def test_transfer_sets_pretrain_on_the_source_task_first(tmp_path):
    """--set mlvpt (and sweetspot): the source-task run comes first, on synthetic-pretrain even when --extra
    names another dataset for the rows, and every row starts from its best.pt."""
    from lib.checkpoint import load_file
    small = "--epochs 1 --limit 16 --batch-size 16 --image-size 32 --num-workers 0"
    compare.main(["--set", "mlvpt", "--only", "linear probe", "--seeds", "0", "--out", str(tmp_path), "--draws", "0",
                  "--extra", small + " --dataset synthetic", "--pretrain-extra", small])
    pre = os.path.join(compare.run_dir(str(tmp_path / "pretrain"), "pretrain", 0), "best.pt")
    assert load_file(pre)["train_config"]["dataset"] == "synthetic-pretrain"
    row = load_file(os.path.join(compare.run_dir(str(tmp_path), "linear probe", 0), "best.pt"))
    assert row["model_config"]["weights"] == pre and row["model_config"]["freeze_backbone"]
    assert row["train_config"]["dataset"] == "synthetic"
    assert os.path.exists(tmp_path / "results_mlvpt.png")


def test_each_backbone_starts_from_its_own_pretraining(tmp_path, monkeypatch):
    """--set sweetspot-convnext: the source-task run is convnext_mini's, and every row's --weights is it."""
    calls = []
    monkeypatch.setattr(compare, "train_one", lambda name, flags, seed, out, extra: calls.append(
        (name, flags, out, extra)) or True)
    with pytest.raises(SystemExit):   # nothing was really trained: "no finished runs" ends it
        compare.main(["--set", "sweetspot-convnext", "--seeds", "0", "--out", str(tmp_path), "--draws", "0"])
    pre = [c for c in calls if c[2] == str(tmp_path / "pretrain")]
    assert [(n, f[f.index("--backbone") + 1], f[f.index("--dataset") + 1]) for n, f, _, _ in pre] == \
        [("pretrain convnext_mini", "convnext_mini", "synthetic-pretrain")]
    start = os.path.join(compare.run_dir(str(tmp_path / "pretrain"), "pretrain convnext_mini", 0), "best.pt")
    rows = [c for c in calls if c[2] == str(tmp_path)]
    assert len(rows) == len(sets.SWEETSPOT_CONVNEXT)
    for name, flags, _, extra in rows:
        assert flags[flags.index("--backbone") + 1] == "convnext_mini" and extra[extra.index("--weights") + 1] == start
    assert sets.pretraining("vit_tiny") == ("pretrain", sets.PRETRAIN)   # the runs made before keep their folder


def test_report_without_runs_says_so(tmp_path):
    """--report over a folder with no finished run of the set: one line naming the set and the folder."""
    with pytest.raises(SystemExit, match=r"no finished runs of --set routing-backbone under .*train them first"):
        compare.main(["--set", "routing-backbone", "--report", "--out", str(tmp_path), "--draws", "0"])
    # the backbone-router set: the four objectives on one MoE placement, the Switch row equal to sweetspot's
    assert len(sets.ROUTING_BACKBONE) == 4 and "routing-backbone" in sets.FROM_PRETRAINED
    assert sets.ROUTING_BACKBONE["vit_tiny last2 N=8 k=1 aux=0.01"] == sets.SWEETSPOT["vit_tiny last2 N=8 k=1"]
    for name in sets.SWEETSPOT_BEST:   # the sweet-spot DR-MoE rows differ from their linear row only in the head
        pairs = zip(sets.SWEETSPOT[name], sets.SWEETSPOT[name + " drmoe"])
        assert [(a, b) for a, b in pairs if a != b] == [("linear", "drmoe")]


def test_a_finished_run_is_reused_only_by_its_own_command(tmp_path, monkeypatch):
    """train_one skips a finished run of the same flags, stops with one line on a finished or interrupted run
    of other flags (it would otherwise report that run's numbers under this row's name), resumes an
    interrupted run of the same flags, and starts afresh where no checkpoint was ever written."""
    launched = []
    monkeypatch.setattr(compare.subprocess, "call", lambda cmd, **k: launched.append(cmd) or 0)
    d = compare.run_dir(str(tmp_path), "row", 0)
    os.makedirs(d)
    record = lambda flags: json.dump(flags, open(os.path.join(d, "command.json"), "w"))
    open(os.path.join(d, "metrics.json"), "w").write("{}")
    record(["--model", "linear", "--epochs", "3", "--weights", "pre/best.pt", "--seed", "0"])
    # the same flags, the --weights path spelled another way: reused, nothing launched
    assert compare.train_one("row", ["--model", "linear"], 0, str(tmp_path), ["--epochs", "3", "--weights", "./pre/best.pt"])
    assert launched == []
    with pytest.raises(SystemExit, match=r"holds a run of other flags .*--epochs 3.*this row needs .*--epochs 5"):
        compare.train_one("row", ["--model", "linear"], 0, str(tmp_path), ["--epochs", "5"])
    os.remove(os.path.join(d, "metrics.json"))
    open(os.path.join(d, "last.pt"), "w").write("")   # interrupted: resumed by its own flags only
    with pytest.raises(SystemExit, match="holds a run of other flags"):
        compare.train_one("row", ["--model", "linear"], 0, str(tmp_path), ["--epochs", "5"])
    compare.train_one("row", ["--model", "linear"], 0, str(tmp_path), ["--epochs", "3", "--weights", "pre/best.pt"])
    assert launched[-1][-1] == "--resume" and launched[-1][-3:-1] == ["--out-dir", d]
    os.remove(os.path.join(d, "last.pt"))   # never got a checkpoint (a typo in --extra): started again
    compare.train_one("row", ["--model", "linear"], 0, str(tmp_path), ["--epochs", "5"])
    assert "--resume" not in launched[-1] and json.load(open(os.path.join(d, "command.json")))[:3] == \
        ["--model", "linear", "--epochs"] and "5" in launched[-1]


def test_report_reads_only_runs_of_its_own_flags(tmp_path):
    """--report stops with one line on a finished run whose command.json holds other flags than the report's
    command would train (here another --extra), and reads it when they agree."""
    fake_run(tmp_path, "linear", 0, 60.0)
    d = compare.run_dir(str(tmp_path), "linear", 0)
    json.dump(compare.row_args(sets.MODELS["linear"], ["--epochs", "3"], 0), open(os.path.join(d, "command.json"), "w"))
    report = ["--set", "models", "--only", "linear", "--seeds", "0", "--report", "--out", str(tmp_path), "--draws", "0"]
    with pytest.raises(SystemExit, match=r"linear.seed0 holds a run of other flags .*--epochs 3.*report with the --extra"):
        compare.main(report)
    compare.main(report + ["--extra", "--epochs 3"])
    assert json.load(open(tmp_path / "results_models.json"))["linear"][0]["mAP"] == 60.0
    # a transfer set: the flags include --budget and the source-task --weights, which is not compared (a
    # copied folder of runs names its pretraining by another path)
    out = tmp_path / "copied"
    fake_run(out, "vit_tiny dense", 0, 61.0)
    d = compare.run_dir(str(out), "vit_tiny dense", 0)
    json.dump(compare.row_args(sets.SWEETSPOT["vit_tiny dense"], ["--epochs", "10", "--budget", "study", "--weights",
                                                                      "runs/transfer/pretrain/pretrain/seed0/best.pt"], 0),
              open(os.path.join(d, "command.json"), "w"))
    report = ["--set", "sweetspot", "--only", "vit_tiny dense", "--seeds", "0", "--report", "--out", str(out),
              "--draws", "0", "--budget", "study"]
    compare.main(report + ["--extra", "--epochs 10"])
    assert json.load(open(out / "results_sweetspot.json"))["vit_tiny dense"][0]["mAP"] == 61.0
    with pytest.raises(SystemExit, match="holds a run of other flags"):
        compare.main(report)                                  # without the --extra it was trained with


def test_rows_of_the_same_name_have_the_same_flags():
    """Every set writes into <out>/<row name>/seedS, and the transfer sets share one --out: a name used by two
    sets must mean one command, or one set would reuse the other's run."""
    seen = {}
    for set_name, (rows, _) in sets.SETS.items():
        for name, flags in rows.items():
            first = seen.setdefault(compare.slug(name), (set_name, flags))
            assert first[1] == flags, (compare.slug(name), first[0], set_name)
            if set_name in sets.FROM_PRETRAINED:   # its pretraining is chosen by the row's --backbone
                assert "--backbone" in flags, (set_name, name)


def test_routing_table_tests_nmi_paired_over_seeds(tmp_path):
    """--set routing: NMI and ARI as mean ± sample std, and each configuration's NMI minus the reference's
    with scipy's paired t-test and Holm's adjustment."""
    nmis = {"drmoe": [0.20, 0.18, 0.21], "drmoe divdr": [0.30, 0.25, 0.33], "drmoe gate=static": [0.0, 0.0, 0.01]}
    for name, values in nmis.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, name, seed, 80.0 + seed, nmi=v)
    compare.main(["--set", "routing", "--report", "--out", str(tmp_path), "--draws", "0"])
    md = open(tmp_path / "results_routing.md").read().splitlines()
    row = next(line for line in md if line.startswith("| drmoe divdr |") and "±" in line)
    v = nmis["drmoe divdr"]
    assert f"| {np.mean(v):.3f} ± {np.std(v, ddof=1):.3f} | {np.mean(v) / 2:.3f} ± {np.std(v, ddof=1) / 2:.3f} |" in row
    p = {n: stats.ttest_rel(nmis["drmoe"], nmis[n]).pvalue for n in ("drmoe divdr", "drmoe gate=static")}
    p_holm = dict(zip(p, tables.holm(list(p.values()))))
    for name in p:
        test = next(line for line in md if line.startswith(f"| {name} |") and "±" not in line and "|---" not in line
                    and line.count("|") == 7)
        diff = np.subtract(nmis[name], nmis["drmoe"])
        assert test.startswith(f"| {name} | {diff.mean():+.3f} | " + ", ".join(f"{d:+.3f}" for d in diff) +
                               f" | {p[name]:.3f} | {p_holm[name]:.3f} |")


def test_sweetspot_table_counts_backbone_experts_per_image(tmp_path):
    """--set sweetspot: the sparse rows show activated parameters and the backbone experts an image uses, the
    mean over seeds and MoE layers of the last epoch's log (dense rows: "-")."""
    used = {0: [3.0, 5.0], 1: [4.0, 6.5]}                        # per seed, per MoE layer
    for seed in (0, 1):
        fake_run(tmp_path, "vit_tiny dense", seed, 63.0 + seed)
        fake_run(tmp_path, "vit_tiny last2 N=8 k=1", seed, 62.0 + seed)
        d = compare.run_dir(str(tmp_path), "vit_tiny last2 N=8 k=1", seed)
        m = json.load(open(os.path.join(d, "metrics.json")))
        json.dump({**m, "activated_parameters": 2.7e6}, open(os.path.join(d, "metrics.json"), "w"))
        with open(os.path.join(d, "log.jsonl"), "a") as fh:       # the last epoch carries the backbone's routing
            if seed == 0:   # a log from before lib/routing.py (the committed results/ hold such logs)
                record = {"backbone_moe": {"token_share": [[1 / 8] * 8] * 2, "experts_used_per_image": used[seed]}}
            else:           # today's: one health record per MoE layer
                record = {"routers": {f"backbone moe {i}": {"load": [1 / 8] * 8, "kind": "backbone", "k": 1,
                                                            "experts_per_image": u} for i, u in enumerate(used[seed])}}
            fh.write(json.dumps({"epoch": 3, "img_per_s": 90.0, **record}) + "\n")
    compare.main(["--set", "sweetspot", "--report", "--out", str(tmp_path), "--seeds", "0", "1", "--draws", "0"])
    md = open(tmp_path / "results_sweetspot.md").read().splitlines()
    header = next(l for l in md if l.startswith("| model |")).split(" | ")   # the flat table, below the grid
    col = header.index("backbone experts/image")
    moe = next(l for l in md if l.startswith("| vit_tiny last2 N=8 k=1 |")).split(" | ")
    dense = next(l for l in md if l.startswith("| vit_tiny dense |")).split(" | ")
    assert moe[col] == f"{np.mean([np.mean(v) for v in used.values()]):.1f} of 8" and dense[col] == "-"
    assert moe[header.index("activated (M)")] == "2.70"


def test_sweetspot_grid_and_its_paired_tests(tmp_path):
    """The sweet-spot grid view: each cell is the row's mean ± std, and the families of paired tests (k = 2 -
    k = 1; last2 - every2; on vit_tiny also DR-MoE head - linear head on each backbone) equal scipy's paired
    t-test with Holm's adjustment within each family."""
    rng = np.random.default_rng(0)
    maps = {n: 56 + rng.normal(size=3) for n in sets.SWEETSPOT_CONVNEXT}
    for name, values in maps.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, name, seed, float(v))
    compare.main(["--set", "sweetspot-convnext", "--report", "--out", str(tmp_path), "--draws", "0"])
    md = open(tmp_path / "results_sweetspot-convnext.md").read().splitlines()
    cell = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}"
    row = lambda k, p, n: maps[f"convnext_mini {p} N={n} k={k}"]
    assert md[2] == "| k = 1 | " + cell(maps["convnext_mini dense"]) + " | " + \
        " | ".join(cell(row(1, p, n)) for p in ("last2", "every2") for n in (4, 8)) + " |"
    assert md[3] == "| k = 2 |  | " + " | ".join(cell(row(2, p, n)) for p in ("last2", "every2") for n in (4, 8)) + " |"
    families = [[(f"{p} N={n}", row(2, p, n), row(1, p, n)) for p in ("last2", "every2") for n in (4, 8)],
                [(f"N={n} k={k}", row(k, "last2", n), row(k, "every2", n)) for n in (4, 8) for k in (1, 2)]]
    # the vit_tiny set adds the head's family: each "<row> drmoe" minus "<row>", on the dense and a MoE backbone
    # consistent differences (+1, -0.5, small noise): small p-values, so Holm over this family's 2 tests
    # differs from Holm over all the families' tests
    vit = ["vit_tiny dense", "vit_tiny dense drmoe", "vit_tiny last2 N=8 k=2", "vit_tiny last2 N=8 k=2 drmoe"]
    maps["vit_tiny dense"], maps["vit_tiny last2 N=8 k=2"] = 62 + rng.normal(size=3), 62.5 + rng.normal(size=3)
    maps["vit_tiny dense drmoe"] = maps["vit_tiny dense"] + 1 + 0.05 * rng.normal(size=3)
    maps["vit_tiny last2 N=8 k=2 drmoe"] = maps["vit_tiny last2 N=8 k=2"] - 0.5 + 0.05 * rng.normal(size=3)
    for name in vit:
        for seed, v in enumerate(maps[name]):
            fake_run(tmp_path, name, seed, float(v))
    compare.main(["--set", "sweetspot", "--only", *vit, "--report", "--out", str(tmp_path), "--draws", "0"])
    md += open(tmp_path / "results_sweetspot.md").read().splitlines()
    families.append([(where, maps[f"vit_tiny {where} drmoe"], maps[f"vit_tiny {where}"]) for where in ("dense", "last2 N=8 k=2")])
    assert max(stats.ttest_rel(a, b).pvalue for _, a, b in families[-1]) < 0.05
    for pairs in families:
        p = [stats.ttest_rel(a, b).pvalue for _, a, b in pairs]
        for (where, a, b), p_k, h in zip(pairs, p, tables.holm(p)):
            diff = np.subtract(a, b)
            assert f"| {where} | {diff.mean():+.2f} | " + ", ".join(f"{d:+.2f}" for d in diff) + \
                f" | {p_k:.3f} | {h:.3f} |" in md


def test_mlvpt_picture_points_are_each_rows_mean_and_std_at_its_trainable_parameters(tmp_path):
    """--set mlvpt --report draws mlvpt_cost.png from tables.mlvpt_points: one point per row at its trainable
    parameters (M), its mean and sample std over seeds, coloured by what trains."""
    rng = np.random.default_rng(1)
    trainable = {"linear probe": 4e3, "mlvpt": 1.29e5, "full fine-tuning": 2.72e6}
    maps = {n: 52 + rng.normal(size=3) for n in trainable}
    for name, values in maps.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, name, seed, float(v))
            d = compare.run_dir(str(tmp_path), name, seed)
            m = json.load(open(os.path.join(d, "metrics.json")))
            json.dump({**m, "trainable_parameters": trainable[name]}, open(os.path.join(d, "metrics.json"), "w"))
    compare.main(["--set", "mlvpt", "--report", "--out", str(tmp_path), "--draws", "0"])
    assert (tmp_path / "mlvpt_cost.png").exists()
    rows = compare.collect(str(tmp_path), list(trainable), [0, 1, 2])
    points = {p[3]: p for p in tables.mlvpt_points(rows)}
    for name, values in maps.items():
        x, y, err, _, series = points[tables.MLVPT_LABELS[name]]
        assert (x, y, err) == pytest.approx((trainable[name] / 1e6, np.mean(values), np.std(values, ddof=1)))
    assert len({points[tables.MLVPT_LABELS[n]][4] for n in trainable}) == 3   # three kinds of what trains
