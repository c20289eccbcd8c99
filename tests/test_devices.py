"""hada.devices: auto is the CPU here; a CUDA device this machine lacks is one clear error."""

import pytest
import torch

from hada.devices import resolve_device
from hada.errors import HadaError


def test_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(HadaError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(HadaError, match="unknown device|not supported"):
        resolve_device("tpu7")
