"""
Your own data (owndata.py, predictions.py) and training that never diverges silently, on tiny trees built here
in the real formats (PNG files, CSVs, COCO-style json). CPU, about a minute.

- --dataset csv: a `labels` column (names split on spaces or '|', empty = no label) and one-hot columns
  (1, 0, -1), with and without classes.txt, with and without val.csv: targets equal the files, the label
  order is classes.txt's (else the sorted training names / the column order), the held-out val is a
  seeded, disjoint 10 % of train.csv;
- every user mistake is a DatasetError naming the file and the line: a missing image, a label not in
  classes.txt, an image listed twice with different labels (twice with the same: read once), a row with
  the wrong number of fields, an empty split, a one-hot cell other than 0/1/-1, no image column;
- --dataset cocojson: file_names under DIR/images, categories in id order with gaps, test = val without
  test.json; --dataset coco reads its json through the same function (read_coco_json);
- train.py and data.py --stats run end to end on both formats; a setup error is one line on stderr;
- evaluate.py --images: the CSV equals predict() on the same images, a corrupt file is listed and skipped;
  --thresholds best uses the thresholds saved in best.pt; best_f1_thresholds on a hand case;
- a non-finite loss stops training at that step with one line, last.pt stays the last finished epoch and
  loads, log.jsonl agrees with it, and --resume continues; non-finite scores at evaluation name the file.

Run: python -m pytest -q tests/test_owndata.py
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
from lib import owndata
import train
from lib.predictions import best_f1_thresholds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "car"]
TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--feature-layer", "layer2",
        "--dim", "32", "--heads", "2", "--ff-dim", "64", "--expert-hidden", "32", "--batch-size", "8",
        "--num-workers", "0", "--no-randaugment", "--cutout", "0", "--ema-decay", "0.9", "--epochs", "1"]


def images(folder, n, seed=0):
    """n small PNGs of random colour blocks; returns their names."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        a = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        names.append(f"im{seed}_{i}.png")
        Image.fromarray(a).save(os.path.join(folder, names[-1]))
    return names


def label_sets(n, seed):
    rng = np.random.default_rng(seed)
    return [[c for c in CLASSES if rng.random() < 0.4] for _ in range(n)]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def csv_tree(root, onehot=False, classes_txt=True, val=True, n=(24, 8, 8)):
    """DIR/img/*.png + train/val/test.csv; returns {split: (names, label lists)}."""
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        if split == "val" and not val:
            continue
        names = images(os.path.join(root, "img"), n[k], seed=k)
        labels = label_sets(n[k], seed=10 + k)
        if onehot:   # the columns in another order than classes.txt: the reader must map by name
            cols = ["dog", "car", "cat"]
            rows = [[f"img/{m}"] + [int(c in ls) for c in cols] for m, ls in zip(names, labels)]
            rows[0][1 + cols.index("car")] = -1                 # unknown ("car"): ignored
            write_csv(os.path.join(root, f"{split}.csv"), ["image"] + cols, rows)
        else:
            rows = [[f"img/{m}", (" " if i % 2 else "|").join(ls)] for i, (m, ls) in enumerate(zip(names, labels))]
            write_csv(os.path.join(root, f"{split}.csv"), ["image", "labels"], rows)
        out[split] = (names, labels)
    if classes_txt:
        open(os.path.join(root, "classes.txt"), "w").write("\n".join(CLASSES) + "\n")
    return out


def expected(labels, classes):
    return np.array([[float(c in ls) for c in classes] for ls in labels], np.float32)


@pytest.mark.parametrize("classes_txt", [True, False])
def test_csv_names_column(tmp_path, classes_txt):
    tree = csv_tree(str(tmp_path), classes_txt=classes_txt)
    classes = CLASSES if classes_txt else sorted(CLASSES)
    for split in ("train", "val", "test"):
        ds = data.build_dataset("csv", split, str(tmp_path), 32)
        assert ds.classes == classes
        assert np.array_equal(ds.targets.numpy(), expected(tree[split][1], classes))
        assert [os.path.basename(p) for p in ds.paths] == tree[split][0]


@pytest.mark.parametrize("classes_txt", [True, False])
def test_csv_onehot_columns_with_unknown(tmp_path, classes_txt):
    tree = csv_tree(str(tmp_path), onehot=True, classes_txt=classes_txt)
    ds = data.build_dataset("csv", "train", str(tmp_path), 32)
    classes = CLASSES if classes_txt else sorted(CLASSES)
    want = expected(tree["train"][1], classes)
    want[0, classes.index("car")] = -1                       # the -1 written in the "car" column
    assert ds.classes == classes and np.array_equal(ds.targets.numpy(), want)
    # and in training a -1 means unknown (out of the loss), not VOC's difficult (counted positive)
    from config import parse_args
    assert parse_args(["--dataset", "csv", "--data-root", str(tmp_path)])[0].difficult == "ignore"


def test_no_val_csv_holds_out_a_seeded_tenth_of_train(tmp_path):
    tree = csv_tree(str(tmp_path), val=False, n=(30, 0, 8))
    tr, va = (data.build_dataset("csv", s, str(tmp_path), 32) for s in ("train", "val"))
    assert len(va) == 3 and len(tr) == 27 and not set(tr.paths) & set(va.paths)
    assert sorted(map(os.path.basename, tr.paths + va.paths)) == sorted(tree["train"][0])
    again = data.build_dataset("csv", "val", str(tmp_path), 32)
    assert again.paths == va.paths                                      # the same images every time
    rows = {os.path.basename(p): i for i, p in enumerate(tree["train"][0])}
    for p, t in zip(va.paths, va.targets.numpy()):                      # each keeps its own labels
        assert np.array_equal(t, expected([tree["train"][1][rows[os.path.basename(p)]]], CLASSES)[0])


BAD_CSV = [  # (what to write into train.csv, words the one line must contain)
    ([["img/im0_0.png", "cat"], ["img/nope.png", "cat"]], ["train.csv, line 3", "not found", "img/nope.png"]),
    ([["img/im0_0.png", "cat"], ["img/im0_1.png", "dgo"]], ["train.csv, line 3", "'dgo'", "classes.txt"]),
    ([["img/im0_0.png", "cat"], ["img/im0_0.png", "dog"]], ["train.csv, line 3", "listed again", "line 2"]),
    ([["img/im0_0.png", "cat", "extra"]], ["train.csv, line 2", "3 fields"]),
    ([], ["train.csv", "no image rows"]),
]


@pytest.mark.parametrize("rows,words", BAD_CSV)
def test_csv_mistakes_name_file_and_line(tmp_path, rows, words):
    csv_tree(str(tmp_path))
    write_csv(str(tmp_path / "train.csv"), ["image", "labels"], rows)
    with pytest.raises(data.DatasetError) as e:
        data.build_dataset("csv", "train", str(tmp_path), 32)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_csv_onehot_and_header_mistakes(tmp_path):
    csv_tree(str(tmp_path), onehot=True)
    write_csv(str(tmp_path / "test.csv"), ["image", "car", "cat", "dog"], [["img/im2_0.png", 1, "yes", 0]])
    with pytest.raises(data.DatasetError, match=r"test.csv, line 2, column 'cat': expected 1, 0 or -1.*'yes'"):
        data.build_dataset("csv", "test", str(tmp_path), 32)
    write_csv(str(tmp_path / "test.csv"), ["file", "car", "cat", "dog"], [["img/im2_0.png", 1, 0, 0]])
    with pytest.raises(data.DatasetError, match="no 'image' column"):
        data.build_dataset("csv", "test", str(tmp_path), 32)
    # the same image twice with the same labels is read once
    write_csv(str(tmp_path / "test.csv"), ["image", "car", "cat", "dog"], [["img/im2_0.png", 1, 0, 0]] * 2)
    assert len(data.build_dataset("csv", "test", str(tmp_path), 32)) == 1


def coco_json(path, names, labels, cats):
    """A COCO instances file: images with ids in reverse order, one annotation per (image, label)."""
    ims = [{"id": 100 - i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)]
    anns = [{"id": k, "image_id": 100 - i, "category_id": cid, "bbox": [0, 0, 4, 4], "iscrowd": 0}
            for k, (i, cid) in enumerate((i, c["id"]) for i, ls in enumerate(labels) for c in cats if c["name"] in ls)]
    json.dump({"images": ims, "annotations": anns, "categories": cats}, open(path, "w"))


CATS = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 11, "name": "car"}]   # id order: cat, dog, car


def cocojson_tree(root):
    out = {}
    for k, split in enumerate(("train", "val")):
        names, labels = images(os.path.join(root, "images"), (16, 8)[k], seed=k), label_sets((16, 8)[k], 20 + k)
        coco_json(os.path.join(root, f"{split}.json"), names, labels, CATS)
        out[split] = (names, labels)
    return out


@pytest.mark.parametrize("with_test", [False, True])
def test_cocojson_reads_ids_in_order(tmp_path, with_test):
    """Rows sorted by image id, classes by category id. With test.json, val.json picks the best epoch;
    without it, val.json is the test split and val is held out of train.json (never the tested images)."""
    tree = cocojson_tree(str(tmp_path))
    if with_test:
        names, labels = images(str(tmp_path / "images"), 6, seed=5), label_sets(6, 25)
        coco_json(str(tmp_path / "test.json"), names, labels, CATS)
        tree["test"] = (names, labels)
    got = {s: data.build_dataset("cocojson", s, str(tmp_path), 32) for s in ("train", "val", "test")}
    for split, ds in got.items():
        assert ds.classes == ["cat", "dog", "car"]
        source = {"train": "train", "val": "val" if with_test else "train", "test": "test" if with_test else "val"}[split]
        names, labels = tree[source]
        order = np.argsort([100 - i for i in range(len(names))])           # rows sorted by image id
        rows = [i for i in order if names[i] in {os.path.basename(p) for p in ds.paths}]
        assert [os.path.basename(p) for p in ds.paths] == [names[i] for i in rows]
        assert np.array_equal(ds.targets.numpy(), expected([labels[i] for i in rows], ds.classes))
    if not with_test:   # train and val partition train.json
        assert len(got["train"]) == 14 and len(got["val"]) == 2 and not set(got["train"].paths) & set(got["val"].paths)


def test_cocojson_mistakes_are_named(tmp_path):
    cocojson_tree(str(tmp_path))
    js = json.load(open(tmp_path / "train.json"))
    js["images"].append(dict(js["images"][0]))                          # the same image id twice
    json.dump(js, open(tmp_path / "train.json", "w"))
    with pytest.raises(data.DatasetError, match="train.json: image entries 0 and 16 share the id 100"):
        data.build_dataset("cocojson", "train", str(tmp_path), 32)
    del js["images"][16]
    del js["annotations"][0]["category_id"]
    json.dump(js, open(tmp_path / "train.json", "w"))
    with pytest.raises(data.DatasetError, match="train.json: annotation entry 0 .* has no 'category_id'"):
        data.build_dataset("cocojson", "train", str(tmp_path), 32)


def test_names_with_spaces_split_on_bars(tmp_path):
    csv_tree(str(tmp_path))
    open(tmp_path / "classes.txt", "w").write("traffic light\ncat\n")
    write_csv(str(tmp_path / "test.csv"), ["image", "labels"], [["img/im2_0.png", "traffic light|cat"],
                                                                ["img/im2_1.png", "cat"]])
    ds = data.build_dataset("csv", "test", str(tmp_path), 32)
    assert ds.targets.tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_coco_and_cocojson_share_one_reader(tmp_path, monkeypatch):
    tree = cocojson_tree(str(tmp_path / "own"))
    coco = tmp_path / "coco"
    os.makedirs(coco / "annotations")
    os.symlink(tmp_path / "own" / "images", coco / "val2014")
    os.symlink(tmp_path / "own" / "val.json", coco / "annotations" / "instances_val2014.json")
    a = data.build_dataset("coco", "val", str(coco), 32)
    b = data.build_dataset("cocojson", "test", str(tmp_path / "own"), 32)   # no test.json: val.json
    assert a.classes == b.classes and np.array_equal(a.targets.numpy(), b.targets.numpy())
    calls = []
    monkeypatch.setattr(data, "read_coco_json", lambda *args, **kw: calls.append(args) or owndata.read_coco_json(*args, **kw))
    data.build_dataset("coco", "val", str(coco), 32)
    assert calls, "--dataset coco must read through owndata.read_coco_json"


def test_train_evaluate_and_predict_a_folder(tmp_path, capsys):
    root = tmp_path / "data"
    csv_tree(str(root))
    out = str(tmp_path / "run")
    metrics = train.main(TINY + ["--dataset", "csv", "--data-root", str(root), "--out-dir", out])
    assert metrics["split"] == "test" and metrics["best_epoch_chosen_on"] == "val"
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert ckpt["classes"] == CLASSES and len(ckpt["thresholds"]) == 3
    # the saved thresholds are best_f1_thresholds of the val split's scores (not test's)
    val = evaluate.score_split(os.path.join(out, "best.pt"), "val", None, torch.device("cpu"))[0]
    val_scores, val_targets = val["scores"], val["targets"]
    assert np.allclose(ckpt["thresholds"], best_f1_thresholds(val_scores, val_targets))
    # then extreme ones, so that --thresholds best visibly decides: car always, cat never, dog at 0.5
    ckpt["thresholds"] = [1.01, 0.5, 0.0]
    torch.save(ckpt, os.path.join(out, "best.pt"))
    # a folder with one corrupt file: listed and skipped, the others written
    folder = tmp_path / "photos"
    names = images(str(folder), 5, seed=3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    res = evaluate.main(["--checkpoint", os.path.join(out, "best.pt"), "--images", str(folder),
                         "--out", str(tmp_path / "pred.csv"), "--thresholds", "best"])
    assert res["unreadable"] == [str(folder / "broken.jpg")] and "skipped 1 unreadable" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert [r["image"] for r in rows] == sorted(names)
    # the CSV's probabilities equal evaluate.predict over the same files through a plain ImageList
    model, _, fmt = evaluate.load_checkpoint_model(os.path.join(out, "best.pt"), torch.device("cpu"))
    ds = data.ImageList([str(folder / n) for n in sorted(names)], np.zeros((5, 3)), sorted(names), CLASSES, 32,
                        data.build_transform(32, False))
    ref = evaluate.predict(model, torch.utils.data.DataLoader(ds, batch_size=2), torch.device("cpu"), None, fmt)["scores"]
    got = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    assert np.allclose(got, ref, atol=1e-5)
    thr = np.asarray(ckpt["thresholds"])
    assert [r["labels"] for r in rows] == ["|".join(c for c, p, t in zip(CLASSES, q, thr) if p >= t) for q in ref]
    assert all("car" in r["labels"] and "cat" not in r["labels"] for r in rows)


def test_one_line_errors_from_the_command_line(tmp_path):
    csv_tree(str(tmp_path))
    write_csv(str(tmp_path / "train.csv"), ["image", "labels"], [["img/im0_0.png", "cat"], ["img/im0_1.png", "dgo"]])
    for cmd in (["train.py", "--dataset", "csv", "--data-root", str(tmp_path), *TINY, "--out-dir", str(tmp_path / "o")],
                ["data.py", "--dataset", "csv", "--data-root", str(tmp_path), "--stats"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and "train.csv, line 3" in lines[0], p.stderr[-800:]


def test_data_stats_on_own_data(tmp_path):
    cocojson_tree(str(tmp_path))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--dataset", "cocojson", "--data-root",
                        str(tmp_path), "--stats"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    assert "split sizes: train 14, val 2, test 8" in p.stdout, p.stdout[-500:] + p.stderr[-500:]
    csv_tree(str(tmp_path / "csv"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--dataset", "csv", "--data-root",
                        str(tmp_path / "csv"), "--stats"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "split sizes: train 24, val 8, test 8" in p.stdout, p.stderr[-500:]


def test_best_f1_thresholds_by_hand():
    s = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.6], [0.2, 0.1]])
    y = np.array([[1, 0], [0, -1], [1, 0], [0, 0]])
    # label 0: F1 at >= 0.9: 2/3; >= 0.8: 1/2; >= 0.3: 4/5 (best); >= 0.2: 2/3 -> halfway to 0.2: 0.25
    # label 1: no positive (the -1 is not one) -> the default 0.5
    assert np.allclose(best_f1_thresholds(s, y), [0.25, 0.5])
    # ties are one threshold: two images at 0.7, one positive -> F1 = 2/(2+1) at >= 0.7
    assert best_f1_thresholds(np.array([[0.7], [0.7], [0.1]]), np.array([[1], [0], [0]]))[0] == pytest.approx(0.4)


def test_nan_loss_stops_with_one_line_and_keeps_last_epoch(tmp_path, monkeypatch):
    tiny = ["--image-size", "32", "--feature-layer", "layer2", "--dim", "32", "--heads", "2", "--ff-dim", "64",
            "--expert-hidden", "32", "--limit", "32", "--batch-size", "16", "--epochs", "3"]
    out = str(tmp_path / "run")
    real = train.train_step

    def poisoned(*args, **kw):   # epoch 2's second step returns a NaN loss, as an absurd learning rate would
        loss, losses, info = real(*args, **kw)
        return (loss * float("nan"), losses, info) if args[-1] == 4 else (loss, losses, info)
    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(train.Diverged, match=r"non-finite at step 4 \(epoch 2\): classification loss nan.*"
                                             r"last.pt holds epoch 1.*new run.*--lr.*--no-amp.*--grad-clip"):
        train.main(tiny + ["--out-dir", out])
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert last["epoch"] == 0                                                   # epoch 1, as it wrote it
    assert [json.loads(r)["epoch"] for r in open(os.path.join(out, "log.jsonl"))] == [1]
    assert np.isfinite(evaluate.main(["--checkpoint", os.path.join(out, "last.pt"), "--json", str(tmp_path / "e.json")])["mAP"])
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(["--out-dir", out, "--resume"])["epoch"] >= 1              # and it continues
    # a checkpoint with NaN weights: evaluate names the file in one line
    last["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in last["model"].items()}
    last["eval_weights"] = "raw"
    torch.save(last, tmp_path / "nan.pt")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(tmp_path / "nan.pt"),
                        "--json", str(tmp_path / "n.json")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "nan.pt" in p.stderr and "non-finite" in p.stderr
    last_line = p.stderr.strip().splitlines()[-1]                              # above it: progress bars only
    assert "Traceback" not in p.stderr and last_line.startswith("error: --checkpoint") and "nan.pt" in last_line
    images(str(tmp_path / "photos"), 2)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(tmp_path / "nan.pt"),
                        "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "p.csv")],
                       cwd=ROOT, capture_output=True, text=True)
    last_line = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "Traceback" not in p.stderr and "nan.pt" in last_line and "non-finite" in last_line


def test_nan_weights_after_an_epochs_last_step_are_caught_at_validation(tmp_path, monkeypatch):
    """The loss is computed before the update: NaN weights from the epoch's last step show only in the
    validation scores, which must stop the run the same way (not a traceback inside the metrics)."""
    real = train.train_step

    def poison_weights(run, *rest, **kw):
        out = real(run, *rest, **kw)
        if rest[-1] == 2:                                   # the last step of epoch 1 (2 steps per epoch)
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))
        return out
    monkeypatch.setattr(train, "train_step", poison_weights)
    tiny = ["--image-size", "32", "--feature-layer", "layer2", "--dim", "32", "--heads", "2", "--ff-dim", "64",
            "--expert-hidden", "32", "--limit", "32", "--batch-size", "16", "--epochs", "2", "--ema-decay", "0"]
    with pytest.raises(train.Diverged, match=r"non-finite in the weights \(validation scores\) \(epoch 1\).*no checkpoint"):
        train.main(tiny + ["--out-dir", str(tmp_path / "run")])
