"""
The model zoo: every model and every system of this codebase by name, in one place. A checkpoint, a --model
flag or a test names a model; this file turns the name and its config into the module.

A system is one file a DR-MoE fork can delete. SYSTEMS below is the one list that names them; each is
imported only when its file is there (importlib), so a copy without mlvpt.py trains DR-MoE as before and
says in one line that --model mlvpt needs mlvpt.py. What a system file may define, and what reads it:

    MODELS      {name: {"build": f(cfg, classes) -> module, "preset": settings over the dataset preset,
                 "width": f(C) -> settings that follow the backbone's channels, "describe": f(model, cfg)
                 -> its part of describe()'s line, "gated": True when its gate fields (gate, S, T) describe
                 it}}                                                             build_model, config.py
    CONFIG      a dataclass of its fields: joined into ModelConfig, one --flag each
    check       check(tcfg, mcfg, error): its values that cannot work, before anything is built   config.py
    edit        edit(backbone, cfg): changes every built backbone in place (backbones.EDITS)
    resolve     resolve(cfg, training labels, say): fields fixed from the labels before the build  train.py
    loop_hook   loop_hook(tcfg, mcfg, model) -> an object the loop calls by what it does, or None:
                losses(info), end_epoch(epoch, gather), measure(pred, dataset, every_epoch),
                report(pred, dataset, features), draw(folder, result, title), state_dict(),
                load(ckpt, device)                                                        train.py, evaluate.py
    describe    describe(model, cfg) -> more of describe()'s line

    --model   class                       file
    drmoe     DRMoE                       model.py        (the core: always here)
    hsq, q2l  DRMoE with their settings   baselines.py
    linear    LinearHead                  baselines.py
    mlgcn     MLGCN                       baselines.py
    mlvpt     MLVPT                       mlvpt.py

The contract between every model and the loop: forward(x) -> (logits (B, L), info) with
    info["losses"]         {name: scalar}, already weighted: the loop adds each to the loss, logs it by name
    info["routing"]        {name: routing record (lib/routing.py)}: every router's health, watched alike
    info["image_feature"]  (B, C) detached: what the analyses read
    info["loss_logits"]    (optional) the outputs the classification loss is taken on [default: the logits]

    python zoo.py          # builds every model here on the CPU demo size and prints its describe() line
"""
import importlib
import os
from dataclasses import fields, make_dataclass

import torch
import torch.nn as nn

import backbones
from lib.checkpoint import judged_weights, read_checkpoint
from lib.flags import config_field
from model import DRMoE, DRMoEConfig

# The systems, each a file beside this one, with the models it holds (for the one-line error when it is gone).
SYSTEMS = {
    "baselines": ("linear", "mlgcn", "q2l", "hsq"),   # the baselines DR-MoE is measured against
    "mlvpt": ("mlvpt",),                                # ML-VPT, prompt tuning of a frozen ViT
    "backbone_moe": (),                                 # MoE inside the backbone's MLPs (every model's)
    "divdr": (),                                        # DivDR, routing trained to partition the data
}
HERE = os.path.dirname(os.path.abspath(__file__))

# DR-MoE itself, the core's one model.
CORE_MODELS = {
    "drmoe": dict(build=lambda cfg, classes: DRMoE(cfg), gated=True,
                  describe=lambda model, cfg: f"gate={cfg.gate}, S={cfg.shared_experts}, T={cfg.task_experts}, "
                                              f"moe_layers={cfg.moe_layers}" + label_groups(cfg)),
}


def label_groups(cfg) -> str:
    """describe()'s words for a label-query model's label groups (model.py): none when per label."""
    if not cfg.label_groups:
        return ""
    return (f", K={cfg.label_groups} label groups by {cfg.group_by}"
            + (", group decoding" if cfg.group_decoding else ", L label queries"))


def systems() -> dict:
    """{name: module} of the system files present, imported once; each one's backbone edit registered."""
    if not hasattr(systems, "loaded"):
        systems.loaded = {}
        for name in SYSTEMS:
            if os.path.isfile(os.path.join(HERE, f"{name}.py")):
                module = importlib.import_module(name)
                systems.loaded[name] = module
                if hasattr(module, "edit"):
                    backbones.EDITS.append(module.edit)
    return systems.loaded


def models() -> dict:
    """{model name: its entry (build, preset, width, describe)}: DR-MoE, then every present system's."""
    out = dict(CORE_MODELS)
    for module in systems().values():
        out.update(getattr(module, "MODELS", {}))
    return out


def missing(model: str):
    """The system file a model needs when that file is not here, else None."""
    return next((f"{name}.py" for name, names in SYSTEMS.items() if model in names and name not in systems()), None)


# Every model's fields (the backbone's, DR-MoE's, each present system's) and which model to build, in one flat
# dataclass: one --flag per field, one dict in a checkpoint (asdict). Each file declares only its own fields.
ModelConfig = make_dataclass(
    "ModelConfig", [("model", str, config_field("drmoe", "drmoe (the default) | " + " | ".join(
        n for n in models() if n != "drmoe") + " (zoo.py lists where each one lives)"))],
    bases=tuple(m.CONFIG for m in reversed(list(systems().values())) if hasattr(m, "CONFIG")) + (DRMoEConfig,))
ModelConfig.__doc__ = "Every model's fields (the backbone's, DR-MoE's, each system's) and which model to build."


def preset(model: str, channels=None) -> dict:
    """A model's settings over the dataset preset; `channels`: f() -> the backbone's C, for settings that follow it."""
    entry = models()[model]
    out = dict(entry.get("preset", {}))
    if "width" in entry and channels is not None:
        try:
            out.update(entry["width"](channels()))
        except ValueError:   # an unknown backbone: config.check_values says so in one line
            pass
    return out


def gated(cfg) -> bool:
    """Whether a model config's gate fields (gate, S, T) describe the model: a label-query model with a mixture."""
    return bool(models().get(cfg.model, {}).get("gated") and cfg.moe_layers)


def check(tcfg, mcfg, error):
    """Every present system's checks of its own values (config.check_values runs the core's)."""
    for module in systems().values():
        if hasattr(module, "check"):
            module.check(tcfg, mcfg, error)


def build_model(cfg, verbose: bool = True, classes=None) -> nn.Module:
    """The one place that turns a config (e.g. the one saved in a checkpoint) into a model.

    `classes` (label names) is read by models that look their labels up by name (ML-GCN's word vectors).
    """
    entry = models().get(cfg.model)
    if entry is None:
        need = missing(cfg.model)
        raise ValueError(f"--model {cfg.model} needs {need}, which is not in this copy" if need else
                         f"unknown model {cfg.model!r}; choose {' | '.join(models())}")
    model = entry["build"](cfg, classes)
    if cfg.freeze_backbone:
        # Linear probing, prompt tuning, a head on a frozen backbone: the backbone gets no gradient, and
        # train.py keeps it in eval mode (its BatchNorm statistics frozen too) and out of the optimizer.
        model.backbone.requires_grad_(False)
    if verbose:
        print(describe(model, cfg))
        if getattr(model.backbone, "weights_note", None):   # what --weights loaded (backbones.load_backbone_weights)
            print("  " + model.backbone.weights_note)
    return model


def resolve(cfg, targets, say=print):
    """Fields a system fixes from the training labels (N, L) before the model is built (ML-VPT's k groups)."""
    for module in systems().values():
        if hasattr(module, "resolve"):
            module.resolve(cfg, targets, say)


def prepare(model: nn.Module, targets, classes, seed: int = 0, verbose: bool = True):
    """What a model reads from the training labels (N, L) before it trains (ML-GCN's graph, ML-VPT's groups):
    its prepare(), if it has one; saved with its weights, so evaluation needs the labels no more. targets:
    the training labels with difficult ones still -1 (the graphs count clear positives only)."""
    if hasattr(model, "prepare"):
        model.prepare(targets.numpy() if torch.is_tensor(targets) else targets, classes, seed=seed, verbose=verbose)


def loop_hooks(tcfg, mcfg, model) -> list:
    """What systems add to the loop for this run and model (DivDR's term and partition): a list, often empty."""
    hooks = [m.loop_hook(tcfg, mcfg, model) for m in systems().values() if hasattr(m, "loop_hook")]
    return [h for h in hooks if h is not None]


def activated_parameters(model: nn.Module) -> int:
    """Parameters one token runs: all of them, less what a sparse layer leaves idle (its idle_parameters())."""
    return sum(p.numel() for p in model.parameters()) - sum(m.idle_parameters() for m in model.modules()
                                                             if hasattr(m, "idle_parameters"))


def describe(model: nn.Module, cfg) -> str:
    """One line: the model's name, its parameter count split into backbone and head, and its key settings."""
    n_all = sum(p.numel() for p in model.parameters())
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    # A ResNet is cut after --feature-layer (backbones.cut): say where, since its size depends on it.
    cut = f" cut after {cfg.feature_layer}" if cfg.backbone.startswith(("resnet", "resnext", "wide_resnet")) else ""
    entry = models()[cfg.model]
    extra = entry["describe"](model, cfg) if "describe" in entry else ""
    extra += "".join(m.describe(model, cfg) for m in systems().values() if hasattr(m, "describe"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = (f"; {n_train / 1e6:.3f}M trainable ({100 * n_train / n_all:.2f} %), backbone frozen"
               if cfg.freeze_backbone else "")
    return (f"{cfg.model}: {n_all / 1e6:.2f}M parameters ({n_bb / 1e6:.2f}M backbone {cfg.backbone}{cut}, "
            f"{(n_all - n_bb) / 1e6:.2f}M head; {extra}{trained})")


def model_config(saved: dict, train_config: dict = None):
    """A checkpoint's model config -> ModelConfig. Fields that older checkpoints kept with the training config
    (the loss weights of routers) move over; fields of a system this copy lacks are dropped (a model that needs
    it still fails, in build_model, with one line)."""
    known = {f.name for f in fields(ModelConfig)}
    moved = {k: v for k, v in (train_config or {}).items() if k in known and k not in saved}
    return ModelConfig(**{k: v for k, v in {**moved, **saved}.items() if k in known})


def load_checkpoint_model(path: str, device, ckpt=None):
    """Rebuild the model from a checkpoint alone: its saved ModelConfig, then the weights it was judged by
    -> (model in eval mode, ckpt, memory format). `ckpt`: the file's contents when the caller has already
    read them (evaluate.main checks them first)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    mcfg = model_config(ckpt["model_config"], ckpt.get("train_config"))
    mcfg.weights = "none"   # the backbone's ImageNet weights are about to be overwritten: no download
    model = build_model(mcfg, verbose=False)
    try:
        model.load_state_dict(judged_weights(ckpt))
    except RuntimeError:
        raise ValueError(f"{path}: its weights do not fit the model this copy builds from its config (a system "
                         f"file it was trained with is missing: {', '.join(f'{s}.py' for s in SYSTEMS if s not in systems()) or 'none'})") from None
    fmt = torch.channels_last if ckpt["train_config"].get("channels_last", True) else torch.contiguous_format
    return set_memory_format(model.to(device), fmt).eval(), ckpt, fmt


def set_memory_format(model: nn.Module, fmt=torch.channels_last) -> nn.Module:
    """Put the convolutions' weights in `fmt` (channels_last = NHWC: what cuDNN and oneDNN convs run fastest on).

    Only the convolutions: model.to(memory_format=...) would also re-stride every other 4-D parameter,
    such as the task-specific experts' (L, T, D, H) weights, which are not images; DDP then warns that their
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
    # A layer that pads its work for memory's sake (sparse experts padded to a bucket of rows) counts only the
    # rows it really computes: the activated FLOPs, the same whatever the bucket and from call to call.
    padded = [m for m in model.modules() if getattr(m, "pad_rows", False)]
    for m in padded:
        m.pad_rows = False
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    for m in padded:
        m.pad_rows = True
    model.train(was_training)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    # Every model here at the CPU demo size: ResNet-18 cut after layer3 at 64 px (C = 256), L = 20; ML-VPT on vit_tiny.
    print("systems here: " + ", ".join(f"{s}.py" for s in systems()) + "; missing: "
          + (", ".join(f"{s}.py" for s in SYSTEMS if s not in systems()) or "none"))
    own_fields = {f.name for f in fields(ModelConfig)}
    for name in models():
        # The model's own settings (its loss settings are train.py's, not the model's); Q2L's width = C = 256.
        settings = {k: v for k, v in preset(name, lambda: 256).items() if k in own_fields}
        backbone = dict(backbone="vit_tiny") if name == "mlvpt" else dict(feature_layer="layer3")
        model = build_model(ModelConfig(model=name, image_size=64, **backbone, **settings))
        logits, info = model(torch.zeros(2, 3, 64, 64))
        print(f"    images (2, 3, 64, 64) (B, 3, H, W) -> logits {tuple(logits.shape)} (B, L); losses {list(info['losses'])}, "
              f"routers {list(info['routing'])}")
