"""
The experts of the mixture: shared experts used by every label, task-specific experts owned by one label (the DR-MoE and HSQ papers' term).

DR-MoE (and HSQ before it, Yin et al., ICLR 2024, §3.3) decode one feature h[b, l] per label and pass it
through a set of small feed-forward networks ("experts"). Two kinds exist:

    shared expert s = 1..S   E_s(x)    = W2_s · GELU(W1_s · x + b1_s) + b2_s      used by every label
    task expert   t = 1..T   E_{l,t}(x) = W2_{l,t} · GELU(W1_{l,t} · x + b1_{l,t}) + b2_{l,t}
                                                                                  owned by label l only

Shared experts let labels pool what they have in common ("round things", "red things"); task-specific experts
give each label capacity of its own. The gate (gating.py) decides, per image and per label, how much of
each to use. This file only computes every expert's output; combining them is the gate's and model.py's job.

Why stacked weights and einsum: the naive implementation is a ModuleList of S + L*T small MLPs and a
Python loop over labels and experts. With L = 80 labels that is hundreds of tiny matmuls per step.
Storing each group's weights as one tensor, (S, D, H) for shared and (L, T, D, H) for task-specific experts,
lets one einsum apply them all at once (the trick lucidrains' mixture-of-experts uses). `forward_loop` is
that naive loop, kept as the reference: tests/test_moe.py checks the einsum against it, studies/bench.py times both.

Experts per label group (model.py --label-groups K): forward(h, group) gives label l the task-specific experts
of group[l], so the weights are (K, T, D, H) and grow with K, not L; `grouped` runs one einsum per group.

Shape legend (whole codebase): B batch, L labels, D feature dim, S shared experts,
T task-specific experts per label, K label groups (model.py), H expert hidden dim, E = S + T experts seen by each label, N tokens of an image's
map (h*w), I the width of what a gate reads (gating.py). backbone_moe.py keeps its papers' letters and says so.

    input  h:       (B, L, D)     one feature per image and label (from the label-query decoder)
    output experts: (B, L, E, D)  expert e's output for label l; e < S are shared, e >= S are label l's task-specific ones

    python experts.py    # a worked example: every expert of 3 labels on 2 images, checked against the equation by hand
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Experts(nn.Module):
    """S shared and L*T task-specific two-layer experts D -> H -> D (GELU, dropout), applied in one pass."""

    def __init__(self, num_labels: int, dim: int, hidden: int, shared: int, task: int, dropout: float = 0.0):
        super().__init__()
        if shared < 0 or task < 0 or shared + task == 0:
            raise ValueError(f"need at least one expert, got shared={shared}, task={task}")
        self.num_labels, self.dim, self.hidden = num_labels, dim, hidden
        self.shared, self.task = shared, task
        L, D, H, S, T = num_labels, dim, hidden, shared, task
        # Stacked weights: one leading axis per expert (and per label for task-specific experts).
        self.shared_w1 = nn.Parameter(torch.empty(S, D, H))
        self.shared_b1 = nn.Parameter(torch.empty(S, H))
        self.shared_w2 = nn.Parameter(torch.empty(S, H, D))
        self.shared_b2 = nn.Parameter(torch.empty(S, D))
        self.task_w1 = nn.Parameter(torch.empty(L, T, D, H))
        self.task_b1 = nn.Parameter(torch.empty(L, T, H))
        self.task_w2 = nn.Parameter(torch.empty(L, T, H, D))
        self.task_b2 = nn.Parameter(torch.empty(L, T, D))
        # Biases, stacked into 2-D/3-D tensors: train.decay_roles must not decay them (their dim says "matrix").
        self.no_weight_decay = ("shared_b1", "shared_b2", "task_b1", "task_b2")
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """E: how many experts each label sees (its S shared plus its own T)."""
        return self.shared + self.task

    def reset_parameters(self):
        # Same distribution as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias,
        # so a stacked expert starts exactly like the nn.Linear pair it replaces.
        for w1, b1, w2, b2 in [(self.shared_w1, self.shared_b1, self.shared_w2, self.shared_b2),
                               (self.task_w1, self.task_b1, self.task_w2, self.task_b2)]:
            for p, fan_in in [(w1, self.dim), (b1, self.dim), (w2, self.hidden), (b2, self.hidden)]:
                nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, h: torch.Tensor, group: torch.Tensor = None) -> torch.Tensor:
        """h (B, L, D) -> every expert's output (B, L, E, D), shared experts first.

        group (L,) long, optional: label l uses the T task-specific experts of group[l] (num_labels then
        counts the K groups, model.py --label-groups); None: label l owns its own (K = L).
        """
        outs = []
        if self.shared:
            # Every shared expert sees every label's feature: one einsum broadcasts over labels.
            z = torch.einsum("bld,sdh->blsh", h, self.shared_w1) + self.shared_b1      # (B, L, S, H)
            z = self.dropout(F.gelu(z))
            outs.append(torch.einsum("blsh,shd->blsd", z, self.shared_w2) + self.shared_b2)  # (B, L, S, D)
        if self.task and group is None:
            # Label l's feature meets only label l's experts: l is a shared index, not a summed one.
            z = torch.einsum("bld,ltdh->blth", h, self.task_w1) + self.task_b1         # (B, L, T, H)
            z = self.dropout(F.gelu(z))
            outs.append(torch.einsum("blth,lthd->bltd", z, self.task_w2) + self.task_b2)    # (B, L, T, D)
        elif self.task:
            outs.append(self.grouped(h, group))                                         # (B, L, T, D)
        return torch.cat(outs, dim=2)                                                   # (B, L, E, D)

    def grouped(self, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Task-specific experts shared within label groups: h (B, L, D), group (L,) -> (B, L, T, D).

        The labels are sorted by group and each group's experts run on its members in one einsum. Gathering
        the weights per label (task_w1[group], (L, T, D, H)) would be one einsum too, but it builds exactly
        the per-label tensor grouping exists to avoid: at L = 10,000 that is 2.6 GB per weight matrix.
        """
        order, sizes = self.split(group)
        outs = []
        for k, x in enumerate(h[:, order].split(sizes, dim=1)):                         # x (B, n_k, D): group k's labels
            z = torch.einsum("bnd,tdh->bnth", x, self.task_w1[k]) + self.task_b1[k]     # (B, n_k, T, H)
            z = self.dropout(F.gelu(z))
            outs.append(torch.einsum("bnth,thd->bntd", z, self.task_w2[k]) + self.task_b2[k])   # (B, n_k, T, D)
        return torch.cat(outs, dim=1)[:, torch.argsort(order)]                          # (B, L, T, D) in label order

    def split(self, group: torch.Tensor):
        """group (L,) -> (order (L,) the labels sorted by group, sizes: K ints), kept until `group` changes.

        The sizes are Python ints (torch.split needs them), so computing them reads the GPU from the host; cached
        by the tensor and its in-place version counter (prepare() and load_state_dict() write it in place), that
        happens once per grouping, not in every step (no host synchronisation inside the step: docs/speed.md).
        """
        key = (group.data_ptr(), group._version)
        if getattr(self, "_split_key", None) != key:
            order = torch.argsort(group, stable=True)                                   # (L,) labels by group
            self._split = order, torch.bincount(group, minlength=self.num_labels).tolist()   # (K,) labels per group
            self._split_key = key
        return self._split

    def forward_loop(self, h: torch.Tensor, group: torch.Tensor = None) -> torch.Tensor:
        """The definition, one label and one expert at a time: what forward() computes in four einsums.

        This is the naive implementation the docstring above describes (S + T small MLPs per label, a
        Python loop); tests/test_moe.py checks forward() against it and studies/bench.py times both.
        h (B, L, D), group (L,) or None -> (B, L, E, D).
        """
        per_label = []
        for l in range(h.shape[1]):
            x, o = h[:, l], (l if group is None else int(group[l]))                     # (B, D), the owner of l's experts
            mine = ([(self.shared_w1[s], self.shared_b1[s], self.shared_w2[s], self.shared_b2[s]) for s in range(self.shared)]
                    + [(self.task_w1[o, t], self.task_b1[o, t], self.task_w2[o, t], self.task_b2[o, t]) for t in range(self.task)])
            # E_e(x) = W2 GELU(W1 x + b1) + b2; the stored W1 is (D, H), F.linear wants (out, in) = (H, D).
            per_label.append(torch.stack([F.linear(self.dropout(F.gelu(F.linear(x, w1.T, b1))), w2.T, b2)
                                          for w1, b1, w2, b2 in mine], dim=1))          # (B, E, D)
        return torch.stack(per_label, dim=1)                                            # (B, L, E, D)

    def extra_repr(self) -> str:
        return (f"labels={self.num_labels}, dim={self.dim}, hidden={self.hidden}, "
                f"shared={self.shared}, task_per_label={self.task}")


if __name__ == "__main__":
    # A worked example on a tiny input: B = 2 images, L = 3 labels, D = 8, H = 16, S = 2 shared experts, T = 1
    # task-specific expert per label, so every label sees E = S + T = 3 experts.
    torch.manual_seed(0)
    B, L, D, H, S, T = 2, 3, 8, 16, 2, 1
    show = lambda name, t, what: print(f"{name:<12} {str(tuple(t.shape)):<15} {what}")
    experts = Experts(L, D, H, S, T)
    h = torch.randn(B, L, D)                                            # one decoded feature per image and label
    out = experts(h)
    show("h", h, "(B, L, D): one feature per image and label")
    show("shared_w1", experts.shared_w1, "(S, D, H): one matrix per shared expert")
    show("task_w1", experts.task_w1, "(L, T, D, H): label l's task-specific experts")
    show("experts(h)", out, f"(B, L, E, D), E = {experts.num_experts}: the shared experts first, then the task-specific")
    # Expert e of label l by hand, E(x) = W2 GELU(W1 x + b1) + b2: shared expert 1 on label 2 of image 0 ...
    x, gelu = h[0, 2], torch.nn.functional.gelu                         # x (D,)
    by_hand = gelu(x @ experts.shared_w1[1] + experts.shared_b1[1]) @ experts.shared_w2[1] + experts.shared_b2[1]
    print(f"shared expert 1 on label 2 of image 0: |einsum - by hand| = {(out[0, 2, 1] - by_hand).abs().max():.1e}")
    # ... and label 2's task-specific expert, which no other label ever sees.
    by_hand = gelu(x @ experts.task_w1[2, 0] + experts.task_b1[2, 0]) @ experts.task_w2[2, 0] + experts.task_b2[2, 0]
    print(f"label 2's task-specific expert, image 0: |einsum - by hand| = {(out[0, 2, S] - by_hand).abs().max():.1e}")
    print(f"the four einsums against forward_loop: max |difference| = {(out - experts.forward_loop(h)).abs().max():.1e}")
