"""
The first hour of a new user, as behaviour (issue "a first hour without surprises"): the command lines
answer a typo in one line, keep runs apart, and say what they do (CPU, seconds; the two subprocess cases
pay one torch import each).

- each bad value (train.py and evaluate.py) exits with code 2 and ONE stderr line naming the flag, no
  traceback, before any data is generated;
- different gates / models / seeds get different default run folders, the README's "Then:" commands
  among them, and the folder is printed at start;
- --help is grouped (data, model, mixture of experts, baselines, training, system) and shows the real
  per-dataset preset values (synthetic cuts ResNet-18 at layer3, not the dataclass's layer4);
- --resume with another --epochs is refused in one line (a one-cycle schedule cannot be extended), and
  --resume PATH continues in PATH's folder;
- the EMA decay per preset: constant 0.9997 on voc/coco (Q2L), warm-up on the synthetic preset;
- data.py --preview writes outside the tracked assets unless a path is named;
- bench.py's default model list resolves through train.py's configuration for the presets' backbones
  and a ViT (mlvpt only on the ViT);
- evaluate.py --image says which classes the model knows, and "no label above" instead of promoting a
  top-1 below the threshold to a prediction.

Run: python -m pytest -q tests/test_cli.py
"""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import config
import evaluate
import train
from tiny import FAST, TINY_MODEL, have

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_MODEL + ["--limit", "48", "--batch-size", "16"]

BAD = [  # (script, flags, a word the one line must contain)
    ("train.py", ["--backbone", "resnet1000"], "--backbone"),
    ("train.py", ["--image-size", "-5"], "--image-size"),
    ("train.py", ["--epochs", "0"], "--epochs"),
    ("train.py", ["--batch-size", "0"], "--batch-size"),
    ("train.py", ["--shared-experts", "0", "--task-experts", "0"], "--shared-experts plus --task-experts"),
    ("train.py", ["--backbone", "regnet_y_400mf"], "--backbone"),       # cannot be probed on meta: still 1 line
    ("train.py", ["--resume", "no/such/last.pt"], "no checkpoint at no/such/last.pt"),
    ("train.py", ["--resume", "README.md", "--num-workers", "-1"], "--num-workers"),   # a resumed run keeps it
    ("train.py", ["--gate", "dynamc"], "--gate"),
    ("train.py", ["--dataset", "vocc"], "--dataset"),
    ("train.py", ["--budget", "long"], "--budget"),
    ("train.py", ["--dataset", "voc", "--test-images", "100"], "--test-images"),
    ("train.py", ["--test-images", "0"], "--test-images"),
    ("evaluate.py", ["--checkpoint", "README.md"], "README.md"),
    ("evaluate.py", ["--checkpoint", "no/such/best.pt"], "no such file"),
]
if not torch.cuda.is_available():   # on a GPU machine --device cuda is a valid value
    BAD += [("train.py", ["--device", "cuda"], "--device"),
            ("evaluate.py", ["--checkpoint", "README.md", "--device", "cuda"], "--device")]


@pytest.mark.parametrize("script,flags,word", BAD)
def test_each_bad_value_is_one_line_exit_2(script, flags, word, tmp_path, capsys):
    # In this process (a torch import per case would cost a minute); nothing may be written: the checks
    # come before any data. The command line itself is checked by the subprocess test below.
    main = train.main if script == "train.py" else evaluate.main
    with pytest.raises(SystemExit) as e:
        main([*flags, "--out-dir" if script == "train.py" else "--json", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, (script, flags, e.value.code, lines)
    assert len(lines) == 1 and word in lines[0], (script, flags, lines)
    assert not (tmp_path / "out").exists()


def test_bad_values_from_the_command_line(tmp_path):
    """Two of the cases as a user types them: exit 2, one stderr line, no traceback."""
    cases = [BAD[0], ("evaluate.py", ["--checkpoint", "README.md"], "README.md")]
    procs = [(case, subprocess.Popen([sys.executable, os.path.join(ROOT, case[0]), *case[1],
                                      "--out-dir" if case[0] == "train.py" else "--json", str(tmp_path / "out")],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for case in cases]
    for (script, flags, word), p in procs:
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in err, (script, flags, p.returncode, err[-500:])
        assert len(lines) == 1 and word in lines[0], (script, flags, err)
    assert not (tmp_path / "out").exists()


def out_dir(*argv):
    return train.parse_args(list(argv))[0].out_dir


def test_default_run_folders_differ():
    readme_then = [[], ["--gate", "label"], ["--gate", "static", "--shared-experts", "2", "--task-experts", "2"]]
    dirs = [out_dir(*a) for a in readme_then]
    dirs += [out_dir("--gate", g) for g in ("image", "dynamic")]
    dirs += [out_dir("--model", m) for m in ("linear", "q2l", "hsq") if have("baselines.py")]
    dirs += [out_dir("--seed", "1"), out_dir("--lr", "3e-4"), out_dir("--dataset", "voc")]
    assert dirs[0] == os.path.join("runs", "synthetic", "drmoe-dynamic-S2-T1-seed0")
    assert dirs[0] == dirs[4]                              # the default spelled out is the same run
    assert len(set(dirs)) == len(dirs) - 1, dirs           # every other pair differs
    assert "lr=0.0003" in out_dir("--lr", "3e-4") and out_dir("--out-dir", "x") == "x"
    # --image-size is a field of both configs (ModelConfig's copies TrainConfig's): named once
    assert out_dir("--image-size", "96") == os.path.join("runs", "synthetic", "drmoe-dynamic-S2-T1-image-size=96-seed0")


def test_run_folder_is_printed(tmp_path, capsys):
    train.main([*TINY, "--epochs", "1", *FAST, "--out-dir", str(tmp_path / "r")])
    assert f"run folder: {tmp_path / 'r'}" in capsys.readouterr().out


def test_resume_path_continues_in_its_own_folder(tmp_path):
    # --resume PATH without --out-dir: the run PATH belongs to, not the default folder of the flags typed
    # now (which may hold another run whose best.pt would be overwritten).
    (tmp_path / "label-run").mkdir()
    ckpt = tmp_path / "label-run" / "last.pt"
    ckpt.write_bytes(b"")
    assert out_dir("--resume", str(ckpt)) == str(tmp_path / "label-run")
    assert out_dir("--resume", str(ckpt), "--out-dir", "elsewhere") == "elsewhere"


def test_ema_decay_per_preset():
    # voc/coco: Q2L's constant decay from the first step; synthetic: TensorFlow's warm-up rule.
    voc = train.parse_args(["--dataset", "voc"])[0]
    assert (voc.ema_decay, voc.ema_warmup) == (0.9997, False)
    assert train.ema_decay_at(voc, 0) == train.ema_decay_at(voc, 6239) == 0.9997
    syn = train.parse_args([])[0]
    assert syn.ema_warmup and train.ema_decay_at(syn, 0) == 0.1 and train.ema_decay_at(syn, 5) == 6 / 15
    # The synthetic run's last step (624 steps) is still below 0.99: d reaches 0.99 only at step 890.
    assert train.ema_decay_at(syn, 623) == 624 / 633 and train.ema_decay_at(syn, 890) == 0.99
    assert train.ema_decay_at(train.parse_args(["--dataset", "voc", "--ema-warmup"])[0], 6239) < 0.9987


def test_help_is_grouped_with_preset_values(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model:", "mixture of experts:", "training:", "system:") + (("baselines:",) * have("baselines.py")):
        assert f"\n{group}\n" in text, group
    # --feature-layer: the synthetic preset's layer3 and the papers' layer4 are both shown as what they are.
    flat = " ".join(text.split())                          # argparse wraps lines at the terminal width
    block = flat[flat.index("--feature-layer"):flat.index("--feature-layer") + 220].replace("- ", "-")   # and at hyphens
    assert "synthetic, synthetic-pretrain: layer3" in block and "coco, csv, cocojson: layer4" in block
    assert "[default: preset]" not in text
    # Grouped: --lr sits under training, --shared-experts under mixture of experts.
    assert text.index("training:") < text.index("--lr") and text.index("mixture of experts:") < text.index("--shared-experts")


def test_resume_with_other_epochs_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main([*TINY, "--epochs", "1", *FAST, "--keep-last", "--out-dir", out])
    capsys.readouterr()                                    # the first run's progress bars
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--epochs", "3", *FAST, "--out-dir", out, "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs 3" in err[0] and "cannot be extended" in err[0]


def test_preview_default_leaves_tracked_assets_alone(tmp_path):
    # Run from an empty folder: the old default (assets/synthetic_preview.png, relative) would create assets/.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--preview"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "preview_synthetic.png").is_file()
    assert not (tmp_path / "assets").exists()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--preview", "x/grid.png"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "x" / "grid.png").is_file()


def test_image_prediction_says_when_nothing_passes(tmp_path, capsys):
    out = str(tmp_path / "r")
    train.main([*TINY, "--epochs", "1", *FAST, "--out-dir", out])
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    ckpt = os.path.join(out, "best.pt")
    capsys.readouterr()
    # A threshold no probability reaches: the line must say so and still name the 3 most likely labels.
    probs = evaluate.main(["--checkpoint", ckpt, "--image", str(path), "--threshold", "0.999999"])[str(path)]
    text = capsys.readouterr().out
    assert "the model knows 20 classes: circle, triangle" in text
    top3 = sorted(probs, key=probs.get, reverse=True)[:3]
    assert max(probs.values()) < 0.999999
    assert f"{path}: no label above 0.999999; most likely: {top3[0]} " in text and top3[2] in text
    # A threshold every label passes: all 20 are predictions, none is called "most likely".
    evaluate.main(["--checkpoint", ckpt, "--image", str(path), "--threshold", "0.000001"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith(str(path))][0]
    assert "no label above" not in line and line.count(",") == 19


@pytest.mark.skipif(not have("studies") or not have("mlvpt.py"), reason="the studies and ML-VPT are not in this copy")
@pytest.mark.parametrize("dataset,backbone", [("synthetic", None), ("coco", None), ("synthetic", "vit_tiny")])
def test_bench_default_models_all_configure(dataset, backbone):
    """`python bench.py` times its default --models; each must pass train.py's own checks (config.parse_args
    exits on a model the backbone cannot carry, as mlvpt on a ResNet did)."""
    import argparse
    from studies import bench
    args = argparse.Namespace(dataset=dataset, backbone=backbone, image_size=None, batch_size=None, extra="", labels=None)
    models = bench.default_models(backbone)
    for m in models:
        tcfg, mcfg = bench.configs(m, args)
        assert mcfg.model == m
    assert ("mlvpt" in models) == (backbone == "vit_tiny") and len(models) >= 5
