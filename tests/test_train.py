"""
The training loop and the checkpoint contract, on tiny models and a few dozen synthetic images (CPU).

- a few optimisation steps lower the loss on a fixed batch, for every gate kind with S = 2, T = 2;
- the masked loss ignores entries marked -1;
- a run interrupted after its first epoch and resumed with --resume ends bit-identical to a run that
  was never interrupted (same weights, same metrics);
- `evaluate.py --checkpoint` rebuilds the model from the checkpoint alone and reproduces the test mAP
  that training wrote to metrics.json; `--image` predicts labels for an image file;
- --budget study: its settings (config.BUDGETS: more epochs, 10,000 test images) resolve from the flag,
  are saved in the checkpoint, and evaluate.py re-scores the same test images to the same mAP (and the
  same scores as test_scores.npz); --init-seed changes the initial weights only, not the data order;
- asking for pretrained weights offline gives a message that says where to put the file;
- checkpoints load with weights_only=True, an older one (numpy RNG state inside) too, other globals never.

Run: python -m pytest -q tests/test_train.py
"""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from config import BUDGETS, parse_args
from data import build_dataset
from gating import GATE_KINDS
from backbones import WeightsUnavailable, build_backbone
from zoo import ModelConfig, build_model
from tiny import TINY_MODEL

# A model small enough to train in seconds: 32-px images, ResNet-18 cut after layer2 (4x4 tokens), D = 32.
TINY = TINY_MODEL + ["--limit", "48", "--batch-size", "16", "--ema-decay", "0.9"]


@pytest.mark.parametrize("gate", GATE_KINDS)
def test_few_steps_lower_the_loss(gate):
    torch.manual_seed(0)
    cfg = ModelConfig(num_labels=20, feature_layer="layer2", dim=32, heads=2, ff_dim=64, expert_hidden=32,
                      gate=gate, shared_experts=2, task_experts=2, dropout=0.0, aux_loss_coef=0.01)
    model = build_model(cfg, verbose=False)
    ds = build_dataset("synthetic", "train", image_size=32, augment=False, limit=16)
    x, y = torch.stack([ds[i][0] for i in range(16)]), ds.targets[:16]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        logits, info = model(x)
        loss = train.masked_bce(logits, y) + sum(info["losses"].values())   # the balance loss, already x 0.01
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_masked_bce_ignores_minus_one():
    logits = torch.randn(4, 3)
    targets = torch.tensor([[1., 0., -1.], [0., 1., 1.], [-1., -1., 0.], [1., 1., 0.]])
    keep = targets >= 0
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], targets[keep])
    assert torch.allclose(train.masked_bce(logits, targets), ref)


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    return out, train.main(TINY + ["--out-dir", out, *extra])


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, workers):
    # With a loader worker too: its augmentation RNG must also continue as in the uninterrupted run.
    # 3 epochs: the resumed run must also carry the random streams through its own validation passes.
    # --keep-last: the finished runs' last.pt are compared below (a finished run drops it by default).
    out_a, metrics_a = run(tmp_path, "straight", "--epochs", "3", "--keep-last", "--num-workers", str(workers))

    # Simulate a kill during epoch 2's checkpointing: its log line is written, its last.pt is not.
    real_save = train.save_checkpoint
    def die_before_second_save(path, state):
        if path.endswith("last.pt") and state["epoch"] == 1:
            raise KeyboardInterrupt
        real_save(path, state)
    monkeypatch.setattr(train, "save_checkpoint", die_before_second_save)
    with pytest.raises(train.Interrupted, match="last.pt holds epoch 1 of 3"):   # epoch 2 was logged, not saved
        run(tmp_path, "killed", "--epochs", "3", "--keep-last", "--num-workers", str(workers))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    out_b = str(tmp_path / "killed")
    assert torch.load(os.path.join(out_b, "last.pt"), weights_only=True)["epoch"] == 0
    assert len(open(os.path.join(out_b, "log.jsonl")).readlines()) == 2   # epoch 2 logged, not checkpointed
    metrics_b = train.main(["--out-dir", out_b, "--resume"])   # the worker count comes from the checkpoint

    a = torch.load(os.path.join(out_a, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out_b, "last.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert metrics_a["mAP"] == metrics_b["mAP"]
    log_b = [json.loads(r) for r in open(os.path.join(out_b, "log.jsonl"))]
    assert [r["epoch"] for r in log_b] == [1, 2, 3]                       # one row per epoch: no repeat, none lost
    # The same command over a finished run, and --resume of it, change nothing and give its metrics back.
    files = {f: open(os.path.join(out_a, f), "rb").read() for f in ("best.pt", "last.pt", "metrics.json", "log.jsonl")}
    assert run(tmp_path, "straight", "--epochs", "3", "--keep-last", "--num-workers", str(workers))[1] == metrics_a
    assert train.main(["--out-dir", out_a, "--resume"]) == metrics_a
    assert all(open(os.path.join(out_a, f), "rb").read() == b for f, b in files.items())


def test_checkpoint_round_trip_and_evaluate_cli(tmp_path, capsys):
    out, metrics = run(tmp_path, "run", "--epochs", "1", "--shared-experts", "2", "--task-experts", "2")
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["mAP"] == metrics["mAP"]
    result = evaluate.main(["--checkpoint", os.path.join(out, "best.pt")])
    assert result["mAP"] == saved["mAP"] and result["OF1"] == saved["OF1"]      # same numbers, exactly
    stats = result["gate"]
    assert len(stats["per_label"]) == 20
    assert 0.0 <= stats["overall"]["shared_mass"] <= 1.0
    assert abs(sum(stats["overall"]["mean_weight_per_expert"]) - 1.0) < 1e-5     # 4 experts' mean weights
    assert "mass on shared experts" in capsys.readouterr().out
    # Single-image prediction through the same checkpoint.
    ds = build_dataset("synthetic", "test", image_size=32, limit=1)
    path = tmp_path / "img.png"
    Image.fromarray(ds.images[0].permute(1, 2, 0).numpy()).save(path)
    evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--image", str(path)])
    assert str(path) in capsys.readouterr().out


def test_study_budget_is_saved_and_reproduced(tmp_path):
    tcfg, _, _ = parse_args(["--budget", "study"])
    study = BUDGETS["study"]
    assert (tcfg.epochs, tcfg.test_images, tcfg.val_images) == (study["epochs"], study["test_images"], None)
    assert parse_args([])[0].epochs == 8 and parse_args([])[0].test_images is None      # the demo is untouched
    assert parse_args(["--budget", "study", "--epochs", "3"])[0].epochs == 3     # a flag still wins
    # A tiny study run: the budget's test split size, shrunk by flags to stay fast (no --limit, which
    # would hide the size path), must come back from the checkpoint alone.
    flags = [f for f in TINY if f not in ("--limit", "48")]
    out = str(tmp_path / "study")
    train.main(flags + ["--budget", "study", "--epochs", "1", "--train-images", "48", "--val-images", "32",
                        "--test-images", "40", "--out-dir", out])
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert ckpt["train_config"]["budget"] == "study" and ckpt["train_config"]["test_images"] == 40
    saved = json.load(open(os.path.join(out, "metrics.json")))
    result = evaluate.main(["--checkpoint", os.path.join(out, "best.pt")])
    assert result["mAP"] == saved["mAP"]
    pred = evaluate.score_split(os.path.join(out, "best.pt"), None, None, torch.device("cpu"))[0]
    scores, targets = pred["scores"], pred["targets"]
    npz = np.load(os.path.join(out, "test_scores.npz"))
    assert scores.shape == (40, 20) and np.array_equal(npz["scores"], scores) and np.array_equal(npz["targets"], targets)
    assert set(saved["AP"]) == set(ckpt["classes"])


def test_init_seed_moves_the_weights_only(tmp_path):
    """--init-seed k --seed s: the weights come from k, the data order from s (results/noise/)."""
    first_batch = {}
    real = train.train_step
    def spy(run, x, y, *rest, **kw):
        first_batch.setdefault(len(first_batch), (x.clone(), {k: v.clone() for k, v in run.model.state_dict().items()}))
        raise KeyboardInterrupt   # one step is enough to see the batch and the initial weights
    train.train_step = spy
    try:
        seen = []
        for init in ("0", "1"):
            first_batch.clear()
            with pytest.raises(train.Interrupted):
                train.main(TINY + ["--epochs", "1", "--init-seed", init, "--seed", "5", "--out-dir", str(tmp_path / init)])
            seen.append(first_batch[0])
    finally:
        train.train_step = real
    (x0, w0), (x1, w1) = seen
    assert torch.equal(x0, x1)                                                  # same data order and flips
    assert any(w0[k].is_floating_point() and not torch.equal(w0[k], w1[k]) for k in w0)   # other weights


def test_offline_weights_error_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def no_network(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet18", "DEFAULT")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and os.path.join(str(tmp_path), "hub", "checkpoints") in msg
    assert "--weights none" in msg
    with pytest.raises(WeightsUnavailable):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_older_checkpoints_load_without_running_code(tmp_path):
    """A checkpoint with numpy's RNG state inside (as train.py wrote before) loads with weights_only=True and
    numpy's array types allowed; any other global is still refused."""
    import datetime
    import pickle
    from lib.checkpoint import load_file
    torch.save({"rng": np.random.get_state(), "model_config": {}}, tmp_path / "old.pt")
    state = load_file(str(tmp_path / "old.pt"))["rng"]
    assert state[0] == "MT19937" and (state[1] == np.random.get_state()[1]).all()
    torch.save({"when": datetime.date(2020, 1, 1)}, tmp_path / "other.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_file(str(tmp_path / "other.pt"))
