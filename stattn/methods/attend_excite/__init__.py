"""Attend-and-Excite: the latents are nudged so that every target token reaches a high maximum in
its smoothed cross-attention map (diffusers' StableDiffusionAttendAndExcitePipeline, reproduced).

``controller``: :class:`AttendAndExcite` (apply / remove, the maps from the fused op); ``loop``: the
denoising loop, the whole batch at once; ``core``: the loss; ``stock``: diffusers' own pipeline
under :func:`stattn.accelerate` (its AttentionStore fed from the fused op).
"""
from .controller import AttendAndExcite

__all__ = ["AttendAndExcite"]
