"""ellava: a reproducibility kit for EfficientLLaVA (CVPR 2025) — thin library, one module per stage."""

__version__ = "0.1.0"
