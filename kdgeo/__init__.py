"""kdgeo: geometry-aware knowledge distillation for transformers."""

__version__ = "0.1.0"
