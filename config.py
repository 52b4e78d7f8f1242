"""
The run's configuration: what to train on, how long, with which settings, on which device.

    TrainConfig            every training setting, one dataclass field each (ModelConfig, in model.py, holds
                           the model's); each field carries its --help text
    PRESETS                the few settings that differ between datasets: the CPU-sized synthetic benchmark
                           and the papers' GPU setting for VOC 2007 and COCO 2014
    parse_args             argv -> (TrainConfig, ModelConfig): one --flag per field of both dataclasses
    pick_device            cuda, then mps, then cpu
    amp_dtype_for          the mixed-precision dtype: bf16 where the GPU has it, else fp16; none on CPU/MPS

Resolution order, later wins: the dataclass default < the dataset's preset (PRESETS) < the model's
settings (baselines.MODEL_PRESETS, and PAPER_SCALE at voc/coco size) < what you pass. train.py prints
the resolved configs at start and saves them in every checkpoint, so evaluate.py can rebuild the model
from a checkpoint alone. Used by train.py, evaluate.py and bench.py.
"""
import argparse
import os
from dataclasses import dataclass, fields

import torch

from baselines import MODEL_PRESETS, PAPER_SCALE
from gating import GATE_KINDS
from model import ModelConfig, config_field

DESCRIPTION = "Train DR-MoE (or a variant of its gate, or a baseline) for multi-label image classification."


@dataclass
class TrainConfig:
    dataset: str = config_field("synthetic", "synthetic (embedded, no download) | voc | coco")
    data_root: str = config_field(None, "folder holding the dataset (not needed for synthetic)")
    download: bool = config_field(False, "voc: download VOC 2007 into --data-root first (coco: see README)")
    train_split: str = config_field(None, "split to train on (preset: voc trainval, coco train)")
    val_split: str = config_field(None, "split that picks the best epoch (preset: voc test, coco val, as the papers)")
    test_split: str = config_field(None, "split the best checkpoint is finally evaluated on (preset: voc test, coco val)")
    difficult: str = config_field("positive", "VOC labels marked difficult, in training: positive (as ML-GCN) | ignore")
    empty_images: str = config_field("keep", "COCO images without annotation: keep as all-negative (Q2L) | drop (ML-GCN)")
    randaugment: bool = config_field(True, "photos: RandAugment in training (synthetic: flips only)")
    cutout: float = config_field(None, "photos: Cutout of this fraction of each side in training, 0 = off (ASL/Q2L: 0.5)")
    image_size: int = config_field(None, "input side in pixels (preset: 64 synthetic, 448 voc/coco)")
    limit: int = config_field(None, "use only the first N images of every split (smoke tests)")
    epochs: int = config_field(None, "training epochs")
    batch_size: int = config_field(None, "images per step, over all processes under torchrun (each takes 1/W)")
    lr: float = config_field(None, "peak learning rate of the one-cycle schedule")
    weight_decay: float = config_field(1e-2, "AdamW weight decay (matrices only, not biases/norms/queries)")
    warmup_pct: float = config_field(0.2, "fraction of the steps spent warming up (one-cycle pct_start)")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = config_field(None, "EMA decay per step (0 = no EMA)")
    aux_loss_coef: float = config_field(0.0, "weight of the gate's load-balancing loss (0 = off)")
    collapse_threshold: float = config_field(0.8, "warn when one expert slot takes more than this share of the gate mass")
    loss: str = config_field("bce", "bce | asl (asymmetric loss, baselines.py; q2l's default)")
    asl_gamma_neg: float = config_field(4.0, "ASL gamma-: focusing on negatives (Q2L's README: 2)")
    asl_gamma_pos: float = config_field(0.0, "ASL gamma+: focusing on positives")
    asl_clip: float = config_field(0.05, "ASL probability margin m for negatives (Q2L's README: 0)")
    seed: int = config_field(0, "seed for weights, data order, dropout and augmentation")
    device: str = config_field("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    amp: bool = config_field(True, "mixed precision where the device supports it (bf16, else fp16); fp32 on CPU")
    channels_last: bool = config_field(True, "channels_last memory format for the backbone (faster convs)")
    compile: bool = config_field(False, "torch.compile the model (CUDA on Linux only; see bench.py for its effect)")
    sync_bn: bool = config_field(False, "torchrun: SyncBatchNorm, batch statistics over all GPUs (small per-GPU batches)")
    num_workers: int = config_field(None, "DataLoader worker processes")
    out_dir: str = config_field(None, "where checkpoints, log.jsonl and metrics.json go (default runs/DATASET)")
    resume: str = config_field(None, "continue from a checkpoint: a path, or 'auto' for OUT_DIR/last.pt")


# Dataset presets: the few settings that differ between the CPU benchmark and the papers' GPU setting.
# synthetic: ResNet-18 from scratch at 64 px, cut after layer3 so the decoder sees 4x4 = 16 tokens.
#            The budget (8 epochs of 5,000 images) was measured to finish in about 4 minutes on a 2-core
#            CPU (README). lr 1e-3: 2e-3 trained the decoder worse, 5e-4 was slower (single runs on this benchmark).
# voc/coco:  ImageNet ResNet-101 at 448 px as ML-GCN, Q2L, HSQ and DR-MoE all report. Q2L's recipe:
#            AdamW lr 1e-4, weight decay 1e-2, one-cycle with 20 % warm-up, EMA 0.9997, Cutout 0.5 and
#            RandAugment. Q2L runs 80 epochs with early stopping, and its best EMA epoch comes well before
#            the end; 40 halves the cost. Batch 32 at 448 px fits one 24 GB GPU under AMP (Q2L: 128 over
#            8 GPUs). Not yet run on real photos here (no GPU): treat these as the starting point.
# Decoding 448-px JPEGs needs processes, but more than the cores only thrash. The count is per process:
# under torchrun the node's cores are shared by its LOCAL_WORLD_SIZE training processes.
WORKERS = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
PHOTOS = dict(backbone="resnet101", weights="DEFAULT", feature_layer="layer4", image_size=448, epochs=40,
              batch_size=32, lr=1e-4, ema_decay=0.9997, cutout=0.5, num_workers=WORKERS)
PRESETS = {
    "synthetic": dict(backbone="resnet18", weights="none", feature_layer="layer3", image_size=64,
                      epochs=8, batch_size=64, lr=1e-3, ema_decay=0.99, num_workers=0,
                      train_split="train", val_split="val", test_split="test", cutout=0.0),
    # VOC and COCO have no separate validation set; like every paper in this line, the best epoch is
    # chosen on the evaluation split itself (metrics.json says so: "best_epoch_chosen_on"). For an honest model
    # selection on VOC pass --train-split train --val-split val --test-split test.
    "voc": dict(PHOTOS, train_split="trainval", val_split="test", test_split="test"),
    "coco": dict(PHOTOS, train_split="train", val_split="val", test_split="val"),
}


def add_config_args(parser: argparse.ArgumentParser, cls, skip=()):
    """One --flag per dataclass field, help text from the field; default None means 'not given'."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"] + (f" [default: {f.default}]" if f.default is not None else " [default: preset]")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=help, metavar=f.name.upper())


def parse_args(argv=None):
    """argv -> (TrainConfig, ModelConfig, names of the flags the user actually passed)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_config_args(parser, TrainConfig, skip=("resume",))
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help=TrainConfig.__dataclass_fields__["resume"].metadata["help"] + " [bare flag: auto]")
    add_config_args(parser, ModelConfig, skip=("num_labels",))
    parser.add_argument("--describe", action="store_true", default=None,
                        help="build the model for the dataset's labels, print parameters and GFLOPs, exit (no data read)")
    args = vars(parser.parse_args(argv))
    dataset, model = args["dataset"] or TrainConfig.dataset, args["model"] or ModelConfig.model
    if dataset not in PRESETS:
        parser.error(f"unknown --dataset {dataset!r}; choose one of {sorted(PRESETS)}")
    if model not in MODEL_PRESETS:
        parser.error(f"unknown --model {model!r}; choose one of {list(MODEL_PRESETS)}")
    # Layers, later ones win: the dataset's preset, the model's settings (baselines.py), and at the
    # papers' scale (voc/coco) the model's official widths.
    preset = {**PRESETS[dataset], **MODEL_PRESETS[model],
              **(PAPER_SCALE.get(model, {}) if dataset != "synthetic" else {})}

    # Every flag defaults to None, so "not given" can be told from "given the default value":
    # only then can a preset (e.g. 448 px for voc) sit between the dataclass default and the user.
    def resolve(cls):
        return cls(**{f.name: args[f.name] if args.get(f.name) is not None else preset.get(f.name, f.default)
                      for f in fields(cls) if f.name in args or f.name in preset})
    tcfg, mcfg = resolve(TrainConfig), resolve(ModelConfig)
    tcfg.out_dir = tcfg.out_dir or os.path.join("runs", tcfg.dataset)
    # Fields with a closed set of values: a typo is a usage error (one line), not a traceback later.
    for cfg, name, options in ((tcfg, "loss", ("bce", "asl")), (tcfg, "difficult", ("positive", "ignore")),
                               (tcfg, "empty_images", ("keep", "drop")), (mcfg, "gate", GATE_KINDS)):
        if getattr(cfg, name) not in options:
            parser.error(f"--{name.replace('_', '-')} must be one of {options}, got {getattr(cfg, name)!r}")
    if tcfg.train_split in (tcfg.val_split, tcfg.test_split):
        parser.error(f"--train-split {tcfg.train_split} is also evaluated on; pick another split")
    given = {k for k, v in args.items() if v is not None}
    return tcfg, mcfg, given


def pick_device(name: str) -> torch.device:
    """'auto' picks the fastest device present: CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype_for(device: torch.device, enabled: bool):
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None (= fp32) on CPU and MPS."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
