"""
Backbones (backbones.py): every backbone family returns (B, C, h, w) with the C it announces, at two image
sizes; a ViT loaded at 448 px gets exactly torchvision's interpolate_embeddings position embeddings, and the
on-the-fly interpolation gives the same output as a ViT built for the new size. (MoE inside the backbone:
tests/test_backbone_moe.py.)

    python -m pytest -q tests/test_backbones.py
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import interpolate_embeddings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbones import build_backbone  # noqa: E402

torch.set_num_threads(2)

# name -> (extra build_backbone arguments, total stride of its map): h = image side // stride.
FAMILIES = {"resnet18": (dict(feature_layer="layer3"), 16), "mobilenet_v3_small": ({}, 32),
            "efficientnet_b0": ({}, 32), "convnext_mini": ({}, 16), "swin_t": ({}, 32),
            "vit_tiny": ({}, 8), "vit_b_32": ({}, 32)}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_gives_an_nchw_map(name):
    kw, stride = FAMILIES[name]
    body, C = build_backbone(name, image_size=64, **kw)
    body.eval()
    for side in (64, 96):
        with torch.no_grad():
            y = body(torch.randn(2, 3, side, side))
        # Swin pads odd maps up (ceil); every other family floors.
        h = math.ceil(side / stride) if name == "swin_t" else side // stride
        assert y.shape == (2, C, h, h), (name, side, y.shape)


def test_vit_448_loads_torchvisions_interpolated_embeddings(tmp_path):
    """--weights FILE made at 224 px into a ViT-B/16 built for 448: torchvision's own function's result."""
    src, _ = build_backbone("vit_b_16", image_size=224)
    state = {k: v for k, v in src.state_dict().items()}
    torch.nn.init.normal_(state["encoder.pos_embedding"])   # not all-equal, so interpolation shows
    torch.save(state, tmp_path / "vit.pth")
    body, C = build_backbone("vit_b_16", weights=str(tmp_path / "vit.pth"), image_size=448)
    expected = interpolate_embeddings(448, 16, dict(state))["encoder.pos_embedding"]
    assert body.encoder.pos_embedding.shape == (1, 28 * 28 + 1, 768) and C == 768
    assert torch.equal(body.encoder.pos_embedding, expected)


def test_vit_runs_at_a_size_it_was_not_built_for(tmp_path):
    """Built at 64 px and fed 96 px: the same output as a ViT built for 96 px from the same weights."""
    small, _ = build_backbone("vit_tiny", image_size=64)
    torch.nn.init.normal_(small.encoder.pos_embedding)
    torch.save(small.state_dict(), tmp_path / "w.pth")
    big, _ = build_backbone("vit_tiny", weights=str(tmp_path / "w.pth"), image_size=96)
    x = torch.randn(2, 3, 96, 96)
    small.eval(), big.eval()
    with torch.no_grad():
        cls_a, map_a = small.forward_tokens(x)
        cls_b, map_b = big.forward_tokens(x)
    assert map_a.shape == (2, 192, 12, 12) and cls_a.shape == (2, 192)
    torch.testing.assert_close(map_a, map_b, atol=1e-5, rtol=1e-5)
