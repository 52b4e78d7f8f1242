"""
The tables of a comparison (compare.py --report writes them): per configuration, test mAP mean ± std over
seeds and what the set measures; then paired tests of each configuration against the set's reference, and
the grid views of the ablation and the sweet-spot sets with the tests each grid asks.

The statistics: for each configuration, test mAP mean and sample std over seeds. For the set's reference
(DR-MoE, or the dense backbone) against another configuration, the seeds are paired (seed k of both runs sees the same data order and the same
synthetic images), so the test is scipy's paired t-test on the per-seed differences d_k (k = 1..n seeds),
    t = mean(d) / (sd(d) / sqrt(n)),   sd with ddof = 1,   p two-sided on n - 1 degrees of freedom.
With 3 seeds it has 2 degrees of freedom: only large, consistent differences reach p < 0.05, and "not
significant" means "not shown", not "equal". A table makes many such tests at once, so each also gets
Holm's adjusted p (holm() below), which bounds the chance of any false "yes" among the tests adjusted
together: the whole flat table, or one family of a grid (each family answers its own question).
Beside it, two numbers from noise.py: the paired bootstrap over the test images (both runs' test_scores.npz
resampled together, the mean over seeds of the mAP difference) gives a 95 % interval for the difference the
test set can vouch for; and the minimal detectable difference, for the t over seeds (from the observed sd of
the per-seed differences) and for the bootstrap (from its standard error): a true difference below it is
more likely missed than found (80 % power at alpha 0.05), so "no" under it says little.

    paired(ref, other)        seed-paired differences ref - other and scipy's paired t-test
    holm(p_values)            Holm's step-down adjustment of the p-values of one table
    report(rows, reference)   the flat table, the tests against the reference, NMI tests where routed
    report_grid(rows)         the ablation: gate kind by (S, T), dynamic vs static and vs label gates
    report_sweet_grid(rows)   a sweet-spot set: placement x N by k; k = 2 - k = 1, last2 - every2, the head
    sweet_spot_points(rows)   the points of the accuracy-against-activated-parameters picture (plots.py)
    mlvpt_points(rows)        the points of the ML-VPT set's accuracy-against-trainable-parameters picture

`rows` is compare.collect's: {configuration name: [one dict per finished seed: "seed", metrics.json's
numbers, the median training img/s, ...]}. Nothing here trains or reads run folders, except the
bootstrap, which reads the test scores a run saved (noise.read_scores).
"""
import numpy as np
from scipy import stats

from gating import GATE_KINDS
from studies.noise import detectable_t, detectable_z, paired_bootstrap, read_scores
from studies.sets import OWN, SHARED, ablation_name


def paired(ref: list, other: list, value=lambda r: r["mAP"]):
    """Seed-paired difference ref - other in value (test mAP) -> (seeds, differences, t, p), or None below
    2 pairs."""
    a, b = {r["seed"]: value(r) for r in ref}, {r["seed"]: value(r) for r in other}
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    # Pairing removes what the seed does to both runs alike (data order, flips, the shared init of
    # the backbone), which an unpaired test would count as noise.
    t, p = stats.ttest_rel([a[s] for s in common], [b[s] for s in common])
    return common, np.array([a[s] - b[s] for s in common]), t, p


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979) of m p-values tested together -> adjusted p-values.

    A table with many rows makes many tests: at p < 0.05 each, 28 of them would give about 1.4 "yes" by
    chance alone. Holm keeps the chance of any false "yes" in the whole table below 0.05: the k-th
    smallest p (k = 1..m) is multiplied by m - k + 1, and each adjusted p is at least the one before it,
        p_holm(k) = max_{j <= k} min(1, (m - j + 1) p(j)).
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])   # (m - k + 1) p(k), k from 1
    out = np.empty_like(p)
    out[order] = np.maximum.accumulate(scaled)
    return out


def mean_std(runs: list) -> str:
    maps = np.array([r["mAP"] for r in runs])
    # Sample std (ddof=1): the seeds are a sample of possible runs, and with 3 of them the population
    # formula would understate the spread by a factor sqrt(2/3).
    return f"{maps.mean():.2f}" + (f" ± {maps.std(ddof=1):.2f}" if len(maps) > 1 else " (1 seed)")


def bootstrap(ref: list, other: list, draws: int):
    """Paired bootstrap of ref - other over the test images, on the seeds both have scores for, or None."""
    a = {r["seed"]: r["scores_file"] for r in ref if "scores_file" in r}
    b = {r["seed"]: r["scores_file"] for r in other if "scores_file" in r}
    common = sorted(set(a) & set(b))
    if not common or not draws:
        return None
    targets = read_scores(a[common[0]])[1]
    res = paired_bootstrap([read_scores(a[s])[0] for s in common], [read_scores(b[s])[0] for s in common],
                           targets, draws=draws)
    res.pop("samples")
    return res


def report(rows: dict, reference: str, draws: int = 1000) -> str:
    """The markdown table (one row per configuration) and the paired tests against `reference`."""
    gated = any("max_expert_mass" in r for runs in rows.values() for r in runs)
    # Routing structure on test (divdr.structure, train.py's metrics.json): against the scenes, mean over seeds.
    routed = any("nmi" in r.get("routing", {}) for runs in rows.values() for r in runs)
    # Parameter-efficient rows (a frozen backbone) show what trains; sparse ones (backbone MoE) what one
    # token activates; both show the run's peak memory (lib/rundir.peak_memory: on CUDA the allocator's peak over
    # the whole run, EMA and evaluation included; on a CPU the process's resident set, the data included).
    every = [r for runs in rows.values() for r in runs]
    frozen = any(r.get("trainable_parameters", r["parameters"]) < r["parameters"] for r in every)
    sparse = any(r.get("activated_parameters", r["parameters"]) < r["parameters"] for r in every)
    # Each extra column: (header, the row's runs -> cell); parameters are one run's, usage the seeds' mean.
    extra_cols = ([("trainable (M)", lambda rs: f"{rs[0].get('trainable_parameters', rs[0]['parameters']) / 1e6:.3f}")]
                  if frozen else []) \
        + ([("activated (M)", lambda rs: f"{rs[0].get('activated_parameters', rs[0]['parameters']) / 1e6:.2f}")]
           if sparse else []) \
        + ([("backbone experts/image", lambda rs: f"{np.mean([r['backbone_experts_per_image'] for r in rs]):.1f} of "
             f"{rs[0]['backbone_experts']}" if "backbone_experts" in rs[0] else "-")] if sparse else []) \
        + ([("peak memory (MB)", lambda rs: f"{rs[0]['peak_memory_mb']:.0f}" if "peak_memory_mb" in rs[0] else "-")]
           if frozen or sparse else [])
    lines = ["| model | test mAP (mean ± std) | CF1 | OF1 | params (M) | "
             + "".join(f"{c} | " for c, _ in extra_cols) + "GFLOPs/img | train img/s (median) | "
             + ("largest expert share | " if gated else "")
             + ("NMI with scenes | ARI | distinct routes | " if routed else "") + "seeds |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(extra_cols) + ("---|" if gated else "")
             + ("---|---|---|" if routed else "")]
    for name, runs in rows.items():
        mean = lambda k: np.mean([r[k] for r in runs])
        share = f"{mean('max_expert_mass'):.2f} | " if "max_expert_mass" in runs[0] else "- | "
        rt = [r["routing"] for r in runs if "nmi" in r.get("routing", {})]
        spread = lambda v: f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "")
        routing = (f"{spread([r['nmi'] for r in rt])} | {spread([r['ari'] for r in rt])} | "
                   f"{np.mean([r['distinct_routes'] for r in rt]):.0f} | " if rt else "- | - | - | ")
        lines.append(f"| {name} | {mean_std(runs)} | {mean('CF1'):.2f} | {mean('OF1'):.2f} | "
                     f"{runs[0]['parameters'] / 1e6:.2f} | " + "".join(f"{fn(runs)} | " for _, fn in extra_cols)
                     + f"{runs[0]['gflops']:.3f} | {np.median([r['img_per_s'] for r in runs]):.0f} | "
                     + (share if gated else "") + (routing if routed else "") + f"{len(runs)} |")
    tests = {name: paired(rows[reference], runs) for name, runs in rows.items() if name != reference} \
        if reference in rows else {}
    tests = {name: test for name, test in tests.items() if test is not None}
    if tests:
        adjusted = dict(zip(tests, holm([test[3] for test in tests.values()])))   # over the table's m tests
        lines += ["", f"Paired t-test over seeds, {reference} minus each (positive = {reference} better); "
                  f"Holm's adjustment over the table's {len(tests)} tests. "
                  + (f"Bootstrap: 95 % interval of the seed-mean difference over {draws} resamples of the test "
                     "images (noise.py). " if draws else "")
                  + "Detectable: the smallest true difference found with 80 % power (t over seeds / bootstrap):", "",
                  "| vs | mean difference | per seed | t | p | p (Holm) | more than noise (Holm p < 0.05)? | "
                  "bootstrap 95 % interval | detectable (t / bootstrap) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, (seeds, diff, t, p) in tests.items():
            boot = bootstrap(rows[reference], rows[name], draws)
            ci = f"[{boot['low']:+.2f}, {boot['high']:+.2f}]" if boot else "-"
            mdd = f"{detectable_t(diff.std(ddof=1), len(diff)):.2f} / " + (f"{detectable_z(boot['se']):.2f}" if boot else "-")
            lines.append(f"| {name} | {diff.mean():+.2f} | {', '.join(f'{d:+.2f}' for d in diff)} | {t:.2f} | "
                         f"{p:.3f} | {adjusted[name]:.3f} | {'yes' if adjusted[name] < 0.05 else 'no'} | {ci} | {mdd} |")
    if routed and reference in rows:
        lines += routing_tests(rows, reference)
    return "\n".join(lines) + "\n"


def routing_tests(rows: dict, reference: str) -> list:
    """Does an objective change how well routing follows the scenes? Each configuration's NMI minus the
    reference's, paired over seeds (t-test, Holm over the table's tests): lines of a markdown table."""
    nmi_of = lambda r: r["routing"]["nmi"] if "nmi" in r.get("routing", {}) else np.nan
    tests = {name: paired(rows[reference], runs, nmi_of) for name, runs in rows.items() if name != reference}
    tests = {n: t for n, t in tests.items() if t is not None and np.isfinite(t[1]).all() and np.isfinite(t[3])}
    if not tests:
        return []
    adjusted = dict(zip(tests, holm([t[3] for t in tests.values()])))
    lines = ["", f"NMI with the reference partition, each configuration minus {reference} (positive = its routing "
             f"follows the scenes more), paired t-test over seeds, Holm's adjustment over {len(tests)} tests:", "",
             "| vs | NMI difference | per seed | p | p (Holm) | more than noise? |", "|---|---|---|---|---|---|"]
    for name, (seeds, diff, t, p) in tests.items():   # paired() gives reference - other: flip the sign
        lines.append(f"| {name} | {-diff.mean():+.3f} | {', '.join(f'{-d:+.3f}' for d in diff)} | {p:.3f} | "
                     f"{adjusted[name]:.3f} | {'yes' if adjusted[name] < 0.05 else 'no'} |")
    return lines


def report_grid(rows: dict) -> str:
    """The ablation as a grid: one row per (S, T), one column per gate kind, and the paired tests of the
    input-conditioned gate against HSQ's label gate and the static gate within each row (each cell:
    mean difference, then p and Holm's p over all the grid's tests)."""
    lines = ["| S | T | E | params (M) | " + " | ".join(GATE_KINDS) + " | dynamic - static (p, Holm p) | "
             "dynamic - label (p, Holm p) |", "|---|---|---|---|" + "---|" * len(GATE_KINDS) + "---|---|"]
    found = []   # (row index in lines, column 0/1, test): the Holm p needs every test first
    for s in SHARED:
        for t in OWN:
            cells = {g: rows.get(ablation_name(g, s, t)) for g in GATE_KINDS}
            if s + t == 1:   # one run for all kinds (see ABLATION)
                cells = dict.fromkeys(GATE_KINDS, cells["dynamic"])
            dyn = cells["dynamic"]
            if dyn is None:
                continue
            for col, other in enumerate(("static", "label")):
                test = paired(dyn, cells[other]) if cells[other] and s + t > 1 else None
                if test:
                    found.append((len(lines), col, test))
            lines.append([f"| {s} | {t} | {s + t} | {dyn[0]['parameters'] / 1e6:.2f} | "
                          + " | ".join(mean_std(c) if c else "-" for c in cells.values()), "-", "-"])
    for (row, col, test), p_holm in zip(found, holm([test[3] for _, _, test in found])):
        lines[row][1 + col] = f"{test[1].mean():+.2f} ({test[3]:.2f}, {p_holm:.2f})"
    return "\n".join(line if isinstance(line, str) else " | ".join(line) + " |" for line in lines) + "\n"


def report_sweet_grid(rows: dict) -> str:
    """A sweet-spot set as the paper's grid: placement x N columns, one row per k, mean ± std over seeds;
    then its questions as paired tests over seeds, each family Holm-adjusted on its own tests: does
    activating more help (k = 2 - k = 1 at each placement and N), is last-2 the better placement (last2 -
    every2 at each N and k), and, where the set has them, does DR-MoE's head help on a backbone (each
    "<row> drmoe" minus "<row>": on the dense backbone, MoE in the head only; on a MoE one, in both)? On a
    MoE backbone the head row also balances its gate (--aux-loss-coef is one flag for head and backbone,
    studies.SWEETSPOT_BEST), so that difference is the head with a balanced gate, not the head alone."""
    b = next(iter(rows)).split()[0]   # every row of a sweet-spot set names its backbone first
    run = lambda p, n, k: rows.get(f"{b} {p} N={n} k={k}")
    cols = [(p, n) for p in ("last2", "every2") for n in (4, 8)]
    lines = [f"| {b} | dense | " + " | ".join(f"{p} N={n}" for p, n in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for k in (1, 2):
        dense = mean_std(rows[f"{b} dense"]) if k == 1 and f"{b} dense" in rows else ""
        lines.append(f"| k = {k} | {dense} | " + " | ".join(mean_std(run(p, n, k)) if run(p, n, k) else "-"
                                                        for p, n in cols) + " |")
    families = {"k = 2 minus k = 1": [(f"{p} N={n}", run(p, n, 2), run(p, n, 1)) for p, n in cols],
                "last2 minus every2": [(f"N={n} k={k}", run("last2", n, k), run("every2", n, k))
                                       for n in (4, 8) for k in (1, 2)],
                # MoE in the head on top of a backbone, dense or MoE: each "<row> drmoe" against "<row>"
                "DR-MoE head minus linear head (on MoE backbones with its gate balanced too)": [(n[len(b) + 1:-len(" drmoe")], rows[n], rows.get(n[:-len(" drmoe")]))
                                                  for n in rows if n.endswith(" drmoe")]}
    for family, pairs in families.items():
        tests = [(where, paired(a, c)) for where, a, c in pairs if a and c]
        tests = [(where, t) for where, t in tests if t]
        if not tests:
            continue
        lines += ["", f"{family}, paired over seeds (Holm over the {len(tests)} test{'s' * (len(tests) > 1)} here):", "",
                  "| at | mean difference | per seed | p | p (Holm) |", "|---|---|---|---|---|"]
        for (where, (_, diff, _, p)), p_holm in zip(tests, holm([t[3] for _, t in tests])):
            lines.append(f"| {where} | {diff.mean():+.2f} | {', '.join(f'{d:+.2f}' for d in diff)} | {p:.3f} | {p_holm:.3f} |")
    return "\n".join(lines) + "\n"


def cost_points(rows: dict, x_of, label_of, series_of) -> list:
    """rows -> [(x, mean mAP, std over seeds, label, series)] for plots.cost_scatter; x_of(run) reads the
    cost from a run's numbers (the same for every seed of a row), label_of and series_of map a row's name."""
    points = []
    for name, runs in rows.items():
        maps = np.array([r["mAP"] for r in runs])
        points.append((x_of(runs[0]), maps.mean(), maps.std(ddof=1) if len(maps) > 1 else 0.0,
                       label_of(name), series_of(name)))
    return points


def sweet_spot_points(rows: dict) -> list:
    """Sweet-spot rows -> points at activated M: one colour per placement, the head in the series name."""
    place = lambda name: next((p for p in ("last2", "every2") if p in name), "dense")
    head = lambda name: "DR-MoE head" if "drmoe" in name else "linear head"
    return cost_points(rows, lambda r: r.get("activated_parameters", r["parameters"]) / 1e6,
                       lambda n: ", ".join(w for w in n.split()[1:] if w not in ("drmoe", place(n))) or "dense",
                       lambda n: f"{place(n)}, {head(n)}")


# Short names for the ML-VPT picture's labels (its label boxes are about 55 px wide).
MLVPT_LABELS = {"linear probe": "probe", "vpt-deep": "VPT-deep", "mlvpt co": "CO", "mlvpt dc": "DC",
                "mlvpt": "ML-VPT", "mlvpt random groups": "random gr.", "full fine-tuning": "full FT",
                "drmoe frozen": "DR-MoE"}


def mlvpt_points(rows: dict) -> list:
    """ML-VPT set rows -> points at trainable M (the paper's axis: parameter efficiency), one colour per
    what trains: a head on the frozen backbone, prompts and a head, or everything."""
    family = lambda n: ("everything trained" if n == "full fine-tuning" else
                        "prompts + head, backbone frozen" if "vpt" in n else "head only, backbone frozen")
    return cost_points(rows, lambda r: r["trainable_parameters"] / 1e6, lambda n: MLVPT_LABELS.get(n, n), family)
