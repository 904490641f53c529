"""Hooks a diffusers pipeline's ``__call__`` so that stattn knows where a generation starts.

A UNet cannot tell one generation from the next (PNDM repeats its first timestep, Heun evaluates
every timestep twice, img2img starts mid-schedule), nor which rows are conditional, nor the prompt
of each row. A pipeline call knows all three. :func:`attach` gives the pipeline *instance* a
subclass of its own class (same name, module and behaviour) whose ``__call__`` brackets the stock
one with ``tracker.begin_pipeline_call`` / ``end_pipeline_call``; :func:`detach` gives the original
class back. ``type(pipe).__name__`` and ``save_pretrained`` are unchanged; ``type(pipe) is X``
is not (``isinstance`` is).
"""
from __future__ import annotations

import functools

from .control import StepTracker, bind_call

__all__ = ["attach", "detach", "hooked"]

_SUBCLASSES: dict = {}


def _hooked_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        stock = cls.__call__

        @functools.wraps(stock)
        def __call__(self, *args, **kwargs):
            trackers = [t for t in getattr(self, "_stattn_trackers", ()) if t is not None]
            if not trackers:
                return stock(self, *args, **kwargs)
            arguments = bind_call(stock, args, kwargs)
            for t in trackers:
                t.begin_pipeline_call(self, arguments)
            try:
                return stock(self, *args, **kwargs)
            finally:
                for t in trackers:
                    t.end_pipeline_call()

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_stattn_stock_class": cls})
        _SUBCLASSES[cls] = sub
    return sub


def hooked(pipe) -> bool:
    return "_stattn_stock_class" in type(pipe).__dict__


def attach(pipe, tracker: StepTracker) -> None:
    """Bracket every call of ``pipe`` with ``tracker``'s generation hooks (idempotent per tracker)."""
    if not callable(getattr(type(pipe), "__call__", None)):
        raise TypeError(f"pipe: expected a callable diffusers pipeline, got {type(pipe).__name__}")
    if not hooked(pipe):
        pipe.__class__ = _hooked_class(type(pipe))
    trackers = [t for t in getattr(pipe, "_stattn_trackers", ()) if t is not tracker]
    object.__setattr__(pipe, "_stattn_trackers", trackers + [tracker])


def detach(pipe, tracker: StepTracker = None) -> None:
    """Remove ``tracker`` (every tracker when None); the stock class comes back with the last one."""
    trackers = [t for t in getattr(pipe, "_stattn_trackers", ()) if tracker is not None and t is not tracker]
    if trackers:
        object.__setattr__(pipe, "_stattn_trackers", trackers)
        return
    if "_stattn_trackers" in vars(pipe):
        object.__delattr__(pipe, "_stattn_trackers")
    if hooked(pipe):
        pipe.__class__ = type(pipe).__dict__["_stattn_stock_class"]
