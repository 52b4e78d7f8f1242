"""
The tiny model every training test shares: ResNet-18 cut at layer2, 32-px images, a 32-wide decoder and
experts, so a CPU epoch over a few dozen images takes about a second. Each test file adds its own run
length (--limit, --batch-size, --epochs, --ema-decay) to TINY_MODEL.
"""
TINY_MODEL = ["--image-size", "32", "--feature-layer", "layer2", "--dim", "32", "--heads", "2", "--ff-dim", "64",
              "--expert-hidden", "32"]
