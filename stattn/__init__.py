"""stattn: fused attention-control kernels for text-to-image diffusion."""
from ._validate import set_value_checks, value_checks
from .basis import ScoreOffset, gaussian_basis
from .integration.control import Controller, CrossAttentionCall
from .ops import backend_for, region_attention
from .integration.processors import NotAcceleratedWarning, Status, accelerate, restore, status

__version__ = "0.1.0"

# Imported on first use: they pull in diffusers / transformers, which `import stattn` need not pay for.
_LAZY = {
    "Runner": ("integration.runner", "Runner"),
    "RunResult": ("integration.runner", "RunResult"),
    "AttentionMaps": ("integration.maps", "AttentionMaps"),
    "models": ("integration.models", None),
    "AttentionRegulation": ("methods.regulation", "AttentionRegulation"),
    "token_indices": ("integration.tokens", "token_indices"),
    "eos_index": ("integration.tokens", "eos_index"),
    "SpatialTemporal": ("methods.spacetime", "SpatialTemporal"),
    "AttendAndExcite": ("methods.attend_excite", "AttendAndExcite"),
    "compose": ("methods.compose", "compose"),
    "Layout": ("methods.spacetime.layout", "Layout"),
    "LayoutPredictor": ("methods.spacetime.layout", "LayoutPredictor"),
    "RuleLayoutPredictor": ("methods.spacetime.layout", "RuleLayoutPredictor"),
}

__all__ = ["region_attention", "ScoreOffset", "gaussian_basis", "set_value_checks", "value_checks", "backend_for",
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
