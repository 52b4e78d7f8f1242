"""
The baselines DR-MoE is measured against, on one backbone, one data pipeline, one loop and one metric.

    --model   what it is                                          where it lives
    linear    backbone -> global average pool -> Linear(C, L)      LinearHead, below: the floor
    mlgcn     ML-GCN (Chen et al., CVPR 2019): a GCN over a        MLGCN, label_cooccurrence,
              label graph turns word vectors into L classifiers    mlgcn_adjacency, below
    q2l       Query2Label (Liu et al., 2021): transformer encoder  model.DRMoE with moe_layers=0,
              + label-query decoder + asymmetric loss              losses.asymmetric_loss
    hsq       HSQ (Yin et al., ICLR 2024): the Q2L decoder, then   model.DRMoE with gate="label",
              hybrid sharing layers of shared + task-specific      settings in MODELS
              experts
    drmoe     DR-MoE: as HSQ, but the gate also reads the image    model.DRMoE (the default)

Query2Label, HSQ and DR-MoE are one class (model.DRMoE) with different settings, so that they differ only
where the papers differ. Exactly these settings (MODELS below; all other fields are shared):

                  encoder  decoder  self-attn  MoE layers  gate reads          T (task-specific)  loss
    q2l           1        2        no         0           -                   -                ASL
    hsq           0        1        yes        1           h[b,l] (label)      2                BCE
    drmoe         0        1        yes        1           [h[b,l]; g[b]]      1                BCE

- Q2L: 1 encoder + 2 decoder layers with decoder self-attention removed, as Q2L's official code runs it;
  ASL with Q2L's released loss settings (main_mlc.py's defaults gamma- = 2, gamma+ = 0, clip 0, eps 1e-5,
  plus --dtgfl, which its README commands pass: focusing weights detached). ASL's own defaults stay a flag
  away: --asl-gamma-neg 4 --asl-clip 0.05 --asl-eps 1e-8. On every dataset D follows the backbone
  (q2l_width: D = C, feed-forward 4C), as Q2L's released commands set --hidden_dim to the backbone's
  channels; ResNet-101 gives the official 2048 / 8192 (~193M parameters).
- HSQ §3.3 eq. 1-2: each label k has its own gate g_k(x) = softmax(W_g^k x) reading that label's feature
  only, over S shared + T label-specialised experts; HSQ reports a drop with T = 1, so T = 2 here.
- DR-MoE: the gate reads the label's feature and the global image feature g[b] (gating.py, "dynamic").
  Its T = 1 is this project's calibrated default, not a number from the paper: set --task-experts 2 to
  match HSQ's capacity exactly (the comparison reports parameters beside mAP for this reason).
- The loss is a flag (--loss bce|asl), so any model can be trained with either; the defaults follow
  each paper (ML-GCN trains with MultiLabelSoftMarginLoss, which is BCE averaged over labels).

ML-GCN's label graph is built from the training labels (train.py calls `model.prepare`, zoo.prepare) and
stored in the checkpoint, so evaluation needs neither the labels nor the word-vector file again.

How this file plugs in (a file a DR-MoE fork can delete): zoo.py reads its MODELS (name -> builder, settings,
one-line description), its config fields (MLGCNConfig) and check(); nothing else names it.

Shapes (legend in experts.py): images (B, 3, S_img, S_img) -> logits (B, L); C backbone channels,
V = 300 word-vector dim. Every model returns (logits, {"losses": {}, "routing": {} (what routers in the
backbone left, lib/routing.collect), "image_feature": the pooled backbone feature (B, C)}).

    python baselines.py  # a worked example: ML-GCN's graph from 5 images, the two heads' shapes
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import BackboneConfig, WeightsUnavailable, backbone_from_config
from lib.spectral import label_cooccurrence
from lib.flags import config_field
from lib.routing import collect
from model import DRMoE

# Query2Label's released recipe (SlongLiu/query2labels, main_mlc.py and README): 1 encoder + 2 decoder layers
# without decoder self-attention; ASL with gamma- 2, gamma+ 0, clip 0, eps 1e-5 and the focusing weights detached
# (--dtgfl); its width follows the backbone (q2l_width).
Q2L = dict(enc_layers=1, layers=2, decoder_self_attn=False, moe_layers=0, loss="asl",
           asl_gamma_neg=2.0, asl_gamma_pos=0.0, asl_clip=0.0, asl_eps=1e-5, asl_detach_focusing=True)


def q2l_width(channels: int) -> dict:
    """Q2L's transformer width for a backbone with C output channels: D = C (no input projection), FFN = 4 D.

    Q2L's released commands set --hidden_dim to the backbone's channel count (ResNet-101: 2048, with
    --dim_feedforward 8192); config.py applies this unless --dim / --ff-dim are given.
    """
    return dict(dim=channels, ff_dim=4 * channels)


class LinearHead(nn.Module):
    """logit[b, l] = <W_l, GAP(backbone(x))[b]> + c_l: what any head has to beat."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.backbone, channels = backbone_from_config(cfg)
        self.fc = nn.Linear(channels, cfg.num_labels)

    def forward(self, x: torch.Tensor):
        f = self.backbone(x).float().mean(dim=(2, 3))                      # (B, C, h, w) -> (B, C)
        # The classifier in fp32 even under autocast, as the label-query models' is: bf16 logits keep 8 bits
        # of mantissa, so the ranking that mAP measures would see ~1,400 distinct scores instead of ~40k.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.fc(f)                                            # (B, L) fp32
        losses, routing = collect(self.backbone)   # what routers in the backbone left, if any
        return logits, {"losses": losses, "routing": routing, "image_feature": f.detach()}


# ---------------------------------------------------------------------------------------------------
# ML-GCN
@dataclass
class MLGCNConfig(BackboneConfig):
    """ML-GCN's settings on top of the backbone's: its word vectors and its graph (paper §3.3 eq. 6-8)."""
    word_vectors: str = config_field(None, "ML-GCN: .npz of label word vectors (names, vectors); none = learned", "baselines")
    gcn_hidden: int = config_field(1024, "ML-GCN: hidden width of its two-layer GCN (300 -> hidden -> C)", "baselines")
    gcn_threshold: float = config_field(0.4, "ML-GCN: t, binarise P(j|i) at this value (paper eq. 7)", "baselines")
    gcn_reweight: float = config_field(0.2, "ML-GCN: p, weight of the neighbours vs the node itself (eq. 8)", "baselines")


def mlgcn_adjacency(counts, nums, t: float = 0.4, p: float = 0.2) -> torch.Tensor:
    """The matrix ML-GCN's GCN multiplies by: the official gen_adj(gen_A(counts, nums)) -> (L, L) float32.

    gen_A (ML-GCN util.py), paper §3.3 eq. 6-8:
        P[i, j] = counts[i, j] / nums[i]                        conditional probability P(j | i)   (eq. 6)
        A = 1[P >= t]                                           binarised, against rare noisy edges (eq. 7)
        A = A * 0.25 / (A.sum(0) + 1e-6) + I                    re-weighted; the official code writes the
                                                                constant 0.25 = p / (1 - p) at p = 0.2 (eq. 8)
    gen_adj:  D = diag(A.sum(1))^-1/2,  adj = (A D)^T D         symmetric normalisation
    The paper and the official code differ here, and this follows the official code. Eq. 8 divides each
    neighbour by its ROW's sum, sum_j A[i, j]; gen_A divides by the COLUMN's, A.sum(0), so entry (i, j) is
    divided by sum_i A[i, j]. These are different matrices whenever the binarised graph is not symmetric
    (P(j|i) != P(i|j), the usual case), not one matrix up to a scale; the released models used gen_A.
    """
    counts = np.asarray(counts, dtype=np.float64)
    nums = np.asarray(nums, dtype=np.float64)[:, None]                    # (L, 1)
    # A label with no positive image has no P(. | i): leave its row empty instead of dividing by 0.
    P = np.divide(counts, nums, out=np.zeros_like(counts), where=nums > 0)   # (L, L)
    A = (P >= t).astype(np.float64)
    A = A * (p / (1 - p)) / (A.sum(0, keepdims=True) + 1e-6)              # column sums, as gen_A
    A = torch.from_numpy(A + np.identity(len(A))).float()
    D = torch.diag(A.sum(1).pow(-0.5))                                    # (L, L)
    return (A @ D).t() @ D


def load_word_vectors(path: str, classes) -> torch.Tensor:
    """Rows of an .npz with `names` (K,) and `vectors` (K, V), looked up by class name -> (L, V) float32.

    ML-GCN's released GloVe vectors for VOC and COCO come in this form (300-d, one row per class name;
    multi-word names averaged). Underscores in our class names also match spaces in the file's.
    """
    try:
        z = np.load(path)
        names, vectors = [str(n) for n in z["names"]], z["vectors"]
    except (OSError, KeyError, ValueError) as e:
        raise WeightsUnavailable(f"--word-vectors {path}: cannot read an .npz with 'names' and 'vectors' ({e})") from None
    row = {n: i for i, n in enumerate(names)}
    # Names by position would silently mismatch (ML-GCN's COCO file is alphabetical, not in id order).
    missing = [c for c in classes if c not in row and c.replace("_", " ") not in row]
    if missing:
        raise WeightsUnavailable(f"--word-vectors {path}: no vector for {missing} (the file has {names[:5]}...)")
    return torch.from_numpy(np.stack([vectors[row.get(c, row.get(c.replace("_", " ")))] for c in classes])).float()


class MLGCN(nn.Module):
    """ML-GCN: logit[b, l] = <GMP(backbone(x))[b], W[l]> with W = GCN(label embeddings) (L, C).

    GCN (paper eq. 4, official GraphConvolution without bias):
        H1 = LeakyReLU_0.2(adj @ E @ W1)       E (L, V) label embeddings, W1 (V, gcn_hidden)
        W  = adj @ H1 @ W2                     W2 (gcn_hidden, C): one classifier per label, in image space
    Global max pooling over any map size (the official code max-pools a fixed 14 x 14 map, i.e. 448 px).
    """

    def __init__(self, cfg: MLGCNConfig, classes=None):
        super().__init__()
        L, V = cfg.num_labels, 300
        self.cfg = cfg
        self.backbone, channels = backbone_from_config(cfg)
        if cfg.word_vectors:
            # A buffer: fixed inputs saved with the weights, so a checkpoint works without the file.
            vec = load_word_vectors(cfg.word_vectors, classes) if classes is not None else torch.zeros(L, V)
            self.register_buffer("embed", vec)
        else:
            # No word vectors: learned embeddings (the GCN still mixes them along the label graph).
            self.embed = nn.Parameter(torch.randn(L, V) * 0.1)
            self.no_weight_decay = ("embed",)   # learned label inputs, like DR-MoE's queries (train.decay_roles)
        V = self.embed.shape[1]
        # Official init (GraphConvolution.reset_parameters): uniform(+-1/sqrt(out_features)).
        self.gc1 = nn.Parameter(torch.empty(V, cfg.gcn_hidden).uniform_(-cfg.gcn_hidden ** -0.5, cfg.gcn_hidden ** -0.5))
        self.gc2 = nn.Parameter(torch.empty(cfg.gcn_hidden, channels).uniform_(-channels ** -0.5, channels ** -0.5))
        # The identity until train.py sets the graph from the training labels; saved with the weights.
        self.register_buffer("adj", torch.eye(L))

    def set_label_graph(self, targets):
        """Build adj from the training labels (N, L): mlgcn_adjacency(label_cooccurrence(targets))."""
        counts, nums = label_cooccurrence(targets)
        self.adj.copy_(mlgcn_adjacency(counts, nums, self.cfg.gcn_threshold, self.cfg.gcn_reweight))

    def prepare(self, targets, classes=None, seed: int = 0, verbose: bool = True):
        """What zoo.prepare calls with the training labels before training: the label graph."""
        self.set_label_graph(targets)

    def forward(self, x: torch.Tensor):
        f = self.backbone(x).float().amax(dim=(2, 3))                      # (B, C, h, w) -> (B, C) max pool
        # The GCN and the classifier in fp32 even under autocast: fp32 logits, as every model's (LinearHead).
        with torch.autocast(x.device.type, enabled=False):
            h1 = F.leaky_relu(self.adj @ (self.embed @ self.gc1), 0.2)    # (L, L) @ (L, V) @ (V, H1) -> (L, H1)
            w = self.adj @ (h1 @ self.gc2)                                # (L, H1) @ (H1, C) -> (L, C)
            logits = f @ w.t()                                            # (B, C) @ (C, L) -> (B, L) fp32
        losses, routing = collect(self.backbone)   # what routers in the backbone left, if any
        return logits, {"losses": losses, "routing": routing, "image_feature": f.detach()}


# ---------------------------------------------------------------------------------------------------
# What zoo.py reads: the models by name, this file's checks


def _describe_q2l(model, cfg) -> str:
    return f"D={cfg.dim}, enc={cfg.enc_layers}, dec={cfg.layers}"


# Each model: how to build it (a config and the class names -> the module), its settings layered over the dataset
# preset (flag > model's settings > dataset preset: config.parse_args), settings that follow the backbone's
# channels C, and its part of zoo.describe's line. Q2L and HSQ are DR-MoE's class with their papers' settings.
MODELS = {
    "hsq": dict(build=lambda cfg, classes: DRMoE(cfg), preset=dict(gate="label", task_experts=2), gated=True,
                describe=lambda model, cfg: f"gate={cfg.gate}, S={cfg.shared_experts}, T={cfg.task_experts}, "
                                            f"moe_layers={cfg.moe_layers}"),
    "q2l": dict(build=lambda cfg, classes: DRMoE(cfg), preset=Q2L, width=q2l_width, describe=_describe_q2l),
    "mlgcn": dict(build=lambda cfg, classes: MLGCN(cfg, classes=classes),
                  describe=lambda model, cfg: f"gcn 300->{cfg.gcn_hidden}->C"),
    "linear": dict(build=lambda cfg, classes: LinearHead(cfg), describe=lambda model, cfg: "GAP + linear"),
}


CONFIG = MLGCNConfig   # this file's fields, joined into zoo.ModelConfig: one --flag each


def check(tcfg, mcfg, error):
    """ML-GCN's values that cannot work, caught before anything is built: error(one line) exits."""
    ranges = [
        ("gcn_hidden", lambda v: v >= 1, "an integer >= 1"),
        ("gcn_threshold", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        # ML-GCN's eq. 8 as p / (1 - p) (mlgcn_adjacency): p = 0 drops the neighbours, 1 divides by 0
        ("gcn_reweight", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ]
    for name, ok, allowed in ranges:
        if not ok(getattr(mcfg, name)):
            error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(mcfg, name)!r}")
    if mcfg.word_vectors and not os.path.isfile(mcfg.word_vectors):
        error(f"--word-vectors {mcfg.word_vectors!r}: no such file (an .npz with names and vectors; see README)")


if __name__ == "__main__":
    # A worked example on tiny inputs: ML-GCN's label graph from 5 images x 3 labels, its two baselines on
    # 2 images.
    torch.manual_seed(0)
    targets = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, -1]])   # (N, L); -1 = not counted
    counts, nums = label_cooccurrence(targets)
    print(f"training labels   {targets.shape}        (N, L)")
    print(f"co-occurrence     {counts.shape}        counts[i, j] = images with labels i and j: {counts.tolist()}; "
          f"nums {nums.tolist()}")
    adj = mlgcn_adjacency(counts, nums, t=0.4, p=0.2)
    print(f"ML-GCN adjacency  {tuple(adj.shape)}        P(j|i) >= t, re-weighted, normalised: "
          f"{[[round(v, 3) for v in r] for r in adj.tolist()]}")
    cfg = MLGCNConfig(num_labels=3, feature_layer="layer3", image_size=64)
    x = torch.randn(2, 3, 64, 64)
    for head in (LinearHead(cfg), MLGCN(cfg)):
        if isinstance(head, MLGCN):
            head.prepare(targets)
            print(f"MLGCN embeddings  {tuple(head.embed.shape)}       (L, V) -> GCN weights {tuple(head.gc1.shape)}, "
                  f"{tuple(head.gc2.shape)} -> one classifier per label (L, C)")
        logits, info = head.eval()(x)
        print(f"{type(head).__name__:<17} images {tuple(x.shape)} -> logits {tuple(logits.shape)} (B, L), "
              f"image feature {tuple(info['image_feature'].shape)} (B, C)")
