"""
The tiny model every training test shares: ResNet-18 cut at layer2, 32-px images, a 32-wide decoder and
experts, so a CPU epoch over a few dozen images takes about a second. Each test file adds its own run
length (--limit, --batch-size, --epochs, --ema-decay) to TINY_MODEL.
"""
TINY_MODEL = ["--image-size", "32", "--feature-layer", "layer2", "--dim", "32", "--heads", "2", "--ff-dim", "64",
              "--expert-hidden", "32"]

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def have(path: str) -> bool:
    """Whether a file or folder of the project is in this copy: a DR-MoE fork deletes the system files and
    studies/ (tests/test_fork.py), and the core's tests that use one of them skip there."""
    return os.path.exists(os.path.join(ROOT, path))


# The quickest head for a test about the loop and its files, not the model: the linear head where
# baselines.py is, DR-MoE in a fork without it.
FAST = ["--model", "linear"] if have("baselines.py") else []

# What the docs say of each part a fork may delete: a link, a command or a flag that names one of these is about
# that part, and a fork without it skips it (tests/test_docs.py).
PART_WORDS = {
    "baselines.py": ("baselines", "--model q2l", "--model hsq", "--model mlgcn", "--model linear", "--gcn-", "--word-vectors"),
    "mlvpt.py": ("mlvpt", "--prompts-per-group", "--adapter-dim"),
    "backbone_moe.py": ("backbone_moe", "--backbone-moe", "--backbone-experts", "--backbone-top-k", "--backbone-capacity",
                        "--backbone-renorm", "--backbone-router-noise", "--backbone-balance"),
    "divdr.py": ("divdr", "--divdr"),
    "studies": ("studies",),
    "results": ("results/",),
}


def names_a_deleted_part(text: str) -> bool:
    """Whether a link, a command or a test name is about a part this copy does not have."""
    return any(w in text for part, words in PART_WORDS.items() if not have(part) for w in words)
