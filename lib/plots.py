"""
Pictures with pillow alone (no matplotlib: the design card's packages): the few chart types analysis.py
needs, each a function that takes numbers and writes one PNG.

    heatmap(path, mean_w (L, E), variability (L,), ...)    labels x experts, values in the cells, a colour bar
    shared_vs_task(path, gate statistics, ...)             0..1 bars per label, two per label
    curves(path, log, ...)                                 per-epoch lines, one panel per quantity
    routing(path, routers, ...)                            each router's load per expert over the epochs
    heterogeneity(path, test, ...)                         a labelled scatter around a zero line
    label_noise(path, classes, positives, series, ...)     per label, one bar per series (noise.py)
    seed_dots(path, rows, ...)                             per configuration, one dot per seed (compare.py)
    cost_scatter(path, points, ...)                        mean +- std against a cost, labelled (sweet spot, ML-VPT)

Every chart has a title, axis labels, the label names and, where colour encodes a value, a colour scale.
The scale is viridis (perceptually ordered, readable in grey and by colour-blind readers).
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FG, GRID, MUTED = (30, 30, 30), (225, 225, 225), (120, 120, 120)   # ink, grid lines, secondary text
# viridis at 5 stops, interpolated linearly between them: close enough to the full map for a legend
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)
# Line and bar colours, one per series: matplotlib's default cycle, which readers already know how to read.
SERIES = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def font(size: int):
    """Pillow's own font (no font file to find on a fresh machine), at `size` px where Pillow can scale it."""
    try:
        return ImageFont.load_default(size=size)       # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()                # older Pillow: the fixed bitmap font


def colour(v: float, lo: float, hi: float):
    """v in [lo, hi] -> an RGB tuple on the viridis scale (values outside are clipped to its ends)."""
    # t in [0, 4]: which pair of stops v falls between (i) and how far along (t - i)
    t = 0.0 if hi <= lo else min(max((v - lo) / (hi - lo), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    return tuple(int(c) for c in VIRIDIS[i] + (t - i) * (VIRIDIS[i + 1] - VIRIDIS[i]))


def nice_ticks(lo: float, hi: float, n: int = 5):
    """About n round tick values covering [lo, hi]."""
    # A flat series (one epoch, or equal values) has no range: widen it, else log10(0) below would fail.
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        hi = lo + 1
    # The step is the "round" number (1, 2, 2.5 or 5 times a power of ten) closest to the range / n.
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(s - raw))
    # Whole multiples of the step from just below lo to just above hi; axes() drops those outside its limits.
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def axes(img, box, xlim, ylim, xlabel, ylabel, title, xticks=None, yticks=None, fmt="{:g}", subtitle=None,
         xtext=None):
    """Frame, grid, ticks and labels in pixel box (x0, y0, x1, y1) of img -> to_px(x, y). xtext(t): an x
    tick's text where it is not its position (a log axis: the position is log10 of the value shown)."""
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    # Data -> pixels: x grows to the right, y grows *up* (pixel rows grow down, hence y1 - ...).
    to_px = lambda x, y: (x0 + (x - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0),
                          y1 - (y - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0))
    f = font(12)
    # Pillow's anchors: horizontal then vertical letter ("rm": a tick label's right middle at xy).
    for t in yticks if yticks is not None else nice_ticks(*ylim):
        if ylim[0] <= t <= ylim[1]:
            y = to_px(xlim[0], t)[1]
            draw.line([(x0, y), (x1, y)], fill=GRID)
            draw.text((x0 - 6, y), fmt.format(t), fill=FG, font=f, anchor="rm")
    for t in xticks if xticks is not None else nice_ticks(*xlim):
        if xlim[0] <= t <= xlim[1]:
            x = to_px(t, ylim[0])[0]
            draw.line([(x, y0), (x, y1)], fill=GRID)
            draw.text((x, y1 + 6), xtext(t) if xtext else fmt.format(t), fill=FG, font=f, anchor="mt")
    draw.rectangle(box, outline=FG)
    draw.text(((x0 + x1) / 2, y1 + 26), xlabel, fill=FG, font=font(13), anchor="mt")
    draw.text((x0, y0 - (26 if subtitle else 8)), title, fill=FG, font=font(15), anchor="ld")
    if subtitle:                                                        # a second, quieter line under the title
        draw.text((x0, y0 - 8), subtitle, fill=MUTED, font=font(12), anchor="ld")
    # the y label, sideways on its own small image pasted left of the ticks (ImageDraw.text has no angle)
    lab = Image.new("RGB", (int(y1 - y0), 18), "white")
    ImageDraw.Draw(lab).text((lab.width / 2, 9), ylabel, fill=FG, font=font(13), anchor="mm")
    img.paste(lab.rotate(90, expand=True), (int(x0 - 62), int(y0)))
    return to_px


def title_text(draw, xy, text: str, width: int, size: int = 16, lines: int = 2):
    """A title wrapped at word boundaries to `width` pixels, at most `lines` lines (the last one cut with an
    ellipsis): a run folder's path or a list of differences does not run off the picture's edge."""
    fnt, words, rows = font(size), text.split(" "), [""]
    for w in words:
        trial = f"{rows[-1]} {w}".strip()
        if rows[-1] and draw.textlength(trial, font=fnt) > width:
            rows.append(w)
        else:
            rows[-1] = trial
    if len(rows) > lines:
        rows = rows[:lines]
        while rows[-1] and draw.textlength(rows[-1] + " ...", font=fnt) > width:
            rows[-1] = rows[-1][:-1]
        rows[-1] += " ..."
    for k, row in enumerate(rows):
        draw.text((xy[0], xy[1] + k * (size + 4)), row, fill=FG, font=fnt)


def legend(draw, xy, items):
    """items [(name, rgb)] as coloured squares with names, one per line, from xy."""
    x, y = xy
    for name, rgb in items:
        draw.rectangle([x, y, x + 12, y + 12], fill=rgb)
        draw.text((x + 18, y + 6), name, fill=FG, font=font(12), anchor="lm")
        y += 18


def heatmap(path, mean_w, variability, classes, experts, num_shared, title):
    """labels x experts mean gate weights, values in the cells, variability bars beside, colour bar below."""
    L, E = mean_w.shape   # mean_w (L, E): one row per label, one column per expert slot (shared first)
    # Layout in pixels: cell width/height, room on the left for label names, room on top for the
    # expert names, the shared/task bands and the title. Cells are wide enough for "0.00" in 11 px.
    cw, ch, left, top = 64, 22, 150, 130
    bar_x = left + E * cw + 40                                          # variability column
    # 230 px right of it: the longest bar (150 px) and its value; 110 px below the cells: the colour bar and notes.
    img = Image.new("RGB", (bar_x + 230, top + L * ch + 110), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 18), title, fill=FG, font=font(16))
    # The colour scale starts at 0, not at the smallest weight, and is the same for every label, so a
    # colour means one weight everywhere; it ends at the largest weight rounded up to 0.1 (the rows sum to
    # 1 over E experts, so most weights sit near 1/E and a 0..1 scale would wash them out).
    hi = max(0.1, math.ceil(mean_w.max() * 10) / 10)
    for j, name in enumerate(experts):                                  # column headers and group bands
        d.text((left + j * cw + cw / 2, top - 8), name, fill=FG, font=font(12), anchor="md")
    for lo, hi_j, name in ((0, num_shared, "shared"), (num_shared, E, "task")):
        if hi_j > lo:
            d.line([(left + lo * cw + 3, top - 30), (left + hi_j * cw - 3, top - 30)], fill=FG, width=2)
            d.text((left + (lo + hi_j) * cw / 2, top - 36), name, fill=FG, font=font(12), anchor="md")
    d.text((left + E * cw / 2, top - 60), "expert", fill=FG, font=font(13), anchor="md")
    d.text((20, top - 8), "label", fill=FG, font=font(13), anchor="ld")
    # Variability (L,) is a std of weights in [0, 1]; its bars are scaled to the largest one (1e-6: a
    # static gate has variability 0 everywhere, and the bars then have zero length instead of NaN).
    vmax = max(1e-6, float(np.nanmax(variability)))
    for l, c in enumerate(classes):
        y = top + l * ch
        d.text((left - 8, y + ch / 2), c, fill=FG, font=font(12), anchor="rm")
        for j in range(E):
            rgb = colour(mean_w[l, j], 0, hi)
            d.rectangle([left + j * cw, y, left + (j + 1) * cw - 1, y + ch - 1], fill=rgb)
            # viridis runs dark to light, so the ink flips at a channel sum of 380 (of 765: about mid-grey)
            ink = FG if sum(rgb) > 380 else (255, 255, 255)             # dark text on light cells
            # The number in the cell: colours are for seeing patterns, numbers for checking (analysis.json).
            d.text((left + j * cw + cw / 2, y + ch / 2), f"{mean_w[l, j]:.2f}", fill=ink, font=font(11), anchor="mm")
        w = 150 * variability[l] / vmax   # bars relative to the most variable label; the value is written beside
        d.rectangle([bar_x, y + 4, bar_x + w, y + ch - 5], fill=SERIES[0])
        d.text((bar_x + w + 4, y + ch / 2), f"{variability[l]:.3f}", fill=FG, font=font(11), anchor="lm")
    if num_shared and num_shared < E:                                   # the shared | task boundary
        d.line([(left + num_shared * cw, top - 4), (left + num_shared * cw, top + L * ch)], fill="white", width=3)
    d.text((bar_x, top - 8), "routing variability", fill=FG, font=font(12), anchor="ld")
    d.text((bar_x, top - 24), "(std over images)", fill=MUTED, font=font(11), anchor="ld")
    # The colour bar: one 1-px line per pixel column under the cells, so its width equals the matrix's
    # and a cell's colour can be read off directly below it.
    y = top + L * ch + 30                                               # colour bar
    for k in range(E * cw):
        d.line([(left + k, y), (left + k, y + 14)], fill=colour(k / (E * cw - 1) * hi, 0, hi))
    for t in nice_ticks(0, hi, 4):
        # nice_ticks may overshoot hi; the 1e-9 keeps a tick at hi itself despite rounding
        if t <= hi + 1e-9:
            x = left + t / hi * (E * cw - 1)
            d.line([(x, y + 14), (x, y + 19)], fill=FG)
            d.text((x, y + 21), f"{t:g}", fill=FG, font=font(11), anchor="mt")
    d.text((left, y + 40), "mean gate weight over the split (each row sums to 1)", fill=FG, font=font(12))
    d.text((left, y + 58), "shared: experts every label uses; task: the label's task-specific experts", fill=MUTED, font=font(12))
    img.save(path)


def shared_vs_task(path, stats, classes, title):
    """Per label (and overall): its mass on shared experts on the images that contain it, alone (single-label
    images) or with other labels (multi-label images), as 0..1 bars."""
    # stats: analysis.gate_statistics(...) — "overall" and "per_label"[name], each a dict of masses.
    # "all labels" comes first and is separated by a rule: it is the summary a reader looks at first.
    rows = [("all labels", stats["overall"])] + [(c, stats["per_label"][c]) for c in classes]
    left, top, width, rh = 150, 90, 420, 30   # name column, title room, bar length for a mass of 1, row height
    img = Image.new("RGB", (left + width + 260, top + len(rows) * rh + 80), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 18), title, fill=FG, font=font(16))
    kinds = (("shared_mass_present_single", "label alone in the image", SERIES[0]),
             ("shared_mass_present_multi", "label with other labels", SERIES[1]))
    for t in (0, 0.25, 0.5, 0.75, 1.0):   # a fraction of the mass: always the full 0..1 axis, never zoomed
        x = left + t * width
        d.line([(x, top - 4), (x, top + len(rows) * rh)], fill=GRID)
        d.text((x, top + len(rows) * rh + 6), f"{t:g}", fill=FG, font=font(11), anchor="mt")
    for i, (name, s) in enumerate(rows):
        y = top + i * rh
        d.text((left - 8, y + rh / 2), name, fill=FG, font=font(12 if i else 13), anchor="rm")
        for k, (key, _, rgb) in enumerate(kinds):
            yy = y + 3 + k * 12   # two thin bars per row: single-label images above, multi-label below
            v = s[key]
            # Filled up to v (the shared mass), outlined from v to 1 (the rest, on its task-specific
            # experts): the two parts of one bar add up to the whole mass, which is what a reader checks.
            if v == v:                                                  # NaN: no such image in the split
                d.rectangle([left, yy, left + v * width, yy + 10], fill=rgb)
                d.rectangle([left + v * width, yy, left + width, yy + 10], outline=rgb)
                d.text((left + width + 6, yy + 5), f"{v:.2f}", fill=FG, font=font(11), anchor="lm")
        if i == 0:
            d.line([(left - 140, y + rh), (left + width + 50, y + rh)], fill=MUTED)
    d.text((left + width / 2, top + len(rows) * rh + 24), "mass on shared experts (the rest goes to its task-specific experts)",
           fill=FG, font=font(13), anchor="mt")
    legend(d, (left + width + 60, top), [(n, rgb) for _, n, rgb in kinds])
    d.text((left + width + 60, top + 44), "filled: shared experts", fill=FG, font=font(12))
    d.text((left + width + 60, top + 60), "outlined: task-specific", fill=FG, font=font(12))
    d.text((left + width + 60, top + 76), "(images that contain", fill=MUTED, font=font(11))
    d.text((left + width + 60, top + 90), "the label; no bar: none)", fill=MUTED, font=font(11))
    # The heatmap shows each expert apart; a bar here sums the S shared ones, so it sits higher than any cell.
    d.text((left + width + 60, top + 112), "a bar sums the S shared", fill=MUTED, font=font(11))
    d.text((left + width + 60, top + 126), "experts' weights; the heat-", fill=MUTED, font=font(11))
    d.text((left + width + 60, top + 140), "map shows each one apart", fill=MUTED, font=font(11))
    img.save(path)


def curves(path, log, threshold, title):
    """Training loss, validation mAP and the mass per expert slot against the epoch."""
    # log: analysis.read_log(log.jsonl) — "epoch" and one list per quantity, None where an epoch has none
    # (e.g. no validation). One panel per quantity, stacked, all on the same epoch axis.
    panels = [("train_loss", "training loss")] + [("val_mAP", "validation mAP")]
    if "expert_mass" in log:   # only a head gate's log has expert masses (none for other models)
        panels.append(("expert_mass", "mass per expert slot"))
    W, ph = 620, 230
    img = Image.new("RGB", (W + 200, 60 + len(panels) * (ph + 90)), "white")
    d = ImageDraw.Draw(img)
    title_text(d, (20, 10), title, img.width - 40)
    ep = log["epoch"]
    # half an epoch of air, so the first and last points are off the frame
    xlim = (min(ep) - 0.5, max(ep) + 0.5)
    for p, (key, name) in enumerate(panels):
        box = (100, 80 + p * (ph + 90), W, 80 + p * (ph + 90) + ph)
        # A panel draws one or more series: the loss alone; validation mAP of the raw and the EMA weights
        # (log keys val_mAP_raw / val_mAP_ema -> "raw" / "ema"); the mass of every expert slot.
        series = ({"train": log["train_loss"]} if key == "train_loss" else
                  {k[8:]: v for k, v in log.items() if k.startswith("val_mAP_")} if key == "val_mAP" else log[key])
        vals = [v for s in series.values() for v in s if v is not None]
        # Loss and mAP are zoomed to their data (their trend is the point); the expert mass is a share
        # of 1 and keeps the full 0..1 axis, so that a slot near the collapse line looks near it.
        lo, hi = (0.0, 1.0) if key == "expert_mass" else (min(vals), max(vals))
        pad = 0.05 * (hi - lo or 1)
        ylim = (lo, hi) if key == "expert_mass" else (lo - pad, hi + pad)
        to_px = axes(img, box, xlim, ylim, "epoch", name, name,
                     xticks=range(1, max(ep) + 1, max(1, math.ceil(max(ep) / 10))))   # whole epochs
        for k, (sname, s) in enumerate(series.items()):
            # An epoch without the value (None) has no point to plot: skipped, the line joins its neighbours.
            pts = [to_px(e, v) for e, v in zip(ep, s) if v is not None]
            d.line(pts, fill=SERIES[k % len(SERIES)], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SERIES[k % len(SERIES)])
        if key == "expert_mass":   # dashed: the collapse warning's threshold (train.py --collapse-threshold)
            y = to_px(xlim[0], threshold)[1]
            # ImageDraw.line has no dash style: 6 px drawn, 6 px left out
            for x in range(box[0], box[2], 12):
                d.line([(x, y), (x + 6, y)], fill=SERIES[3], width=1)
            d.text((box[2] - 4, y - 3), f"collapse warning above {threshold:g}", fill=SERIES[3], font=font(11), anchor="rd")
        legend(d, (W + 20, box[1]), [(n, SERIES[k % len(SERIES)]) for k, n in enumerate(series)])
    img.save(path)


def routing(path, routers, threshold, title):
    """routing.png: one panel per router, each expert's share of its rows against the epoch (lib/routing.py).

    routers: {router name: {"epoch": [...], "load": {expert name: [share per epoch]}}} (analysis.read_routers)."""
    W, ph = 620, 200
    img = Image.new("RGB", (W + 200, 60 + len(routers) * (ph + 90)), "white")
    d = ImageDraw.Draw(img)
    title_text(d, (20, 10), title, img.width - 40)
    for p, (name, r) in enumerate(routers.items()):
        box = (100, 80 + p * (ph + 90), W, 80 + p * (ph + 90) + ph)
        ep = r["epoch"]
        xlim = (min(ep) - 0.5, max(ep) + 0.5)
        # A share of 1: the full 0..1 axis, so that an expert near the collapse line looks near it.
        to_px = axes(img, box, xlim, (0.0, 1.0), "epoch", "share of rows", f"{name}: load per expert",
                     xticks=range(1, max(ep) + 1, max(1, math.ceil(max(ep) / 10))))
        for k, (expert, s) in enumerate(r["load"].items()):
            pts = [to_px(e, v) for e, v in zip(ep, s)]
            d.line(pts, fill=SERIES[k % len(SERIES)], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SERIES[k % len(SERIES)])
        # dashed: the collapse warning's threshold and the fair share 1/E (a balanced router sits on it)
        fair = 1 / len(r["load"])
        for level, text, rgb in ((threshold, f"collapse warning above {threshold:g}", SERIES[3]),
                                 (fair, f"fair share 1/E = {fair:.2g}", MUTED)):
            y = to_px(xlim[0], level)[1]
            for x in range(box[0], box[2], 12):   # ImageDraw.line has no dash style: 6 px drawn, 6 left out
                d.line([(x, y), (x + 6, y)], fill=rgb, width=1)
            d.text((box[2] - 4, y - 3), text, fill=rgb, font=font(11), anchor="rd")
        items = list(r["load"])
        shown = items[:8] + ([f"... {len(items) - 8} more"] if len(items) > 8 else [])   # a legend that fits
        legend(d, (W + 20, box[1]), [(n, SERIES[k % len(SERIES)]) for k, n in enumerate(shown)])
    img.save(path)


def heterogeneity(path, het, title):
    """AP gain of this model over the other against each label's heterogeneity: one panel per score
    (context, and visual when the features were there), names beside the points."""
    # het: analysis.heterogeneity_test(...) — per_label {name: gain, heterogeneity, visual_heterogeneity},
    # the context test's rho/p at the top level and the visual test's under "visual".
    pl = het["per_label"]
    fixed = het.get("given_headroom", {})   # the same tests with headroom held fixed (analysis.partial_spearman)
    panels = [("heterogeneity", het, fixed.get("context"), "context heterogeneity (entropy of co-occurrence, 0..1)")]
    if np.isfinite([v["visual_heterogeneity"] for v in pl.values()]).any():
        panels.append(("visual_heterogeneity", het["visual"], fixed.get("visual"),
                       "visual heterogeneity (the label's feature variance / the split's; >1: more varied)"))
    pw = 560                                                            # one panel's width
    img = Image.new("RGB", (60 + len(panels) * (pw + 60), 680), "white")
    d = ImageDraw.Draw(img)
    title_text(d, (20, 4), title, img.width - 40, lines=2)
    d.text((20, 46), f"mean gain {het['mean_gain']:+.2f} AP over {len(pl)} labels; green: this model better on "
           "the label, red: worse", fill=FG, font=font(13))
    gains = np.array([v["gain"] for v in pl.values()])
    # Symmetric about 0, so that a gain and a loss of the same size look the same size; one y scale for both.
    span = max(1.0, float(np.nanmax(np.abs(gains))) if np.isfinite(gains).any() else 1.0) * 1.1
    for k, (key, test, partial, xlabel) in enumerate(panels):
        # Labels without a score (no positive image in the split) or without an AP are left out, as in
        # the Spearman test itself, so the points drawn are exactly the ones the rho is computed on.
        names = [c for c in pl if np.isfinite(pl[c][key]) and np.isfinite(pl[c]["gain"])]
        xs, ys = np.array([pl[c][key] for c in names]), np.array([pl[c]["gain"] for c in names])
        xlo, xhi = (float(xs.min()), float(xs.max())) if len(xs) else (0.0, 1.0)
        # 8 % of air each side; `or 1`: one point (or equal ones) has no range
        pad = 0.08 * (xhi - xlo or 1)
        x0 = 110 + k * (pw + 60)
        # Under the test, the same test with headroom held fixed (a label at 99 AP cannot gain 5 points).
        sub = (f"with headroom (100 - other's AP) held fixed: rho = {partial['spearman_rho']:+.2f}, "
               f"p = {partial['p_value']:.3f}") if partial else None
        to_px = axes(img, (x0, 120, x0 + pw - 60, 590), (xlo - pad, xhi + pad), (-span, span), xlabel,
                     "AP gain (points)", f"Spearman rho = {test['spearman_rho']:+.2f}, p = {test['p_value']:.3f}",
                     subtitle=sub)
        # the zero line: above it the model gains on the label, below it loses
        y0 = to_px(0, 0)[1]
        d.line([(x0, y0), (x0 + pw - 60, y0)], fill=MUTED, width=2)
        pts = [to_px(x, y) for x, y in zip(xs, ys)]
        # Boxes a name must not cover, with the air to keep on each side: every point (none: a name sits
        # right beside its own), then each name as it is drawn (12 px, so two never read as one).
        placed = [(px - 4, py - 4, px + 4, py + 4, 0) for px, py in pts]
        for c, y, (px, py) in zip(names, ys, pts):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=SERIES[2] if y >= 0 else SERIES[3])
            # Label names collide where points cluster. Try the name beside its point, then one, two, three
            # lines below or above, and take the first place that covers no point or name so far (greedy,
            # in label order; good enough for 20-80 labels, and the numbers are in analysis.json anyway).
            w = font(11).getlength(c)
            for dy in (0, 12, -12, 24, -24, 36, -36):
                box = (px + 6, py + dy - 6, px + 6 + w, py + dy + 6)
                # Two boxes overlap when they overlap on both axes; b[4] widens an earlier box sideways only.
                if not any(box[0] < b[2] + b[4] and b[0] < box[2] + b[4] and box[1] < b[3] and b[1] < box[3]
                           for b in placed):
                    break
            placed.append(box + (12,))
            if dy:   # a thin leader line from the point to its displaced name
                d.line([(px + 4, py), (box[0], box[1] + 6)], fill=MUTED)
            d.text((box[0], box[1] + 6), c, fill=FG, font=font(11), anchor="lm")
    img.save(path)


def label_noise(path, classes, positives, series, title, subtitle=None):
    """Per label, the std of its AP over runs, one bar per series (e.g. per model): where the seed noise is.

    classes (L,) names; positives (L,) test positives per label, printed beside the name (rare labels are
    the usual suspects); series {name: (L,) std in AP points}. Labels sorted by positives, rarest first.
    """
    order = np.argsort(positives)
    names = list(series)
    # The axis must fit the largest std of any series; * 1.1 below leaves room for the value after that bar.
    top_v = max(float(np.nanmax(v)) for v in series.values())
    left, top, width = 190, 90, 460
    rh = 8 + 11 * len(names)                                  # one thin bar per series, stacked in the row
    img = Image.new("RGB", (left + width + 200, top + len(classes) * rh + 80), "white")
    # yticks=[]: the rows are labels, named at the left, not numbers on an axis
    to_px = axes(img, (left, top, left + width, top + len(classes) * rh), (0, top_v * 1.1), (0, len(classes)),
                 "std of the label's AP over runs (AP points)", "", title, yticks=[], subtitle=subtitle)
    d = ImageDraw.Draw(img)
    for row, l in enumerate(order):
        y = top + row * rh
        d.text((left - 8, y + rh / 2), f"{classes[l]} ({positives[l]})", fill=FG, font=font(12), anchor="rm")
        for k, name in enumerate(names):
            v = float(series[name][l])
            yy = y + 4 + k * 11
            d.rectangle([left, yy, to_px(v, 0)[0], yy + 9], fill=SERIES[k % len(SERIES)])
            d.text((to_px(v, 0)[0] + 4, yy + 4), f"{v:.2f}", fill=FG, font=font(10), anchor="lm")
    legend(d, (left + width + 20, top), [(n, SERIES[k % len(SERIES)]) for k, n in enumerate(names)])
    d.text((left + width + 20, top + 18 * len(names) + 8), "(n) = test positives", fill=MUTED, font=font(11))
    img.save(path)


def routing_clusters(path, table, cluster_names, reference_names, title, subtitle=None):
    """The clusters x reference contingency table as a heatmap: colour = the share of the cluster's images
    in each reference class (rows sum to 1), the count written in the cell, the cluster's size beside."""
    table = np.asarray(table, dtype=float)
    K, R = table.shape
    cw, ch, left, top = 84, 28, 120, 110
    notes = ("colour: share of the cluster's images in each column (rows sum to 1); number: images",
             "a routing that found the columns has one bright cell per row")   # fit them, even under few columns
    need = left + max(font(12).getlength(n) for n in notes) + 20
    img = Image.new("RGB", (int(max(left + R * cw + 120, need)), top + K * ch + 90), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 18), title, fill=FG, font=font(16))
    if subtitle:
        d.text((20, 42), subtitle, fill=MUTED, font=font(12))
    # the max(., 1) leaves an empty cluster's row at 0 instead of 0 / 0 = NaN
    share = table / np.maximum(table.sum(1, keepdims=True), 1)          # (K, R): row-normalised
    for j, name in enumerate(reference_names):
        d.text((left + j * cw + cw / 2, top - 8), name, fill=FG, font=font(12), anchor="md")
    for i, name in enumerate(cluster_names):
        y = top + i * ch
        d.text((left - 8, y + ch / 2), name, fill=FG, font=font(12), anchor="rm")
        for j in range(R):
            rgb = colour(share[i, j], 0, 1)
            d.rectangle([left + j * cw, y, left + (j + 1) * cw - 1, y + ch - 1], fill=rgb)
            ink = FG if sum(rgb) > 380 else (255, 255, 255)
            d.text((left + j * cw + cw / 2, y + ch / 2), f"{int(table[i, j])}", fill=ink, font=font(11), anchor="mm")
        d.text((left + R * cw + 8, y + ch / 2), f"{int(table[i].sum())} images", fill=MUTED, font=font(11), anchor="lm")
    d.text((left - 8, top - 8), "cluster", fill=FG, font=font(13), anchor="rd")
    y = top + K * ch + 16
    d.text((left, y), notes[0], fill=FG, font=font(12))
    d.text((left, y + 18), notes[1], fill=MUTED, font=font(12))
    img.save(path)


def seed_dots(path, rows, title, subtitle=None, xlabel="test mAP"):
    """One row per configuration: a dot per seed, coloured by seed (seed k has one colour in every row, so a
    seed that is hard for every model shows as one colour at the left of each row: what pairing removes),
    the mean as a black tick and mean +- std as a grey bar. rows [(name, {seed: value})]."""
    seeds = sorted({s for _, v in rows for s in v})
    vals = [x for _, v in rows for x in v.values()]
    spread = [np.mean(list(v.values())) + sgn * (np.std(list(v.values()), ddof=1) if len(v) > 1 else 0)
              for _, v in rows for sgn in (-1, 1)]   # the std bars must fit too
    lo, hi = min(vals + spread), max(vals + spread)
    pad = 0.08 * (hi - lo or 1)
    left, top, width, rh = 190, 80, 520, 26
    img = Image.new("RGB", (left + width + 210, top + rh * len(rows) + 70), "white")
    to_px = axes(img, (left, top, left + width, top + rh * len(rows)), (lo - pad, hi + pad), (0, len(rows)),
                 xlabel, "", title, yticks=[], subtitle=subtitle)
    d = ImageDraw.Draw(img)
    for i, (name, v) in enumerate(rows):
        y = top + (i + 0.5) * rh
        d.text((left - 8, y), name, fill=FG, font=font(12), anchor="rm")
        x = np.array(list(v.values()))
        # ddof=1: the sample std over seeds, as compare.py's tables give it; one seed has none (no bar)
        m, sd = x.mean(), (x.std(ddof=1) if len(x) > 1 else 0.0)
        d.rectangle([to_px(m - sd, 0)[0], y - 3, to_px(m + sd, 0)[0], y + 3], fill=GRID)
        d.line([(to_px(m, 0)[0], y - 9), (to_px(m, 0)[0], y + 9)], fill=FG, width=2)
        for s, val in v.items():
            px = to_px(val, 0)[0]
            d.ellipse([px - 4, y - 4, px + 4, y + 4], fill=SERIES[seeds.index(s) % len(SERIES)])
    legend(d, (left + width + 20, top), [(f"seed {s}", SERIES[k % len(SERIES)]) for k, s in enumerate(seeds)]
           + [("mean +- std", GRID)])
    img.save(path)


def cost_scatter(path, points, xlabel, ylabel, title, subtitle=None, log_x=False):
    """Labelled points with vertical error bars: points [(x, y, yerr, label, series name)], one colour per
    series (e.g. the placement). For "accuracy against activated parameters" pictures."""
    series = list(dict.fromkeys(p[4] for p in points))
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs = [fx(p[0]) for p in points]
    # ys: the ends of the error bars, so that the y range holds the bars too
    ys = [p[1] + sgn * p[2] for p in points for sgn in (-1, 1)]
    xpad, ypad = 0.1 * (max(xs) - min(xs) or 1), 0.1 * (max(ys) - min(ys) or 1)
    xticks = xtext = None
    if log_x:   # ticks at 1, 2, 5 x 10^e, placed at their log10 and labelled with the value itself
        e = range(math.floor(min(xs)) - 1, math.ceil(max(xs)) + 1)
        xticks, xtext = [math.log10(m * 10.0 ** k) for k in e for m in (1, 2, 5)], lambda t: f"{10 ** t:g}"
    left, top, w, h = 90, 80, 620, 420
    img = Image.new("RGB", (left + w + 250, top + h + 70), "white")
    to_px = axes(img, (left, top, left + w, top + h), (min(xs) - xpad, max(xs) + xpad),
                 (min(ys) - ypad, max(ys) + ypad), xlabel, ylabel, title, xticks, subtitle=subtitle, xtext=xtext)
    d = ImageDraw.Draw(img)
    # Points at (nearly) one x: every top-1 MoE activates about what the dense model does (2.72 vs 2.73 M),
    # so their error bars would overlap. Each cluster (points within 10 px of the cluster's first, in x
    # order) is spread 12 px apart, centred on where it was, so no point moves further than it must.
    px = [to_px(fx(p[0]), p[1])[0] for p in points]
    clusters = []
    for k in sorted(range(len(points)), key=lambda k: px[k]):
        if clusters and px[k] - px[clusters[-1][0]] < 10:
            clusters[-1].append(k)
        else:
            clusters.append([k])
    shift = {k: 12 * (j - (len(c) - 1) / 2) for c in clusters for j, k in enumerate(sorted(c))}
    drawn = []   # (x, y, y of the bar's top, y of its bottom) in pixels, for the labels to avoid
    for k, (x, y, e, label, ser) in enumerate(points):
        rgb = SERIES[series.index(ser) % len(SERIES)]
        cx, cy = px[k] + shift[k], to_px(fx(x), y)[1]
        bar_top, bar_bottom = to_px(fx(x), y + e)[1], to_px(fx(x), y - e)[1]
        d.line([(cx, bar_top), (cx, bar_bottom)], fill=rgb, width=2)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=rgb)
        drawn.append((cx, cy, bar_top, bar_bottom))
    # Labels after all markers, so none is painted over: right of the point, else a line lower or higher,
    # else on its left; the first spot whose box (about 55 x 11 px) meets no earlier label, no other marker
    # and no other error bar.
    boxes = []   # (x from, x to, y centre) of each label drawn

    def free(x0, x1, y, own):
        if any(abs(y - by) < 11 and x0 < bx1 and bx0 < x1 for bx0, bx1, by in boxes):
            return False
        others = [p for i, p in enumerate(drawn) if i != own]
        return not any(x0 - 6 < cx < x1 + 6 and (abs(y - cy) < 10 or y0 - 5 < y < y1 + 5) for cx, cy, y0, y1 in others)

    for k, (cx, cy, _, _) in enumerate(drawn):
        spots = [(cx + 8, cx + 63, cy + dy) for dy in (0, 12, -12, 24, -24, 36, -36)] + \
                [(cx - 63, cx - 8, cy + dy) for dy in (0, 12, -12)]
        # no spot free: the label goes right of the point anyway
        spot = next((s for s in spots if free(*s, k)), spots[0])
        d.text((spot[0], spot[2]), points[k][3], fill=FG, font=font(11), anchor="lm")
        boxes.append(spot)
    legend(d, (left + w + 20, top), [(n, SERIES[k % len(SERIES)]) for k, n in enumerate(series)]
           # a white square on white: a note in the legend's column, without a colour of its own
           + [("bar: +- std over seeds", MUTED), ("(nearly equal x: dodged sideways)", (255, 255, 255))])
    img.save(path)
