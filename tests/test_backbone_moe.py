"""
MoE inside the backbone (backbone_moe.py).

Covers: the sparse MoE equals a naive per-token loop over experts (top-1, top-2, with capacity overflow chosen
by Batch Prioritized Routing); an upcycled MoE equals the dense backbone (renormalised) or (k/N) of its MLP
(not), and its near-zero router breaks ties by token (capacity does not overflow everything) -- for ViT,
ConvNeXt and Swin; ConvNeXt + MoE passes train.py's parse; gradients reach router and experts; the balance
loss on hand cases; placements pick the documented blocks; a checkpoint with a MoE backbone round-trips
through train.py and evaluate.py's loader; the layer's routing record and balance loss reach the loop.

    python -m pytest -q tests/test_backbone_moe.py
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbone_moe import MoEConfig, SparseMoE, moe_backbone, moe_layers  # noqa: E402
from backbones import build_backbone  # noqa: E402
from gating import switch_balance  # noqa: E402
from zoo import activated_parameters  # noqa: E402

torch.set_num_threads(2)


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer written token by token: softmax router, top-k, Batch Prioritized Routing with capacity."""
    T, N, k = x.shape[0], moe.num_experts, moe.top_k
    probs = [F.softmax(x[t] @ moe.router.weight.T, dim=-1) for t in range(T)]
    choices = [p.topk(k) for p in probs]
    cap = math.ceil(moe.capacity * T * k / N) if moe.capacity > 0 else T * k
    # BPR: tokens ranked by their largest routing weight; all first choices before any second choice.
    ranked = sorted(range(T), key=lambda t: -choices[t].values[0].item())
    taken, kept = [0] * N, []
    for r in range(k):
        for t in ranked:
            e = int(choices[t].indices[r])
            if taken[e] < cap:
                taken[e] += 1
                kept.append((t, r, e))
    out = torch.zeros_like(x)
    for t, r, e in kept:
        w = choices[t].values[r] / (choices[t].values.sum() if moe.renorm else 1.0)
        h = F.gelu(x[t] @ moe.w1[e] + moe.b1[e])
        out[t] += w * (h @ moe.w2[e] + moe.b2[e])
    return out


@pytest.mark.parametrize("k,capacity,renorm", [(1, 0.0, False), (2, 0.0, False), (1, 0.5, False),
                                               (2, 0.75, False), (2, 1.0, True)])
def test_sparse_dispatch_equals_a_token_loop(k, capacity, renorm):
    torch.manual_seed(0)
    moe = SparseMoE(dim=12, hidden=20, experts=4, top_k=k, capacity=capacity, renorm=renorm)
    torch.nn.init.normal_(moe.router.weight, std=1.0)   # a router with preferences, so capacity binds
    x = torch.randn(3, 10, 12)                          # (B, n, D): 30 tokens
    y = moe(x)
    torch.testing.assert_close(y.reshape(30, 12), naive_moe(moe, x.reshape(30, 12)), atol=1e-5, rtol=1e-5)
    if capacity and capacity < 1:
        assert moe.route_record["dropped"] > 0   # the case really overflowed


def test_experts_see_only_bucketed_shapes(monkeypatch):
    """backbone_moe.py, "Memory": however the tokens split, each expert's matmuls run on a multiple of ROW_BUCKET
    rows (a handful of shapes, so memory stays flat over a run), and the output is still the token loop's."""
    import backbone_moe
    torch.manual_seed(0)
    moe = SparseMoE(dim=12, hidden=20, experts=4, top_k=2)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    rows, expert = [], moe.expert
    monkeypatch.setattr(moe, "expert", lambda i, x: rows.append(len(x)) or expert(i, x))
    for n in (7, 30, 301):                               # batches of 7, 30 and 301 tokens: every count differs
        x = torch.randn(1, n, 12)
        torch.testing.assert_close(moe(x)[0], naive_moe(moe, x[0]), atol=1e-5, rtol=1e-5)
    assert rows and all(r % backbone_moe.ROW_BUCKET == 0 for r in rows) and set(rows) <= {0, 256, 512}, rows


def test_router_noise_is_v_moes_in_training_only():
    """--backbone-router-noise s adds N(0, (s / N)^2) to every router logit in training (vmoe/nn/routing.py),
    and nothing in evaluation; the dispatch then follows the noisy logits."""
    torch.manual_seed(0)
    moe = SparseMoE(dim=8, hidden=16, experts=4, top_k=2, noise=1.0)
    x = torch.randn(20000, 8)
    clean, noisy = moe.router_logits(x)
    assert abs((noisy - clean).std().item() - 1.0 / 4) < 0.005 and abs((noisy - clean).mean().item()) < 0.005
    moe.eval()
    clean, same = moe.router_logits(x)
    assert torch.equal(clean, same)
    quiet = SparseMoE(dim=8, hidden=16, experts=4, top_k=2)        # the default: no noise in training either
    assert torch.equal(*quiet.router_logits(x))


def test_vmoe_balance_by_hand():
    """V-MoE's importance and load losses against an independent computation with scipy's normal CDF."""
    from scipy.stats import norm
    from backbone_moe import vmoe_balance
    torch.manual_seed(0)
    clean = torch.randn(50, 4, dtype=torch.float64)
    noisy = clean + 0.25 * torch.randn_like(clean)
    c, n = clean.numpy(), noisy.numpy()
    imp = np.exp(c) / np.exp(c).sum(1, keepdims=True)
    imp = imp.sum(0)
    want = (imp.std() / imp.mean()) ** 2                               # the importance: CV^2 of the summed gates
    thr = np.sort(n, axis=1)[:, -2][:, None]                           # the 2nd largest noisy logit per token
    p = (1 - norm.cdf((thr - c) / 0.25)).mean(0)
    want_load = (p.std() / p.mean()) ** 2                              # the load: CV^2 of P(in the top-2)
    torch.testing.assert_close(vmoe_balance(clean, noisy, 2, 0.25), torch.tensor(want + want_load, dtype=torch.float64))
    torch.testing.assert_close(vmoe_balance(clean, clean, 2, 0.0), torch.tensor(want, dtype=torch.float64))
    # Balanced routing costs nothing: every expert with the same summed gate and the same chance.
    flat = torch.zeros(50, 4, dtype=torch.float64)
    assert vmoe_balance(flat, flat, 2, 0.25).item() < 1e-12


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    moe = SparseMoE(dim=8, hidden=16, experts=4, top_k=2)
    (moe(torch.randn(2, 5, 8)).pow(2).sum() + moe.aux_loss).backward()
    for p in (moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_balance_loss_hand_cases():
    N = 4
    assert switch_balance(torch.full((N,), 1 / N), torch.full((N,), 1 / N)).item() == pytest.approx(1.0)
    one = torch.tensor([1.0, 0, 0, 0])
    assert switch_balance(one, one).item() == pytest.approx(N)
    # Through the layer: a router that sends every token to expert 2 with probability ~1 -> loss ~ N.
    moe = SparseMoE(dim=3, hidden=4, experts=N, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 100.0
    moe(torch.ones(5, 3))
    assert moe.aux_loss.item() == pytest.approx(N, rel=1e-4)
    assert moe.route_record["load"].tolist() == [0, 0, 1, 0]
    assert moe.route_record["extra"]["experts_per_image"].item() == 1


@pytest.mark.parametrize("name", ["vit_tiny", "convnext_mini", "swin_t"])
def test_upcycled_moe_equals_the_dense_backbone(name, tmp_path):
    dense, _ = build_backbone(name, image_size=64)
    for m in dense.modules():   # ConvNeXt scales its MLP branch by 1e-6 at init: make the branch count
        if hasattr(m, "layer_scale"):
            m.layer_scale.data.fill_(1.0)
    torch.save(dense.state_dict(), tmp_path / "w.pth")
    x = torch.randn(2, 3, 64, 64)
    dense.eval()
    with torch.no_grad():
        ref = dense(x)
    for renorm in (True, False):
        moe, _ = moe_backbone(name, MoEConfig("last2", experts=4, top_k=2, renorm=renorm),
                              weights=str(tmp_path / "w.pth"), image_size=64)
        moe.eval()
        layers = moe_layers(moe)
        assert len(layers) == 2 and all(0 < m.router.weight.abs().max() < 0.01 for m in layers)
        with torch.no_grad():
            y = moe(x)
        if renorm:   # the kept weights 1/N each, renormalised to 1/k: k copies of the MLP averaged
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(y, ref, atol=1e-3)   # (k/N) of the MLP: a different function


def test_unrenormalised_upcycled_layer_is_k_over_n_of_the_mlp():
    """The paper's G without renormalisation: a zero router weighs each of the k copies 1/N."""
    fc1, fc2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 6)
    moe = SparseMoE(dim=6, hidden=10, experts=8, top_k=2)
    moe.upcycle(fc1, fc2)
    with torch.no_grad():
        moe.router.weight.zero_()   # exactly zero: G = 1/N for every expert
    x = torch.randn(7, 6)
    torch.testing.assert_close(moe(x), (2 / 8) * fc2(F.gelu(fc1(x))), atol=1e-6, rtol=1e-5)


def test_upcycled_router_breaks_ties_by_token():
    """A router at exactly zero would send every token to expert 0 (topk's tie order) and, with a capacity,
    drop all but C tokens; the upcycled router's small noise spreads the first choices."""
    fc1, fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
    torch.manual_seed(0)
    moe = SparseMoE(dim=16, hidden=32, experts=4, top_k=1, capacity=1.0)
    moe.upcycle(fc1, fc2)
    moe(torch.randn(64, 16))
    assert (moe.route_record["load"] > 0).sum() >= 3 and moe.route_record["dropped"] < 0.5


def test_convnext_with_backbone_moe_passes_the_parse():
    """backbone_channels runs build_backbone on the meta device: C must be read before the MoE is added."""
    from config import parse_args
    mcfg = parse_args(["--backbone", "convnext_mini", "--backbone-moe", "last2", "--model", "linear"])[1]
    assert mcfg.backbone_moe == "last2"


def test_placements_pick_the_documented_blocks():
    """vit_tiny (6 blocks, pairs (0,1) (2,3) (4,5)), convnext_mini (stages of 2, 2, 4 blocks) and swin_t
    (stages of 2, 2, 6, 2 blocks)."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.swin_transformer import SwinTransformerBlock
    from torchvision.models.vision_transformer import EncoderBlock
    expected = {"vit_tiny": {"last2": [3, 5], "last3": [1, 3, 5], "every2": [1, 3, 5], "stage": [4, 5]},
                "convnext_mini": {"last2": [3, 7], "last3": [1, 3, 7], "every2": [1, 3, 5, 7], "stage": [4, 5, 6, 7]},
                "swin_t": {"last2": [9, 11], "last3": [3, 9, 11], "every2": [1, 3, 5, 7, 9, 11], "stage": [10, 11]}}
    kinds = {"vit_tiny": EncoderBlock, "convnext_mini": CNBlock, "swin_t": SwinTransformerBlock}
    for name, cases in expected.items():
        kind = kinds[name]
        for placement, blocks in cases.items():
            body, _ = moe_backbone(name, MoEConfig(placement, experts=2))
            all_blocks = [m for m in body.modules() if isinstance(m, kind)]
            with_moe = [i for i, b in enumerate(all_blocks) if moe_layers(b)]
            assert with_moe == blocks, (name, placement, with_moe)


def test_backbone_without_mlp_blocks_refuses_moe():
    """A ResNet has no MLP for the experts to replace, Swin V2's is post-norm: one clear error each, not a
    silently dense (or silently different) backbone."""
    with pytest.raises(ValueError, match="vit_\\*, convnext_\\* or swin_\\*"):
        moe_backbone("resnet18", MoEConfig("last2", experts=2))
    with pytest.raises(ValueError, match="Swin V2 blocks normalise after their MLP"):   # post-norm: not modelled
        moe_backbone("swin_v2_t", MoEConfig("last2", experts=2))


def test_activated_parameters():
    body, _ = moe_backbone("vit_tiny", MoEConfig("last2", experts=8, top_k=1))
    total = sum(p.numel() for p in body.parameters())
    active = activated_parameters(body)
    per_expert = 192 * 768 + 768 + 768 * 192 + 192
    assert total - active == 2 * 7 * per_expert   # two layers, 7 of 8 experts idle per token


def test_moe_backbone_checkpoint_round_trips(tmp_path):
    import train
    from zoo import load_checkpoint_model
    out = tmp_path / "run"
    train.main(["--backbone", "vit_tiny", "--backbone-moe", "last2", "--backbone-experts", "4", "--model", "linear",
                "--epochs", "1", "--limit", "32", "--batch-size", "16", "--num-workers", "0", "--out-dir", str(out)])
    model, ckpt = load_checkpoint_model(str(out / "best.pt"), "cpu")[:2]
    mcfg = ckpt["model_config"]
    assert mcfg["backbone_moe"] == "last2" and len(moe_layers(model)) == 2
    import json
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    # Each layer's health, as every router's (lib/routing.py): its load over the N = 4 experts, entropy, dead.
    layers = {k: r for k, r in log[-1]["routers"].items() if r["kind"] == "backbone"}
    assert sorted(layers) == ["backbone moe 0", "backbone moe 1"]
    for r in layers.values():
        assert len(r["load"]) == 4 and abs(sum(r["load"]) - 1) < 1e-4 and r["k"] == 1
        assert 0 <= r["entropy"] <= r["max_entropy"] and isinstance(r["dead"], list) and r["dropped"] == 0.0
    assert os.path.isfile(out / "routing.png")


def test_vit_tiny_with_backbone_moe_trains_on_photos_in_coco_layout(tmp_path):
    """PNG files under train2014/ and val2014/ with COCO instances json, as a user's download would be."""
    import train
    from test_owndata import cocojson_tree
    cocojson_tree(str(tmp_path / "own"))
    coco = tmp_path / "coco"
    os.makedirs(coco / "annotations")
    for split in ("train", "val"):
        os.symlink(tmp_path / "own" / "images", coco / f"{split}2014")
        os.symlink(tmp_path / "own" / f"{split}.json", coco / "annotations" / f"instances_{split}2014.json")
    metrics = train.main(["--dataset", "coco", "--data-root", str(coco), "--backbone", "vit_tiny", "--weights", "none",
                          "--image-size", "64", "--backbone-moe", "last2", "--model", "linear", "--epochs", "1", "--batch-size", "8",
                          "--num-workers", "0", "--out-dir", str(tmp_path / "run")])
    assert 0 <= metrics["mAP"] <= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparse_moe_under_bf16_autocast_on_gpu():
    torch.manual_seed(0)
    moe = SparseMoE(dim=64, hidden=128, experts=8, top_k=2).cuda()
    x = torch.randn(4, 49, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = moe(x)
    ref = naive_moe(moe, x.reshape(-1, 64)).reshape_as(x)
    assert moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


def test_moe_gflops_count_the_activated_rows_only_and_are_stable():
    """One GFLOPs figure: the padding to ROW_BUCKET rows is memory's, not compute's. k = 1 of 8 experts runs one
    MLP per token (plus the router), so the MoE backbone costs the dense one plus its routers, call after call."""
    from zoo import ModelConfig, build_model, flops_per_image
    cfg = dict(num_labels=20, backbone="vit_tiny", image_size=64, model="linear")
    dense = flops_per_image(build_model(ModelConfig(**cfg), verbose=False), 64)
    moe = build_model(ModelConfig(**cfg, backbone_moe="last2", backbone_experts=8, backbone_top_k=1), verbose=False)
    counts = {flops_per_image(moe, 64) for _ in range(3)}
    tokens, D, N = 1 + 64, 192, 8                                    # the class token and 8 x 8 patches
    assert len(counts) == 1 and counts.pop() == pytest.approx(dense + 2 * tokens * 2 * D * N, rel=1e-6)
    assert all(m.pad_rows for m in moe_layers(moe))                   # training pads again afterwards
