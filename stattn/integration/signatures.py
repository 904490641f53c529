"""diffusers' per-call ``inspect.signature``, answered from a cache.

``Attention.forward`` computes ``inspect.signature(self.processor.__call__)`` at every call, to
filter ``cross_attention_kwargs``: 15-25 µs of Python a call, more than a small layer's attention.
With ``__signature__`` set on the ``__call__`` function, inspect returns it and only drops ``self``
(~5 µs); the signature itself is the one inspect computes from the code.

- :func:`fixed_signature` sets it on stattn's own processors' ``__call__``, for good.
- :func:`hold` / :func:`release` set it on the ``__call__`` of the diffusers processor classes that
  :func:`stattn.accelerate` leaves in place (self-attention), while an accelerate state holds them
  (counted over states; released by :func:`stattn.restore`, or when the UNet is collected without
  one): the last release removes it, unless something else has replaced it since.
  On the function, not on the processor objects: an instance attribute ``__call__`` would be as exact
  but makes torch.compile refuse the processor call (``fullgraph=True`` fails).
"""
from __future__ import annotations

import inspect
import types
from typing import Callable, Optional

__all__ = ["fixed_signature", "hold", "release", "holdable"]


def fixed_signature(fn: Callable) -> Callable:
    """fn with ``__signature__`` set to its own signature."""
    fn.__signature__ = inspect.signature(fn)
    return fn


_HELD: dict = {}        # function -> [the Signature set on it, how many holders]


def holdable(proc) -> Optional[Callable]:
    """The ``__call__`` function of proc's class if :func:`hold` may give it a signature: a plain
    function of diffusers' own (not a user's, not ``nn.Module.__call__``) with no ``__signature__``
    of anyone else's; else None."""
    func = getattr(type(proc), "__call__", None)
    if not isinstance(func, types.FunctionType) or not (func.__module__ or "").startswith("diffusers."):
        return None
    held = _HELD.get(func)
    mine = held is not None and func.__dict__.get("__signature__") is held[0]
    return func if mine or "__signature__" not in func.__dict__ else None


def hold(proc, holder: set) -> None:
    """Give the ``__call__`` of proc's class its signature (if :func:`holdable`), once per holder
    (a set of the functions it holds)."""
    func = holdable(proc)
    if func is None or func in holder:
        return
    held = _HELD.get(func)
    if held is None:
        held = _HELD[func] = [inspect.signature(func), 0]
    func.__signature__ = held[0]          # (again, where something deleted it meanwhile)
    held[1] += 1
    holder.add(func)


def release(holder: set) -> None:
    """Release what the holder holds; a function's last release removes its ``__signature__``."""
    for func in holder:
        held = _HELD.get(func)
        if held is None:
            continue
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[func]
            if func.__dict__.get("__signature__") is held[0]:
                del func.__signature__
    holder.clear()
