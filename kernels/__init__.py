"""stattn.kernels: the Triton kernels and their launchers (installed from the repo's kernels/)."""
from .launch import backward, block_config, forward

__all__ = ["forward", "backward", "block_config"]
