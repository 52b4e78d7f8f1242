"""
One command for the comparison: every model (and DR-MoE with every gate kind) trained with the same
settings and several seeds, then one markdown table and a paired test of DR-MoE against each of them.

    python compare.py                        # the README's table: 8 configurations x 3 seeds, synthetic
                                             # preset (about 85 minutes on a 2-core CPU)
    python compare.py --only drmoe hsq --seeds 0 1 --extra="--epochs 2 --limit 512"   # a quick look
    python compare.py --report               # only rebuild the table from the runs already on disk

Every run is a plain `train.py` run in <out>/<name>/seed<k>/ (its log.jsonl, best.pt, metrics.json), so
any cell of the table can be re-checked with evaluate.py. Nothing is lost on interruption: finished runs
(metrics.json present) are skipped, an interrupted one continues from its last.pt with --resume.

The statistics: for each configuration, test mAP mean and sample std over seeds. For DR-MoE against
another configuration, the seeds are paired (seed k of both runs sees the same data order and the same
synthetic images), so the test is scipy's paired t-test on the per-seed differences. With 3 seeds it has
2 degrees of freedom: only large, consistent differences reach p < 0.05, and "not significant" means
"not shown", not "equal".
Writes <out>/results.md (the table and the tests, as pasted into the README) and <out>/results.json.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
from scipy import stats

# name -> train.py flags. Everything else (backbone, epochs, lr, image size, ...) is the dataset preset,
# the same for all: the rows differ only in their model (and its paper's loss, see baselines.py).
RUNS = {
    "linear": ["--model", "linear"],
    "mlgcn": ["--model", "mlgcn"],
    "q2l": ["--model", "q2l"],
    "hsq": ["--model", "hsq"],
    "drmoe": ["--model", "drmoe"],
    "drmoe gate=static": ["--model", "drmoe", "--gate", "static"],
    "drmoe gate=label": ["--model", "drmoe", "--gate", "label"],
    "drmoe gate=image": ["--model", "drmoe", "--gate", "image"],
}
REFERENCE = "drmoe"


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, name.replace(" gate=", "-gate-"), f"seed{seed}")


def train_one(name: str, seed: int, out: str, extra: list) -> bool:
    """Run (or finish) one train.py run in its own process; its output goes to stdout.log there."""
    d = run_dir(out, name, seed)
    if os.path.exists(os.path.join(d, "metrics.json")):
        return True
    os.makedirs(d, exist_ok=True)
    # A separate process per run: a crash or an out-of-memory in one run cannot take the others down, and
    # each run starts from a clean interpreter exactly as a user's `python train.py ...` would.
    cmd = [sys.executable, "train.py", *RUNS[name], *extra, "--seed", str(seed), "--out-dir", d]
    if os.path.exists(os.path.join(d, "last.pt")):
        cmd.append("--resume")   # an earlier compare.py was interrupted inside this run
    t0 = time.time()
    with open(os.path.join(d, "stdout.log"), "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
    status = "ok" if code == 0 else f"FAILED (exit {code}, see {d}/stdout.log)"
    print(f"  {name:<18} seed {seed}: {status} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return code == 0


def collect(out: str, names, seeds) -> dict:
    """Per configuration: the metrics of every finished seed, and its mean training throughput."""
    rows = {}
    for name in names:
        runs = []
        for seed in seeds:
            d = run_dir(out, name, seed)
            if not os.path.exists(os.path.join(d, "metrics.json")):
                continue
            m = json.load(open(os.path.join(d, "metrics.json")))
            log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
            # Throughput of the training epochs only (evaluation excluded). The median over epochs, and
            # below over seeds, so that a run that shared the machine with other work for a while does
            # not drag the figure down.
            m["img_per_s"] = float(np.median([r["img_per_s"] for r in log]))
            runs.append({"seed": seed, **m})
        if runs:
            rows[name] = runs
    return rows


def report(rows: dict) -> str:
    """The markdown table and the paired tests against REFERENCE."""
    lines = ["| model | test mAP (mean ± std) | CF1 | OF1 | params (M) | GFLOPs/img | train img/s (median) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        maps = np.array([r["mAP"] for r in runs])
        # Sample std (ddof=1): the seeds are a sample of possible runs, and with 3 of them the population
        # formula would understate the spread by a factor sqrt(2/3).
        std = maps.std(ddof=1) if len(maps) > 1 else float("nan")
        mean = lambda k: np.mean([r[k] for r in runs])
        lines.append(f"| {name} | {maps.mean():.2f} ± {std:.2f} | {mean('CF1'):.2f} | {mean('OF1'):.2f} | "
                     f"{runs[0]['parameters'] / 1e6:.2f} | {runs[0]['gflops']:.3f} | {np.median([r['img_per_s'] for r in runs]):.0f} | "
                     f"{len(runs)} |")
    if REFERENCE in rows:
        lines += ["", f"Paired t-test over seeds, {REFERENCE} minus each (positive = {REFERENCE} better):", "",
                  "| vs | mean difference | per seed | t | p | more than noise (p < 0.05)? |", "|---|---|---|---|---|---|"]
        ref = {r["seed"]: r["mAP"] for r in rows[REFERENCE]}
        for name, runs in rows.items():
            common = [r["seed"] for r in runs if r["seed"] in ref]
            if name == REFERENCE or len(common) < 2:
                continue
            other = {r["seed"]: r["mAP"] for r in runs}
            # Pairing removes what the seed does to both runs alike (data order, flips, the shared init of
            # the backbone), which an unpaired test would count as noise.
            diff = np.array([ref[s] - other[s] for s in common])
            t, p = stats.ttest_rel([ref[s] for s in common], [other[s] for s in common])
            verdict = "yes" if p < 0.05 else "no"
            lines.append(f"| {name} | {diff.mean():+.2f} | {', '.join(f'{d:+.2f}' for d in diff)} | {t:.2f} | "
                         f"{p:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=list(RUNS), metavar="NAME",
                   help=f"configurations to run, from: {', '.join(repr(n) for n in RUNS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per configuration [0 1 2]")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. --extra='--epochs 2'")
    p.add_argument("--out", default="runs/compare", help="where the runs and results go [runs/compare]")
    p.add_argument("--report", action="store_true", help="do not train; rebuild the table from finished runs")
    args = p.parse_args(argv)
    unknown = [n for n in args.only if n not in RUNS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(RUNS)}")
    if not args.report:
        jobs = [(n, s) for s in args.seeds for n in args.only]   # seed-major: an early stop leaves whole seeds
        print(f"{len(jobs)} runs into {args.out}/ (finished ones are skipped)", flush=True)
        for i, (name, seed) in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}]", end="", flush=True)
            train_one(name, seed, args.out, shlex.split(args.extra))
    rows = collect(args.out, args.only, args.seeds)   # read every run's files once
    table = report(rows)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    print(table)
    print(f"wrote {args.out}/results.md and results.json")


if __name__ == "__main__":
    main()
