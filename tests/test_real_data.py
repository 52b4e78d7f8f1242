"""
The VOC 2007 and COCO 2014 loaders on tiny datasets written here in the real on-disk formats (no network).

VOC: VOCdevkit/VOC2007/{JPEGImages, ImageSets/Main/<split>.txt, <class>_<split>.txt}, with a grayscale
and a CMYK JPEG and a class ("cow") whose only instances are difficult. COCO: train2014/, val2014/,
annotations/instances_{train,val}2014.json with category ids that have gaps (listed out of order), a
crowd annotation and an image with no annotation. Checked:
- `targets` equal what the files say (1 present, 0 absent, -1 difficult), rows in the listed order;
- every --data-root form finds VOC; any image mode loads as RGB; the transforms give (3, S, S), flip
  only with hflip (--no-hflip: ASL's and Q2L's pipeline never mirrors);
- clear errors naming the problem: missing root, missing split, missing or corrupt image, unknown
  class name, unknown category id, truncated json;
- train.py trains and evaluates end to end on the tiny VOC tree (on a CPU it first warns with the
  expected minutes per epoch and what to change), and so do ML-GCN, Q2L, ML-VPT (vit_tiny) and DR-MoE
  with DivDR (its routing measured against each photo's most frequent label); a corrupt image met inside a
  DataLoader worker ends the script with one line naming the file, not a traceback.

Run: python -m pytest -q tests/test_real_data.py
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from tiny import have

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_FILE_VALUE = {1.0: "1", 0.0: "-1", -1.0: "0"}   # our target -> the devkit's file value


def write_image(path, mode="RGB", size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.convert(mode).save(path, quality=90)


def make_voc(root, splits=None):
    """A VOC 2007 tree; returns {split: (ids, targets)} with targets in our encoding."""
    splits = splits or {"trainval": 6, "test": 4}
    d = root / "VOCdevkit" / "VOC2007"
    (d / "JPEGImages").mkdir(parents=True)
    (d / "ImageSets" / "Main").mkdir(parents=True)
    rng, truth, n = np.random.default_rng(1), {}, 0
    for split, count in splits.items():
        ids = [f"{n + k + 1:06d}" for k in range(count)]
        n += count
        t = rng.choice([1.0, 0.0, 0.0, -1.0], size=(count, 20))
        t[:, data.VOC_CLASSES.index("cow")] = rng.choice([-1.0, 0.0], size=count)   # difficult only
        t[0, data.VOC_CLASSES.index("cow")] = -1.0
        for k, i in enumerate(ids):
            mode = "L" if k == 0 else "CMYK" if k == 1 else "RGB"   # grayscale and CMYK photos exist in VOC
            write_image(d / "JPEGImages" / f"{i}.jpg", mode, seed=k)
        (d / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
        for j, c in enumerate(data.VOC_CLASSES):
            # the devkit pads "1" and "0" with two spaces and "-1" with one; both must parse
            lines = [f"{i} {VOC_FILE_VALUE[t[k, j]]:>2}\n" for k, i in enumerate(ids)]
            (d / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text("".join(lines))
        truth[split] = (ids, t)
    return truth


def test_voc_targets_equal_the_files(tmp_path):
    truth = make_voc(tmp_path)
    for split, (ids, t) in truth.items():
        ds = data.build_dataset("voc", split, str(tmp_path), image_size=32)
        assert ds.ids == ids and ds.classes == list(data.VOC_CLASSES)
        assert torch.equal(ds.targets, torch.from_numpy(t).float())
        assert (ds.targets[:, data.VOC_CLASSES.index("cow")] != 1).all()   # the difficult-only class
        x, y = ds[0]                                                       # the grayscale photo
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, ds.targets[0])
        assert ds[1][0].shape == (3, 32, 32)                               # the CMYK photo


def test_voc_root_forms_and_errors(tmp_path):
    make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2007"):
        assert len(data.build_dataset("voc", "test", str(root), image_size=32)) == 4
    with pytest.raises(data.DatasetError, match="(?s)Looked for JPEGImages.*nowhere.*--download"):
        data.build_dataset("voc", "trainval", str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetError, match="split 'val' is missing"):
        data.build_dataset("voc", "val", str(tmp_path))
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (main / "unicorn_test.txt").write_text("000007  1\n")
    with pytest.raises(data.DatasetError, match="unknown class name.*unicorn"):
        data.build_dataset("voc", "test", str(tmp_path))
    os.remove(main / "unicorn_test.txt")
    os.remove(tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000008.jpg")
    with pytest.raises(data.DatasetError, match="1 of 4 images.*missing.*000008.jpg"):
        data.build_dataset("voc", "test", str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    make_voc(tmp_path)
    bad = tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])                     # a truncated download
    ds = data.build_dataset("voc", "trainval", str(tmp_path), image_size=32)
    with pytest.raises(data.DatasetError, match="000003.jpg"):
        ds[2]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new("RGB", (20, 10), (200, 30, 60)).convert(mode).save(path)
    im = data.load_rgb(path)
    assert im.mode == "RGB" and im.size == (20, 10)
    assert data.load_image(path, 16).shape == (3, 16, 16)


def test_transforms_and_cutout():
    torch.manual_seed(0)
    img = Image.new("RGB", (50, 40), (0, 0, 0))
    x = data.build_transform(32, train=True, randaugment=True, cutout=0.5)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    ev = data.build_transform(32, train=False)(img)                 # eval: resize + normalise only
    # The flip: --no-hflip (ASL's and Q2L's pipeline) never mirrors, the default (ML-GCN's) sometimes does.
    half = Image.new("RGB", (32, 32), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 16, 32))                     # left half white
    plain = data.build_transform(32, train=False)(half)
    mirrored = plain.flip(-1)
    no_flip = [data.build_transform(32, True, randaugment=False, hflip=False)(half) for _ in range(20)]
    flip = [data.build_transform(32, True, randaugment=False, hflip=True)(half) for _ in range(20)]
    assert all(torch.equal(x, plain) for x in no_flip)
    assert any(torch.equal(x, mirrored) for x in flip) and any(torch.equal(x, plain) for x in flip)
    assert torch.allclose(ev, data.normalize(torch.zeros(3, 32, 32, dtype=torch.uint8)), atol=1e-6)
    z = Image.new("RGB", (32, 32), (0, 0, 0))
    for _ in range(20):
        changed = torch.from_numpy(np.asarray(data.Cutout(0.5)(z)) != 0).any(-1)   # (H, W)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if changed.any():   # a filled rectangle, at most half of each side (smaller where clipped)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert changed.sum() == h * w and h <= 16 and w <= 16


def make_coco(root):
    """A COCO 2014 tree; returns {split: (ids, targets)} with categories in id order 1, 3, 7, 90."""
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
            {"id": 7, "name": "train"}, {"id": 3, "name": "car"}]   # listed out of order, ids with gaps
    col = {1: 0, 3: 1, 7: 2, 90: 3}
    (root / "annotations").mkdir(parents=True)
    truth = {}
    for split, first in (("train", 100), ("val", 200)):
        (root / f"{split}2014").mkdir()
        ids = [first + 5, first + 1, first + 3, first + 2]               # json order is not id order
        images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": 40, "height": 30} for i in ids]
        for k, im in enumerate(images):
            write_image(root / f"{split}2014" / im["file_name"], "L" if k == 0 else "RGB", seed=k)
        anns = [dict(id=1, image_id=first + 1, category_id=3, iscrowd=0),
                dict(id=2, image_id=first + 1, category_id=3, iscrowd=0),   # two cars: still one label
                dict(id=3, image_id=first + 1, category_id=90, iscrowd=1),  # a crowd counts
                dict(id=4, image_id=first + 5, category_id=1, iscrowd=0),
                dict(id=5, image_id=first + 3, category_id=7, iscrowd=0)]   # first + 2 has no annotation
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
        t = np.zeros((4, 4), dtype=np.float32)
        sorted_ids = sorted(ids)
        for a in anns:
            t[sorted_ids.index(a["image_id"]), col[a["category_id"]]] = 1
        truth[split] = ([str(i) for i in sorted_ids], t)
    return truth


def test_coco_targets_equal_the_json(tmp_path):
    truth = make_coco(tmp_path)
    for split, (ids, t) in truth.items():
        ds = data.build_dataset("coco", split, str(tmp_path), image_size=32)
        assert ds.classes == ["person", "car", "train", "toothbrush"] and ds.ids == ids
        assert torch.equal(ds.targets, torch.from_numpy(t))
        assert ds[0][0].shape == (3, 32, 32)
        dropped = data.build_dataset("coco", split, str(tmp_path), image_size=32, empty="drop")
        keep = t.sum(1) > 0
        assert dropped.ids == [i for i, k in zip(ids, keep) if k] and torch.equal(dropped.targets, torch.from_numpy(t[keep]))


def test_coco_errors(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(data.DatasetError, match="expected .*instances_train2014.json"):
        data.build_dataset("coco", "train", str(tmp_path / "elsewhere"))
    ann = tmp_path / "annotations" / "instances_val2014.json"
    js = json.loads(ann.read_text())
    js["annotations"].append(dict(id=9, image_id=201, category_id=2, iscrowd=0))
    ann.write_text(json.dumps(js))
    with pytest.raises(data.DatasetError, match="unknown category id 2"):
        data.build_dataset("coco", "val", str(tmp_path))
    ann.write_text(ann.read_text()[:150])                         # a truncated download
    with pytest.raises(data.DatasetError, match="instances_val2014.json is not valid JSON"):
        data.build_dataset("coco", "val", str(tmp_path))


VOC_RUN = ["--dataset", "voc", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
           "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--dim", "32", "--heads", "2",
           "--ff-dim", "64", "--expert-hidden", "32"]


def test_train_end_to_end_on_voc(tmp_path, capsys):
    make_voc(tmp_path / "voc")
    metrics = train.main(VOC_RUN + ["--data-root", str(tmp_path / "voc"), "--out-dir", str(tmp_path / "run")])
    assert 0 <= metrics["mAP"] <= 100 and metrics["split"] == "test"
    if not torch.cuda.is_available():   # the paper preset on a CPU says so, with a time and what to change
        out = capsys.readouterr().out
        line = next(l for l in out.splitlines() if l.startswith("note: training voc on the cpu"))
        assert "the first steps took" in line and "min per epoch" in line and "--device cuda" in line
        # the ways to a shorter run the command already takes are not advised again
        assert "--image-size" not in line and "--backbone" not in line
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["data_wait_s"] >= 0 and log[0]["compute_s"] > 0


def test_voc_says_where_it_chooses_and_holdout_chooses_elsewhere(tmp_path, capsys, monkeypatch):
    """The voc preset chooses the best epoch on the test split, as the papers: the log says so and metrics.json
    records it. --val-split holdout chooses on 10 % of trainval instead: images that neither train nor test.
    What is checked is the images the loop really validates on (the loader handed to train.validate)."""
    make_voc(tmp_path / "voc")
    root = str(tmp_path / "voc")
    seen = []   # the image ids of every loader the training loop validates on
    real_validate = train.validate
    monkeypatch.setattr(train, "validate", lambda run, loader, *a, **k:
                        seen.append(set(loader.dataset.ids)) or real_validate(run, loader, *a, **k))
    trainval, plain = (data.build_dataset("voc", "trainval", root, 32, augment=a) for a in (True, False))
    fit, held = data.hold_out(trainval, plain)
    test_ids = set(data.build_dataset("voc", "test", root, 32).ids)
    assert sorted(fit.ids + held.ids) == sorted(trainval.ids) and not set(fit.ids) & set(held.ids)
    assert held.ids and not set(held.ids) & test_ids and held.transform is plain.transform

    paper = train.main(VOC_RUN + ["--data-root", root, "--out-dir", str(tmp_path / "paper")])
    assert paper["best_epoch_chosen_on"] == "test" and paper["chosen_on_test_split"]
    assert "chosen on the test split (test)" in capsys.readouterr().out
    assert seen and all(ids == test_ids for ids in seen)
    seen.clear()
    clean = train.main(VOC_RUN + ["--data-root", root, "--val-split", "holdout", "--out-dir", str(tmp_path / "clean")])
    assert clean["best_epoch_chosen_on"] == "holdout" and not clean["chosen_on_test_split"]
    out = capsys.readouterr().out
    assert "chosen on the test split" not in out
    assert f"val = 10 % held out of VOC 2007 trainval ({len(held.ids)} images)" in out
    assert f"train = VOC 2007 trainval less its held-out 10 % ({len(fit.ids)} images)" in out
    assert seen and all(ids == set(held.ids) for ids in seen)   # validated on the held-out images, not on test


def test_a_broken_test_image_found_late_says_resume_and_resume_tests(tmp_path):
    """A test image whose header reads but whose pixels do not (a truncated download) passes the start-up check
    and fails at the test: the message names it and says --resume; after the fix, --resume writes metrics.json."""
    make_voc(tmp_path / "voc")
    first_test = data.build_dataset("voc", "test", str(tmp_path / "voc"), 32).ids[0]
    bad = tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{first_test}.jpg"
    whole = bad.read_bytes()
    # --val-split holdout: the test split is read at the end only (the voc preset validates on it)
    flags = VOC_RUN + ["--val-split", "holdout", "--data-root", str(tmp_path / "voc"), "--out-dir", str(tmp_path / "run")]
    bad.write_bytes(whole[:200])                  # no header left: stopped at start-up, before any training
    with pytest.raises(data.DatasetError, match=f"test split cannot be read: .*{first_test}.jpg"):
        train.main(flags)
    assert not os.path.exists(tmp_path / "run")
    bad.write_bytes(whole[:len(whole) // 2])      # the header survives, the pixels do not: found at the test
    with pytest.raises(data.DatasetError, match=f"{first_test}.jpg.*--resume keeps the finished epochs"):
        train.main(flags)
    assert os.path.isfile(tmp_path / "run" / "last.pt") and not os.path.isfile(tmp_path / "run" / "metrics.json")
    bad.write_bytes(whole)                                          # fixed
    assert train.main(flags + ["--resume"])["mAP"] >= 0 and os.path.isfile(tmp_path / "run" / "metrics.json")


def test_script_errors_without_traceback(tmp_path):
    make_voc(tmp_path / "voc")
    bad = tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000004.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cmd = [sys.executable, "train.py", *VOC_RUN, "--num-workers", "1", "--out-dir", str(tmp_path / "run")]
    for root, expect in ((tmp_path / "voc", "000004.jpg"), (tmp_path / "missing", "no PASCAL VOC 2007 found")):
        out = subprocess.run(cmd + ["--data-root", str(root)], cwd=ROOT_DIR, capture_output=True, text=True)
        assert out.returncode != 0 and expect in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("model,flags", [("mlgcn", []), ("q2l", []),
                                         ("mlvpt", ["--backbone", "vit_tiny"]),
                                         ("drmoe", ["--divdr-coef", "0.1", "--epochs", "2"])])   # DivDR from epoch 2
def test_models_train_on_voc(tmp_path, model, flags):
    need = {"mlgcn": "baselines.py", "q2l": "baselines.py", "mlvpt": "mlvpt.py", "drmoe": "divdr.py"}[model]
    if not have(need):
        pytest.skip(f"{need} is not in this copy")
    make_voc(tmp_path / "voc")
    metrics = train.main(VOC_RUN + ["--model", model, "--gcn-hidden", "16", "--data-root", str(tmp_path / "voc"),
                                    "--out-dir", str(tmp_path / "run")] + flags)
    assert metrics["model"] == model and 0 <= metrics["mAP"] <= 100
    if "--divdr-coef" in flags:   # on photos the routing is measured against each image's most frequent label
        log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
        assert log[1]["losses"]["divdr"] != 0 and metrics["routing"]["clusters"] >= 1


def test_download_offline_and_stats_cli(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(data.DatasetError, match="(?s)VOCtrainval_06-Nov-2007.tar failed.*Offline"):
        data.download_voc(str(tmp_path / "dl"))
    truth = make_voc(tmp_path / "voc")
    out = subprocess.run([sys.executable, "data.py", "--dataset", "voc", "--data-root", str(tmp_path / "voc"),
                          "--stats"], cwd=ROOT_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "split sizes: trainval 6, test 4" in out.stdout
    ids, t = truth["test"]
    j = int((t == 1).sum(0).argmax())                     # the most frequent label of the test split
    # its line in the test split's table: index, name, number of images where it is present
    section = out.stdout.split("== voc test ==")[1]
    assert re.search(rf"^\s*{j}\s+{data.VOC_CLASSES[j]}\s+{int((t[:, j] == 1).sum())}\s", section, re.M), section
