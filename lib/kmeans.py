"""
k-means: Lloyd's algorithm with k-means++ starts, the one clustering routine of the codebase.

DivDR partitions the images by their routing signatures (divdr.py), and label groups (ML-VPT's prompt
groups, DR-MoE's --label-groups) cluster a spectral embedding of the labels' co-occurrence (lib/spectral.py).
All call this file, so none needs another.

    Lloyd (1982): assign every point to its nearest centroid, move every centroid to the mean of its points,
                  repeat until nothing moves.
    k-means++ (Arthur & Vassilvitskii 2007): the first start uniformly at random, each next one drawn with
                  probability proportional to its squared distance to the nearest start so far.

The best of `restarts` runs by inertia (the summed squared distance of the points to their centroids) is
kept. Every run draws from its own numpy generator seeded by `seed`: no global random stream is touched,
so clustering never shifts the training's random draws, and every process of a torchrun computes the same.

Shapes: points x (n, F) -> centroids (k, F), assignment (n,).

    python -m lib.kmeans     # a worked example: two blobs of 5 points found again
"""
import numpy as np


def sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances x (n, F), c (k, F) -> (n, k), as |x|^2 - 2 x.c + |c|^2: no (n, k, F) temporary,
    which at tens of thousands of training signatures would be hundreds of MB per k-means iteration."""
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 4, iters: int = 100):
    """Lloyd's k-means, k-means++ starts, the best of `restarts` by inertia; deterministic by `seed` (its own
    numpy generator: no global random stream is touched). x (n, F) -> (centroids (k, F), assignment (n,))."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    k = min(k, len(x))   # never more clusters than points
    best = None
    for _ in range(restarts):
        # k-means++: each next start drawn with probability ~ squared distance to the nearest start so far.
        c = x[[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = sq_dist(x, c).min(1)                                       # (n,)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            c = np.vstack([c, x[rng.choice(len(x), p=p)]])
        for _ in range(iters):
            a = sq_dist(x, c).argmin(1)                                     # (n,) nearest centroid
            # An emptied cluster keeps its centroid (it may win points back on the next pass).
            new = np.array([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        a = sq_dist(x, c).argmin(1)
        inertia = ((x - c[a]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, c, a)
    return best[1], best[2]


if __name__ == "__main__":
    # A worked example: 5 points around (0, 0) and 5 around (5, 5), F = 2; k-means with k = 2 finds them.
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.3, (5, 2)), rng.normal(5, 0.3, (5, 2))])
    centroids, assign = kmeans(x, 2, seed=0)
    print(f"points x {x.shape} (n, F) -> centroids {centroids.shape} (k, F), assignment {assign.shape} (n,)")
    print(f"assignment {assign.tolist()}; centroids {np.round(centroids, 2).tolist()}")
