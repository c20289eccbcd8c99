"""The process group under torchrun: who am I (rank), how many are we (world size), wait for the others.

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`session`
joins them into one ``torch.distributed`` group (nccl on CUDA, gloo on the CPU, which is how the tests run two
processes). Outside torchrun every helper answers as the only process, so callers need no special case.
"""

from __future__ import annotations

import contextlib
import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's index among all processes (0 outside torchrun)."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    """How many processes share the work (1 outside torchrun)."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """Rank 0: the process that writes shared files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process has reached this point (nothing to wait for when alone)."""
    dist = _dist()
    if dist:
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` when alone."""
    dist = _dist()
    if not dist:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_from_env(device=None) -> bool:
    """Join torchrun's process group if launched by it and not joined yet: nccl for a CUDA ``device`` (made
    this process's current device), gloo otherwise. Returns whether this call created the group."""
    import torch
    import torch.distributed as dist

    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


@contextlib.contextmanager
def session(device=None):
    """``with session(device):`` the process group for the block (see :func:`init_from_env`); it is torn down
    at the end only if this block created it."""
    created = init_from_env(device)
    try:
        yield
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
