"""Host-side launchers of the Triton kernels: block sizes, output allocation, grids.

Arguments are already validated and normalised by stattn.ops: weights [B, R] and masks [B, R, M]
float32 (any strides), theta/tokens/gy/gx/pin present only with an offset, k/v [B, R, H, N, D];
tokens int32 [T] or [B, T] and pin int32 [N] or [B, N] (shared by the batch rows, or per row);
lengths None or int32 [R] (region r's valid keys); grad_probs None or float32 [B, H, M, N].
q and do are read with their strides; o and dq
are written in [B, M, H, D] memory order (stattn.ops.empty_output: the kernels take o's / dq's strides).
"""
import functools
import operator
import os
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch
import triton
from triton import knobs
from triton.runtime import driver

try:
    from triton.knobs import HookChain
except ImportError:       # another Triton: the cached launch is off there (CACHED_TRITON)
    HookChain = None

from stattn.ops import empty_output

from .region_attention import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel

__all__ = ["forward", "backward", "block_config"]


def _empty(*args, **kwargs):
    """Allocation of every kernel output (one place, so tests can poison outputs with NaN)."""
    return torch.empty(*args, **kwargs)


def _empty_strided(*args, **kwargs):
    """Allocation of o and dq ([B, M, H, D] memory order, stattn.ops.empty_output; tests poison it too)."""
    return torch.empty_strided(*args, **kwargs)


# Set by stattn.Runner(profile=...): each launch then opens a named range (torch.profiler, and
# NVTX on CUDA for Nsight), so the trace shows which stattn kernel ran inside which UNet block.
RANGES = False


def _launch(kernel, grid, args, meta):
    """Every kernel launch goes through here (kernels.aot captures launches to compile them)."""
    if not RANGES:
        _run(kernel, grid, args, meta)
        return
    name = f"stattn.{getattr(kernel, '__name__', None) or kernel.fn.__name__}"
    nvtx = torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            _run(kernel, grid, args, meta)
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


# ------------------------------------------------------------------------- the cached launch
# JITFunction.run binds and specialises every argument and builds its cache key at each launch
# (~20 µs of Python for the forward's 70 arguments). The cached launch does that once per launch
# signature, through the JIT itself, and afterwards calls the compiled kernel's launcher as
# JITFunction.run calls it: the same compiled kernel, the same launcher arguments. It rests on
# Triton internals (JITFunction.device_caches, CompiledKernel.run), so it is on only for the
# Triton releases it is tested with; STATTN_TRITON_LAUNCH=jit launches everything through the JIT.

CACHED_TRITON = ("3.6.",)          # Triton releases the cached launch is tested with (tests/test_triton_launch.py)
_LAUNCH_CHOICES = ("cached", "jit")
_MAX_ENTRIES = 4096                # launch signatures kept (each a strides/alignment pattern); then start afresh
_entries: dict = {}                # signature -> (CompiledKernel, the bound constexpr values after args)
_layouts: dict = {}                # kernel -> _Layout of its arguments; None: always through the JIT


def launch_choice() -> str:
    """STATTN_TRITON_LAUNCH as chosen: 'cached' (unset) or 'jit'."""
    choice = os.environ.get("STATTN_TRITON_LAUNCH", "cached").lower()
    if choice not in _LAUNCH_CHOICES:
        raise ValueError(f"STATTN_TRITON_LAUNCH must be cached or jit, got {os.environ['STATTN_TRITON_LAUNCH']!r}")
    return choice


def cached_launch_available() -> tuple:
    """(whether launches take the cached path, why not): this Triton, the interpreter, the setting."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1: the interpreter runs the kernels"
    if launch_choice() == "jit":
        return False, "STATTN_TRITON_LAUNCH=jit"
    if HookChain is None or not triton.__version__.startswith(CACHED_TRITON):
        return False, (f"triton {triton.__version__}: the cached launch is tested with "
                       f"{', '.join(v + 'x' for v in CACHED_TRITON)} only")
    return True, ""


class _Layout(NamedTuple):
    """Where a kernel's positional arguments are what: the launchers pass tensors first, then ints
    and floats, each position always of one type (tests/test_triton_launch.py checks it)."""
    size: int                      # how many
    tensors: int                   # the leading tensors
    floats: tuple                  # positions of the floats: Triton does not specialise them
    keyed: Callable                # args -> the values of the other (int) positions, a tuple

    @classmethod
    def of(cls, args):
        n = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        if any(isinstance(a, torch.Tensor) for a in args[n:]):
            return None
        floats = tuple(i for i in range(n, len(args)) if type(args[i]) is float)
        ints = [i for i in range(n, len(args)) if i not in floats]
        keyed = operator.itemgetter(*ints) if len(ints) > 1 else (lambda a, i=tuple(ints): tuple(a[j] for j in i))
        return cls(len(args), n, floats, keyed)

    def fits(self, args) -> bool:
        return (len(args) == self.size and all(isinstance(a, torch.Tensor) for a in args[:self.tensors])
                and all(type(args[i]) is float for i in self.floats)
                and not any(isinstance(a, (torch.Tensor, float, bool)) for a in self.keyed(args)))


def _idle(hook) -> bool:
    """A launch hook that would call nothing (Triton 3.6's hooks are chains, empty by default)."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


def _run(kernel, grid, args, meta):
    if not (_CACHED and _cached_run(kernel, grid, args, meta)):
        kernel[grid](*args, **meta)


def _cached_run(kernel, grid, args, meta) -> bool:
    """Launch through the compiled kernel the JIT chose for this signature; False: the caller
    launches through the JIT (a kernel, grid or argument list this path does not cover)."""
    layout = _layouts.get(kernel, False)
    if layout is None or kernel.pre_run_hooks or type(grid) is not tuple or type(args) is not tuple:
        return False
    if layout is False:
        layout = _layouts[kernel] = (_Layout.of(args) if isinstance(kernel, triton.runtime.jit.JITFunction)
                                     else None)
        if layout is None:
            return False
    rt = knobs.runtime
    device = driver.active.get_current_device()
    tensors = args[:layout.tensors]
    # Triton specialises a tensor on its dtype and 16-byte alignment and an int on its value (1,
    # multiple of 16, width), not a float; it compiles per constexpr and option. The exact ints,
    # the alignment remainder and the meta items refine its key: one entry, one compiled kernel.
    key = (kernel, device, rt.debug, knobs.compilation.instrumentation_mode, tuple(meta.items()),
           layout.keyed(args), tuple([t.dtype for t in tensors]), tuple([t.data_ptr() & 15 for t in tensors]))
    entry = _entries.get(key)
    if entry is None:
        _first_run(kernel, grid, args, meta, key, device, layout)
        return True
    compiled, tail = entry
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    if _idle(enter) and _idle(leave):      # the launcher skips None hooks; only hooks read the metadata
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
    else:                                  # as JITFunction.run: the hooks and their launch metadata
        bound = args + tail
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *bound), enter, leave, *bound)
    return True


def _first_run(kernel, grid, args, meta, key, device, layout):
    """Launch through the JIT (it compiles if needed) and keep what it launched, with the
    constexpr values its binder appends to args, for the next launches of the signature."""
    compiled = kernel[grid](*args, **meta)
    if compiled is None or hasattr(compiled, "result") or kernel.used_global_vals:
        return       # an asynchronous compile, or globals the JIT re-checks at each launch: stay with the JIT
    if not layout.fits(args):
        _layouts[kernel] = None    # a position changed type: the key would not hold
        return
    bound, _, _ = kernel.device_caches[device][4](*args, **meta)
    values = tuple(bound.values())
    if len(values) < len(args) or any(b is not a for a, b in zip(args, values)):
        _layouts[kernel] = None    # the binder reorders or converts arguments: this path would differ
        return
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    _entries[key] = (compiled, values[len(args):])


_CACHED = cached_launch_available()[0]


def _empty_like(t):
    return _empty(t.shape, dtype=t.dtype, device=t.device)


@functools.lru_cache(maxsize=1024)      # a pure function of ints, asked at every launch
def _tiles(M: int, N: int, D: int, Ky: int, Kx: int, plain: bool) -> tuple:
    """Tile sizes, chosen from sm_90 compiles (python -m stattn.kernels.aot): 64-key tiles
    (N = 77 takes two) and 8 warps keep every variant free of register spills; one pipeline
    stage, since the key loop is short and more stages only multiply shared memory (D = 160
    needed > 227 KB with 128-key tiles and 3 stages). Small pixel tiles keep M = 256 busy;
    plain attention at large M takes 64-pixel tiles to halve the K/V re-reads."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = max(16, min(64, triton.next_power_of_2(N)))
    BLOCK_M = 64 if plain and BLOCK_D <= 64 and M >= 2048 else 32
    BLOCK_M = max(16, min(BLOCK_M, triton.next_power_of_2(M)))
    return tuple(dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                      KYP=max(16, triton.next_power_of_2(max(Ky, 1))),
                      KXP=max(16, triton.next_power_of_2(max(Kx, 1))),
                      num_warps=8, num_stages=1).items())


def block_config(M: int, N: int, D: int, Ky: int = 0, Kx: int = 0, plain: bool = True) -> dict:
    """The launch meta-parameters of a problem (see _tiles; a new dict each call)."""
    return dict(_tiles(M, N, D, Ky, Kx, plain))


def _row_stride(t) -> int:
    """Batch-row stride of per-row tokens / pin flags ([B, X]); 0 for the shared form ([X] or None)."""
    return t.stride(0) if t is not None and t.dim() == 2 else 0


def _common(q, k, v, weights, masks, theta, tokens, gy, gx, pin):
    """The strides shared by all kernels and the problem sizes (k, v contiguous)."""
    B, H, M, D = q.shape
    R, N = k.shape[1], k.shape[3]
    T = theta.shape[2] if theta is not None else 0
    Ky = gy.shape[1] if T else 0
    Kx = gx.shape[1] if T else 0
    W = gx.shape[0] if T else 1
    th_strides = theta.stride() if T else (0,) * 5
    strides = (*k.stride(), *v.stride(), *weights.stride(), *masks.stride(), *th_strides,
               gy.stride(0) if T else 0, gx.stride(0) if T else 0,
               _row_stride(tokens) if T else 0, _row_stride(pin))
    dims = (B, H, R, M, N, D, T, W, Ky, Kx)
    return strides, dims


def _indices(tokens, pin, lengths):
    """The index tensors with unit stride along their last dim (what the kernels assume)."""
    return tuple(None if t is None else t.contiguous() for t in (tokens, pin, lengths))


@functools.lru_cache(maxsize=4096)     # pure in its arguments, asked at every launch (host cost)
def _forward_meta(M: int, N: int, D: int, Ky: int, Kx: int, affine: bool, offset: bool, pinned: bool,
                  lengths: bool, probs: bool):
    """The forward kernel's meta-parameters (read-only: shared by every call of a problem) and its
    pixel tile."""
    cfg = block_config(M, N, D, Ky, Kx, plain=not offset and not pinned)
    meta = dict(AFFINE=affine, HAS_OFFSET=offset, HAS_PIN=pinned, HAS_LENGTHS=lengths, WANT_PROBS=probs, **cfg)
    return MappingProxyType(meta), cfg["BLOCK_M"]


def forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lengths=None, want_probs=False):
    """Returns (o [B, H, M, D] in q's dtype and empty_output's layout, lse [B, R + has_pin, H, M]
    float32); the extra slot holds region 0's un-offset log-sum-exp used by its pinned columns.
    want_probs: also region 0's probabilities as applied, probs [B, H, M, N] float32 contiguous
    (edited softmax, pinned columns from the un-offset one, 0 on keys past lengths[0])."""
    k, v = k.contiguous(), v.contiguous()
    tokens, pin, lengths = _indices(tokens, pin, lengths)
    strides, (B, H, R, M, N, D, T, W, Ky, Kx) = _common(q, k, v, weights, masks, theta, tokens, gy, gx, pin)
    has_pin = pin is not None
    meta, block_m = _forward_meta(M, N, D, Ky, Kx, bool(affine), T > 0, has_pin, lengths is not None,
                                  bool(want_probs))
    o = empty_output(q, _empty_strided)
    lse = _empty(B, R + has_pin, H, M, device=q.device, dtype=torch.float32)
    probs = _empty(B, H, M, N, device=q.device, dtype=torch.float32) if want_probs else None
    dummy = lse
    _launch(_fwd_kernel, (-(-M // block_m), B * H), (
        q, k, v, o, lse, weights, masks,
        tokens if T else dummy, theta if T else dummy, gy if T else dummy, gx if T else dummy,
        pin if has_pin else dummy, lengths if lengths is not None else dummy, probs if want_probs else dummy,
        *q.stride(), *strides[:10], *o.stride(), *lse.stride(), *strides[10:],
        H, R, M, N, D, T, W, Ky, Kx, float(scale)), meta)
    return (o, lse, probs) if want_probs else (o, lse)


def _grad_probs(grad_probs, B, H, M, N):
    """grad_probs checked against the maps' shape [B, H, M, N] float32, unit-stride rows."""
    if grad_probs is None:
        return None
    if tuple(grad_probs.shape) != (B, H, M, N):
        raise ValueError(f"grad_probs must have shape {(B, H, M, N)} (region 0's maps), got {tuple(grad_probs.shape)}")
    if grad_probs.dtype != torch.float32:
        raise TypeError(f"grad_probs must be float32 (the maps' compute dtype), got {grad_probs.dtype}")
    return grad_probs.contiguous()


@functools.lru_cache(maxsize=4096)     # as _forward_meta
def _backward_meta(M: int, N: int, D: int, Ky: int, Kx: int, affine: bool, offset: bool, pinned: bool,
                   lengths: bool, gp: bool, need_dq: bool, store_d: bool, need_dtheta: bool, store_dg: bool):
    """The backward kernels' meta-parameters: dq's, dk/dv's for region 0 (offset, pins, the maps'
    gradient) and for regions 1.. (none of those); and the pixel and key tiles."""
    cfg = block_config(M, N, D, Ky, Kx, plain=not offset and not pinned)
    dq = dict(AFFINE=affine, HAS_OFFSET=offset, HAS_PIN=pinned, HAS_LENGTHS=lengths, NEED_DQ=need_dq,
              STORE_D=store_d, NEED_DTHETA=need_dtheta, HAS_GP=gp, STORE_DG=store_dg, **cfg)
    dkdv = tuple(MappingProxyType(dict(AFFINE=affine, HAS_OFFSET=o, HAS_PIN=p, HAS_LENGTHS=lengths, HAS_GP=g, **cfg))
                 for o, p, g in ((offset, pinned, gp), (False, False, False)))
    return MappingProxyType(dq), dkdv, cfg["BLOCK_M"], cfg["BLOCK_N"]


def backward(do, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse,
             need_dq, need_dkv, need_dalpha, need_dtheta, lengths=None, grad_probs=None):
    """Returns (dq | None, dk | None, dv | None, D [B, R + has_pin, H, M] | None, dtheta | None).

    D[:, r] = <dO, O_r> per head and pixel (region 0: its non-pinned part, slot R its pinned
    part); dalpha follows from it on the host side without another kernel over Q. dk / dv are
    exact zeros on the keys past each region's length. grad_probs: None or dL/dprobs [B, H, M, N]
    of forward(want_probs=True)'s maps, added to region 0's dp (dq, dk, dtheta; dv, D unchanged)."""
    k, v = k.contiguous(), v.contiguous()
    tokens, pin, lengths = _indices(tokens, pin, lengths)
    strides, (B, H, R, M, N, D, T, W, Ky, Kx) = _common(q, k, v, weights, masks, theta, tokens, gy, gx, pin)
    has_pin = pin is not None
    grad_probs = _grad_probs(grad_probs, B, H, M, N)
    has_gp = grad_probs is not None
    need_dtheta = need_dtheta and T > 0
    store_d = need_dalpha or need_dkv
    store_dg = has_gp and need_dkv
    has_len = lengths is not None
    dq_meta, dkdv_metas, block_m, block_n = _backward_meta(
        M, N, D, Ky, Kx, bool(affine), T > 0, has_pin, has_len, has_gp, bool(need_dq), store_d, need_dtheta, store_dg)
    dq = empty_output(q, _empty_strided) if need_dq else None
    dbuf = _empty(lse.shape, dtype=lse.dtype, device=lse.device) if store_d else None
    dgbuf = _empty(lse.shape, dtype=lse.dtype, device=lse.device) if store_dg else None
    grid = (-(-M // block_m), B * H)
    dth_part = (_empty(B, H, grid[0], T, Ky, Kx, device=q.device, dtype=torch.float32)
                if need_dtheta else None)
    dummy = lse
    ptrs = (tokens if T else dummy, theta if T else dummy, gy if T else dummy, gx if T else dummy,
            pin if has_pin else dummy, lengths if has_len else dummy)
    common = (*q.stride(), *strides[:10], *do.stride(), *lse.stride(), *strides[10:])
    if need_dq or store_d or need_dtheta:
        _launch(_bwd_dq_kernel, grid, (
            q, k, v, do, dq if need_dq else dummy, lse, dbuf if store_d else dummy, weights, masks,
            *ptrs, dth_part if need_dtheta else dummy, grad_probs if has_gp else dummy,
            dgbuf if store_dg else dummy, *common, *(dq.stride() if need_dq else (0,) * 4),
            H, R, M, N, D, T, W, Ky, Kx, float(scale)), dq_meta)
    dk = dv = None
    if need_dkv:
        dk = _empty_like(k)
        dv = _empty_like(v)
        n_blocks = -(-N // block_n)
        for r_first, n_r, gp, meta in ((0, 1, has_gp, dkdv_metas[0]), (1, R - 1, False, dkdv_metas[1])):
            if n_r == 0:
                continue
            # region 0 alone (offset, pins, maps' gradient), then regions 1.. together; R_FIRST selects which
            _launch(_bwd_dkdv_kernel, (n_blocks, B * n_r * H), (
                q, k, v, do, dk, dv, lse, dbuf, weights, masks, *ptrs,
                grad_probs if gp else dummy, dgbuf if gp else dummy, *common,
                H, R, r_first, n_r, M, N, D, T, W, Ky, Kx, float(scale)), meta)
    dtheta = dth_part.sum(2) if need_dtheta else None
    return dq, dk, dv, dbuf, dtheta
