"""
Backbones: an image becomes a token map. Every backbone here returns the same thing, so every head
(DR-MoE, Query2Label, HSQ, ML-GCN, the linear head) works on every backbone:

    image (B, 3, H_img, W_img)  ->  feature map (B, C, h, w),  and C is known when the backbone is built

    family                      how the map is taken                                     h x w at 448 px
    ResNet, ResNeXt, Wide-ResNet  the stem and the stages up to --feature-layer (NCHW)     14 x 14 (layer4)
    ConvNeXt, EfficientNet,       `.features`: every convolutional stage (NCHW)            14 x 14
      MobileNet, VGG, DenseNet
    Swin (swin_t/s/b, v2)         `.features`, then its final LayerNorm; the map comes out 14 x 14
                                  channels-last (B, h, w, C) and is permuted to (B, C, h, w)
    ViT (vit_b_16, vit_b_32,      the patch tokens after the last block and its LayerNorm,  28 x 28 (p = 16)
      vit_l_16, ...)              laid back on their grid (B, D, H/p, W/p); the class token
                                  is kept apart (ViTMap.forward_tokens) for a global feature
    SMALL (below)                 from-scratch backbones sized for a 2-core CPU at 64 px    8 x 8 (vit_tiny)

A ViT's position embeddings are one per patch of the grid it was built for. At another image size they
are interpolated (bicubic, the class token's left alone): when pretrained weights are loaded into a ViT
built for --image-size, by torchvision's own `interpolate_embeddings` (so --weights DEFAULT at 448 px is
ViT-B/16's ImageNet weights at a 28 x 28 grid, as the multi-label papers fine-tune it); and, for an input
of yet another size at run time, by the same interpolation on the fly (ViTMap.position_embedding).

Weights: --weights none (from scratch) | DEFAULT (torchvision's ImageNet weights: downloaded once into the
torch hub cache; offline, WeightsUnavailable says which file to fetch and where to put it) | PATH (a
state_dict of the torchvision model).

A system may change a built backbone in place (MoE in the backbone's MLPs does: it replaces them with experts
that can start as copies of the pretrained MLPs). It lists a function in EDITS (zoo.py puts it there), and
backbone_from_config applies every one after the weights are loaded; this file names none of them.
"""
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from lib.checkpoint import judged_weights, load_file
from lib.flags import config_field


@dataclass
class BackboneConfig:
    """What every model here shares: the L labels it predicts and the backbone it reads images with. Each
    model's config adds its own fields to these (model.DRMoEConfig, and each system file's)."""
    num_labels: int = config_field(20, "L, the number of labels (set from the dataset by train.py)")
    backbone: str = config_field("resnet18", "torchvision name (ResNet, ConvNeXt, Swin, ViT, EfficientNet, MobileNet) "
                                 "or a small from-scratch one: vit_tiny | convnext_mini (backbones.SMALL)")
    weights: str = config_field("none", "backbone init: none | DEFAULT (torchvision's ImageNet weights) | PATH")
    feature_layer: str = config_field("layer4", "ResNets: cut the backbone after this stage (layer1..layer4)")
    image_size: int = config_field(224, "the input side a ViT's position embeddings are made for (set from "
                                        "--image-size by train.py)")
    freeze_backbone: bool = config_field(False, "no gradient to the backbone's weights and none of them in the "
                                                "optimizer; BatchNorm statistics frozen too (mlvpt: on)")



# From-scratch backbones small enough to train on the embedded benchmark on two CPU cores. Not in
# torchvision's model list; built from torchvision's own classes, so the code paths (and any edit of their
# blocks) are exactly those of the big models.
SMALL = {
    # DeiT-Ti's width (Touvron et al. 2021: D = 192, 3 heads, MLP 4D = 768). Patch 8 gives the 8 x 8 = 64
    # token map at 64 px that the label queries attend to (ResNet-18 layer3 gives 4 x 4 there). Depth 6,
    # not DeiT-Ti's 12: every pair of blocks costs CPU time (measured in docs/backbones.md), and 6 is the
    # shallowest depth at which the sweet-spot paper's MoE placements differ (at 4, its last-2 and every-2 are
    # both blocks 1, 3).
    "vit_tiny": dict(kind="vit", patch_size=8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768),
    # ConvNeXt's block and stem at half of ConvNeXt-T's width (96, 192, 384), three of its four stages (stride 4, 8, 16): at 64 px
    # the last map is 4 x 4, like ResNet-18's layer3. Stages 2, 2, 4 deep.
    "convnext_mini": dict(kind="convnext", stages=[(48, 2), (96, 2), (192, 4)]),
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, wrong path). Scripts print it, no traceback."""


class ViTMap(nn.Module):
    """torchvision's VisionTransformer without its head: image (B, 3, H, W) -> patch-token map (B, D, H/p, W/p).

    The modules are the torchvision model's own (conv_proj, class_token, encoder), so its state_dict keys,
    its pretrained weights and its blocks are unchanged.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_size, self.hidden_dim = vit.patch_size, vit.hidden_dim
        self.conv_proj, self.class_token, self.encoder = vit.conv_proj, vit.class_token, vit.encoder
        self.grid = vit.image_size // vit.patch_size   # the grid the position embeddings were made for

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, D): the stored embeddings, interpolated when the grid is not the one they were made
        for, the same way as torchvision's interpolate_embeddings (bicubic, align_corners=True)."""
        pos = self.encoder.pos_embedding                                      # (1, 1 + g*g, D)
        if (h, w) == (self.grid, self.grid):
            return pos
        cls, grid = pos[:, :1], pos[:, 1:]
        grid = grid.transpose(1, 2).reshape(1, -1, self.grid, self.grid)     # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)     # (1, 1 + h*w, D)

    def forward_tokens(self, x: torch.Tensor):
        """x (B, 3, H, W) -> (class token (B, D), patch map (B, D, h, w)), h = H // p, w = W // p."""
        t = self.conv_proj(x)                                                 # (B, D, h, w)
        B, D, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)                                      # (B, N, D), N = h*w
        t = torch.cat([self.class_token.expand(B, -1, -1), t], dim=1)         # (B, 1 + N, D)
        # encoder.forward would add the stored embedding and assert its length; at another grid size the
        # interpolated one is added here instead, then the same dropout, blocks and final LayerNorm.
        t = t + self.position_embedding(h, w)
        t = self.encoder.ln(self.encoder.layers(self.encoder.dropout(t)))
        return t[:, 0], t[:, 1:].transpose(1, 2).reshape(B, D, h, w)          # (B, D), (B, D, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[1]


def load_state(name: str, weights: str) -> dict:
    """The state_dict that --weights names: torchvision's ImageNet weights (DEFAULT), a local state_dict file,
    or a checkpoint of this project (its backbone part)."""
    if weights.upper() == "DEFAULT":
        if name in SMALL:
            raise WeightsUnavailable(f"--backbone {name} has no published weights (SMALL in backbones.py: it "
                                     "trains from scratch); use --weights none or --weights PATH")
        w = torchvision.models.get_model_weights(name).DEFAULT
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        try:
            return w.get_state_dict(progress=True, check_hash=True)   # downloads once into `cache`
        except Exception as e:   # URLError, socket timeouts, hash mismatch: all mean "no usable file"
            raise WeightsUnavailable(
                f"could not get the pretrained weights {w} ({type(e).__name__}: {e}).\n"
                f"  Offline? Download {w.url}\n  and place it as {cache}/{os.path.basename(w.url)},\n"
                f"  or pass --weights PATH (a state_dict file) or --weights none (train from scratch).") from None
    if not os.path.isfile(weights):
        raise WeightsUnavailable(f"--weights {weights!r}: no such file (expected none, DEFAULT or a path)")
    try:
        state = load_file(weights)   # weights_only=True (lib/checkpoint.py)
    except Exception as e:
        raise WeightsUnavailable(f"--weights {weights!r}: not a torch state_dict or checkpoint torch can read "
                                 f"({type(e).__name__}); pass a .pth state_dict or a best.pt of train.py") from None
    if isinstance(state, dict) and "model_config" in state and "model" in state:
        # A checkpoint of this project (train.py's best.pt / last.pt): its backbone's weights, the ones it
        # was judged by (EMA or raw, checkpoint.judged_weights), under the cut backbone's own keys. This is
        # the offline path to a pretrained backbone: pretrain on --dataset synthetic-pretrain, then point
        # --weights at that run's best.pt.
        trained = state["model_config"].get("backbone")
        if trained != name:
            raise WeightsUnavailable(f"--weights {weights}: a checkpoint of a {trained} backbone, not {name}; "
                                     f"pass --backbone {trained} or another checkpoint")
        src = judged_weights(state)
        return {k[len("backbone."):]: v for k, v in src.items() if k.startswith("backbone.")}
    return state.get("state_dict", state)   # accept both a bare state_dict and {"state_dict": ...}


def load_backbone_weights(net: nn.Module, body: nn.Module, name: str, weights: str, where: str = "") -> str:
    """Fill the backbone with `weights`: a state_dict of the whole torchvision model (what DEFAULT and most
    files are) or of the cut backbone alone (`body`'s keys, e.g. "0.0.weight" of a ConvNeXt's .features). A
    ViT's position embeddings are interpolated to the grid it was built for when the weights were made for
    another grid (torchvision's interpolate_embeddings). -> one line: what was loaded where, what was left.

    Refused, naming the first misfit, when a tensor the backbone needs is missing from the file or has another
    shape there (a checkpoint of another backbone, another cut, or one with MoE layers). Tensors of the file that the backbone
    does not use (a ResNet cut earlier than the file's, the ImageNet classifier) are counted, not an error."""
    state = load_state(name, weights)
    if isinstance(net, VisionTransformer) and "encoder.pos_embedding" in state:
        if state["encoder.pos_embedding"].shape != net.encoder.pos_embedding.shape:
            state = interpolate_embeddings(net.image_size, net.patch_size, OrderedDict(state))
    target = body if set(body.state_dict()) <= set(state) else net
    own = target.state_dict()
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise WeightsUnavailable(f"--weights {weights}: {k} is {tuple(state[k].shape)} there and {tuple(own[k].shape)} "
                                 f"in --backbone {name}{where} ({len(wrong)} tensors differ in shape): a checkpoint "
                                 "of another backbone, another cut, or a backbone with MoE layers")
    missing, unused = target.load_state_dict(state, strict=False)
    # The ImageNet classifier is dropped anyway (ResNet fc, ConvNeXt/EfficientNet classifier, Swin/ViT head).
    head = ("fc.", "classifier.", "head.", "heads.")
    missing = [k for k in missing if not k.startswith(head)]
    if missing:
        raise WeightsUnavailable(f"--weights {weights}: no {missing[0]} in it ({len(missing)} tensors of --backbone "
                                 f"{name}{where} missing, e.g. {missing[:3]}): a checkpoint of another backbone, cut "
                                 "or a backbone with MoE layers")
    loaded = sum(1 for k in own if not k.startswith(head))
    unused = [k for k in unused if not k.startswith(head)]
    left = f"; {len(unused)} of its tensors not used ({', '.join(sorted({k.split('.')[0] for k in unused}))})" if unused else ""
    return f"--weights {weights}: loaded {loaded} tensors into the backbone ({name}{where}){left}"


def make_network(name: str, image_size: int) -> nn.Module:
    """The full classifier (head included) of torchvision or of SMALL, randomly initialised."""
    if name in SMALL:
        s = SMALL[name]
        if s["kind"] == "vit":
            return VisionTransformer(image_size=image_size, **{k: v for k, v in s.items() if k != "kind"})
        stages = s["stages"]   # (width, depth) per stage; each stage but the last ends in a downsampling
        return ConvNeXt([CNBlockConfig(c, stages[i + 1][0] if i + 1 < len(stages) else None, n)
                         for i, (c, n) in enumerate(stages)], stochastic_depth_prob=0.0)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"--backbone {name!r} is not a torchvision image classifier nor one of {list(SMALL)}; "
                         "e.g. resnet18, resnet101, convnext_tiny, swin_t, vit_b_16 (torchvision.models.list_models())")
    if name.startswith("vit_"):
        # Built for the input size, so its position embeddings are one per patch of the real grid.
        return torchvision.models.get_model(name, weights=None, image_size=image_size)
    return torchvision.models.get_model(name, weights=None)


def cut(net: nn.Module, name: str, feature_layer: str):
    """The full classifier -> (the part that returns the map, C or None when only a forward pass can tell)."""
    if isinstance(net, VisionTransformer):
        return ViTMap(net), net.hidden_dim
    if hasattr(net, "layer4"):
        # ResNet, ResNeXt, Wide-ResNet: keep the stem and the stages up to feature_layer; drop avgpool and fc.
        stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        if feature_layer not in stages[4:]:
            raise ValueError(f"--feature-layer must be one of layer1..layer4 for {name}, got {feature_layer!r}")
        return nn.Sequential(OrderedDict((s, getattr(net, s)) for s in stages[:stages.index(feature_layer) + 1])), None
    if hasattr(net, "features") and hasattr(net, "permute"):
        # Swin: its stages keep the map channels-last (B, h, w, C); its own norm, then its own permute to NCHW.
        return nn.Sequential(OrderedDict(features=net.features, norm=net.norm, permute=net.permute)), \
            net.norm.normalized_shape[0]
    if hasattr(net, "features"):
        return net.features, None   # VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet: all convolutional stages
    raise ValueError(f"--backbone {name!r} is not supported: expected a ResNet (.layer4), a .features model "
                     "(ConvNeXt, EfficientNet, MobileNet, VGG, DenseNet), a Swin or a ViT")


def build_backbone(name: str, weights: str = "none", feature_layer: str = "layer4", image_size: int = 224):
    """A backbone by name, cut before its pooling/classifier -> (module returning (B, C, h, w), C)."""
    net = make_network(name, image_size)
    body, channels = cut(net, name, feature_layer)
    # What the weights put in, in one line; zoo.build_model prints it with the model's description.
    body.weights_note = None
    if weights.lower() != "none":
        where = f" cut after {feature_layer}" if hasattr(net, "layer4") else ""
        body.weights_note = load_backbone_weights(net, body, name, weights, where)
    if channels is None:
        # Read C off a dummy forward (eval mode, so BatchNorm statistics are not touched), before any EDITS:
        # they keep C, and a data-dependent layer they add cannot run on the meta device that
        # backbone_channels builds on.
        body.eval()
        with torch.no_grad():
            channels = body(torch.zeros(1, 3, 64, 64)).shape[1]
        body.train()
    return body, channels


# Functions f(body, cfg) that change a built backbone in place, applied in order by backbone_from_config after
# its weights are loaded. Empty here; zoo.py adds the edit of each system file that has one.
EDITS = []


def backbone_from_config(cfg: BackboneConfig):
    """The backbone a BackboneConfig (or any model's config, which extends it) names -> (module, C)."""
    body, channels = build_backbone(cfg.backbone, cfg.weights, cfg.feature_layer, cfg.image_size)
    for edit in EDITS:
        edit(body, cfg)
    return body, channels


_CHANNELS = {}   # (name, feature_layer) -> C: --help asks for the same backbones many times


def backbone_channels(name: str, feature_layer: str = "layer4") -> int:
    """C of build_backbone(name, feature_layer) without building it for real: on the meta device no memory is
    allocated and no weight is initialised, so config.py can ask it at parse time (ResNet-101 in ~0.1 s).
    Raises ValueError for a model that is not a torchvision classifier of a supported kind."""
    # Some torchvision builders warn (googlenet, inception_v3) or cannot run on meta tensors (regnet's
    # init copies values): at parse time either must still end in one line, never a traceback.
    key = (name, feature_layer)
    if key in _CHANNELS:
        return _CHANNELS[key]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _CHANNELS[key] = build_backbone(name, "none", feature_layer)[1]
            return _CHANNELS[key]
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"--backbone {name}: could not be built here ({type(e).__name__}); "
                             "use a ResNet, ConvNeXt, Swin, ViT, EfficientNet or MobileNet from torchvision") from None
