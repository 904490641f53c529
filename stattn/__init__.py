"""stattn: fused attention-control kernels for text-to-image diffusion."""
from ._validate import set_value_checks
from .basis import ScoreOffset, gaussian_basis
from .ops import backend_for, region_attention

__all__ = ["region_attention", "ScoreOffset", "gaussian_basis", "set_value_checks", "backend_for"]
__version__ = "0.1.0"
from .control import Controller, CrossAttentionCall  # noqa: E402
from .processors import accelerate, restore  # noqa: E402

__all__ += ["Controller", "CrossAttentionCall", "accelerate", "restore"]
