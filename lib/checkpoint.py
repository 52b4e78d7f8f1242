"""
A run's checkpoint as a file: what train.py writes (the raw module's state_dict, its EMA, both configs, the
class names, the optimizer and RNG states to resume), written atomically and read back safely.

    save_checkpoint(path, state)     atomic write: a temporary file, then a rename
    rng_state(device) / set_rng_state every random stream of a run, stored as tensors and plain values
    load_file(path)                  -> torch.load with weights_only=True (older files: numpy arrays allowed)
    read_checkpoint(path)            -> the dict, or a one-line ValueError saying what the file is not
    judged_weights(ckpt)             -> the state_dict the run was judged by (EMA or raw)

Written by train.py through save_checkpoint (a temporary file, then an atomic rename), with rng_state's
random streams so that --resume continues them. Knows no model: zoo.load_checkpoint_model turns a file into
a model again, and backbones.py reads a best.pt's backbone through load_file (--weights best.pt).
"""
import os
import pickle
import random
import shutil

import numpy as np
import torch


def judged_weights(ckpt) -> dict:
    """The state_dict a checkpoint was judged by: its EMA weights or its raw ones (train.py picks the better).
    A best.pt holds only those, under "model" (its "ema" is None); a last.pt holds both."""
    return ckpt["ema"] if ckpt.get("eval_weights", "raw") == "ema" and ckpt.get("ema") is not None else ckpt["model"]


def rng_state(device: torch.device) -> dict:
    """Every random stream the run draws from, so a resumed run continues them instead of restarting them."""
    # numpy's state as plain values and a tensor, not its ndarray: the checkpoint then loads with
    # torch.load(weights_only=True), which refuses numpy arrays (and so arbitrary pickled code).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, then rename: a crash mid-write never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def numpy_globals():
    """What an older checkpoint's numpy RNG state needs to be unpickled: arrays and their dtypes, nothing
    that can run code. Allowed only for the second try of load_file."""
    core = getattr(np, "_core", None) or np.core   # numpy 2 renamed the module the pickles name
    return [core.multiarray._reconstruct, np.ndarray, np.dtype] + [type(np.dtype(t)) for t in
                                                                   ("uint32", "int64", "float64", "float32")]


def load_file(path: str) -> dict:
    """torch.load(weights_only=True): tensors, numbers, strings and containers only, no pickled code. Every
    checkpoint train.py writes loads this way (its numpy RNG state is stored as a tensor). One of an older
    train.py (a numpy array inside) loads on a second try with numpy's array types allowed, still with
    weights_only=True: nothing in the file can run code either way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "numpy" not in str(e):   # not an older checkpoint: not a checkpoint at all (the caller says so)
            raise
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str) -> dict:
    """load_file of a train.py checkpoint, or a ValueError in one line saying what the file is not."""
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file (train.py writes <out-dir>/best.pt and last.pt; "
                         "the run folder is printed at the start of training)")
    try:
        ckpt = load_file(path)
    except Exception as e:  # not a zip / pickle: a README, an image, a truncated download...
        raise ValueError(f"--checkpoint {path}: not a checkpoint torch can read ({type(e).__name__}); "
                         "pass a best.pt or last.pt written by train.py") from None
    missing = [k for k in ("model_config", "train_config", "model", "classes") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"--checkpoint {path}: a torch file, but not one written by train.py (no {', '.join(missing)})")
    return ckpt
