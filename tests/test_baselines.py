"""
The baselines (baselines.py) against hand computations and their papers' definitions (CPU, seconds).

- every --model gives (B, L) logits and lowers the loss in a few steps on a fixed batch;
- label_cooccurrence and mlgcn_adjacency on a small hand-made label matrix equal numbers worked out by
  hand from ML-GCN's gen_A / gen_adj (difficult entries, -1, are not counted);
- the asymmetric loss equals masked BCE when gamma+- = 0 and clip = 0, and drops easy negatives; its value
  and gradient equal a line-by-line transcription of Alibaba-MIIL/ASL's AsymmetricLoss (detached focusing
  weights by default, and undetached by flag), the detached gradient equals a hand derivation, and a
  saturated logit with gamma < 1 gives no NaN;
- the q2l preset is Query2Label's released loss (gamma- 2, gamma+ 0, clip 0, eps 1e-5, detached) and its
  width follows the backbone (ResNet-18 at layer4: 512; ResNet-101: the official 2048);
- weight decay is assigned by role (queries, biases, norms, gate bias and experts' biases not decayed);
- every model returns fp32 logits from a bf16 autocast forward;
- HSQ with the static gate routes every image the same way (input-independent);
- word vectors are looked up by class name, not by row position;
- an ML-GCN checkpoint (graph and word vectors inside) is rebuilt by evaluate.py without the files;
- --describe reproduces Query2Label's official size with ResNet-101 on COCO (about 193M parameters).

Run: python -m pytest -q tests/test_baselines.py
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate
import train
import zoo
from baselines import load_word_vectors, mlgcn_adjacency
from data import label_cooccurrence
from losses import asymmetric_loss
from data import build_dataset
from zoo import ModelConfig, build_model

SMALL = dict(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64, expert_hidden=32,
             dropout=0.0, gcn_hidden=64)


def model_config(name: str, **kw) -> ModelConfig:
    """The model as train.py would configure it on the synthetic benchmark, shrunk to test size."""
    vit = ["--backbone", "vit_tiny"] if name == "mlvpt" else []   # ML-VPT prompts a ViT
    tcfg, mcfg, _ = train.parse_args(["--model", name] + vit)
    return ModelConfig(**{**mcfg.__dict__, **SMALL, **(dict(image_size=32) if vit else {}), **kw})


@pytest.mark.parametrize("name", list(zoo.models()))
def test_each_model_shapes_and_learns(name):
    torch.manual_seed(0)
    model = build_model(model_config(name), verbose=False)
    ds = build_dataset("synthetic", "train", image_size=32, augment=False, limit=16)
    x, y = torch.stack([ds[i][0] for i in range(16)]), ds.targets[:16]
    if name == "mlgcn":
        model.set_label_graph(ds.targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        logits, info = model(x)
        assert logits.shape == (16, 20)
        loss = train.masked_bce(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# Six images, three labels; the last image's label 1 is "difficult" (-1) and must not count.
HAND_TARGETS = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0], [1, -1, 1]])


def test_label_cooccurrence_by_hand():
    counts, nums = label_cooccurrence(HAND_TARGETS)
    # label 0 in images 0,1,2,4,5; label 1 in 0,1,3; label 2 in 2,5. Pairs: (0,1) in 0,1; (0,2) in 2,5.
    assert nums.tolist() == [5, 3, 2]
    assert counts.tolist() == [[0, 2, 2], [2, 0, 0], [2, 0, 0]]


def test_mlgcn_adjacency_by_hand():
    counts, nums = label_cooccurrence(HAND_TARGETS)
    # P(j|i) = counts / nums[i]: row 0 = [0, 2/5, 2/5], row 1 = [2/3, 0, 0], row 2 = [1, 0, 0].
    # Binarised at t = 0.4 (0.4 >= t counts, as gen_A's `_adj[_adj >= t] = 1`):
    #   A = [[0,1,1],[1,0,0],[1,0,0]]; column sums [2,1,1]; A * 0.25 / colsum + I =
    #   [[1, .25, .25], [.125, 1, 0], [.125, 0, 1]]; row sums r = [1.5, 1.125, 1.125].
    # gen_adj: adj[i, j] = A[j, i] / sqrt(r_i r_j).
    s = math.sqrt(1.5 * 1.125)
    expected = torch.tensor([[1 / 1.5, 0.125 / s, 0.125 / s],
                             [0.25 / s, 1 / 1.125, 0.0],
                             [0.25 / s, 0.0, 1 / 1.125]])
    adj = mlgcn_adjacency(counts, nums, t=0.4, p=0.2)
    assert torch.allclose(adj, expected, atol=1e-5), adj
    # A higher threshold drops the 0.4 edges: only the self-loops and P(0|1), P(0|2) >= 0.6 remain.
    adj_hi = mlgcn_adjacency(counts, nums, t=0.6, p=0.2)
    assert adj_hi[1, 0] == 0 and adj_hi[0, 1] > 0


def test_asymmetric_loss_reduces_to_bce():
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 3
    targets = torch.randint(0, 2, (8, 5)).float()
    targets[0, 0] = targets[3, 2] = -1
    asl = asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0, eps=0)
    assert torch.allclose(asl, train.masked_bce(logits, targets), atol=1e-6)


def official_asl(x, y, gamma_neg, gamma_pos, clip, eps, disable_torch_grad_focal_loss):
    """Alibaba-MIIL/ASL src/loss_functions/losses.py, AsymmetricLoss.forward (commit 8c9e0bd), transcribed
    line by line as the reference: every entry valid, and a SUM (ours is the mean over valid entries)."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos, xs_neg = x_sigmoid, 1 - x_sigmoid
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    if gamma_neg > 0 or gamma_pos > 0:
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(False)
        pt = xs_pos * y + xs_neg * (1 - y)
        one_sided_w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(True)
        loss = loss * one_sided_w
    return -loss.sum()


def grads(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip,eps,scale", [(4, 0, 0.05, 1e-8, 2), (4, 1, 0.05, 1e-8, 2),
                                                                 (2, 0, 0.0, 1e-5, 2), (3, 0.5, 0.1, 1e-8, 2),
                                                                 (2, 0, 0.0, 1e-5, 15)])
def test_asymmetric_loss_equals_official_asl_gradient(gamma_neg, gamma_pos, clip, eps, scale):
    # A random 32 x 80 batch, as in the review that found the undetached gradient (cosine 0.91). Scale 15
    # puts many logits beyond log(1e-5) = -11.5, where Q2L's eps floor binds (value and zero gradient).
    torch.manual_seed(0)
    x, y = torch.randn(32, 80) * scale, (torch.rand(32, 80) < 0.1).float()
    n = x.numel()
    for detach in (True, False):
        # The reference runs in float64: in fp32 its 1 - sigmoid(x) rounds (to 0 beyond x = 16.6), which moves
        # its eps floor; ours takes logsigmoid(-x), exact in fp32. Both are then the same function.
        ref_v, ref_g = grads(lambda z: official_asl(z, y.double(), gamma_neg, gamma_pos, clip, eps, detach), x.double())
        v, g = grads(lambda z: asymmetric_loss(z, y, gamma_neg, gamma_pos, clip, eps, detach), x)
        assert torch.allclose(v.double() * n, ref_v, rtol=1e-5), (detach, v * n, ref_v)
        assert torch.allclose(g.double() * n, ref_g, rtol=1e-4, atol=1e-7), detach
    # The default is the detached form, and it is really a different gradient from the undetached one.
    _, g_default = grads(lambda z: asymmetric_loss(z, y, gamma_neg, gamma_pos, clip, eps), x)
    _, g_flow = grads(lambda z: asymmetric_loss(z, y, gamma_neg, gamma_pos, clip, eps, detach_focusing=False), x)
    _, g_off = grads(lambda z: official_asl(z, y.double(), gamma_neg, gamma_pos, clip, eps, True), x.double())
    assert torch.allclose(g_default.double() * n, g_off, rtol=1e-4, atol=1e-7)
    assert torch.nn.functional.cosine_similarity(g_default.flatten(), g_flow.flatten(), dim=0) < 0.99


def test_detached_asl_gradient_by_hand():
    # Detached focusing weights: the gradient is the weighted cross-entropy's, w * dCE/dx, w a constant.
    #   positive: d/dx [-(1-p)^g+ log p] = -(1-p)^g+ (1 - p)
    #   negative, clip c: q = min(1 - p + c, 1); d/dx [-(1-q)^g- log q] = (1-q)^g- p (1 - p) / q, 0 where q = 1
    x = torch.tensor([[1.5, -0.3, 0.8, -4.0, 2.0]])
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    gp, gn, c = 1.0, 4.0, 0.05
    p = torch.sigmoid(x)
    q = (1 - p + c).clamp(max=1)
    hand = torch.where(y == 1, -(1 - p) ** gp * (1 - p), (1 - q) ** gn * p * (1 - p) / q * (q < 1)) / x.numel()
    _, g = grads(lambda z: asymmetric_loss(z, y, gn, gp, c), x)
    assert torch.allclose(g, hand, rtol=1e-5, atol=1e-9)
    assert g[0, 3] == 0                                  # p = 0.018 < clip: shifted to 0, no gradient


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asymmetric_loss_no_nan_with_saturated_logits(detach, clip):
    # gamma in (0, 1): d/db b^gamma is infinite at b = 0, which a saturated logit produces in fp32 (1 - p = 0
    # at x = 40). Computed on every entry and masked by a product, inf * 0 = NaN spreads to the whole
    # gradient; each branch computed only where it applies stays finite.
    x = torch.tensor([[40.0, -40.0, 100.0, -100.0, 0.3, 17.0]])
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    v, g = grads(lambda z: asymmetric_loss(z, y, gamma_neg=0.5, gamma_pos=0.5, clip=clip, detach_focusing=detach), x)
    assert torch.isfinite(v) and torch.isfinite(g).all(), g
    assert g[0, 4] < 0                                    # the ordinary positive still pulls its logit up


def test_q2l_preset_is_q2l_released_recipe():
    # SlongLiu/query2labels main_mlc.py defaults: --gamma_pos 0, --gamma_neg 2, --loss_clip 0, --eps 1e-5,
    # --dtgfl (focusing weights without gradient); --hidden_dim = the backbone's channels in its commands.
    tcfg, mcfg, _ = train.parse_args(["--model", "q2l"])
    assert (tcfg.loss, tcfg.asl_gamma_neg, tcfg.asl_gamma_pos, tcfg.asl_clip, tcfg.asl_eps, tcfg.asl_detach_focusing) \
        == ("asl", 2, 0, 0, 1e-5, True)
    assert (mcfg.enc_layers, mcfg.layers, mcfg.decoder_self_attn, mcfg.moe_layers) == (1, 2, False, 0)
    widths = {("synthetic", "resnet18"): 256, ("voc", "resnet18"): 512, ("voc", "resnet50"): 2048,
              ("coco", "resnet101"): 2048}
    for (dataset, backbone), d in widths.items():
        _, m, _ = train.parse_args(["--model", "q2l", "--dataset", dataset, "--backbone", backbone])
        assert (m.dim, m.ff_dim) == (d, 4 * d), (dataset, backbone, m.dim)
    _, m, _ = train.parse_args(["--model", "q2l", "--dataset", "voc", "--dim", "128"])
    assert m.dim == 128                                   # what you pass still wins
    # ASL's own defaults stay one flag set away; other models keep ASL's defaults when --loss asl.
    t, _, _ = train.parse_args(["--model", "q2l", "--asl-gamma-neg", "4", "--asl-clip", "0.05", "--asl-eps", "1e-8"])
    assert (t.asl_gamma_neg, t.asl_clip, t.asl_eps) == (4, 0.05, 1e-8)
    t, _, _ = train.parse_args(["--model", "drmoe", "--loss", "asl"])
    assert (t.asl_gamma_neg, t.asl_gamma_pos, t.asl_clip, t.asl_eps) == (4, 0, 0.05, 1e-8)


def test_weight_decay_by_role():
    # Decayed: weights that multiply an input. Not decayed: biases, norm gains, label queries, the gate's
    # bias (the static gate's learned routing logits), the experts' stacked biases, ML-GCN's free embedding.
    for argv, kept, decayed in [
        (["--model", "drmoe"], {"queries", "cls_bias", "moe.0.gate.bias", "moe.0.experts.shared_b1",
                                "moe.0.experts.task_b2", "decoder.0.norm1.weight", "backbone.bn1.weight",
                                "decoder.0.ff.0.bias"},
         {"cls_weight", "moe.0.gate.weight", "moe.0.experts.task_w1", "moe.0.experts.shared_w2",
          "backbone.conv1.weight", "decoder.0.cross_attn.in_proj_weight"}),
        (["--model", "drmoe", "--gate", "static"], {"moe.0.gate.bias"}, {"moe.0.experts.task_w1"}),
        (["--model", "linear"], {"fc.bias"}, {"fc.weight"}),
        # The backbones' learned inputs and scales, by their torchvision names (timm exempts its own).
        (["--model", "linear", "--backbone", "vit_tiny"], {"backbone.class_token", "backbone.encoder.pos_embedding"},
         {"backbone.conv_proj.weight", "backbone.encoder.layers.encoder_layer_0.mlp.0.weight"}),
        (["--model", "linear", "--backbone", "convnext_mini"], {"backbone.1.0.layer_scale", "backbone.5.3.layer_scale"},
         {"backbone.1.0.block.0.weight"}),
        (["--model", "linear", "--backbone", "swin_t"],
         {"backbone.features.1.0.attn.relative_position_bias_table"}, {"backbone.features.1.0.attn.qkv.weight"}),
    ]:
        model = build_model(train.parse_args(argv)[1], verbose=False)
        decay, keep = train.decay_roles(model)
        assert kept <= set(keep) and decayed <= set(decay), argv
        assert set(decay) | set(keep) == {n for n, _ in model.named_parameters()} and not set(decay) & set(keep)
        # The optimizer carries exactly these two groups.
        tcfg = train.parse_args(argv)[0]
        groups = train.build_optimizer(model, tcfg, torch.device("cpu")).param_groups
        assert [g["weight_decay"] for g in groups] == [tcfg.weight_decay, 0.0]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    mlgcn = build_model(model_config("mlgcn"), verbose=False)
    _, keep = train.decay_roles(mlgcn)
    assert "embed" in keep
    # --decay-all (the mlvpt preset, as ML-VPT's official optimiser): one decayed group with every parameter.
    tcfg, mcfg, _ = train.parse_args(["--model", "mlvpt", "--backbone", "vit_tiny"])
    assert tcfg.decay_all and tcfg.grad_clip == 0
    model = build_model(mcfg, verbose=False)
    groups = train.build_optimizer(model, tcfg, torch.device("cpu")).param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups[0]["params"]) == len(trainable) and groups[0]["weight_decay"] == tcfg.weight_decay
    assert not groups[1]["params"]


@pytest.mark.parametrize("name", list(zoo.models()))
def test_fp32_logits_under_bf16_autocast(name):
    # Scores are ranked for AP: bf16 logits (8 bits of mantissa) would tie thousands of scores, for two
    # baselines only. Every model must hand back fp32 logits from a bf16 forward.
    torch.manual_seed(0)
    model = build_model(model_config(name), verbose=False).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randn(4, 3, 32, 32))
    assert logits.dtype == torch.float32, (name, logits.dtype)


def test_asymmetric_loss_by_hand():
    # One positive with p = 0.8, one negative with p = 0.03 (< clip: shifted to 0, no loss), one with p = 0.5.
    x = torch.logit(torch.tensor([[0.8, 0.03, 0.5]]))
    y = torch.tensor([[1.0, 0.0, 0.0]])
    pm = 0.5 - 0.05                                   # shifted probability of the third entry
    ref = -(math.log(0.8) + 0.0 + pm ** 4 * math.log(1 - pm)) / 3
    assert math.isclose(asymmetric_loss(x, y, gamma_neg=4, gamma_pos=0, clip=0.05).item(), ref, rel_tol=1e-5)


def test_hsq_static_gate_is_input_independent():
    torch.manual_seed(0)
    model = build_model(model_config("hsq", gate="static"), verbose=False).eval()
    with torch.no_grad():
        model.moe[0].gate.bias.normal_()                # a non-uniform learned routing
        _, a = model(torch.randn(2, 3, 32, 32))
        _, b = model(torch.randn(2, 3, 32, 32) * 3)
    w = torch.cat([a["routing"]["gate"]["probs"], b["routing"]["gate"]["probs"]])   # (4, L, E)
    assert torch.allclose(w, w[:1].expand_as(w)) and not torch.allclose(w[0, 0], w[0, 1])
    # ... while HSQ's own gate (the label's feature) does depend on the image.
    model = build_model(model_config("hsq"), verbose=False).eval()
    with torch.no_grad():
        model.moe[0].gate.weight.normal_()
        _, a = model(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(a["routing"]["gate"]["probs"][0], a["routing"]["gate"]["probs"][1])


def test_word_vectors_by_name(tmp_path):
    names = np.array(["zebra", "dining table", "apple"])
    vectors = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.savez(tmp_path / "wv.npz", names=names, vectors=vectors)
    got = load_word_vectors(str(tmp_path / "wv.npz"), ["apple", "dining_table", "zebra"])
    assert got.tolist() == [vectors[2].tolist(), vectors[1].tolist(), vectors[0].tolist()]
    with pytest.raises(RuntimeError, match="no vector for \\['horse'\\]"):
        load_word_vectors(str(tmp_path / "wv.npz"), ["apple", "horse"])


def test_mlgcn_checkpoint_carries_graph_and_vectors(tmp_path):
    classes = build_dataset("synthetic", "train", image_size=32, limit=1).classes
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "wv.npz", names=np.array(classes), vectors=rng.normal(size=(20, 300)).astype(np.float32))
    out = tmp_path / "run"
    args = ["--model", "mlgcn", "--word-vectors", str(tmp_path / "wv.npz"), "--image-size", "32",
            "--feature-layer", "layer2", "--gcn-hidden", "32", "--limit", "48", "--batch-size", "16",
            "--epochs", "1", "--out-dir", str(out)]
    metrics = train.main(args)
    os.remove(tmp_path / "wv.npz")                    # evaluation must not need the file any more
    model, ckpt, _ = evaluate.load_checkpoint_model(str(out / "best.pt"), "cpu")
    assert not torch.equal(model.adj, torch.eye(20))  # the graph from the training labels came along
    evaluate.main(["--checkpoint", str(out / "best.pt"), "--device", "cpu", "--json", str(tmp_path / "e.json")])
    assert math.isclose(json.load(open(tmp_path / "e.json"))["mAP"], metrics["mAP"], abs_tol=1e-6)


def test_describe_q2l_coco_matches_the_official_size(capsys):
    model, gflops = train.main(["--model", "q2l", "--dataset", "coco", "--describe"])
    n = sum(p.numel() for p in model.parameters())
    # ResNet-101 42.5M + 1 encoder and 2 decoder layers (no self-attention) at D = 2048, FFN 8192 = 193.9M.
    assert 190e6 < n < 197e6, n
    assert "193.9" in capsys.readouterr().out and gflops > 50
