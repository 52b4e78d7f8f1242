"""
Nothing lost, nothing surprising: what a run folder holds and what a command may do to it (CPU, tiny runs).

- A run folder is never reused by a different run: the default name covers the data root and the weights
  file (a short hash of where each really is), so two data trees, or two best.pt files, of one name are two
  folders, and one tree reached by two paths is one.
- The same command over a finished run changes nothing and says so (tests/test_train.py checks the bytes);
  over an unfinished one it refuses, pointing at --resume; a start that fails leaves no folder behind.
- --weights reports in one line what it loaded into the backbone and what it left, and refuses, naming the
  tensor, a checkpoint whose backbone does not fit.
- best.pt holds the judged weights and the configs (at most half of last.pt); a finished run keeps no last.pt
  unless --keep-last, and ends with a summary (a RUN= line to copy), curves.png and routing.png.
- A run knows its code: the same command after the source changed is a new run in its own folder, said in
  one line, the finished run byte for byte as it was; unchanged code is the same finished run (no-op).
- Ctrl-C before any epoch finished leaves no folder and says to rerun the same command (no --resume); after
  one, it says --resume. Default folder names stay under 60 characters however many flags are given.
- With its output redirected (not a terminal) a run writes one line per epoch, no progress bars.
- Off a GPU, the projected time per epoch never advises a flag the command already gives.

Run: python -m pytest -q tests/test_runs.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from lib import rundir
from backbones import WeightsUnavailable
from config import parse_args
from data import DatasetError
from tiny import TINY_MODEL, have
from zoo import ModelConfig, build_model, describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_MODEL + ["--limit", "32", "--batch-size", "16", "--ema-decay", "0.9", "--num-workers", "0"]


def test_data_roots_and_weights_files_name_the_folder(tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "photos", tmp_path / "b" / "photos"            # two trees with the same name
    a.mkdir(parents=True), b.mkdir(parents=True)
    csv = ["--dataset", "csv", "--backbone", "resnet18", "--weights", "none", "--image-size", "96"]
    dir_a, dir_b = (parse_args(csv + ["--data-root", str(d)])[0].out_dir for d in (a, b))
    assert dir_a != dir_b and "data-root=photos@" in dir_a
    monkeypatch.chdir(tmp_path / "a")   # the same tree by a relative path: the same run, the same folder
    assert parse_args(csv + ["--data-root", "photos"])[0].out_dir == dir_a
    for w in (a, b):
        torch.save({}, w / "best.pt")
    vit = ["--model", "mlvpt", "--backbone", "vit_tiny"] if have("mlvpt.py") else ["--backbone", "vit_tiny"]
    assert len({parse_args(vit + ["--weights", str(w / "best.pt")])[0].out_dir for w in (a, b)}) == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    metrics = train.main(TINY + ["--epochs", "2", "--keep-last", "--out-dir", out])
    return out, metrics


def test_lean_best_summary_and_curves(finished_run, capsys):
    out, metrics = finished_run
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert "optimizer" not in best and best["ema"] is None and best["model_config"]["dim"] == 32
    assert os.path.getsize(os.path.join(out, "best.pt")) <= 0.5 * os.path.getsize(os.path.join(out, "last.pt"))
    assert os.path.isfile(os.path.join(out, "curves.png"))
    summary = rundir.summary(train.TrainConfig(**best["train_config"]), metrics, 1.0).splitlines()
    assert summary[0].startswith("done in 1.0 min: best epoch") and "chosen on the val split" in summary[0]
    assert f"mAP {metrics['mAP']:.2f}" in summary[1] and summary[3] == f"RUN={out}" and "evaluate.py" in summary[4]


def test_an_unfinished_run_is_never_started_over(finished_run, tmp_path, capsys):
    out = tmp_path / "half"
    out.mkdir()
    last = open(os.path.join(finished_run[0], "last.pt"), "rb").read()
    (out / "last.pt").write_bytes(last)                                  # a last.pt and no metrics.json
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--epochs", "2", "--out-dir", str(out)])
    assert "holds an unfinished run" in str(e.value) and "--resume" in str(e.value)
    assert (out / "last.pt").read_bytes() == last and sorted(os.listdir(out)) == ["last.pt"]


def test_a_failed_start_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        train.main(["--dataset", "csv", "--data-root", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "run1")])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")   # nothing a ResNet-18 can use
    with pytest.raises(WeightsUnavailable):
        train.main(TINY + ["--weights", str(tmp_path / "wrong.pth"), "--out-dir", str(tmp_path / "run2")])
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_weights_report_what_they_loaded_and_refuse_a_misfit(finished_run, capsys):
    best = os.path.join(finished_run[0], "best.pt")                       # a resnet18 cut after layer2
    cfg = dict(num_labels=20, dim=32, heads=2, ff_dim=64, expert_hidden=32, weights=best)
    build_model(ModelConfig(feature_layer="layer1", **cfg))               # a shallower cut: layer2 is left
    line = capsys.readouterr().out.splitlines()[1]
    assert "loaded" in line and "into the backbone (resnet18 cut after layer1)" in line and "not used (layer2)" in line
    with pytest.raises(WeightsUnavailable, match=r"no layer3\.0\.conv1\.weight in it"):   # deeper than the file
        build_model(ModelConfig(feature_layer="layer3", **cfg), verbose=False)
    with pytest.raises(WeightsUnavailable, match="a checkpoint of a resnet18 backbone"):
        build_model(ModelConfig(backbone="resnet34", feature_layer="layer2", **cfg), verbose=False)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, best + ".pth")   # another kernel size
    with pytest.raises(WeightsUnavailable, match=r"conv1\.weight is \(64, 3, 3, 3\) there and \(64, 3, 7, 7\)"):
        build_model(ModelConfig(feature_layer="layer2", **{**cfg, "weights": best + ".pth"}), verbose=False)


def test_no_keep_last_and_a_redirected_log(tmp_path):
    """Through a pipe, as `python train.py ... > log.txt`: one line per epoch and the summary at the end."""
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "train.py", *TINY, "--epochs", "2", "--no-keep-last", "--out-dir", out],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) < 60 and "\r" not in r.stdout, r.stdout[-3000:]
    assert sum(l.startswith("epoch ") for l in lines) == 2 and lines[-3].startswith("next: python evaluate.py")
    assert sorted(os.listdir(out)) == ["best.pt", "config.json", "curves.png", "log.jsonl", "metrics.json", "routing.png",
                                       "test_scores.npz"]


def test_cpu_projection_advises_only_what_the_command_lacks():
    tcfg = parse_args(["--dataset", "voc", "--backbone", "resnet18", "--image-size", "96"])[0]
    line = rundir.cpu_projection(tcfg, {"dataset", "backbone", "image_size"}, 2.0, 150, 1000)
    assert "the first steps took 2.00 s each" in line and f"{(2.0 * 150 + 2.0 / 3 * 1000 / 32) / 60:.1f} min" in line
    assert "--device cuda" in line and "--limit" in line and "--backbone" not in line and "--image-size" not in line
    everything = {"device", "backbone", "image_size", "limit"}
    assert "shorter" not in rundir.cpu_projection(tcfg, everything, 2.0, 150, 1000)


def test_describe_names_where_a_resnet_is_cut():
    for layer in ("layer3", "layer4"):
        cfg = ModelConfig(model="linear" if have("baselines.py") else "drmoe", backbone="resnet50", feature_layer=layer)
        assert f"resnet50 cut after {layer}" in describe(build_model(cfg, verbose=False), cfg)


def snapshot(folder) -> dict:
    """Every file of a folder and its bytes."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_changed_code_is_a_new_run_and_the_old_one_stays(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    first = train.main(TINY + ["--epochs", "1", "--out-dir", out])
    assert not os.path.isfile(os.path.join(out, "last.pt"))                     # lean by default
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["source_hash"] == rundir.provenance()["source_hash"] and saved["cpu"] and saved["torch"]
    before = snapshot(out)
    # The same command, the same code: the finished run, nothing written.
    assert train.main(TINY + ["--epochs", "1", "--out-dir", out])["mAP"] == first["mAP"]
    assert snapshot(out) == before and "holds a finished run" in capsys.readouterr().out
    # The same command after an edit (another source hash): a new run beside it, said in one line.
    real = rundir.provenance()
    monkeypatch.setattr(train, "provenance", lambda: {**real, "source_hash": "e" * 12})
    train.main(TINY + ["--epochs", "1", "--out-dir", out])
    said = capsys.readouterr().out
    assert f"the code changed since {out}" in said and os.path.isfile(out + "-codeeeeeee/metrics.json")
    assert snapshot(out) == before                                             # the finished run untouched
    assert json.load(open(out + "-codeeeeeee/metrics.json"))["source_hash"] == "e" * 12


def test_interrupted_before_the_first_epoch_leaves_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = train.train_step

    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_step", ctrl_c)
    with pytest.raises(train.Interrupted, match="before any epoch finished: nothing was kept; rerun the same command"):
        train.main(TINY + ["--epochs", "2", "--out-dir", out])
    assert not os.path.exists(out)
    # After one epoch: last.pt is there, and the advice is --resume, which then finishes the run.
    calls = []

    def ctrl_c_in_epoch_2(run, *rest, **kw):
        calls.append(1)
        if len(calls) == 3:                                    # 2 steps per epoch: the first step of epoch 2
            raise KeyboardInterrupt
        return real(run, *rest, **kw)
    monkeypatch.setattr(train, "train_step", ctrl_c_in_epoch_2)
    with pytest.raises(train.Interrupted, match="last.pt holds epoch 1 of 2; rerun the same command with --resume"):
        train.main(TINY + ["--epochs", "2", "--out-dir", out])
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(TINY + ["--epochs", "2", "--out-dir", out, "--resume"])["epoch"] >= 1


def test_default_folder_names_stay_short():
    many = ["--lr", "3e-4", "--epochs", "12", "--batch-size", "16", "--weight-decay", "0.05", "--ema-decay", "0.999",
            "--dim", "128", "--heads", "8", "--expert-hidden", "128", "--gate-temperature", "2", "--warmup-pct", "0.1"]
    name = os.path.basename(parse_args(many)[0].out_dir)
    assert len(name) < 60 and name.startswith("drmoe-dynamic-S2-T1-") and name.endswith("-seed0")
    assert os.path.basename(parse_args(many + ["--seed", "1"])[0].out_dir) != name   # still one folder per run
    assert os.path.basename(parse_args(many[:-2])[0].out_dir) != name
