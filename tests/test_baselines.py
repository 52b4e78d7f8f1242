"""
The baselines (baselines.py) against hand computations and their papers' definitions (CPU, seconds).

- every --model gives (B, L) logits and lowers the loss in a few steps on a fixed batch;
- label_cooccurrence and mlgcn_adjacency on a small hand-made label matrix equal numbers worked out by
  hand from ML-GCN's gen_A / gen_adj (difficult entries, -1, are not counted);
- the asymmetric loss equals masked BCE when gamma+- = 0 and clip = 0, and drops easy negatives;
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
from baselines import MODELS, asymmetric_loss, label_cooccurrence, load_word_vectors, mlgcn_adjacency
from data import build_dataset
from model import ModelConfig, build_model

SMALL = dict(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64, expert_hidden=32,
             dropout=0.0, gcn_hidden=64)


def model_config(name: str, **kw) -> ModelConfig:
    """The model as train.py would configure it on the synthetic benchmark, shrunk to test size."""
    tcfg, mcfg, _ = train.parse_args(["--model", name])
    return ModelConfig(**{**mcfg.__dict__, **SMALL, **kw})


@pytest.mark.parametrize("name", MODELS)
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
    asl = asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0)
    assert torch.allclose(asl, train.masked_bce(logits, targets), atol=1e-6)


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
    w = torch.cat([a["gate_weights"], b["gate_weights"]])   # (4, L, E)
    assert torch.allclose(w, w[:1].expand_as(w)) and not torch.allclose(w[0, 0], w[0, 1])
    # ... while HSQ's own gate (the label's feature) does depend on the image.
    model = build_model(model_config("hsq"), verbose=False).eval()
    with torch.no_grad():
        model.moe[0].gate.weight.normal_()
        _, a = model(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(a["gate_weights"][0], a["gate_weights"][1])


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
