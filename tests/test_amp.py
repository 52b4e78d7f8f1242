"""
The GPU's mixed-precision path, run on the CPU: torch.autocast("cpu") executes the same autocast line, the same
gates and routers kept in fp32, and fp16's GradScaler, so CI (which has no GPU) tests it.

For every model (drmoe, hsq, q2l, mlgcn, linear, mlvpt, and a backbone MoE), under bf16 and under fp16:
one train.train_step gives a finite loss; every router's weights are fp32 rows that sum to 1; every
trainable parameter moves; under fp16 the GradScaler is in play (it starts at 65,536, halves and skips the
step while the scaled gradients overflow, and the first step it takes is checked).
A short train.py run under fp16 says its precision, and its checkpoint scores in fp32 (evaluate.py --amp off)
within the rounding AMP allows. What only CUDA can test stays in tests/test_gpu.py.

Mutation-checked: computing the head gate under autocast (gating.py without its fp32 block) fails
test_one_amp_step_on_the_cpu for the gated models, in bf16 and fp16.

    python -m pytest -q tests/test_amp.py
"""
import json
import os

import pytest
import torch

import config
import evaluate
import train
from tiny import TINY_MODEL, have
from zoo import ModelConfig, build_model

SMALL = dict(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64, expert_hidden=32, gcn_hidden=64,
             dropout=0.0)
VIT = ["--backbone", "vit_tiny"]
# name -> (the file it needs, train.py flags): the models as train.py resolves them, shrunk to test size below
MODELS = {
    "drmoe": ("model.py", []),
    "hsq": ("baselines.py", ["--model", "hsq"]),
    "q2l": ("baselines.py", ["--model", "q2l"]),
    "mlgcn": ("baselines.py", ["--model", "mlgcn"]),
    "linear": ("baselines.py", ["--model", "linear"]),
    "mlvpt": ("mlvpt.py", ["--model", "mlvpt"] + VIT),
    "drmoe + backbone MoE": ("backbone_moe.py", VIT + ["--backbone-moe", "last2", "--backbone-experts", "4",
                                                       "--backbone-top-k", "2", "--aux-loss-coef", "0.01"]),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build(flags, amp):
    """(TrainConfig, the model) as train.py resolves the flags, at test size (32 px, D = 32)."""
    tcfg, mcfg, _ = config.parse_args(flags + ["--amp", amp])
    vit = "--backbone" in flags
    mcfg = ModelConfig(**{**mcfg.__dict__, **SMALL, "image_size": 32,
                          **({} if vit else {"feature_layer": "layer2"})})
    if mcfg.model == "q2l":                                             # Q2L's width follows the backbone's C
        mcfg.dim, mcfg.ff_dim = 128, 512
    torch.manual_seed(0)
    model = build_model(mcfg, verbose=False)
    if hasattr(model, "prepare"):
        model.prepare((torch.rand(16, 20) < 0.3).float(), [f"c{i}" for i in range(20)], verbose=False)
    return tcfg, model


@pytest.mark.parametrize("amp", list(DTYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_one_amp_step_on_the_cpu(name, amp):
    need, flags = MODELS[name]
    if not have(need):
        pytest.skip(f"{need} is not in this copy")
    dtype = DTYPES[amp]
    tcfg, model = build(flags, amp)
    device = torch.device("cpu")
    assert config.amp_dtype_for(device, tcfg.amp) is dtype               # --amp bf16 / fp16 holds on the CPU
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    run = train.Run(model=model, step_model=model, ema=None, optimizer=train.build_optimizer(model, tcfg, device),
                    scheduler=None, scaler=scaler, hooks=[], device=device, amp_dtype=dtype,
                    fmt=torch.contiguous_format, rank=0, world=1)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    x, y = torch.randn(4, 3, 32, 32), (torch.rand(4, 20) < 0.3).float()
    # The gate's own arithmetic: at the forward, the same gate is recomputed from the inputs it saw, outside
    # autocast in fp32 (before the optimiser moves its weights); computed in fp32 inside autocast, they agree.
    seen = {}
    gates = [m for m in model.modules() if type(m).__name__ == "Gate"]
    for g in gates:   # gates start at zero (uniform routing, exact in any precision): give them something to compute
        torch.nn.init.normal_(g.bias)
        if g.weight is not None:
            torch.nn.init.normal_(g.weight, std=0.5)

    def recompute(gate, inputs, out):
        if "ref" not in seen:                                 # once, and not for the recomputation's own call
            seen["ref"] = None
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                seen["ref"] = gate(*(t.float() for t in inputs))[0]
            seen["weights"] = out[0].detach()
    if gates:
        gates[-1].register_forward_hook(recompute)
    # fp16: while the scaled gradients overflow, the GradScaler halves its scale and skips the step (that is
    # its job); the first step taken is the one checked. bf16 takes the first.
    for step in range(1, 9):
        scale = scaler.get_scale() if scaler.is_enabled() else None
        loss, losses, info = train.train_step(run, x, y, tcfg, step)
        if scale is None or scaler.get_scale() >= scale:
            break
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in losses.values()), (name, loss, losses)
    # Every router computes in fp32 under autocast: its rows are fp32 distributions.
    for router, r in info["routing"].items():
        p = r["probs"]
        assert p.dtype == torch.float32, (name, router, p.dtype)
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5), (name, router)
    assert (len(info["routing"]) > 0) == (name in ("drmoe", "hsq", "mlvpt", "drmoe + backbone MoE"))
    if gates:   # computed in fp32 inside autocast: the same weights as the gate run outside it, from its inputs
        assert (seen["weights"] - seen["ref"]).abs().max() < 1e-6, (name, (seen["weights"] - seen["ref"]).abs().max())
    if dtype == torch.float16:   # the scaler multiplied the loss and unscaled the gradients before the step
        assert scaler.is_enabled() and 1.0 < scaler.get_scale() <= 65536.0 and scaler.get_scale() == scale
    unmoved = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), trainable[n])]
    assert not unmoved, (name, unmoved[:5])


def test_a_fp16_run_says_so_and_its_checkpoint_scores_in_fp32(tmp_path, capsys):
    out = str(tmp_path / "run")
    metrics = train.main(TINY_MODEL + ["--amp", "fp16", "--epochs", "1", "--limit", "64", "--batch-size", "32",
                                       "--out-dir", out])
    said = capsys.readouterr().out
    assert "precision: float16 (--amp fp16 on the cpu" in said and metrics["precision"] == "float16"
    assert json.load(open(os.path.join(out, "metrics.json")))["precision"] == "float16"
    fp32 = evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--amp", "off", "--json", str(tmp_path / "e.json")])
    same = evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--json", str(tmp_path / "f.json")])
    assert same["mAP"] == metrics["mAP"]                        # the run's own precision reprints its number
    assert abs(fp32["mAP"] - metrics["mAP"]) < 1.0              # fp32 ranks the same images within AMP's rounding
