"""kdgeo.runtime: which devices a run may ask for."""

from __future__ import annotations

import pytest
import torch

from kdgeo.errors import KdgeoError
from kdgeo.runtime import resolve_device


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "cuda:-1", "CPU"])
def test_resolve_device_accepts_only_cpu_and_cuda(name):
    with pytest.raises(KdgeoError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name, "train.device")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
