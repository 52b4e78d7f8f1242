"""
Your own multi-label dataset, in the formats labelling tools export: a CSV per split, or COCO-style json.
Each reader turns label files into (paths, targets (N, L) in {1, 0, -1}, ids, classes); data.py wraps them
in the same ImageList and transforms as VOC and COCO, so every model, flag and metric works unchanged.

--dataset csv --data-root DIR
    DIR/train.csv, DIR/test.csv, optionally DIR/val.csv and DIR/classes.txt (one class name per line; its
    order is the label order; without it, the sorted names of train.csv's labels or columns). Each CSV has a
    header with a column `image` (a path relative to DIR, or absolute) and either
      - a column `labels`: class names separated by spaces or '|' (an empty cell: no label), or
      - one column per class holding 1 (present), 0 (absent) or -1 (unknown: ignored by every metric and
        by the loss, as VOC's difficult), the one-hot export of labelling tools.
    No val.csv: the best epoch is chosen on a held-out part of train.csv (holdout(): 10 % of its rows, at
    least one, drawn by a generator seeded with 0, the same for every --seed, so runs that differ only
    in --seed are judged on the same images), never on test.

--dataset cocojson --data-root DIR
    DIR/train.json, DIR/val.json, optionally DIR/test.json, in COCO's instances format (images,
    annotations, categories: what CVAT, Label Studio and others export); file_names relative to DIR or to
    DIR/images. The reader is read_coco_json, which --dataset coco uses too. With test.json, val.json
    picks the best epoch; without it, val.json is the test split (as COCO's own val) and the best epoch
    is chosen on 10 % held out of train.json, as for csv without val.csv: never on the tested images.

Every mistake is found here, at start-up, and named in one line with the file and the line (a CSV's
header is line 1) or the json entry: a missing image, a label not in classes.txt, an image listed twice
with different labels (listed twice with the same labels: read once), a row with the wrong number of
fields, an empty split, a one-hot cell other than 0, 1, -1, a file that is not UTF-8, a json entry
without its keys or listed twice, a split whose classes differ from training's. In a `labels` cell the
names are split on '|' when the cell holds one (so names may contain spaces), else on whitespace.
"""
import csv
import json
import os

import numpy as np

# the split names data.build_dataset accepts for csv and cocojson
OWN_SPLITS = ("train", "val", "test")
HOLDOUT_FRACTION = 0.1   # of train.csv / train.json, when there is no val file


class DatasetError(RuntimeError):
    """The data is missing, incomplete or unreadable. Scripts print the message (never a traceback):
    it says where we looked, what we expected and how to get it."""


def check_images(folders, names, listed_in, how):
    """Each listed file must exist in one of `folders` (tried in order; an absolute name as it is): a
    half-extracted archive or a typo fails here, at start-up, not in a DataLoader worker."""
    folders = [folders] if isinstance(folders, str) else list(folders)
    # One os.listdir per folder, then a set lookup per name: a split of many thousand images costs a few
    # system calls instead of one stat per image per folder tried.
    listing = {f: set(os.listdir(f)) if os.path.isdir(f) else set() for f in folders}
    paths, missing = [], []
    for n in names:
        if os.path.isabs(n) or os.sep in n or "/" in n:   # a sub-path: ask the file system
            found = next((os.path.join(f, n) for f in folders if os.path.isfile(os.path.join(f, n))), None)
        else:                                              # a bare name: the listings, one os.listdir each
            found = next((os.path.join(f, n) for f in folders if n in listing[f]), None)
        # Missing names are collected, not raised at once: the message counts them all (a typo vs a lost folder)
        if found is None:
            missing.append(n)
        paths.append(found)
    if missing:
        raise DatasetError(f"{len(missing)} of {len(names)} images listed in {listed_in} are missing (e.g. "
                           f"{missing[:3]}; looked in {', '.join(folders)}); {how}")
    return paths


def read_coco_json(ann, folders, empty="keep", how="", classes=None):
    """A COCO instances json -> (paths, targets (N, L), ids, class names in category-id order).

    A category is a label if any instance of it is annotated, crowd instances included. Images with no
    annotation at all are all-negative rows (empty="keep", as Q2L) or left out (empty="drop", as ML-GCN's
    lists). classes: the training split's names; another split must have the same categories."""
    try:
        with open(ann) as fh:
            js = json.load(fh)
        images, anns, cats = js["images"], js["annotations"], js["categories"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann} is not valid JSON ({e}); a truncated file? {how}") from None
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{ann} is not a COCO instances file: it needs top-level 'images', 'annotations' and "
                           f"'categories' lists ({type(e).__name__}: {e})") from None
    # Every key the reader uses is checked first, so that a malformed entry is named by its index here
    # instead of surfacing as a bare KeyError in the loops below.
    for kind, entries, keys in (("image", images, ("id", "file_name")), ("category", cats, ("id", "name")),
                                ("annotation", anns, ("image_id", "category_id"))):
        for k, e in enumerate(entries):
            gone = [key for key in keys if not isinstance(e, dict) or key not in e]
            if gone:
                raise DatasetError(f"{ann}: {kind} entry {k} ({str(e)[:80]}) has no {gone[0]!r}")
    # A repeated id would be silently merged by the dicts below (row, col keep the last entry), and a
    # repeated file_name would put one image in the split twice: both are refused instead.
    for kind, entries, key in (("image", images, "id"), ("image", images, "file_name"), ("category", cats, "id")):
        seen = {}
        for k, e in enumerate(entries):
            if e[key] in seen:
                raise DatasetError(f"{ann}: {kind} entries {seen[e[key]]} and {k} share the {key} {e[key]!r}; "
                                   "each must be listed once")
            seen[e[key]] = k
    cats = sorted(cats, key=lambda c: c["id"])   # ids may have gaps (COCO: 1..90); their order is the label order
    names = [c["name"] for c in cats]
    # Column j must mean the same class in every split, or the model would be scored on the wrong labels.
    if classes is not None and names != list(classes):
        raise DatasetError(f"{ann}: its categories {short(names)} differ from the training split's {short(classes)}")
    # category id -> label column
    col = {c["id"]: j for j, c in enumerate(cats)}
    # The json lists images in no promised order; sorting by id gives the same rows on every machine.
    images = sorted(images, key=lambda im: im["id"])
    if not images:
        raise DatasetError(f"{ann} lists no image: an empty split")
    row = {im["id"]: k for k, im in enumerate(images)}
    # Absent unless some instance says otherwise; several instances of a class in one image are one label.
    targets = np.zeros((len(images), len(cats)), dtype=np.float32)
    for a in anns:   # iscrowd is not looked at: a crowd of people is people
        if a["category_id"] not in col or a["image_id"] not in row:
            raise DatasetError(f"{ann}: annotation {a.get('id')} refers to an unknown "
                               + (f"category id {a['category_id']}" if a["category_id"] not in col
                                  else f"image id {a['image_id']}"))
        targets[row[a["image_id"]], col[a["category_id"]]] = 1.0
    keep = np.arange(len(images)) if empty == "keep" else np.flatnonzero(targets.sum(1) > 0)
    # Only the kept images must exist: a dropped unannotated image may be absent from the folder.
    paths = check_images(folders, [images[k]["file_name"] for k in keep], ann, how)
    return paths, targets[keep], [str(images[k]["id"]) for k in keep], names


def holdout(n: int, fraction=HOLDOUT_FRACTION, seed=0):
    """Rows of a training file -> (train rows, held-out val rows), a seeded random split (numpy PCG64)."""
    # read_own calls this once for train and once for val: the fixed seed makes both calls draw the same
    # permutation, so the two parts are complementary and never share an image.
    order = np.random.default_rng(seed).permutation(n)
    # at least one image to choose the best epoch on
    k = max(1, int(round(fraction * n)))
    if n - k < 1:
        raise DatasetError(f"cannot hold a validation part out of {n} training image(s); add a val file")
    # sorted: each part keeps the file's row order
    return np.sort(order[k:]), np.sort(order[:k])


def _csv_rows(path):
    """(header, [(line number, row)]) of a CSV, every row checked against the header's width."""
    try:
        return _read_csv_rows(path)
    except UnicodeDecodeError as e:   # Excel's "CSV" in cp1252, or not a text file at all
        raise DatasetError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                           "'CSV UTF-8' (Excel) or convert it: iconv -f cp1252 -t utf-8") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV ({e})") from None


def _read_csv_rows(path):
    # newline="": what the csv module asks for, so that a line break inside a quoted cell stays in the cell.
    with open(path, newline="", encoding="utf-8-sig") as fh:   # -sig: Excel's byte-order mark
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{path} is empty: expected a header line with an 'image' column")
        # stripped: "image, labels" (a space after the comma) still names "labels"
        header = [h.strip() for h in header]
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue                                            # a blank line
            if len(row) != len(header):
                raise DatasetError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has "
                                   f"{len(header)} ({','.join(header)}); a comma inside a name needs quotes")
            # reader.line_num, not a row count: the file's own line, right even after a cell that spans lines
            rows.append((reader.line_num, [cell.strip() for cell in row]))
    if "image" not in header:
        raise DatasetError(f"{path}: no 'image' column in the header (found {header}); see docs/own-data.md")
    if not rows:
        raise DatasetError(f"{path} has a header but no image rows: an empty split")
    return header, rows


def split_names(cell: str) -> list:
    """A `labels` cell -> class names: split on '|' when the cell has one (names may then hold spaces,
    "traffic light|car"), else on whitespace ("cat dog")."""
    parts = cell.split("|") if "|" in cell else cell.split()
    return [p.strip() for p in parts if p.strip()]


def short(names, k=10) -> str:
    """A class list for a one-line message: the first k names, then how many more."""
    names = list(names)
    # str(list) minus its closing "]", which comes back after the count of the names left out
    return str(names[:k])[:-1] + (f", ... {len(names) - k} more]" if len(names) > k else "]")


def csv_classes(root):
    """The label order: classes.txt when present, else the sorted union of the names in train.csv."""
    listed = os.path.join(root, "classes.txt")
    if os.path.isfile(listed):
        names = [line.strip() for line in open(listed, encoding="utf-8") if line.strip()]
        # A name listed twice would get two label columns, and a label name could only ever fill one of them.
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or not names:
            raise DatasetError(f"{listed}: " + (f"{dupes} listed twice" if dupes else "no class name"))
        return names
    header, rows = _csv_rows(os.path.join(root, "train.csv"))
    if "labels" in header:
        j = header.index("labels")
        # Sorted, so the label order does not depend on which row happens to name a class first.
        return sorted({n for _, row in rows for n in split_names(row[j])})
    return sorted(h for h in header if h != "image")   # one-hot: the column names, sorted as names would be


def read_csv_split(path, root, classes):
    """One CSV -> (paths, targets (N, L), ids) in the given class order."""
    header, rows = _csv_rows(path)
    col = {c: j for j, c in enumerate(classes)}
    img = header.index("image")
    targets = []
    if "labels" in header:
        lab = header.index("labels")
        for line, row in rows:
            t = np.zeros(len(classes), np.float32)
            for name in split_names(row[lab]):
                if name not in col:
                    where = "classes.txt" if os.path.isfile(os.path.join(root, "classes.txt")) else "train.csv"
                    raise DatasetError(f"{path}, line {line}: label {name!r} is not in {where}'s classes "
                                       f"{short(classes)}; fix the name or add it there")
                t[col[name]] = 1.0
            targets.append(t)
    else:
        columns = [h for h in header if h != "image"]
        # The same set of classes, in any column order: `where` below reorders the columns into the label order.
        if sorted(columns) != sorted(classes):
            raise DatasetError(f"{path}: its class columns {short(columns)} are not the classes {short(classes)}"
                               + (" of classes.txt" if os.path.isfile(os.path.join(root, "classes.txt")) else ""))
        where = [header.index(c) for c in classes]   # column of each class, in the label order
        for line, row in rows:
            # Compared as text: "yes", "1.0" or an empty cell is refused instead of being guessed at.
            bad = [(classes[k], row[j]) for k, j in enumerate(where) if row[j] not in ("0", "1", "-1")]
            if bad:
                raise DatasetError(f"{path}, line {line}, column {bad[0][0]!r}: expected 1, 0 or -1 "
                                   f"(unknown), got {bad[0][1]!r}")
            targets.append(np.array([float(row[j]) for j in where], np.float32))
    # The same image twice: the same labels are read once; different labels are a contradiction.
    first, keep = {}, []
    for k, (line, row) in enumerate(rows):
        name = row[img]
        if not name:
            raise DatasetError(f"{path}, line {line}: the 'image' cell is empty")
        if name in first:
            j = first[name]
            if not np.array_equal(targets[j], targets[k]):
                raise DatasetError(f"{path}, line {line}: image {name!r} is listed again with other labels "
                                   f"than on line {rows[j][0]}; keep one row per image")
            continue
        first[name] = k
        keep.append(k)
    names = [rows[k][1][img] for k in keep]
    # os.path.join(root, n) is n itself when n is absolute: one join serves both kinds of path.
    gone = [k for k, n in zip(keep, names) if not os.path.isfile(os.path.join(root, n))]
    if gone:   # the first one by its line, and how many more: one line, one fix at a time
        n = rows[gone[0]][1][img]
        raise DatasetError(f"{path}, line {rows[gone[0]][0]}: image {n!r} not found (looked at "
                           f"{os.path.join(root, n)}; paths are relative to --data-root or absolute)"
                           + (f"; {len(gone) - 1} more rows name missing images" if len(gone) > 1 else ""))
    paths = [os.path.join(root, n) for n in names]
    # The ids are the names as written in the CSV, one per image (repeats were read once above): evaluate.py
    # --compare-to checks by them that two runs were scored on the same images.
    return paths, np.stack([targets[k] for k in keep]), names


def own_source(kind, root, split) -> str:
    """Where a split of your own data comes from, in words for the start of a run: "test.csv", "10 % held out
    of train.csv", "train.csv less its held-out 10 %", "val.json" (cocojson without test.json tests on it)."""
    ext = "csv" if kind == "csv" else "json"
    has = lambda s: os.path.isfile(os.path.join(root or "", f"{s}.{ext}"))
    val_is_test = kind == "cocojson" and not has("test")
    held_out = val_is_test or not has("val")
    if split == "test":
        return f"val.{ext}" if val_is_test else f"test.{ext}"
    if split == "val":
        return f"{round(100 * HOLDOUT_FRACTION)} % held out of train.{ext}" if held_out else f"val.{ext}"
    return f"train.{ext} less its held-out {round(100 * HOLDOUT_FRACTION)} %" if held_out else f"train.{ext}"


def read_own(kind, root, split, empty="keep"):
    """--dataset csv | cocojson: (paths, targets, ids, classes) of a split, holding out val when needed."""
    if not root or not os.path.isdir(root):
        raise DatasetError(f"--dataset {kind} needs --data-root DIR, a folder holding "
                           + ("train.csv and test.csv" if kind == "csv" else "train.json and val.json")
                           + (f"; {root!r} is not a folder" if root else "") + "; see docs/own-data.md")
    ext = "csv" if kind == "csv" else "json"
    file = lambda s: os.path.join(root, f"{s}.{ext}")
    needed = ("train", "test") if kind == "csv" else ("train",)
    missing = [file(s) for s in needed if not os.path.isfile(file(s))]
    # cocojson needs one file to test on: val.json (COCO's habit) or test.json.
    if kind == "cocojson" and not (os.path.isfile(file("val")) or os.path.isfile(file("test"))):
        missing.append(file("val"))
    if missing:
        raise DatasetError(f"--dataset {kind}: no {' and no '.join(missing)}; see docs/own-data.md")
    source = split
    # cocojson without test.json: val.json is the test split (COCO's habit), so the best epoch cannot be
    # chosen on it too: val is then held out of train.json, as when there is no val file at all.
    val_is_test = kind == "cocojson" and not os.path.isfile(file("test"))
    if split == "test" and val_is_test:
        source = "val"
    held_out = split in ("train", "val") and (val_is_test or not os.path.isfile(file("val")))
    if split == "val" and held_out:
        source = "train"
    if kind == "csv":
        classes = csv_classes(root)
        paths, targets, ids = read_csv_split(file(source), root, classes)
    else:
        # Another split is read against train.json's categories (read here only for them), so that a
        # category missing from it is an error, not a shifted label column.
        classes = read_coco_json(file("train"), [root, os.path.join(root, "images")], empty)[3] if source != "train" else None
        paths, targets, ids, classes = read_coco_json(file(source), [root, os.path.join(root, "images")], empty,
                                                      "file_names are relative to --data-root or to its images/",
                                                      classes)
    if held_out:   # no val file: 10 % of the training file is val, the rest is train (holdout())
        rows = holdout(len(paths))[0 if split == "train" else 1]
        paths, targets, ids = [paths[k] for k in rows], targets[rows], [ids[k] for k in rows]
    return paths, targets, ids, classes
