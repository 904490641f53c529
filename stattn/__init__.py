"""stattn: fused attention-control kernels for text-to-image diffusion."""
from ._validate import set_value_checks
from .basis import ScoreOffset, gaussian_basis
from .control import Controller, CrossAttentionCall
from .ops import backend_for, region_attention
from .processors import NotAcceleratedWarning, Status, accelerate, restore, status

__version__ = "0.1.0"

# Imported on first use: they pull in diffusers / transformers, which `import stattn` need not pay for.
_LAZY = {
    "Runner": ("runner", "Runner"),
    "RunResult": ("runner", "RunResult"),
    "AttentionMaps": ("maps", "AttentionMaps"),
    "models": ("models", None),
    "AttentionRegulation": ("regulation", "AttentionRegulation"),
    "token_indices": ("tokens", "token_indices"),
    "eos_index": ("tokens", "eos_index"),
    "SpatialTemporal": ("spacetime", "SpatialTemporal"),
    "Layout": ("layout", "Layout"),
    "LayoutPredictor": ("layout", "LayoutPredictor"),
    "RuleLayoutPredictor": ("layout", "RuleLayoutPredictor"),
}

__all__ = ["region_attention", "ScoreOffset", "gaussian_basis", "set_value_checks", "backend_for",
           "Controller", "CrossAttentionCall", "accelerate", "restore", "status", "Status", "NotAcceleratedWarning",
           *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stattn' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
