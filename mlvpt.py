"""
ML-VPT: label groups by co-occurrence and by exclusivity, prompt tokens per group inside a frozen ViT, and a
mixture of experts from the groups' prompt outputs to one feature per label (--model mlvpt).

Paper: Ma, Xu, Xie, Wang, Sun, Zhao, "Correlative and Discriminative Label Grouping for Multi-Label Visual
Prompt Tuning", CVPR 2025 (arXiv 2504.09990). Official code: github.com/yu-gi-oh-leilei/ML-VPT (read for
its facts, commit 4fd40e4; none of it is copied). Only the paper's abstract and a summary of its grouping
equation could be read here; where a step below says "official" it was checked in that code
(code/MLIC-MoE/models/builder_network.py and models/timm_models/vision_transformer.py), and where it says
"our reading" neither source fixes it.

1. Label groups (label_groups). The official repository ships its groups as precomputed JSON files and no
   grouping code (data/aux_data/<set>/<set>_coocurrence5_0.json for CO, <set>_cluster5_0.json for DC), so
   this follows the paper's equation as we read it, and is checked against those files. From the training labels
   (positives only; lib/spectral.label_cooccurrence): S_ij = images with labels i and j, A_ij = S_ij / N_i
   (= P(j | i)), the tau-th root with tau = 2 (--mlvpt-tau), symmetrised:
       M+ = (A^(1/tau) + (A^(1/tau))^T) / 2        correlative (CO) affinity: labels that appear together
       M- = 1 - M+                                 discriminative (DC) affinity: labels that exclude each other
   both with a zero diagonal (a self-loop only adds a constant to a node's degree). Spectral clustering on
   each as scikit-learn's SpectralClustering(affinity="precomputed") does it (spectral_embedding): the k
   eigenvectors of the normalised Laplacian I - D^-1/2 M D^-1/2 with the smallest eigenvalues, each row
   divided by sqrt(d_i) (scikit-learn's "diffusion map" scaling; not Ng-Jordan-Weiss's rows of unit length,
   which an earlier version used), then k-means with 1,000 restarts (lib/kmeans.py), deterministic by seed.
   Checked against the official files (tests/test_mlvpt.py): on VOC 2007 trainval's and COCO 2014 train's
   label counts (ML-GCN's), tau = 2 and k = 5 give exactly the official CO groups of both datasets and the
   official DC groups of VOC (the lowest-inertia k-means, found from every seed 0-9 with 1,000 restarts;
   10 or 100 restarts often miss it); COCO's DC file is reproduced by no tau tried (1-4; best ARI
   0.52-0.58 at tau 3, seeds 0-4), so the DC reading stays unconfirmed there.
   k = 5 (--mlvpt-groups; the official configs' aux_tokens: 5 for VOC at 448 px, COCO, NUS);
   --mlvpt-groups 0 picks k in 2..10 by the Calinski-Harabasz score of the spectral embedding.
2. Deep visual prompt tuning (Jia et al., ECCV 2022, "VPT-deep"): at every block of the ViT a fresh set of P
   learnable tokens, P = m * k per branch (--prompts-per-group m = 3: 30 tokens at k = 5 with both
   branches, as the official scale_tokens 3 x 2 x aux_tokens 5). Official, checked: the tokens sit right
   after the class token, [cls, prompts, patches]; block 0 inserts them after the position embedding, every
   later block replaces the previous block's prompt outputs by its own; VPT's initialisation, uniform in
   +- sqrt(6 / (3 p^2 + D)) for patch size p; an attention mask by which a prompt token attends to itself,
   the class token and the patches but to no other prompt token, while the class token and the patches
   attend to everything. The backbone is frozen (--freeze-backbone, on for mlvpt): only the prompts and
   the head below train. The prompt outputs are read after the ViT's final LayerNorm (official for its
   ImageNet-1k and DINOv2 backbones; its ImageNet-21k, MAE and MoCo paths read them before that norm).
3. The group-to-label mixture, per branch (CO, DC), official (builder_network.py Adapt_Experts, Gate_MOE,
   GroupFCWiseLinear), for label l in group G(l) whose m prompt outputs are z_{l,1..m} (B, m, D):
       expert_e(z)  = z + W2_e GELU(W1_e z + b1_e) + b2_e       one residual bottleneck adapter per prompt
                                                                token, D -> r -> D, r = 5 (--adapter-dim)
       g_{l,s}      = <W_{l,s}, z_{l,s}>                        gate logit from the RAW prompt output, no bias
       w_{l,s}      = softmax_s(g_{l,s})                        over the m tokens of l's group
       f_l          = sum_s w_{l,s} expert(z_{l,s})            label-aware feature
       logit_l      = <V_l, f_l> + c_l                          a linear classifier per label per branch
       gate_logit_l = sum_s w_{l,s} g_{l,s}                     the official "moe" output: the gate alone
   Prediction: (logit_CO + logit_DC) / 2 (official). Loss, official: ASL (gamma- 2, gamma+ 0, clip 0, eps
   1e-5, focusing detached) on logit_CO, logit_DC, gate_logit_CO and gate_logit_DC, each weight 1, and not
   on the mean (--no-mlvpt-gate-loss drops the two gate terms, --mlvpt-fused-loss adds the mean's); our ASL
   is a mean over entries where the official one is a sum / (B L) * 1000 (losses.py: --lr keeps its
   meaning across label counts). Each branch's gate is a router: its weights w (B, L, m) go to the loop as a
   routing record (lib/routing.py), "co gate" and "dc gate", whose health is watched like every router's.
How this file plugs in (a file a DR-MoE fork can delete): zoo.py reads MODELS (the model, its settings), the
config fields (MLVPTConfig), check() and resolve() (--mlvpt-groups 0 from the training labels); the loop calls
the model's prepare() with the training labels (the groups) and takes the loss on every output the forward
lists in info["loss_logits"]. Nothing outside this file names it but zoo.py's list of systems.
Ablations (studies/compare.py --set mlvpt): --mlvpt-branches co | dc | co,dc; --mlvpt-grouping label | random (each
branch's groups keep their sizes, the labels are shuffled: does the grouping matter?) | none (plain VPT-deep:
the same 2 m k prompts shared by all labels, no attention mask, one linear head on the class token).

    python mlvpt.py --dataset voc --data-root DIR     # the groups of VOC's trainval labels, and how their
                                                      # within-group co-occurrence compares with random ones

Shapes (legend in experts.py; here P prompt tokens, m per group, k groups, r adapter width, T = 1 + P + N):
    images (B, 3, H, W) -> tokens (B, T, D) -> prompt outputs z (B, P, D), class token (B, D) -> logits (B, L)
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import BackboneConfig, ViTMap, backbone_from_config
from lib import spectral
from lib.flags import config_field
from lib.spectral import label_cooccurrence, pick_k, spectral_groups
from lib.routing import collect, route

BRANCHES = ("co", "dc")
GROUPINGS = ("label", "random", "none")


@dataclass
class MLVPTConfig(BackboneConfig):
    """ML-VPT's settings on top of the backbone's (a ViT, frozen: --model mlvpt turns freeze_backbone on)."""
    mlvpt_groups: int = config_field(5, "ML-VPT: k label groups per branch (official configs: 5; 0 = pick by the "
                                        "Calinski-Harabasz score from the training labels)", "ML-VPT")
    prompts_per_group: int = config_field(3, "ML-VPT: m prompt tokens per group at every ViT block", "ML-VPT")
    adapter_dim: int = config_field(5, "ML-VPT: r, bottleneck width of each prompt token's expert (official: 5)", "ML-VPT")
    mlvpt_branches: str = config_field("co,dc", "ML-VPT: which groupings get prompts: co (co-occurrence) | dc "
                                                "(exclusivity) | co,dc", "ML-VPT")
    mlvpt_grouping: str = config_field("label", "ML-VPT: label (spectral, from the training labels) | random (same "
                                                "sizes, shuffled) | none (VPT-deep: shared prompts, linear head)", "ML-VPT")
    mlvpt_tau: float = config_field(2.0, "ML-VPT: tau, the root taken of P(j|i) before symmetrising", "ML-VPT")
    mlvpt_gate_loss: bool = config_field(True, "ML-VPT: also train the two gate-only outputs (official)", "ML-VPT")
    mlvpt_fused_loss: bool = config_field(False, "ML-VPT: also train the mean of the branches (official: no)", "ML-VPT")


# --------------------------------------------------------------------------------------------------------
# 1. label groups


def cooccurrence(targets):
    """targets (N, L) in {1, 0, -1} -> (counts (L, L), nums (L,)) as lib/spectral.label_cooccurrence; a pair
    (counts, nums) passes through: the grouping needs only these, and some datasets publish just them
    (ML-GCN's adj files for VOC and COCO; tests/voc2007_trainval_cooccurrence.txt)."""
    return targets if isinstance(targets, tuple) else label_cooccurrence(targets)


def affinities(targets, tau: float = 2.0):
    """targets (N, L) in {1, 0, -1}, or (counts, nums) -> (M+ (L, L), M- (L, L)) float64, zero diagonals
    (docstring, step 1; computed in lib/spectral.py, which DR-MoE's label groups use too)."""
    return spectral.affinities(*cooccurrence(targets), tau)


def label_groups(targets, k: int, kind: str, seed: int = 0, tau: float = 2.0):
    """The training labels (N, L), or their (counts, nums) -> k lists of label indices: kind "co" groups
    labels that co-occur, "dc" labels that exclude each other. k = 0 picks k by the Calinski-Harabasz
    score."""
    if kind not in BRANCHES:
        raise ValueError(f"kind must be one of {BRANCHES}, got {kind!r}")
    M = affinities(targets, tau)[BRANCHES.index(kind)]
    if not 0 <= k <= len(M):
        raise ValueError(f"--mlvpt-groups {k}: must be between 1 and the {len(M)} labels (0 = pick by score)")
    k = k or pick_k(M, seed)
    assign = spectral_groups(M, k, seed)
    return [np.flatnonzero(assign == j).tolist() for j in range(k)]


def random_groups_like(groups, num_labels: int, seed: int = 0):
    """Groups of the same sizes as `groups`, filled with a random permutation of the labels."""
    perm = np.random.default_rng(seed).permutation(num_labels).tolist()
    out, start = [], 0
    for g in groups:
        out.append(sorted(perm[start:start + len(g)]))
        start += len(g)
    return out


def within_group_cooccurrence(targets, groups) -> float:
    """Mean over the pairs of labels that share a group of (P(j|i) + P(i|j)) / 2: high for groups of labels
    that appear together, low for groups of labels that exclude each other (singletons have no pair)."""
    counts, nums = cooccurrence(targets)
    A = counts / np.maximum(nums, 1)[:, None]
    sym = (A + A.T) / 2
    pairs = [sym[a, b] for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
    return float(np.mean(pairs)) if pairs else float("nan")


def grouping_report(targets, classes, k: int = 5, seed: int = 0, draws: int = 1000) -> str:
    """The CO and DC groups of a label set, and their within-group co-occurrence against random partitions
    of the same sizes (the share of random partitions below it: near 1 for CO, near 0 for DC)."""
    lines = []
    for kind in BRANCHES:
        groups = label_groups(targets, k, kind, seed)
        got = within_group_cooccurrence(targets, groups)
        rand = np.array([within_group_cooccurrence(targets, random_groups_like(groups, len(classes), seed + d))
                         for d in range(draws)])
        lines.append(f"{kind.upper()} groups (sizes {[len(g) for g in groups]}): within-group co-occurrence "
                     f"{got:.3f}; random partitions of the same sizes {np.nanmean(rand):.3f} "
                     f"[5-95 %: {np.nanpercentile(rand, 5):.3f}-{np.nanpercentile(rand, 95):.3f}], "
                     f"{100 * np.mean(rand < got):.1f} % of them below")
        lines += ["  " + ", ".join(classes[i] for i in g) for g in groups]
    return "\n".join(lines)


def main(argv=None):
    """python mlvpt.py --dataset voc --data-root DIR: the label groups of a dataset's training labels; without
    --dataset, the worked example at the end of this file."""
    import argparse
    from data import build_dataset
    p = argparse.ArgumentParser(description="ML-VPT's CO and DC label groups of a dataset's training split")
    p.add_argument("--dataset", default=None, help="synthetic | voc | coco | csv | cocojson [none: the worked example]")
    p.add_argument("--data-root", default=None, help="the dataset's folder (not for synthetic)")
    p.add_argument("--split", default=None, help="the split whose labels are grouped [the training split]")
    p.add_argument("--groups", type=int, default=5, help="k groups per kind [5]")
    p.add_argument("--seed", type=int, default=0, help="k-means and random-partition seed [0]")
    p.add_argument("--draws", type=int, default=1000, help="random partitions the groups are compared with [1000]")
    args = p.parse_args(argv)
    if args.dataset is None:
        return worked_example()
    split = args.split or {"voc": "trainval"}.get(args.dataset, "train")
    ds = build_dataset(args.dataset, split, args.data_root, augment=False)
    print(f"{args.dataset} {split}: {len(ds)} images, {len(ds.classes)} labels")
    print(grouping_report(ds.targets.numpy(), ds.classes, args.groups, args.seed, args.draws))


# --------------------------------------------------------------------------------------------------------
# 2. deep prompts inside torchvision's ViT


def prompt_mask(num_prompts: int, num_tokens: int, device=None) -> torch.Tensor:
    """(T, T) bool for nn.MultiheadAttention, True = may NOT attend: prompt tokens (positions 1..P) do not
    attend to each other, only to themselves, the class token and the patches (official, see docstring)."""
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
    mask[1:num_prompts + 1, 1:num_prompts + 1] = True
    idx = torch.arange(1, num_prompts + 1, device=device)
    mask[idx, idx] = False                                                 # each prompt sees itself
    return mask


def block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torchvision's EncoderBlock.forward with an attention mask: pre-norm attention, residual, pre-norm MLP
    (the MLP may be backbone_moe.SparseMoE), residual. x (B, T, D) -> (B, T, D)."""
    h = block.ln_1(x)
    h, _ = block.self_attention(h, h, h, attn_mask=mask, need_weights=False)
    x = x + block.dropout(h)
    return x + block.mlp(block.ln_2(x))


def prompted_tokens(vit: ViTMap, x: torch.Tensor, prompts: torch.Tensor, masked: bool = True):
    """ViTMap.forward_tokens with VPT-deep prompts (L_blocks, P, D) -> (class token (B, D), prompt outputs
    (B, P, D)), both after the final LayerNorm. With P = 0 it is ViTMap.forward_tokens (tested). masked:
    ML-VPT's mask (prompts blind to each other); False is plain VPT-deep, where every token sees all."""
    t = vit.conv_proj(x)                                                   # (B, D, h, w)
    B, D, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)                                       # (B, N, D)
    t = torch.cat([vit.class_token.expand(B, -1, -1), t], dim=1) + vit.position_embedding(h, w)   # (B, 1+N, D)
    t = vit.encoder.dropout(t)
    P = prompts.shape[1]
    mask = prompt_mask(P, 1 + P + h * w, x.device) if masked else None     # (T, T)
    for i, block in enumerate(vit.encoder.layers):
        p = prompts[i].expand(B, -1, -1).to(t.dtype)                       # (B, P, D) this block's own prompts
        rest = t[:, 1:] if i == 0 else t[:, 1 + P:]                        # block 0 inserts, later ones replace
        t = block_forward(block, torch.cat([t[:, :1], p, rest], dim=1), mask)   # (B, 1+P+N, D)
    t = vit.encoder.ln(t)
    return t[:, 0], t[:, 1:1 + P]


# --------------------------------------------------------------------------------------------------------
# 3. the model


class MLVPT(nn.Module):
    """Frozen ViT + deep prompts per label group + the group-to-label mixture (docstring). x -> (logits (B, L),
    info); info["loss_logits"] lists the outputs the loss is taken on (train.classification_loss)."""

    def __init__(self, cfg: MLVPTConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone, D = backbone_from_config(cfg)
        if not isinstance(self.backbone, ViTMap):
            raise ValueError(f"--model mlvpt prompts a ViT: --backbone {cfg.backbone} is not one "
                             "(use vit_tiny, vit_b_16, vit_l_16, ...)")
        L, k, m = cfg.num_labels, cfg.mlvpt_groups, cfg.prompts_per_group
        if k < 1:   # train.py resolves --mlvpt-groups 0 from the training labels before building the model
            raise ValueError("MLVPT needs the number of groups: --mlvpt-groups 0 is resolved by train.py")
        self.branches = [b for b in cfg.mlvpt_branches.split(",") if b]
        self.grouped = cfg.mlvpt_grouping != "none"
        self.routes = self.grouped   # lib/routing.routes: the group gates route (VPT-deep has none)
        # "none" (VPT-deep) gets as many prompts as ML-VPT with both branches: the same prompt budget.
        P = m * k * (len(self.branches) if self.grouped else 2)
        self.k, self.m, self.num_prompts = k, m, P
        val = math.sqrt(6.0 / (3 * self.backbone.patch_size ** 2 + D))     # VPT's (and ML-VPT's) bound
        self.prompts = nn.Parameter(torch.empty(len(self.backbone.encoder.layers), P, D).uniform_(-val, val))
        self.no_weight_decay = ("prompts", "b1", "b2")   # train.decay_roles: learned inputs and biases
        if not self.grouped:
            self.head = nn.Linear(D, L)                                    # VPT: a linear head on the class token
            return
        r, bound = cfg.adapter_dim, D ** -0.5
        # One bottleneck adapter per prompt token, stacked: (P, D, r), (P, r), (P, r, D), (P, D); nn.Linear's init.
        self.w1 = nn.Parameter(torch.empty(P, D, r).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.empty(P, r).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.empty(P, r, D).uniform_(-r ** -0.5, r ** -0.5))
        self.b2 = nn.Parameter(torch.empty(P, D).uniform_(-r ** -0.5, r ** -0.5))
        nb = len(self.branches)
        self.gate = nn.Parameter(torch.empty(nb, L, m, D).uniform_(-bound, bound))   # W_{l,s} per branch
        self.cls_weight = nn.Parameter(torch.empty(nb, L, D).uniform_(-bound, bound))  # V_l per branch
        self.cls_bias = nn.Parameter(torch.empty(nb, L).uniform_(-bound, bound))   # GroupFCWiseLinear's init
        # Each label's group per branch; set from the training labels by set_label_groups and saved with the
        # weights, so a checkpoint rebuilds the groups without the data. Until then: label l in group l % k.
        self.register_buffer("groups", (torch.arange(L) % k).repeat(nb, 1))   # (branches, L)

    def set_label_groups(self, targets, classes=None, seed: int = 0, verbose: bool = True):
        """Group the labels from the training targets (N, L) for each branch; print the groups by name."""
        if not self.grouped:
            return
        cfg, L = self.cfg, self.cfg.num_labels
        for j, kind in enumerate(self.branches):
            groups = label_groups(targets, self.k, kind, seed, cfg.mlvpt_tau)
            if cfg.mlvpt_grouping == "random":   # the same sizes, labels shuffled
                groups = random_groups_like(groups, L, seed + 1 + j)
            for g, members in enumerate(groups):
                self.groups[j, members] = g
            names = classes or [str(i) for i in range(L)]
            if verbose:
                print(f"ML-VPT {kind.upper()} groups ({cfg.mlvpt_grouping}): "
                      + " | ".join(", ".join(names[i] for i in members) for members in groups))

    def prepare(self, targets, classes=None, seed: int = 0, verbose: bool = True):
        """What zoo.prepare calls with the training labels (N, L) before training: the label groups."""
        self.set_label_groups(np.asarray(targets), classes, seed=seed, verbose=verbose)

    def label_groups_of(self, branch: int):
        """The groups of one branch as k lists of label indices (read back from the buffer)."""
        g = self.groups[branch].tolist()
        return [[l for l, gl in enumerate(g) if gl == j] for j in range(self.k)]

    def adapters(self, z: torch.Tensor) -> torch.Tensor:
        """expert_e(z_e) = z_e + W2_e GELU(W1_e z_e + b1_e) + b2_e for every prompt token e: (B, P, D) -> (B, P, D)."""
        h = F.gelu(torch.einsum("bpd,pdr->bpr", z, self.w1) + self.b1)     # (B, P, r)
        return z + torch.einsum("bpr,prd->bpd", h, self.w2) + self.b2      # (B, P, D)

    def forward(self, x: torch.Tensor):
        cls, z = prompted_tokens(self.backbone, x, self.prompts, masked=self.grouped)   # (B, D), (B, P, D)
        losses, routing = collect(self.backbone)   # what routers inside the ViT left, if any (lib/routing.py)
        info = {"losses": losses, "routing": routing, "image_feature": cls.detach()}
        if not self.grouped:
            with torch.autocast(x.device.type, enabled=False):            # fp32 logits, as every model's
                logits = self.head(cls.float())
            info["loss_logits"] = [logits]
            return logits, info
        e = self.adapters(z)                                               # (B, P, D)
        km = self.k * self.m                                               # prompts per branch
        outs, gate_outs, weights = [], [], []
        for j in range(len(self.branches)):
            # Token index of label l's group's s-th prompt: branch j's block, then group, then s -> (L, m).
            idx = j * km + self.groups[j][:, None] * self.m + torch.arange(self.m, device=x.device)[None]
            zl, el = z[:, idx], e[:, idx]                                  # (B, L, m, D) raw, through experts
            with torch.autocast(x.device.type, enabled=False):            # the gate in fp32, as every router here
                g = torch.einsum("blmd,lmd->blm", zl.float(), self.gate[j].float())   # (B, L, m) gate logits
                w = g.softmax(-1)                                          # (B, L, m) over the group's tokens
                f = torch.einsum("blm,blmd->bld", w, el.float())           # (B, L, D) label-aware features
                outs.append(torch.einsum("bld,ld->bl", f, self.cls_weight[j].float()) + self.cls_bias[j].float())   # (B, L)
                gate_outs.append((w * g).sum(-1))                          # (B, L) the gate alone
            weights.append(w)
        logits = torch.stack(outs).mean(0)                                 # (B, L) mean of the branches
        info["branch_gates"] = torch.stack(weights, 1)                     # (B, branches, L, m), rows sum to 1
        # Each branch's gate is a router over its group's m prompt tokens: L rows per image (lib/routing.py).
        names = [f"prompt{s}" for s in range(self.m)]
        info["routing"] = {**{f"{b} gate": route(w, names=names) for b, w in zip(self.branches, weights)}, **routing}
        info["loss_logits"] = (outs + (gate_outs if self.cfg.mlvpt_gate_loss else [])
                               + ([logits] if self.cfg.mlvpt_fused_loss else []))
        return logits, info


def worked_example():
    """The three steps on small inputs: groups of the benchmark's first 1,000 training images (the full split:
    --dataset synthetic), the prompts in a vit_tiny, the mixture to one feature per label; every shape printed."""
    from data import build_dataset
    torch.manual_seed(0)
    ds = build_dataset("synthetic", "train", augment=False, limit=1000)
    targets = ds.targets.numpy()                                          # (N, L)
    plus, minus = affinities(targets)
    print(f"1. training labels {targets.shape} (N, L) -> affinities M+ {plus.shape} and M- {minus.shape} (L, L)")
    print(grouping_report(targets, ds.classes, k=5, draws=200))
    cfg = MLVPTConfig(num_labels=len(ds.classes), backbone="vit_tiny", image_size=64, freeze_backbone=True)
    model = MLVPT(cfg).eval()
    model.prepare(targets, ds.classes, verbose=False)
    x = torch.stack([ds[i][0] for i in range(2)])                         # (B, 3, 64, 64)
    with torch.no_grad():
        cls, z = prompted_tokens(model.backbone, x, model.prompts)
        logits, info = model(x)
    n_tokens = 1 + model.num_prompts + (64 // model.backbone.patch_size) ** 2
    print(f"2. prompts {tuple(model.prompts.shape)} (blocks, P, D): P = m k x 2 branches = {model.m} x {model.k} x 2; "
          f"every block sees {n_tokens} tokens [class, P prompts, 64 patches]; mask {tuple(prompt_mask(model.num_prompts, n_tokens).shape)}")
    print(f"   images {tuple(x.shape)} -> class token {tuple(cls.shape)} (B, D), prompt outputs z {tuple(z.shape)} (B, P, D)")
    print(f"3. adapters {tuple(model.w1.shape)} (P, D, r); gates {tuple(model.gate.shape)} (branches, L, m, D); "
          f"gate weights {tuple(info['branch_gates'].shape)} (B, branches, L, m), rows sum to 1; routers "
          f"{list(info['routing'])}")
    print(f"   logits {tuple(logits.shape)} (B, L) = the mean of the CO and DC branches; the loss is taken on "
          f"{len(info['loss_logits'])} outputs (two branches, two gates)")


# --------------------------------------------------------------------------------------------------------
# What zoo.py reads: the model by name, this file's checks, and --mlvpt-groups 0 resolved from the labels

# ML-VPT's official configs: ASL with Q2L's settings (gamma- 2, gamma+ 0, clip 0, eps 1e-5, detached), the
# backbone frozen, prompts and head trained; its optimiser decays every trainable parameter ("single_lr") and
# clips no gradient (max_clip_grad_norm 0; config/vpt-group-moe-g5e3/...).
PRESET = dict(freeze_backbone=True, loss="asl", asl_gamma_neg=2.0, asl_gamma_pos=0.0, asl_clip=0.0,
              asl_eps=1e-5, asl_detach_focusing=True, decay_all=True, grad_clip=0.0)


def _describe(model, cfg) -> str:
    return (f"{model.num_prompts} prompts x {len(model.prompts)} blocks, grouping {cfg.mlvpt_grouping}, "
            f"branches {cfg.mlvpt_branches}")


MODELS = {"mlvpt": dict(build=lambda cfg, classes: MLVPT(cfg), preset=PRESET, describe=_describe)}


CONFIG = MLVPTConfig   # this file's fields, joined into zoo.ModelConfig: one --flag each


def check(tcfg, mcfg, error):
    """ML-VPT's values that cannot work, caught before anything is built: error(one line) exits."""
    ranges = [
        ("mlvpt_groups", lambda v: v >= 0, "an integer >= 0 (0 = pick by the Calinski-Harabasz score)"),
        ("prompts_per_group", lambda v: v >= 1, "an integer >= 1"),
        ("adapter_dim", lambda v: v >= 1, "an integer >= 1"),
        ("mlvpt_tau", lambda v: v > 0, "a number > 0"),
        ("mlvpt_branches", lambda v: v.split(",") and set(v.split(",")) <= set(BRANCHES), "co, dc or co,dc"),
        ("mlvpt_grouping", lambda v: v in GROUPINGS, f"one of {GROUPINGS}"),
    ]
    for name, ok, allowed in ranges:
        if not ok(getattr(mcfg, name)):
            error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(mcfg, name)!r}")
    if mcfg.model == "mlvpt" and not mcfg.backbone.startswith("vit"):
        error(f"--model mlvpt prompts a ViT: --backbone {mcfg.backbone} is not one (use vit_tiny, or vit_b_16 "
              "--weights DEFAULT)")


def resolve(cfg, targets, say=print):
    """--mlvpt-groups 0: k from the training labels (Calinski-Harabasz, pick_k), fixed in the config before the
    model is built (the prompt count depends on it), so that a checkpoint rebuilds the same model."""
    if cfg.model == "mlvpt" and cfg.mlvpt_groups == 0:
        kind = cfg.mlvpt_branches.split(",")[0]   # one k for both branches: the first branch's choice
        cfg.mlvpt_groups = pick_k(affinities(np.asarray(targets), cfg.mlvpt_tau)[BRANCHES.index(kind)], seed=0)
        say(f"ML-VPT: k = {cfg.mlvpt_groups} groups, chosen by the Calinski-Harabasz score")


if __name__ == "__main__":
    main()
