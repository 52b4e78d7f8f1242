"""
Data-parallel training over several processes (torchrun + DistributedDataParallel), and the few
collective steps the loop needs around it. Nothing here runs in a plain `python train.py`.

    torchrun --standalone --nproc_per_node 4 train.py --dataset coco --data-root data/coco     # 4 GPUs, one node
    torchrun --nproc_per_node 2 train.py --device cpu --limit 256 --epochs 1                    # 2 CPU processes (gloo)

How data parallelism works here (PyTorch DDP, Li et al., VLDB 2020): every process ("rank") holds a full
copy of the model, takes a different 1/W of every batch (W = world size), and after backward DDP
averages the gradients over the ranks, so every rank applies the same update and the copies never drift.
What the loop has to add, and where:

- setup(): torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the backend is nccl for CUDA, gloo for CPU;
  each process drives one GPU (cuda:LOCAL_RANK).
- The batch: --batch-size is the *global* batch, split evenly over the ranks, so the same command line
  keeps the same recipe (lr, schedule, steps per epoch) on 1 GPU or 8.
- Data: a DistributedSampler gives each rank its own shard of every epoch (set_epoch reshuffles).
- Evaluation: every rank scores its shard and gather_rows() puts the whole split back together, in the
  dataset's order and without the duplicates the sampler pads with, so each image counts exactly once
  and the metrics equal a single process's (tests/test_distributed.py checks it).
- Buffers: DDP does not average BatchNorm's running statistics (each rank sees different images). By
  default it copies rank 0's to every rank at the start of each forward, so after the last step of an
  epoch they differ by that step's update; sync_buffers() copies rank 0's once more before every
  evaluation and checkpoint. --sync-bn uses SyncBatchNorm instead, which computes the batch statistics
  over all ranks (useful when the per-GPU batch is small).
- Only rank 0 prints, logs and writes checkpoints (is_main).

Shapes: gather_rows takes this rank's rows (n_r, ...) and their dataset indices (n_r,) -> (N, ...) on
every rank, N the dataset size.
"""
import os

import numpy as np
import torch
import torch.distributed as dist


def setup(device_name: str):
    """-> (rank, world_size, device). Starts the process group when launched by torchrun, else (0, 1, None)."""
    if "RANK" not in os.environ:
        return 0, 1, None                       # a plain `python train.py`: train.pick_device decides
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    # Fail at start-up, on every rank, rather than fall back silently to a slow CPU run or crash in nccl.
    if device_name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda under torchrun, but this machine has no usable CUDA device")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"torchrun started process LOCAL_RANK={local_rank}, but this node has only "
                           f"{torch.cuda.device_count()} GPU(s): pass --nproc_per_node {torch.cuda.device_count()} "
                           "(or --device cpu for CPU processes)")
    if device_name not in ("auto", "cuda", "cpu"):
        raise RuntimeError(f"--device {device_name} under torchrun: DDP here runs on CUDA (nccl) or CPU (gloo)")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)           # before init: nccl binds each process to its GPU
    else:
        device = torch.device("cpu")
    # nccl is the fast GPU-to-GPU backend; gloo runs anywhere (CPU training, tests, machines without nccl).
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, or a single process: the one that prints, logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the ranks (in place; a no-op for a single process). For logging only."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sync_buffers(module: torch.nn.Module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all ranks evaluate one model."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def gather_rows(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Each rank's rows (n_r, ...) with their dataset indices (n_r,) -> all n rows, in index order, on every rank.

    A DistributedSampler pads the dataset to a multiple of W by repeating its first indices, so every
    rank has the same n_r (all_gather needs equal sizes) and a few images appear twice. Sorting the
    gathered rows by index and keeping the first row of each index undoes both.
    """
    if not dist.is_initialized():
        return rows
    # nccl gathers GPU tensors only; gloo CPU tensors. Move there and back.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(rows, device=dev) for _ in range(dist.get_world_size())]
    idx = [torch.empty_like(index, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.to(dev))
    dist.all_gather(idx, index.to(dev))
    rows, index = torch.cat(parts).cpu(), torch.cat(idx).cpu()    # (W * n_r, ...), (W * n_r,)
    _, first = np.unique(index.numpy(), return_index=True)        # first occurrence of 0..n-1, sorted by index
    assert len(first) == n, f"gathered {len(first)} distinct images, expected {n}"
    return rows[torch.from_numpy(first)]                          # (n, ...)


def sampler(dataset, shuffle: bool, seed: int):
    """Under torchrun a DistributedSampler (each rank its own shard; the same seed on every rank, so the shards
    partition each epoch; padded and, for training, the last uneven batch dropped), else None: the DataLoader's own."""
    if not dist.is_initialized():
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=shuffle)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` under torchrun (it copies rank 0's weights to every rank), else `model`."""
    if not dist.is_initialized():
        return model
    import warnings
    # With T = 1 the task experts' (L, 1, D, H) weights get gradients whose stride on the size-1 axis differs
    # from the parameter's; autograd ignores size-1 strides, DDP's bucket check does not and warns every run.
    # The memory layout is the same, so the warning says nothing here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather_objects(obj) -> list:
    """[every rank's obj] in rank order (pickled, any size); [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
