"""
The baselines DR-MoE is measured against, on one backbone, one data pipeline, one loop and one metric.

    --model   what it is                                          where it lives
    linear    backbone -> global average pool -> Linear(C, L)      LinearHead, below: the floor
    mlgcn     ML-GCN (Chen et al., CVPR 2019): a GCN over a        MLGCN, label_cooccurrence,
              label graph turns word vectors into L classifiers    mlgcn_adjacency, below
    q2l       Query2Label (Liu et al., 2021): transformer encoder  model.DRMoE with moe_layers=0,
              + label-query decoder + asymmetric loss              asymmetric_loss below
    hsq       HSQ (Yin et al., ICLR 2024): the Q2L decoder, then   model.DRMoE with gate="label",
              hybrid sharing layers of shared + task experts       settings in MODEL_PRESETS
    drmoe     DR-MoE: as HSQ, but the gate also reads the image    model.DRMoE (the default)

Query2Label, HSQ and DR-MoE are one class (model.DRMoE) with different settings, so that they differ only
where the papers differ. Exactly these settings (MODEL_PRESETS; all other fields are shared):

                  encoder  decoder  self-attn  MoE layers  gate reads          T (own experts)  loss
    q2l           1        2        no         0           -                   -                ASL
    hsq           0        1        yes        1           h[b,l] (label)      2                BCE
    drmoe         0        1        yes        1           [h[b,l]; g[b]]      1                BCE

- Q2L: 1 encoder + 2 decoder layers with decoder self-attention removed, as Q2L's official code runs it;
  ASL with gamma- = 4, gamma+ = 0, clip 0.05 (ASL's defaults; Q2L's README uses gamma- = 2, clip 0:
  pass --asl-gamma-neg 2 --asl-clip 0). At voc/coco size it is D = 2048 with a feed-forward of 8192
  (PAPER_SCALE), the official configuration (~193M parameters with ResNet-101).
- HSQ §3.3 eq. 1-2: each label k has its own gate g_k(x) = softmax(W_g^k x) reading that label's feature
  only, over S shared + T label-specialised experts; HSQ reports a drop with T = 1, so T = 2 here.
- DR-MoE: the gate reads the label's feature and the global image feature g[b] (gating.py, "dynamic").
  Its T = 1 is this project's calibrated default, not a number from the paper: set --task-experts 2 to
  match HSQ's capacity exactly (the comparison reports parameters beside mAP for this reason).
- The loss is a flag (--loss bce|asl), so any model can be trained with either; the defaults follow
  each paper (ML-GCN trains with MultiLabelSoftMarginLoss, which is BCE averaged over labels).

ML-GCN's label graph is built from the training labels (train.py calls `model.set_label_graph`) and
stored in the checkpoint, so evaluation needs neither the labels nor the word-vector file again.

Shapes (legend in experts.py): images (B, 3, S_img, S_img) -> logits (B, L); C backbone channels,
V = 300 word-vector dim. Every model returns (logits, {"gate_weights": None or (B, L, E), "aux_loss",
"image_feature": the pooled backbone feature (B, C)}).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelConfig, WeightsUnavailable, build_backbone, describe

# Per-model settings layered over the dataset preset (train.py: flag > model preset > dataset preset).
MODEL_PRESETS = {
    "drmoe": dict(),
    "hsq": dict(gate="label", task_experts=2),
    "q2l": dict(enc_layers=1, layers=2, decoder_self_attn=False, moe_layers=0, loss="asl"),
    "mlgcn": dict(),
    "linear": dict(),
}
# The official Q2L width at the papers' scale (voc/coco, ResNet-101 at 448 px): hidden_dim 2048, FFN 8192.
PAPER_SCALE = {"q2l": dict(dim=2048, ff_dim=8192)}
MODELS = tuple(MODEL_PRESETS)


class LinearHead(nn.Module):
    """logit[b, l] = <W_l, GAP(backbone(x))[b]> + c_l: what any head has to beat."""

    def __init__(self, cfg: ModelConfig, verbose: bool = True):
        super().__init__()
        self.backbone, channels = build_backbone(cfg.backbone, cfg.weights, cfg.feature_layer)
        self.fc = nn.Linear(channels, cfg.num_labels)
        if verbose:
            print(describe(self, cfg))

    def forward(self, x: torch.Tensor):
        f = self.backbone(x).mean(dim=(2, 3))                              # (B, C, h, w) -> (B, C)
        return self.fc(f), {"gate_weights": None, "aux_loss": f.new_zeros((), dtype=torch.float32),
                            "image_feature": f.detach()}


# ---------------------------------------------------------------------------------------------------
# ML-GCN
def label_cooccurrence(targets):
    """targets (N, L) in {1, 0, -1} -> (counts (L, L) int64, zero diagonal; nums (L,) int64).

    counts[i, j] = images where labels i and j are both present, nums[i] = images where i is present
    (ML-GCN's adj_file "adj" and "nums"). Only entries equal to 1 count: a difficult or ignored label
    (-1) is not evidence that the object is there.
    """
    pos = (torch.as_tensor(np.asarray(targets)) == 1).long()              # (N, L)
    counts = pos.T @ pos                                                  # (L, N) @ (N, L) -> (L, L)
    nums = counts.diagonal().clone()                                      # (L,) the diagonal is N_i
    counts.fill_diagonal_(0)
    return counts.numpy(), nums.numpy()


def mlgcn_adjacency(counts, nums, t: float = 0.4, p: float = 0.2) -> torch.Tensor:
    """The matrix ML-GCN's GCN multiplies by: the official gen_adj(gen_A(counts, nums)) -> (L, L) float32.

    gen_A (ML-GCN util.py), paper §3.3 eq. 6-8:
        P[i, j] = counts[i, j] / nums[i]                        conditional probability P(j | i)   (eq. 6)
        A = 1[P >= t]                                           binarised, against rare noisy edges (eq. 7)
        A = A * 0.25 / (A.sum(0) + 1e-6) + I                    re-weighted; the official code writes the
                                                                constant 0.25 = p / (1 - p) at p = 0.2 (eq. 8)
    gen_adj:  D = diag(A.sum(1))^-1/2,  adj = (A D)^T D         symmetric normalisation
    Eq. 8 itself puts 1 - p on the diagonal and p / sum on the neighbours; that is the official matrix times
    (1 - p), and gen_adj's normalisation removes any such scale, so both give the same adj.
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

    def __init__(self, cfg: ModelConfig, classes=None, verbose: bool = True):
        super().__init__()
        L, V = cfg.num_labels, 300
        self.cfg = cfg
        self.backbone, channels = build_backbone(cfg.backbone, cfg.weights, cfg.feature_layer)
        if cfg.word_vectors:
            # A buffer: fixed inputs saved with the weights, so a checkpoint works without the file.
            vec = load_word_vectors(cfg.word_vectors, classes) if classes is not None else torch.zeros(L, V)
            self.register_buffer("embed", vec)
        else:
            # No word vectors: learned embeddings (the GCN still mixes them along the label graph).
            self.embed = nn.Parameter(torch.randn(L, V) * 0.1)
        V = self.embed.shape[1]
        # Official init (GraphConvolution.reset_parameters): uniform(+-1/sqrt(out_features)).
        self.gc1 = nn.Parameter(torch.empty(V, cfg.gcn_hidden).uniform_(-cfg.gcn_hidden ** -0.5, cfg.gcn_hidden ** -0.5))
        self.gc2 = nn.Parameter(torch.empty(cfg.gcn_hidden, channels).uniform_(-channels ** -0.5, channels ** -0.5))
        # The identity until train.py sets the graph from the training labels; saved with the weights.
        self.register_buffer("adj", torch.eye(L))
        if verbose:
            print(describe(self, cfg))

    def set_label_graph(self, targets):
        """Build adj from the training labels (N, L): mlgcn_adjacency(label_cooccurrence(targets))."""
        counts, nums = label_cooccurrence(targets)
        self.adj.copy_(mlgcn_adjacency(counts, nums, self.cfg.gcn_threshold, self.cfg.gcn_reweight))

    def forward(self, x: torch.Tensor):
        f = self.backbone(x).amax(dim=(2, 3))                              # (B, C, h, w) -> (B, C) max pool
        adj = self.adj.to(self.gc1.dtype)
        h1 = F.leaky_relu(adj @ (self.embed @ self.gc1), 0.2)             # (L, L) @ (L, V) @ (V, H1) -> (L, H1)
        w = adj @ (h1 @ self.gc2)                                         # (L, H1) @ (H1, C) -> (L, C)
        logits = f @ w.to(f.dtype).t()                                    # (B, C) @ (C, L) -> (B, L)
        return logits, {"gate_weights": None, "aux_loss": f.new_zeros((), dtype=torch.float32),
                        "image_feature": f.detach()}


# ---------------------------------------------------------------------------------------------------
# Losses
def asymmetric_loss(logits, targets, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
    """ASL (Ridnik et al., ICCV 2021), averaged over the valid entries; targets -1 are ignored.

        p = sigmoid(x),  p_m = max(p - clip, 0)                   probability shifting of negatives (eq. 4)
        L+ = (1 - p)^gamma+ * log(p)                              positives
        L- = p_m^gamma- * log(1 - p_m)                            negatives, down-weighted when easy
        loss = -mean over valid entries of (y L+ + (1 - y) L-)

    1 - p_m = min(1 - p + clip, 1) is computed as ASL's code does; the logs use logsigmoid where there is
    no clip, so that with gamma+ = gamma- = 0 and clip = 0 this is exactly masked BCE (a test checks it).
    Differences from the official code, on purpose: the mean over valid entries instead of the sum over
    B * L (a sum grows with L and the batch, which would change what --lr and --grad-clip mean), and the
    focusing weights keep their gradient (ASL's default; its disable_torch_grad_focal_loss is an option).
    """
    x, y = logits.float(), targets.clamp(min=0).float()
    valid = (targets >= 0).float()                                        # (B, L)
    p = torch.sigmoid(x)
    log_p = F.logsigmoid(x)
    if clip > 0:
        q = (1 - p + clip).clamp(max=1)                                   # 1 - p_m
        log_q = q.clamp(min=1e-8).log()
    else:
        q, log_q = 1 - p, F.logsigmoid(-x)
    loss = y * log_p * (1 - p).pow(gamma_pos) + (1 - y) * log_q * (1 - q).pow(gamma_neg)
    return -(loss * valid).sum() / valid.sum().clamp(min=1)
