"""
One command for each comparison: configurations trained with the same settings and several seeds, then
one markdown table and paired tests of DR-MoE against the others. The sets of configurations (--set:
models, ablation, balance, routing, routing-backbone, sweetspot, sweetspot-convnext, mlvpt) are defined,
each row with its reason, in studies/sets.py; the transfer sets (mlvpt, sweetspot, sweetspot-convnext,
routing-backbone) first pretrain their backbone (vit_tiny, convnext_mini) on the source task into
<out>/pretrain/. The tables add what a set measures: the largest expert's share
(balance), NMI and ARI with the scenes and distinct routes (routing), trainable or activated parameters
and peak memory (mlvpt, the sweet-spot sets). The ablation and the sweet-spot sets open with their grid
(report_grid, report_sweet_grid) and the paired tests that grid asks.

    python -m studies.compare                        # --set models: 8 configurations x 3 seeds, synthetic preset
                                             # (about 85 minutes on a 2-core CPU)
    python -m studies.compare --set ablation         # 29 configurations x 3 seeds (about 5 hours on 2 cores)
    python -m studies.compare --set balance          # 4 configurations x 3 seeds
    python -m studies.compare --only drmoe hsq --seeds 0 1 --extra="--epochs 2 --limit 512"   # a quick look
    python -m studies.compare --report               # only rebuild the table from the runs already on disk
    python -m studies.compare --heterogeneity "dynamic S=2 T=1" "label S=2 T=2"   # per-label gain vs heterogeneity,
                                             # seed by seed and pooled (evaluate.py --compare-to on each pair)

Every run is a plain `train.py` run in <out>/<name>/seed<k>/ (its log.jsonl, best.pt, metrics.json), so
any cell of the table can be re-checked with evaluate.py. Nothing is lost on interruption: finished runs
(metrics.json present) are skipped, an interrupted one continues from its last.pt with --resume; either
only when its command.json holds the same train.py flags (another --extra stops with one line instead),
and --report checks the same (--weights aside), so a table never shows a run of other flags under a row's
name (runs without command.json, from before it or copied into results/, are trusted).

The statistics (mean ± sample std over seeds, paired t-tests with Holm's adjustment, the bootstrap over
the test images and the detectable differences) are tables.py's; --report rebuilds them from the runs.

--budget study (config.BUDGETS) runs every configuration at the study preset, into runs/compare-study/:
    python -m studies.compare --budget study --seeds 0 1 2 3 4     # the README's comparison
Writes <out>/results_<set>.md (the table and the tests, as pasted into the README), results_<set>.json and
results_<set>.png (every run's test mAP, one dot per seed, coloured by seed).
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

from studies.sets import ABLATION, BALANCE, FROM_PRETRAINED, MODELS, SETS, pretraining
from studies.tables import mlvpt_points, report, report_grid, report_sweet_grid, sweet_spot_points

# train.py lives one folder up; every run is started there, as a user types `python train.py` in the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(name: str) -> str:
    """A configuration's name as a folder name: "dynamic S=2 T=1" -> "dynamic-S-2-T-1"."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name)


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, slug(name), f"seed{seed}")


def row_args(flags: list, extra: list, seed: int) -> list:
    """The train.py flags of one run as command.json records them: --weights normalised, --out-dir left out."""
    args = [*flags, *extra, "--seed", str(seed)]
    return [os.path.normpath(a) if i and args[i - 1] == "--weights" else a for i, a in enumerate(args)]


def other_flags(d: str, args: list, ignore=()):
    """The flags recorded in d/command.json when they differ from args, else None (also for runs from
    before command.json, and for results copied without it, which are trusted). Flags named in `ignore`
    are left out of the comparison, with their values."""
    path = os.path.join(d, "command.json")
    if not os.path.exists(path):
        return None
    drop = lambda a: [v for i, v in enumerate(a) if v not in ignore and not (i and a[i - 1] in ignore)]
    recorded = json.load(open(path))
    return recorded if drop(recorded) != drop(args) else None


def train_one(name: str, flags: list, seed: int, out: str, extra: list) -> bool:
    """Run (or finish) one train.py run in its own process; its output goes to stdout.log there."""
    d = run_dir(out, name, seed)
    # The folder is named after the row, not its flags: command.json records the flags that made it, so a
    # finished or interrupted run is continued or reused only by the same flags (another --extra, or another
    # set's row of the same name, would otherwise take its numbers silently). The folder itself (--out-dir)
    # is left out and paths are normalised, so ./runs and runs are one --out. Runs from before command.json
    # are trusted; a folder whose run never wrote a checkpoint (a typo in --extra) is simply started again.
    args = row_args(flags, extra, seed)
    begun = any(os.path.exists(os.path.join(d, f)) for f in ("metrics.json", "last.pt"))
    recorded = other_flags(d, args)
    if begun and recorded is not None:
        sys.exit(f"error: {d} holds a run of other flags ({' '.join(recorded)}); this row needs "
                 f"{' '.join(args)}: pass another --out, or remove that folder to retrain it")
    if os.path.exists(os.path.join(d, "metrics.json")):
        return True
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "command.json"), "w") as fh:
        json.dump(args, fh)
    # A separate process per run: a crash or an out-of-memory in one run cannot take the others down, and
    # each run starts from a clean interpreter exactly as a user's `python train.py ...` would.
    cmd = [sys.executable, "train.py", *args, "--out-dir", d]
    if os.path.exists(os.path.join(d, "last.pt")):
        cmd.append("--resume")   # an earlier compare.py was interrupted inside this run
    t0 = time.time()
    with open(os.path.join(d, "stdout.log"), "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    status = "ok" if code == 0 else f"FAILED (exit {code}, see {d}/stdout.log)"
    print(f"  {name:<18} seed {seed}: {status} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return code == 0


def collect(out: str, names, seeds, args_of=None) -> dict:
    """Per configuration: the metrics of every finished seed, and its mean training throughput.
    args_of(name, seed), when given, is the run's expected train.py flags (row_args): a run that recorded
    other flags stops the report with one line, as train_one stops training (--report with another --extra
    than the training command had would otherwise print that run's numbers under this row). --weights is
    not compared: in the transfer sets it is <out>/pretrain/..., which changes when a folder of finished
    runs is copied or named by another path, while the row's flags and --extra still say what ran."""
    rows = {}
    for name in names:
        runs = []
        for seed in seeds:
            d = run_dir(out, name, seed)
            if not os.path.exists(os.path.join(d, "metrics.json")):
                continue
            want = args_of(name, seed) if args_of is not None else None
            recorded = other_flags(d, want, ignore=("--weights",)) if want is not None else None
            if recorded is not None:
                sys.exit(f"error: {d} holds a run of other flags ({' '.join(recorded)}); this row needs "
                         f"{' '.join(want)}: report with the --extra it was trained with")
            m = json.load(open(os.path.join(d, "metrics.json")))
            log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
            # Throughput of the training epochs only (evaluation excluded). The median over epochs, and
            # below over seeds, so that a run that shared the machine with other work for a while does
            # not drag the figure down.
            m["img_per_s"] = float(np.median([r["img_per_s"] for r in log]))
            if "gate" in log[-1]:   # (logs before lib/routing.py, as the committed results/) the largest slot's share
                m["max_expert_mass"] = max(log[-1]["gate"]["expert_mass"].values())
            routers = log[-1].get("routers", {})   # the same from the routers' health records (lib/routing.py)
            if "gate" in routers:
                m["max_expert_mass"] = max(routers["gate"]["load"])
            backbone = [r for r in routers.values() if r["kind"] == "backbone"]
            if backbone:   # experts per image, averaged over the backbone's MoE layers, and N
                m["backbone_experts_per_image"] = float(np.mean([r["experts_per_image"] for r in backbone]))
                m["backbone_experts"] = len(backbone[0]["load"])
            if log[-1].get("backbone_moe"):   # the same, from a log written before lib/routing.py
                # How evenly one image uses the backbone's experts: backbone_moe's count over the last training
                # epoch, the distinct experts among all k choices of an image's tokens, averaged over images,
                # then over the MoE layers.
                bb = log[-1]["backbone_moe"]
                m["backbone_experts_per_image"] = float(np.mean(bb["experts_used_per_image"]))
                m["backbone_experts"] = len(bb["token_share"][0])
            for f in ("test_scores.npz", "test_logits.npz"):   # for the paired bootstrap (noise.py)
                if os.path.exists(os.path.join(d, f)):
                    m["scores_file"] = os.path.join(d, f)
                    break
            runs.append({"seed": seed, **m})
        if runs:
            rows[name] = runs
    return rows


def heterogeneity(out: str, a: str, b: str, seeds) -> str:
    """Is a's per-label AP gain over b larger on heterogeneous labels? Seed by seed, then pooled.

    For each seed with both runs finished: evaluate.py --checkpoint a --analysis ... --compare-to b (whose
    heterogeneity.png and analysis.json land in <out>/heterogeneity/<a>-vs-<b>/seed<k>/). Pooled: each
    label's gain averaged over the seeds, against its heterogeneity (the same for every seed: the test
    split is fixed) and its visual heterogeneity averaged over the seeds (each run's own features), so
    seed noise in single labels averages out before the rank correlation.
    """
    from lib import analysis   # here: they pull in torch and the models, which the training driver above does not need
    import evaluate
    folder = os.path.join(out, "heterogeneity", f"{slug(a)}-vs-{slug(b)}")
    tests = {}
    for seed in seeds:
        ca, cb = (os.path.join(run_dir(out, n, seed), "best.pt") for n in (a, b))
        if os.path.exists(ca) and os.path.exists(cb):
            res = evaluate.main(["--checkpoint", ca, "--analysis", os.path.join(folder, f"seed{seed}"),
                                 "--compare-to", cb, "--json", os.path.join(folder, f"eval_seed{seed}.json")])
            tests[seed] = res["analysis"]["heterogeneity"]
    if not tests:
        return f"no seed has both {a!r} and {b!r} finished in {out}\n"
    labels = list(next(iter(tests.values()))["per_label"])
    per = lambda key: np.array([[t["per_label"][c][key] for c in labels] for t in tests.values()])   # (seeds, L)
    gains, ctx = per("gain"), per("heterogeneity")[0]          # the context score is the same for every seed
    vis = per("visual_heterogeneity").mean(0)                   # the visual one comes from each run's features
    room = per("headroom").mean(0)                              # 100 - b's AP, averaged over the seeds
    pooled = {name: {"plain": analysis.spearman(score, gains.mean(0)),
                     "given_headroom": analysis.partial_spearman(score, gains.mean(0), room)}
              for name, score in (("context", ctx), ("visual", vis))}
    cell = lambda t: f"{t['spearman_rho']:+.2f} (p = {t['p_value']:.3f})"
    lines = [f"{a} minus {b}: per-label AP gain against label heterogeneity (Spearman's rho over the labels;",
             "\"| headroom fixed\": the same with headroom = 100 - the other's AP held fixed, analysis.partial_spearman)", "",
             "| seeds | mean gain (AP points) | vs context het. | vs visual het. | context, headroom fixed | "
             "visual, headroom fixed |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {t['mean_gain']:+.2f} | {cell(t)} | {cell(t['visual'])} | "
              f"{cell(t['given_headroom']['context'])} | {cell(t['given_headroom']['visual'])} |" for k, t in tests.items()]
    lines += [f"| pooled ({len(tests)} seed{'s' * (len(tests) > 1)}, gains averaged per label) | {np.nanmean(gains):+.2f} | "
              f"{cell(pooled['context']['plain'])} | {cell(pooled['visual']['plain'])} | "
              f"{cell(pooled['context']['given_headroom'])} | {cell(pooled['visual']['given_headroom'])} |",
              "", "| label | context het. | visual het. | headroom | gain per seed | mean gain |", "|---|---|---|---|---|---|"]
    for l in np.argsort(-vis):   # most visually heterogeneous first
        lines.append(f"| {labels[l]} | {ctx[l]:.3f} | {vis[l]:.3f} | {room[l]:.2f} | "
                     f"{', '.join(f'{g:+.2f}' for g in gains[:, l])} | {gains[:, l].mean():+.2f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "results.md"), "w") as fh:
        fh.write(table)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="models", choices=list(SETS), help="which configurations [models]")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these configurations of the set (names as in its table)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per configuration [0 1 2]")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. --extra='--epochs 2'")
    p.add_argument("--pretrain-extra", default="", help="the transfer sets (mlvpt, sweetspot*, routing-backbone): more train.py "
                                                        "flags for the source-task pretraining run only (--extra is "
                                                        "for the rows)")
    p.add_argument("--budget", default="demo", choices=["demo", "study"],
                   help="train.py --budget for every run (config.BUDGETS) [demo]")
    p.add_argument("--out", default=None, help="where the runs and results go [runs/compare, or "
                                               "runs/compare-study with --budget study]")
    p.add_argument("--draws", type=int, default=1000, help="bootstrap resamples per comparison, 0 = none [1000]")
    p.add_argument("--report", action="store_true", help="do not train; rebuild the table from finished runs")
    p.add_argument("--heterogeneity", nargs=2, default=None, metavar=("A", "B"),
                   help="do not train; A's per-label AP gain over B vs label heterogeneity, for every seed")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/compare" if args.budget == "demo" else f"runs/compare-{args.budget}")
    extra = shlex.split(args.extra) + (["--budget", args.budget] if args.budget != "demo" else [])
    if args.heterogeneity:
        every = {**MODELS, **ABLATION, **BALANCE}
        unknown = [n for n in args.heterogeneity if n not in every]
        if unknown:
            p.error(f"unknown configuration(s) {unknown}; choose from {list(every)}")
        print(heterogeneity(args.out, *args.heterogeneity, args.seeds))
        return
    runs, reference = SETS[args.set]
    names = args.only or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        p.error(f"unknown configuration(s) {unknown} in --set {args.set}; choose from {list(runs)}")
    if args.set in FROM_PRETRAINED:
        # The transfer sets' first step: pretrain each backbone of the rows on the source task (once, seed 0,
        # at the set's --budget; --extra is for the rows, e.g. their calibrated length; studies.pretraining),
        # then every row starts from its backbone's run. Sets run with the same --out share them. Skipped
        # when finished, resumed when interrupted.
        pre = os.path.join(args.out, "pretrain")
        budget = ["--budget", args.budget] if args.budget != "demo" else []
        start = {}
        for backbone in dict.fromkeys(r[r.index("--backbone") + 1] for r in (runs[n] for n in names)):
            pre_name, pre_flags = pretraining(backbone)
            if not args.report and not train_one(pre_name, pre_flags, 0, pre, budget + shlex.split(args.pretrain_extra)):
                sys.exit(f"the pretraining run failed: see {run_dir(pre, pre_name, 0)}/stdout.log")
            start[backbone] = ["--weights", os.path.join(run_dir(pre, pre_name, 0), "best.pt")]
    # A row's flags beyond its own: --extra, --budget and, in the transfer sets, its backbone's source-task run.
    row_extra = lambda flags: extra + (start[flags[flags.index("--backbone") + 1]] if args.set in FROM_PRETRAINED else [])
    if not args.report:
        jobs = [(n, s) for s in args.seeds for n in names]   # seed-major: an early stop leaves whole seeds
        print(f"{len(jobs)} runs into {args.out}/ (finished ones are skipped)", flush=True)
        for i, (name, seed) in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}]", end="", flush=True)
            train_one(name, runs[name], seed, args.out, row_extra(runs[name]))
    # read every run's files once, each checked against the flags this command would have trained it with
    rows = collect(args.out, names, args.seeds, lambda n, s: row_args(runs[n], row_extra(runs[n]), s))
    if not rows:
        sys.exit(f"no finished runs of --set {args.set} under {args.out}/ (seeds {args.seeds}): "
                 "train them first (the same command without --report), or point --out at their folder")
    table = report(rows, reference, args.draws)
    if args.set == "ablation":
        table = report_grid(rows) + "\n" + table
    if args.set.startswith("sweetspot"):
        table = report_sweet_grid(rows) + "\n" + table
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"results_{args.set}")
    with open(base + ".md", "w") as fh:
        fh.write(table)
    with open(base + ".json", "w") as fh:   # the runs' metrics (scores_file: a path under runs/, not copied)
        json.dump(rows, fh, indent=2)
    from lib import plots   # the per-seed picture: where each configuration's seeds fall, and which seed is hard for all
    plots.seed_dots(base + ".png", [(n, {r["seed"]: r["mAP"] for r in rows[n]}) for n in names if n in rows],
                    f"--set {args.set}: test mAP of every run", f"{args.out}; one dot per seed, paired by colour")
    seeds = "-".join(sorted({str(len(r)) for r in rows.values()}))   # for the cost pictures' subtitles, e.g. "3"
    if args.set.startswith("sweetspot") and rows:   # the sweet-spot paper's picture: accuracy against activated parameters
        backbone = next(iter(rows)).split()[0]   # every row of a sweet-spot set names its backbone first
        picture = "sweet_spot.png" if args.set == "sweetspot" else f"sweet_spot_{backbone}.png"
        plots.cost_scatter(os.path.join(args.out, picture), sweet_spot_points(rows),
                           "activated parameters per token (M)", "test mAP (mean +- std over seeds)",
                           "MoE inside the backbone: test mAP against activated parameters",
                           f"{backbone} on the embedded benchmark; {args.out}; seeds per point: {seeds}")
    if args.set == "mlvpt" and rows:   # the parameter-efficiency picture: accuracy against what trains
        plots.cost_scatter(os.path.join(args.out, "mlvpt_cost.png"), mlvpt_points(rows),
                           "trainable parameters (M, log scale)", "test mAP (mean +- std over seeds)",
                           "Adapting one pretrained vit_tiny: test mAP against trainable parameters",
                           f"{args.out}; seeds per point: {seeds}", log_x=True)
    print(table)
    print(f"wrote {base}.md, {base}.json and {base}.png")


if __name__ == "__main__":
    main()
