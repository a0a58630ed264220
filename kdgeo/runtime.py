"""Where a run computes and in what precision: the device, the weights' dtype, the autocast context.

One home for what the probe, eval, distill, the teacher fine-tune and the caches all need:
:func:`resolve_device` (only CPUs and CUDA GPUs), :func:`autocast_dtype` and :func:`weight_dtype`
(what ``precision`` means on a device), :func:`precision_name` (how runs report it),
:func:`autocast` (the one autocast context) and :func:`forward` (a model call under it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdgeo.errors import KdgeoError
from kdgeo.spec import device_problem


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """The torch device for a device setting; only CPUs and CUDA GPUs (torch also parses meta, mps, xpu, ...)."""
    problem = device_problem(name)
    if problem:
        raise KdgeoError(f"{setting}: {problem}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdgeoError(f"{setting} '{name}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdgeoError(
            f"device '{name}' was asked for ({setting}), but CUDA is not available here; set {setting} to cpu (or "
            "auto)."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KdgeoError(
            f"device '{name}' ({setting}) does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = no autocast: the weights' own
    dtype, float32, or float64 under ``fp64`` -- see :func:`weight_dtype`)."""
    if precision in ("fp32", "fp64"):
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weight_dtype(precision: str) -> torch.dtype | None:
    """The dtype models are cast to for ``precision``: float64 for ``fp64`` (no autocast, so
    every op runs in float64 and CPU kernel differences stay near 1e-12), else None (as loaded;
    mixed precision comes from autocast, see :func:`autocast_dtype`)."""
    return torch.float64 if precision == "fp64" else None


def precision_name(precision: str, device: torch.device) -> str:
    """What a run reports as its precision: fp64, fp32 (no autocast), or the autocast dtype (bfloat16, float16)."""
    if weight_dtype(precision) is not None:
        return "fp64"
    amp = autocast_dtype(precision, device)
    return str(amp).replace("torch.", "") if amp is not None else "fp32"


def autocast(device: torch.device, amp: torch.dtype | None) -> torch.autocast:
    """Autocast to ``amp`` on ``device``, or a disabled context when ``amp`` is None (fp32/fp64)."""
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


def forward(
    model: nn.Module, inputs: dict[str, torch.Tensor], hidden: bool, amp: torch.dtype | None, device: torch.device
) -> Any:
    """``model(**inputs)`` under :func:`autocast`, with every hidden state when ``hidden``."""
    with autocast(device, amp):
        return model(**inputs, output_hidden_states=hidden)
