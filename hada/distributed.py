"""torch.distributed under torchrun: one process group from torchrun's environment, and the few collectives that
sharded extraction, the trainer and the loss need. Without torchrun every helper answers as the only process, so
callers need no special case.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
reads them through ``init_process_group("env://")`` with NCCL when the run's device is CUDA, else gloo (which
is how the tests run two ranks on a CPU).
"""

from __future__ import annotations

import atexit
import contextlib
import os


def launched() -> bool:
    """Whether torchrun (or another launcher setting the env:// variables) started this process among several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group with more than one rank is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device=None) -> bool:
    """Join torchrun's process group (once per process); returns :func:`active`.

    ``device``: the torch.device the run computes on; CUDA picks NCCL (and makes this rank's GPU the current
    one), anything else gloo. Without torchrun's environment this does nothing.
    """
    _join(device)
    return active()


def _join(device) -> bool:
    """Create the process group if torchrun launched us and nobody has yet; whether this call created it."""
    import torch
    import torch.distributed as dist

    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    atexit.register(_destroy)
    return True


@contextlib.contextmanager
def session(device=None):
    """``with session(device):`` the process group for the block; torn down at the end only if this block
    created it (a caller inside a training run keeps the run's group)."""
    created = _join(device)
    try:
        yield
    finally:
        if created:
            _destroy()


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank has reached this point (nothing to wait for when alone)."""
    if not active():
        return
    if _dist().get_backend() == "nccl":
        import torch

        _dist().barrier(device_ids=[torch.cuda.current_device()])
    else:
        _dist().barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when alone."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few float64 numbers (epoch totals)."""
    if not active():
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    _dist().all_reduce(t)
    return t.tolist()


def all_gather(tensor):
    """``[world_size * n, ...]``: every rank's ``tensor`` (equal shapes on every rank), in rank order."""
    import torch

    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    _dist().all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_rows(tensors: list) -> tuple[list, list[int]]:
    """Every rank's rows of each tensor, concatenated in rank order; ranks may hold different row counts.

    Returns ``(gathered, counts)`` with ``counts[r]`` the rows rank r gave. Rows are padded to the largest
    count for the collective (it needs equal shapes) and cut back afterwards. No gradient flows back.
    """
    import torch

    if not active():
        return list(tensors), [int(tensors[0].shape[0])]
    n = int(tensors[0].shape[0])
    counts = [int(c) for c in all_gather(torch.tensor([n], device=tensors[0].device)).tolist()]
    most = max(counts)
    out = []
    for t in tensors:
        t = t.detach()
        if n < most:
            t = torch.cat([t, t.new_zeros((most - n,) + tuple(t.shape[1:]))])
        parts = all_gather(t).split(most)
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return out, counts


def _collective_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if _dist().get_backend() == "nccl" else "cpu"


def _dist():
    import torch.distributed as dist

    return dist
