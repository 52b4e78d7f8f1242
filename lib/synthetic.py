"""
The embedded synthetic benchmark: multi-label images rendered on the fly, no
files, no download. It tests the paper's claim: a gate conditioned on the input
helps most when labels are *heterogeneous*, i.e. recognising them needs
different evidence. Its L = 20 labels come in four groups (LABEL_GROUPS):
  shape, any of 9 colours, solid:    circle, triangle, star, cross ("+"),
                                     ring (disc with a hole), arrow, hourglass, crescent
  colour AND shape, solid square:    red_square, green_square, blue_square,
                                     yellow_square, purple_square
  texture, on an irregular polygon   striped, checkered, dotted, zigzag (chevrons),
    or elongated ellipse, 2 colours: rainbow (a smooth hue sweep)
  small, 7-9 px at 64 px, dark rim:  tiny_diamond, tiny_x
Unlabelled distractors differ from some label in ONE property, so that
property must be looked at: squares in orange/cyan/pink/white (colour), plain
one-colour blobs (texture), pentagons (shape), tiny dots (small shape); night
skies add 1-px stars.

Each image has a latent scene: meadow (olive, vertical streaks), ocean (slate,
waves), desert (tan, diagonal ripples), city (grey, blocks), night (dark blue,
stars). The scene draws 1-3 labels from its column of SCENE_TABLE (below), so
labels co-occur the way objects do in photos. With probability SCENE_CONFUSION
the background is painted in a random scene's style: the context is a hint,
not an answer. Rare labels (~3 % of images): hourglass, crescent, rainbow.
Pairs that never co-occur (no scene in common, NEVER_TOGETHER):
  triangle+rainbow, hourglass+crescent, hourglass+zigzag, hourglass+rainbow,
  crescent+green_square, crescent+tiny_x, red_square+green_square,
  yellow_square+rainbow, checkered+zigzag.
Per image: 1-3 labelled objects + 0-2 distractors (4 at most), 22-38 % of the
side, random place (bounded overlap), rotation and colour jitter, drawn through
masks at 2x and box-downsampled, then sensor noise. The target is derived from
the objects actually drawn (object_label). Image i of a split depends only on
(seed, split, i): the same on every machine. seed=0 is THE benchmark.

The source task (--dataset synthetic-pretrain, for pretraining a backbone offline: ML-VPT's prompt
tuning needs one): images of the same generator under another seed (SOURCE_SEED), so no image of the
benchmark is among them, labelled by what they show in factorised form (SOURCE_CLASSES, 28 labels):
the outline of every object drawn, distractors included (14 kinds: the 8 shapes, square, pentagon,
blob, the 3 tiny kinds), its fill when textured (5), and the colour of every solid object (9). Said
plainly, the concepts overlap: 15 of the benchmark's 20 labels have a source label for the same concept
(the 8 shapes, the 5 textures, the 2 tiny kinds), the 5 coloured squares are conjunctions of two source
labels (kind_square AND colour_red), and images are drawn from the same scenes, so labels co-occur alike.
This is the ImageNet -> VOC situation (ImageNet names most of VOC's classes), and the source task asked
for: every object kind, distractors included. What it makes fair is the comparison between ways of
adapting one pretrained backbone (compare.py --set mlvpt), not the absolute level: a linear probe will
already do well, better than it would from a source of unrelated concepts.

Splits: train 5000, val 1000, test 2000 images, rendered once at construction
(~0.65 ms per 64-px image on 2 CPU cores: ~5 s for all three) into uint8
(N, 3, S, S). Extras of the synthetic set: `scenes` (N,), `objects`, `label_groups`.

This file is the generator only: pure numpy + pillow, one image at a time
(render_synthetic). data.py turns it into a Dataset (SyntheticMultiLabel) and
has the preview / stats command line:

    python data.py --preview            # grid -> assets/synthetic_preview.png
    python data.py --stats --split val  # frequencies, cardinality, co-occurrence
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 5000, "val": 1000, "test": 2000}  # synthetic images per split

# -----------------------------------------------------------------------------
# difficulty knobs: sizes are fractions of the image side, colours are 0..255

OBJECT_SIZE = (0.30, 0.46)   # side of a normal object's bounding square
TINY_SIZE = (0.11, 0.14)     # tiny objects: 7-9 px at 64 px, rim not included
TINY_RIM = 1 / 64            # dark rim around tiny objects (1 px at 64 px)
COLOR_JITTER = 22            # uniform +- per channel around the nominal colour
PIXEL_NOISE_STD = 5.0        # gaussian sensor noise over the whole image
BG_PATTERN_STRENGTH = 16     # contrast of the scene's background pattern
TEXTURE_SCALE = 1.2          # textured objects are this much larger than solid ones
TEXTURE_CONTRAST = 60        # min brightness difference of a texture's two colours
SCENE_CONFUSION = 0.3        # P(background painted in a random scene's style)
DISTRACTOR_RATE = 0.3        # each of 2 distractor slots is used with this P
NUM_LABELLED_P = (0.35, 0.40, 0.25)  # P(1, 2, 3 labelled objects)
MAX_OVERLAP = 0.2            # max bbox intersection / smaller bbox area
RENDER_SCALE = 2             # draw at 2x, box-downsample: cheap anti-aliasing

# -----------------------------------------------------------------------------
# labels, colours, scenes

SHAPES = ("circle", "triangle", "star", "cross", "ring", "arrow", "hourglass", "crescent")
SQUARE_COLOURS = ("red", "green", "blue", "yellow", "purple")
TEXTURES = ("striped", "checkered", "dotted", "zigzag", "rainbow")
TINY = ("tiny_diamond", "tiny_x")
LABEL_GROUPS = {"shape": list(SHAPES), "colour": [f"{c}_square" for c in SQUARE_COLOURS],
                "texture": list(TEXTURES), "small": list(TINY)}
CLASSES = [name for group in LABEL_GROUPS.values() for name in group]
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}

# Nominal colours, chosen >= ~80 apart on some channel so that COLOR_JITTER
# never turns one into another. The last four belong to no label.
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
           "yellow": (235, 215, 45), "purple": (140, 55, 190), "orange": (245, 135, 35),
           "cyan": (50, 205, 215), "pink": (245, 120, 185), "white": (235, 235, 235)}
DISTRACTOR_COLOURS = ("orange", "cyan", "pink", "white")
BRIGHT_COLOURS = ("white", "yellow", "cyan", "pink", "orange")  # tiny things must pop
RIM = (20, 20, 20)

SCENES = ("meadow", "ocean", "desert", "city", "night")
# Background colours are muted so that the saturated objects stand out on all.
SCENE_BG = {"meadow": (105, 125, 85), "ocean": (70, 95, 130), "desert": (150, 130, 100),
            "city": (110, 110, 115), "night": (40, 40, 60)}
# Relative weight of each label in each scene (0 = never there). A scene draws
# its labels without replacement in proportion to its column. Rare labels get
# small weights in two scenes; the others 1-4 in two to four scenes.
#                   meadow ocean desert city night
SCENE_TABLE = {
    "circle":        (3, 3, 1, 0, 2),
    "triangle":      (2, 0, 3, 3, 0),
    "star":          (1, 0, 1, 0, 4),
    "cross":         (0, 1, 1, 3, 1),
    "ring":          (0, 3, 0, 1, 2),
    "arrow":         (0, 1, 2, 3, 0),
    "hourglass":     (1.2, 0, 0, 1.2, 0),
    "crescent":      (0, 0, 0.8, 0, 0.8),
    "red_square":    (0, 0, 2, 3, 1),
    "green_square":  (3, 1, 0, 0, 0),
    "blue_square":   (0, 3, 0, 1, 1),
    "yellow_square": (1, 0, 3, 1, 0),
    "purple_square": (0, 1, 0, 1, 3),
    "striped":       (0, 2, 2, 1, 0),
    "checkered":     (1, 0, 0, 3, 1),
    "dotted":        (2, 1, 0, 0, 2),
    "zigzag":        (0, 1, 3, 0, 0),
    "rainbow":      (0, 0.8, 0, 0, 0.8),
    "tiny_diamond":  (1, 0, 1, 0, 3),
    "tiny_x":        (2, 1, 0, 1, 0),
}
_W = np.array([SCENE_TABLE[c] for c in CLASSES], dtype=np.float64)  # (L, scenes)
NEVER_TOGETHER = [(CLASSES[i], CLASSES[j]) for i in range(len(CLASSES)) for j in range(i + 1, len(CLASSES))
                  if not np.any((_W[i] > 0) & (_W[j] > 0))]

# -----------------------------------------------------------------------------
# geometry: unit outlines centred on 0, radius <= 1, y pointing down


def _regular(n):
    a = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _plus(w):  # "+" whose arms have half-width w
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                     (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


def _rotate(p, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return p @ np.array([[c, s], [-s, c]])


POLYGONS = {
    "triangle": _regular(3),
    "star": _regular(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None],
    "cross": _plus(0.3),
    "arrow": np.array([(-1, -.25), (.15, -.25), (.15, -.7), (1, 0), (.15, .7), (.15, .25), (-1, .25)]),
    "hourglass": np.array([(-.8, -1), (.8, -1), (.12, 0), (.8, 1), (-.8, 1), (-.12, 0)]),  # two tips meeting
    "square": np.full((4, 2), 0.78) * [(-1, -1), (1, -1), (1, 1), (-1, 1)],  # fits when turned 15 deg
    "pentagon": _regular(5),
    "tiny_diamond": _regular(4),
    "tiny_x": _rotate(_plus(0.3), 45),
}
# Rotation jitter in +- degrees. Small where a big turn would change what the
# shape is: a square turned 45 deg is a diamond, a "+" becomes an "x".
ROTATION = {"triangle": 180, "star": 180, "arrow": 45, "pentagon": 180, "blob": 180, "crescent": 180,
            "cross": 15, "square": 15, "hourglass": 20, "tiny_diamond": 10, "tiny_x": 10}

# -----------------------------------------------------------------------------
# one image: plan the objects, place them, draw them, derive the target


@dataclass
class Obj:
    kind: str       # outline: a SHAPES or TINY name, "square", "pentagon", "blob", "tiny_dot"
    fill: str       # "solid" or a TEXTURES name
    colours: tuple  # colour names: one for solid fills, two for textures
    x: float        # top-left corner of the bounding square, output pixels
    y: float
    size: float     # side of the bounding square, output pixels
    angle: float    # rotation, degrees


def object_label(o):
    """The label an object shows, judged from its looks alone (None = distractor):
    this, not what _plan intended, defines the target."""
    if o.kind in TINY:
        return o.kind
    if o.fill in TEXTURES:
        return o.fill
    if o.kind == "square":
        return f"{o.colours[0]}_square" if o.colours[0] in SQUARE_COLOURS else None
    return o.kind if o.kind in SHAPES else None


SOURCE_SEED = 1009   # the source task's generator seed: any seed but the benchmark's 0 (docs/mlvpt.md)
SOURCE_KINDS = (*SHAPES, "square", "pentagon", "blob", *TINY, "tiny_dot")
SOURCE_CLASSES = ([f"kind_{k}" for k in SOURCE_KINDS] + [f"fill_{t}" for t in TEXTURES]
                  + [f"colour_{c}" for c in COLOURS])
SOURCE_INDEX = {c: i for i, c in enumerate(SOURCE_CLASSES)}


def source_labels_from_objects(objs):
    """The source task's target: every drawn object's outline, its texture, the colour of solid ones."""
    y = np.zeros(len(SOURCE_CLASSES), dtype=np.float32)
    for o in objs:
        y[SOURCE_INDEX[f"kind_{o.kind}"]] = 1.0
        if o.fill in TEXTURES:
            y[SOURCE_INDEX[f"fill_{o.fill}"]] = 1.0
        else:
            y[SOURCE_INDEX[f"colour_{o.colours[0]}"]] = 1.0
    return y


def labels_from_objects(objs):
    y = np.zeros(len(CLASSES), dtype=np.float32)
    for name in filter(None, map(object_label, objs)):
        y[CLASS_INDEX[name]] = 1.0
    return y


def _luma(name):
    r, g, b = COLOURS[name]
    return 0.299 * r + 0.587 * g + 0.114 * b   # ITU-R BT.601 brightness


def _contrasting_pair(rng, palette):
    """Two palette colours at least TEXTURE_CONTRAST apart in brightness: a yellow-on-white
    stripe pattern is invisible at 64 px after noise, and then the label is unlearnable."""
    while True:
        a, b = rng.choice(palette, size=2, replace=False)
        if abs(_luma(a) - _luma(b)) >= TEXTURE_CONTRAST:
            return a, b


def _plan(rng):
    """Scene index and the objects to draw as (kind, fill, colours), labelled first."""
    palette = list(COLOURS)
    scene = int(rng.integers(len(SCENES)))
    k = 1 + int(rng.choice(3, p=NUM_LABELLED_P))
    w = _W[:, scene]
    specs = []
    for name in (CLASSES[i] for i in rng.choice(len(CLASSES), size=k, replace=False, p=w / w.sum())):
        if name in SHAPES:
            specs.append((name, "solid", (rng.choice(palette),)))
        elif name in TEXTURES:  # any outline but a labelled one, two colours that contrast
            specs.append(("blob", name, _contrasting_pair(rng, palette)))
        elif name in TINY:
            specs.append((name, "solid", (rng.choice(BRIGHT_COLOURS),)))
        else:
            specs.append(("square", "solid", (name[:-len("_square")],)))
    for _ in range(min(int(rng.binomial(2, DISTRACTOR_RATE)), 4 - k)):
        kind = str(rng.choice(["square", "blob", "pentagon", "tiny_dot"], p=[0.35, 0.3, 0.2, 0.15]))
        colours = {"square": DISTRACTOR_COLOURS, "tiny_dot": BRIGHT_COLOURS}.get(kind, palette)
        specs.append((kind, "solid", (rng.choice(colours),)))
    return scene, [(kind, fill, tuple(map(str, cs))) for kind, fill, cs in specs]  # np.str_ -> str


def _overlap(x, y, s, o):
    ix = max(0.0, min(x + s, o.x + o.size) - max(x, o.x))
    iy = max(0.0, min(y + s, o.y + o.size) - max(y, o.y))
    return ix * iy / min(s, o.size) ** 2


def _place(rng, specs, S):
    """Size, position and angle per object. Positions overlapping an earlier
    object's box by more than MAX_OVERLAP are rejected, so everything stays
    mostly visible; an object that finds no room in 30 tries is not drawn
    (the first, labelled one always fits, so no image is empty)."""
    objs = []
    for kind, fill, colours in specs:
        tiny = kind.startswith("tiny")
        s = S * (rng.uniform(*TINY_SIZE) + 2 * TINY_RIM if tiny else rng.uniform(*OBJECT_SIZE))
        if fill in TEXTURES:   # a pattern needs room: a few periods at least
            s = min(s * TEXTURE_SCALE, 0.5 * S)
        for _ in range(30):
            x, y = rng.uniform(0, S - s, 2)
            if all(_overlap(x, y, s, o) <= MAX_OVERLAP for o in objs):
                angle = rng.uniform(-1, 1) * ROTATION.get(kind, 0)
                objs.append(Obj(kind, fill, colours, float(x), float(y), float(s), float(angle)))
                break
    return objs


def _jitter(rng, name):
    rgb = np.array(COLOURS[name]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _mask(o, n, rng, scale=1.0):
    """The object's outline as an n x n 'L' mask (255 = object), shrunk by
    `scale`. Holes (ring, crescent) are cut in the MASK, so whatever lies
    below shows through: no background-coloured paint for a model to spot."""
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    r, c = n / 2 * scale, (n - 1) / 2

    def disc(cx, cy, rad, v):
        d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=v)

    if o.kind in ("circle", "ring", "crescent", "tiny_dot"):
        disc(c, c, r, 255)
        if o.kind == "ring":
            disc(c, c, 0.55 * r, 0)
        if o.kind == "crescent":  # bite out a disc shifted towards `angle`
            a = np.radians(o.angle)
            disc(c + 0.45 * r * np.cos(a), c + 0.45 * r * np.sin(a), 0.85 * r, 0)
        return m
    if o.kind == "blob" and rng.random() < 0.5:  # irregular 5-8-gon
        v = int(rng.integers(5, 9))
        a = 2 * np.pi * (np.arange(v) + rng.uniform(-.3, .3, v)) / v
        p = np.stack([np.cos(a), np.sin(a)], 1) * rng.uniform(.6, 1., (v, 1))
    elif o.kind == "blob":  # ellipse elongated enough never to pass for a circle
        a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        p = np.stack([np.cos(a), rng.uniform(.45, .7) * np.sin(a)], 1)
    else:
        p = POLYGONS[o.kind]
    d.polygon([tuple(q) for q in c + r * _rotate(p, o.angle)], fill=255)
    return m


def _texture(o, n, S2, rng):
    """n x n x 3 uint8 fill of a textured object, at a random orientation.
    The period follows the image side (~6.4 px at 64 px), not the object, so a
    texture is told by its pattern whatever the object's size."""
    c1, c2 = (np.array(_jitter(rng, c), dtype=np.float32) for c in o.colours)
    a = rng.uniform(0, np.pi)
    ys, xs = np.ogrid[0:n, 0:n]
    u = xs * np.cos(a) + ys * np.sin(a)  # (n, n) coordinates in a rotated frame
    v = ys * np.cos(a) - xs * np.sin(a)
    p = 0.13 * S2 * rng.uniform(0.85, 1.15)
    if o.fill == "rainbow":  # hue sweeps across the object: the one multi-coloured smooth fill
        t = (u - u.min()) / (u.max() - u.min()) * 0.8 + rng.uniform(0, 1)               # (n, n) hue
        rgb = np.clip(np.abs((t[..., None] * 6 + [0, 4, 2]) % 6 - 3) - 1, 0, 1)        # HSV -> RGB at s = v = 1
        return (40 + 190 * rgb).astype(np.uint8)
    if o.fill == "striped":
        on = (u / p) % 1 < 0.5
    elif o.fill == "checkered":
        on = ((u // (0.6 * p)) + (v // (0.6 * p))) % 2 == 0
    elif o.fill == "dotted":
        on = ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < (0.3 * p) ** 2
    else:  # zigzag: stripes whose phase follows a triangle wave -> chevrons
        on = ((u + 0.5 * p * np.abs(2 * ((v / p) % 1) - 1)) / p) % 1 < 0.5
    return np.where(on[..., None], c1, c2).astype(np.uint8)


def _background(rng, style, S2):
    """The scene's backdrop at S2 x S2. Patterns are low-contrast and coarse
    (a 16 x 16 grid, upsampled) so they never pass for a texture label."""
    g = 16
    ys, xs = np.mgrid[0:g, 0:g] / g
    if style == "meadow":  # vertical streaks
        pat = np.broadcast_to(rng.normal(0, 1, g), (g, g))
    elif style == "ocean":  # horizontal waves
        pat = np.sin(2 * np.pi * (ys * rng.uniform(2, 3.5) + 0.15 * np.sin(2 * np.pi * xs + rng.uniform(0, 6))))
    elif style == "desert":  # diagonal ripples
        pat = np.sin(2 * np.pi * (xs * rng.uniform(1, 2) + ys * rng.uniform(1, 2)) + rng.uniform(0, 6))
    elif style == "city":  # blocks
        pat = rng.normal(0, 1, (4, 4)).repeat(4, 0).repeat(4, 1)
    else:  # night: faint blotches, stars below
        pat = rng.normal(0, 0.5, (g, g))
    base = np.array(SCENE_BG[style]) + rng.uniform(-15, 15, 3)
    bg = np.clip(base + BG_PATTERN_STRENGTH * pat[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(bg).resize((S2, S2), Image.BILINEAR)
    if style == "night":  # 1-px stars (at 64 px): decoys for the tiny labels
        d, k = ImageDraw.Draw(img), max(1, S2 // 64)
        for x, y in rng.uniform(0, S2 - k, (int(rng.integers(4, 12)), 2)):
            x, y = int(x), int(y)   # integer corners: with floats, x + 1 - 1 can round below x
            d.rectangle((x, y, x + k - 1, y + k - 1), fill=(200, 200, 210))
    return img


def render_synthetic(seed, split, index, image_size=64):
    """Image `index` of `split` -> (uint8 (S, S, 3), scene index, drawn [Obj]).
    A pure function of its arguments: one generator per image, seeded by
    (seed, split, index), so images need no order and no shared state."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    S, R = image_size, RENDER_SCALE
    scene, specs = _plan(rng)
    style = scene if rng.random() >= SCENE_CONFUSION else int(rng.integers(len(SCENES)))
    canvas = _background(rng, SCENES[style], S * R)
    objs = _place(rng, specs, S)
    for o in (objs[i] for i in rng.permutation(len(objs))):  # random depth order
        n, x0, y0 = max(3, int(o.size * R)), int(o.x * R), int(o.y * R)
        box = (x0, y0, x0 + n, y0 + n)
        if o.kind.startswith("tiny"):  # rim = the full outline, colour = a shrunk copy
            canvas.paste(RIM, box, _mask(o, n, rng))
            canvas.paste(_jitter(rng, o.colours[0]), box, _mask(o, n, rng, 1 - 2 * TINY_RIM * S / o.size))
        elif o.fill == "solid":
            canvas.paste(_jitter(rng, o.colours[0]), box, _mask(o, n, rng))
        else:
            canvas.paste(Image.fromarray(_texture(o, n, S * R, rng)), box, _mask(o, n, rng))
    img = np.asarray(canvas.reduce(R), dtype=np.float32)  # R x R box filter
    img = img + PIXEL_NOISE_STD * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), scene, objs
