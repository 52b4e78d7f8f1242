"""
Data-parallel training under torchrun, on the CPU with the gloo backend (2 processes, loopback only).

- a few DDP steps run on both ranks, each on its own images, and leave the two copies of the model
  identical (DDP broadcast rank 0's weights, then averaged every gradient), and different from the start;
- evaluation over 2 ranks, with a DistributedSampler that pads 13 images to 14, gathers back exactly the
  single-process scores, targets and gate weights, in order and each image once, hence the same metrics;
- `torchrun --nproc_per_node 2 train.py ...` trains end to end, and the test mAP it writes equals the one
  `evaluate.py` computes in one process from the same checkpoint.

Run: python -m pytest -q tests/test_distributed.py
(This file is also the worker script that the first two tests start under torchrun.)
"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import distributed  # noqa: E402
from data import build_dataset  # noqa: E402
from evaluate import predict  # noqa: E402
from metrics import multilabel_metrics  # noqa: E402
from zoo import ModelConfig, build_model  # noqa: E402
from train import masked_bce  # noqa: E402
from tiny import TINY_MODEL

CFG = dict(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64, expert_hidden=32, dropout=0.0)


def torchrun(*args, timeout=300):
    """Start 2 processes under torchrun on this machine; returns the finished process (output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def worker(out: str):
    """Runs on each rank: 3 DDP steps on this rank's images, then a distributed evaluation."""
    rank, world, device = distributed.setup("cpu")
    torch.manual_seed(rank)                         # different initial weights on purpose: DDP must fix that
    model = build_model(ModelConfig(**CFG), verbose=False)
    before_wrap = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    ds = build_dataset("synthetic", "train", image_size=32, augment=False, limit=24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        rows = list(range(step * 8 + rank * 4, step * 8 + rank * 4 + 4))   # 4 images of this rank's own
        x, y = torch.stack([ds[i][0] for i in rows]), ds.targets[rows]
        loss = masked_bce(ddp(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = [torch.empty_like(params) for _ in range(world)]
    torch.distributed.all_gather(every, params)

    test = build_dataset("synthetic", "test", image_size=32, limit=13)   # 13: the sampler pads to 14
    loader = torch.utils.data.DataLoader(test, batch_size=4,
                                         sampler=torch.utils.data.DistributedSampler(test, shuffle=False))
    distributed.sync_buffers(model)
    pred = predict(model, loader, device)
    scores, targets, gates = pred["scores"], pred["targets"], pred["routing"]["gate"]
    torch.save({"rank": rank, "losses": losses, "before_wrap": before_wrap, "start": start, "every": every,
                "state": model.state_dict(), "scores": scores, "targets": targets, "gates": gates},
               os.path.join(out, f"rank{rank}.pt"))
    distributed.cleanup()


def test_ddp_steps_sync_ranks_and_evaluation_gathers_exactly(tmp_path):
    torchrun(os.path.join("tests", "test_distributed.py"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # Both ranks stepped, on different images.
    assert len(r0["losses"]) == len(r1["losses"]) == 3 and r0["losses"] != r1["losses"]
    # DDP replaced rank 1's own initial weights by rank 0's, then kept the copies equal through 3 updates.
    assert not torch.equal(r1["before_wrap"], r0["before_wrap"])
    assert torch.equal(r1["start"], r0["before_wrap"])
    assert torch.equal(r0["every"][0], r0["every"][1])
    assert not torch.allclose(r0["every"][0], r0["start"])
    # Evaluation over 2 ranks = evaluation in one process, image for image.
    model = build_model(ModelConfig(**CFG), verbose=False)
    model.load_state_dict(r0["state"])
    test = build_dataset("synthetic", "test", image_size=32, limit=13)
    pred = predict(model, torch.utils.data.DataLoader(test, batch_size=4), torch.device("cpu"))
    scores, targets, gates = pred["scores"], pred["targets"], pred["routing"]["gate"]
    for r in (r0, r1):
        assert r["scores"].shape == scores.shape == (13, 20)
        assert (r["targets"] == targets).all()
        assert torch.allclose(torch.from_numpy(r["scores"]), torch.from_numpy(scores), atol=1e-6, rtol=0)
        assert torch.allclose(torch.from_numpy(r["gates"]), torch.from_numpy(gates), atol=1e-6, rtol=0)
        assert multilabel_metrics(r["scores"], r["targets"]) == multilabel_metrics(scores, targets)


def test_torchrun_train_matches_single_process_evaluation(tmp_path):
    import evaluate
    out = str(tmp_path / "run")
    tiny = TINY_MODEL + ["--limit", "40", "--batch-size", "8", "--ema-decay", "0.9", "--epochs", "2"]
    done = torchrun("train.py", *tiny, "--out-dir", out, "--device", "cpu")   # gloo, even where a GPU exists
    assert "Traceback" not in done.stderr and "cpu x 2 processes" in done.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["world_size"] for r in log] == [2, 2] and log[-1]["step"] == 2 * 40 // 8
    saved = json.load(open(os.path.join(out, "metrics.json")))
    single = evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--device", "cpu"])
    assert saved["world_size"] == 2
    assert saved["mAP"] == single["mAP"] and saved["OF1"] == single["OF1"]


if __name__ == "__main__":
    worker(sys.argv[1])
