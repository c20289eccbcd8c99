"""Which device a step runs on: ``auto`` is CUDA when present (under torchrun, this process's own GPU), else the CPU.

Every command and chapter takes the same ``device`` value and resolves it here, so ``--device cuda`` on a machine
without CUDA is one clear line wherever it is given.
"""

from __future__ import annotations

import os

from hada.errors import HadaError

DEVICE_CHOICES_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


def local_rank() -> int:
    """This process's index on its machine under torchrun (``LOCAL_RANK``), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | None = "auto"):
    """A ``torch.device`` for ``name``; a device that this machine does not have is a :class:`HadaError`."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        name = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HadaError(f"unknown device {name!r}; use {DEVICE_CHOICES_HELP}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise HadaError(f"device {name!r} is not supported; use {DEVICE_CHOICES_HELP}")
    if not torch.cuda.is_available():
        raise HadaError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__} sees none); "
                        "use --device cpu or auto")
    index = device.index if device.index is not None else local_rank()
    if index >= torch.cuda.device_count():
        raise HadaError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
