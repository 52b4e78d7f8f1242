"""
The CUDA paths: mixed precision (bf16, and fp16 with a GradScaler), torch.compile, channels_last.
Skipped on machines without a CUDA GPU (CI has none), never failed there.

- one train.train_step under bf16 and under fp16 autocast: finite loss, float32 gate weights whose rows sum
  to 1, every parameter updated, and the fp16 GradScaler actually scaling;
- train.py on CUDA with --compile: the checkpoint holds the raw module's keys (no "_orig_mod." prefix from
  the compiled wrapper), and evaluate.py rebuilds the model from it on the CPU with the same test mAP (to
  within the rounding that bf16 inference on the GPU allows).

Run: python -m pytest -q tests/test_gpu.py      (on a machine with a CUDA GPU)
"""
import copy
import json
import os

import pytest
import torch

import evaluate
import train
from zoo import ModelConfig, build_model, set_memory_format
from tiny import TINY_MODEL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = TINY_MODEL + ["--limit", "64", "--batch-size", "16", "--ema-decay", "0.9"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_train_step(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64,
                                    expert_hidden=32), verbose=False).to(device)
    set_memory_format(model)
    tcfg = train.TrainConfig(lr=1e-3, ema_decay=0.9)
    opt = train.build_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = copy.deepcopy(model).requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(8, 20, device=device) < 0.2).float()
    run = train.Run(model=model, step_model=model, ema=ema, optimizer=opt, scaler=scaler, hooks=[], device=device,
                    amp_dtype=dtype, fmt=torch.channels_last, rank=0, world=1)
    loss, losses, info = train.train_step(run, x, y, tcfg, 1)
    assert torch.isfinite(loss)
    w = info["routing"]["gate"]["probs"]
    assert w.dtype == torch.float32 and torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(moved) == len(moved)
    if dtype == torch.float16:
        assert scaler.get_scale() > 1.0   # the GradScaler is in play only for fp16


def test_compiled_cuda_run_saves_raw_keys_and_evaluates_on_cpu(tmp_path):
    out = str(tmp_path / "run")
    metrics = train.main(TINY + ["--epochs", "1", "--device", "cuda", "--compile", "--out-dir", out])
    ckpt = torch.load(os.path.join(out, "best.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    cpu = evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--device", "cpu"])
    assert json.load(open(os.path.join(out, "metrics.json")))["mAP"] == metrics["mAP"]
    assert abs(cpu["mAP"] - metrics["mAP"]) < 2.0   # bf16 on the GPU, fp32 on the CPU: close, not equal
