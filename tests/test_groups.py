"""
Label groups in DR-MoE (model.py, --label-groups K, --group-by, --group-decoding), each checked against a reference:

- K = L is the per-label model, output for output (torch.equal), with and without group decoding, and a
  per-label model's checkpoint keys are unchanged (no label_group buffer);
- the experts shared within groups (Experts.grouped, one einsum per group) equal the per-label loop
  Experts.forward_loop reading each label's group's weights;
- the group-wise classifier equals a loop over labels, logit[b,l] = <W_l, z[b, group(l)]> + c_l, and with
  ML-Decoder's grouping by index it equals ML-Decoder's own GroupFC layout: a (K, D, ceil(L/K)) weight, one
  matmul per group query, the (B, K * ceil(L/K)) outputs cut to L;
- the co-occurrence groups are the spectral clustering of the training labels, numbered by their first label;
- the counts studies/bench.py tabulates are zoo.build_model's, built on the meta device (DR-MoE 55.0 M at
  COCO's 80 labels, ResNet-101 at 448 px).
"""
import math

import numpy as np
import pytest
import torch

import config
from experts import Experts
from lib import spectral
from model import DRMoE
from tiny import have
from zoo import ModelConfig, build_model

L = 7


def tiny(**kw) -> DRMoE:
    """A small DR-MoE built from seed 0: two builds with the same settings hold the same weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_labels=L, dim=32, heads=2, ff_dim=64, expert_hidden=16, dropout=0.0, feature_layer="layer2",
                      image_size=32, **kw)
    return DRMoE(cfg).eval()


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("decoding", [False, True])
def test_one_group_per_label_is_the_per_label_model(decoding):
    today, logits = tiny(), tiny()(X)[0]
    same = tiny(label_groups=L, group_decoding=decoding)
    assert torch.equal(same(X)[0], logits)
    # The parameters are the same tensors in the same order: a per-label checkpoint loads into K = L.
    assert [n for n, _ in today.named_parameters()] == [n for n, _ in same.named_parameters()]
    assert "label_group" not in today.state_dict()
    if decoding:   # K = L groups decoded: each label its own group, read by the group-wise classifier
        assert same.label_group.tolist() == list(range(L))
    else:          # K = L experts: the per-label model itself, its checkpoint keys unchanged
        assert same.state_dict().keys() == today.state_dict().keys()


def test_grouped_experts_equal_the_per_label_loop():
    torch.manual_seed(0)
    experts = Experts(4, 8, 16, shared=2, task=2)                      # K = 4 groups; group 3 left empty below
    h = torch.randn(2, L, 8)                                            # (B, L, D)
    group = torch.tensor([2, 0, 2, 1, 0, 0, 2])                         # (L,) label -> group
    out = experts(h, group)
    assert out.shape == (2, L, 4, 8)
    assert torch.allclose(out, experts.forward_loop(h, group), atol=1e-6)
    group.copy_(torch.tensor([0, 0, 1, 1, 3, 3, 3]))                    # regrouped in place, as prepare() does
    assert torch.allclose(experts(h, group), experts.forward_loop(h, group), atol=1e-6)
    # Labels of one group meet the same task-specific experts, those of another group different ones:
    # labels 0 (group 2), 2 (group 2) and 1 (group 0) given one feature.
    group = torch.tensor([2, 0, 2, 1, 0, 0, 2])
    h[:, 1] = h[:, 2] = h[:, 0]
    out = experts(h, group)
    assert torch.allclose(out[:, 0], out[:, 2], atol=1e-6) and not torch.allclose(out[:, 0, 2:], out[:, 1, 2:])
    assert torch.allclose(out[:, 0, :2], out[:, 1, :2], atol=1e-6)      # the shared experts are everyone's


def test_group_wise_classifier_equals_a_loop_over_labels():
    model = tiny(label_groups=3, group_decoding=True)
    model.label_group.copy_(torch.tensor([1, 0, 2, 1, 1, 0, 2]))      # any grouping, not only by index
    seen = {}
    model.moe[-1].register_forward_hook(lambda m, i, o: seen.update(z=o[0]))   # returns None: output kept
    logits, info = model(X)
    z = seen["z"]                                                       # (B, K, D): one feature per group
    assert z.shape[1] == 3 and model.queries.shape[0] == 3
    loop = torch.stack([z[:, model.label_group[l]] @ model.cls_weight[l] + model.cls_bias[l] for l in range(L)], 1)
    assert torch.allclose(logits, loop, atol=1e-6)
    # Every label's routing is its group's: the record has L rows, read per label like a per-label model's.
    w = info["routing"]["gate"]["probs"]
    assert w.shape == (3, L, 3) and torch.equal(w[:, 1], w[:, 5])


def test_group_wise_classifier_equals_ml_decoders_layout():
    """ML-Decoder (Ridnik et al., WACV 2023; Alibaba-MIIL/ML_Decoder, src_files/ml_decoder/ml_decoder.py):
    duplicate_factor g = ceil(L / K), duplicate_pooling (K, D, g), out[:, k] = h[:, k] @ W[k], flatten, cut to L."""
    K = 3
    model = tiny(label_groups=K, group_decoding=True, group_by="index")
    seen = {}
    model.moe[-1].register_forward_hook(lambda m, i, o: seen.update(z=o[0]))   # returns None: output kept
    logits = model(X)[0]
    g, D = math.ceil(L / K), model.cfg.dim
    assert model.label_group.tolist() == [l // g for l in range(L)]
    pooling = torch.zeros(K * g, D)
    pooling[:L] = model.cls_weight.detach()                             # label l = slot l of the flattened (K, g)
    pooling = pooling.reshape(K, g, D).transpose(1, 2)                  # (K, g, D) -> (K, D, g), ML-Decoder's
    h = seen["z"]
    out = torch.zeros(h.shape[0], K, g)
    for i in range(K):                                                  # ML-Decoder's GroupFC loop
        out[:, i, :] = h[:, i, :] @ pooling[i]
    theirs = out.flatten(1)[:, :L] + model.cls_bias
    assert torch.allclose(logits, theirs, atol=1e-6)


def test_cooccurrence_groups_are_the_spectral_clustering():
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 2, 300)                                     # two scenes: labels {0, 3, 5} and {1, 2, 4, 6}
    member = np.array([0, 1, 1, 0, 1, 0, 1])
    y = ((rng.random((300, L)) < 0.7) & (member[None] == scene[:, None])).astype(np.int64)
    model = tiny(label_groups=2)
    model.prepare(y, verbose=False)
    assert model.label_group.tolist() == [0, 1, 1, 0, 1, 0, 1]          # the scenes, numbered by their first label
    plus, _ = spectral.affinities(*spectral.label_cooccurrence(y))
    ref = spectral.spectral_groups(plus, 2)
    assert (ref[model.label_group.numpy() == 0] == ref[0]).all()       # the same partition as the clustering's
    index = tiny(label_groups=2, group_by="index")
    index.prepare(y, verbose=False)                                     # ML-Decoder's by index: prepare leaves it
    assert index.label_group.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_bad_groups_stop_in_one_line():
    with pytest.raises(ValueError, match="between 1 and the 7 labels"):
        tiny(label_groups=8)
    with pytest.raises(ValueError, match="needs --label-groups"):
        tiny(group_decoding=True)
    with pytest.raises(ValueError, match="leaves groups empty"):   # 7 labels in groups of ceil(7/5) = 2: 4 used
        tiny(label_groups=5, group_by="index")
    for flags in (["--label-groups", "3", "--moe-layers", "0"], ["--group-decoding"]):
        with pytest.raises(SystemExit):
            config.parse_args(flags)


@pytest.mark.parametrize("name, groups, millions", [("drmoe", 0, 55.03), ("drmoe", 100, 55.03), ("linear", 0, 42.66)])
def test_bench_counts_are_build_models_on_meta(name, groups, millions):
    """The parameter counts of docs/speed.md's label table (built on the meta device) are a real build's."""
    if name == "linear" and not have("baselines.py"):
        pytest.skip("the linear head lives in baselines.py, which this copy does not have")
    bench = pytest.importorskip("studies.bench")
    tcfg, mcfg = bench.label_config(name, 80, label_groups=groups, group_decoding=bool(groups))
    assert mcfg.label_groups == (80 if groups else 0)                  # K is capped at L, as ML-Decoder caps it
    torch.manual_seed(0)
    count = sum(p.numel() for p in build_model(mcfg, verbose=False).parameters())   # a real build, on the CPU
    assert bench.label_cost(tcfg, mcfg)["params"] == count
    if millions:
        assert round(count / 1e6, 2) == millions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_models_run_the_amp_path(dtype):
    """The GPU's mixed-precision path, on the CPU (docs/speed.md): grouped experts and group decoding train
    under autocast, the gate's rows stay fp32."""
    for kw in (dict(label_groups=3), dict(label_groups=3, group_decoding=True)):
        model = tiny(**kw).train()
        with torch.autocast("cpu", dtype=dtype):
            logits, info = model(X)
        logits.float().sum().backward()
        assert torch.isfinite(logits).all() and info["routing"]["gate"]["probs"].dtype == torch.float32
        assert model.moe[0].experts.task_w1.grad is not None and torch.isfinite(model.moe[0].experts.task_w1.grad).all()
