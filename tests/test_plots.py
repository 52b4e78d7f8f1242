"""
plots.py: the accuracy-against-cost picture keeps points that share an x apart.

- cost_scatter: two points at one x (every top-1 MoE row activates what the dense model does) are drawn
  side by side, their markers' pixel columns at least 10 px apart and centred on the shared x; a point
  far from them is not moved;
- with log_x, values a decade apart are drawn equally far apart.

Run: python -m pytest -q tests/test_plots.py
"""
import numpy as np
from PIL import Image

from lib import plots


def columns_of(img, rgb):
    """Mean pixel column of the pixels painted exactly in colour rgb inside the plot area (the legend's
    swatches sit right of it, from x = 730: plots.cost_scatter's layout)."""
    a = np.asarray(img.convert("RGB")).astype(int)[:, :720]
    ys, xs = np.nonzero((a == np.array(rgb)).all(-1))
    return xs.mean()


def test_points_at_one_x_are_dodged_around_it(tmp_path):
    a, b, c = plots.SERIES[:3]
    # the same x and y for the first two, so without the dodge their markers would coincide
    points = [(2.72, 60.0, 0.5, "dense", "s0"), (2.72, 60.0, 0.5, "N=4", "s1"), (3.5, 61.0, 0.5, "far", "s2")]
    plots.cost_scatter(str(tmp_path / "x.png"), points, "x", "y", "t")
    img = Image.open(tmp_path / "x.png")
    ca, cb = columns_of(img, a), columns_of(img, b)
    assert abs(ca - cb) >= 10
    # Drawn again without the second point (the same axes: the same x and y ranges), the far point's column
    # is unchanged, and the pair was centred on their shared x: the mean of its two columns is the column of
    # the single point.
    one = [(2.72, 60.0, 0.5, "dense", "s0"), points[2]]
    plots.cost_scatter(str(tmp_path / "z.png"), one, "x", "y", "t")
    alone = Image.open(tmp_path / "z.png")
    assert abs(columns_of(alone, b) - columns_of(img, c)) < 1   # there the far point's series is the second
    assert abs((ca + cb) / 2 - columns_of(alone, a)) < 1.5


def test_log_x_spaces_decades_equally(tmp_path):
    a, b, c = plots.SERIES[:3]
    points = [(0.01, 60.0, 0.5, "p", "s0"), (0.1, 61.0, 0.5, "q", "s1"), (1.0, 60.5, 0.5, "r", "s2")]
    plots.cost_scatter(str(tmp_path / "x.png"), points, "x", "y", "t", log_x=True)
    img = Image.open(tmp_path / "x.png")
    ca, cb, cc = (columns_of(img, rgb) for rgb in (a, b, c))
    assert cb - ca > 100 and abs((cb - ca) - (cc - cb)) < 1.5
