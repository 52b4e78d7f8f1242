"""
What a run folder holds, and the lines a run prints about it: plumbing of train.py that a reader of the loop
need not open.

    existing_run(out_dir)       "finished" (metrics.json), "unfinished" (a last.pt), or None
    finished(out_dir, say)      the same command again over a finished run: one line, nothing written
    best_state(last.pt state)   best.pt: the judged weights and what describes them, a quarter of last.pt
    start_log(...)              log.jsonl holding exactly this run's epochs
    peak_memory(device)         the process's (or the CUDA allocator's) peak, logged every epoch
    cpu_projection(...)         off a GPU: the minutes an epoch will take, from the run's own first steps
    summary(tcfg, metrics, ...) the lines a run ends with
    provenance()                the code and machine behind a run: git commit, whether the source differs
                                from it, a hash of the source, the CPU, torch's version (metrics.json)

A folder holds one run, and nothing here ever trains over, or deletes, a run that is in it (docs/training.md,
"A folder holds one run"). The configs are read by attribute (config.TrainConfig), so this file imports no
root file.
"""
import hashlib
import json
import os
import platform
import subprocess
import sys

import torch

from lib.checkpoint import judged_weights


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's folder


def provenance() -> dict:
    """What produced a run, for metrics.json and its checkpoints: the git commit (None outside a git checkout),
    the .py files that differ from it, a hash of the code a run runs (every .py file of the project's root and
    of lib/, path and content: the same code gives the same hash, committed or not; tests and studies are not
    part of a run), the CPU's model name and torch's version."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    files = sorted(f for folder in ("", "lib") for f in (os.path.join(folder, n) for n in os.listdir(os.path.join(ROOT, folder)))
                   if f.endswith(".py"))
    digest = hashlib.sha1()
    for f in files:   # the path and the content of each file, in a fixed order
        digest.update(f.encode())
        digest.update(open(os.path.join(ROOT, f), "rb").read())
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):   # Linux names the model there; platform.processor() often does not
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    changed = [line[3:] for line in git("status", "--porcelain", "--", "*.py").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "source_changed": changed, "source_hash": digest.hexdigest()[:12],
            "cpu": cpu, "torch": str(torch.__version__)}


def existing_run(out_dir: str):
    """What the run folder already holds: "finished" (its metrics.json), "unfinished" (a last.pt, no metrics),
    or None. A folder holds one run, and nothing here ever trains over a run that is in it."""
    if os.path.isfile(os.path.join(out_dir, "metrics.json")):
        return "finished"
    return "unfinished" if os.path.isfile(os.path.join(out_dir, "last.pt")) else None


def code_changed(out_dir: str, source_hash: str):
    """The source hash a finished run in out_dir was trained with, when it differs from `source_hash`; None when it
    is the same, or the run predates the hash (its code unknown: today's no-op)."""
    old = json.load(open(os.path.join(out_dir, "metrics.json"))).get("source_hash")
    return old if old and old != source_hash else None


def point_latest(out_dir: str):
    """runs/latest -> the newest run folder (a symbolic link; skipped where the system has none)."""
    link = os.path.join("runs", "latest")
    try:
        os.makedirs("runs", exist_ok=True)
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(out_dir), link)
    except OSError:   # Windows without the privilege, a read-only tree: the RUN= line still says where
        pass


def finished(out_dir: str, say) -> dict:
    """The same command again over a finished run: say so, show its result, write nothing -> its metrics."""
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    say(f"{out_dir} holds a finished run (test mAP {metrics['mAP']:.2f}, best epoch {metrics.get('epoch', '?')}); nothing "
        f"was trained or written. Evaluate it: python evaluate.py --checkpoint {os.path.join(out_dir, 'best.pt')}; "
        "train another beside it: the same command with --out-dir NEW_FOLDER (or another --seed)")
    return metrics


# What evaluation and fine-tuning read from best.pt: the judged weights under "model" (which of raw and EMA
# they are: "eval_weights"), the configs and the class names. No optimizer or EMA copy: last.pt has those.
BEST_KEYS = ("eval_weights", "epoch", "step", "best_map", "val_map", "model_config", "train_config", "classes",
             "world_size", "code")


def best_state(state: dict) -> dict:
    """last.pt's state -> best.pt's: the judged weights and what describes them (a quarter of the size)."""
    return {**{k: state.get(k) for k in BEST_KEYS}, "model": judged_weights(state), "ema": None}


def start_log(out_dir: str, start_epoch: int, resumed: bool, main_proc: bool) -> str:
    """log.jsonl holds exactly this run's epochs 1..start_epoch: a fresh run starts it empty (an earlier run's
    rows in the same folder would otherwise mix into its curves and tables), and a resumed run drops the rows
    of epochs its checkpoint does not have (a kill between the log line and last.pt)."""
    path = os.path.join(out_dir, "log.jsonl")
    if main_proc:
        rows = open(path).readlines() if resumed and os.path.isfile(path) else []
        with open(path, "w") as fh:
            fh.writelines(r for r in rows if json.loads(r)["epoch"] <= start_epoch)
    return path


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory in MB, and what was measured: the CUDA allocator's peak (the model's tensors)
    on a GPU; elsewhere the process's peak resident set (the data in memory included)."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20, "peak_memory_of": "cuda allocator"}
    try:
        import resource   # Unix; ru_maxrss is in kB on Linux, bytes on macOS
    except ImportError:   # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    return {"peak_memory_mb": rss, "peak_memory_of": "process resident set"}


def cpu_projection(tcfg, given: set, step_s: float, steps: int, n_val: int) -> str:
    """Off a GPU: the expected minutes per epoch, from the run's own first training steps (at its real batch
    size, data loading included), and the ways to a shorter run that the command does not already take."""
    minutes = (step_s * steps + step_s / 3 * n_val / tcfg.batch_size) / 60   # evaluation: ~1/3 of a step per batch
    ways = [f for f, flag in (("--device cuda", "device"), ("a smaller --backbone (e.g. resnet18)", "backbone"),
                              ("a smaller --image-size (e.g. 96)", "image_size"), ("--limit 512 --epochs 1 for a smoke run", "limit"))
            if flag not in given and (flag != "limit" or steps * tcfg.batch_size > 512)]   # --limit: only where it cuts
    return (f"note: training {tcfg.dataset} on the cpu: the first steps took {step_s:.2f} s each, about {minutes:.1f} min "
            f"per epoch, " + (f"{minutes * tcfg.epochs / 60:.1f} h" if minutes * tcfg.epochs >= 60 else
                              f"{minutes * tcfg.epochs:.0f} min") + f" for {tcfg.epochs} epoch{'s' * (tcfg.epochs != 1)}"
            + (f"; shorter: {', '.join(ways)} (docs/datasets.md, 'A CPU smoke run')" if ways else ""))


def summary(tcfg, metrics: dict, minutes: float) -> str:
    """The lines a run ends with: what it took, what it chose and on which split, what it scored, where it is,
    and what to run next."""
    out, mb = tcfg.out_dir, lambda f: os.path.getsize(os.path.join(out, f)) / 2 ** 20
    chosen = (f"chosen on the {tcfg.val_split} split" if tcfg.val_split != tcfg.test_split else
              f"chosen on the test split itself ({tcfg.test_split}; VOC and COCO have no validation split, as in the papers)")
    files = [f"{f} ({mb(f):.0f} MB)" for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(out, f))]
    return "\n".join([
        f"done in {minutes:.1f} min: best epoch {metrics['epoch']} of {tcfg.epochs} ({metrics['weights']} weights), {chosen} "
        f"(val mAP {metrics['val_mAP']:.2f})",
        f"test mAP {metrics['mAP']:.2f} | CF1 {metrics['CF1']:.2f} | OF1 {metrics['OF1']:.2f} (the {metrics['split']} "
        "split, scored once, with best.pt)",
        f"run folder: {', '.join(files + [f for f in ('metrics.json', 'log.jsonl', 'test_scores.npz', 'curves.png', 'routing.png', 'config.json') if os.path.isfile(os.path.join(out, f))])}",
        f"RUN={out}",
        "next: python evaluate.py --checkpoint $RUN/best.pt                  # every metric, the gate per label",
        "      python evaluate.py --checkpoint $RUN/best.pt --image my.jpg    # the labels of a photo",
        "      python evaluate.py --checkpoint $RUN/best.pt --analysis $RUN/analysis --compare-to OTHER/best.pt"
        "   # what differs from another run (docs/training.md)"])
