"""
Routing health: one record for every router, computed the same way and in one place.

A router is anything that spreads rows over experts with weights that sum to 1: DR-MoE's gate (gating.py,
L rows per image over E experts), and whatever router a system adds (an MoE layer inside the backbone, a
group gate). What users of MoE code ask first is whether routing is healthy: do the experts share the work,
does any expert get nothing, do tokens overflow, has routing collapsed onto one expert (Shazeer et al. 2017
call the collapse the self-reinforcing imbalance of gated experts). So every router describes each forward
pass in one `route` record, the loop adds an epoch of them up (`Watch`), and every router's health is then
written alike: to log.jsonl, to the epoch line, and as routing.png at the end of a run.

The record of one forward pass (route()):
    probs        (B, R, E) fp32, each image's R routing rows, each summing to 1, with gradient: what a
                 method that trains routing reads (divdr.py builds its routing signature from these)
    load         (E,) the share of this batch's routing each expert took, summing to 1: a soft gate's mean
                 weight; a top-k router's share of its assignments (the f_i of Switch Transformer's eq. 5,
                 Fedus et al. 2022)
    row_entropy  () the mean entropy of the routing rows, in nats: how undecided the router is per row
    k            experts each row is sent to (1 for a soft gate, whose load is then its mass)
    dropped      () the share of assignments that overflowed an expert's capacity, or None (no capacity)
    kind         where the router sits, "head" or "backbone" (or "partition": DivDR's), expert indices mean
                 something only within one kind
    names        the E experts' names, or None

An epoch's health, per router (Watch.health):
    load         the epoch's mean load (E,)
    entropy      H(load) = -sum_e load_e ln load_e, and max_entropy = ln E: equal at perfect balance
    row_entropy  the epoch's mean row entropy
    dead         the experts whose share is under --dead-share of the fair share 1/E
    dropped      the epoch's mean overflow share, or None
    collapsed    True when one expert takes more than --collapse-threshold of the rows: k * max_e load_e, since
                 a top-k row sits on k distinct experts and each expert's share is at most 1/k. A router whose
                 k covers most of its E experts takes k/E per expert even at perfect balance: it is watched
                 only while k/E is under the threshold

Shapes (legend in experts.py): probs (B, R, E), load (E,).

    python -m lib.routing    # a worked example: a balanced and a collapsed router, their health records
"""
import math

import torch


def route(probs: torch.Tensor, load=None, k: int = 1, dropped=None, kind: str = "head", names=None,
          rows=None, extra=None) -> dict:
    """One router's record of one forward pass (the docstring's fields).

    probs (B, R, E) with gradient; load (E,) when the router's assignments are not its probabilities (top-k);
    rows (n, E): the rows whose entropy is reported when they are not probs' (a backbone router's tokens,
    of which probs holds each image's mean); extra: more scalars to average over the epoch and log."""
    with torch.no_grad():
        p = (probs if rows is None else rows).detach().float()
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()           # mean over rows of H(row)
        load = probs.detach().float().mean((0, 1)) if load is None else load.detach().float()   # (B, R, E) -> (E,)
    return {"probs": probs, "load": load, "row_entropy": entropy, "k": k, "dropped": dropped, "kind": kind,
            "names": names, "extra": dict(extra or {})}


def routes(model: torch.nn.Module) -> bool:
    """Whether anything in `model` routes: a router module says so with a class attribute `routes = True`."""
    return any(getattr(m, "routes", False) is True for m in model.modules())


def collect(module: torch.nn.Module):
    """What the routers inside `module` left from its last forward -> (losses {name: weighted}, routing
    {name: record}); both empty for a module with none (a dense backbone).

    For routers that sit inside another module's forward (an MoE layer in a torchvision block cannot
    return anything but the block's output): such a module keeps its last record in `route_record` and its
    balance loss in `aux_loss`, with `route_name`, `loss_name` and `loss_weight`. Losses of one name are
    averaged over the modules (a deeper stack does not weigh more), then weighted."""
    losses, routing, by_loss = {}, {}, {}
    for m in module.modules():
        if getattr(m, "route_record", None) is not None:
            routing[f"{m.route_name} {sum(n.startswith(m.route_name) for n in routing)}"] = m.route_record
        if getattr(m, "loss_name", None) and getattr(m, "aux_loss", None) is not None:
            by_loss.setdefault(m.loss_name, []).append(m)
    for name, ms in by_loss.items():
        losses[name] = ms[0].loss_weight * torch.stack([m.aux_loss for m in ms]).mean()
    return losses, routing


class Watch:
    """An epoch of route records -> each router's health. Sums stay on the device (reading a value every
    step would stall a GPU); `reduce` (a sum over processes under torchrun) runs once, at the epoch's end."""

    def __init__(self):
        self.sums, self.meta = {}, {}

    def add(self, routing: dict):
        for name, r in routing.items():
            s = self.sums.setdefault(name, {"steps": 0, "load": 0.0, "row_entropy": 0.0, "dropped": 0.0,
                                            **{key: 0.0 for key in r["extra"]}})
            self.meta[name] = (r["k"], r["kind"], r["names"], r["dropped"] is not None, list(r["extra"]))
            s["steps"] += 1
            s["load"] = s["load"] + r["load"]
            s["row_entropy"] = s["row_entropy"] + r["row_entropy"]
            if r["dropped"] is not None:
                s["dropped"] = s["dropped"] + r["dropped"]
            for key, v in r["extra"].items():
                s[key] = s[key] + v

    def health(self, collapse: float, dead_share: float, reduce=lambda t: t):
        """-> ({router: health record}, [warnings]). collapse: --collapse-threshold; dead_share: --dead-share."""
        records, warnings = {}, []
        for name, s in self.sums.items():
            k, kind, names, has_dropped, extra = self.meta[name]
            # The sums of every process at once, then the means: one all-reduce per router and epoch.
            keys = ["row_entropy", "dropped", *extra]
            packed = reduce(torch.cat([torch.as_tensor(s["load"]).float().reshape(-1),
                                       torch.stack([torch.as_tensor(s[key]).float().reshape(()).to(s["load"].device)
                                                    for key in keys])]))
            steps = reduce(torch.tensor(float(s["steps"]), device=packed.device))
            means = (packed / steps).tolist()
            E = len(means) - len(keys)
            load = means[:E]
            entropy = -sum(p * math.log(p) for p in load if p > 0)
            rec = {"load": [round(p, 5) for p in load], "entropy": entropy, "max_entropy": math.log(E),
                   "row_entropy": means[E], "dead": [e for e, p in enumerate(load) if p < dead_share / E],
                   "dropped": means[E + 1] if has_dropped else None, "k": k, "kind": kind,
                   **dict(zip(extra, means[E + 2:]))}
            if names:
                rec["experts"] = list(names)
            top = k * max(load)
            # Watched only where balance sits below the threshold (docstring); with E = 1 nothing can collapse.
            rec["collapsed"] = bool(E > 1 and k / E < collapse and top > collapse)
            if rec["collapsed"]:
                who = names[load.index(max(load))] if names else f"expert {load.index(max(load))}"
                warnings.append(f"routing collapse in {name}: {who} takes {100 * top:.0f}% of the rows "
                                f"(> {100 * collapse:.0f}%); the other experts get almost no gradient. Remedy: "
                                "the load-balancing loss, e.g. --aux-loss-coef 0.01")
            records[name] = rec
        return records, warnings


def summary(records: dict) -> str:
    """The epoch line's part: each router's load (in %), its balance H/ln E, its dead experts and its overflow
    (dropped) if any."""
    parts = []
    for name, r in records.items():
        load = " ".join(f"{100 * p:.0f}" for p in r["load"])
        parts.append(f"{name} {load} H {r['entropy'] / r['max_entropy']:.2f}"
                     + (f" dead {len(r['dead'])}" if r["dead"] else "")
                     + (f" dropped {100 * r['dropped']:.1f}%" if r["dropped"] else ""))
    return " | ".join(parts)


if __name__ == "__main__":
    # A worked example: B = 4 images, R = 3 rows each, E = 4 experts. One router spreads its rows evenly,
    # one sends almost everything to expert 0.
    torch.manual_seed(0)
    B, R, E = 4, 3, 4
    even = torch.softmax(0.1 * torch.randn(B, R, E), -1)                   # (B, R, E), rows sum to 1
    collapsed = torch.softmax(torch.tensor([6.0, 0, 0, 0]) + 0.1 * torch.randn(B, R, E), -1)
    watch = Watch()
    for _ in range(2):   # two steps of one epoch
        watch.add({"even": route(even), "collapsed": route(collapsed)})
    print(f"probs {tuple(even.shape)} (B, R, E) -> load {tuple(route(even)['load'].shape)} (E,) per step")
    records, warnings = watch.health(collapse=0.8, dead_share=0.1)
    for name, r in records.items():
        print(f"  {name:<10} load {r['load']}, entropy {r['entropy']:.3f} of ln E = {r['max_entropy']:.3f}, "
              f"dead {r['dead']}, collapsed {r['collapsed']}")
    print("epoch line: " + summary(records))
    print("warnings: " + "; ".join(warnings))
