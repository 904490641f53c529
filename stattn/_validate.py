"""Argument checking for the public ops: every error names the argument and what was expected."""
from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Value checks (NaN/inf in theta, the basis, weights, masks) read tensor values, which costs a host
# sync on a GPU; they are skipped inside CUDA-graph capture and torch.compile, and can be turned off
# for hot loops with STATTN_CHECK_VALUES=0 or stattn.set_value_checks(False).
_value_checks = os.environ.get("STATTN_CHECK_VALUES", "1") != "0"


def set_value_checks(enabled: bool) -> bool:
    """Enable/disable the NaN/inf checks of theta, the basis, weights and masks (q, k, v are never
    read: NaN/inf there reach the output as through torch's softmax(q k^T) v); returns the
    previous state."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool):
    """A block with the value checks on or off (:func:`set_value_checks`), the previous state put back
    after it: ``with stattn.value_checks(False): ...`` around calls whose θ / weights the caller made
    itself, where reading them back for NaNs would cost a host sync per call."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def _capturing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_finite(name: str, t: torch.Tensor) -> None:
    if not _value_checks or _capturing(t) or not t.dtype.is_floating_point or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())  # NaN propagates; one reduction, 5x cheaper than isfinite(t).all()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_tensor(name: str, t, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have shape {layout}, got {_shape(t)}")


_CHECKED_QKV: dict = {}


def check_qkv(q, k, v):
    """(B, H, M, D, R, N) of valid q, k, v; the checks depend only on their shapes, dtypes and
    devices, so a combination seen before is looked up (a pipeline repeats a few per layer)."""
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)
    except AttributeError:            # not tensors: _check_qkv names the argument
        return _check_qkv(q, k, v)
    dims = _CHECKED_QKV.get(key)
    if dims is None:
        dims = _check_qkv(q, k, v)
        if len(_CHECKED_QKV) >= 1024:
            _CHECKED_QKV.clear()
        _CHECKED_QKV[key] = dims
    return dims


def _check_qkv(q, k, v):
    check_tensor("q", q, 4, "[B, H, M, D]")
    check_tensor("k", k, 5, "[B, R, H, N, D]")
    check_tensor("v", v, 5, "[B, R, H, N, D]")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    B, H, M, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[4] != D:
        raise ValueError(f"k must have shape [B={B}, R, H={H}, N, D={D}] to match q {_shape(q)}, got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {_shape(k)}, got {_shape(v)}")
    R, N = k.shape[1], k.shape[3]
    for name, size in (("B", B), ("H", H), ("M", M), ("D", D), ("R (regions)", R), ("N (keys)", N)):
        if size == 0:
            raise ValueError(f"q/k/v: {name} must be at least 1, got 0 (q {_shape(q)}, k {_shape(k)})")
    return B, H, M, D, R, N


_ONES: dict = {}


def _ones(shape: tuple, device) -> torch.Tensor:
    """A float32 one expanded to ``shape`` (the default masks / weights), made once per shape and
    device outside CUDA-graph capture and torch.compile (a call's allocation is then saved: these
    are read-only inputs of the op)."""
    if torch.compiler.is_compiling():
        return torch.ones((), device=device, dtype=torch.float32).expand(shape)
    key = (shape, device, torch.is_inference_mode_enabled())   # an inference tensor cannot be saved for backward
    t = _ONES.get(key)
    if t is None:
        t = torch.ones((), device=device, dtype=torch.float32).expand(shape)
        if not _capturing(t):
            if len(_ONES) >= 256:
                _ONES.clear()
            _ONES[key] = t
    return t


def default_alphas(B: int, R: int, M: int, device) -> tuple:
    """(weights [B, R], masks [B, R, M]): region_weights / region_masks of None (expanded ones)."""
    return _ones((B, R), device), _ones((B, R, M), device)


def region_masks(masks, B: int, R: int, M: int, device) -> torch.Tensor:
    """masks [R, M] or [B, R, M] (bool or float) -> float32 [B, R, M] (a view where possible)."""
    if masks is None:
        return _ones((B, R, M), device)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a tensor of shape [R, M] or [B, R, M], got {type(masks).__name__}")
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3 or masks.shape[1:] != (R, M) or masks.shape[0] not in (1, B):
        raise ValueError(f"masks must have shape [R={R}, M={M}] or [B={B}, R={R}, M={M}], got {_shape(masks)}")
    if masks.device != device:
        raise ValueError(f"masks must be on q's device {device}, got {masks.device}")
    if masks.dtype == torch.bool:
        masks = masks.to(torch.float32)
    elif masks.dtype in FLOAT_DTYPES:
        check_finite("masks", masks)
        if masks.dtype != torch.float64:
            masks = masks.to(torch.float32)
    else:
        raise TypeError(f"masks must be bool or floating point, got {masks.dtype}")
    return masks.expand(B, R, M)


def region_weights(weights, B: int, R: int, device) -> torch.Tensor:
    """region_weights [R] or [B, R] -> float32 [B, R]."""
    if weights is None:
        return _ones((B, R), device)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"region_weights must be a tensor of shape [R] or [B, R], got {type(weights).__name__}")
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    if weights.dim() != 2 or weights.shape[1] != R or weights.shape[0] not in (1, B):
        raise ValueError(f"region_weights must have shape [R={R}] or [B={B}, R={R}], got {_shape(weights)}")
    if weights.device != device:
        raise ValueError(f"region_weights must be on q's device {device}, got {weights.device}")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"region_weights must be floating point, got {weights.dtype}")
    check_finite("region_weights", weights)
    if weights.dtype != torch.float64:
        weights = weights.to(torch.float32)
    return weights.expand(B, R)


def scale_of(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


def _is_int(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.dtype.is_floating_point and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def key_lengths(lengths, R: int, N: int, device):
    """key_lengths: None, or R ints (a sequence or a 1-D integer tensor) with 1 <= L_r <= N.

    Returns None when every region uses all N keys (the plain path), else the lengths as a tuple of
    ints, or, for a tensor on q's device whose values cannot be read now (CUDA-graph capture,
    torch.compile), that tensor as int32 (then unchecked)."""
    if lengths is None:
        return None
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
                or lengths.dtype == torch.bool:
            raise TypeError(f"key_lengths must be a 1-D integer tensor or a sequence of R ints, got a "
                            f"{lengths.dtype} tensor of shape {_shape(lengths)}")
        if lengths.numel() != R:
            raise ValueError(f"key_lengths must hold R = {R} lengths (one per region), got {lengths.numel()}")
        if lengths.device != device and lengths.device.type != "cpu":
            raise ValueError(f"key_lengths must be on q's device {device} (or the CPU), got {lengths.device}")
        if lengths.device == device and _capturing(lengths):  # its values cannot be read now
            return lengths.to(torch.int32).contiguous()
        values = lengths.tolist()
    else:
        if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__"):
            raise TypeError(f"key_lengths must be a sequence of R ints or a 1-D integer tensor, got "
                            f"{type(lengths).__name__}")
        values = list(lengths)
        if not all(_is_int(v) for v in values):
            raise TypeError(f"key_lengths must hold ints, got {values!r}")
        values = [int(v) for v in values]
        if len(values) != R:
            raise ValueError(f"key_lengths must hold R = {R} lengths (one per region), got {len(values)}")
    bad = [v for v in values if not 1 <= v <= N]
    if bad:
        raise ValueError(f"key_lengths must lie in [1, N = {N}] (each region keeps at least one key), got {values}")
    return None if all(v == N for v in values) else tuple(values)


def check_offset(offset, B: int, H: int, M: int, N: int, device, n_first=None) -> None:
    """n_first: region 0's key length (key_lengths[0]) when known, which offset indices must stay below."""
    from .basis import ScoreOffset

    if not isinstance(offset, ScoreOffset):
        raise TypeError(f"offset must be a stattn.ScoreOffset, got {type(offset).__name__}")
    theta = offset.theta
    if theta.device != device:
        raise ValueError(f"offset.theta must be on q's device {device}, got {theta.device}")
    if theta.shape[:2] != (B, H):
        raise ValueError(f"offset.theta must have shape [B={B}, H={H}, T, Ky, Kx], got {_shape(theta)}")
    h, w = offset.grid
    if h * w != M:
        raise ValueError(f"offset basis grid {h}x{w} = {h * w} pixels does not match M = {M} query pixels")
    for name, rows in (("tokens", offset.row_tokens), ("pinned", offset.row_pinned)):
        per_row = getattr(offset, f"{name}_per_row")
        for b in range(B if per_row else 1):
            label = f"offset.{name}[{b}]" if per_row else f"offset.{name}"
            for bound, what in ((N, f"N = {N}"), (n_first, f"key_lengths[0] = {n_first}")):
                bad = [i for i in rows(b) if bound is not None and i >= bound]
                if bad:
                    raise ValueError(f"{label} {bad} out of range: region 0 has {what} keys")
    check_finite("offset.theta", theta)
    check_finite("offset.gy (basis)", offset.gy)
    check_finite("offset.gx (basis)", offset.gx)


def check_op_indices(tokens, pin, lengths, B: int, R: int, T: int, N: int) -> None:
    """Shapes of the custom ops' index arguments (no value reads): tokens int32 [T] or [B, T], pin
    int32 flags [N] or [B, N], lengths int32 [R]: what the kernels index by (b, t), (b, n) and r."""
    for name, t, (dim, size), per_row in (("tokens", tokens, ("T", T), True), ("pin", pin, ("N", N), True),
                                          ("lengths", lengths, ("R", R), False)):
        if t is None:
            continue
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if _shape(t) not in [(size,)] + ([(B, size)] if per_row else []):
            want = f"[{dim}={size}]" + (f" or [B={B}, {dim}={size}]" if per_row else "")
            raise ValueError(f"{name} must have shape {want}, got {_shape(t)}")


def probs_columns(cols, N: int, n_first, device):
    """return_probs given as something other than None / False: True (every column: returns None),
    or region 0's column indices, a sequence of ints or a 1-D integer tensor, each in [0, N) (in
    [0, n_first) when region 0's key length is known; repeats allowed). Returns the columns as a
    tuple of ints, or a tensor's as an int64 tensor on ``device`` (unchecked where its values cannot
    be read now: CUDA-graph capture, torch.compile)."""
    if cols is True:
        return None
    what = ("return_probs must be a bool or region 0's column indices (a sequence of ints or a 1-D integer "
            "tensor)")
    if isinstance(cols, torch.Tensor):
        if cols.dim() != 1 or cols.dtype.is_floating_point or cols.dtype.is_complex or cols.dtype == torch.bool:
            raise TypeError(f"{what}, got a {cols.dtype} tensor of shape {_shape(cols)}")
        if cols.device != device and cols.device.type != "cpu":
            raise ValueError(f"return_probs' column tensor must be on q's device {device} (or the CPU), got "
                             f"{cols.device}")
        index = cols.to(device=device, dtype=torch.int64)
        if cols.device == device and _capturing(cols):  # its values cannot be read now
            return index
        values = cols.tolist()
    else:
        if isinstance(cols, (str, bytes, bool)) or not hasattr(cols, "__len__"):
            raise TypeError(f"{what}, got {type(cols).__name__}")
        values = list(cols)
        if not all(_is_int(v) for v in values):
            raise TypeError(f"{what}, got {values!r}")
        values = [int(v) for v in values]
        index = tuple(values)
    if not values:
        raise ValueError("return_probs: the column list is empty (give at least one column, or True for all)")
    bound, name = (N, f"N = {N}") if n_first is None else (n_first, f"key_lengths[0] = {n_first}")
    bad = [v for v in values if not 0 <= v < bound]
    if bad:
        raise ValueError(f"return_probs columns {bad} out of range: region 0's columns are [0, {name})")
    return index


def check_grad_probs(g, q: torch.Tensor, N: int) -> None:
    """The backward op's grad_probs: [B, H, M, N] in the compute dtype, on q's device."""
    B, H, M, _ = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grad_probs must be a tensor [B, H, M, N] or None, got {type(g).__name__}")
    if _shape(g) != (B, H, M, N):
        raise ValueError(f"grad_probs must have shape [B={B}, H={H}, M={M}, N={N}], got {_shape(g)}")
    if g.dtype != ct or g.device != q.device:
        raise TypeError(f"grad_probs must be {ct} on q's device {q.device}, got {g.dtype} on {g.device}")
