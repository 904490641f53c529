"""Attention Regulation and spatial-temporal control in one pass per layer (no released code does this).

:func:`compose` returns a :class:`Composed` controller. At every cross-attention layer call it runs
spatial-temporal control's one ``region_attention`` call (region 0 the full prompt, regions 1..n
the objects' own descriptions under their masks and this step's weights) with Attention
Regulation's offset on region 0: on the layers and steps Attention Regulation edits, its inner loop
first optimises θ on the prompt's probabilities (q against the prompt's keys, exactly as it does
alone) and writes θ_eff into the offset in place. So an edited layer call costs spatial-temporal's
launches plus the inner loop's, and nothing else:

- with zero spatial weights the composed output is Attention Regulation's alone (the affine
  region 0 weight is then 1, and region 0 carries the offset);
- with no edit steps (or on layers Attention Regulation does not edit) it is spatial-temporal's.

The inner loop optimises θ against the prompt's own attention maps, not the mixed output: that is
the loss Attention Regulation defines, and it keeps each method's state what it would be alone.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..integration.control import Controller, CrossAttentionCall
from ..integration.processors import accelerate, restore
from .._validate import value_checks
from .regulation.controller import AttentionRegulation
from .spacetime.controller import SpatialTemporal

__all__ = ["compose", "Composed", "METHOD"]

METHOD = "regulation+spacetime"      # the name in the CLI (--method) and in settings()


def compose(regulation: AttentionRegulation, spacetime: SpatialTemporal) -> "Composed":
    """Attention Regulation's optimised offset on spatial-temporal control's prompt region, one
    ``region_attention`` call per layer. Install with ``compose(ar, st).apply(pipe, prompt=...)``."""
    return Composed(regulation, spacetime)


class Composed(Controller):
    def __init__(self, regulation: AttentionRegulation, spacetime: SpatialTemporal):
        if not isinstance(regulation, AttentionRegulation):
            raise TypeError(f"regulation: expected a stattn.AttentionRegulation, got {type(regulation).__name__}")
        if not isinstance(spacetime, SpatialTemporal):
            raise TypeError(f"spacetime: expected a stattn.SpatialTemporal, got {type(spacetime).__name__}")
        if not regulation.fused:
            raise ValueError("regulation: fused=False computes the whole layer output eagerly, which cannot carry "
                             "spatial-temporal's regions; compose a fused=True AttentionRegulation")
        self.regulation, self.spacetime = regulation, spacetime

    # ------------------------------------------------------------------ apply / remove
    def apply(self, pipe_or_runner, prompt: str):
        """Resolve both methods for ``prompt`` (each as its own apply() would) and install the
        composed controller (:func:`stattn.accelerate`). Returns what it was given."""
        self.spacetime.apply(pipe_or_runner, prompt)
        self.regulation.apply(pipe_or_runner, prompt=prompt)
        accelerate(pipe_or_runner, controller=self)
        return pipe_or_runner

    def remove(self, pipe_or_runner):
        """Put the original attention processors back (:func:`stattn.restore`)."""
        self.spacetime._kv = {}
        return restore(pipe_or_runner)

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        """Both methods' :meth:`settings`, JSON-able; :meth:`from_settings` rebuilds the pair."""
        return {"method": METHOD, "parts": [self.regulation.settings(), self.spacetime.settings()]}

    @classmethod
    def from_settings(cls, settings: dict, *, generator: Optional[torch.Generator] = None) -> "Composed":
        parts = settings.get("parts") if isinstance(settings, dict) else None
        if settings.get("method") != METHOD or not isinstance(parts, list) or len(parts) != 2:
            raise ValueError(f"settings: expected {{'method': {METHOD!r}, 'parts': [regulation, spacetime]}}, "
                             f"got {settings!r:.200}")
        return cls(AttentionRegulation.from_settings(parts[0], generator=generator),
                   SpatialTemporal.from_settings(parts[1]))

    # ------------------------------------------------------------------ Controller interface
    def reset(self) -> None:
        self.regulation.reset()
        self.spacetime.reset()

    def begin_generation(self, generation) -> None:
        self.regulation.begin_generation(generation)
        self.spacetime.begin_generation(generation)

    def begin_step(self, step: int, timestep) -> None:
        self.regulation.begin_step(step, timestep)
        self.spacetime.begin_step(step, timestep)

    def graph_key(self, step: int):
        return self.regulation.graph_key(step), self.spacetime.graph_key(step)

    def attention(self, call: CrossAttentionCall) -> Optional[torch.Tensor]:
        reg = self.regulation
        if not reg._is_selected(call.name):
            return self.spacetime.attention(call)
        reg.check_call(call)
        if call.step >= reg.edit_steps:
            if reg.record_maps:
                reg._record(call, None)
            return self.spacetime.attention(call)
        st, _ = reg.optimise(call)
        with value_checks(False):   # θ_eff is ours: reading it back for NaNs would sync the host per call
            out = self.spacetime.attention(call, offset=st.cond_offset)
            if reg.record_maps:   # the prompt region's maps as Attention Regulation alone records them
                reg._record(call, st.cond_offset)
        return out

    def __repr__(self) -> str:
        return f"compose({self.regulation!r}, {self.spacetime!r})"
