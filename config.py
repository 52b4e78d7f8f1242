"""
The run's configuration: what to train on, how long, with which settings, on which device.

    TrainConfig            every training setting, one dataclass field each (ModelConfig, in zoo.py, holds
                           the model's); each field carries its --help text
    PRESETS                the few settings that differ between datasets: the CPU-sized synthetic benchmark
                           and the papers' GPU setting for VOC 2007 and COCO 2014
    parse_args             argv -> (TrainConfig, ModelConfig): one --flag per field of both dataclasses
    pick_device            cuda, then mps, then cpu
    amp_dtype_for          --amp -> the autocast dtype: auto is bf16 where the GPU has it, else fp16, and fp32 on
                           CPU/MPS; bf16 and fp16 run on any device (on the CPU: to check the GPU's code path)

Resolution order, later wins: the dataclass default < the dataset's preset (PRESETS) < the model's
settings (zoo.preset: each model's file says them; some follow the backbone's channels) < what you pass. train.py prints
the resolved configs at start and saves them in every checkpoint, so evaluate.py can rebuild the model
from a checkpoint alone. Used by train.py, evaluate.py and studies/bench.py.
"""
import argparse
import hashlib
import os
import re
from dataclasses import dataclass, fields

import torch

import zoo
from backbones import backbone_channels
from gating import GATE_KINDS
from lib.flags import Parser, config_field
from losses import LOSSES
from zoo import ModelConfig

DESCRIPTION = "Train DR-MoE (or a variant of its gate, or a baseline) for multi-label image classification."


@dataclass
class TrainConfig:
    # None = "the preset decides" (PRESETS, BUDGETS below), or "not set" for data_root, limit, the split sizes,
    # init_seed, out_dir, resume. config_field's third argument is the --help section (GROUPS).
    dataset: str = config_field("synthetic", "synthetic (embedded, no download) | synthetic-pretrain (its "
                                "source task, for pretraining a backbone) | voc | coco | csv | cocojson "
                                "(your own data, docs/own-data.md)", "data")
    data_root: str = config_field(None, "folder holding the dataset (not needed for synthetic)", "data")
    download: bool = config_field(False, "voc: download VOC 2007 into --data-root first (coco: see README)", "data")
    train_split: str = config_field(None, "split to train on", "data")
    val_split: str = config_field(None, "split that picks the best epoch and the F1 thresholds (voc/coco: the test "
                                  "split, as the papers); holdout = 10 %% of the training split instead", "data")
    test_split: str = config_field(None, "split the best checkpoint is finally evaluated on", "data")
    difficult: str = config_field("positive", "VOC labels marked difficult, in training: positive (as ML-GCN) | ignore", "data")
    empty_images: str = config_field("keep", "COCO images without annotation: keep as all-negative (Q2L) | drop (ML-GCN)", "data")
    randaugment: bool = config_field(True, "photos: RandAugment in training (synthetic: flips only)", "data")
    cutout: float = config_field(None, "photos: Cutout of this fraction of each side in training, 0 = off (ASL: 0.5)", "data")
    hflip: bool = config_field(True, "photos: random horizontal flip in training (ML-GCN flips; ASL's and Q2L's code do not)", "data")
    image_size: int = config_field(None, "input side in pixels", "data")
    limit: int = config_field(None, "use only the first N images of every split (smoke tests)", "data")
    budget: str = config_field("demo", "demo (the 5-minute first run) | study (the comparisons' preset: 20 "
                               "epochs; on synthetic also 10,000 test images; config.BUDGETS)", "data")
    train_images: int = config_field(None, "synthetic: images rendered for the train split", "data")
    val_images: int = config_field(None, "synthetic: images rendered for the val split", "data")
    test_images: int = config_field(None, "synthetic: images rendered for the test split", "data")
    # Optimiser and schedule: AdamW with a one-cycle learning rate (train.py); the weight decay and the 20 %
    # warm-up are Q2L's recipe (see the presets below), kept for the synthetic benchmark too.
    epochs: int = config_field(None, "training epochs", "training")
    batch_size: int = config_field(None, "images per step, over all processes under torchrun (each takes 1/W)", "training")
    lr: float = config_field(None, "peak learning rate of the one-cycle schedule", "training")
    weight_decay: float = config_field(1e-2, "AdamW weight decay on weights only: not on biases (the gates' "
                                       "and the experts' included), norms, label queries, ML-GCN's embedding "
                                       "(train.decay_roles); --decay-all: on every parameter", "training")
    decay_all: bool = config_field(False, "weight decay on every trainable parameter, as Q2L's official "
                                          "code (some models' settings turn it on), instead of on weights only", "training")
    warmup_pct: float = config_field(0.2, "fraction of the steps spent warming up (one-cycle pct_start)", "training")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this (0 = off)", "training")
    ema_decay: float = config_field(None, "EMA decay per step (0 = no EMA)", "training")
    ema_warmup: bool = config_field(True, "warm the EMA decay up as min(d, (1+t)/(10+t)) (TensorFlow's "
                                    "ExponentialMovingAverage num_updates); off = constant d, as Q2L and timm", "training")
    collapse_threshold: float = config_field(0.8, "warn when one expert of a router takes more than this share of "
                                                  "its rows (lib/routing.py)", "training")
    dead_share: float = config_field(0.1, "an expert whose share of a router's rows is under this fraction of the "
                                          "fair share 1/E is counted dead (lib/routing.py)", "training")
    # ASL's own defaults (Alibaba-MIIL/ASL); some models take Q2L's released ones (their settings, zoo.preset).
    loss: str = config_field("bce", "bce | asl (asymmetric loss; losses.py)", "training")
    asl_gamma_neg: float = config_field(4.0, "ASL gamma-: focusing on negatives", "training")
    asl_gamma_pos: float = config_field(0.0, "ASL gamma+: focusing on positives", "training")
    asl_clip: float = config_field(0.05, "ASL probability margin m for negatives (0 = off)", "training")
    asl_eps: float = config_field(1e-8, "ASL: log(max(p, eps)), the floor of the log-probabilities", "training")
    asl_detach_focusing: bool = config_field(True, "ASL: the focusing weights are constants for the gradient "
                                             "(ASL's train.py, Q2L's --dtgfl)", "training")
    seed: int = config_field(0, "seed for weights, data order, dropout and augmentation", "training")
    init_seed: int = config_field(None, "seed for the initial weights only (default: --seed); with it, --seed "
                                  "keeps the data order, flips and dropout: the two sources of seed noise apart",
                                  "training")
    # Where and how fast the run runs (SYSTEM below keeps these out of the run folder's name).
    device: str = config_field("auto", "auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu", "system")
    amp: str = config_field("auto", "mixed precision: auto (bf16 where the GPU has it, else fp16; fp32 on CPU and MPS) | "
                                    "bf16 | fp16 (with a GradScaler) | off (fp32; --no-amp). bf16 and fp16 run on the "
                                    "CPU too, through the same autocast code path as on a GPU: for checking that path, "
                                    "not for speed (on most CPUs they are not faster)", "system")
    channels_last: bool = config_field(True, "channels_last memory format for the backbone (faster convs)", "system")
    compile: bool = config_field(False, "torch.compile the model (CUDA on Linux only; see studies/bench.py for its effect)", "system")
    sync_bn: bool = config_field(False, "torchrun: SyncBatchNorm, batch statistics over all GPUs (small per-GPU batches)", "system")
    num_workers: int = config_field(None, "DataLoader worker processes", "system")
    out_dir: str = config_field(None, "where checkpoints, log.jsonl and metrics.json go; default "
                                "runs/DATASET/<model, gate, S, T, the flags you changed, seed>; a folder holds one run "
                                "and a finished run in it is never trained over", "system")
    keep_last: bool = config_field(False, "keep last.pt once the run has finished (a finished run is never resumed, and "
                                          "last.pt is about 4x best.pt: by default only best.pt stays)", "system")
    # parse_args adds --resume by hand (a bare --resume means 'auto'), so its flag is skipped by add_config_args.
    resume: str = config_field(None, "continue from a checkpoint: a path, or 'auto' for OUT_DIR/last.pt", "system")


# Dataset presets: the few settings that differ between the CPU benchmark and the papers' GPU setting.
# synthetic: ResNet-18 from scratch at 64 px, cut after layer3 so the decoder sees 4x4 = 16 tokens.
#            The budget (8 epochs of 5,000 images) is sized for minutes on a 2-core CPU (README's quick
#            start). lr 1e-3: 2e-3 trained the decoder worse, 5e-4 was slower (single runs on this benchmark).
#            EMA 0.99 with the decay warm-up: the run has only 624 steps, and a constant 0.99 would keep the
#            random initial weights in the average for its first ~460 steps (0.99^460 = 1 %). With the
#            warm-up the decay ends at 624/633 = 0.986 (0.99 would come at step 890): an average over the
#            last ~70 steps, which is what a run this short can afford.
# voc/coco:  ImageNet ResNet-101 at 448 px as ML-GCN, Q2L, HSQ and DR-MoE all report. Q2L's recipe:
#            AdamW lr 1e-4, weight decay 1e-2, one-cycle with 20 % warm-up, a constant EMA decay of 0.9997
#            (Q2L's ModelEma has no warm-up; with one, 0.9997 would be reached only at step 29,990, and the
#            6,240 steps of 40 VOC epochs would end at 0.9986), Cutout 0.5 and RandAugment. Q2L runs 80 epochs
#            with early stopping, and its best EMA epoch comes well before the end; 40 halves the cost.
#            Batch 32 at 448 px fits one 24 GB GPU under AMP (Q2L: 128 over 8 GPUs). Not yet run on real
#            photos here (no GPU): treat these as the starting point.
# Decoding 448-px JPEGs needs processes, but more than the cores only thrash. The count is per process:
# under torchrun the node's cores are shared by its LOCAL_WORLD_SIZE training processes.
WORKERS = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
PHOTOS = dict(backbone="resnet101", weights="DEFAULT", feature_layer="layer4", image_size=448, epochs=40,
              batch_size=32, lr=1e-4, ema_decay=0.9997, ema_warmup=False, cutout=0.5, num_workers=WORKERS)
# SYNTHETIC: num_workers 0, because the split is rendered once into memory (data.SyntheticMultiLabel), so
# a batch costs an index and a flip, not a JPEG decode: worker processes would only add their start-up.
# cutout 0: its images get flips only (the --randaugment help), and the field needs a number either way
# (check_values compares it). The benchmark has a real val split, so its best epoch is never chosen on test.
SYNTHETIC = dict(backbone="resnet18", weights="none", feature_layer="layer3", image_size=64,
                 epochs=8, batch_size=64, lr=1e-3, ema_decay=0.99, ema_warmup=True, num_workers=0,
                 train_split="train", val_split="val", test_split="test", cutout=0.0)
PRESETS = {
    "synthetic": SYNTHETIC,
    # The source task for pretraining a backbone offline (lib/synthetic.py): the benchmark's recipe.
    "synthetic-pretrain": SYNTHETIC,
    # VOC and COCO have no separate validation set; like every paper in this line, the best epoch is
    # chosen on the evaluation split itself (metrics.json says so: "best_epoch_chosen_on"). For an honest model
    # selection on VOC pass --train-split train --val-split val --test-split test.
    "voc": dict(PHOTOS, train_split="trainval", val_split="test", test_split="test"),
    "coco": dict(PHOTOS, train_split="train", val_split="val", test_split="val"),
    # Your own data (lib/owndata.py): the photo recipe, and an honest split: the best epoch is chosen on val
    # (val.csv / val.json, or 10 % held out of train), the test split is scored once at the end.
    # A -1 in your files means "unknown", not VOC's "difficult": it stays out of the loss (difficult=ignore).
    "csv": dict(PHOTOS, train_split="train", val_split="val", test_split="test", difficult="ignore"),
    "cocojson": dict(PHOTOS, train_split="train", val_split="val", test_split="test", difficult="ignore"),
}
# Budgets (--budget), a layer between the dataset's preset and the model's settings; chosen by measurement
# in results/noise/README.md.
# demo:  the preset as it is: 8 epochs, 2,000 test images, about 5 minutes on 2 CPU cores. It stops on the
#        steep part of the learning curve: good for a first look, too noisy to rank methods.
# study: the comparisons' preset. 20 epochs: where the validation curves have gone flat, so that a
#        comparison ranks converged models, not models learning at different speeds (the measurements, and
#        how this was chosen, in results/noise/README.md). On the synthetic benchmark also a 10,000-image test split (its first 2,000 are the demo's): one
#        checkpoint's bootstrap std falls by about sqrt(5). Val stays at 1,000 images because it is scored
#        twice per epoch. On a dataset of files only the 20 epochs apply (its splits are what its files hold).
BUDGETS = {
    "demo": dict(),
    "study": dict(epochs=20, test_images=10000),
}
# The --help sections: the core's, with each system's own sections (its fields' third config_field argument)
# before "training".
GROUPS = tuple(dict.fromkeys(["data", "model", "mixture of experts"] + [f.metadata.get("group", "model") for f in
                                                                         fields(ModelConfig)
                                                                         if f.metadata.get("group") not in ("training", "system")]
                             + ["training", "system"]))
# Flags that change where or how fast a run runs, not what it learns: left out of the default run folder's name.
# collapse_threshold and dead_share are here too: they only decide what train.py reports, never what it trains.
# The data root and the weights file do change what is learned: they are named (by a hash of the full path).
SYSTEM = {"dataset", "download", "device", "amp", "channels_last", "compile", "sync_bn",
          "num_workers", "out_dir", "resume", "describe", "collapse_threshold", "dead_share", "keep_last"}


def channels_of(dataset: str, model: str, args: dict = None):
    """f() -> C of the backbone a run would use (what the flags say, else the presets): for zoo.preset."""
    args = args or {}
    base = {**PRESETS[dataset], **zoo.preset(model)}
    pick = lambda name: args.get(name) or base.get(name, getattr(ModelConfig, name))
    return lambda: backbone_channels(pick("backbone"), pick("feature_layer"))


def preset_value(name: str, dataset: str, model: str, default):
    """What a flag resolves to when not given: the model's settings over the dataset's preset over the default."""
    # No budget layer: --help shows the demo budget, the default one, which changes nothing (BUDGETS["demo"]).
    return {**PRESETS[dataset], **zoo.preset(model, channels_of(dataset, model))}.get(name, default)


def shown_default(f) -> str:
    """The default --help shows: the real value under each preset and each model, not the dataclass's."""
    # drmoe's model settings are empty, so by_dataset is each dataset's preset alone; the models are then
    # compared on each dataset, and only those that change the value are named.
    by_dataset = {d: preset_value(f.name, d, "drmoe", f.default) for d in PRESETS}
    # parts: value -> the datasets that share it, so --help reads "synthetic, ...: 64; voc, ...: 448"
    parts = {}
    for d, v in by_dataset.items():
        parts.setdefault(str(v), []).append(d)
    text = "; ".join(f"{', '.join(ds)}: {v}" for v, ds in parts.items()) if len(parts) > 1 else next(iter(parts))
    special = []
    for m in zoo.models():
        values = {d: preset_value(f.name, d, m, f.default) for d in PRESETS}
        if values != by_dataset:   # this model sets the field: its value, per dataset where they differ
            shown = sorted(set(map(str, values.values())), key=list(map(str, values.values())).index)
            special.append(f"{m}: " + (shown[0] if len(shown) == 1 else
                                       ", ".join(f"{d} {v}" for d, v in values.items())))
    return f" [default: {text}" + ("; --model " + "; ".join(special) if special else "") + "]"


def add_config_args(parser: argparse.ArgumentParser, cls, groups: dict, skip=()):
    """One --flag per dataclass field, in the field's --help section; default None means 'not given'."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        group = groups[f.metadata.get("group", "model")]
        help = f.metadata["help"] + shown_default(f)
        # A bool gets --flag and --no-flag, so that a True default (e.g. --amp) can be switched off.
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            group.add_argument(flag, type=f.type, default=None, help=help, metavar=f.name.upper())


PATHS = ("data_root", "weights", "word_vectors")   # flags whose value is a file or folder


def default_out_dir(tcfg: TrainConfig, mcfg: ModelConfig, args: dict, preset: dict) -> str:
    """runs/<dataset>/<model>[-<gate>-S<s>-T<t>][-<each flag given with a non-preset value>]-seed<k>.

    Runs that differ in what they learn land in different folders, so `python train.py` and
    `python train.py --gate label` never overwrite each other's best.pt.
    """
    parts = [mcfg.model]
    if zoo.gated(mcfg):
        parts += [mcfg.gate, f"S{mcfg.shared_experts}", f"T{mcfg.task_experts}"]
    # fields the name already holds (model, gate, S, T, seed) or must never hold (SYSTEM)
    in_name = {"model", "gate", "shared_experts", "task_experts", "seed"} | SYSTEM
    # ModelConfig.image_size is a copy of TrainConfig's (set from it, not a flag of its own): named once
    model_only = [f for f in fields(ModelConfig) if f.name not in {g.name for g in fields(TrainConfig)}]
    for f in list(fields(TrainConfig)) + model_only:
        value = args.get(f.name)
        # Only flags that were typed and differ from what the preset gives: typing a default (--lr 1e-3
        # on synthetic) names the same run as leaving it out, so it finds the same folder.
        if f.name in in_name or value is None or value == preset.get(f.name, f.default):
            continue
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "no-" + flag)
        elif f.name in PATHS and str(value).lower() not in ("none", "default"):
            # A path shows as its last name, plus a short hash of where it really is: two data trees (or two
            # best.pt files) with the same name are two runs, and one tree named from another folder is one.
            where = hashlib.sha1(os.path.realpath(str(value)).encode()).hexdigest()[:6]
            parts.append(f"{flag}={os.path.basename(str(value).rstrip('/')) or value}@{where}")
        else:
            parts.append(f"{flag}={value}")
    # Anything else (a space, a ',' as in co,dc, a quote) becomes '_': any shell takes the name.
    name = re.sub(r"[^A-Za-z0-9.=_+@-]", "_", "-".join(parts))
    if len(name) > NAME_CHARS:
        # A long list of flags: a readable prefix and a short hash of the whole (config.json in the folder
        # holds every value), so the name stays one a terminal shows and a shell takes.
        name = name[:NAME_CHARS - 9].rstrip("-_=.") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return os.path.join("runs", tcfg.dataset, f"{name}-seed{tcfg.seed}")


NAME_CHARS = 50   # a run folder's name before "-seed<k>": under 60 characters in all


def check_values(tcfg: TrainConfig, mcfg: ModelConfig, error):
    """Every value that cannot work, caught before any data or model is built: error(one line) exits 2."""
    # Each check stops a value that would fail later, deep inside a library, or train silently wrong.
    ranges = [  # (config, field, ok, what is allowed)
        (tcfg, "image_size", lambda v: v >= 32, "an integer >= 32 (the backbone downsamples by up to 32)"),
        (tcfg, "epochs", lambda v: v >= 1, "an integer >= 1"),
        (tcfg, "batch_size", lambda v: v >= 1, "an integer >= 1"),
        (tcfg, "limit", lambda v: v is None or v >= 1, "an integer >= 1 (or leave it out)"),
        (tcfg, "train_images", lambda v: v is None or v >= 1, "an integer >= 1 (or leave it out)"),
        (tcfg, "val_images", lambda v: v is None or v >= 1, "an integer >= 1 (or leave it out)"),
        (tcfg, "test_images", lambda v: v is None or v >= 1, "an integer >= 1 (or leave it out)"),
        (tcfg, "num_workers", lambda v: v >= 0, "an integer >= 0 (0 = load in the main process)"),
        (tcfg, "lr", lambda v: v > 0, "a number > 0"),
        (tcfg, "weight_decay", lambda v: v >= 0, "a number >= 0"),
        # warmup_pct is OneCycleLR's pct_start
        (tcfg, "warmup_pct", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
        (tcfg, "grad_clip", lambda v: v >= 0, "a number >= 0 (0 = off)"),
        # a constant d = 1 would never move the average off the initial weights
        (tcfg, "ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1) (0 = no EMA)"),
        (tcfg, "collapse_threshold", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        (tcfg, "dead_share", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
        (tcfg, "asl_gamma_neg", lambda v: v >= 0, "a number >= 0"),
        (tcfg, "asl_gamma_pos", lambda v: v >= 0, "a number >= 0"),
        # p_m = max(p - clip, 0): a clip of 1 or more would zero every negative's loss
        (tcfg, "asl_clip", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        (tcfg, "asl_eps", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        (tcfg, "cutout", lambda v: 0 <= v < 1, "a fraction of the side in [0, 1) (0 = off)"),
        (mcfg, "dim", lambda v: v >= 4 and v % 4 == 0, "a multiple of 4 (the 2-D sine positions split D in 4)"),
        # multi-head attention splits D into equal heads of D / heads each
        (mcfg, "heads", lambda v: v >= 1 and mcfg.dim % v == 0, f"a divisor of --dim {mcfg.dim}"),
        (mcfg, "enc_layers", lambda v: v >= 0, "an integer >= 0"),
        (mcfg, "layers", lambda v: v >= 1, "an integer >= 1"),
        (mcfg, "ff_dim", lambda v: v >= 1, "an integer >= 1"),
        (mcfg, "dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
        (mcfg, "moe_layers", lambda v: v >= 0, "an integer >= 0 (0 = no mixture, i.e. Query2Label)"),
        (mcfg, "shared_experts", lambda v: v >= 0, "an integer >= 0"),
        (mcfg, "task_experts", lambda v: v >= 0, "an integer >= 0"),
        (mcfg, "expert_hidden", lambda v: v >= 1, "an integer >= 1"),
        (mcfg, "gate_temperature", lambda v: v > 0, "a number > 0"),
        (mcfg, "label_groups", lambda v: v >= 0, "an integer >= 0 (0 = one group per label)"),
        (mcfg, "aux_loss_coef", lambda v: v >= 0, "a number >= 0"),
    ]
    for cfg, name, ok, allowed in ranges:
        if not ok(getattr(cfg, name)):
            error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)!r}")
    # Then the combinations: values that are each fine alone but contradict one another.
    synthetic_only = [n for n in ("train_images", "val_images", "test_images") if getattr(tcfg, n) is not None]
    if not tcfg.dataset.startswith("synthetic") and synthetic_only:
        error(f"--{synthetic_only[0].replace('_', '-')} applies to the synthetic benchmark only (its splits are "
              f"drawn, yours are read from files); use --limit N on --dataset {tcfg.dataset}")
    for cfg, name, options in ((tcfg, "loss", LOSSES), (tcfg, "budget", tuple(BUDGETS)), (tcfg, "amp", AMP_MODES),
                               (tcfg, "difficult", ("positive", "ignore")),
                               (tcfg, "empty_images", ("keep", "drop")), (mcfg, "gate", GATE_KINDS),
                               (mcfg, "group_by", ("cooccurrence", "index"))):
        if getattr(cfg, name) not in options:
            error(f"--{name.replace('_', '-')} must be one of {options}, got {getattr(cfg, name)!r}")
    if mcfg.group_decoding and not mcfg.label_groups:
        error("--group-decoding needs --label-groups K: the number of group queries to decode")
    if mcfg.label_groups and not mcfg.group_decoding and not zoo.gated(mcfg):
        error(f"--label-groups groups a mixture's task-specific experts, and --model {mcfg.model} has none here "
              f"(a label-query model without MoE layers takes --group-decoding to decode K group queries)")
    experts = mcfg.shared_experts + mcfg.task_experts
    if zoo.gated(mcfg) and experts < 1:
        error("--shared-experts plus --task-experts must be >= 1 for a mixture (or --moe-layers 0 for none)")
    if not 0 <= mcfg.top_k <= experts:
        error(f"--top-k must be in [0, {experts}] (0 = dense; there are S + T = {experts} experts), got {mcfg.top_k}")
    if mcfg.weights.lower() not in ("none", "default") and not os.path.isfile(mcfg.weights):
        error(f"--weights {mcfg.weights!r}: no such file (allowed: none, DEFAULT, the path of a state_dict or "
              "a best.pt of this project)")
    if tcfg.val_split == "holdout" and tcfg.dataset.startswith("synthetic"):
        error("--val-split holdout holds images out of a dataset of files (voc, coco, csv, cocojson); the synthetic "
              "benchmark has its own val split")
    # Choosing the best epoch on, or testing on, the images trained on would report memorisation as accuracy.
    if tcfg.train_split in (tcfg.val_split, tcfg.test_split):
        error(f"--train-split {tcfg.train_split} is also evaluated on; pick another split")
    try:
        check_device(tcfg.device)
        # The name and the cut exist (built on the meta device: free).
        backbone_channels(mcfg.backbone, mcfg.feature_layer)
    except ValueError as e:
        error(str(e))
    zoo.check(tcfg, mcfg, error)   # each system's own values


def parse_args(argv=None):
    """argv -> (TrainConfig, ModelConfig, names of the flags the user actually passed)."""
    parser = Parser(description=DESCRIPTION, usage="%(prog)s [--flag VALUE ...]   (flags below, by group)")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    add_config_args(parser, TrainConfig, groups, skip=("resume",))
    groups["system"].add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                                  help=TrainConfig.__dataclass_fields__["resume"].metadata["help"] + " [bare flag: auto]")
    groups["system"].add_argument("--no-amp", dest="amp", action="store_const", const="off", help="the same as --amp off")
    add_config_args(parser, ModelConfig, groups, skip=("num_labels", "image_size"))
    groups["system"].add_argument("--describe", action="store_true", default=None,
                                  help="build the model for the dataset's labels, print parameters and GFLOPs, "
                                       "exit (no data read)")
    # args: {field name: value}, None where the flag was not given
    args = vars(parser.parse_args(argv))
    # The two flags that pick the presets are checked here, before the presets are looked up by them.
    dataset, model = args["dataset"] or TrainConfig.dataset, args["model"] or ModelConfig.model
    if dataset not in PRESETS:
        parser.error(f"--dataset must be one of {sorted(PRESETS)}, got {dataset!r}")
    if model not in zoo.models():
        need = zoo.missing(model)
        parser.error(f"--model {model} needs {need}, which is not in this copy" if need else
                     f"--model must be one of {list(zoo.models())}, got {model!r}")
    budget = args["budget"] or TrainConfig.budget
    if budget not in BUDGETS:
        parser.error(f"--budget must be one of {list(BUDGETS)}, got {budget!r}")
    # Layers, later ones win: the dataset's preset, the budget, the model's settings (zoo.preset). Some
    # follow the backbone's channels (Q2L's width: its released commands pass --hidden_dim = the backbone's C).
    # On a dataset of files the split sizes are what the files hold: only the budget's training length applies.
    layer = {k: v for k, v in BUDGETS[budget].items() if dataset.startswith("synthetic") or not k.endswith("_images")}
    preset = {**PRESETS[dataset], **layer, **zoo.preset(model, channels_of(dataset, model, args))}

    # Every flag defaults to None, so "not given" can be told from "given the default value":
    # only then can a preset (e.g. 448 px for voc) sit between the dataclass default and the user.
    def resolve(cls):
        return cls(**{f.name: args[f.name] if args.get(f.name) is not None else preset.get(f.name, f.default)
                      for f in fields(cls) if f.name in args or f.name in preset})
    tcfg, mcfg = resolve(TrainConfig), resolve(ModelConfig)
    if args.get("resume"):   # a resumed run takes its config from the checkpoint; only where it runs may change
        if args["resume"] != "auto" and not tcfg.out_dir:
            # --resume PATH continues the run PATH belongs to, in its own folder: the default folder of the
            # flags typed now may be another run's, whose best.pt would be overwritten.
            tcfg.out_dir = os.path.dirname(args["resume"]) or "."
        tcfg.out_dir = tcfg.out_dir or default_out_dir(tcfg, mcfg, args, preset)
        path = os.path.join(tcfg.out_dir, "last.pt") if args["resume"] == "auto" else args["resume"]
        try:
            check_device(tcfg.device)
            # A resumed run keeps a typed --device and --num-workers (train.py); the rest is the checkpoint's.
            if "num_workers" in args and args["num_workers"] is not None and args["num_workers"] < 0:
                raise ValueError(f"--num-workers {args['num_workers']}: must be an integer >= 0 "
                                 "(0 = load in the main process)")
            if not os.path.isfile(path) and os.path.isfile(os.path.join(tcfg.out_dir, "metrics.json")):
                raise ValueError(f"--resume: {tcfg.out_dir} holds a finished run (metrics.json; its last.pt was not "
                                 "kept): there is nothing to resume; evaluate its best.pt instead")
            if not os.path.isfile(path):
                raise ValueError(f"--resume: no checkpoint at {path} (a bare --resume looks in the folder the "
                                 "other flags name: repeat the run's flags, or pass --resume PATH/last.pt)")
        except ValueError as e:
            parser.error(str(e))
    else:
        # A new run's values; a resumed run's were checked when it started (device and workers: above).
        check_values(tcfg, mcfg, parser.error)
    tcfg.out_dir = tcfg.out_dir or default_out_dir(tcfg, mcfg, args, preset)
    # What was typed, told from defaults by the None above: train.py needs it for --describe and, on
    # --resume, to tell which typed flags still apply and which the checkpoint's config overrides.
    given = {k for k, v in args.items() if v is not None}
    return tcfg, mcfg, given


def check_device(name: str):
    """A ValueError naming what is wrong when --device asks for something this machine does not have."""
    # Checked at start-up, so that a typo or a missing GPU is one line now, not a torch traceback at .to(device).
    kind = name.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use "
                         "(torch.cuda.is_available() is False); use --device auto or cpu")
    if ":" in name and (kind != "cuda" or not name.split(":")[1].isdigit()):
        raise ValueError(f"--device {name!r}: only cuda takes an index (cuda:0, cuda:1, ...)")
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device mps: Apple's MPS is not available here; use --device auto or cpu")


def pick_device(name: str) -> torch.device:
    """'auto' picks the fastest device present: CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


AMP_MODES = ("auto", "bf16", "fp16", "off")


def amp_dtype_for(device: torch.device, amp) -> "torch.dtype | None":
    """--amp -> the dtype autocast runs in, or None for fp32 (autocast off).

    auto: bf16 where the GPU supports it (no loss scaling needed), else fp16; fp32 on CPU and MPS, where the
    low-precision kernels are rarely faster. bf16 / fp16: those, on any device: torch.autocast("cpu") runs the
    very code path a GPU runs (the same autocast line, the gates kept in fp32, fp16's GradScaler), so a CPU can
    check it. A checkpoint from before this choice holds True (auto) or False (off)."""
    amp = {True: "auto", False: "off"}.get(amp, amp)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        # fp16's 5-bit exponent underflows small gradients (hence the GradScaler); bf16 has fp32's 8 bits.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
