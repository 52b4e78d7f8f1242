"""
Speed: what one training step of each model costs, the expert layer batched vs a per-label loop, and the
data loader alone. Measures; asserts nothing. The README's speed figures come from this script.

    python -m studies.bench --device cpu                                  # the CPU demo configuration, every model it carries
    python -m studies.bench --dataset coco --device cuda                  # ResNet-101, 448 px, L = 80, batch 32:
                                                                  #   fp32/AMP x channels_last x compile
    python -m studies.bench --dataset coco --device cpu --batch-size 2 --steps 3 --only step   # the same models on a CPU
    python -m studies.bench --only experts                                # batched vs loop at L = 20 and 80
    python -m studies.bench --only loader --workers 1 2 4 8               # JPEG decoding + augmentation at 448 px
    python -m studies.bench --only moe                                    # vit_tiny dense vs MoE in the last 2 pairs
                                                                  #   of blocks, N = 8 experts, k = 1 and 2
    python -m studies.bench --only memory                                 # peak memory per epoch, dense vs MoE backbone
    python -m studies.bench --json bench.json                             # also write every record as JSON

What each part times:
- step: train.train_step, i.e. forward, loss, backward, gradient clipping, AdamW step and EMA update:
  everything train.py does per batch except fetching it, on random images already on the device. The
  model is built exactly as train.py builds it for --dataset (its preset, the model's settings, and at
  voc/coco size Q2L's official width), with random weights. Warm-up steps first (cuDNN autotuning,
  torch.compile's compilation, the allocator growing), then the median over --steps steps, each timed
  between torch.cuda.synchronize() calls so that the GPU's queue has really drained. The models are
  timed in rounds, one step of each per round, so that a drift in the machine's speed hits all alike
  (all of --models are held in memory at once; on a small GPU, time fewer at a time). "vs linear" divides
  by the linear head's step time at the same settings: the cost of a head over the bare backbone.
- experts: Experts.forward (stacked weights, four einsums) against Experts.forward_loop (one label and
  one expert at a time), forward + backward, B = 32, D = H = 256, S = 2, T = 1.
- moe: the same train_step with the linear head (so the backbone is most of the cost) on --backbone when
  it is a ViT, ConvNeXt or Swin, else on vit_tiny; dense against MoE inside the backbone (backbone_moe.py:
  last2, N = 8, k = 1 and 2, no capacity limit), timed in rounds. "vs dense" is the cost of the router and the dispatch, plus the
  k-th expert for k = 2; GFLOPs are the activated ones (the sparse path computes only the chosen experts).
- memory: two real 4-epoch train.py runs (vit_tiny on 256 images, dense and every-2 MoE N = 4, k = 2), each
  epoch's peak resident memory read from log.jsonl: whether memory stays flat over a run.
- loader: a DataLoader with N worker processes over JPEGs through the training transform (resize to 448,
  flip, Cutout, RandAugment, normalise), batch 32 (the photo presets'): images per second over a second
  pass (the first starts the workers and is not timed). Without --data-root it writes 500 x 375 JPEGs
  (VOC's typical size) to a temporary folder; with --dataset voc|coco --data-root R it reads the real
  training split.

Shapes (legend in experts.py): step: images (B, 3, S_img, S_img), targets (B, L); experts: h (B, L, D)
-> (B, L, E, D); loader: batches of (B, 3, 448, 448) images and (B, L) targets.

JSON records: {"kind": "step", "model", "backbone", "image_size", "labels", "batch_size", "device", "amp",
"channels_last", "compile", "step_ms", "img_per_s", ...}, {"kind": "experts", "labels", "batched_ms",
"loop_ms"} and {"kind": "loader", "image_size", "workers", "img_per_s"}.
"""
import argparse
import contextlib
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

import config
import train
from data import NUM_LABELS, ImageList, build_dataset, build_transform
from experts import Experts
import zoo
from zoo import build_model, flops_per_image, set_memory_format
from lib.synthetic import render_synthetic

# on/off words rather than --flag / --no-flag: --amp, --channels-last and --compile each take several values,
# and every combination of them is timed in one call.
ON_OFF = {"on": True, "off": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where train.py is


def sync(device: torch.device):
    """Wait until the device has finished its queue: without it a GPU timer measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fns: dict, device, steps: int) -> dict:
    """{name: fn} -> {name: median wall time of fn() in milliseconds over `steps` calls}.

    Round-robin: each round times every fn once. This machine's speed drifts (other work, clocks), and
    timing one fn after another would charge that drift to whichever ran last; interleaved, all share it.
    """
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def configs(model: str, args):
    """(TrainConfig, ModelConfig) exactly as `train.py --dataset D --model M [flags]` would resolve them."""
    # Through config.parse_args itself, so a benchmark can never drift from what train.py builds
    # (presets, the model's settings, Q2L's paper-scale width). Random weights: speed does not depend
    # on their values, and no download is needed.
    flags = ["--dataset", args.dataset, "--model", model, "--weights", "none", *shlex.split(args.extra)]
    for name in ("backbone", "image_size", "batch_size"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    tcfg, mcfg, _ = config.parse_args(flags)
    mcfg.num_labels = args.labels or NUM_LABELS[args.dataset]
    mcfg.image_size = tcfg.image_size   # as train.py sets it: a ViT is built for the grid it will see
    return tcfg, mcfg


def make_step(model_name, args, device, amp: bool, channels_last: bool, compile_: bool):
    """Build one model as train.py would and warm it up -> (a function doing one train.train_step, its record)."""
    tcfg, mcfg = configs(model_name, args)
    if device.type == "cuda":   # this model's own footprint: weights, gradients, AdamW, EMA, activations
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    # the same random weights on every call, so that reruns time the same model
    torch.manual_seed(0)
    model = build_model(mcfg, verbose=False).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    set_memory_format(model, fmt)
    # As in train.py: only the forward runs through the compiled module; the EMA and the optimizer hold the
    # raw one (a compiled module's state_dict keys differ).
    step_model = torch.compile(model) if compile_ else model
    ema = copy.deepcopy(model).requires_grad_(False) if tcfg.ema_decay else None
    optimizer = train.build_optimizer(model, tcfg, device)
    amp_dtype = config.amp_dtype_for(device, amp)
    # Loss scaling only for fp16, whose small gradients underflow; disabled (a pass-through) otherwise, as train.py.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    B, S, L = tcfg.batch_size, tcfg.image_size, mcfg.num_labels
    # One batch, reused: the loader is measured on its own below, and a step's cost does not depend on
    # the pixels. Targets at a 15 % positive rate, about COCO's 2.9 labels per image at L = 20.
    x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=fmt)      # (B, 3, S, S)
    y = (torch.rand(B, L, device=device) < 0.15).float()                           # (B, L)
    model.train()
    # step=100: past the EMA's decay warm-up, as in most of a run
    run = train.Run(model=model, step_model=step_model, ema=ema, optimizer=optimizer, scaler=scaler, hooks=[],
                    device=device, amp_dtype=amp_dtype, fmt=fmt, rank=0, world=1)
    step = lambda: train.train_step(run, x, y, tcfg, 100)
    for _ in range(args.warmup + (3 if compile_ else 0)):   # compile happens in the first call
        step()
    sync(device)
    rec = {"kind": "step", "model": model_name, "backbone": mcfg.backbone, "image_size": S, "labels": L,
           "batch_size": B, "device": str(device), "amp": amp_dtype is not None,
           "precision": str(amp_dtype or torch.float32).replace("torch.", ""), "channels_last": channels_last,
           "compile": compile_, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    # the peak minus `base`: the models built before this one are still in memory
    if device.type == "cuda":
        rec["peak_mem_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
    if args.profile:   # where the time goes: the ops that cost most over 3 more steps
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            for _ in range(3):
                step()
            sync(device)
        print(f"{model_name}: the costliest ops over 3 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                        row_limit=15))
    return step, rec


def bench_steps(args, device, amp: bool, channels_last: bool, compile_: bool) -> list:
    """Every model of --models at one setting, timed in rounds -> "step" records."""
    built = {m: make_step(m, args, device, amp, channels_last, compile_) for m in args.models}
    ms = median_ms({m: fn for m, (fn, _) in built.items()}, device, args.steps)
    return [{**rec, "step_ms": ms[m], "img_per_s": 1e3 * rec["batch_size"] / ms[m]} for m, (_, rec) in built.items()]


def bench_backbone_moe(args, device) -> list:
    """Dense backbone vs MoE inside it (last2, N = 8, k = 1 and 2), linear head, fp32 -> "moe" records."""
    variants = {"dense": "", "last2 N=8 k=1": "--backbone-moe last2 --backbone-experts 8 --backbone-top-k 1",
                "last2 N=8 k=2": "--backbone-moe last2 --backbone-experts 8 --backbone-top-k 2"}
    built = {}
    for name, flags in variants.items():
        # a copy per variant: each must start from args.backbone and args.extra as given, not the last one's
        a = copy.copy(args)
        # Backbone MoE exists for ViT, ConvNeXt and Swin blocks only: any other --backbone (the ResNet-101 of the
        # step part, say) measures this part on vit_tiny at the dataset preset's own size instead.
        moe_capable = (args.backbone or "").startswith(("vit", "convnext", "swin"))
        a.backbone = args.backbone if moe_capable else "vit_tiny"
        a.image_size = args.image_size if moe_capable else None
        a.extra = f"{args.extra} {flags}"
        # fp32, channels_last (train.py's default), no compile: one setting, the same for the three variants
        fn, rec = make_step("linear", a, device, False, True, False)
        # The FLOPs on a fresh model of the same config: make_step keeps its own inside the step function.
        tcfg, mcfg = configs("linear", a)
        rec["gflops"] = flops_per_image(build_model(mcfg, verbose=False), tcfg.image_size) / 1e9
        built[name] = fn, {**rec, "kind": "moe", "variant": name}
    ms = median_ms({k: fn for k, (fn, _) in built.items()}, device, args.steps)
    recs = [{**rec, "step_ms": ms[k], "img_per_s": 1e3 * rec["batch_size"] / ms[k]} for k, (_, rec) in built.items()]
    # recs[0] is "dense": dicts keep the order of `variants`
    for r in recs:
        r["vs_dense"] = r["step_ms"] / recs[0]["step_ms"]
    return recs


def bench_memory(args) -> list:
    """Peak memory over a run, dense against MoE inside the backbone: each variant is a real 4-epoch train.py
    run (vit_tiny, 256 images, its own process), and each epoch's log.jsonl record carries the process's peak
    so far. Flat from epoch 1 to 4 means nothing piles up per step (backbone_moe.py, "Memory")."""
    rows = []
    for variant, flags in (("dense", []), ("every2 N=4 k=2", ["--backbone-moe", "every2", "--backbone-experts", "4",
                                                               "--backbone-top-k", "2"])):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "train.py", "--backbone", "vit_tiny", *flags, "--limit", "256", "--epochs", "4",
                   "--device", args.device, "--out-dir", out]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            peaks = [json.loads(line).get("peak_memory_mb") for line in open(os.path.join(out, "log.jsonl"))]
        rows.append({"kind": "memory", "variant": variant, "epoch1_mb": peaks[0], "epoch4_mb": peaks[-1],
                     "growth": peaks[-1] / peaks[0] - 1, "per_epoch_mb": peaks})
        print(f"  {variant:<15} peak MB per epoch: {', '.join(f'{p:.0f}' for p in peaks)}", flush=True)
    return rows


def bench_experts(device, labels: int, args) -> dict:
    """Experts.forward vs Experts.forward_loop, forward + backward -> an "experts" record."""
    torch.manual_seed(0)
    ex = Experts(labels, 256, 256, shared=2, task=1).to(device)
    # Dropout 0 (the default): both sides do the same arithmetic, nothing random to tell them apart.
    h = torch.randn(32, labels, 256, device=device, requires_grad=True)           # (B, L, D)
    # A random upstream gradient, so that backward goes through every expert output, as in training.
    g = torch.randn(32, labels, ex.num_experts, 256, device=device)               # (B, L, E, D)
    fns = {"batched": lambda: (ex(h) * g).sum().backward(), "loop": lambda: (ex.forward_loop(h) * g).sum().backward()}
    for fn in fns.values():   # warm-up
        fn()
    ms = median_ms(fns, device, args.steps)
    return {"kind": "experts", "labels": labels, "batched_ms": ms["batched"], "loop_ms": ms["loop"],
            "speedup": ms["loop"] / ms["batched"], "device": str(device)}


def loader_dataset(args, folder: str, image_size: int):
    """The training split of a real dataset, or --loader-images generated 500 x 375 JPEGs, as train.py reads them."""
    if args.data_root:
        return build_dataset(args.dataset, "trainval" if args.dataset == "voc" else "train", args.data_root,
                             image_size, augment=True, cutout=0.5, limit=args.loader_images)
    paths = []
    for i in range(args.loader_images):
        # A synthetic scene rendered at 500 px and cropped to 500 x 375: edges, textures and sensor noise,
        # so the JPEG costs what a photo costs to decode (a flat or pure-noise image would not).
        img = render_synthetic(0, "train", i, 500)[0][:375]
        paths.append(os.path.join(folder, f"{i:06d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    # The labels cost nothing to load: all-negative targets for VOC's L = 20 are enough.
    targets = np.zeros((len(paths), 20), dtype=np.float32)
    return ImageList(paths, targets, [str(i) for i in range(len(paths))], [str(c) for c in range(20)], image_size,
                     build_transform(image_size, train=True, randaugment=True, cutout=0.5))


def bench_loader(ds, workers: int, batch_size: int) -> dict:
    """Images per second of a DataLoader shuffled over `ds` as train.py's is, with persistent workers (train.py's
    are not), over its second pass.

    The first pass starts the (persistent) worker processes and is not timed; timing only after a first
    batch would flatter several workers, whose other batches were prepared meanwhile.
    """
    # train.py restarts its workers every pass (for an exact --resume); here they must outlive pass 1.
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    for _ in loader:                                    # pass 1: worker start-up, page cache
        pass
    t0, n = time.perf_counter(), 0
    for x, _ in loader:                                 # pass 2: timed
        n += x.shape[0]
    return {"kind": "loader", "image_size": ds.image_size, "workers": workers,
            "img_per_s": n / (time.perf_counter() - t0)}


def table(rows, cols):
    """Markdown table of dict rows; cols = [(header, key, format)]."""
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format(r[k], f) if k in r else "-" for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# labels: what every head costs as the label set grows (docs/speed.md, "As the label set grows")

LABEL_SIZES = (20, 80, 1000, 10000)
# ML-Decoder's number of group queries: 100 when not given (num_of_groups -1), capped at L as its code caps it.
GROUPS = 100
# Row -> (model, settings over the coco preset). ML-VPT prompts a ViT: ViT-B/16, its papers' backbone.
LABEL_ROWS = {"linear": ("linear", {}), "mlgcn": ("mlgcn", {}), "q2l": ("q2l", {}), "drmoe": ("drmoe", {}),
              "drmoe K=100, L queries": ("drmoe", {"label_groups": GROUPS}),
              "drmoe K=100, group decoding": ("drmoe", {"label_groups": GROUPS, "group_decoding": True}),
              "mlvpt": ("mlvpt", {"backbone": "vit_b_16"})}
GB = 1e9


def label_config(model: str, labels: int, **fields):
    """(TrainConfig, ModelConfig) of `train.py --dataset coco --model M --weights none` with L = labels and the
    given model fields (K capped at L): what the labels part builds, and what tests/test_groups.py checks."""
    args = argparse.Namespace(dataset="coco", extra="", backbone=fields.pop("backbone", None), image_size=None,
                              batch_size=None, labels=labels)
    tcfg, mcfg = configs(model, args)
    for k, v in fields.items():
        setattr(mcfg, k, min(v, labels) if k == "label_groups" else v)
    return tcfg, mcfg


def label_cost(tcfg, mcfg) -> dict:
    """Parameters (zoo.build_model on the meta device: nothing allocated) and the bytes of the training state:
    weights and, as train.py keeps them, the EMA copy, the gradients and AdamW's two moments of what trains."""
    with torch.device("meta"):
        model = build_model(mcfg, verbose=False)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ema = n_all if tcfg.ema_decay else 0
    return {"params": n_all, "trainable": n_train, "state_gb": 4 * (n_all + ema + 3 * n_train) / GB}


def label_step(row: str, labels: int, batch: int, steps: int, warmup: int) -> dict:
    """One training step of a row at L labels, batch `batch`, on this CPU, measured in this process (main runs
    each in a fresh one): its time, the process's peak resident memory over the interpreter's own, and the
    bytes autograd saves for the backward pass (each storage once, parameters left out)."""
    import resource
    model_name, fields = LABEL_ROWS[row]
    tcfg, mcfg = label_config(model_name, labels, **dict(fields))
    tcfg.batch_size = batch
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")   # resident bytes now
    torch.manual_seed(0)
    model = build_model(mcfg, verbose=False)
    set_memory_format(model)
    ema = copy.deepcopy(model).requires_grad_(False) if tcfg.ema_decay else None
    run = train.Run(model=model, step_model=model, ema=ema, optimizer=train.build_optimizer(model, tcfg, torch.device("cpu")),
                    scaler=torch.amp.GradScaler("cpu", enabled=False), hooks=[], device=torch.device("cpu"),
                    amp_dtype=None, fmt=torch.channels_last, rank=0, world=1)
    S = tcfg.image_size
    x = torch.randn(batch, 3, S, S).contiguous(memory_format=torch.channels_last)   # (B, 3, S, S)
    y = (torch.rand(batch, labels) < 0.15).float()                                  # (B, L)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):   # every tensor autograd keeps for the backward pass, by its storage
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train.train_step(run, x, y, tcfg, 100)                                      # the first step, counted
    for _ in range(warmup - 1):
        train.train_step(run, x, y, tcfg, 100)
    ms = median_ms({"step": lambda: train.train_step(run, x, y, tcfg, 100)}, torch.device("cpu"), steps)["step"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024                # Linux: kilobytes
    return {"step_ms": ms, "peak_gb": (peak - base) / GB, "saved_gb_per_image": sum(saved.values()) / batch / GB}


def label_saved_on_meta(row: str, labels: int, batch: int = 2) -> float:
    """The bytes autograd saves per image, counted on the meta device (shapes only): for rows whose training
    state does not fit this machine. One forward and the loss, each storage once, parameters left out."""
    model_name, fields = LABEL_ROWS[row]
    tcfg, mcfg = label_config(model_name, labels, **dict(fields))
    with torch.device("meta"):
        model = build_model(mcfg, verbose=False).train()
        x = torch.zeros(batch, 3, tcfg.image_size, tcfg.image_size)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t
    # The gate turns autocast off around its fp32 block (gating.py), and autocast knows no meta device: there
    # it is a context that does nothing, which in fp32 is what it does anyway.
    no_autocast = lambda *a, **k: contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mock.patch.object(torch, "autocast", no_autocast):
        logits, _ = model(x)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
    return sum(saved.values()) / batch / GB


def bench_labels(args) -> list:
    """Every row of LABEL_ROWS at every L: counts on the meta device, one step measured in its own process
    (python -m studies.bench --label-step ROW L) when its training state fits --max-state-gb, and the
    projection to batch 32: training state + 32 x the activations saved per image."""
    rows = []
    for row in args.label_rows:
        for L in args.label_sizes:
            model_name, fields = LABEL_ROWS[row]
            tcfg, mcfg = label_config(model_name, L, **dict(fields))
            rec = {"kind": "labels", "row": row, "labels": L, "batch_size": args.label_batch, **label_cost(tcfg, mcfg)}
            if fields.get("label_groups") and L <= GROUPS:   # K = L: DR-MoE itself (tests/test_groups.py)
                rec["same_as"] = "drmoe"
            elif rec["state_gb"] <= args.max_state_gb:
                cmd = [sys.executable, "-m", "studies.bench", "--label-step", row, str(L), "--batch-size",
                       str(args.label_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if out.returncode:
                    rec["error"] = (out.stderr.strip().splitlines() or ["?"])[-1]
                else:
                    rec.update(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                rec["saved_gb_per_image"] = label_saved_on_meta(row, L)
                rec["counted_on"] = "meta"
            if "saved_gb_per_image" in rec:
                rec["projected_gb_b32"] = rec["state_gb"] + 32 * rec["saved_gb_per_image"]
            print(f"  {row:<28} L = {L:>6}: {rec['params'] / 1e6:9.1f} M parameters, state {rec['state_gb']:6.2f} GB"
                  + (f", step {rec['step_ms']:7.0f} ms, peak {rec['peak_gb']:5.2f} GB" if "step_ms" in rec else "")
                  + (f", batch 32 ~ {rec['projected_gb_b32']:6.1f} GB" if "projected_gb_b32" in rec else "")
                  + (f" ({rec['error']})" if "error" in rec else ""), flush=True)
            rows.append(rec)
    return rows


def label_table(rows) -> str:
    """The markdown table of docs/speed.md: one line per row and L."""
    fits = lambda r, cap: "-" if "projected_gb_b32" not in r else ("yes" if r["projected_gb_b32"] <= cap else "no")
    lines = ["| head | L | params (M) | trainable (M) | state GB | step s (B = 2) | peak GB (B = 2) | saved GB / image "
             "| batch 32 GB (projected) | 24 GB | 80 GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r.get("same_as")
        step = f"{r['step_ms'] / 1e3:.1f}" if "step_ms" in r else ("= " + same if same else "not run")
        peak = f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
        saved = (f"{r['saved_gb_per_image']:.3f}" + (" (meta)" if r.get("counted_on") == "meta" else "")
                 if "saved_gb_per_image" in r else "-")
        proj = f"{r['projected_gb_b32']:.1f}" if "projected_gb_b32" in r else "-"
        lines.append(f"| {r['row']} | {r['labels']:,} | {r['params'] / 1e6:.1f} | {r['trainable'] / 1e6:.1f} | "
                     f"{r['state_gb']:.2f} | {step} | {peak} | {saved} | {proj} | {fits(r, 24)} | {fits(r, 80)} |")
    return "\n".join(lines)


def default_models(backbone) -> list:
    """Every model the backbone can carry: mlvpt prompts a ViT, and train.py refuses it on any other
    backbone (the presets' ResNets), so the default list leaves it out there rather than stop at it."""
    return [m for m in zoo.models() if m != "mlvpt" or str(backbone).startswith("vit")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", choices=list(NUM_LABELS),
                   help="whose preset (backbone, size, batch, labels) to measure [synthetic = the CPU demo]")
    p.add_argument("--models", nargs="+", default=None, choices=list(zoo.models()),
                   help="models to time [all; mlvpt only on a vit_* --backbone, since it prompts a ViT]")
    p.add_argument("--backbone", default=None, help="override the preset's backbone")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--labels", type=int, default=None, help="override the dataset's label count L")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--extra", default="", help="more train.py flags, e.g. --extra='--feature-layer layer4'")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) | cuda | mps | cpu")
    p.add_argument("--amp", nargs="+", default=None, choices=list(ON_OFF),
                   help="mixed precision off/on (on = train.py's --amp auto) [CUDA: off on; elsewhere fp32 only, as auto]")
    p.add_argument("--channels-last", nargs="+", default=["on", "off"], choices=list(ON_OFF), help="[on off]")
    p.add_argument("--compile", nargs="+", default=None, choices=list(ON_OFF),
                   help="torch.compile off/on [CUDA: off on; CPU: off, as train.py ignores it there]")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--only", nargs="+", default=["step", "experts", "moe", "loader"],
                   choices=["step", "experts", "moe", "loader", "memory", "labels"],
                   help="which parts [step experts moe loader; memory trains two short runs and labels measures "
                        "every head from L = 20 to 10,000 at 448 px: ask for them]")
    p.add_argument("--expert-labels", nargs="+", type=int, default=[20, 80], help="L values for the experts part")
    p.add_argument("--workers", nargs="+", type=int, default=sorted({1, config.WORKERS}),
                   help="DataLoader worker counts for the loader part [1 and train.py's default]")
    p.add_argument("--loader-size", type=int, default=448, help="image size for the loader part")
    p.add_argument("--loader-images", type=int, default=256, help="images the loader part reads")
    p.add_argument("--data-root", default=None, help="loader part: read this --dataset's real training split")
    p.add_argument("--profile", action="store_true", help="step part: also print torch.profiler's costliest ops")
    p.add_argument("--json", default=None, help="also write all records to this JSON file")
    p.add_argument("--label-rows", nargs="+", default=list(LABEL_ROWS), choices=list(LABEL_ROWS), metavar="ROW",
                   help=f"labels part: which heads [{', '.join(LABEL_ROWS)}]")
    p.add_argument("--label-sizes", nargs="+", type=int, default=list(LABEL_SIZES), help="labels part: the L values")
    p.add_argument("--label-batch", type=int, default=2, help="labels part: the batch of the measured CPU step [2]")
    p.add_argument("--max-state-gb", type=float, default=12.0,
                   help="labels part: measure a step only when the training state fits in this many GB [12: "
                        "half of this 24 GB machine]; above it the activations are counted on the meta device")
    p.add_argument("--label-step", nargs=2, default=None, metavar=("ROW", "L"),
                   help="(internal) measure one step of ROW at L labels in this process and print its JSON")
    args = p.parse_args(argv)
    if args.label_step:
        print(json.dumps(label_step(args.label_step[0], int(args.label_step[1]), args.batch_size or 2, args.steps,
                                    args.warmup)))
        return None
    args.models = args.models or default_models(args.backbone)
    device = config.pick_device(args.device)
    cuda = device.type == "cuda"
    amps = [ON_OFF[a] for a in (args.amp or (["off", "on"] if cuda else ["off"]))]
    compiles = [ON_OFF[c] for c in (args.compile or (["off", "on"] if cuda else ["off"]))]
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {torch.get_num_threads()} threads")
          + f", torch {torch.__version__}")
    records = []

    if "step" in args.only:
        # Every combination of the requested switches; on the CPU --amp auto is fp32 (as in train.py).
        settings = [(a, c, k) for a in amps for c in (ON_OFF[v] for v in args.channels_last) for k in compiles]
        if not cuda and any(a for a, _, _ in settings):
            print("note: train.py's --amp auto is fp32 off a GPU; measuring fp32 (--amp bf16|fp16 runs the GPU's path "
                  "on the CPU, to check it, not for speed: docs/speed.md)")
            # the set drops the duplicates that AMP's collapse made; reverse: channels_last on first, as its default
            settings = sorted({(False, c, k) for _, c, k in settings}, reverse=True)
        steps = []
        for amp, cl, comp in settings:
            for rec in bench_steps(args, device, amp, cl, comp):
                print(f"  {rec['model']:<7} {rec['precision']:<8} channels_last={cl!s:<5} compile={comp!s:<5} "
                      f"{rec['step_ms']:8.1f} ms/step {rec['img_per_s']:8.1f} img/s", flush=True)
                steps.append(rec)
        # "vs linear": each model's step over the linear head's at the same settings, i.e. what the head costs
        # on top of the bare backbone (the speed targets in docs/speed.md are read off this column).
        base = {(r["precision"], r["channels_last"], r["compile"]): r["step_ms"] for r in steps if r["model"] == "linear"}
        for r in steps:
            r["vs_linear"] = r["step_ms"] / base.get((r["precision"], r["channels_last"], r["compile"]), float("nan"))
        r0 = steps[0]
        print(f"\nstep: {r0['backbone']}, {r0['image_size']} px, L = {r0['labels']}, batch {r0['batch_size']}, {device}\n")
        print(table(steps, [("model", "model", ""), ("precision", "precision", ""), ("channels_last", "channels_last", ""),
                            ("compile", "compile", ""), ("step ms", "step_ms", ".1f"), ("img/s", "img_per_s", ".1f"),
                            ("vs linear", "vs_linear", ".2f"), ("params (M)", "params_m", ".2f"),
                            ("peak GB", "peak_mem_gb", ".1f")]))
        records += steps

    if "experts" in args.only:
        ex = [bench_experts(device, L, args) for L in args.expert_labels]
        print("\nexperts: forward + backward, B = 32, D = H = 256, S = 2, T = 1\n")
        print(table(ex, [("L", "labels", "d"), ("batched ms", "batched_ms", ".2f"), ("loop ms", "loop_ms", ".2f"),
                         ("speed-up", "speedup", ".1f")]))
        records += ex

    if "moe" in args.only:
        mo = bench_backbone_moe(args, device)
        r0 = mo[0]
        print(f"\nmoe: linear head on {r0['backbone']}, {r0['image_size']} px, batch {r0['batch_size']}, fp32, {device}\n")
        print(table(mo, [("backbone", "variant", ""), ("step ms", "step_ms", ".1f"), ("img/s", "img_per_s", ".1f"),
                         ("vs dense", "vs_dense", ".2f"), ("params (M)", "params_m", ".2f"),
                         ("activated GFLOPs/img", "gflops", ".3f")]))
        records += mo

    if "memory" in args.only:
        me = bench_memory(args)
        print(f"\nmemory: peak after 1 and 4 epochs of train.py --backbone vit_tiny --limit 256 ({device})\n")
        print(table(me, [("backbone", "variant", ""), ("epoch 1 MB", "epoch1_mb", ".0f"), ("epoch 4 MB", "epoch4_mb", ".0f"),
                         ("growth", "growth", ".1%")]))
        records += me

    if "loader" in args.only:
        with tempfile.TemporaryDirectory() as folder:
            ds = loader_dataset(args, folder, args.loader_size)
            ld = [bench_loader(ds, w, 32) for w in args.workers]
        print(f"\nloader: {len(ds)} images at {args.loader_size} px, training transform, batch 32\n")
        print(table(ld, [("workers", "workers", "d"), ("img/s", "img_per_s", ".1f")]))
        records += ld

    if "labels" in args.only:
        print(f"\nlabels: every head as L grows, coco preset (ResNet-101, 448 px; mlvpt: ViT-B/16), one step on this CPU\n")
        la = bench_labels(args)
        print("\n" + label_table(la))
        records += la

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2)
        print(f"\nwrote {args.json}")
    return records


if __name__ == "__main__":
    # main() returns its records, for a caller in Python; as a script, a non-empty list `and 0` exits with 0.
    sys.exit(main() and 0)
