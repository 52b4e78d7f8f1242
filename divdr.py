"""
Diversified routing (DivDR), and the measures that ask whether routing found the structure of the data.

Paper: Csaba, Bibi, Li, Torr, Lim, "Diversified Dynamic Routing for Vision Tasks" (VIPriors workshop 2022,
arXiv 2209.13071). Its point: a dynamic-routing network left alone "reverts to using the same subset of
experts"; DivDR clusters the gate activations of the training images and trains the routing so that the
clusters are tight and far apart, i.e. so that routing partitions the data without supervision.

The routing signature of an image (routing_signature), the rows of every router that sees it, concatenated,
read from the routing records every model's forward returns (info["routing"], lib/routing.py):
    the head gate (DR-MoE, HSQ, --gate ...):  w[b, l, :] for every label l       L rows of E
    a router inside the backbone:             the mean router probability of     one row of N per layer
                                              the image's tokens
Each row sums to 1. Distances are squared Euclidean divided by R, the number of rows (the mean over rows),
so a margin means the same for any number of labels or layers: two images whose every row puts all its
mass on a different expert are at distance 2, identical routings at 0.

The objective, as we read it (the paper's equations could not be read here; this project's reading,
implemented as written and to be corrected if the official text turns up):
  1. after every epoch, k-means with K clusters (--divdr-clusters) on the signatures the training images
     had during that epoch (detached, collected as they came) -> centroids C (K, F);
  2. during the next epoch each image of a batch is assigned to its nearest centroid a(b) (no gradient),
     and c_j is the mean signature of the batch's images assigned to j (with gradient):
        L_within  =   mean_b d(r_b, c_{a(b)})                            pulls each image to its partition
        L_between = - mean_{i != j, both in the batch} min(d(c_i, c_j), m)  pushes partitions apart, up to m
        loss     += --divdr-coef * (L_within + L_between)                   (m: --divdr-margin)
  The batch means c_j, not the centroids C: C is a constant of the epoch, so a between-term on C would
  have no gradient. The first epoch has no centroids and trains without the term. The gradient reaches the
  gates' weights and, through the gates' inputs (label features, image feature), the decoder and the
  backbone too: the network is trained to make its routing clusterable, not only the gates (calibration
  in results/routing/README.md: from --divdr-coef 0.3 on this overwhelms the classification loss).

Measures of structure (structure()), on any split, against a reference partition the model never sees
(the embedded benchmark's latent scene; on photos, each image's most frequent label): k-means of the
signatures into K clusters, then normalised mutual information (arithmetic normalisation, scikit-learn's
default) and the adjusted Rand index (Hubert & Arabie 1985) of clusters vs reference; the number of
distinct top-1 routes (the tuple of each row's arg-max expert) and their entropy in bits; the head's
experts per image (distinct arg-max experts over its labels); the largest share of the images that one
expert takes as some row's top-1 choice (head and backbone apart: their expert indices are unrelated).
For scale (agreement()): the same k-means and NMI / ARI on the image feature the gate reads and on the
label vectors (evaluate.py prints them beside the routing's).

How this file plugs into the loop (a file a DR-MoE fork can delete): its flags are DivDRConfig's, checked by
check(); zoo.loop_hooks builds a DivDR hook for every model that routes, and the loop calls it by what it does,
never by name: losses(info) in every step (the term above, "divdr" in the log), end_epoch() at every epoch's
end (step 1's k-means; its partition's health is logged like a router's, "divdr partition"), measure() on
the validation split every epoch (with --divdr-coef) and on the test split at the end (the structure
measures above, "routing" in log.jsonl and metrics.json), and its state (the centroids) rides in the
checkpoint, so --resume continues the term.

Shapes (legend in experts.py): gate weights (B, L, E), backbone rows (B, N) -> signature (B, F), F = L*E + sum N.

    python divdr.py      # a worked example: two routes in 6 images, k-means, the DivDR loss, NMI and ARI
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from lib.flags import config_field
from lib.kmeans import kmeans
from lib.routing import route, routes


@dataclass
class DivDRConfig:
    """The flags of this file, fields of zoo.ModelConfig (config_field's third argument: the --help section)."""
    divdr_coef: float = config_field(0.0, "weight of the DivDR loss that trains routing to partition the images "
                                          "(divdr.py; 0 = off; needs a model that routes)", "training")
    divdr_clusters: int = config_field(8, "K: k-means clusters of the routing signatures, for DivDR and for the "
                                          "routing-structure measures", "training")
    divdr_margin: float = config_field(1.0, "m: DivDR pushes partition means apart up to this mean squared distance "
                                            "per routing row (2 = every row on a different expert)", "training")


def routing_signature(routing: dict):
    """A forward pass's routing records {name: record} -> (signature (B, F) float32 with gradient, rows
    [(kind, E)] * R per router, in the records' order); (None, []) for a model that routes nothing."""
    parts, rows = [], []
    for r in routing.values():
        p = r["probs"].float()                                             # (B, R, E)
        parts.append(p.flatten(1))                                         # (B, R*E)
        rows += [(r["kind"], p.shape[2])] * p.shape[1]
    return (torch.cat(parts, 1), rows) if parts else (None, [])


def stored_signature(routing: dict, kinds: dict):
    """The same from an evaluation's stored rows {name: (N, R, E) array} and {name: kind} -> ((N, F), rows)."""
    if not routing:
        return None, []
    rows = [(kinds[name], p.shape[2]) for name, p in routing.items() for _ in range(p.shape[1])]
    return np.concatenate([p.reshape(len(p), -1) for p in routing.values()], 1), rows


def partition(signatures, k: int, seed: int):
    """Step 1 of the objective: k-means of an epoch's routing signatures (n, F) -> (the centroids (K, F) float32
    that the next epoch's divdr_loss pulls toward, each image's partition (n,)); deterministic by seed: every
    rank computes the same."""
    centroids, assign = kmeans(np.asarray(signatures), k, seed=seed)
    return torch.from_numpy(centroids).float(), assign


def divdr_loss(r: torch.Tensor, centroids: torch.Tensor, num_rows: int, margin: float):
    """r (B, F) signatures with gradient, centroids (K, F) of the last epoch -> (L_within + L_between,
    L_within, L_between), the docstring's equations; d = squared distance / num_rows. Always in float32,
    also under AMP: the distances are differences of numbers near each other (rows sum to 1)."""
    with torch.autocast(r.device.type, enabled=False):
        return _divdr_loss(r.float(), centroids.float(), num_rows, margin)


def _divdr_loss(r, centroids, num_rows, margin):
    d = lambda u, v: ((u - v) ** 2).sum(-1) / num_rows
    a = torch.cdist(r.detach(), centroids.to(r)).argmin(1)                  # (B,) nearest last-epoch centroid
    present = torch.unique(a)                                               # partitions in this batch
    onehot = (a[:, None] == present[None]).to(r.dtype)                      # (B, P)
    c = (onehot.T @ r) / onehot.sum(0)[:, None]                             # (P, F) batch mean per partition
    within = d(r, c[onehot.argmax(1)]).mean()
    if len(present) > 1:
        pair = d(c[:, None], c[None])                                       # (P, P)
        off = ~torch.eye(len(present), dtype=torch.bool, device=r.device)
        between = -pair[off].clamp(max=margin).mean()
    else:
        between = r.new_zeros(())   # one partition in the batch: nothing to push apart
    return within + between, within, between


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two partitions of the same n items -> (|a|, |b|) counts n_ij (labels are re-indexed 0..)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    t = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(t, (ai, bi), 1)
    return t


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information of a contingency table: I(A; B) / ((H(A) + H(B)) / 2); 1 = same
    partition, 0 = independent. Two one-cluster partitions count as identical (1.0), as scikit-learn does."""
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    denom = (h(pa) + h(pb)) / 2
    return 1.0 if denom == 0 else float(mi / denom)


def ari(table: np.ndarray) -> float:
    """Adjusted Rand index of a contingency table (Hubert & Arabie 1985): pair counting, 0 in expectation
    for random partitions with these cluster sizes, 1 for identical ones."""
    comb = lambda v: (v * (v - 1) / 2).sum()
    n = table.sum()
    sum_ij, sum_a, sum_b = comb(table), comb(table.sum(1)), comb(table.sum(0))
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    top = (sum_a + sum_b) / 2
    return 1.0 if top == expected else float((sum_ij - expected) / (top - expected))


def dominant_label(targets: np.ndarray) -> np.ndarray:
    """Photos have no scene: each image's positive label that is most frequent in the split, -1 if none."""
    pos = targets == 1
    freq = pos.sum(0)                                                       # (L,)
    ranked = np.where(pos, freq[None], -1)                                  # (n, L)
    return np.where(pos.any(1), ranked.argmax(1), -1)


def split_structure(signatures, rows, dataset, targets, k: int = 8, seed: int = 0) -> dict:
    """structure() of one split against its reference partition: the dataset's latent scenes where it has
    them (the embedded benchmark's `scenes`, read here and never by the model or a loss), else each image's
    most frequent label. Adds "reference" and "reference_names", the names of the classes present, in the
    order of the contingency table's columns."""
    ref, kind, names = reference_partition(dataset, targets)
    out = structure(signatures, rows, ref, k, seed)
    out["reference"] = kind
    out["reference_names"] = [names[i] for i in sorted(set(ref.tolist()) - {-1})]
    return out


def reference_partition(dataset, targets):
    """-> (reference (n,) with -1 for "none", its kind, the names of its classes): the dataset's latent scenes
    where it has them, else each image's most frequent label (dominant_label)."""
    scenes = getattr(dataset, "scenes", None)
    if scenes is not None:
        return np.asarray(scenes), "scene", list(dataset.scene_names)
    return dominant_label(targets), "most frequent label", list(dataset.classes)


def agreement(points: np.ndarray, reference: np.ndarray, k: int = 8, seed: int = 0) -> dict:
    """k-means of any points (n, F) into k clusters vs a reference partition (n,): {"nmi", "ari"}. For scale
    beside the routing's numbers: what the same clustering finds in the image feature the gate reads (can
    routing find scenes its input does not carry?) and in the label vectors (how much of the scene the labels
    alone give away). Each dimension is standardised first (a constant one is left at 0), so the clusters are
    not decided by the few feature dimensions with the largest scale; binary labels are clustered as given."""
    x = np.asarray(points, dtype=np.float64)
    if not np.isin(x, (0.0, 1.0)).all():
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)                      # (n, F) z-scores per dimension
    keep = np.asarray(reference) >= 0
    _, clusters = kmeans(x[keep], k, seed)
    table = contingency(clusters, np.asarray(reference)[keep])
    return {"nmi": nmi(table), "ari": ari(table)}


def structure(signatures: np.ndarray, rows, reference=None, k: int = 8, seed: int = 0) -> dict:
    """The docstring's measures for n images' signatures (n, F) with `rows` as routing_signature gives
    them; reference (n,) or None."""
    sig = np.asarray(signatures, dtype=np.float64)
    _, clusters = kmeans(sig / np.sqrt(len(rows)), k, seed)                 # the same d as the loss
    bounds = np.cumsum([0] + [w for _, w in rows])
    top1 = np.stack([sig[:, s:e].argmax(1) for s, e in zip(bounds[:-1], bounds[1:])], 1)   # (n, R) arg-max expert
    _, counts = np.unique(top1, axis=0, return_counts=True)
    p = counts / counts.sum()
    out = {"clusters": int(clusters.max() + 1), "cluster_sizes": np.bincount(clusters).tolist(),
           "distinct_routes": int(len(counts)), "route_entropy_bits": float(-(p * np.log2(p)).sum()) + 0.0}   # + 0.0: no "-0.0"
    # Expert indices mean something only within one router kind: shares and counts per kind.
    for kind in ("head", "backbone"):
        idx = [i for i, (kd, _) in enumerate(rows) if kd == kind]
        if idx:
            out[f"{kind}_largest_expert_share"] = float(max(np.bincount(top1[:, i]).max() for i in idx) / len(sig))
    head = [i for i, (kd, _) in enumerate(rows) if kd == "head"]
    out["head_experts_per_image"] = float(np.mean([len(set(r)) for r in top1[:, head]])) if head else None
    if reference is not None:
        keep = np.asarray(reference) >= 0
        table = contingency(clusters[keep], np.asarray(reference)[keep])
        out.update(nmi=nmi(table), ari=ari(table), contingency=table.tolist())
    return out


# --------------------------------------------------------------------------------------------------------
# What the loop calls (zoo.loop_hooks builds it), and this file's checks


class DivDR:
    """DivDR in the training loop: the term in every step, the partition at every epoch's end, the structure
    measures. Built for every model that routes: with --divdr-coef 0 it only measures the test split."""

    name = "divdr"

    def __init__(self, cfg, seed: int):
        self.coef, self.k, self.margin, self.seed = cfg.divdr_coef, cfg.divdr_clusters, cfg.divdr_margin, seed
        self.trains = self.coef > 0          # the term, the partition and the per-epoch measure
        self.centroids, self.signatures, self.device = None, [], None

    def losses(self, info: dict) -> dict:
        """Step 2 inside a training step: {"divdr": coef * (L_within + L_between)} from the second epoch on."""
        if not self.trains:
            return {}
        sig, rows = routing_signature(info["routing"])
        self.device = sig.device
        self.signatures.append(sig.detach())   # stays on the device: .cpu() each step would sync a GPU
        if self.centroids is None:   # the first epoch has no partition to pull toward
            return {}
        return {"divdr": self.coef * divdr_loss(sig, self.centroids, len(rows), self.margin)[0]}

    def end_epoch(self, epoch: int, gather) -> dict:
        """Step 1: the partition the next epoch pulls toward, from this epoch's signatures of every process
        (gather: a list of every rank's copy) -> {"divdr partition": a routing record of the images' share per
        partition} for the loop's routing watch."""
        if not self.signatures:
            return {}
        sig = torch.cat(gather(torch.cat(self.signatures).cpu()))   # one copy per epoch, (n, F)
        self.signatures = []
        centroids, assign = partition(sig.numpy(), self.k, seed=self.seed * 1000 + epoch)
        self.centroids = centroids.to(self.device)
        share = torch.bincount(torch.as_tensor(assign), minlength=self.k).float() / len(assign)   # (K,)
        return {"divdr partition": route(share[None, None], kind="partition")}

    def measure(self, pred: dict, dataset, every_epoch: bool) -> dict:
        """The structure measures on one split (evaluate.predict's output) -> {"routing": ...}, or {} when
        there is nothing to measure (per epoch only while training the term)."""
        if every_epoch and not self.trains:   # per epoch only while the term trains: k-means is not free
            return {}
        sig, rows = stored_signature(pred["routing"], pred["kinds"])
        if sig is None:
            return {}
        # The reference partition is read here, after training's step: never by the model or a loss.
        return {"routing": split_structure(sig, rows, dataset, pred["targets"], self.k)}

    def report(self, pred: dict, dataset, features=None) -> dict:
        """evaluate.py's routing section: the measures on its split, printed, and for scale the same k-means of
        the label vectors and of the image features the gate reads -> {"routing": ...} or {}."""
        res = self.measure(pred, dataset, every_epoch=False).get("routing")
        if res is None:
            return {}
        targets = pred["targets"]
        print(f"\nrouting: {res['clusters']} k-means clusters of the routing vs the {res['reference']}: NMI "
              f"{res['nmi']:.3f}, ARI {res['ari']:.3f}; {res['distinct_routes']} distinct top-1 routes "
              f"({res['route_entropy_bits']:.2f} bits)")
        # For scale: an NMI means little alone. The same k-means on the label vectors shows how much of the
        # reference partition the labels themselves carry, and on the image features how much the features the
        # gate reads already hold; a routing below both has found less structure than its own input.
        ref = reference_partition(dataset, targets)[0]
        res["for_scale"] = {"labels": agreement((targets == 1).astype(np.float64), ref, self.k)}
        if features is not None:
            res["for_scale"]["image_feature"] = agreement(features, ref, self.k)
        shown = {"labels": "label vectors", "image_feature": "image features"}
        print("         for scale, the same k-means of " + "; of ".join(
            f"the {shown[name]}: NMI {v['nmi']:.3f}, ARI {v['ari']:.3f}" for name, v in res["for_scale"].items()))
        return {"routing": res}

    def draw(self, folder: str, result: dict, title: str) -> list:
        """evaluate.py --analysis: routing_clusters.png, the clusters x reference table -> the files written."""
        from lib import plots
        res = result.get("routing")
        if res is None:
            return []
        plots.routing_clusters(os.path.join(folder, "routing_clusters.png"), res["contingency"],
                               [f"cluster {i}" for i in range(len(res["contingency"]))], res["reference_names"],
                               f"Routing clusters vs {res['reference']}: NMI {res['nmi']:.3f}, ARI {res['ari']:.3f}",
                               f"{title}; k-means (K = {res['clusters']}) of each image's routing signature (divdr.py)")
        return ["routing_clusters.png"]

    def state_dict(self) -> dict:
        return {"centroids": self.centroids.cpu() if self.centroids is not None else None}

    def load(self, ckpt: dict, device):
        """The centroids a checkpoint holds (an older one keeps them as "divdr_centroids")."""
        state = ckpt.get("hooks", {}).get(self.name) or {"centroids": ckpt.get("divdr_centroids")}
        self.centroids = state["centroids"].to(device) if state["centroids"] is not None else None
        self.device = device


def loop_hook(tcfg, mcfg, model):
    """zoo.loop_hooks's entry: a DivDR for a model that routes, else None (or an error with --divdr-coef)."""
    if not routes(model):
        if mcfg.divdr_coef > 0:
            sys.exit(f"error: --divdr-coef trains routing, and --model {mcfg.model} here routes nothing: use a model "
                     "with a gate (drmoe, hsq with --moe-layers >= 1) or MoE layers in the backbone")
        return None
    return DivDR(mcfg, tcfg.seed)


CONFIG = DivDRConfig   # this file's fields, joined into zoo.ModelConfig: one --flag each


def check(tcfg, mcfg, error):
    """DivDR's values that cannot work, caught before anything is built: error(one line) exits."""
    ranges = [("divdr_coef", lambda v: v >= 0, "a number >= 0"),
              ("divdr_clusters", lambda v: v >= 2, "an integer >= 2"),
              ("divdr_margin", lambda v: v > 0, "a number > 0")]
    for name, ok, allowed in ranges:
        if not ok(getattr(mcfg, name)):
            error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(mcfg, name)!r}")


if __name__ == "__main__":
    # A worked example: B = 6 images, a head gate over L = 2 labels x E = 3 experts. Images 0-2 route every
    # label to expert 0, images 3-5 to expert 2: two routes, which k-means should find as two partitions.
    torch.manual_seed(0)
    w = torch.full((6, 2, 3), 0.05)
    w[:3, :, 0], w[3:, :, 2] = 0.9, 0.9                                 # rows sum to 1
    w = w + 0.02 * torch.rand_like(w)
    w = w / w.sum(-1, keepdim=True)                                     # a little noise; rows still sum to 1
    sig, rows = routing_signature({"gate": route(w)})
    print(f"gate weights      {tuple(w.shape)}   (B, L, E)")
    print(f"signature r       {tuple(sig.shape)}      (B, F), F = L*E = {sig.shape[1]}; rows {rows}")
    centroids, assign = kmeans(sig.numpy(), 2, seed=0)
    print(f"k-means, K = 2    centroids {centroids.shape} (K, F), partition {assign.tolist()}")
    C = torch.from_numpy(centroids).float()
    total, within, between = divdr_loss(sig, C, len(rows), margin=1.0)
    print(f"DivDR loss        L_within {within:.4f} + L_between {between:.4f} = {total:.4f} (margin 1; 2 = every row "
          "on a different expert)")
    scenes = np.array([0, 0, 0, 1, 1, 1])                               # the reference partition the model never sees
    table = contingency(assign, scenes)
    print(f"against the scenes: contingency {table.tolist()}, NMI {nmi(table):.3f}, ARI {ari(table):.3f} "
          "(1 = the same partition)")
