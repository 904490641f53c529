"""The public op ``region_attention`` and its torch.library registration.

Two custom ops carry the work: ``stattn::region_attention`` (forward, returns the output, the
per-region log-sum-exps the backward re-uses and, when asked, region 0's probabilities per head) and
``stattn::region_attention_backward`` (which takes those probabilities' gradient). Both
dispatch on the device: CUDA -> Triton kernels (float64: the reference); CPU -> the native C++
kernels of csrc/ (stattn.native; the reference, with one warning, if they cannot be loaded), or
the Triton kernels under the interpreter when STATTN_BACKEND=triton (with TRITON_INTERPRET=1).
STATTN_BACKEND=reference forces the reference everywhere, =native requires the native kernels.

Layout: every backend reads q and grad_out with their strides (no copy) and writes o and dq in
[B, M, H, D] memory order (:func:`empty_output`), so the processors' ``o.transpose(1, 2).reshape(B, M,
H * D)`` is a view, as with SDPA's output; the fake implementations give the same strides.
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from . import native
from . import reference as ref
from .basis import collapse_rows

__all__ = ["region_attention", "backend_for", "empty_output"]


def _empty_strided(*args, **kwargs):
    """The reference path's allocation of o and dq (one place, so tests can poison it with NaN)."""
    return torch.empty_strided(*args, **kwargs)


def empty_output(q: Tensor, empty_strided=None) -> Tensor:
    """A new tensor of q's shape [B, H, M, D], dtype and device in [B, M, H, D] memory order: the
    layout of the op's o and dq on every backend (csrc's output_bmhd allocates the same). ``empty_strided``:
    the allocator, torch.empty_strided's signature (default: this module's _empty_strided; the Triton
    launcher passes its own). One empty_strided call: torch.empty + permute cost 1.5 µs more."""
    B, H, M, D = q.shape
    return (empty_strided or _empty_strided)((B, H, M, D), (M * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


def _in_output_layout(x: Tensor, like: Tensor) -> Tensor:
    """x [B, H, M, D] in empty_output's layout: itself when it already is, else one copy."""
    B, H, M, D = like.shape
    if x.stride() == (M * H * D, D, H * D, 1):
        return x
    return empty_output(like).copy_(x)


_BACKEND_CHOICES = {c: c for c in ("auto", "triton", "reference", "native")}   # STATTN_BACKEND as written


def backend_choice() -> str:
    """STATTN_BACKEND as chosen: 'auto' (unset), 'triton', 'native' or 'reference' (any case)."""
    choice = _BACKEND_CHOICES.get(os.environ.get("STATTN_BACKEND", "auto"))
    if choice is None:
        choice = os.environ["STATTN_BACKEND"].lower()
        if choice not in ("auto", "triton", "reference", "native"):
            raise ValueError(f"STATTN_BACKEND must be auto, triton, native or reference, got {choice!r}")
    return choice


def backend_for(t: Tensor) -> str:
    """'triton', 'native' or 'reference': which implementation runs for tensors like ``t``."""
    choice = backend_choice()
    if choice == "reference":
        return "reference"
    if t.is_cuda:
        return "reference" if t.dtype == torch.float64 else "triton"
    if choice == "native":
        if not native.load():
            raise RuntimeError(f"STATTN_BACKEND=native: {native.BUILD_HINT.split(';')[0]}")
        return "native"
    if choice == "auto":
        return "native" if native.available() else "reference"
    if t.dtype == torch.float64:
        return "reference"
    if choice == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("STATTN_BACKEND=triton on CPU needs TRITON_INTERPRET=1 set before import")
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"STATTN_BACKEND=triton on CPU: {problem}")
        if t.dtype == torch.bfloat16:
            raise TypeError("the Triton interpreter has no bfloat16: use float16/float32 on CPU")
        return "triton"
    return "reference"


def _numpy_int_of_1_element_array() -> bool:
    """Whether int() takes a 1-element numpy array (numpy < 2.4) or refuses it (TypeError)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)    # numpy 1.25 ... 2.3 warn, and convert
        try:
            int(np.ones(1, dtype=np.int32))
        except TypeError:
            return False
    return True


@functools.cache
def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton 3.6's interpreter
    holds scalars as 1-element arrays and converts them with int(), which numpy >= 2.4 refuses:
    every kernel's region loop then fails deep inside ("only 0-dimensional arrays can be
    converted"). Probed, not read off numpy's version; other Triton releases are not judged."""
    import numpy as np
    import triton

    if triton.__version__.startswith("3.6.") and not _numpy_int_of_1_element_array():
        return (f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 (it converts 1-element arrays "
                f"to ints, which numpy {np.__version__} refuses): pip install 'numpy<2.4'")
    return None


def _kernels():
    from stattn import kernels  # installed from the repo's kernels/ as stattn.kernels

    return kernels


def _index_rows(t: Optional[Tensor], flags: bool):
    """Op-level tokens [T] / [B, T] (indices) or pin [N] / [B, N] (flags) -> ScoreOffset's form:
    a tuple of ints, or a tuple of per-row tuples."""
    if t is None:
        return ()
    rows = t if t.dim() == 2 else t[None]   # (not reshape(-1, T): T may be 0, pins without targets)
    rows = tuple(tuple((row.nonzero().flatten() if flags else row).tolist()) for row in rows)
    return collapse_rows(rows) if t.dim() == 2 else rows[0]


def _ref_offset(theta, tokens, gy, gx, pin):
    """A ScoreOffset-like view of the raw op arguments for the reference."""
    if theta is None and pin is None:
        return None
    return SimpleNamespace(theta=theta, gy=gy, gx=gx, pinned=_index_rows(pin, True),
                           tokens=_index_rows(tokens, False))


def _check_indices(q, k, theta, tokens, pin, lengths):
    if tokens is None and pin is None and lengths is None:   # the plain call: nothing to check
        return
    V.check_op_indices(tokens, pin, lengths, q.shape[0], k.shape[1], theta.shape[2] if theta is not None else 0,
                       k.shape[3])


def _native_extra(lengths, last):
    """The native ops' trailing ``lengths`` and ``want_probs`` (forward) / ``grad_probs`` (backward)
    arguments, passed only up to the last one given (None / False: not given), so that a call
    without them is as before."""
    if last is None or last is False:
        return () if lengths is None else (lengths,)
    return lengths, last


def _logits(q: Tensor, k: Tensor, scale: float, lengths: Optional[Tensor]) -> Tensor:
    """[B, H, M, R * N]: scale q k_r^T of every region (region r at columns r * N; -inf on the
    padded keys), no offset: the reference's logits [B, R, H, M, N] in the native layout."""
    z, _ = ref.region_logits(q, k, scale, lengths=lengths)
    return z.permute(0, 2, 3, 1, 4).flatten(3).contiguous()


@torch.library.custom_op("stattn::region_attention", mutates_args=())
def _region_attention_op(q: Tensor, k: Tensor, v: Tensor, weights: Tensor, masks: Tensor, affine: bool,
                         theta: Optional[Tensor], tokens: Optional[Tensor], gy: Optional[Tensor],
                         gx: Optional[Tensor], pin: Optional[Tensor], scale: float,
                         save_logits: bool = False, lengths: Optional[Tensor] = None,
                         want_probs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, lse, logits, probs): logits (see _logits) when save_logits, for the native backward to
    skip its first product; else empty. Only the native CPU backend is asked for them (see
    _save_logits). probs [B, H, M, N] (contiguous, compute dtype) when want_probs: region 0's
    probabilities as applied, per head (reference.region0_probs), from the same call; else empty.
    tokens int32 [T] or [B, T] (per batch row), pin int32 flags [N] or [B, N], lengths int32 [R]
    (region r's valid keys; None: all N)."""
    o, lse, logits, probs = _forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
                                     save_logits, lengths, want_probs)
    if probs is None:
        probs = q.new_empty(0, dtype=ref.compute_dtype(q))
    return o, lse, logits, probs


def _forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save_logits, lengths,
             want_probs: bool = False, lse_needed: bool = True):
    """The forward on the backend for q: the custom op's body, and the direct path's
    (lse_needed=False: the reference then skips its log-sum-exps, returned as None, and a non-native
    backend returns no logits placeholder); probs None unless want_probs."""
    _check_indices(q, k, theta, tokens, pin, lengths)
    backend = backend_for(q)
    if backend == "native":
        out = native.forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save_logits,
                             *_native_extra(lengths, want_probs))
        return out if want_probs else (*out, None)
    probs = None
    if backend == "triton":
        if want_probs:
            o, lse, probs = _kernels().forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
                                               lengths, want_probs=True)
        else:
            o, lse = _kernels().forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
                                        lengths)
    else:
        off = _ref_offset(theta, tokens, gy, gx, pin)
        o = _in_output_layout(ref.region_attention(q, k, v, masks, weights, affine, off, scale, lengths), q)
        lse = ref.region_lse(q, k, scale, off, lengths) if lse_needed else None
        if want_probs:
            probs = ref.region0_probs(q, k, scale, off, lengths).contiguous()
    if save_logits:
        logits = _logits(q, k, scale, lengths)
    else:      # the op's empty placeholder; the direct path (lse_needed=False) reads none
        logits = q.new_empty(0, dtype=ref.compute_dtype(q)) if lse_needed else None
    return o, lse, logits, probs


def _traced() -> bool:
    """Whether something beyond eager autograd must see the ``stattn::region_attention`` custom op:
    torch.compile / tracing, a torch dispatch or function mode (FakeTensorMode, FlopCounterMode, ...)
    or the profiler (which then shows the op by name)."""
    return torch.compiler.is_compiling() or bool(torch._C._len_torch_dispatch_stack()) or \
        torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled()


def _records_graph(tensors) -> bool:
    """Whether autograd records this call: grad mode on and an input requiring grad."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def _direct(*tensors: Optional[Tensor]) -> bool:
    """Whether region_attention may call the backend directly instead of through the
    ``stattn::region_attention`` custom op, whose Python dispatch costs more than a small kernel
    (tens of µs a call; the host-bound calls of a pipeline are mostly that): the same computation,
    when neither autograd nor a tracer, mode or the profiler (_traced) needs to see the op."""
    return not _traced() and not _records_graph(tensors)


class _EagerRegionAttention(torch.autograd.Function):
    """Eager autograd without the custom op's Python dispatch: the op's forward body and its
    registered formula (_setup_context, _backward, the backward op's body) as one autograd.Function.
    torch.library's autograd wrapper re-fills the schema's defaults on every call (~150 µs for this
    op's 15 arguments, 10x a small kernel); this path is the same computation without it, taken
    only when nothing but autograd needs the op (not _traced())."""

    # forward(ctx, ...) rather than a setup_context staticmethod: Function.apply then skips its
    # per-call inspect.signature binding (~60 µs); torch.func transforms take _TransformedRegionAttention
    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_outputs(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse, grad_logits, grad_probs):
        return _backward(ctx, grad_out, grad_lse, grad_logits, grad_probs, run=_backward_impl)


class _TransformedRegionAttention(torch.autograd.Function):
    """_EagerRegionAttention under torch.func transforms (grad, vjp, jacrev, ...), which take an
    autograd.Function only with a setup_context staticmethod (torch.library's custom-op autograd
    has none: the custom op does not run under them). No vmap rule: vmap raises torch's error."""

    @staticmethod
    def forward(*inputs):
        return _forward_outputs(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    backward = _EagerRegionAttention.backward


def _forward_outputs(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save_logits, lengths,
                     want_probs):
    """The custom op's four outputs from the backend (probs: an empty tensor unless want_probs)."""
    o, lse, logits, probs = _forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
                                     save_logits, lengths, want_probs)
    if probs is None:
        probs = q.new_empty(0, dtype=ref.compute_dtype(q))
    return o, lse, logits, probs


def _region_attention_call(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lengths,
                           want_probs: bool):
    """(o, lse, logits, probs) of a call autograd records or something traces: through the custom op
    when _traced(), else through _EagerRegionAttention (the same formula, without the dispatch) or,
    under a torch.func transform, _TransformedRegionAttention."""
    save = _save_logits(q, k, v, weights, masks, theta)
    if _traced():
        return _region_attention_op(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save,
                                    lengths, want_probs)
    fn = _TransformedRegionAttention if torch._C._are_functorch_transforms_active() else _EagerRegionAttention
    return fn.apply(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save, lengths, want_probs)


@_region_attention_op.register_fake
def _(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, save_logits=False, lengths=None,
      want_probs=False):
    B, H, M, _ = q.shape
    R, N = k.shape[1], k.shape[3]
    ct = ref.compute_dtype(q)
    # int(): R is a SymInt under dynamic shapes, and torch 2.11's SymInt + bool makes a sympy Add
    # of a BooleanTrue, which fails (torch 2.13 casts the bool)
    slots = R + int(pin is not None)
    return (empty_output(q), q.new_empty((B, slots, H, M), dtype=torch.float32),
            q.new_empty((B, H, M, R * N) if save_logits else (0,), dtype=ct),
            q.new_empty((B, H, M, N) if want_probs else (0,), dtype=ct))


@torch.library.custom_op("stattn::region_attention_backward", mutates_args=())
def _region_attention_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, weights: Tensor, masks: Tensor, affine: bool,
        theta: Optional[Tensor], tokens: Optional[Tensor], gy: Optional[Tensor], gx: Optional[Tensor],
        pin: Optional[Tensor], scale: float, lse: Tensor, needs: list[bool],
        logits: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
        grad_probs: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dweights, dmasks, dtheta); ``needs`` flags them in that order
    (dk and dv share one flag slot each); an unneeded one comes back as an empty tensor. ``logits``:
    the forward's saved logits (used by the native backend; the others recompute). ``grad_probs``:
    None or the gradient [B, H, M, N] (compute dtype) w.r.t. the forward's probs (want_probs); it
    adds to region 0's dL/dp, so reaches dq, dk and dtheta. dk/dv are exactly zero on the padded
    keys (index >= lengths[r]). grad_out is read with its strides; dq comes in o's layout
    (empty_output), whatever q's strides, the others contiguous."""
    return _backward_impl(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse, needs,
                          logits, lengths, grad_probs)


def _backward_impl(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse, needs,
                   logits, lengths, grad_probs):
    """The backward op's body (also called directly by the eager autograd path, _EagerRegionAttention)."""
    need_q, need_k, need_v, need_w, need_m, need_t = needs
    _check_indices(q, k, theta, tokens, pin, lengths)
    if grad_probs is not None:
        V.check_grad_probs(grad_probs, q, k.shape[3])
        grad_probs = grad_probs.contiguous()
    backend = backend_for(q)
    if backend == "native":
        grads = native.backward(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
                                lse, needs, logits, *_native_extra(lengths, grad_probs))
    elif backend == "triton":
        dq, dk, dv, dbuf, dtheta = _kernels().backward(
            grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse,
            need_q, need_k or need_v, need_w or need_m, need_t and theta is not None, lengths,
            **({} if grad_probs is None else {"grad_probs": grad_probs}))
        dweights = dmasks = None
        if need_w or need_m:
            dalpha = _dalpha(dbuf, pin is not None, affine)
            dweights = (dalpha * masks).sum(-1) if need_w else None
            dmasks = dalpha * weights[..., None] if need_m else None
        grads = (dq, dk, dv, dweights, dmasks, dtheta)
    else:
        grads = _reference_backward(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin,
                                    scale, needs, lengths, grad_probs)
    out = []
    for i, (g, t, n) in enumerate(zip(grads, (q, k, v, weights, masks, theta), needs)):
        if not n or t is None:
            out.append(q.new_empty(0))  # a fresh one per slot: outputs must not alias
        elif g is None:  # a gradient the work did not touch (theta with no target token) is zero
            out.append(empty_output(q).zero_() if i == 0 else t.new_zeros(t.shape))
        else:
            out.append(_in_output_layout(g, q) if i == 0 else g.contiguous())
    return tuple(out)


def _dalpha(dbuf: Tensor, has_pin: bool, affine: bool) -> Tensor:
    """dL/dalpha [B, R, M] from D [B, R + has_pin, H, M] = <dO, O_r> per head (slot R: pinned
    part of region 0)."""
    d = dbuf.sum(2)
    if has_pin:
        d = torch.cat([d[:, :1] + d[:, -1:], d[:, 1:-1]], dim=1)
    return ref.alpha_backward(d, affine)


def _reference_backward(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, needs,
                        lengths, grad_probs=None):
    """The reference's closed-form gradients, cast to the inputs' dtypes; unneeded ones None."""
    off = _ref_offset(theta, tokens, gy, gx, pin)
    grads = ref.region_attention_backward(grad_out, q, k, v, masks, weights, affine, off, scale, lengths,
                                          grad_probs)
    like = (q, k, v, weights, masks, theta)
    return [g.to(t.dtype) if (n and t is not None and g is not None) else None
            for g, t, n in zip(grads, like, needs)]


@_region_attention_backward_op.register_fake
def _(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse, needs, logits=None,
      lengths=None, grad_probs=None):
    like = (q, k, v, weights, masks, theta)
    return tuple(q.new_empty(0) if not (n and t is not None) else
                 empty_output(q) if i == 0 else q.new_empty(t.shape, dtype=t.dtype)
                 for i, (t, n) in enumerate(zip(like, needs)))


def _setup_context(ctx, inputs, output):
    q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, _save, lengths, want_probs = inputs
    ctx.save_for_backward(q, k, v, weights, masks, theta, tokens, gy, gx, pin, output[1], output[2], lengths)
    ctx.affine, ctx.scale = affine, scale
    ctx.mark_non_differentiable(output[1], output[2], *(() if want_probs else (output[3],)))
    # an output the loss does not use gets None, not zeros: no B H M N zeros for unused maps
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_logits, grad_probs, run=None):
    """The registered op's autograd formula; ``run``: the backward's body to call (default: the
    backward custom op, as the registration needs; the eager Functions pass _backward_impl)."""
    q, k, v, weights, masks, theta, tokens, gy, gx, pin, lse, logits, lengths = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[1], ng[2], ng[3], ng[4], ng[6] and theta is not None]
    if grad_probs is not None and grad_probs.numel() == 0:   # (materialised by a tracer: no maps)
        grad_probs = None
    if grad_out is None:   # only the maps reach the loss: o's gradient is zero (one stride-0 zero)
        grad_out = q.new_zeros(()).expand(q.shape)
    grads = (run or _region_attention_backward_op)(grad_out, q, k, v, weights, masks, ctx.affine, theta, tokens, gy,
                                                   gx, pin, ctx.scale, lse, needs,
                                                   logits if logits.numel() else None, lengths, grad_probs)
    dq, dk, dv, dw, dm, dt = (g if n else None for g, n in zip(grads, needs))
    return dq, dk, dv, dw, dm, None, dt, None, None, None, None, None, None, None, None


def _save_logits(q: Tensor, *inputs: Optional[Tensor]) -> bool:
    """Whether the forward keeps its logits for the backward: with the native CPU backend, when a
    gradient will be taken, the backward then skips its first product (B H M R N floats held until
    the backward; STATTN_SAVE_LOGITS=0 recomputes them instead). Not under torch.compile."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    if not any(t is not None and t.requires_grad for t in (q, *inputs)):
        return False
    return os.environ.get("STATTN_SAVE_LOGITS", "1") != "0" and backend_for(q) == "native"


torch.library.register_autograd("stattn::region_attention", _backward, setup_context=_setup_context)


# Small index tensors (the op's int32 key lengths, return_probs' int64 columns) per (values,
# dtype, device), built by scalar fills (legal inside CUDA-graph capture) and kept only when built
# outside capture / compilation, where the fills ran at once.
_INDEX_CACHE: dict = {}


def _index_tensor(values: tuple, dtype, device) -> Tensor:
    key = (values, dtype, device)
    t = _INDEX_CACHE.get(key) if not torch.compiler.is_compiling() else None
    if t is None:
        t = torch.empty(len(values), dtype=dtype, device=device)
        for i, n in enumerate(values):
            t[i] = n
        if not V._capturing(t):
            if len(_INDEX_CACHE) >= 64:
                _INDEX_CACHE.clear()
            _INDEX_CACHE[key] = t
    return t


def _lengths_tensor(lengths, device) -> Optional[Tensor]:
    """key_lengths as checked by V.key_lengths (None, a tuple of ints, or a device tensor) -> the
    op's ``lengths`` argument."""
    if lengths is None or isinstance(lengths, Tensor):
        return lengths
    return _index_tensor(lengths, torch.int32, device)


def _columns_tensor(cols, device) -> Optional[Tensor]:
    """return_probs' columns as checked by V.probs_columns (None: all, a tuple of ints, or an int64
    device tensor) -> the index of the column selection."""
    if cols is None or isinstance(cols, Tensor):
        return cols
    return _index_tensor(cols, torch.int64, device)


def _head_mean(probs: Tensor, cols: Optional[Tensor]) -> Tensor:
    """The op's per-head maps [B, H, M, N] -> their mean over heads [B, M, N], or that of the
    columns cols [B, M, T] (selected first: the mean then runs over T columns only)."""
    if cols is not None:
        probs = probs.index_select(-1, cols)
    return probs.mean(1)


def _plain(q: Tensor, k: Tensor, v: Tensor, scale) -> Tensor:
    """region_attention with every option at its default (the processors' plain layer, R = 1 in a
    pipeline): the same checks and computation in fewer steps, for the host-bound calls (no offset,
    lengths or column arguments to build; the default masks and weights never require grad)."""
    B, H, M, D, R, N = V.check_qkv(q, k, v)
    scale = V.scale_of(scale, D)
    weights, masks = V.default_alphas(B, R, M, q.device)
    if not _direct(q, k, v):
        return _region_attention_call(q, k, v, weights, masks, False, None, None, None, None, None, scale, None,
                                      False)[0]
    return _forward(q, k, v, weights, masks, False, None, None, None, None, None, scale, False, None,
                    lse_needed=False)[0]


def region_attention(q: Tensor, k: Tensor, v: Tensor, *, masks: Optional[Tensor] = None,
                     region_weights: Optional[Tensor] = None, affine: bool = False, offset=None,
                     scale: Optional[float] = None, key_lengths=None, return_probs=None):
    """Masked multi-region cross-attention with per-region weights and a Gaussian-basis offset.

    q [B, H, M, D]; k, v [B, R, H, N, D] (region r's keys/values); masks [R, M] or [B, R, M]
    (bool or float, default all ones); region_weights [R] or [B, R] (default ones);
    affine=True gives region 0 alpha = 1 - sum_{r>=1} alpha_r (its own mask/weight are then
    unused); offset: a :class:`stattn.ScoreOffset` acting on region 0 (its target tokens and
    pinned columns shared by all batch rows or per row); scale defaults to D^-1/2;
    key_lengths: None or R ints (a sequence or 1-D int tensor), 1 <= L_r <= N: region r attends
    to its first L_r keys only (a softmax of its own; e.g. IP-Adapter's text and image-prompt
    branches in one call), the rest are padding (probability 0, zero dk/dv, contents ignored);
    offset indices must be < L_0.
    return_probs: None / False (default): return o only; True: return (o, P) with P [B, M, N] region
    0's probabilities as applied (the edited softmax with the offset, pinned columns from the
    un-offset softmax, 0 on padded keys) averaged over heads, from the same call as o; column
    indices (a sequence of ints or a 1-D integer tensor, each in [0, N), in [0, L_0) with
    key_lengths): return (o, P[..., cols]) [B, M, len(cols)]. P is float32 (float64 for float64
    inputs) and differentiable w.r.t. q, k and offset.theta (a loss on P alone or on P and o).
    Returns o [B, H, M, D] = sum_r alpha_r * softmax(z_r) @ v_r (see stattn/reference.py), in
    [B, M, H, D] memory order on every backend (as SDPA's output), so ``o.transpose(1, 2).reshape(B,
    M, H * D)`` is a view. q and the incoming gradient are read with their strides (the processors'
    ``x.view(B, M, H, D).transpose(1, 2)`` is not copied); q's gradient comes in o's layout.
    Differentiable w.r.t. q, k, v, region_weights, float masks and offset.theta.
    """
    if masks is None and region_weights is None and offset is None and key_lengths is None and \
            (return_probs is None or return_probs is False) and affine is False:
        return _plain(q, k, v, scale)
    B, H, M, D, R, N = V.check_qkv(q, k, v)
    device = q.device
    masks_f = V.region_masks(masks, B, R, M, device)
    weights_f = V.region_weights(region_weights, B, R, device)
    if not isinstance(affine, bool):
        raise TypeError(f"affine must be a bool, got {type(affine).__name__}")
    scale = V.scale_of(scale, D)
    lengths = V.key_lengths(key_lengths, R, N, device)
    theta = tokens = gy = gx = pin = None
    if offset is not None:
        V.check_offset(offset, B, H, M, N, device, n_first=lengths[0] if isinstance(lengths, tuple) else None)
        tokens, pin_t = offset.device_tensors(N)
        theta = offset.theta
        gy, gx = (g.to(ref.compute_dtype(q)).contiguous() for g in (offset.gy, offset.gx))
        if offset.pinned:
            pin = pin_t
    if q.dtype == torch.float64:
        masks_f, weights_f = masks_f.double(), weights_f.double()
    elif theta is not None and theta.dtype == torch.float64:
        raise TypeError(f"offset.theta must be float32 for {q.dtype} inputs (float64 only with float64 q)")
    lengths_t = _lengths_tensor(lengths, device)
    if return_probs is None or return_probs is False:
        if _direct(q, k, v, weights_f, masks_f, theta):
            return _forward(q, k, v, weights_f, masks_f, affine, theta, tokens, gy, gx, pin, scale, False,
                            lengths_t, lse_needed=False)[0]
        return _region_attention_call(q, k, v, weights_f, masks_f, affine, theta, tokens, gy, gx, pin, scale,
                                      lengths_t, False)[0]
    cols = V.probs_columns(return_probs, N, lengths[0] if isinstance(lengths, tuple) else None, device)
    cols = _columns_tensor(cols, device)
    if _direct(q, k, v, weights_f, masks_f, theta):
        o, _, _, probs = _forward(q, k, v, weights_f, masks_f, affine, theta, tokens, gy, gx, pin, scale, False,
                                  lengths_t, True, lse_needed=False)
    else:
        o, _, _, probs = _region_attention_call(q, k, v, weights_f, masks_f, affine, theta, tokens, gy, gx, pin,
                                                scale, lengths_t, True)
    return o, _head_mean(probs, cols)
