"""
The gate: for every image b and label l, a weight w[b, l, e] on each of that label's E = S + T experts.

    w[b, l, :] = softmax( (W_l · u[b, l] + c_l) / tau )          rows are >= 0 and sum to 1

The four kinds differ only in what the gate reads, u[b, l] (the `--gate` flag), which is exactly where
the papers differ:

    static   u = nothing: w[b, l] = softmax(c_l), one learned row per label shared by all images
             (the input-independent baseline DR-MoE's reviewers asked for)
    label    u = h[b, l]          the label's own decoded feature (HSQ, Yin et al. ICLR 2024, §3.3 eq. 1-2:
                                  g_k(x) = softmax(W_g^k x), one gating network per task k)
    image    u = g[b]             a global image feature (pooled backbone map), the same for every label
    dynamic  u = [h[b, l]; g[b]]  both: the label's feature *and* the whole image's context (DR-MoE's gate)

Every label owns its gating network W_l (L, I, E), as in HSQ where each task has its own gate; the
weights of all labels are applied in one einsum.

Options, all off by default:
- temperature tau (> 1 flattens the weights, < 1 sharpens them);
- top-k routing: keep the k largest logits per row, softmax over those k, zero elsewhere. The
  softmax comes *after* the top-k choice (softmax-then-top-k would leave rows that do not sum to 1).
  With k = 1 the kept softmax is the constant 1, whose gradient is zero, so the gate would never learn;
  there we use the straight-through estimator (Bengio et al., 2013): the forward value is the one-hot
  row, the backward pass uses the dense softmax's gradient;
- a load-balancing auxiliary loss (Switch Transformer, Fedus et al. 2022, eq. 4), returned for model.py to
  weigh by `--aux-loss-coef` (the loop adds what the model returns):  aux = E · Σ_e f_e · P_e, averaged over labels, where
  P_e = mean over the batch of the dense softmax and f_e = fraction of rows routed to e (top-k), or
  f_e = P_e for dense routing. It equals 1 for perfectly balanced routing and E when all mass goes to
  one expert, so the coefficient means the same thing for any E.

The gate runs in float32 even under autocast, logits included (autocast is switched off around it):
bf16 keeps 8 bits of mantissa, which rounds away the small logit differences that decide routing and
the top-k choice. The gate is tiny (B * L * I * E multiply-adds), so fp32 costs nothing measurable. Its
weights are cast to the experts' dtype only for the weighted sum in model.py.

Expert collapse. A gate can learn to send (almost) all mass to one expert slot, e.g. every label to its
task-specific expert, so the shared experts stop receiving gradient and the mixture is a mixture in name only
(Shazeer et al. 2017 call this the self-reinforcing imbalance of gated experts). model.py hands the gate's
weights to the loop as a routing record (lib/routing.py), whose watch gives the mass per expert slot every
epoch and warns when one slot holds more than --collapse-threshold of it, as for every router. The remedy
is the load-balancing loss above (--aux-loss-coef; results/compare measures its effect).

Shapes (legend in experts.py): h (B, L, D), g (B, D) -> weights (B, L, E) float32, aux_loss scalar.

    python gating.py     # a worked example: the four gate kinds on 2 images x 3 labels, the equation by hand, top-1
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

GATE_KINDS = ("static", "label", "image", "dynamic")


class Gate(nn.Module):
    def __init__(self, kind: str, num_labels: int, dim: int, num_experts: int,
                 top_k: int = 0, temperature: float = 1.0):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}; choose one of {GATE_KINDS}")
        if not 0 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [0, {num_experts}] (0 = dense routing)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kind, self.num_experts, self.top_k, self.temperature = kind, num_experts, top_k, temperature
        in_dim = {"static": 0, "label": dim, "image": dim, "dynamic": 2 * dim}[kind]
        L, I, E = num_labels, in_dim, num_experts
        # Zero init: every gate starts uniform (w = 1/E), so no expert wins by the luck of initialisation.
        self.weight = nn.Parameter(torch.zeros(L, I, E)) if I else None
        self.bias = nn.Parameter(torch.zeros(L, E))

    def gate_input(self, h: torch.Tensor, g: torch.Tensor):
        """What this kind of gate reads: (B, L, I), or None for the static gate."""
        if self.kind == "label":
            return h                                                       # (B, L, D)
        if self.kind == "image":
            return g.unsqueeze(1).expand(-1, h.shape[1], -1)               # (B, D) -> (B, L, D)
        if self.kind == "dynamic":
            return torch.cat([h, g.unsqueeze(1).expand_as(h)], dim=-1)     # (B, L, 2D)
        return None

    def forward(self, h: torch.Tensor, g: torch.Tensor):
        """h (B, L, D) label features, g (B, D) image feature -> (weights (B, L, E) fp32, aux_loss scalar)."""
        B, L, _ = h.shape
        u = self.gate_input(h, g)
        # fp32 whatever autocast chose for the layers around it (see the docstring): the inputs are cast
        # up, and autocast is off so that the einsum is not cast back down to bf16/fp16.
        with torch.autocast(h.device.type, enabled=False):
            if u is None:
                logits = self.bias.float().expand(B, L, -1)                # (B, L, E), same for every image
            else:
                # Label l's own gating matrix W_l applied to its input: l indexes, i is summed.
                logits = torch.einsum("bli,lie->ble", u.float(), self.weight.float()) + self.bias.float()  # (B, L, E)
        logits = logits / self.temperature
        dense = F.softmax(logits, dim=-1)                                  # (B, L, E)
        if self.top_k and self.top_k < self.num_experts:
            kept = logits.topk(self.top_k, dim=-1).indices                 # (B, L, k)
            mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
            weights = F.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)   # softmax over the k kept
            if self.top_k == 1:
                # Straight-through: forward = one-hot (weights), backward = d dense / d logits.
                weights = weights + dense - dense.detach()
            routed = mask.float() / self.top_k                             # f: each row spreads 1 over k experts
        else:
            weights, routed = dense, dense
        # Switch-style balance loss, aux = E * sum_e f_e * P_e, per label then averaged (see docstring).
        P = dense.mean(dim=0)                                              # (L, E) mean routing probability
        f = routed.mean(dim=0).detach() if routed is not dense else P      # (L, E) fraction routed
        return weights, switch_balance(P, f)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, experts={self.num_experts}, top_k={self.top_k}, temperature={self.temperature}"


def switch_balance(P: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's balance loss (Fedus et al. 2022, eq. 4; f_e its eq. 5, P_e its eq. 6), E * sum_e f_e * P_e,
    for P and f (..., E):
    P the mean routing probability, f the fraction routed: for a top-k router a count (detached by the
    caller, as in Switch), for the dense gate f = P itself, so there the gradient flows through both and the
    loss is E * sum_e P_e^2. Rows (the head gate's labels) are averaged. At perfect balance (f = P = 1/E) it is 1; on one expert, E."""
    return P.shape[-1] * (f * P).sum(dim=-1).mean()


def expert_names(shared: int, task: int):
    """Names of the E gate slots, in the gate's order: the S shared experts, then the label's T task-specific ones."""
    return [f"shared{s}" for s in range(shared)] + [f"task{t}" for t in range(task)]


if __name__ == "__main__":
    # A worked example: B = 2 images, L = 3 labels, D = 4, E = 3 experts per label (S = 2 shared, T = 1 task-specific).
    torch.manual_seed(0)
    B, L, D, E = 2, 3, 4, 3
    h, g = torch.randn(B, L, D), torch.randn(B, D)                     # label features, image feature
    print(f"h {tuple(h.shape)} (B, L, D) label features, g {tuple(g.shape)} (B, D) image feature")
    for kind in GATE_KINDS:
        gate = Gate(kind, L, D, E)
        nn.init.normal_(gate.bias)                                     # a gate that has learned something
        if gate.weight is not None:
            nn.init.normal_(gate.weight)
        w, aux = gate(h, g)
        u = gate.gate_input(h, g)
        reads = "nothing" if u is None else f"u {tuple(u.shape)} (B, L, I)"
        # Every row is a distribution over label l's experts; the static gate gives every image the same row.
        W = f"W {tuple(gate.weight.shape)} (L, I, E)" if gate.weight is not None else "bias c (L, E) only"
        print(f"  {kind:<8} reads {reads:<24} {W:<22} -> w {tuple(w.shape)} (B, L, E), rows sum to "
              f"{w.sum(-1).mean():.3f}, w[0, 0] = {[round(v, 3) for v in w[0, 0].tolist()]}, balance loss {aux:.3f}")
    # The equation by hand for the dynamic gate, image 0, label 1: softmax(W_1 [h; g] + c_1).
    u = torch.cat([h[0, 1], g[0]])                                     # (2D,)
    by_hand = F.softmax(u @ gate.weight[1] + gate.bias[1], dim=-1)     # (E,)
    print(f"dynamic gate, image 0, label 1: |w - softmax(W_l u + c_l)| = {(w[0, 1] - by_hand).abs().max():.1e}")
    # Top-1 routing: the forward value is one-hot, the gradient still that of the dense softmax.
    w1, _ = Gate("dynamic", L, D, E, top_k=1)(h, g)
    print(f"top_k = 1: w[0, 0] = {w1[0, 0].tolist()} (one-hot); the balance loss is 1 at perfect balance, E = {E} "
          "with all mass on one expert")
