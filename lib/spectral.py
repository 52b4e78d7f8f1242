"""
Label groups by spectral clustering: labels that co-occur (or exclude each other) put into k groups.

Two parts of the codebase group labels from the training labels' co-occurrence: ML-VPT's prompt groups
(mlvpt.py, its CO and DC branches) and DR-MoE's task-specific experts per label group (model.py,
--label-groups K). Both call this file, so neither needs the other. Steps (ML-VPT's grouping equation as
mlvpt.py's docstring reads it; spectral clustering as scikit-learn's SpectralClustering(affinity="precomputed")):

    A_ij = S_ij / N_i                          P(j | i): S_ij images with both labels, N_i images with i
    M+   = (A^(1/tau) + (A^(1/tau))^T) / 2     labels that appear together (zero diagonal)
    M-   = 1 - M+                              labels that exclude each other (zero diagonal)
    U    = the k eigenvectors of I - D^-1/2 M D^-1/2 with the smallest eigenvalues, row i / sqrt(d_i)
    groups = k-means on the rows of U (lib/kmeans.py), no group left empty

label_cooccurrence counts the pairs (ML-GCN's label graph reads it too: baselines.py).

Shapes: labels (N, L) -> counts (L, L), nums (L,) -> affinities (L, L) -> embedding (L, k) -> group index per label (L,).

    python -m lib.spectral     # a worked example: 6 labels in two scenes found again
"""
import numpy as np
import torch

from lib.kmeans import kmeans


def label_cooccurrence(targets):
    """targets (N, L) in {1, 0, -1} -> (counts (L, L) int64, zero diagonal; nums (L,) int64).

    counts[i, j] = images where labels i and j are both present, nums[i] = images where i is present
    (ML-GCN's adj_file "adj" and "nums"). Only entries equal to 1 count: a difficult or ignored label
    (-1) is not evidence that the object is there.
    """
    pos = (torch.as_tensor(np.asarray(targets)) == 1).long()              # (N, L)
    counts = pos.T @ pos                                                  # (L, N) @ (N, L) -> (L, L)
    nums = counts.diagonal().clone()                                      # (L,) the diagonal is N_i
    counts.fill_diagonal_(0)
    return counts.numpy(), nums.numpy()


def affinities(counts: np.ndarray, nums: np.ndarray, tau: float = 2.0):
    """counts (L, L) co-occurrences, nums (L,) label counts (label_cooccurrence) -> (M+ (L, L), M- (L, L))
    float64, zero diagonals (a self-loop only adds a constant to a node's degree)."""
    A = counts / np.maximum(nums, 1)[:, None]                              # (L, L) P(j | i); 0 for unseen i
    R = A ** (1.0 / tau)                                                   # tau-th root
    plus = (R + R.T) / 2
    minus = 1.0 - plus
    np.fill_diagonal(plus, 0.0)
    np.fill_diagonal(minus, 0.0)
    return plus, minus


def spectral_embedding(M: np.ndarray, k: int) -> np.ndarray:
    """Affinity (L, L) -> the k eigenvectors of its normalised Laplacian with the smallest eigenvalues, row i
    divided by sqrt(d_i) (L, k): scikit-learn's spectral_embedding(M, norm_laplacian=True, drop_first=False),
    what its SpectralClustering(affinity="precomputed") clusters (docstring)."""
    d = M.sum(1)
    dd = np.sqrt(np.where(d > 0, d, 1.0))                                  # an isolated label: degree 0 -> 1
    lap = np.eye(len(M)) - M / dd[:, None] / dd[None, :]                   # I - D^-1/2 M D^-1/2
    _, vecs = np.linalg.eigh(lap)                                          # ascending eigenvalues
    return vecs[:, :k] / dd[:, None]                                       # (L, k), scaled by D^-1/2


def calinski_harabasz(X: np.ndarray, assign: np.ndarray) -> float:
    """(between-cluster dispersion / (k - 1)) / (within-cluster dispersion / (n - k)) (Calinski & Harabasz
    1974; scikit-learn's calinski_harabasz_score). Higher = tighter, better separated clusters."""
    n, labels = len(X), np.unique(assign)
    k, mean = len(labels), X.mean(0)
    if k < 2 or k >= n:
        return 0.0
    between = sum((assign == j).sum() * ((X[assign == j].mean(0) - mean) ** 2).sum() for j in labels)
    within = sum(((X[assign == j] - X[assign == j].mean(0)) ** 2).sum() for j in labels)
    return float(between * (n - k) / (within * (k - 1))) if within > 0 else float("inf")


def no_empty_groups(assign: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    """k-means can leave a cluster empty; move into each empty one the label farthest from its own centre,
    taken from the largest group (never emptying a group). assign (L,) -> (L,) with all k groups used."""
    assign = assign.copy()
    for j in range(k):
        if (assign == j).any():
            continue
        big = np.bincount(assign, minlength=k).argmax()
        members = np.flatnonzero(assign == big)
        far = members[((X[members] - X[members].mean(0)) ** 2).sum(1).argmax()]
        assign[far] = j
    return assign


def spectral_groups(M: np.ndarray, k: int, seed: int = 0, restarts: int = 1000) -> np.ndarray:
    """Affinity (L, L), k -> group index per label (L,), every group non-empty."""
    U = spectral_embedding(M, k)
    # 1,000 restarts: on ML-VPT's DC affinity k-means has many local optima, and its official groups are the
    # lowest-inertia one (mlvpt.py, step 1); with 20-80 labels that is well under a second.
    _, assign = kmeans(U, k, seed=seed, restarts=restarts)
    return no_empty_groups(assign, U, k)


def pick_k(M: np.ndarray, seed: int = 0, ks=range(2, 11)) -> int:
    """The k of spectral_groups with the best Calinski-Harabasz score on its own spectral embedding."""
    ks = [k for k in ks if k < len(M)]
    if not ks:   # two labels or fewer: nothing to choose between
        return max(1, min(2, len(M)))
    scores = [calinski_harabasz(spectral_embedding(M, k), spectral_groups(M, k, seed)) for k in ks]
    return ks[int(np.argmax(scores))]


if __name__ == "__main__":
    # A worked example: 6 labels, two scenes (labels 0-2 appear together, so do 3-5), 200 images.
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 2, 200)                                        # (N,) which scene each image shows
    y = (rng.random((200, 6)) < 0.6) & (np.arange(6)[None] // 3 == scene[:, None])   # (N, L) labels of its scene
    counts, nums = y.T.astype(np.int64) @ y.astype(np.int64), y.sum(0)    # (L, L), (L,)
    np.fill_diagonal(counts, 0)
    plus, minus = affinities(counts, nums)
    print(f"labels {y.shape} (N, L) -> affinity M+ {plus.shape} (L, L)")
    print(f"spectral embedding {spectral_embedding(plus, 2).shape} (L, k)")
    print(f"groups of the 6 labels: {spectral_groups(plus, 2).tolist()} (labels 0-2 and 3-5 apart)")
