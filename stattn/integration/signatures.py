"""diffusers' per-call ``inspect.signature``, answered from a cache.

``Attention.forward`` computes ``inspect.signature(self.processor.__call__)`` at every call, to
filter ``cross_attention_kwargs``: 15-25 µs of Python a call, more than a small layer's attention.
Two ways to answer it from a cache, both giving what inspect computes from the code:

- :func:`fixed_signature` on stattn's own processors' ``__call__`` (inspect then only drops
  ``self``, ~5 µs);
- :func:`sign` on a stock processor that :func:`stattn.accelerate` leaves in place (the
  self-attention layers): an instance attribute ``__call__`` (a :class:`SignedCall`) that carries
  the bound signature (~1 µs). Only for the stateless stock classes (``AttnProcessor2_0``,
  ``AttnProcessor``, no instance attributes), so that calling it through any copy of the processor is
  the same computation; ``proc(...)`` never reads it (Python looks ``__call__`` up on the type).
  :func:`unsign` removes it.
"""
from __future__ import annotations

import inspect
from typing import Callable

__all__ = ["fixed_signature", "SignedCall", "sign", "unsign", "signable"]


def fixed_signature(fn: Callable) -> Callable:
    """fn with ``__signature__`` set to its own signature: inspect returns it instead of rebuilding it
    from the code (for a bound method it still drops ``self``, ~5 µs instead of ~15-25 µs)."""
    fn.__signature__ = inspect.signature(fn)
    return fn


class SignedCall:
    """A stateless processor's ``__call__`` as an instance attribute, with the signature of the
    class's ``__call__`` bound to it cached (and recomputed if that class attribute is replaced)."""

    __slots__ = ("proc", "func", "sig")

    def __init__(self, proc):
        self.proc = proc
        self._load()

    def _load(self) -> None:
        cls = type(self.proc)
        self.func = cls.__call__
        self.sig = inspect.signature(self.func.__get__(self.proc, cls))

    @property
    def __signature__(self) -> inspect.Signature:
        if type(self.proc).__call__ is not self.func:
            self._load()
        return self.sig

    def __call__(self, *args, **kwargs):
        return type(self.proc).__call__(self.proc, *args, **kwargs)


_SIGNABLE = None


def signable(proc) -> bool:
    """Whether :func:`sign` applies: exactly a stateless stock class, nothing on the instance but a
    :class:`SignedCall` of its own."""
    global _SIGNABLE
    if _SIGNABLE is None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        _SIGNABLE = (AttnProcessor2_0, AttnProcessor)
    if type(proc) not in _SIGNABLE:
        return False
    d = proc.__dict__
    return not d or (len(d) == 1 and _own(proc))


def _own(proc) -> bool:
    call = proc.__dict__.get("__call__")
    return type(call) is SignedCall and call.proc is proc


def sign(proc) -> bool:
    """Cache the call signature on ``proc`` if :func:`signable`; True if this call added it."""
    if not signable(proc) or _own(proc):
        return False
    proc.__dict__["__call__"] = SignedCall(proc)
    return True


def unsign(proc) -> None:
    """Remove what :func:`sign` added (nothing else)."""
    d = getattr(proc, "__dict__", None)
    if d is not None and _own(proc):
        del d["__call__"]
