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
