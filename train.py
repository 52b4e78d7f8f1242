"""
Train DR-MoE (or a variant of its gate, or any model zoo.py names) for multi-label classification, top to bottom
in one file.

    python train.py                                   # embedded synthetic benchmark, CPU-sized, a few minutes
    python train.py --gate label                      # a gate that reads only the label's feature
    python train.py --shared-experts 2 --task-experts 2 --gate static
    python train.py --dataset voc --data-root ~/data  # ImageNet ResNet-101 at 448 px, the papers' setting (GPU)
    python train.py --dataset voc --data-root ~/data --download   # fetch VOC 2007 first
    python train.py --model NAME                      # another model (zoo.py lists them)
    python train.py --dataset coco --describe         # parameters and GFLOPs only, no data read
    python train.py --resume                          # continue the run in --out-dir where it stopped

The loop: AdamW + one-cycle learning rate, binary cross-entropy over the L labels (or the asymmetric loss,
--loss asl; entries marked -1 are ignored; losses.py) plus the losses the model adds (its routers' balance
losses, already weighted), gradient clipping, an exponential moving average (EMA) of the weights evaluated
beside the raw weights, mixed precision through one code path (--amp: auto is bf16 where the GPU has it, else
fp16 with a GradScaler, and fp32 on CPU; bf16 or fp16 by name on any device, the CPU included). After every epoch: validation mAP, one log line, a JSONL record with every router's
health (lib/routing.py), `last.pt` and (if better) `best.pt`, written atomically. At the end the best
checkpoint is evaluated on the test split and written to `<out-dir>/metrics.json`, and routing.png drawn.

The model and the loop meet in one contract (zoo.py): forward(x) -> (logits, info) with info["losses"]
(name -> weighted scalar: summed into the loss, logged by name) and info["routing"] (name -> routing record:
watched). What a system adds to the loop comes as hooks (zoo.loop_hooks), called by what they do: their
losses in every step, end_epoch at every epoch's end, measure on the evaluated splits. This file names no
model but DR-MoE's defaults and no system.

The equations, each next to the line that computes it:
    loss  = sum_{b,l} m[b,l] BCE(y[b,l], x[b,l]) / sum_{b,l} m[b,l],   m = 1 where y != -1 (losses.masked_bce)
            + sum of info["losses"]   (DR-MoE: --aux-loss-coef x gating.py's balance loss, Switch Transformer eq. 4)
    EMA   theta_ema <- d theta_ema + (1 - d) theta   after every step t (ema_update; Polyak averaging),
          d = ema_decay, constant, as Q2L's and timm's ModelEma (the voc/coco presets); with --ema-warmup
          (the synthetic preset's 624 steps) d = min(ema_decay, (1 + t) / (10 + t)), TensorFlow's
          ExponentialMovingAverage rule: a short memory early, while the weights move fast
    lr    one-cycle: cosine rise from lr/25 to lr over warmup_pct of the steps, then cosine annealing
          to lr/25/1e4 (torch's OneCycleLR defaults; Smith & Topin 2019)

Config: every flag is a field of ModelConfig (zoo.py: each model's and system's own fields) or TrainConfig (config.py, with
the dataset presets and the resolution order). The resolved config is printed at start and saved in every
checkpoint, so evaluate.py can rebuild the model from the checkpoint alone (zoo.load_checkpoint_model).

Reading order: main() at the bottom tells the run top to bottom, data, model, optimiser, the epochs, the test;
each step it calls is a function just above it, in the order it calls them; the pieces of one step
(the loss, the EMA, weight decay by role, the training step) come first.
Shapes (legend in experts.py): images (B, 3, S_img, S_img), targets (B, L) in {1, 0, -1}, logits (B, L).
"""
import copy
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import zoo
from backbones import WeightsUnavailable
from config import TrainConfig, amp_dtype_for, parse_args, pick_device
from data import NUM_LABELS, DatasetError, build_dataset, download_voc, hold_out
from evaluate import predict
from lib import analysis, distributed, plots, routing
from lib.checkpoint import judged_weights, load_file, rng_state, save_checkpoint, set_rng_state
from lib.predictions import best_f1_thresholds
from lib.rundir import (best_state, code_changed, cpu_projection, existing_run, finished, peak_memory, point_latest,
                        provenance, start_log, summary)
from losses import asymmetric_loss, masked_bce
from metrics import average_precision, multilabel_metrics
from zoo import ModelConfig, build_model, flops_per_image, set_memory_format


def seed_everything(seed: int):
    """Seed every generator the run draws from (weight init, dropout, flips). The data order has its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # also seeds every CUDA device


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) are copied."""
    # One fused call over all tensors instead of a Python loop: the EMA runs every step, so it must be cheap.
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# Parameters that are not decayed, by role (Loshchilov & Hutter's AdamW decays weights; nanoGPT's
# configure_optimizers and timm's no_weight_decay exempt the rest): every bias, every normalisation layer's
# gain and shift, and what a module lists in its `no_weight_decay` (model.py: the label queries; experts.py:
# the experts' stacked biases). Gate biases are "bias" too: the static gate's whole routing is its bias,
# and decay would pull every label toward uniform routing. And, by name, the backbones' learned inputs and
# scales, which timm exempts too (its ViT's no_weight_decay: cls_token, pos_embed; its Swin's keyword
# relative_position_bias_table; its ConvNeXt's layer-scale gamma, as a 1-D tensor): torchvision's names for
# them in its ViT, ConvNeXt (layer_scale, (C, 1, 1) there) and Swin. Q2L's official code decays every
# parameter: --decay-all (some models' settings turn it on).
NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
NO_DECAY_NAMES = ("class_token", "pos_embedding", "layer_scale", "relative_position_bias_table")


def decay_roles(model: torch.nn.Module):
    """-> ({name: parameter} decayed, {name: parameter} not decayed), by what each parameter is."""
    decay, keep = {}, {}
    for module_name, module in model.named_modules():
        exempt = tuple(getattr(module, "no_weight_decay", ())) + NO_DECAY_NAMES
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:   # a frozen backbone (--freeze-backbone) is not in the optimizer at all
                continue
            full = f"{module_name}.{name}" if module_name else name
            is_kept = isinstance(module, NORMS) or name.endswith("bias") or name in exempt
            (keep if is_kept else decay)[full] = p
    return decay, keep


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on weights only (decay_roles): decaying biases, norm gains, label queries and
    gate biases toward 0 only fights what they must learn. --decay-all: on every trainable parameter."""
    decay, keep = decay_roles(model)
    if tcfg.decay_all:   # one group for every trainable parameter
        decay, keep = {**decay, **keep}, {}
    return torch.optim.AdamW([{"params": list(decay.values()), "weight_decay": tcfg.weight_decay},
                              {"params": list(keep.values()), "weight_decay": 0.0}], lr=tcfg.lr,
                             fused=device.type == "cuda")   # fused: one kernel for all tensors on CUDA


def classification_loss(outputs, y: torch.Tensor, tcfg: TrainConfig) -> torch.Tensor:
    """The loss on the logits, or summed over the outputs a model lists in info["loss_logits"] (zoo.py)."""
    if tcfg.loss == "asl":
        return sum(asymmetric_loss(out, y, tcfg.asl_gamma_neg, tcfg.asl_gamma_pos, tcfg.asl_clip, tcfg.asl_eps,
                                   tcfg.asl_detach_focusing) for out in outputs)
    return sum(masked_bce(out, y) for out in outputs)


def train_step(run, x, y, tcfg: TrainConfig, step: int):
    """One optimisation step on one batch -> (the classification loss, {name: every other loss, weighted}, the
    forward's info), all still on the device.

    run.step_model is what runs forward (maybe compiled, maybe DDP-wrapped); run.model is the raw module whose
    parameters are clipped and averaged into the EMA. studies/bench.py times exactly this function.
    """
    # Mixed precision for the forward pass only; the gate's softmax and the loss run in fp32 inside.
    with torch.autocast(x.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits, info = run.step_model(x)
        loss_cls = classification_loss(info.get("loss_logits", [logits]), y, tcfg)
        # The model's own losses (its routers' balance losses), then what the hooks add: each already weighted.
        losses = dict(info["losses"])
        for hook in run.hooks:
            losses.update(hook.losses(info))
        loss = loss_cls
        for value in losses.values():
            loss = loss + value
    run.optimizer.zero_grad(set_to_none=True)   # None, not zeros: no memset, and the first accumulation is a copy
    run.scaler.scale(loss).backward()   # under DDP, backward also averages the gradients over the ranks
    if tcfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)   # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_decay_at(tcfg, step))
    return loss_cls, losses, info


def ema_decay_at(tcfg: TrainConfig, step: int) -> float:
    """The EMA decay d used after step `step` (0-based).

    Q2L's ModelEma (and timm's ModelEmaV2) keep d constant: the voc/coco presets. --ema-warmup (the synthetic
    preset's 624 steps) uses TensorFlow's ExponentialMovingAverage num_updates rule instead,
    d = min(ema_decay, (1 + t) / (10 + t)): early weights are noise, forget them fast. With it, 0.9997 would
    be reached only at step 29,990, far beyond the voc preset's 6,240 steps; hence off there.
    """
    return min(tcfg.ema_decay, (1 + step) / (10 + step)) if tcfg.ema_warmup else tcfg.ema_decay


def fit_ema(tcfg: TrainConfig, steps: int, say):
    """A constant EMA decay d averages over about 1/(1 - d) steps. The photo presets' 0.9997 (Q2L's) is a
    3,333-step memory, which a short run on a small dataset never leaves: a run of a few hundred steps keeps
    most of the initial weights in the average, and its EMA scores far below the raw weights. So on a dataset
    of files the memory is capped at a tenth of the run, d <= 1 - 10 / steps (this project's rule; Q2L's COCO
    recipe, 80 epochs of 641 steps, sits at about a fifteenth). The warm-up rule (--ema-warmup, the synthetic
    preset) and runs long enough are left as they are."""
    cap = 1 - 10 / steps
    if tcfg.ema_decay and not tcfg.ema_warmup and tcfg.ema_decay > cap:
        say(f"note: --ema-decay {tcfg.ema_decay:g} averages over ~{1 / (1 - tcfg.ema_decay):.0f} steps, more than a "
            f"tenth of this run's {steps}: {max(cap, 0.0):.4f} instead (train.fit_ema)")
        tcfg.ema_decay = max(cap, 0.0)


class Diverged(RuntimeError):
    """The loss became NaN or inf: training stops at once (last.pt keeps the last finished epoch)."""


def diverged_message(watch, epoch: int, tcfg: TrainConfig) -> str:
    """One line: where it happened, the loss parts, what is on disk, and what to try."""
    step, loss, other = watch
    kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written (it diverged in epoch 1)"
    where = f"at step {int(step)}" if step >= 0 else "in the weights (validation scores)"
    return (f"the loss became non-finite {where} (epoch {epoch + 1}): classification loss {loss}, other losses {other}; "
            f"{kept} in {tcfg.out_dir}; start a new run (another --out-dir: --resume keeps the old settings) "
            f"with a lower --lr (now {tcfg.lr:g}), --no-amp, or --grad-clip 1 (now {tcfg.grad_clip:g})")


def describe_only(tcfg: TrainConfig, mcfg: ModelConfig):
    """--describe: the model as it would train on this dataset, its size and cost; reads no data."""
    # Your own data: L is the number of classes its files name (read, not generated: cheap).
    mcfg.num_labels = NUM_LABELS.get(tcfg.dataset) or len(build_dataset(tcfg.dataset, tcfg.train_split, tcfg.data_root,
                                                                        limit=1).classes)
    mcfg.image_size = tcfg.image_size
    if mcfg.weights.lower() != "none":
        print(f"(--describe builds with random weights: same size as --weights {mcfg.weights}, no download)")
        mcfg.weights = "none"
    print("model config:", json.dumps(asdict(mcfg)))
    try:
        # On the meta device: sizes and FLOPs with no weight allocated or initialised (ResNet-101 at 448 px in
        # about a second). A layer whose work depends on the data (sparse experts' dispatch) cannot run there:
        # that model is built for real.
        with torch.device("meta"):
            model = build_model(mcfg, verbose=False)
            gflops = flops_per_image(model, tcfg.image_size, device="meta") / 1e9
    except (NotImplementedError, RuntimeError):
        model = build_model(mcfg, verbose=False)
        gflops = flops_per_image(model, tcfg.image_size) / 1e9
    print(zoo.describe(model, mcfg))
    sparse = (" (activated: a sparse layer runs k of its N experts per token)"
              if zoo.activated_parameters(model) < sum(p.numel() for p in model.parameters()) else "")
    print(f"{gflops:.2f} GFLOPs per image at {tcfg.image_size} px ({mcfg.num_labels} labels){sparse}")
    return model, gflops


# ---------------------------------------------------------------------------------------------------------
# The named steps of main(), in the order it calls them


def resume_configs(tcfg: TrainConfig, given: set, say):
    """--resume: the run that was started, continued -> (its TrainConfig, its ModelConfig, the checkpoint).

    Its configs come from the checkpoint. Only where it runs (device, workers) and where it writes may change,
    and the worker count only when given: the augmentations are drawn from the workers' seeds, so another
    count continues the run but not bit for bit. Every rank reads the file: on several nodes OUT_DIR must be
    on a shared filesystem.
    """
    path = os.path.join(tcfg.out_dir, "last.pt") if tcfg.resume == "auto" else tcfg.resume
    ckpt = load_file(path)
    keep = {k: getattr(tcfg, k) for k in ("device", "num_workers", "out_dir", "resume")
            if k != "num_workers" or k in given}
    planned = ckpt["train_config"]["epochs"]
    if "epochs" in given and tcfg.epochs != planned:
        # The one-cycle schedule was laid out for the planned steps and ends with lr near 0: more epochs
        # would be a second schedule glued on, not this run continued. A usage error, one line.
        print(f"error: --epochs {tcfg.epochs} with --resume: {path} was planned as {planned} epochs of one "
              f"one-cycle schedule, whose learning rate ends near 0, so it cannot be extended; train a new run "
              f"with --epochs {tcfg.epochs} (its own folder) instead", file=sys.stderr)
        sys.exit(2)
    # A checkpoint older than a field carries no value for it: continue it as the code that wrote it
    # trained (ASL's gradient through the focusing weights, EMA warm-up always on), not with today's
    # defaults. Later fields keep their defaults, which are what the older code did.
    # Fields an older checkpoint kept with the training config and the model config holds now (the routers'
    # loss weights) move over (zoo.model_config); fields of neither are dropped.
    legacy = {"asl_detach_focusing": False, "ema_warmup": True}
    known = set(TrainConfig.__dataclass_fields__)
    tcfg = TrainConfig(**{k: v for k, v in {**legacy, **ckpt["train_config"], **keep}.items() if k in known})
    mcfg = zoo.model_config(ckpt["model_config"], ckpt["train_config"])
    say(f"resuming from {path}: epoch {ckpt['epoch'] + 1} of {tcfg.epochs} done, best val mAP {ckpt['best_map']:.2f}"
        + (" (its epochs are done: best.pt is tested)" if ckpt["epoch"] + 1 >= tcfg.epochs else ""))
    ignored = given - set(keep) - {"dataset"}
    if ignored:
        say(f"  note: ignoring {sorted(ignored)} on resume (the checkpoint's config wins)")
    return tcfg, mcfg, ckpt


def pick_runtime(tcfg: TrainConfig, ddp_device, world: int, say):
    """-> (device, the autocast dtype or None for fp32, whether to torch.compile), with the fast settings
    that are safe on a GPU switched on."""
    device = ddp_device or pick_device(tcfg.device)
    amp_dtype = amp_dtype_for(device, tcfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed input size: let cuDNN pick the fastest kernels once
        # TF32 for what runs in fp32 (the gate's softmax, the loss, --no-amp runs): about 3x the fp32 matmul
        # throughput on Ampere and later, with a 10-bit mantissa that fp32 training tolerates (PyTorch's docs).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_compile = tcfg.compile and device.type == "cuda" and sys.platform != "win32"
    if tcfg.compile and not use_compile:
        # torch.compile needs Triton for its GPU kernels (CUDA, Linux). On the CPU, Inductor compiles C++
        # for minutes before the first step, which short CPU runs never win back (studies/bench.py --compile on
        # measures it); on MPS its support is partial. The flag is ignored there rather than half-working.
        say(f"note: --compile is used on CUDA under Linux only; ignored on {device.type} ({sys.platform})")
    say(f"device: {device}" + (f" x {world} processes" if world > 1 else "") + f", precision: {precision(amp_dtype)}"
        + (f" (--amp {tcfg.amp} on the {device.type}: checks the GPU's mixed-precision path, not faster)"
           if amp_dtype is not None and device.type != "cuda" else ""))
    return device, amp_dtype, use_compile


def precision(amp_dtype) -> str:
    """"bfloat16", "float16" or "float32": what the forward pass runs in (metrics.json, the start line)."""
    return str(amp_dtype or torch.float32).replace("torch.", "")


def build_data(tcfg: TrainConfig, main_proc: bool):
    """Every split read and checked before any model work -> ({"train", "val", "test": dataset}, the training
    labels as read, difficult ones still -1). A missing or incomplete dataset stops the run here with one
    message, never deep inside a DataLoader worker."""
    if tcfg.download:
        if tcfg.dataset != "voc":
            raise DatasetError("--download fetches VOC 2007 only; for COCO see the README's commands")
        if main_proc:
            download_voc(tcfg.data_root or "data")
        distributed.barrier()   # the other ranks read the files rank 0 fetched
        tcfg.data_root = tcfg.data_root or "data"
    roles = {"train": tcfg.train_split, "val": tcfg.val_split, "test": tcfg.test_split}
    read = lambda s, augment: build_dataset(tcfg.dataset, s, tcfg.data_root, tcfg.image_size, augment=augment,
                                            limit=tcfg.limit, randaugment=tcfg.randaugment, cutout=tcfg.cutout,
                                            empty=tcfg.empty_images, hflip=tcfg.hflip, size=getattr(tcfg, f"{s}_images", None))
    # Each split read once (val and test may be one); --val-split holdout is carved out of the training split.
    split_ds = {s: read(s, s == roles["train"]) for s in dict.fromkeys(roles.values()) if s != "holdout"}
    ds = {role: split_ds.get(s) for role, s in roles.items()}
    for s, d in split_ds.items():   # photos: every file's header, now, not a worker's error mid-run
        if hasattr(d, "check_readable"):
            d.check_readable(s)
    if roles["val"] == "holdout":   # 10 % of the training images choose the best epoch; the rest trains
        source = getattr(ds["train"], "source", roles["train"])
        ds["train"], ds["val"] = hold_out(ds["train"], read(roles["train"], False))
        ds["train"].source, ds["val"].source = f"{source} less its held-out 10 %", f"10 % held out of {source}"
    if main_proc:   # where each split comes from: a file, a part of one, a folder (data.build_dataset says)
        print("splits: " + ", ".join(f"{role} = {getattr(ds[role], 'source', s)} ({len(ds[role])} images)"
                                     for role, s in roles.items()))
        if roles["val"] == roles["test"]:   # said where it happens: the papers' protocol, not a held-out one
            print(f"note: the best epoch and the per-label thresholds are chosen on the test split ({roles['test']}), "
                  "as the papers in this line do; --val-split holdout chooses them on 10 % of the training split")
    # VOC marks "difficult" objects 0 in its files, -1 in `targets` (ignored by every metric). Training
    # counts them as present by default, as the papers' code does; --difficult ignore drops them from the loss.
    labels = ds["train"].targets.clone()   # what a model prepares from (zoo.prepare): clear positives only
    if tcfg.difficult == "positive":
        ds["train"].targets[ds["train"].targets == -1] = 1.0
    return ds, labels


def make_loaders(ds: dict, tcfg: TrainConfig, world: int, device, order: torch.Generator):
    """-> (the training loader, {"val", "test": evaluation loader}).

    The shuffling generator `order` is re-seeded with (seed, epoch) each epoch (main), so a resumed run sees
    the same data order as an uninterrupted one; it also seeds the workers' augmentation RNGs. Under torchrun
    the DistributedSampler shuffles instead (same seed on every rank, so the shards partition the epoch).
    No loader's workers are persistent: a persistent loader draws its workers' base seed (from `order`, or
    from the global RNG for the evaluation loaders) at its first pass only, so the first epoch after --resume
    would draw once more than the same epoch of an uninterrupted run, and the data order, the augmentations
    or the dropout that follows would differ. Starting workers afresh costs about a second (fork) per pass.
    """
    kw = dict(batch_size=tcfg.batch_size // world, num_workers=tcfg.num_workers, pin_memory=device.type == "cuda")
    train_sampler = distributed.sampler(ds["train"], True, tcfg.seed)
    train_loader = torch.utils.data.DataLoader(ds["train"], shuffle=train_sampler is None, sampler=train_sampler,
                                               drop_last=True, generator=order, **kw)
    evals = {s: torch.utils.data.DataLoader(ds[s], shuffle=False, sampler=distributed.sampler(ds[s], False, tcfg.seed), **kw)
             for s in ("val", "test")}
    return train_loader, evals


def build_run_model(tcfg: TrainConfig, mcfg: ModelConfig, ds: dict, labels, device, world: int, main_proc: bool, say):
    """The model as this run trains it -> (the raw module on the device, its memory format, GFLOPs per image):
    built (zoo.py), prepared from the training labels (a label graph or label groups, zoo.prepare), laid out
    for fast convolutions, measured."""
    # --init-seed draws the initial weights from a stream of their own (fork_rng restores the global one
    # afterwards), so that the weights and the rest of the run's randomness (data order, flips, dropout: all
    # from --seed) can be varied one at a time (results/noise/). Without it, one seed drives everything.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=tcfg.init_seed is not None):
        if tcfg.init_seed is not None:
            torch.manual_seed(tcfg.init_seed)
        model = build_model(mcfg, verbose=main_proc, classes=ds["train"].classes).to(device)
    zoo.prepare(model, labels, ds["train"].classes, seed=tcfg.seed, verbose=main_proc)
    if tcfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # same state_dict keys as BatchNorm
    # channels_last (NHWC) is the layout oneDNN and cuDNN convolutions run fastest on; the transformer
    # part does not care. Inputs are converted to the same layout in the loop.
    fmt = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    set_memory_format(model, fmt)
    gflops = flops_per_image(model, tcfg.image_size, device) / 1e9
    say(f"{gflops:.2f} GFLOPs per image at {tcfg.image_size} px")
    return model, fmt, gflops


def restore(ckpt: dict, run, say):
    """Everything that shapes the rest of the run, RNG states included, so that the resumed run is the
    uninterrupted one (tests/test_train.py checks it bit for bit) -> (first epoch, best val mAP, step)."""
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    for hook in run.hooks:   # what a hook carries from epoch to epoch
        hook.load(ckpt, run.device)
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]   # one per rank
    if len(states) == run.world:
        set_rng_state(states[run.rank], run.device)
    else:
        say(f"  note: the checkpoint was written by {len(states)} processes, this run has {run.world}: "
            "random streams restart (the run continues, but not bit for bit)")
    return ckpt["epoch"] + 1, ckpt["best_map"], ckpt["step"]


class Run:
    """What every step of the run works with, in one place: the model (raw, and as the step runs it), its EMA,
    the optimiser, schedule and loss scaler, the hooks, where it runs, the precision, the layout, the ranks."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def train_epoch(run, loader, tcfg: TrainConfig, epoch: int, step: int, project=None) -> dict:
    """One pass over the training split -> the epoch's record: each loss's mean, speed, the step reached and
    every router's health (lib/routing.py). project(seconds per step), when given, is called once, after the
    epoch's first steps (the CPU projection)."""
    sums = {}   # running sum of each loss on the device: "classification", then the others by name
    watch = routing.Watch()   # every router's records, added up
    t0, n_seen, wait = time.time(), 0, 0.0
    # One progress bar, rank 0's, and only on a terminal (disable=None): redirected to a file, a run writes
    # its epoch lines and no bar redraws. The divergence watch: (step, classification loss, other losses) of
    # the first non-finite step, -1 = none. Kept on the device and read at the log points (and every step off
    # CUDA, where reading is free), so a GPU is not stalled each step; the run stops before this epoch's log
    # line and last.pt.
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tcfg.epochs}", leave=False, dynamic_ncols=True,
               disable=None if run.rank == 0 else True)
    diverged = torch.full((3,), -1.0, device=run.device)
    t_ready = time.time()
    for i, (x, y) in enumerate(bar):
        wait += time.time() - t_ready   # time spent waiting for data, to tell a slow loader from a slow model
        x = x.to(run.device, non_blocking=True, memory_format=run.fmt)
        y = y.to(run.device, non_blocking=True)
        step += 1
        loss_cls, losses, info = train_step(run, x, y, tcfg, step)
        run.scheduler.step()
        # The log: accumulate on the device; reading a value (.item()) every step would stall a GPU.
        for name, value in {"classification": loss_cls, **losses}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        watch.add(info["routing"])
        # The watch: a non-finite loss stops the run (every rank together under torchrun, else the others
        # would wait in the next all-reduce).
        parts = torch.stack([loss_cls.detach().float(), sum(v.detach().float() for v in losses.values())
                             if losses else loss_cls.new_zeros((), dtype=torch.float32)])
        fresh = ~torch.isfinite(parts).all() & (diverged[0] < 0)
        diverged = torch.where(fresh, torch.cat([parts.new_tensor([step]), parts]), diverged)
        if run.world > 1:
            stop = (i % 10 == 0 or i + 1 == len(loader)) and distributed.all_sum((diverged[0] >= 0).float()) > 0
        else:
            stop = (run.device.type != "cuda" or i % 10 == 0 or i + 1 == len(loader)) and diverged[0].item() >= 0
        if stop:
            raise Diverged(diverged_message(diverged.tolist(), epoch, tcfg))
        n_seen += x.shape[0] * run.world
        if i % 10 == 0 and run.rank == 0:   # .item() syncs with the GPU: only at log points
            bar.set_postfix(loss=f"{loss_cls.item():.4f}", img_s=f"{n_seen / (time.time() - t0):.0f}")
        timed = min(4, len(loader) - 1)   # steps 2-5 (the first pays one-off costs), or as many as there are
        if project is not None and i == timed > 0:
            project((time.time() - t_first) / timed)
        if i == 0:
            t_first = time.time()
        t_ready = time.time()
    train_time = time.time() - t0
    # Means over every step of every rank (the sums are reduced once per epoch, not per step).
    steps = len(loader) * run.world
    means = {name: (distributed.all_sum(torch.as_tensor(v, device=run.device).float()) / steps).item()
             for name, v in sums.items()}
    # What hooks add at the epoch's end (a partition, say) is watched like any router.
    for hook in run.hooks:
        watch.add(hook.end_epoch(epoch, distributed.all_gather_objects))
    routers, warnings = watch.health(tcfg.collapse_threshold, tcfg.dead_share, distributed.all_sum)
    return {"step": step, "train_loss": means.pop("classification"), "losses": means, "img_per_s": n_seen / train_time,
            "data_wait_s": wait, "compute_s": train_time - wait, "train_s": train_time, "routers": routers,
            "warnings": warnings}


def validate(run, loader, dataset, tcfg: TrainConfig, epoch: int, ep: dict):
    """-> ({"raw": val mAP, "ema": val mAP}, what the hooks measure on the raw weights' predictions). The better
    of raw and EMA is what "best" means (Q2L reports its EMA numbers)."""
    distributed.sync_buffers(run.model)   # one set of BatchNorm statistics (rank 0's) on every rank
    measured = {}

    def val_map(net):
        pred = predict(net, loader, run.device, run.amp_dtype, run.fmt)
        if not np.isfinite(pred["scores"]).all():   # the epoch's last update made the weights NaN: no loss saw it
            raise Diverged(diverged_message([-1, ep["train_loss"], sum(ep["losses"].values())], epoch, tcfg))
        if net is run.model:
            for hook in run.hooks:
                measured.update(hook.measure(pred, dataset, every_epoch=True))
        return multilabel_metrics(pred["scores"], pred["targets"])["mAP"]
    val_maps = {"raw": val_map(run.model)}
    if run.ema is not None:
        distributed.sync_buffers(run.ema)
        val_maps["ema"] = val_map(run.ema)
    return val_maps, measured


def epoch_line(epoch: int, tcfg: TrainConfig, ep: dict, lr: float, val_maps: dict, improved: bool, measured) -> str:
    """The one line an epoch prints (docs/training.md, 'Reading the numbers')."""
    return (f"epoch {epoch + 1:3d}/{tcfg.epochs} | loss {ep['train_loss']:.4f} | "
            + "".join(f"{name} {v:.4f} | " for name, v in ep["losses"].items()) + f"lr {lr:.2e} | "
            f"{ep['img_per_s']:.0f} img/s (data wait {100 * ep['data_wait_s'] / ep['train_s']:.0f}%) | val mAP "
            + " ".join(f"{k} {v:.2f}" for k, v in val_maps.items()) + (" *" if improved else "")
            + (" | " + routing.summary(ep["routers"]) if ep["routers"] else "")
            + (f" | routing NMI {measured['routing']['nmi']:.3f}" if "nmi" in measured.get("routing", {}) else ""))


def final_test(run, tcfg: TrainConfig, mcfg: ModelConfig, ds: dict, loaders: dict, gflops: float, run_start: float) -> dict:
    """The best checkpoint's judged weights, scored once on the test split -> metrics (also metrics.json, with
    the per-image scores in test_scores.npz). First the per-label F1 thresholds on the split that chose the
    epoch (lib/predictions.py; the test split itself on the voc/coco presets, as the papers), saved in best.pt
    for evaluate.py --thresholds best. Then routing.png, every router's load over the epochs."""
    model, main_proc = run.model, run.rank == 0
    best = load_file(os.path.join(tcfg.out_dir, "best.pt"))
    model.load_state_dict(judged_weights(best))
    val = predict(model, loaders["val"], run.device, run.amp_dtype, run.fmt)
    best["thresholds"] = best_f1_thresholds(val["scores"], val["targets"]).tolist()
    if main_proc:
        save_checkpoint(os.path.join(tcfg.out_dir, "best.pt"), best)
    test = predict(model, loaders["test"], run.device, run.amp_dtype, run.fmt)
    scores, targets = test["scores"], test["targets"]
    metrics = multilabel_metrics(scores, targets)
    for hook in run.hooks:   # what a hook measures on the test split (the routing's structure, say)
        metrics.update(hook.measure(test, ds["test"], every_epoch=False))
    # Each label's AP (which labels carry the seed noise, results/noise/) and the test scores themselves:
    # the paired bootstrap of the study tables (studies/tables.py) resamples the images of two runs together.
    ap = average_precision(scores, targets) * 100
    metrics.update({"AP": {c: (None if np.isnan(a) else float(a)) for c, a in zip(ds["test"].classes, ap)},
                    "checkpoint": "best.pt", "epoch": best["epoch"] + 1,
                    "weights": best["eval_weights"], "val_mAP": best["best_map"], "gflops": gflops,
                    "parameters": sum(p.numel() for p in model.parameters()), "model": mcfg.model,
                    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "activated_parameters": zoo.activated_parameters(model), **peak_memory(run.device),
                    "best_epoch_chosen_on": tcfg.val_split, "chosen_on_test_split": tcfg.val_split == tcfg.test_split,
                    "split": tcfg.test_split, "world_size": run.world, "precision": precision(run.amp_dtype),
                    "train_minutes_this_session": (time.time() - run_start) / 60,
                    # what the run was, in full: a table built from metrics.json files shows each row's recipe,
                    # and the code and machine that made it (lib/rundir.provenance)
                    "train_config": asdict(tcfg), "model_config": asdict(mcfg), **provenance()})
    if main_proc:
        np.savez_compressed(os.path.join(tcfg.out_dir, "test_scores.npz"), scores=np.asarray(scores, np.float32),
                            targets=np.asarray(targets, np.int8), ids=np.asarray(ds["test"].ids))
        with open(os.path.join(tcfg.out_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        log = os.path.join(tcfg.out_dir, "log.jsonl")
        title = f"{mcfg.model} on {tcfg.dataset}, seed {tcfg.seed}: {tcfg.out_dir}"
        plots.curves(os.path.join(tcfg.out_dir, "curves.png"), analysis.read_log(log), tcfg.collapse_threshold, title)
        routers = analysis.read_routers(log)
        if routers:
            plots.routing(os.path.join(tcfg.out_dir, "routing.png"), routers, tcfg.collapse_threshold, title)
    return metrics


def train_epochs(run, tcfg, mcfg, ds, train_loader, eval_loaders, order, given, start_epoch, best_map, step,
                 log_path, code, say):
    """The epochs of main(): train, validate on val, log, checkpoint (last.pt every epoch, best.pt when better)."""
    model, ema, device, world, rank, main_proc = run.model, run.ema, run.device, run.world, run.rank, run.rank == 0
    step_model, optimizer, scheduler, scaler, hooks = run.step_model, run.optimizer, run.scheduler, run.scaler, run.hooks
    for epoch in range(start_epoch, tcfg.epochs):
        step_model.train()
        if mcfg.freeze_backbone:
            model.backbone.eval()   # frozen means frozen: no BatchNorm statistics or dropout in it either
        order.manual_seed((tcfg.seed * 1000 + epoch) * world + rank)
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)   # a new shuffle (the same on every rank) each epoch
        project = None   # off a GPU, on photos: the minutes an epoch will take, from the first steps
        if device.type == "cpu" and not tcfg.dataset.startswith("synthetic") and main_proc and epoch == start_epoch:
            project = lambda s: tqdm.write(cpu_projection(tcfg, given, s, len(train_loader), len(ds["val"])))
        ep = train_epoch(run, train_loader, tcfg, epoch, step, project)
        step = ep.pop("step")
        val_maps, measured = validate(run, eval_loaders["val"], ds["val"], tcfg, epoch, ep)
        which = max(val_maps, key=val_maps.get)   # raw or EMA: the better one is what this epoch is judged by
        improved = val_maps[which] > best_map
        best_map = max(best_map, val_maps[which])
        lr = scheduler.get_last_lr()[0]
        say(epoch_line(epoch, tcfg, ep, lr, val_maps, improved, measured))
        for warning in ep.pop("warnings"):
            say("  warning: " + warning)
        # Every rank's random streams go into the checkpoint (a collective step, so all ranks take it).
        rng = distributed.all_gather_objects(rng_state(device))
        if main_proc:
            record = {"epoch": epoch + 1, "step": step, "lr": lr, "world_size": world, "val_mAP": val_maps,
                      "time": time.time(), **peak_memory(device), **ep, **measured}
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            # Everything needed to resume, evaluate or rebuild: the raw module's weights (never a compiled or
            # DDP wrapper's, whose keys differ), both configs, and which weights ("raw" or "ema") were judged best.
            state = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "eval_weights": which, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_map": best_map,
                     "val_map": val_maps, "model_config": asdict(mcfg), "train_config": asdict(tcfg),
                     "classes": list(ds["train"].classes), "world_size": world, "rng": rng,
                     "hooks": {hook.name: hook.state_dict() for hook in hooks}, "code": code}
            # last.pt every epoch (what --resume reads), best.pt when validation improved (what is tested and
            # fine-tuned from: the judged weights alone, best_state).
            save_checkpoint(os.path.join(tcfg.out_dir, "last.pt"), state)
            if improved:
                save_checkpoint(os.path.join(tcfg.out_dir, "best.pt"), best_state(state))
        distributed.barrier()   # best.pt is on disk before any rank may read it


def one_line(e: Exception) -> str:
    """A setup error's message in one line. Raised inside a DataLoader worker (a corrupt image), it arrives
    wrapped in the worker's traceback, whose last line reads "lib.owndata.DatasetError: ...": that line, without
    the internal class name."""
    msg = str(e).strip()
    return re.sub(r"^[\w.]+(Error|Unavailable): ", "", msg.splitlines()[-1]) if "Original Traceback" in msg else msg


class Interrupted(RuntimeError):
    """Ctrl-C during the epochs: the message says what is on disk and what to run next."""


def interrupted_message(tcfg: TrainConfig, made: bool) -> str:
    """What an interrupted run leaves and what to run. With no epoch finished nothing is worth keeping: the
    files this start wrote go, and the folder too if this start made it, so the same command starts afresh."""
    last = os.path.join(tcfg.out_dir, "last.pt")
    if os.path.isfile(last):   # the epoch it holds (the log may be one ahead: a kill between the two writes)
        return (f"interrupted: {last} holds epoch {load_file(last)['epoch'] + 1} of {tcfg.epochs}; rerun the same "
                "command with --resume to continue from there")
    if made and distributed.is_main():
        for f in ("log.jsonl", "config.json"):
            if os.path.isfile(os.path.join(tcfg.out_dir, f)):
                os.remove(os.path.join(tcfg.out_dir, f))
        if not os.listdir(tcfg.out_dir):
            os.rmdir(tcfg.out_dir)
    return "interrupted before any epoch finished: nothing was kept; rerun the same command"


# ---------------------------------------------------------------------------------------------------------
# The run, top to bottom


def main(argv=None):
    tcfg, mcfg, given = parse_args(argv)
    if "describe" in given:
        return describe_only(tcfg, mcfg)
    # Under torchrun: one process per GPU (or CPU slot); only rank 0 talks (lib/distributed.py). Plain python: rank 0 of 1.
    rank, world, ddp_device = distributed.setup(tcfg.device)
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    # A folder holds one run: a finished one is never trained over (nor re-tested), an unfinished one only resumed.
    found = existing_run(tcfg.out_dir)
    if found == "unfinished" and not tcfg.resume:
        sys.exit(f"error: {tcfg.out_dir} holds an unfinished run (its last.pt); nothing was changed: continue it with "
                 "the same command and --resume, or start another with --out-dir NEW_FOLDER")
    ckpt, code = None, provenance()   # code: the commit and a hash of the source this run runs
    if tcfg.resume:   # a resumed run is the run that was started: its configs come from its checkpoint
        tcfg, mcfg, ckpt = resume_configs(tcfg, given, say if found != "finished" else (lambda *a, **k: None))
    elif found == "finished" and code_changed(tcfg.out_dir, code["source_hash"]):
        # The same command after the code changed is a new run, in a folder of its own: the finished one stays.
        old, tcfg.out_dir = tcfg.out_dir, f"{tcfg.out_dir}-code{code['source_hash'][:6]}"
        say(f"the code changed since {old} was trained (source {code_changed(old, code['source_hash'])[:6]} -> "
            f"{code['source_hash'][:6]}): a new run, in {tcfg.out_dir}; the finished one is left as it is")
        found = existing_run(tcfg.out_dir)
    if found == "finished":
        return finished(tcfg.out_dir, say)
    if tcfg.batch_size % world:   # a usage error: one line, no traceback
        sys.exit(f"error: --batch-size {tcfg.batch_size} (the global batch) must divide evenly over {world} processes")
    # Per-rank seeds: dropout and flips differ between ranks (else every rank would augment alike). The
    # weights still start equal everywhere, because DDP copies rank 0's to all ranks when it wraps the model.
    seed_everything(tcfg.seed + rank)

    # ---- data: every split read and checked (a missing file is the first thing said), then the loaders
    ds, labels = build_data(tcfg, main_proc)
    device, amp_dtype, use_compile = pick_runtime(tcfg, ddp_device, world, say)
    mcfg.num_labels = len(ds["train"].classes)   # L comes from the data, so one config serves any dataset
    mcfg.image_size = tcfg.image_size   # a ViT's position embeddings are made for this grid (backbones.py)
    zoo.resolve(mcfg, labels, say)   # fields a system fixes from the training labels (a number of label groups)
    if mcfg.freeze_backbone and mcfg.weights.lower() == "none":
        say("  warning: --freeze-backbone with --weights none: the frozen backbone stays random. Pass --weights "
            "DEFAULT (ImageNet), or pretrain offline: python train.py --dataset synthetic-pretrain --backbone "
            f"{mcfg.backbone} --model linear, then --weights <that run>/best.pt")
    order = torch.Generator()   # the data order, re-seeded every epoch (make_loaders says why)
    train_loader, eval_loaders = make_loaders(ds, tcfg, world, device, order)
    fit_ema(tcfg, tcfg.epochs * len(train_loader), say)   # an EMA whose memory fits the run's length

    # ---- model, EMA, optimizer, schedule, loss scaler
    model, fmt, gflops = build_run_model(tcfg, mcfg, ds, labels, device, world, main_proc, say)
    hooks = zoo.loop_hooks(tcfg, mcfg, model)   # what systems add to the loop for this model (zoo.py), often none
    # `model` stays the raw module: it is what is saved, evaluated and averaged into the EMA. The step runs
    # through `step_model`, which may be compiled and wrapped in DDP (their state_dict keys differ).
    step_model = distributed.wrap(torch.compile(model) if use_compile else model, device)
    # The EMA is a second copy of the model whose weights trail the trained ones, evaluated beside them every
    # epoch. Copied after the DDP wrap, so it starts from rank 0's weights on every rank.
    ema = copy.deepcopy(model).eval().requires_grad_(False) if tcfg.ema_decay else None
    optimizer = build_optimizer(model, tcfg, device)
    # One-cycle (Smith & Topin 2019; Q2L trains with it): warm up to lr over warmup_pct of the steps,
    # then anneal to ~0. The schedule is per step, so it needs the total number of steps up front.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tcfg.lr, total_steps=tcfg.epochs * len(train_loader),
                                                    pct_start=tcfg.warmup_pct)
    # Enabled only for fp16: with bf16 or fp32 it passes everything through, so one code path serves all.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = Run(model=model, step_model=step_model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              hooks=hooks, device=device, amp_dtype=amp_dtype, fmt=fmt, rank=rank, world=world)
    start_epoch, best_map, step = 0, -1.0, 0
    if ckpt is not None:
        start_epoch, best_map, step = restore(ckpt, run, say)
    # The run folder is made only now: a start that fails (no data, no weights, a bad value) leaves none behind.
    # The resolved configs go into it (config.json); the screen gets one line.
    made = not os.path.isdir(tcfg.out_dir)
    os.makedirs(tcfg.out_dir, exist_ok=True)
    log_path = start_log(tcfg.out_dir, start_epoch, ckpt is not None, main_proc)
    if main_proc:
        with open(os.path.join(tcfg.out_dir, "config.json"), "w") as fh:
            json.dump({"train_config": asdict(tcfg), "model_config": asdict(mcfg), "code": code}, fh, indent=2)
        point_latest(tcfg.out_dir)
    say(f"run folder: {tcfg.out_dir} ({mcfg.model} on {tcfg.dataset}, seed {tcfg.seed}, {tcfg.epochs} epoch{'s' * (tcfg.epochs != 1)} of "
        f"batch {tcfg.batch_size}, lr {tcfg.lr:g}; every setting in its config.json)")

    # ---- the epochs: train, validate on val, log, checkpoint
    run_start = time.time()
    try:
        train_epochs(run, tcfg, mcfg, ds, train_loader, eval_loaders, order, given, start_epoch, best_map, step,
                     log_path, code, say)
        # ---- the test: the best checkpoint, scored once on the test split
        metrics = final_test(run, tcfg, mcfg, ds, eval_loaders, gflops, run_start)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(tcfg, made)) from None
    except DatasetError as e:   # a file that breaks mid-run (an image that cannot be read): what is kept, what to run
        done = os.path.isfile(os.path.join(tcfg.out_dir, "last.pt"))
        raise DatasetError(one_line(e) + ("; after fixing it, the same command with --resume keeps the finished "
                                          "epochs (with every epoch done, it only tests)" if done else "")) from None
    last = os.path.join(tcfg.out_dir, "last.pt")
    if main_proc and not tcfg.keep_last and os.path.isfile(last):   # a finished run needs best.pt only (--keep-last)
        os.remove(last)
    say(summary(tcfg, metrics, (time.time() - run_start) / 60))
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (WeightsUnavailable, DatasetError, FileNotFoundError) as e:
        # A setup problem the user can fix: the message, not a traceback. An error raised inside a
        # DataLoader worker (a corrupt image) arrives wrapped with the worker's traceback: keep its last line.
        sys.exit("error: " + one_line(e))
    except Diverged as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        sys.exit(f"\n{e}")
    except KeyboardInterrupt:   # before the epochs began: nothing was written
        sys.exit("\ninterrupted before any epoch finished: nothing was kept; rerun the same command")
