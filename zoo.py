"""
The model zoo: every model of this codebase by name, in one place. A checkpoint, a --model flag or a test
names a model; this file turns the name and its config into the module.

    --model   class                       file           its own config (on top of backbones.BackboneConfig)
    drmoe     DRMoE                       model.py       model.DRMoEConfig
    hsq       DRMoE, gate reads h[b,l]    model.py       the same, with baselines.MODEL_PRESETS["hsq"]
    q2l       DRMoE, no MoE layer         model.py       the same, with baselines.MODEL_PRESETS["q2l"]
    linear    LinearHead                  baselines.py   none
    mlgcn     MLGCN                       baselines.py   baselines.MLGCNConfig
    mlvpt     MLVPT                       mlvpt.py       mlvpt.MLVPTConfig

    ModelConfig                   every model's fields in one flat dataclass: one --flag each, one dict in a checkpoint
    build_model(cfg)              the config -> the module (the one place a model is built by name)
    prepare(model, cfg, targets)  what a model reads from the training labels before it trains: ML-GCN's label
                                  graph, ML-VPT's label groups
    describe(model, cfg)          one line: parameters (backbone / head, activated, trainable) and settings
    load_checkpoint_model(path)   a best.pt or last.pt -> the model it was judged by, ready to evaluate
    flops_per_image, set_memory_format   what every script measures and sets on any model

Why one flat config: a flag is one field and a checkpoint one dict (asdict), whatever the model; each
concept file still declares only its own fields (the classes above), and ModelConfig is their union, so
model.py never needs to know that ML-VPT exists.

    python zoo.py          # builds every model on the CPU demo size and prints its describe() line
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from backbone_moe import moe_layers, parameter_split
from baselines import MODEL_PRESETS, MODELS, LinearHead, MLGCN, MLGCNConfig, q2l_width
from lib.checkpoint import judged_weights, read_checkpoint
from lib.flags import config_field
from mlvpt import BRANCHES, MLVPT, MLVPTConfig, affinities, pick_k
from model import DRMoE, DRMoEConfig


@dataclass
class ModelConfig(MLVPTConfig, MLGCNConfig, DRMoEConfig):
    """Every model's fields (the backbone's, DR-MoE's, ML-GCN's, ML-VPT's) and which model to build."""
    model: str = config_field("drmoe", "drmoe | hsq | q2l | mlgcn | linear (the baselines: baselines.py) | mlvpt "
                                       "(prompt tuning of a frozen ViT: mlvpt.py)")


def build_model(cfg: ModelConfig, verbose: bool = True, classes=None) -> nn.Module:
    """The one place that turns a config (e.g. the one saved in a checkpoint) into a model.

    `classes` (label names) is only read by ML-GCN, to look up its word vectors by name.
    """
    if cfg.model in ("drmoe", "hsq", "q2l"):
        model = DRMoE(cfg)
    elif cfg.model == "linear":
        model = LinearHead(cfg)
    elif cfg.model == "mlgcn":
        model = MLGCN(cfg, classes=classes)
    elif cfg.model == "mlvpt":
        model = MLVPT(cfg)
    else:
        raise ValueError(f"unknown model {cfg.model!r}; choose {' | '.join(MODELS)}")
    if cfg.freeze_backbone:
        # Linear probing, prompt tuning, a head on a frozen backbone: the backbone gets no gradient, and
        # train.py keeps it in eval mode (its BatchNorm statistics frozen too) and out of the optimizer.
        model.backbone.requires_grad_(False)
    if verbose:
        print(describe(model, cfg))
        if getattr(model.backbone, "weights_note", None):   # what --weights loaded (backbones.load_backbone_weights)
            print("  " + model.backbone.weights_note)
    return model


def resolve_groups(cfg: ModelConfig, targets, say=print):
    """--mlvpt-groups 0: k from the training labels (Calinski-Harabasz, mlvpt.pick_k), fixed in the config
    before the model is built (the prompt count depends on it), so that a checkpoint rebuilds the same model."""
    if cfg.model == "mlvpt" and cfg.mlvpt_groups == 0:
        kind = cfg.mlvpt_branches.split(",")[0]   # one k for both branches: the first branch's choice
        cfg.mlvpt_groups = pick_k(affinities(targets.numpy(), cfg.mlvpt_tau)[BRANCHES.index(kind)], seed=0)
        say(f"ML-VPT: k = {cfg.mlvpt_groups} groups, chosen by the Calinski-Harabasz score")


def prepare(model: nn.Module, cfg: ModelConfig, targets, classes, seed: int = 0, verbose: bool = True):
    """What a model reads from the training labels (N, L) before it trains; both are saved with its weights,
    so evaluation needs the labels no more. targets: the training labels with difficult ones still -1
    (counted as absent: the graphs count clear positives only)."""
    if cfg.model == "mlgcn":
        model.set_label_graph(targets)   # ML-GCN's graph: co-occurrence in the training labels (baselines.py)
    if cfg.model == "mlvpt":         # ML-VPT's CO and DC label groups (mlvpt.label_groups); prints them
        model.set_label_groups(targets.numpy(), classes, seed=seed, verbose=verbose)


def describe(model: nn.Module, cfg: ModelConfig) -> str:
    """One line: the model's name, its parameter count split into backbone and head, and its key settings.
    With MoE in the backbone also the activated parameters: what one token runs (k of each layer's N experts),
    the quantity the sweet-spot paper's abstract weighs MoE's benefit against ("parameter activation per sample")."""
    n_all, active = parameter_split(model)   # all parameters, and those one token activates
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    # A ResNet is cut after --feature-layer (backbones.cut): say where, since its size depends on it.
    cut = f" cut after {cfg.feature_layer}" if cfg.backbone.startswith(("resnet", "resnext", "wide_resnet")) else ""
    if cfg.backbone_moe != "none":
        n_moe = len(moe_layers(model.backbone))
        extra_bb = (f"; backbone MoE {cfg.backbone_moe}: {n_moe} layers x {cfg.backbone_experts} experts, top-{cfg.backbone_top_k}, "
                    f"{active / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters activated per token")
    else:
        extra_bb = ""
    extra = (f"gate={cfg.gate}, S={cfg.shared_experts}, T={cfg.task_experts}, moe_layers={cfg.moe_layers}"
             if cfg.model in ("drmoe", "hsq") else
             f"D={cfg.dim}, enc={cfg.enc_layers}, dec={cfg.layers}" if cfg.model == "q2l" else
             f"gcn 300->{cfg.gcn_hidden}->C" if cfg.model == "mlgcn" else
             f"{model.num_prompts} prompts x {len(model.prompts)} blocks, grouping {cfg.mlvpt_grouping}, "
             f"branches {cfg.mlvpt_branches}" if cfg.model == "mlvpt" else "GAP + linear")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = (f"; {n_train / 1e6:.3f}M trainable ({100 * n_train / n_all:.2f} %), backbone frozen"
               if cfg.freeze_backbone else "")
    return (f"{cfg.model}: {n_all / 1e6:.2f}M parameters ({n_bb / 1e6:.2f}M backbone {cfg.backbone}{cut}, "
            f"{(n_all - n_bb) / 1e6:.2f}M head; {extra}{extra_bb}{trained})")


def load_checkpoint_model(path: str, device, ckpt=None):
    """Rebuild the model from a checkpoint alone: its saved ModelConfig, then the weights it was judged by
    -> (model in eval mode, ckpt, memory format). `ckpt`: the file's contents when the caller has already
    read them (evaluate.main checks them first)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    # The backbone's ImageNet weights are about to be overwritten: do not download them again.
    mcfg = ModelConfig(**{**ckpt["model_config"], "weights": "none"})
    model = build_model(mcfg, verbose=False)
    model.load_state_dict(judged_weights(ckpt))
    fmt = torch.channels_last if ckpt["train_config"].get("channels_last", True) else torch.contiguous_format
    return set_memory_format(model.to(device), fmt).eval(), ckpt, fmt


def set_memory_format(model: nn.Module, fmt=torch.channels_last) -> nn.Module:
    """Put the convolutions' weights in `fmt` (channels_last = NHWC: what cuDNN and oneDNN convs run fastest on).

    Only the convolutions: model.to(memory_format=...) would also re-stride every other 4-D parameter,
    such as the task experts' (L, T, D, H) weights, which are not images; DDP then warns that their
    gradients' strides differ from the parameters' and copies them every step.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=fmt)
    return model


def flops_per_image(model: nn.Module, image_size: int, device="cpu") -> float:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter; a multiply-add counts as 2).

    Runs with autograd on: under no_grad the counter's module hooks trip over views of parameters.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    # Every model at the CPU demo size: ResNet-18 cut after layer3 at 64 px (C = 256), L = 20; ML-VPT on vit_tiny.
    own_fields = {f.name for f in fields(ModelConfig)}
    for name in MODELS:
        # The model's own settings (baselines.MODEL_PRESETS; its loss settings are train.py's, not the model's).
        settings = {k: v for k, v in MODEL_PRESETS[name].items() if k in own_fields}
        if name == "q2l":
            settings.update(q2l_width(256))   # Q2L's width is the backbone's C (config.py does the same)
        backbone = dict(backbone="vit_tiny") if name == "mlvpt" else dict(feature_layer="layer3")
        model = build_model(ModelConfig(model=name, image_size=64, **backbone, **settings))
        logits, info = model(torch.zeros(2, 3, 64, 64))
        print(f"    images (2, 3, 64, 64) (B, 3, H, W) -> logits {tuple(logits.shape)} (B, L)")
