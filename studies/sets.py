"""
The studies: which configurations each `python -m studies.compare --set NAME` trains, and why each row is there.
A configuration is a name and the train.py flags that make it; everything else (backbone, epochs, lr,
image size, ...) is the dataset preset and --budget, the same for every row of a set, so the rows differ
only in what their names say. compare.py trains them over seeds and builds the tables; this file is the
design of the experiments, with the calibration behind each choice (the write-ups in results/<study>/).

    models            every model, and DR-MoE with every gate kind (the README's "comparison")
    ablation          gate kind x S shared experts {0, 1, 2, 4} x T task-specific experts {1, 2}: which part of the
                      mixture matters, and whether the input-conditioned gate wins at any size
    balance           expert collapse and its remedy: dense and top-1 routing, each without and with the
                      load-balancing loss (gating.py)
    routing           does routing find the scenes? dense and top-1, each plain / Switch loss / DivDR /
                      both, and the static gate (divdr.py)
    routing-backbone  the same question for the routers of MoE layers inside the backbone: vit_tiny (as
                      sweetspot) with last2 N=8 top-1, each plain / Switch loss / DivDR / both
    sweetspot         MoE inside a vit_tiny pretrained on the source task: placements x experts x k with the
                      linear head, and DR-MoE's head on the dense and the best MoE backbones (backbone_moe.py)
    sweetspot-convnext  the same placements x experts x k in a convnext_mini pretrained on the source task
    grouping          DR-MoE's task-specific experts per label against per label group (K = 5), and group decoding
                      (ML-Decoder) against L label queries (model.py)
    mlvpt             transfer from the source task: linear probe, VPT-deep, ML-VPT with CO / DC / both /
                      random groups, full fine-tuning and DR-MoE on the frozen backbone (mlvpt.py)

SETS maps each name to (its configurations, the reference row its paired tests compare against). The sets in
FROM_PRETRAINED start from their backbone pretrained on the source task (pretraining()), which compare.py
trains first into <out>/pretrain/.
Nothing here runs anything: `python -c "from studies import sets; print(sets.SWEETSPOT)"` shows a set.
"""
from gating import GATE_KINDS

# name -> train.py flags. Everything else (backbone, epochs, lr, image size, ...) is the dataset preset,
# the same for all: the rows differ only in their model (and its paper's loss, see baselines.py).
MODELS = {
    "linear": ["--model", "linear"],
    "mlgcn": ["--model", "mlgcn"],
    "q2l": ["--model", "q2l"],
    "hsq": ["--model", "hsq"],
    "drmoe": ["--model", "drmoe"],
    "drmoe gate=static": ["--model", "drmoe", "--gate", "static"],
    "drmoe gate=label": ["--model", "drmoe", "--gate", "label"],
    "drmoe gate=image": ["--model", "drmoe", "--gate", "image"],
}
SHARED, OWN = (0, 1, 2, 4), (1, 2)


def ablation_name(gate: str, s: int, t: int) -> str:
    return f"{gate} S={s} T={t}"


# With S + T = 1 the gate has one expert to weigh: softmax over one logit is the constant 1 and its
# gradient is 0, so all four kinds are the same model, trained identically. One run stands for all four.
ABLATION = {ablation_name(g, s, t): ["--gate", g, "--shared-experts", str(s), "--task-experts", str(t)]
            for s in SHARED for t in OWN for g in GATE_KINDS if s + t > 1 or g == "dynamic"}
# The collapse study. Dense routing rarely starves an expert; top-1 routing (each label's feature goes
# to one expert) is where collapse is known to bite. Switch Transformer's coefficient, 0.01.
DEFAULT = ablation_name("dynamic", 2, 1)   # DR-MoE's defaults: the ablation cell and the balance reference
BALANCE = {DEFAULT: ABLATION[DEFAULT],
           f"{DEFAULT} aux=0.01": ABLATION[DEFAULT] + ["--aux-loss-coef", "0.01"],
           f"{DEFAULT} top1": ABLATION[DEFAULT] + ["--top-k", "1"],
           f"{DEFAULT} top1 aux=0.01": ABLATION[DEFAULT] + ["--top-k", "1", "--aux-loss-coef", "0.01"]}
# Does routing find the scenes (divdr.py)? DR-MoE dense and top-1, each plain, with the Switch loss, with DivDR
# and with both; the static gate (one route for every image) as the floor of structure. DIVDR_COEF by a
# calibration on seed 0 (results/routing/README.md): larger coefficients overwhelm the classification loss.
DIVDR_COEF = "0.03"
ROUTING = {}
for _k, _flags in (("drmoe", []), ("drmoe top1", ["--top-k", "1"])):
    for _extra, _more in (("", []), (" aux=0.01", ["--aux-loss-coef", "0.01"]), (" divdr", ["--divdr-coef", DIVDR_COEF]),
                          (" aux=0.01 divdr", ["--aux-loss-coef", "0.01", "--divdr-coef", DIVDR_COEF])):
        ROUTING[_k + _extra] = ["--model", "drmoe", *_flags, *_more]
ROUTING["drmoe gate=static"] = ["--model", "drmoe", "--gate", "static"]
# MoE inside the backbone (backbone_moe.py) on vit_tiny: the linear head on the dense backbone and on MoE at
# placements {last2, every2} x experts {4, 8} x k {1, 2}, and DR-MoE's head on the dense backbone. The MoE rows
# train with the Switch balance loss at 0.01 (Switch Transformer's coefficient, as in BALANCE): without it the
# routers collapsed onto one expert (results/sweetspot/README.md), which would measure a dense model with extra
# weights. Then DR-MoE's head on the two MoE backbones with the best seed-0 *validation* mAP of the eight linear
# MoE rows (test never chooses; the choice is recorded in results/sweetspot/README.md): MoE in the backbone,
# in the head, in both, in neither. --aux-loss-coef is one flag for head and backbone, so these rows also
# balance the head's gate, which "vit_tiny dense drmoe" does not.
SWEETSPOT_BEST = ("vit_tiny last2 N=8 k=2", "vit_tiny last2 N=4 k=2")
SWEETSPOT = {"vit_tiny dense": ["--backbone", "vit_tiny", "--model", "linear"],
             "vit_tiny dense drmoe": ["--backbone", "vit_tiny", "--model", "drmoe"]}
for _p in ("last2", "every2"):
    for _n in (4, 8):
        for _k in (1, 2):
            SWEETSPOT[f"vit_tiny {_p} N={_n} k={_k}"] = ["--backbone", "vit_tiny", "--model", "linear", "--backbone-moe",
                                                         _p, "--backbone-experts", str(_n), "--backbone-top-k", str(_k),
                                                         "--aux-loss-coef", "0.01"]
for _name in SWEETSPOT_BEST:
    SWEETSPOT[_name + " drmoe"] = ["drmoe" if f == "linear" else f for f in SWEETSPOT[_name]]
# The same grid in the other architecture the paper studies, ConvNeXt: convnext_mini (stages of 2, 2, 4
# blocks: last2 = blocks 3 and 7, every2 = 1, 3, 5, 7), pretrained on the source task like vit_tiny (from
# scratch it learns too slowly to compare placements: results/sweetspot/README.md), with the linear head only:
# the head's MoE is asked on vit_tiny. Its own set, so that its paired tests are against its own dense backbone.
SWEETSPOT_CONVNEXT = {"convnext_mini dense": ["--backbone", "convnext_mini", "--model", "linear"]}
for _p in ("last2", "every2"):
    for _n in (4, 8):
        for _k in (1, 2):
            SWEETSPOT_CONVNEXT[f"convnext_mini {_p} N={_n} k={_k}"] = [
                "--backbone", "convnext_mini", "--model", "linear", "--backbone-moe", _p, "--backbone-experts",
                str(_n), "--backbone-top-k", str(_k), "--aux-loss-coef", "0.01"]
# ML-VPT (mlvpt.py) in a transfer setting: vit_tiny pretrained on the source task (synthetic-pretrain,
# PRETRAIN below, run first by main()), then adapted to the benchmark. Each row names its own head and what
# trains; compare.main() adds --weights <out>/pretrain/pretrain/seed0/best.pt to every row.
# Every row trains with ML-VPT's official recipe, so that rows differ in how they adapt the backbone and in
# nothing else: ASL with Q2L's settings and AdamW decaying every trainable parameter with no gradient clipping
# (mlvpt.PRESET); the mlvpt rows have it from their preset, the others get it as flags.
VIT = ["--backbone", "vit_tiny"]
MLVPT_RECIPE = ["--loss", "asl", "--asl-gamma-neg", "2", "--asl-gamma-pos", "0", "--asl-clip", "0", "--asl-eps", "1e-5",
                "--asl-detach-focusing", "--decay-all", "--grad-clip", "0"]
MLVPT_SET = {"linear probe": VIT + ["--model", "linear", "--freeze-backbone"] + MLVPT_RECIPE,
             "vpt-deep": VIT + ["--model", "mlvpt", "--mlvpt-grouping", "none"],
             "mlvpt co": VIT + ["--model", "mlvpt", "--mlvpt-branches", "co"],
             "mlvpt dc": VIT + ["--model", "mlvpt", "--mlvpt-branches", "dc"],
             "mlvpt": VIT + ["--model", "mlvpt"],
             "mlvpt random groups": VIT + ["--model", "mlvpt", "--mlvpt-grouping", "random"],
             "full fine-tuning": VIT + ["--model", "linear"] + MLVPT_RECIPE,
             "drmoe frozen": VIT + ["--model", "drmoe", "--freeze-backbone"] + MLVPT_RECIPE}
# The source-task run every ML-VPT, vit_tiny sweet-spot and backbone-routing row starts from: the linear head
# on vit_tiny, seed 0, the set's budget (convnext_mini's is the same on its backbone: pretraining()). The
# sweet-spot rows start from it too: trained from scratch on 5,000 images, the small transformers were still
# gaining about a point an epoch when the schedule annealed (results/sweetspot/README.md), so MoE placements
# compared there would be compared on the slope. From the pretrained backbone the MoE layers are upcycled
# (backbone_moe.py: experts start as copies of its MLP).
PRETRAIN = VIT + ["--dataset", "synthetic-pretrain", "--model", "linear"]


def pretraining(backbone: str):
    """The source-task run a transfer row on `backbone` starts from -> (its name in <out>/pretrain/, its
    flags). vit_tiny's keeps the bare name "pretrain" that the ML-VPT and sweet-spot runs were made with."""
    flags = ["--backbone", backbone] + PRETRAIN[2:]   # PRETRAIN with the row's backbone
    return ("pretrain" if backbone == "vit_tiny" else f"pretrain {backbone}"), flags



# Does routing find the scenes inside the backbone? The last-2 placement on the pretrained vit_tiny, top-1 over 8 experts, each plain / Switch loss / DivDR / both.
# The DivDR coefficient is the head's (DIVDR_COEF), not calibrated for backbone routers: the signature's
# distance is the mean over rows, so a margin means the same, but the gradient now reaches the patch tokens.
# The "aux=0.01" row has the flags of the sweet-spot row "vit_tiny last2 N=8 k=1". The plain row is named
# "... no aux": a row's folder is its name (compare.run_dir), the transfer sets share one --out, and under
# the bare name it would have found the sweet-spot row's finished run, trained with the Switch loss.
ROUTING_BACKBONE = {}
for _extra, _more in ((" no aux", []), (" aux=0.01", ["--aux-loss-coef", "0.01"]), (" divdr", ["--divdr-coef", DIVDR_COEF]),
                      (" aux=0.01 divdr", ["--aux-loss-coef", "0.01", "--divdr-coef", DIVDR_COEF])):
    ROUTING_BACKBONE["vit_tiny last2 N=8 k=1" + _extra] = VIT + ["--model", "linear", "--backbone-moe", "last2",
                                                                "--backbone-experts", "8", "--backbone-top-k", "1",
                                                                *_more]
# What grouping costs (model.py, "Label groups"): DR-MoE's task-specific experts per label against per group of
# labels (K = 5 groups from the training labels' co-occurrence, the number ML-VPT's official configs use for
# VOC and COCO), and the K groups decoded as ML-Decoder does against the L label queries. The reference is the
# middle row, so that each paired test changes one thing: grouping the experts, then decoding by group.
GROUPING = {"drmoe": ["--model", "drmoe"],
            "drmoe K=5": ["--model", "drmoe", "--label-groups", "5"],
            "drmoe K=5 group decoding": ["--model", "drmoe", "--label-groups", "5", "--group-decoding"]}
FROM_PRETRAINED = ("mlvpt", "sweetspot", "sweetspot-convnext", "routing-backbone")
SETS = {"models": (MODELS, "drmoe"), "ablation": (ABLATION, DEFAULT), "balance": (BALANCE, DEFAULT),
        "routing": (ROUTING, "drmoe"), "routing-backbone": (ROUTING_BACKBONE, "vit_tiny last2 N=8 k=1 no aux"),
        "sweetspot": (SWEETSPOT, "vit_tiny dense"), "sweetspot-convnext": (SWEETSPOT_CONVNEXT, "convnext_mini dense"),
        "mlvpt": (MLVPT_SET, "mlvpt"), "grouping": (GROUPING, "drmoe K=5")}

