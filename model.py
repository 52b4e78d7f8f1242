"""
DR-MoE: a backbone, label queries, a mixture of shared and task-specific experts routed by an input-conditioned gate.

Paper: "Dynamic Routing Mixture of Experts for Enhanced Multi-Label Image Classification", ICLR 2025 submission
(OpenReview, forum gFUomIaycw). Its abstract: input-dependent gating that "adaptively selects and weights both
shared and task-specific experts based on the input image features", against HSQ's gate, which reads the label
feature alone. Its full text could not be read here, so its equation numbers are not given; what its reviews
state (T = 1 task-specific expert per label by default, a BCE loss) is what this file does. Everything else
follows Query2Label (the decoder) and HSQ (the experts and the per-label gate), cited where computed.

    image (B, 3, H_img, W_img)
      -> backbone (backbones.py: ResNet, ConvNeXt, Swin, ViT, ...)   feature map (B, C, h, w)
      -> 1x1 conv to D (identity if C = D), plus 2-D sine positions  memory      (B, N, D), N = h*w tokens
      -> [transformer encoder over the tokens: Q2L only, enc_layers]
      -> label-query transformer decoder (one learnable query per label; Query2Label, Liu et al. 2021)
                                                                     h           (B, L, D)
      -> MoE layer  z[b,l] = h[b,l] + sum_e w[b,l,e] * E_e(h[b,l])   (experts.py, gating.py; moe_layers of them):
         the S shared experts and label l's T task-specific ones
                                                                     z           (B, L, D)
      -> per-label linear classifier  logit[b,l] = <W_l, z[b,l]> + c_l   (Q2L's GroupWiseLinear)
                                                                     logits      (B, L)

The gate reads [h[b,l]; g[b]] where g[b] is the global average of the projected feature map (B, D):
that global context is what makes the routing "dynamic" (input-conditioned per image), where HSQ's gate
reads only h[b,l]. `--gate static|label|image|dynamic` swaps exactly that piece (see gating.py).
The same class is Query2Label (moe_layers=0, an encoder layer, two decoder layers) and HSQ (gate="label");
baselines.py holds their settings and the two baselines that are not label-query models (linear, ML-GCN).

Choices the papers leave open, made here (each is a config field):
- the decoder is post-norm with self-attention, as DETR and Q2L's paper describe; `decoder_self_attn`
  turns self-attention off (Q2L's official code removes it);
- positions are added to the keys only, not the values (DETR, Carion et al. 2020, and Q2L's code);
  the label query is the decoder's starting state, as the Q2L paper describes it (Q2L's code starts
  from zeros and adds the query to every layer's attention query instead, so there the query does not
  flow through the residual path);
- `feature_layer` cuts the backbone early: at 64 px ResNet's layer4 map is 2x2 = 4 tokens, too few for
  label queries to attend to; layer3 gives 4x4 = 16 (the synthetic preset uses it). At 448 px, layer4
  (14x14 = 196 tokens) is the papers' setting.

Label groups (--label-groups K; the per-label model is K = 0, and K = L is the same model, output for output).
The task-specific experts are per label, so DR-MoE's head grows as L: at L = 10,000 it holds 1.3 B parameters
(docs/speed.md). Two changes make it grow with K instead:
- experts per label group: label l uses the T task-specific experts of its group G(l); the K groups come
  from the training labels (prepare(): ML-VPT's CO affinity and spectral clustering, lib/spectral.py), or by
  index with --group-by index;
- group decoding (--group-decoding), as ML-Decoder (Ridnik et al., WACV 2023; its code Alibaba-MIIL/ML_Decoder,
  src_files/ml_decoder/ml_decoder.py): K group queries are decoded instead of L label queries, the gate and
  the experts work on those K rows, and a group-wise classifier expands them to the labels,
      logit[b,l] = <W_l, z[b, G(l)]> + c_l                 every label keeps its own W_l (D,) and c_l.
  ML-Decoder stores the same weights as (K, D, ceil(L/K)) with label l in slot l of the flattened layout,
  i.e. G(l) = l // ceil(L/K) (--group-by index; tests/test_groups.py checks the two layouts agree; its code
  writes ceil(L/K) as int(L/K + 0.999)). Where this differs from ML-Decoder: its queries are a frozen random
  embedding and its decoder has no self-attention; here the decoder stays DR-MoE's (learned queries,
  --decoder-self-attn), and the groups are by co-occurrence by default. ML-Decoder's default is K = 100, which
  its code caps at L; here K > L is refused.

Forward returns (logits (B, L), info), the record every model of the codebase returns (zoo.py):
    info["losses"]         {"balance": --aux-loss-coef x the gate's balance loss}, already weighted: train.py
                           adds every entry to the loss and logs it by name, knowing nothing of what it is
    info["routing"]        {"gate": the last MoE layer's routing record (lib/routing.py), probs = w (B, L, E)}:
                           its health is watched every epoch, evaluate.py analyses the gate per label
                           (with group decoding each label's row is its group's, so the health record
                           weighs a group by its labels while the balance loss weighs the K rows alike)
    info["image_feature"]  g (B, D), detached: what the gate reads, for the analyses
plus whatever routers inside the backbone left (lib/routing.collect: none for a plain backbone).

    python model.py      # the forward pass taken apart stage by stage on two images, every shape printed

This file holds DR-MoE alone and imports only its parts; zoo.py builds it (and every other model) by name.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from backbones import BackboneConfig, backbone_from_config
from experts import Experts
from gating import Gate, expert_names
from lib import spectral
from lib.flags import config_field
from lib.routing import collect, route


@dataclass
class DRMoEConfig(BackboneConfig):
    """DR-MoE's settings (and Q2L's and HSQ's, which are this model with other values: baselines.MODELS["q2l"], ["hsq"], read through zoo.preset),
    on top of the backbone's (backbones.BackboneConfig)."""
    dim: int = config_field(256, "D, width of the label decoder and the experts (q2l: the backbone's C, as Q2L's commands)")
    heads: int = config_field(4, "attention heads in the encoder and the label decoder")
    enc_layers: int = config_field(0, "transformer encoder layers over the image tokens (Q2L: 1)")
    layers: int = config_field(1, "label decoder layers")
    ff_dim: int = config_field(1024, "feed-forward width inside each encoder/decoder layer (q2l: 4 D)")
    dropout: float = config_field(0.1, "dropout in the encoder, decoder and experts")
    decoder_self_attn: bool = config_field(True, "self-attention between label queries (Q2L's code drops it)")
    moe_layers: int = config_field(1, "stacked MoE layers after the decoder (0 = none, i.e. Query2Label)", "mixture of experts")
    gate: str = config_field("dynamic", "what the gate reads: static | label (HSQ) | image | dynamic (DR-MoE)", "mixture of experts")
    shared_experts: int = config_field(2, "S, experts shared by all labels", "mixture of experts")
    task_experts: int = config_field(1, "T, task-specific experts of each label (its own; with --label-groups, its group's)", "mixture of experts")
    expert_hidden: int = config_field(256, "H, hidden width of each expert", "mixture of experts")
    top_k: int = config_field(0, "0 = dense routing; k > 0 keeps each row's k largest gate logits", "mixture of experts")
    gate_temperature: float = config_field(1.0, "tau in softmax(gate logits / tau)", "mixture of experts")
    label_groups: int = config_field(0, "K: task-specific experts per label group instead of per label, so they grow "
                                        "with K, not L (0 = per label; K = L is the same model)", "label groups")
    group_by: str = config_field("cooccurrence", "how labels fall into the K groups: cooccurrence (spectral "
                                 "clustering of the training labels, as ML-VPT's CO groups) | index (ML-Decoder's: "
                                 "label l in group l // ceil(L/K))", "label groups")
    group_decoding: bool = config_field(False, "decode K group queries, not L label queries, and expand them to the "
                                               "L labels with ML-Decoder's group-wise classifier (needs --label-groups)",
                                        "label groups")
    aux_loss_coef: float = config_field(0.0, "weight of every router's load-balancing loss: the gate's (gating.py), "
                                             "and any router a system adds (0 = off)", "mixture of experts")


def sine_positional_encoding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """DETR's 2-D sine encoding, normalised to [0, 2pi] so it does not depend on the map size -> (h*w, D).

    pos[y, x, 2i] = sin(y' / 10000^(2i/(D/2))), pos[y, x, 2i+1] = cos(...), first D/2 dims for y, last for x,
    with y' = 2pi * y / h (and x' alike); computed in the caller's dtype so nothing fp32 enters autocast.
    """
    assert dim % 4 == 0, "sine positional encoding needs D divisible by 4"
    half = dim // 2
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 1) / h * 2 * torch.pi   # (h,)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 1) / w * 2 * torch.pi   # (w,)
    freq = 10000 ** (2 * (torch.arange(half // 2, device=device, dtype=torch.float32)) / half)  # (D/4,)
    def enc(t):   # (n,) -> (n, D/2): interleaved sin/cos per frequency
        a = t[:, None] / freq                                          # (n, D/4)
        return torch.stack([a.sin(), a.cos()], dim=-1).flatten(1)      # (n, D/4, 2) -> (n, D/2)
    pos = torch.cat([enc(ys)[:, None, :].expand(h, w, half),          # (h, w, D/2) rows
                     enc(xs)[None, :, :].expand(h, w, half)], dim=-1)  # (h, w, D/2) columns -> (h, w, D)
    return pos.reshape(h * w, dim).to(dtype or torch.float32)          # (N, D)


class EncoderLayer(nn.Module):
    """One post-norm transformer encoder layer over the image tokens (DETR's, as Q2L uses it)."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) tokens, pos (N, D) -> (B, N, D). Positions enter queries and keys, not values (DETR)."""
        qk = x + pos
        x = self.norm1(x + self.drop(self.attn(qk, qk, x, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ff(x)))


class LabelDecoderLayer(nn.Module):
    """One post-norm decoder layer: [self-attention between queries] -> cross-attention to tokens -> FFN."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, self_attn: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attn else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm0 = nn.LayerNorm(dim) if self_attn else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q (B, L, D) label queries, memory (B, N, D) image tokens, pos (N, D) -> (B, L, D)."""
        if self.self_attn is not None:
            q = self.norm0(q + self.drop(self.self_attn(q, q, q, need_weights=False)[0]))
        # Positions go into the keys only: where a token is decides who attends, not what it says (DETR).
        q = self.norm1(q + self.drop(self.cross_attn(q, memory + pos, memory, need_weights=False)[0]))
        return self.norm2(q + self.drop(self.ff(q)))


class MoELayer(nn.Module):
    """z[b,l] = h[b,l] + sum_e w[b,l,e] * E_e(h[b,l]): S shared + T task-specific experts, weighted by the gate."""

    routes = True   # lib/routing.routes: this module routes (a method that trains routing may take it)

    def __init__(self, cfg: DRMoEConfig, rows: int, owners: int):
        """rows: the features it mixes (L labels, or K groups with group decoding); owners: how many own
        task-specific experts (rows, or K groups whose labels share theirs)."""
        super().__init__()
        D = cfg.dim
        self.experts = Experts(owners, D, cfg.expert_hidden, cfg.shared_experts, cfg.task_experts, cfg.dropout)
        self.gate = Gate(cfg.gate, rows, D, self.experts.num_experts, cfg.top_k, cfg.gate_temperature)

    def forward(self, h: torch.Tensor, g: torch.Tensor, group: torch.Tensor = None):
        """h (B, L, D) label features, g (B, D) image feature, group (L,) each label's owner of task-specific
        experts (None: its own) -> (z (B, L, D), weights (B, L, E) fp32, aux)."""
        weights, aux_loss = self.gate(h, g)                               # (B, L, E) fp32, scalar
        expert_out = self.experts(h, group)                               # (B, L, E, D)
        # The residual keeps the decoder's feature reachable whatever the gate does (an untrained gate
        # mixes experts that are noise); the paper's MoE output is added to it, not substituted for it.
        z = h + torch.einsum("ble,bled->bld", weights.to(expert_out.dtype), expert_out)   # (B, L, D)
        return z, weights, aux_loss


class DRMoE(nn.Module):
    """The label-query family: DR-MoE, HSQ (gate="label") and Query2Label (moe_layers=0) are this class.

    They share every piece but the MoE layers and what the gate reads, so a comparison between them
    measures exactly the ideas the papers differ in (baselines.py spells out each one's settings).
    """

    def __init__(self, cfg: DRMoEConfig):
        super().__init__()
        self.cfg = cfg
        L, D = cfg.num_labels, cfg.dim
        K = cfg.label_groups or L                                          # K = L: every label its own group
        if not 1 <= K <= L:
            raise ValueError(f"--label-groups {K}: must be between 1 and the {L} labels (0 = one group per label)")
        if cfg.group_decoding and not cfg.label_groups:
            raise ValueError("--group-decoding needs --label-groups K: the number of group queries to decode")
        # Label groups (the docstring's "Label groups"): with K < L the task-specific experts are the groups',
        # and with group decoding the decoder, the gate and the experts all work on K rows instead of L.
        self.grouped = K < L
        rows = K if cfg.group_decoding else L                              # queries decoded, rows the gate mixes
        owners = K if self.grouped else rows                               # who owns task-specific experts
        if cfg.group_by == "index" and math.ceil(L / K) * (K - 1) >= L:
            # ML-Decoder's layout puts ceil(L/K) labels in each group, so some K leave the last groups empty
            # (L = 80, K = 30: 27 groups used): their experts and queries would train on nothing.
            raise ValueError(f"--group-by index with L = {L}, K = {K} leaves groups empty (ceil(L/K) = "
                             f"{math.ceil(L / K)} labels each); choose K with ceil(L/K) (K - 1) < L, or --group-by cooccurrence")
        if self.grouped or cfg.group_decoding:
            # Label l's group: ML-Decoder's by index until prepare() clusters the training labels. A buffer,
            # so a checkpoint keeps its groups; per-label models have none, so their checkpoints are unchanged.
            self.register_buffer("label_group", torch.arange(L) // math.ceil(L / K))
        self.backbone, channels = backbone_from_config(cfg)
        # C -> D per location. When C already equals D (Q2L's ResNet-101 at D = 2048) there is nothing to
        # project, and Q2L's official code (without --keep_input_proj) uses no layer here either.
        self.proj = nn.Conv2d(channels, D, kernel_size=1) if channels != D else nn.Identity()
        self.encoder = nn.ModuleList(EncoderLayer(D, cfg.heads, cfg.ff_dim, cfg.dropout)
                                     for _ in range(cfg.enc_layers))
        self.queries = nn.Parameter(torch.randn(rows, D) * 0.02)           # one learnable query per label (or group)
        self.no_weight_decay = ("queries",)   # train.decay_roles: a learned input, not a weight to shrink
        self.decoder = nn.ModuleList(LabelDecoderLayer(D, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.decoder_self_attn)
                                     for _ in range(cfg.layers))
        self.moe = nn.ModuleList(MoELayer(cfg, rows, owners) for _ in range(cfg.moe_layers))
        # Per-label classifier: label l has its own weight vector W_l (D,) and bias c_l, not one shared Linear.
        self.cls_weight = nn.Parameter(torch.empty(L, D).uniform_(-D ** -0.5, D ** -0.5))
        self.cls_bias = nn.Parameter(torch.zeros(L))

    def forward(self, x: torch.Tensor):
        """x (B, 3, H_img, W_img) normalised images -> (logits (B, L), info dict)."""
        f = self.proj(self.backbone(x))                                   # (B, D, h, w)
        B, D, h, w = f.shape
        g = f.mean(dim=(2, 3))                                            # (B, D) global image feature for the gate
        memory = f.flatten(2).transpose(1, 2)                             # (B, D, h*w) -> (B, N, D)
        pos = sine_positional_encoding(h, w, D, f.device, memory.dtype)   # (N, D)
        for layer in self.encoder:
            memory = layer(memory, pos)                                   # (B, N, D)
        hq = self.queries.unsqueeze(0).expand(B, -1, -1)                  # (L, D) -> (B, L, D)
        for layer in self.decoder:
            hq = layer(hq, memory, pos)                                   # (B, L, D)
        weights, aux_loss = None, f.new_zeros((), dtype=torch.float32)
        # Experts shared within label groups (K < L, L rows): each label's row goes to its group's experts.
        group = self.label_group if self.grouped and not self.cfg.group_decoding else None
        for layer in self.moe:
            hq, weights, aux = layer(hq, g, group)                        # (B, L, D), (B, L, E)
            aux_loss = aux_loss + aux / len(self.moe)                     # mean over layers: same scale for any depth
        if self.cfg.group_decoding:
            # ML-Decoder's group-wise classifier, written per label: label l reads its group's decoded feature
            # with its own weights, logit[b,l] = <W_l, z[b, group(l)]> + c_l (its GroupFC, (K, D, ceil(L/K))).
            hq = hq[:, self.label_group]                                  # (B, K, D) -> (B, L, D)
            weights = None if weights is None else weights[:, self.label_group]   # (B, K, E) -> (B, L, E)
        logits = (hq * self.cls_weight).sum(-1) + self.cls_bias           # (B, L)
        # The record (docstring): what routers in the backbone left, then the gate's loss and routing. With
        # several MoE layers the last layer's weights are reported (the one feeding the classifier).
        losses, routing = collect(self.backbone)
        if self.moe:
            losses = {"balance": self.cfg.aux_loss_coef * aux_loss, **losses}
            routing = {"gate": route(weights, names=expert_names(self.cfg.shared_experts, self.cfg.task_experts)),
                       **routing}
        return logits, {"losses": losses, "routing": routing, "image_feature": g.detach()}

    def prepare(self, targets, classes=None, seed: int = 0, verbose: bool = True):
        """--label-groups K --group-by cooccurrence: the K groups from the training labels (N, L) (zoo.prepare).

        ML-VPT's CO affinity (lib/spectral.py, tau = 2) and its spectral clustering, then the groups numbered
        by their first label, so that K = L numbers each label's group as the label itself.
        """
        if not hasattr(self, "label_group") or self.cfg.group_by != "cooccurrence":
            return
        K, L = self.cfg.label_groups, self.cfg.num_labels
        plus, _ = spectral.affinities(*spectral.label_cooccurrence(targets), tau=2.0)   # (L, L) labels that appear together
        # ML-VPT's 1,000 k-means restarts where they cost seconds; above 1,000 labels one restart over (L, K)
        # takes seconds (about 4 s at L = 10,000, K = 100 on a 2-core CPU), so the best of 10. The embedding
        # is a dense eigendecomposition of (L, L), O(L^3): minutes at L = 10,000, once, before training.
        assign = spectral.spectral_groups(plus, K, seed=seed, restarts=1000 if L <= 1000 else 10)   # (L,), none empty
        _, first = np.unique(assign, return_index=True)                        # (K,) each group's first label
        assign = np.argsort(np.argsort(first))[assign]                         # renumbered in that order
        self.label_group.copy_(torch.as_tensor(assign, dtype=torch.long))
        if verbose:
            print(f"label groups: {K} groups of {L} labels by co-occurrence, sizes "
                  f"{np.bincount(assign, minlength=K).tolist()}")


if __name__ == "__main__":
    # A worked example: DR-MoE at the CPU demo size (ResNet-18 cut after layer3, 64 px, D = 256, S = 2, T = 1)
    # for L = 5 labels, the forward pass taken apart stage by stage on B = 2 random images.
    torch.manual_seed(0)
    cfg = DRMoEConfig(num_labels=5, feature_layer="layer3", image_size=64)
    model = DRMoE(cfg).eval()
    show = lambda name, t, what: print(f"{name:<28} {str(tuple(t.shape)):<17} {what}")
    x = torch.randn(2, 3, 64, 64)
    show("images x", x, "(B, 3, H_img, W_img)")
    with torch.no_grad():
        fmap = model.backbone(x)
        show("backbone(x)", fmap, "(B, C, h, w): ResNet-18 cut after layer3, C = 256")
        f = model.proj(fmap)
        g = f.mean(dim=(2, 3))
        memory = f.flatten(2).transpose(1, 2)
        show("memory", memory, "(B, N, D): N = h*w image tokens (C = D here, so no projection)")
        show("g", g, "(B, D): the global image feature the gate reads")
        pos = sine_positional_encoding(f.shape[2], f.shape[3], cfg.dim)
        show("sine positions", pos, "(N, D), added to the keys only")
        hq = model.queries.unsqueeze(0).expand(2, -1, -1)
        show("label queries", hq, "(B, L, D): one learned query per label")
        for layer in model.decoder:
            hq = layer(hq, memory, pos)
        show("decoder -> h", hq, "(B, L, D): one feature per label (Query2Label)")
        moe = model.moe[0]
        w, aux = moe.gate(hq, g)
        show("gate weights w", w, "(B, L, E): E = S + T = 3, each row sums to 1")
        e = moe.experts(hq)
        show("experts(h)", e, "(B, L, E, D)")
        z, _, _ = moe(hq, g)
        show("z = h + sum_e w E_e(h)", z, "(B, L, D)")
        logits = (z * model.cls_weight).sum(-1) + model.cls_bias
        show("logits", logits, "(B, L): <W_l, z[b, l]> + c_l, one classifier per label")
        full, info = model(x)
    print(f"the stages above = model(x): max |difference| = {(full - logits).abs().max():.1e}; "
          f"info holds {sorted(info)}")
    # Label groups: the 5 labels in K = 2 groups, decoded as 2 group queries and expanded to the labels.
    grouped = DRMoE(DRMoEConfig(num_labels=5, feature_layer="layer3", image_size=64, label_groups=2,
                                group_decoding=True)).eval()
    with torch.no_grad():
        logits, _ = grouped(x)
    print(f"--label-groups 2 --group-decoding: queries {tuple(grouped.queries.shape)} (K, D), label -> group "
          f"{grouped.label_group.tolist()}, task experts {tuple(grouped.moe[0].experts.task_w1.shape)} (K, T, D, H), "
          f"logits {tuple(logits.shape)} (B, L)")
