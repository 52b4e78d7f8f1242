"""
Mixture of experts inside the backbone: the MLP of chosen ViT / ConvNeXt / Swin blocks becomes N experts of
the same shape, and every token (a ViT patch, a ConvNeXt or Swin map position) is sent to k of them on its own.
(The paper studies ViT and ConvNeXt; Swin V1 is this project's extension: its blocks hold the same MLP, in
stages like ConvNeXt's; Swin V2 normalises after the MLP, which this layer does not model, and is refused.
A ResNet's bottleneck blocks have no MLP to replace, so it gets none.)

Seed paper: Videau, Leite, Schoenauer, Teytaud, "Mixture of Experts in Image Classification: What's the
Sweet Spot?" (arXiv 2411.18322, TMLR 2025). No code was released, and the stored copies of the paper gave
only its abstract: "a simple linear router performs best", "a Last-2 placement heuristic offers the most
robust cross-architecture choice, with Every-2 slightly better for ViT". Which implementation it trained
could not be read. The rest follows V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of
Experts", github google-research/vmoe), the standard sparse MoE for vision, where this file says so and
names vmoe's file, with two defaults that differ from V-MoE's and a flag for each: no router noise
(V-MoE adds N(0, (1/N)^2) to the logits in training: --backbone-router-noise 1), and Switch's balance loss
N sum_i f_i P_i (V-MoE's importance and load losses: --backbone-balance vmoe). The sweet-spot study ran with
both defaults.

The layer, for a token x (D,) after the block's norm, with a bias-free linear router W_r (D, N):
    G(x) = softmax(x W_r)                   over all N experts (vmoe/nn/routing.py: Dense(use_bias=False), softmax)
    y    = x_res + sum_{i in TopK(G(x))} G(x)_i E_i(x)
The kept weights are not renormalised (vmoe/moe.py combines with the raw softmax values); --backbone-renorm
divides them by their sum, as the head gate does with top-k. E_i is the block's own MLP (ViT: Linear D->H,
GELU, dropout, Linear H->D, dropout; Swin the same with H = 4D; ConvNeXt: Linear C->4C, GELU, Linear 4C->C).
x_res is the block's residual stream: a token that no expert takes adds nothing and passes through unchanged.

Capacity (--backbone-capacity c, 0 = unlimited): each expert takes at most C = ceil(c * T * k / N) of the T
tokens of a forward pass (vmoe/moe.py: capacity = ceil(num_tokens * k * capacity_factor / num_experts); here
one group = the whole batch). Which tokens get the places: Batch Prioritized Routing (Riquelme et al. 2021,
Sec. 4.1; vmoe/moe.py): tokens are ranked by their largest routing weight, and every token's first choice
is placed before any token's second choice; the rest overflow.

Sparse compute: only the k chosen experts run for a token. Assignments are sorted by expert, each expert's
tokens gathered into one contiguous block, one matmul pair per expert, and the results scattered back
(index_add). FLOPs scale with k, not N (studies/bench.py measures the step time).

Memory. How many tokens an expert gets changes every step, so its two matmuls would see a new shape each
time; on the CPU every new shape leaves memory behind (oneDNN keeps a primitive per shape, and glibc's malloc
stops returning variable-size blocks to the system): a vit_tiny with every-2 MoE kept growing from epoch to
epoch while the dense model stayed flat (docs/backbones.md has the figures). So each expert's block is padded with zero
rows to a multiple of ROW_BUCKET = 256 (cut off again after the matmuls: the padding's outputs are never
used and get no gradient). A handful of shapes recur, and memory stays flat (docs/backbones.md measures it:
python -m studies.bench --only memory). The cost: under 256 extra rows per expert and layer, against the
~2,000 tokens each of 4 experts gets from a 64-image batch of vit_tiny at k = 2.

Placements (--backbone-moe), our reading of the names. ConvNeXt (and Swin) has stages; a ViT has none, so its
blocks are taken in pairs, V-MoE's unit (vmoe/configs/vmoe_paper/common.py: "Every-2" = blocks 1, 3, 5, ..., "Last-n"
= the last n of those), which makes "the last 2 stages' final blocks" the same phrase for both:
    placement  ConvNeXt / Swin (stages)                  ViT with B blocks (pairs)        ViT-B/16 (12)
    last2      final block of each of the last 2 stages  blocks B-3, B-1                  9, 11
    last3      final block of each of the last 3 stages  blocks B-5, B-3, B-1             7, 9, 11
    every2     blocks 1, 3, 5, ... of every stage        blocks 1, 3, 5, ...              1, 3, ..., 11
    stage      every block of the last stage             the last pair: B-2, B-1          10, 11

Initialisation. With pretrained weights (upcycle=True) every expert starts as a copy of the dense MLP
("sparse upcycling", Komatsuzaki et al. 2023). The issue asks for the router at zero; exactly zero makes
every token's top-k a tie, which topk breaks by expert index: every token goes to experts 0..k-1, and with a
capacity all but C tokens overflow. So the router starts at N(0, 0.001^2) (UPCYCLE_ROUTER_STD), logits of
order 0.001 * sqrt(D), G = 1/N to within a few percent, ties broken by the token. The first forward pass then
equals the dense model's (all experts being the same MLP) exactly with --backbone-renorm and capacity 0,
and gives about (k/N) * MLP(x) without renormalisation: --backbone-renorm is the choice to make when
fine-tuning a pretrained dense model. One more reason not to use renorm with k = 1 from scratch: the one
kept weight is then always 1, and the router learns only from the balance loss. From scratch each expert
is initialised as the dense MLP would be, independently, and the router N(0, 0.02^2).

A capacity makes a token's output depend on the rest of the batch (whether its expert was full), so with
--backbone-capacity > 0 scores change a little with the batch size and with which images share a batch;
with capacity 0 (the default) every image is routed on its own.

Balance: by default the Switch / Shazeer loss of gating.py, N * sum_i f_i P_i over the layer's tokens (f_i:
fraction of the T*k assignments going to expert i, P_i: mean router probability; Switch Transformer's eq. 4);
--backbone-balance vmoe takes V-MoE's two losses instead (vmoe_balance: the importance, CV^2 of each expert's
summed gate, and with router noise the load, CV^2 of each expert's chance to be chosen under a fresh draw of
the noise). Routers run in float32 under AMP.

How this file plugs into the rest (a file a DR-MoE fork can delete): its fields are BackboneMoEConfig, checked
by check(); zoo.py lists `edit` in backbones.EDITS, so every model's backbone gets its MoE layers right after
its weights are loaded, whatever the head. A layer sits inside a torchvision block, whose forward returns the
block's output only, so each SparseMoE leaves its forward's routing record and balance loss on itself
(route_record, aux_loss) and the model's forward collects them (lib/routing.collect): the balance loss,
averaged over the layers and weighted by --aux-loss-coef, as "backbone balance"; each layer's routing as
"backbone moe i", whose health the loop watches like any router's.

Shapes (legend in experts.py; here T = tokens in the batch, N = experts of the layer, H = expert hidden):
    ViT block   y (B, n, D) -> (B, n, D)        ConvNeXt / Swin block   y (B, h, w, C) -> (B, h, w, C)

    python backbone_moe.py   # a worked example: 6 tokens routed to 2 of 4 experts, the sum checked token by token
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2
from torchvision.models.vision_transformer import EncoderBlock

from backbones import build_backbone
from gating import switch_balance
from lib.flags import config_field
from lib.routing import route

PLACEMENTS = ("none", "last2", "last3", "every2", "stage")
BALANCES = ("switch", "vmoe")
UPCYCLE_ROUTER_STD = 1e-3   # the upcycled router's start: near zero, but not tied (docstring, "Initialisation")
ROW_BUCKET = 256            # an expert's block of tokens is padded to a multiple of this (docstring, "Memory")


@dataclass
class BackboneMoEConfig:
    """The flags of this file, fields of zoo.ModelConfig (config_field's third argument: the --help section)."""
    backbone_moe: str = config_field("none", "MoE in the backbone's MLPs (ViT, ConvNeXt, Swin): " + " | ".join(PLACEMENTS) +
                                     " (backbone_moe.py)", "backbone MoE")
    backbone_experts: int = config_field(8, "N, experts per backbone MoE layer", "backbone MoE")
    backbone_top_k: int = config_field(1, "k experts per token", "backbone MoE")
    backbone_capacity: float = config_field(0.0, "capacity factor c: an expert takes at most ceil(c T k / N) of "
                                                 "a batch's T tokens, the rest skip it (0 = no limit)", "backbone MoE")
    backbone_renorm: bool = config_field(False, "renormalise the k kept router weights to sum to 1 (V-MoE does not; "
                                                "an upcycled model then starts equal to the dense one)", "backbone MoE")
    backbone_router_noise: float = config_field(0.0, "std of the Gaussian noise on the router logits in training, in "
                                                     "units of 1/N (V-MoE: 1.0; 0 = none, as the sweet-spot study ran)",
                                                "backbone MoE")
    backbone_balance: str = config_field("switch", "the balance loss --aux-loss-coef weighs: switch (N sum f P, as "
                                                   "the head gate) | vmoe (V-MoE's importance + load losses; with "
                                                   "its noise, --aux-loss-coef 0.005 as its configs)", "backbone MoE")


@dataclass
class MoEConfig:
    """One MoE layer's settings, read from BackboneMoEConfig's fields by moe_config()."""
    placement: str = "none"
    experts: int = 8
    top_k: int = 1
    capacity: float = 0.0
    renorm: bool = False
    noise: float = 0.0          # router noise in training, std noise / N (V-MoE: 1.0); 0 = none
    balance: str = "switch"     # the balance loss: switch (N sum f P) | vmoe (importance + load)
    aux_coef: float = 0.0       # the weight of the balance loss in the training loss (--aux-loss-coef)


def moe_config(cfg) -> MoEConfig:
    """A model config's backbone_* fields (and --aux-loss-coef) -> the layers' MoEConfig."""
    return MoEConfig(cfg.backbone_moe, cfg.backbone_experts, cfg.backbone_top_k, cfg.backbone_capacity,
                     cfg.backbone_renorm, cfg.backbone_router_noise, cfg.backbone_balance,
                     getattr(cfg, "aux_loss_coef", 0.0))


class SparseMoE(nn.Module):
    """N experts shaped like one MLP, a linear router, top-k sparse dispatch. x (..., D) -> (..., D)."""

    routes = True   # lib/routing.routes: this module routes

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int, capacity: float = 0.0,
                 renorm: bool = False, dropout: float = 0.0, noise: float = 0.0, balance: str = "switch",
                 aux_coef: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"--backbone-top-k must be in 1..{experts} (the experts), got {top_k}")
        if balance not in BALANCES:
            raise ValueError(f"--backbone-balance must be one of {BALANCES}, got {balance!r}")
        self.num_experts, self.top_k, self.capacity, self.renorm = experts, top_k, capacity, renorm
        self.noise, self.balance = noise, balance
        self.router = nn.Linear(dim, experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        # Expert i's weights are slice i of one tensor each: (N, D, H), (N, H), (N, H, D), (N, D).
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(experts, dim))
        self.no_weight_decay = ("b1", "b2")   # biases, stacked: train.decay_roles tells them by this list
        self.drop = nn.Dropout(dropout)
        for i in range(experts):   # as a dense Linear would be; the callers re-initialise as their MLP does
            nn.init.xavier_uniform_(self.w1[i].T)
            nn.init.xavier_uniform_(self.w2[i].T)
        # What lib/routing.collect reads after every forward (see the docstring): this layer's balance loss
        # and routing record, the names they are logged under, and the loss's weight.
        self.aux_loss, self.route_record = None, None
        self.route_name, self.loss_name, self.loss_weight = "backbone moe", "backbone balance", aux_coef
        self.pad_rows = True   # pad each expert's rows to ROW_BUCKET (docstring, "Memory"); off while FLOPs are counted

    def __getstate__(self):
        # copy.deepcopy (train.py's EMA copy) refuses tensors that carry autograd history: the last batch's
        # loss and record are not part of the module's state, so copies start without them.
        return {**super().__getstate__(), "aux_loss": None, "route_record": None}

    def idle_parameters(self) -> int:
        """Parameters a token does not run: the N - k experts it is not sent to (zoo.activated_parameters)."""
        per_expert = sum(p[0].numel() for p in (self.w1, self.b1, self.w2, self.b2))
        return (self.num_experts - self.top_k) * per_expert

    def upcycle(self, fc1: nn.Linear, fc2: nn.Linear):
        """Every expert a copy of the dense MLP fc2(GELU(fc1(x))); router near zero (see the docstring)."""
        with torch.no_grad():
            self.w1.copy_(fc1.weight.T.expand_as(self.w1))   # Linear stores (out, in); experts (in, out)
            self.b1.copy_(fc1.bias.expand_as(self.b1))
            self.w2.copy_(fc2.weight.T.expand_as(self.w2))
            self.b2.copy_(fc2.bias.expand_as(self.b2))
            self.router.weight.normal_(0.0, UPCYCLE_ROUTER_STD)

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """E_i(x) for x (n, D) -> (n, D): the MLP's Linear, GELU, dropout, Linear, dropout."""
        return self.drop(self.drop(F.gelu(x @ self.w1[i] + self.b1[i])) @ self.w2[i] + self.b2[i])

    def router_logits(self, x: torch.Tensor):
        """x (T, D) -> (the logits x W_r (T, N), the same with V-MoE's training noise), both fp32. The noise,
        N(0, (noise / N)^2) per logit (vmoe/nn/routing.py: noise_std = 1 / num_experts * noise_std), only in
        training and only with --backbone-router-noise > 0; otherwise the two are one tensor."""
        with torch.autocast(x.device.type, enabled=False):   # routers in fp32 (gating.py says why)
            logits = x.float() @ self.router.weight.float().T                      # (T, N)
        if self.training and self.noise > 0:
            return logits, logits + torch.randn_like(logits) * (self.noise / self.num_experts)
        return logits, logits

    def route(self, x: torch.Tensor, logits=None):
        """x (T, D) [and its router logits, noisy in training] -> (probs G (T, N) fp32, chosen (T, k) expert
        indices, token (A,), expert (A,), weight (A,)): the A kept assignments."""
        T, N, k = x.shape[0], self.num_experts, self.top_k
        logits = self.router_logits(x)[1] if logits is None else logits
        probs = F.softmax(logits, dim=-1)                                         # G(x), (T, N)
        top_w, top_i = probs.topk(k, dim=-1)                                      # (T, k) each
        # Assignments rank-major: all first choices, then all second choices (BPR's order, vmoe/moe.py).
        order = torch.arange(T, device=x.device)
        if self.capacity > 0:
            # Within a rank, tokens by their largest router probability, highest first (Batch Prioritized
            # Routing), before any renormalisation: the priority is the router's confidence.
            order = torch.argsort(top_w[:, 0], descending=True, stable=True)
        if self.renorm:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        token = order.repeat(k)                                                    # (T*k,)
        expert = top_i[order].T.reshape(-1)                                        # (k, T) -> (T*k,)
        weight = top_w[order].T.reshape(-1)                                        # (T*k,)
        if self.capacity > 0:
            cap = math.ceil(self.capacity * T * k / N)
            # Place of each assignment in its expert's queue: how many earlier assignments chose it.
            place = (F.one_hot(expert, N).cumsum(0) - 1).gather(1, expert[:, None])[:, 0]   # (T*k,)
            keep = place < cap
            token, expert, weight = token[keep], expert[keep], weight[keep]
        return probs, top_i, token, expert, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                            # (..., D) -> (T, D)
        clean, noisy = self.router_logits(flat)                                    # (T, N) each
        probs, chosen, token, expert, weight = self.route(flat, noisy)
        # Group the kept assignments by expert: one gather, one matmul pair per expert, one scatter back.
        by_expert = torch.argsort(expert, stable=True)
        token, expert, weight = token[by_expert], expert[by_expert], weight[by_expert]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        chunks = flat[token].split(counts)                                         # N blocks of (n_i, D)
        # Each block is padded with zero rows to a multiple of ROW_BUCKET before its matmuls, and the padding
        # cut off after: a few shapes recur instead of a new one per expert per step (docstring, "Memory").
        bucket = ROW_BUCKET if self.pad_rows else 1   # zoo.flops_per_image counts the real rows only
        out_rows = torch.cat([self.expert(i, F.pad(c, (0, 0, 0, -len(c) % bucket)))[:len(c)]
                              for i, c in enumerate(chunks)])                      # (A, D)
        out = torch.zeros_like(flat).index_add_(0, token, (out_rows * weight[:, None]).to(flat.dtype))
        # Balance. switch (gating.switch_balance): f = share of the T*k assignments before overflow, P = mean G.
        # vmoe: V-MoE's importance and load losses (vmoe_balance).
        T = flat.shape[0]
        f = torch.bincount(chosen.reshape(-1), minlength=self.num_experts).float() / (T * self.top_k)
        self.aux_loss = (switch_balance(probs.mean(0), f) if self.balance == "switch" else
                         vmoe_balance(clean, noisy, self.top_k, self.noise / self.num_experts))
        # The routing record (lib/routing.py): each image's mean router probability as its one routing row
        # (B, 1, N), with gradient (what a method that trains routing reads); the load f; the tokens' own
        # rows for the entropy; the share of assignments that overflowed the capacity; and, as an extra,
        # the distinct experts an image's tokens chose among all their k choices (a ViT's class token
        # included: it is routed like the patches).
        # (T, k, N) -> (T, N) -> (B, T/B, N) -> (B, N): how many of the image's tokens chose each expert
        per_image = F.one_hot(chosen, self.num_experts).sum(1).reshape(shape[0], -1, self.num_experts).sum(1)
        image_probs = probs.reshape(shape[0], -1, self.num_experts).mean(1)    # (B, T/B, N) -> (B, N)
        self.route_record = route(image_probs[:, None], load=f, k=self.top_k, kind="backbone", rows=probs,
                                  dropped=torch.tensor(1.0 - len(token) / (T * self.top_k), device=flat.device),
                                  extra={"experts_per_image": (per_image > 0).sum(1).float().mean().detach()})
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, capacity={self.capacity or 'unlimited'}, "
                f"renorm={self.renorm}, noise={self.noise}, balance={self.balance}")


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the last axis, std with 1/n (jnp.std): 0 when every entry is equal."""
    return (v.std(-1, unbiased=False) / v.mean(-1)) ** 2


def vmoe_balance(clean: torch.Tensor, noisy: torch.Tensor, k: int, std: float) -> torch.Tensor:
    """V-MoE's auxiliary losses (Riquelme et al. 2021, Appendix A.2; vmoe/nn/routing.py), each of weight 1:
        importance = CV^2( sum over tokens of softmax(clean logits) )          how much routing mass each expert gets
        load       = CV^2( mean over tokens of P(expert i in the top-k) )     under a fresh draw of the noise, where
                     P = 1 - Phi((k-th largest noisy logit - clean logit_i) / std)
    clean, noisy (T, N) logits; std the noise's std (noise / N). Without noise (std 0) the load is not defined
    and only the importance counts, as in V-MoE's deterministic router."""
    loss = cv_squared(F.softmax(clean, dim=-1).sum(0))
    if std > 0:
        threshold = noisy.topk(k, dim=-1).values[:, -1:]                          # (T, 1) the k-th noisy logit
        p = 1 - torch.distributions.Normal(0.0, 1.0).cdf((threshold - clean) / std)   # (T, N)
        loss = loss + cv_squared(p.mean(0))
    return loss


def chosen_blocks(stages, placement: str):
    """stages: lists of blocks (ConvNeXt's stages, or a ViT's blocks in pairs) -> the blocks to make MoE."""
    if placement == "last2":
        return [s[-1] for s in stages[-2:]]
    if placement == "last3":
        return [s[-1] for s in stages[-3:]]
    if placement == "every2":
        return [b for s in stages for b in s[1::2]]
    if placement == "stage":
        return list(stages[-1])
    raise ValueError(f"--backbone-moe must be one of {PLACEMENTS}, got {placement!r}")


def _vit_like_moe(mlp: nn.Sequential, cfg: MoEConfig, upcycle: bool) -> SparseMoE:
    """A SparseMoE for torchvision's MLP (ViT's MLPBlock, Swin's MLP): Linear, GELU, Dropout, Linear, Dropout."""
    fc1, fc2 = mlp[0], mlp[3]
    moe = SparseMoE(fc1.in_features, fc1.out_features, cfg.experts, cfg.top_k, cfg.capacity, cfg.renorm,
                    dropout=mlp[2].p, noise=cfg.noise, balance=cfg.balance, aux_coef=cfg.aux_coef)
    if upcycle:
        moe.upcycle(fc1, fc2)
    else:   # ViT's MLPBlock and Swin's block init their MLP alike: xavier-uniform weights, N(0, 1e-6^2) biases
        nn.init.normal_(moe.b1, std=1e-6)
        nn.init.normal_(moe.b2, std=1e-6)
    return moe


def add_moe(net: nn.Module, cfg: MoEConfig, upcycle: bool):
    """Replace the MLP of the blocks `cfg.placement` names, in place, in a torchvision ViT, ConvNeXt or Swin."""
    vit_blocks = [m for m in net.modules() if isinstance(m, EncoderBlock)]
    if vit_blocks:
        # A ViT's blocks in pairs, from the end backwards (an odd count leaves block 0 alone, unpaired).
        pairs = [vit_blocks[i - 1:i + 1] for i in range(len(vit_blocks) - 1, 0, -2)][::-1]
        for block in chosen_blocks(pairs, cfg.placement):
            block.mlp = _vit_like_moe(block.mlp, cfg, upcycle)
        return
    # Stages: the Sequentials made only of blocks (ConvNeXt's and Swin's; Swin's patch-merging layers sit
    # between them, outside).
    stages = [list(s) for s in net.modules() if isinstance(s, nn.Sequential) and len(s) and
              all(isinstance(b, (CNBlock, SwinTransformerBlock)) for b in s)]
    if any(isinstance(b, SwinTransformerBlockV2) for s in stages for b in s):
        # Swin V2 normalises after its MLP, x + norm2(mlp(x)): an overflowed token would add norm2's bias
        # instead of nothing, and the upcycled layer would not start at k/N of the MLP (the norm undoes it).
        raise ValueError(f"--backbone-moe {cfg.placement}: Swin V2 blocks normalise after their MLP (post-norm), "
                         "which the MoE layer's pass-through and upcycling do not model; use swin_t/s/b (V1)")
    if not stages:
        raise ValueError(f"--backbone-moe {cfg.placement}: the backbone has no ViT, ConvNeXt or Swin blocks, whose "
                         "MLP the experts replace (a ResNet's blocks have none): use a vit_*, convnext_* or swin_* "
                         "backbone, or --backbone-moe none")
    for block in chosen_blocks(stages, cfg.placement):
        if isinstance(block, SwinTransformerBlock):   # its MLP reads the (B, h, w, C) map: so does the MoE
            block.mlp = _vit_like_moe(block.mlp, cfg, upcycle)
            continue
        fc1, fc2 = block.block[3], block.block[5]   # dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute
        moe = SparseMoE(fc1.in_features, fc1.out_features, cfg.experts, cfg.top_k, cfg.capacity, cfg.renorm,
                        noise=cfg.noise, balance=cfg.balance, aux_coef=cfg.aux_coef)
        if upcycle:
            moe.upcycle(fc1, fc2)
        else:   # torchvision's ConvNeXt init for Linear: trunc_normal(std 0.02) weights, zero biases
            nn.init.trunc_normal_(moe.w1, std=0.02)
            nn.init.trunc_normal_(moe.w2, std=0.02)
        # The MoE takes the (B, h, w, C) positions where the two Linears did, between the block's Permutes.
        block.block = nn.Sequential(*block.block[:3], moe, block.block[6])


def moe_layers(model: nn.Module):
    """Every SparseMoE in `model`, in order (empty for a dense backbone)."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def edit(body: nn.Module, cfg):
    """backbones.EDITS's entry: MoE layers into a built backbone as the model config's backbone_* fields say
    (nothing for --backbone-moe none). Upcycled (every expert a copy of the pretrained MLP) when the backbone
    was loaded with weights."""
    if cfg.backbone_moe != "none":
        add_moe(body, moe_config(cfg), upcycle=cfg.weights.lower() != "none")


def moe_backbone(name: str, moe: MoEConfig, weights: str = "none", feature_layer: str = "layer4",
                 image_size: int = 224):
    """build_backbone with MoE layers in it -> (module, C): for tests and worked examples."""
    body, channels = build_backbone(name, weights, feature_layer, image_size)
    if moe.placement != "none":
        add_moe(body, moe, upcycle=weights.lower() != "none")
    return body, channels


CONFIG = BackboneMoEConfig   # this file's fields, joined into zoo.ModelConfig: one --flag each


def check(tcfg, mcfg, error):
    """The values of this file's flags that cannot work, caught before anything is built: error(one line)."""
    ranges = [  # (field, ok, what is allowed)
        # a mixture of one expert would be the dense block again
        ("backbone_experts", lambda v: v >= 2, "an integer >= 2"),
        ("backbone_top_k", lambda v: 1 <= v <= mcfg.backbone_experts, f"in 1..{mcfg.backbone_experts} (the experts)"),
        ("backbone_capacity", lambda v: v >= 0, "a number >= 0 (0 = no limit)"),
        ("backbone_router_noise", lambda v: v >= 0, "a number >= 0 (0 = no noise; V-MoE: 1)"),
        ("backbone_moe", lambda v: v in PLACEMENTS, f"one of {PLACEMENTS}"),
        ("backbone_balance", lambda v: v in BALANCES, f"one of {BALANCES}"),
    ]
    for name, ok, allowed in ranges:
        if not ok(getattr(mcfg, name)):
            error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(mcfg, name)!r}")
    if mcfg.backbone_moe == "none":
        return
    # The placement exists in this backbone: built on the meta device (no memory, no initialisation).
    try:
        with torch.device("meta"):
            moe_backbone(mcfg.backbone, moe_config(mcfg), "none", mcfg.feature_layer)
    except ValueError as e:
        error(str(e))


def describe(model: nn.Module, cfg) -> str:
    """zoo.describe's part for a backbone with MoE layers: how many, and what one token activates."""
    if cfg.backbone_moe == "none":
        return ""
    layers = moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    active = total - sum(m.idle_parameters() for m in layers)
    return (f"; backbone MoE {cfg.backbone_moe}: {len(layers)} layers x {cfg.backbone_experts} experts, top-{cfg.backbone_top_k}, "
            f"{active / 1e6:.2f}M of {total / 1e6:.2f}M parameters activated per token")


if __name__ == "__main__":
    # A worked example: one MoE layer with N = 4 experts, top-k = 2, on B = 2 images of n = 3 tokens of width
    # D = 8 (H = 16): who goes where, and the output against the equation computed token by token.
    torch.manual_seed(0)
    B, n, D, H, N, k = 2, 3, 8, 16, 4, 2
    moe = SparseMoE(D, H, experts=N, top_k=k)
    x = torch.randn(B, n, D)                                           # the tokens after the block's norm
    y = moe(x)
    probs, chosen, token, expert, weight = moe.route(x.reshape(-1, D))
    print(f"tokens x          {tuple(x.shape)}      (B, n, D): T = B*n = {B * n} tokens")
    print(f"router W_r        {tuple(moe.router.weight.shape)}        (N, D), no bias; G(x) = softmax(x W_r)")
    print(f"G                 {tuple(probs.shape)}        (T, N), rows sum to 1")
    print(f"chosen            {tuple(chosen.shape)}        (T, k): each token's top-{k}: {chosen.tolist()}")
    print(f"experts w1        {tuple(moe.w1.shape)}    (N, D, H), w2 {tuple(moe.w2.shape)} (N, H, D)")
    print(f"output y          {tuple(y.shape)}      (B, n, D): sum over the kept experts of G(x)_i E_i(x)")
    # The equation, one token at a time: y_t = sum_{i in TopK} G_ti E_i(x_t), no renormalisation (V-MoE).
    flat = x.reshape(-1, D)
    by_hand = torch.stack([sum(probs[t, i] * moe.expert(i, flat[t:t + 1])[0] for i in chosen[t].tolist())
                           for t in range(B * n)]).reshape(B, n, D)
    print(f"sparse dispatch against the token-by-token sum: max |difference| = {(y - by_hand).abs().max():.1e}")
    print(f"tokens per expert {torch.bincount(chosen.reshape(-1), minlength=N).tolist()}; balance loss N sum_i f_i P_i "
          f"= {moe.aux_loss:.3f} (1 = balanced, {N} = all on one)")
    r = moe.route_record
    print(f"routing record    probs {tuple(r['probs'].shape)} (B, 1, N), load {[round(v, 3) for v in r['load'].tolist()]} "
          f"(sums to 1), k = {r['k']}, row entropy {r['row_entropy']:.3f} of ln N = {math.log(N):.3f}")
