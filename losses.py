"""
The classification losses: what train.py minimises on the logits, whatever the model.

    bce   binary cross-entropy per label, averaged over the entries whose target is 0 or 1 (masked_bce):
              loss = sum_{b,l} m[b,l] BCE(y[b,l], x[b,l]) / sum_{b,l} m[b,l],   m = 1 where y != -1
          ML-GCN trains with MultiLabelSoftMarginLoss, which is this mean over labels; DR-MoE's paper
          writes BCE too
    asl   the asymmetric loss (Ridnik et al., "Asymmetric Loss for Multi-Label Classification", ICCV 2021):
          focusing down-weights easy negatives and probability shifting discards the easiest (eq. 4);
          Query2Label and ML-VPT train with it (asymmetric_loss)

A -1 target means "ignore": VOC's difficult objects with --difficult ignore, unknown entries of your own
data. Both losses leave such entries out of the sum and out of the count, so the loss scale is the same
whether a batch holds many ignored labels or none. Both run in fp32 (the logits are cast first), also
under autocast: a loss summed in bf16 would round away the small differences the gradient is made of.

Shapes: logits, targets (B, L) -> a scalar.

    python losses.py     # a worked example: BCE, and ASL with its focusing off equals it
"""
import math

import torch
import torch.nn.functional as F

LOSSES = ("bce", "asl")


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the entries whose target is 0 or 1; -1 (ignore) contributes nothing."""
    # Dividing by the number of valid entries (not B*L) keeps the loss scale the same whether a batch
    # holds many ignored labels (VOC's "difficult") or none.
    valid = (targets >= 0).float()                                               # (B, L)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.clamp(min=0), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def asymmetric_loss(logits, targets, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                    eps: float = 1e-8, detach_focusing: bool = True):
    """ASL (Ridnik et al., ICCV 2021), averaged over the valid entries; targets -1 are ignored.

        p = sigmoid(x),  p_m = max(p - clip, 0)                   probability shifting of negatives (eq. 4)
        L+ = (1 - p)^gamma+ * log(max(p, eps))                    positives
        L- = p_m^gamma- * log(max(1 - p_m, eps))                  negatives, down-weighted when easy
        loss = -(sum of L+ over positives + sum of L- over negatives) / (number of valid entries)

    Defaults are ASL's own (Alibaba-MIIL/ASL, src/loss_functions/losses.py, AsymmetricLoss: gamma- 4,
    gamma+ 1 in the class but 0 in its train.py, clip 0.05, eps 1e-8, disable_torch_grad_focal_loss);
    Query2Label's released recipe (its preset in baselines.py) is gamma- 2, gamma+ 0, clip 0, eps 1e-5.

    - detach_focusing: the weights (1 - p)^gamma+ and p_m^gamma- are constants for the gradient, as ASL's
      training script and Q2L's --dtgfl run it ("disable torch grad focal loss"): the gradient is that of
      a re-weighted cross-entropy. False lets gradient flow through them too (the loss's literal derivative).
    - Each branch gets the real logit only on the entries it applies to (torch.where, not a multiplication
      by y or 1 - y): a masked-out branch can still have an infinite derivative, e.g. (1 - p)^0.5 at p = 1,
      and inf * 0 = NaN would poison the whole gradient. Where a branch does apply, _focusing's floor keeps
      base^gamma differentiable at base = 0 (a saturated logit of the right sign).
    - log(max(p, eps)) is computed as max(logsigmoid(x), log eps): the same value and gradient as ASL's
      log(p.clamp(min=eps)), without first rounding p to 0 or 1 in fp32.
    Difference from the official code, on purpose: the mean over valid entries instead of ASL's sum over
    B * L (a sum grows with L and the batch, which would change what --lr and --grad-clip mean).
    With gamma+ = gamma- = 0, clip = 0 and eps = 0 this is exactly masked BCE (a test checks it).
    Shapes: logits, targets (B, L) -> scalar.
    """
    x = logits.float()
    pos, neg = targets == 1, targets == 0                                  # (B, L) bool each; -1 is neither
    floor = math.log(eps) if eps > 0 else -math.inf
    # Each branch sees the real logit only where it applies and a harmless 0 elsewhere ("double where"):
    # same values, no inf * 0 in the backward pass, and static shapes (no boolean indexing, so no GPU sync).
    xp, xn = torch.where(pos, x, 0.0), torch.where(neg, x, 0.0)           # (B, L) each
    # Positives: L+ = (1 - p)^gamma+ log p, with 1 - p = sigmoid(-x).
    loss_pos = F.logsigmoid(xp).clamp(min=floor)
    w_pos = _focusing(torch.sigmoid(-xp), gamma_pos, detach_focusing)
    # Negatives: 1 - p_m = min(1 - p + clip, 1), as ASL's code computes it; without clip log(1 - p) = logsigmoid(-x).
    if clip > 0:
        q = (torch.sigmoid(-xn) + clip).clamp(max=1)                       # 1 - p_m
        loss_neg = q.log().clamp(min=floor)                               # q >= clip > 0: finite
    else:
        q = torch.sigmoid(-xn)
        loss_neg = F.logsigmoid(-xn).clamp(min=floor)
    w_neg = _focusing(1 - q, gamma_neg, detach_focusing)                  # p_m^gamma-
    total = torch.where(pos, w_pos * loss_pos, 0.0) + torch.where(neg, w_neg * loss_neg, 0.0)   # (B, L)
    return -total.sum() / (pos | neg).sum().clamp(min=1)


def _focusing(base, gamma: float, detach: bool):
    """base^gamma, ASL's focusing weight; a constant for the gradient when detach (ASL's default)."""
    if gamma == 0:
        return torch.ones_like(base)
    if detach:
        base = base.detach()
    # base can be exactly 0 (a saturated logit, or p <= clip), where d/d base of base^gamma is infinite for
    # gamma < 1; the floor keeps that derivative finite, and clamp passes no gradient below it anyway.
    return base.clamp(min=torch.finfo(base.dtype).tiny).pow(gamma)


if __name__ == "__main__":
    # A worked example: B = 2 images, L = 3 labels, one entry ignored (-1).
    torch.manual_seed(0)
    z, y = torch.randn(2, 3), torch.tensor([[1.0, 0, 0], [0, 1, -1]])
    print(f"logits {tuple(z.shape)} (B, L), targets {tuple(y.shape)} (B, L) in {{1, 0, -1}}")
    bce = F.binary_cross_entropy_with_logits(z, y.clamp(min=0), reduction="none")[y >= 0].mean()
    print(f"masked BCE {masked_bce(z, y):.4f} = BCE over the 5 valid entries by hand {bce:.4f}")
    print(f"ASL(gamma 0, clip 0, eps 0) = {asymmetric_loss(z, y, 0, 0, 0, 0):.4f} = BCE; "
          f"Q2L's ASL (gamma- 2, eps 1e-5) = {asymmetric_loss(z, y, 2, 0, 0, 1e-5):.4f}: easy negatives weigh less")
