"""kdgeo: geometry-aware knowledge distillation for transformers.

The Python API (:mod:`kdgeo.api`, :mod:`kdgeo.feature_loss`)::

    import kdgeo

    run = kdgeo.distill("run.toml", overrides={"train.epochs": 1})     # -> RunResult
    probed = kdgeo.probe("bert-base-uncased", run.student_dir)          # -> ProbeResult
    table = kdgeo.compare(["runs/sweep"], baseline="ce")                # -> Comparison
    spec = kdgeo.load_spec("run.toml", overrides=["train.lr=3e-5"])    # -> RunSpec
    loss = kdgeo.FeatureDistillationLoss("procrustes", pairs=[(2, 6)])  # a torch.nn.Module

``import kdgeo`` stays cheap (no torch, transformers or pydantic): every name below loads its module on
first use (PEP 562). The engine behind the API lives in modules named for what they do
(:mod:`kdgeo.distillation`, :mod:`kdgeo.probing`, :mod:`kdgeo.comparison`), so ``kdgeo.distill``,
``kdgeo.probe`` and ``kdgeo.compare`` are plain functions, never shadowed by a submodule.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "distill": "kdgeo.api",
    "probe": "kdgeo.api",
    "compare": "kdgeo.api",
    "load_spec": "kdgeo.api",
    "RunResult": "kdgeo.api",
    "SweepResult": "kdgeo.api",
    "SweepRunResult": "kdgeo.api",
    "ProbeResult": "kdgeo.api",
    "Comparison": "kdgeo.api",
    "FeatureDistillationLoss": "kdgeo.feature_loss",
    "RunSpec": "kdgeo.spec",
    "KdgeoError": "kdgeo.errors",
    "SpecError": "kdgeo.errors",
    "RunInterrupted": "kdgeo.errors",
}
"""Public name -> the module that defines it, imported on first use."""

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # what type checkers see for `kdgeo.NAME` (at run time: __getattr__ below)
    from kdgeo.api import Comparison as Comparison
    from kdgeo.api import ProbeResult as ProbeResult
    from kdgeo.api import RunResult as RunResult
    from kdgeo.api import SweepResult as SweepResult
    from kdgeo.api import SweepRunResult as SweepRunResult
    from kdgeo.api import compare as compare
    from kdgeo.api import distill as distill
    from kdgeo.api import load_spec as load_spec
    from kdgeo.api import probe as probe
    from kdgeo.errors import KdgeoError as KdgeoError
    from kdgeo.errors import RunInterrupted as RunInterrupted
    from kdgeo.errors import SpecError as SpecError
    from kdgeo.feature_loss import FeatureDistillationLoss as FeatureDistillationLoss
    from kdgeo.spec import RunSpec as RunSpec


def __getattr__(name: str) -> Any:
    """PEP 562: the exported names and the submodules, imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # binds the submodule here
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
