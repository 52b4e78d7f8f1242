"""
The mixture's equations, each against a reference that would catch a different implementation.

- experts.py: the stacked einsum equals the naive loop over labels and experts (Experts.forward_loop);
- gating.py: rows are >= 0 and sum to 1, in float32 under autocast; the static gate ignores its input, the
  image gate reads only g, the label gate only h; top-k is softmax *after* top-k; every gate and expert
  parameter gets a gradient, k = 1 included; the balance loss is 1 when uniform and E when collapsed;
- model.py: the MoE combination equals h + sum_e w_e E_e(h) recomputed by hand, and shapes hold.

Run: python -m pytest -q tests/test_moe.py
"""
import pytest
import torch

from experts import Experts
from gating import GATE_KINDS, Gate
from model import DRMoE, sine_positional_encoding
from zoo import ModelConfig

B, L, D, H = 3, 5, 8, 16


@pytest.mark.parametrize("S,T", [(2, 1), (0, 2), (3, 0), (1, 3)])
def test_experts_equal_naive_loop(S, T):
    torch.manual_seed(0)
    ex = Experts(L, D, H, S, T, dropout=0.0)
    for p in ex.parameters():                # distinct random values everywhere (biases included)
        torch.nn.init.normal_(p)
    h = torch.randn(B, L, D)
    assert torch.allclose(ex(h), ex.forward_loop(h), atol=1e-5, rtol=1e-5)
    # And against a reference written here, independent of experts.py's own loop: each expert as the
    # nn.Linear -> GELU -> nn.Linear it stands for, built from the stacked weights (stored (in, out)).
    def mlp(w1, b1, w2, b2):
        first, second = torch.nn.Linear(D, H), torch.nn.Linear(H, D)
        with torch.no_grad():
            first.weight.copy_(w1.T), first.bias.copy_(b1), second.weight.copy_(w2.T), second.bias.copy_(b2)
        return torch.nn.Sequential(first, torch.nn.GELU(), second)
    shared = [mlp(ex.shared_w1[s], ex.shared_b1[s], ex.shared_w2[s], ex.shared_b2[s]) for s in range(S)]
    out = ex(h)                                                     # (B, L, S + T, D)
    for l in range(L):
        own = [mlp(ex.task_w1[l, t], ex.task_b1[l, t], ex.task_w2[l, t], ex.task_b2[l, t]) for t in range(T)]
        for e, expert in enumerate(shared + own):                   # shared experts first, then label l's
            assert torch.allclose(out[:, l, e], expert(h[:, l]), atol=1e-5, rtol=1e-5), (l, e)


def test_experts_reject_empty_mixture():
    with pytest.raises(ValueError):
        Experts(L, D, H, 0, 0)


def random_gate(kind, E=4, **kw):
    torch.manual_seed(1)
    gate = Gate(kind, L, D, E, **kw)
    for p in gate.parameters():              # zero init would make every kind look input-independent
        torch.nn.init.normal_(p)
    return gate


@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_gate_rows_are_distributions(kind, top_k):
    gate = random_gate(kind, top_k=top_k, temperature=0.7)
    h, g = torch.randn(B, L, D), torch.randn(B, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, aux = gate(h.bfloat16(), g.bfloat16())
    assert w.dtype == torch.float32                       # softmax stayed in fp32 under autocast
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(B, L), atol=1e-6)
    if top_k:
        assert ((w > 0).sum(-1) == top_k).all()           # exactly k experts get mass


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_gate_is_fp32_under_autocast(kind):
    # Autocast must not reach inside the gate: its weights under bf16 autocast equal, exactly, the fp32
    # gate applied to the same (bf16-rounded) inputs. A bf16 einsum for the logits would fail this.
    gate = random_gate(kind, top_k=2)
    h, g = torch.randn(B, L, D).bfloat16(), torch.randn(B, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_amp, aux_amp = gate(h, g)
    w_ref, aux_ref = gate(h.float(), g.float())
    assert torch.equal(w_amp, w_ref) and torch.equal(aux_amp, aux_ref)


def test_gate_inputs():
    h, g = torch.randn(B, L, D), torch.randn(B, D)
    h2, g2 = torch.randn(B, L, D), torch.randn(B, D)
    same = lambda kind, a, b: torch.allclose(random_gate(kind)(*a)[0], random_gate(kind)(*b)[0])
    assert same("static", (h, g), (h2, g2))               # static: no input at all
    assert same("image", (h, g), (h2, g))                 # image gate: h is not read ...
    assert not same("image", (h, g), (h, g2))             # ... g is
    assert same("label", (h, g), (h, g2))                 # label gate (HSQ): g is not read ...
    assert not same("label", (h, g), (h2, g))             # ... h is
    assert not same("dynamic", (h, g), (h2, g)) and not same("dynamic", (h, g), (h, g2))
    w = random_gate("static")(h, g)[0]
    assert torch.allclose(w, w[:1].expand_as(w))          # the same row for every image


def test_gate_equation_by_hand():
    """w[b,l] = softmax((W_l [h;g] + c_l) / tau), written with a loop over labels."""
    gate = random_gate("dynamic", temperature=2.0)
    h, g = torch.randn(B, L, D), torch.randn(B, D)
    w, _ = gate(h, g)
    for l in range(L):
        u = torch.cat([h[:, l], g], dim=-1)                             # (B, 2D)
        ref = torch.softmax((u @ gate.weight[l] + gate.bias[l]) / 2.0, dim=-1)
        assert torch.allclose(w[:, l], ref, atol=1e-6)


def test_top_k_is_softmax_over_kept_logits():
    gate = random_gate("label", top_k=2)
    h, g = torch.randn(B, L, D), torch.randn(B, D)
    w, _ = gate(h, g)
    logits = torch.einsum("bli,lie->ble", h, gate.weight) + gate.bias
    top = logits.topk(2, dim=-1)
    ref = torch.zeros_like(logits).scatter_(-1, top.indices, torch.softmax(top.values, dim=-1))
    assert torch.allclose(w, ref, atol=1e-6)


@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("top_k", [0, 1])
def test_gradients_reach_every_parameter(kind, top_k):
    """Through the MoE combination used by the model, every gate and expert parameter must learn."""
    torch.manual_seed(0)
    E = 3
    ex = Experts(L, D, H, 2, 1)
    gate = random_gate(kind, E=E, top_k=top_k)
    h, g = torch.randn(B, L, D), torch.randn(B, D)
    w, _ = gate(h, g)
    z = h + torch.einsum("ble,bled->bld", w, ex(h))
    z.pow(2).sum().backward()   # no balance loss: the gradient must come through the weights themselves
    for name, p in list(gate.named_parameters()) + list(ex.named_parameters()):
        if top_k == 1 and name.startswith(("shared", "task")):
            continue      # with k = 1 an expert that no row chose gets no gradient, by design
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind} top_k={top_k}: no gradient for {name}"


def test_balance_loss_range():
    gate = Gate("static", L, D, 4)
    assert torch.isclose(gate(torch.randn(B, L, D), torch.randn(B, D))[1], torch.tensor(1.0))   # uniform: 1
    with torch.no_grad():
        gate.bias[:, 0] = 50.0                                                                  # collapsed: E
    assert torch.isclose(gate(torch.randn(B, L, D), torch.randn(B, D))[1], torch.tensor(4.0), atol=1e-4)


def test_positional_encoding_distinguishes_positions():
    pos = sine_positional_encoding(4, 4, 32, dtype=torch.bfloat16)
    assert pos.shape == (16, 32) and pos.dtype == torch.bfloat16
    assert torch.cdist(pos.float(), pos.float()).add(torch.eye(16)).min() > 0.1   # no two tokens share a code


def test_model_moe_combination_by_hand():
    torch.manual_seed(0)
    cfg = ModelConfig(num_labels=L, dim=32, heads=2, ff_dim=64, expert_hidden=16, dropout=0.0,
                      feature_layer="layer2", shared_experts=2, task_experts=2)
    model = DRMoE(cfg).eval()
    captured = {}
    model.decoder[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    x = torch.randn(2, 3, 64, 64)
    logits, info = model(x)
    h, w = captured["h"], info["routing"]["gate"]["probs"]
    assert logits.shape == (2, L) and w.shape == (2, L, 4)
    z = h + torch.einsum("ble,bled->bld", w, model.moe[0].experts(h))
    ref = torch.stack([z[:, l] @ model.cls_weight[l] + model.cls_bias[l] for l in range(L)], dim=1)
    assert torch.allclose(logits, ref, atol=1e-5)
