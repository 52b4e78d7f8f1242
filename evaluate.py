"""
Evaluation: a checkpoint over a dataset split, or over your own images, with every metric of metrics.py.

    python evaluate.py --checkpoint runs/synthetic/drmoe-dynamic-S2-T1-seed0/best.pt           # test split
    python evaluate.py --checkpoint runs/synthetic/drmoe-dynamic-S2-T1-seed0/best.pt --image cat.jpg
    python evaluate.py --checkpoint RUN/best.pt --images DIR --out predictions.csv   # lib/predictions.py
    python evaluate.py --checkpoint RUN/best.pt --analysis OUT [--compare-to OTHER/best.pt]   # lib/analysis.py

The first rebuilds the model from the checkpoint alone (zoo.load_checkpoint_model), scores the split with `predict`
(train.py uses it too, for validation), prints mAP, CP/CR/CF1, OP/OR/OF1 and their top-3 variants
(metrics.py, ML-GCN's definitions), a per-label AP table beside analysis.gate_statistics (how the gate
splits each label's mass between shared and task-specific experts), what the systems' hooks report on the
split (zoo.loop_hooks: the routing's structure, say), and writes them to JSON; with --analysis it draws
lib/analysis.py's pictures.

Shapes (legend in experts.py; N images here): scores (N, L) probabilities, targets (N, L) in {1, 0, -1},
gate weights (N, L, E), image features (N, D).
"""
import functools
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from config import AMP_MODES, SYSTEM, amp_dtype_for, check_device, pick_device
from data import load_image
import zoo
from lib import analysis, predictions
from lib.checkpoint import read_checkpoint
from lib.distributed import gather_rows, is_main
from lib.flags import Parser
from metrics import average_precision, multilabel_metrics
from zoo import load_checkpoint_model


# ----------------------------------------------------------------------------- running a model
@torch.no_grad()
def predict(model, loader, device, amp_dtype=None, memory_format=torch.channels_last, features=False) -> dict:
    """Run a model over a loader in eval mode -> {"scores": (N, L) probabilities, "targets": (N, L) in {1, 0, -1},
    "routing": {router: (N, R, E) routing rows}, "kinds": {router: its kind}} (lib/routing.py), and with
    features=True "features": the pooled image features (N, D) the gate reads (lib/analysis.py uses them).
    Leaves the model in eval mode; train.py switches it back at the start of every epoch.
    Under torchrun the loader has a DistributedSampler: each rank scores its shard, and the shards are
    gathered back into the whole split, in order and each image once (distributed.gather_rows).
    """
    # eval mode: dropout off and BatchNorm on its running statistics, so an image's score does not depend
    # on the other images of its batch (the metrics must not change with the batch size).
    model.eval()
    scores, targets, feats, rows, kinds = [], [], [], {}, {}
    # A bar on a terminal only (disable=None): output redirected to a file gets no redraws.
    for x, y in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=None if is_main() else True):
        # the memory format the model was trained in (channels_last for convolutions): the same kernels,
        # hence the same numerics as training's validation
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        # one AMP path (config.amp_dtype_for): None means fp32, and autocast is then switched off, not run at fp32
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, info = model(x)
        # sigmoid in fp32: in bf16 every logit above about 7 gives exactly 1.0, and such ties among the
        # top scores change the ranking, hence the AP
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(y)
        if features:
            feats.append(info["image_feature"].float().cpu())
        for name, r in info["routing"].items():
            rows.setdefault(name, []).append(r["probs"].float().cpu())           # (B, R, E)
            kinds[name] = r["kind"]
    # (N_r, ...) each: this rank's rows, or all N rows in a single process
    out = {"scores": torch.cat(scores), "targets": torch.cat(targets), **({"features": torch.cat(feats)} if features else {}),
           "routing": {name: torch.cat(v) for name, v in rows.items()}}
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        index, n = torch.tensor(list(loader.sampler)), len(loader.dataset)   # this rank's dataset rows (n_r,)
        gather = lambda v: gather_rows(v, index, n)
        out = {k: ({name: gather(t) for name, t in v.items()} if k == "routing" else gather(v)) for k, v in out.items()}
    out = {k: ({name: t.numpy() for name, t in v.items()} if k == "routing" else v.numpy()) for k, v in out.items()}
    out["kinds"] = kinds
    return out


def score_split(path: str, split, data_root, device, ckpt=None, amp=None):
    """A checkpoint's model over a dataset split -> (predict's output with the features, ckpt, dataset, split
    name, the model).

    The dataset is rebuilt from the run's own config (its image size, limit, ...), with the same batch
    size and memory format as training: identical numerics, hence identical metrics.
    """
    from data import build_dataset
    model, ckpt, fmt = load_checkpoint_model(path, device, ckpt)
    tcfg = ckpt["train_config"]
    split = split or tcfg.get("test_split") or "test"
    ds = build_dataset(tcfg["dataset"], split, data_root or tcfg["data_root"], tcfg["image_size"], augment=False,
                       limit=tcfg["limit"], empty=tcfg.get("empty_images", "keep"),
                       size=tcfg.get(f"{split}_images"))   # --budget study's 10,000 test images, for one
    # no shuffle: the rows keep the dataset's order, so targets, gates and features line up with ds.ids
    # (--compare-to relies on it to pair two runs' images)
    loader = torch.utils.data.DataLoader(ds, batch_size=tcfg["batch_size"], num_workers=tcfg["num_workers"])
    pred = predict(model, loader, device, amp_dtype_for(device, tcfg["amp"] if amp is None else amp), fmt, features=True)
    bad = ~np.isfinite(pred["scores"]).all(1)
    if bad.any():   # NaN weights (a diverged run) give NaN scores: name the file, not a bare ValueError
        raise ValueError(f"--checkpoint {path}: the model gives non-finite scores on {int(bad.sum())} of {len(bad)} "
                         f"{split} images; its weights hold NaN or inf (a diverged run?); use an earlier checkpoint")
    return pred, ckpt, ds, split, model


def main(argv=None):
    p = Parser(description="Evaluate a checkpoint on a split, or predict the labels of images.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    p.add_argument("--split", default=None, help="split to evaluate [default: the run's test split]")
    p.add_argument("--data-root", default=None, help="override the dataset folder saved in the checkpoint")
    p.add_argument("--image", nargs="+", default=None, metavar="FILE", help="predict these images instead")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="predict every image under DIR into a CSV (--out) instead (lib/predictions.py)")
    p.add_argument("--out", default="predictions.csv", help="with --images: the CSV to write [predictions.csv]")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a label is predicted")
    p.add_argument("--thresholds", default=None, choices=["best"],
                   help="with --image/--images: per-label thresholds that maximised F1 on the validation "
                        "split in training (saved in best.pt) instead of --threshold")
    p.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    p.add_argument("--amp", default=None, choices=AMP_MODES,
                   help="the precision to score in [default: the run's own --amp]; off scores in fp32")
    p.add_argument("--json", default=None, help="where to write the metrics [default: next to the checkpoint]")
    p.add_argument("--analysis", default=None, metavar="DIR",
                   help="also draw the gate pictures and training curves into DIR, with analysis.json (lib/analysis.py)")
    p.add_argument("--compare-to", default=None, metavar="CHECKPOINT",
                   help="with --analysis: per-label AP gain over this other run vs label heterogeneity")
    args = p.parse_args(argv)
    # Three modes share the checks below: metrics on a split (the default), --image (print the labels of a
    # few files) and --images (a folder into a CSV). The combinations that mix them are refused, because
    # each would silently ignore one of the flags the user typed.
    if args.compare_to and not args.analysis:
        p.error("--compare-to needs --analysis DIR (where heterogeneity.png goes)")
    # 0 or 1 would predict every label or none, whatever the model says: never what a user means.
    if not 0 < args.threshold < 1:
        p.error(f"--threshold must be a probability in (0, 1), got {args.threshold}")
    # Every value is checked before anything is loaded: a typo costs one line, not a traceback.
    try:
        check_device(args.device)
        # Read once here (checked: a train.py checkpoint, weights_only) and handed on, so the file is not
        # loaded twice and a wrong file stops now, before any dataset is built.
        loaded = {args.checkpoint: read_checkpoint(args.checkpoint)}
        if args.compare_to:
            args.compare_ckpt = read_checkpoint(args.compare_to)
            # Checked now, not after scoring both: the gain is per label, so both runs must know the same labels.
            if args.compare_ckpt["classes"] != loaded[args.checkpoint]["classes"]:
                raise ValueError(f"--compare-to {args.compare_to}: another label set than {args.checkpoint}'s; "
                                 "cannot compare per label")
        if args.image:
            for path in args.image:
                if not os.path.isfile(path):
                    raise ValueError(f"--image {path}: no such file")
        if args.images:
            if not os.path.isdir(args.images):
                raise ValueError(f"--images {args.images}: not a folder")
            files = predictions.list_images(args.images)
            if not files:
                raise ValueError(f"--images {args.images}: no image file in it (looked for "
                                 f"{', '.join(predictions.IMAGE_EXTENSIONS)}, subfolders included)")
        if args.thresholds and not (args.image or args.images):
            raise ValueError("--thresholds best applies to --image / --images; the metrics use --threshold")
        if args.image and args.images:
            raise ValueError("--image and --images: pass one (files to print, or a folder to write as CSV)")
        if args.out != "predictions.csv" and not args.images:
            raise ValueError("--out names the CSV of --images DIR; the metrics go to --json")
        # --thresholds best needs the per-label thresholds train.py saved in best.pt; an older or a last.pt
        # checkpoint has none, and that is a usage error too, caught here.
        thresholds = predictions.thresholds_for(loaded[args.checkpoint], args.thresholds or args.threshold)
    except ValueError as e:
        p.error(str(e))
    # only now, after every check: picking cuda or mps initialises it (seconds), wasted on a typo
    device = pick_device(args.device)

    # ---- your images: no labels, so no metrics; the model, the preprocessing and the thresholds only
    if args.image or args.images:
        model, ckpt, fmt = load_checkpoint_model(args.checkpoint, device, loaded[args.checkpoint])
        try:
            # the run's own image size, batch and workers: the same preprocessing as its evaluation
            tc = ckpt["train_config"]
            load = functools.partial(load_image, image_size=tc["image_size"])
            if args.image:
                return predictions.predict_images(model, ckpt, fmt, device, args.image, thresholds, load)
            probs, bad = predictions.predict_folder(model, files, load, tc["image_size"], device, fmt, tc["batch_size"],
                                                    tc["num_workers"])
        except predictions.NonFinite:
            sys.exit(f"error: --checkpoint {args.checkpoint}: the model gives non-finite scores; its weights hold "
                     "NaN or inf (a diverged run?); use an earlier checkpoint")
        # Unreadable files are skipped and named, not fatal: one broken JPEG must not cost a folder's run.
        predictions.write_csv(args.out, args.images, files, probs, ckpt["classes"], thresholds)
        print(f"wrote {args.out}: {len(files) - len(bad)} images"
              + (f"; skipped {len(bad)} unreadable: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "")
                 if bad else ""))
        return {"csv": args.out, "files": files, "probabilities": probs, "unreadable": bad}

    # ---- a labelled split: every metric, the per-label table, the gate and routing statistics
    try:
        pred, ckpt, ds, args.split, model = score_split(args.checkpoint, args.split, args.data_root, device,
                                                        loaded[args.checkpoint], args.amp)
    except ValueError as e:   # non-finite scores, or a model this copy cannot build: one line naming the checkpoint
        sys.exit(f"error: {e}")
    scores, targets, feats = pred["scores"], pred["targets"], pred["features"]
    gates = pred["routing"].get("gate")   # DR-MoE's gate (N, L, E); None for a model without it
    classes, mc = ckpt["classes"], ckpt["model_config"]
    print(f"{args.checkpoint}: {run_name(ckpt)}, epoch {ckpt['epoch'] + 1}, {ckpt.get('eval_weights', 'raw')} weights")
    # metrics.py's definitions, the ones train.py wrote to metrics.json: on the run's test split and at
    # --threshold 0.5 this reprints that file's numbers (the dataset is rebuilt from the run's config).
    metrics = multilabel_metrics(scores, targets, args.threshold)
    ap = average_precision(scores, targets)                                # (L,) for the per-label table
    print(f"{args.split}: {len(ds)} images, {len(classes)} labels")
    print(" | ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    result = {"checkpoint": args.checkpoint, "split": args.split, **metrics,
              "per_label_AP": {c: float(a) * 100 for c, a in zip(classes, ap)}}
    # gates (N, L, E) exist only for the label-query mixtures; other models have no gate to report.
    if gates is not None:
        stats = analysis.gate_statistics(gates, targets, mc["shared_experts"], classes)
        result["gate"] = stats
    # One table: each label's AP next to how its gate routes.
    if gates is not None:
        print("\nmass on shared experts: over all images, single- and multi-label ones; then over the images "
              "that contain the label (alone | with others); vary = std of the weights across images")
    print(f"\n{'label':<16}{'AP':>7}{'pos':>6}" + (f"{'shared':>8}{'single':>8}{'multi':>8}{'alone':>8}{'w/ oth':>8}"
                                                 f"{'vary':>8}" if gates is not None else ""))
    # "pos" beside AP: a label with few positives has a noisy AP, and its chance level is its positive rate.
    for l, c in enumerate(classes):
        row = f"{c:<16}{100 * ap[l]:7.2f}{int((targets[:, l] == 1).sum()):6d}"
        if gates is not None:
            s = stats["per_label"][c]
            row += "".join(f"{s[k]:8.3f}" for k in ("shared_mass", "shared_mass_single", "shared_mass_multi",
                                                     "shared_mass_present_single", "shared_mass_present_multi",
                                                     "variability"))
        print(row)
    if gates is not None:
        o = stats["overall"]
        print(f"\ngate: mass on shared experts {o['shared_mass']:.3f} overall, {o['shared_mass_single']:.3f} on "
              f"{o['num_single_label_images']} single-label images, {o['shared_mass_multi']:.3f} on "
              f"{o['num_multi_label_images']} multi-label images; variability across images {o['variability']:.4f}")
        print("      mean weight per expert (shared first): " + ", ".join(f"{w:.3f}" for w in o["mean_weight_per_expert"]))
    # What the systems report on this split (the routing's structure, say: does it follow the scenes?).
    hooks = zoo.loop_hooks(SimpleNamespace(**ckpt["train_config"]), zoo.model_config(mc, ckpt["train_config"]), model)
    for hook in hooks:
        result.update(hook.report(pred, ds, feats))
    if args.analysis:
        result["analysis"] = run_analysis(args, targets, gates, feats, ckpt, ds, ap, result.get("gate"), device)
        for hook in hooks:
            written = hook.draw(args.analysis, result, run_name(ckpt))
            if written:
                print(f"analysis: wrote {', '.join(written)} into {args.analysis}")
    # JSON, not a pickle or npz: the numbers are read by people and by other tools (studies/compare.py reads metrics.json).
    # Next to the checkpoint by default, named by split, so evaluating val and test keeps both files.
    out = args.json or os.path.join(os.path.dirname(args.checkpoint) or ".", f"eval_{args.split}.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {out}")
    return result


def run_name(ckpt) -> str:
    """"drmoe gate=dynamic S=2 T=1" for a gated mixture, just the model's name for the others: a title for plots."""
    mc = ckpt["model_config"]
    cfg = zoo.model_config(mc, ckpt["train_config"])
    if not zoo.gated(cfg):
        return cfg.model
    return f"{cfg.model} gate={cfg.gate} S={cfg.shared_experts} T={cfg.task_experts}"


def what_differs(ckpt, other, most: int = 4) -> str:
    """What two runs differ in, for a title: the code (the source hash each was trained with), then the settings
    that differ, "name a vs b", at most `most` of them; "nothing recorded" when both say the same."""
    parts = []
    a, b = (c.get("code") or {} for c in (ckpt, other))
    if a.get("source_hash") != b.get("source_hash"):
        parts.append(f"code {str(a.get('source_hash', '?'))[:6]} vs {str(b.get('source_hash', '?'))[:6]}")
    for key in ("model_config", "train_config"):
        x, y = ckpt[key], other[key]
        # config.SYSTEM: the settings that change where or how a run ran, not what it learned
        parts += [f"{k} {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y))
                  if k not in SYSTEM and x.get(k) != y.get(k)]
    shown = parts[:most] + ([f"{len(parts) - most} more"] if len(parts) > most else [])
    return ", ".join(shown) or "nothing recorded (the same code and settings: another seed's noise only)"


def run_analysis(args, targets, gates, feats, ckpt, ds, ap, stats, device) -> dict:
    """--analysis (and --compare-to): the pictures and analysis.json of lib/analysis.py."""
    from gating import expert_names
    mc, tc, classes = ckpt["model_config"], ckpt["train_config"], ckpt["classes"]
    # the other run is scored here, on the same split and device, rather than read from its files: the
    # per-label gain needs its AP on this very split (a run keeps only its test scores) and its image features
    other = None
    if args.compare_to:
        from data import DatasetError
        try:
            o_pred, o_ckpt, o_ds = score_split(args.compare_to, args.split, args.data_root, device,
                                               args.compare_ckpt)[:3]
            o_scores, o_targets, o_feats = o_pred["scores"], o_pred["targets"], o_pred["features"]
        except ValueError as e:   # non-finite scores: one line naming that checkpoint
            sys.exit(f"error: {e}".replace("--checkpoint", "--compare-to"))
        # The gain is per label and per image set: both runs must have seen the same labels and images.
        if o_ckpt["classes"] != classes or list(o_ds.ids) != list(ds.ids):
            raise DatasetError(f"--compare-to {args.compare_to}: another label set or other images; cannot compare per label")
        other = {"name": run_name(o_ckpt), "ap": average_precision(o_scores, o_targets), "features": o_feats,
                 "differs": what_differs(ckpt, o_ckpt)}
        print(f"\ncompared with {args.compare_to}: test mAP {100 * np.nanmean(ap):.2f} here, "
              f"{100 * np.nanmean(other['ap']):.2f} there; the runs differ in {other['differs']}")
    # The training curves come from the run's own log.jsonl, beside the checkpoint (none: no curves drawn).
    log = analysis.read_log(os.path.join(os.path.dirname(args.checkpoint) or ".", "log.jsonl"))
    res = analysis.write_analysis(args.analysis, classes, targets, gates, feats, stats, ap,
                                  expert_names(mc["shared_experts"], mc["task_experts"]) if gates is not None else [],
                                  mc["shared_experts"], log, tc.get("collapse_threshold", 0.8), run_name(ckpt), other)
    if other is not None:
        h = res["heterogeneity"]
        print(f"\nheterogeneity: AP gain over {other['name']}, mean {h['mean_gain']:+.2f} AP, against the label's "
              f"context heterogeneity: Spearman rho {h['spearman_rho']:+.3f} (p = {h['p_value']:.3f}); against its "
              f"visual heterogeneity: rho {h['visual']['spearman_rho']:+.3f} (p = {h['visual']['p_value']:.3f}); "
              f"{h['num_labels']} labels")
        fixed = h["given_headroom"]   # the same, with each label's headroom (100 - the other's AP) held fixed
        print(f"  with headroom held fixed: context rho {fixed['context']['spearman_rho']:+.3f} "
              f"(p = {fixed['context']['p_value']:.3f}); visual rho {fixed['visual']['spearman_rho']:+.3f} "
              f"(p = {fixed['visual']['p_value']:.3f})")
    print(f"analysis: wrote {', '.join(res['written'])} into {args.analysis}")
    return res


if __name__ == "__main__":
    from data import DatasetError
    try:
        main()
    except (FileNotFoundError, DatasetError) as e:   # setup problems: the message, not a traceback
        msg = str(e).strip()
        sys.exit("error: " + (msg.splitlines()[-1] if "Original Traceback" in msg else msg))
