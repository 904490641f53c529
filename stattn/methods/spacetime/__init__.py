"""Spatial-temporal attention control: per-object regions mixing the prompt's attention with each
object's own description, with per-step weights optimised against CLIP.

``controller``: :class:`SpatialTemporal`, :func:`combine` and the CLIP optimisation; ``layout``:
the regions (boxes, centres, the rule-based layout predictor).
"""
from .controller import SpatialTemporal
from .layout import Layout, LayoutPredictor, RuleLayoutPredictor

__all__ = ["SpatialTemporal", "Layout", "LayoutPredictor", "RuleLayoutPredictor"]
