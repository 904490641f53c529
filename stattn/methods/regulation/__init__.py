"""Attention Regulation: a Gaussian-basis offset on the target tokens' scores, optimised per step.

``controller``: :class:`AttentionRegulation`; ``core``: the fused inner loop (Triton / C++ /
reference backends); ``reference``: the released per-layer computation, eager.
"""
from .controller import AttentionRegulation

__all__ = ["AttentionRegulation"]
