"""The native CPU implementation (csrc/): loading, and the Python side of its ops.

The C++ extension registers ``torch.ops.stattn_native.region_attention`` and
``torch.ops.stattn_native.region_attention_backward``; ``stattn.ops`` calls them for CPU tensors
(STATTN_BACKEND=auto or native). It is built by ``pip install -e . --no-build-isolation`` (setup.py,
as the module ``stattn._native``); without that build (a plain ``pip install .`` cannot compile
against the user's torch) it is compiled on first use with torch.utils.cpp_extension.load (needs
ninja and a C++ compiler) from :func:`source_dir`: the copy a wheel ships as stattn/csrc, or the
checkout's csrc/. If neither works, ``available()`` is False and the op falls back to the PyTorch
reference with one warning line saying why and how to fix it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["available", "load", "forward", "backward", "inner_loop", "source_dir", "BUILD_HINT"]

_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"   # a wheel / sdist install (setup.py: stattn.csrc)
_REPO_CSRC = Path(__file__).resolve().parent.parent / "csrc"  # a checkout (editable install)
# No -march=native: the build must run on any machine it is copied to (the row loops are compiled
# for x86-64-v3 and the baseline by function multi-versioning instead); -fno-trapping-math lets the
# compiler vectorise the loops with comparisons (exp's clamp, max). -fopenmp: at::parallel_for is a
# header template whose OpenMP backend is a `#pragma omp parallel` compiled into the extension;
# without the flag the pragma is dropped and every op runs on one thread (it links libgomp.so.1, the
# copy torch has already loaded). Same flags in setup.py.
CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
BUILD_HINT = ("build it with `pip install --no-build-isolation .` (torch installed first, a C++ compiler), or "
              "let stattn build it on first use (needs ninja and a C++ compiler); STATTN_BACKEND=reference "
              "silences this warning")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided, "error": why not


def source_dir(candidates=None) -> Optional[Path]:
    """The directory of the C++ sources for the build on first use: the first of ``candidates``
    (default: the packaged stattn/csrc, then the checkout's csrc/) holding a .cpp file, or None."""
    for d in candidates if candidates is not None else (_PACKAGED_CSRC, _REPO_CSRC):
        if Path(d).is_dir() and any(Path(d).glob("*.cpp")):
            return Path(d)
    return None


def _import_built() -> bool:
    spec = importlib.util.find_spec("stattn._native")
    if spec is None or spec.origin is None:
        _state["error"] = "stattn._native is not built"
        return False
    built = Path(spec.origin).stat().st_mtime
    # only a checkout's csrc/ is edited; an installed copy's mtimes are those of the install
    if source_dir() == _REPO_CSRC and any(f.stat().st_mtime > built for f in _REPO_CSRC.iterdir()):
        _state["error"] = "stattn._native is older than csrc/ (rebuilding on first use)"
        return False  # an edited checkout: the JIT build compiles the current sources
    try:
        from stattn import _native  # noqa: F401  (importing registers the ops)
    except ImportError as e:
        _state["error"] = f"stattn._native does not load ({e})"
        return False
    return True


def _jit_build() -> bool:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        _state["error"] = (f"the C++ sources are in neither {_PACKAGED_CSRC} nor {_REPO_CSRC}: reinstall stattn "
                           "from its repository or sdist")
        return False
    if not cpp_extension.is_ninja_available():
        _state["error"] = "stattn._native is not built and ninja is missing for the build on first use: `pip install ninja`"
        return False
    compiler = os.environ.get("CXX", "").strip() or "c++"   # as cpp_extension picks it; may be "ccache g++"
    if not shutil.which(compiler.split()[0]):
        _state["error"] = (f"stattn._native is not built and there is no C++ compiler ({compiler}) for the build on "
                           "first use: install one (e.g. `apt install g++`) or set CXX")
        return False
    try:
        cpp_extension.load(name="stattn_native", sources=[str(s) for s in sorted(src.glob("*.cpp"))],
                           extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                           extra_include_paths=[str(src)], is_python_module=False,
                           verbose=os.environ.get("STATTN_NATIVE_VERBOSE") == "1")
    except Exception as e:  # compiler failing: the reference still works
        _state["error"] = (f"building the native extension from {src} failed ({type(e).__name__}: "
                           f"{_one_line(str(e)[-500:])}); STATTN_NATIVE_VERBOSE=1 shows the compiler output")
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load() -> bool:
    """Load (or JIT-build) the extension once; True if its ops are registered."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                ok = hasattr(torch.ops, "stattn_native") and _has_ops()
                ok = ok or _import_built() or _jit_build()
                _state["ok"] = ok and _has_ops()
    return _state["ok"]


def _has_ops() -> bool:
    try:
        torch.ops.stattn_native.region_attention  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def available() -> bool:
    """True if the native ops can run; otherwise warns once (with how to build) and returns False."""
    if load():
        return True
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"stattn: native CPU kernels unavailable, using the PyTorch reference: "
                      f"{_state.get('error', 'unknown error')}; {BUILD_HINT}", RuntimeWarning, stacklevel=3)
    return False


def _ops():
    """torch.ops.stattn_native, loading the extension first."""
    if not load():
        raise RuntimeError(f"stattn native kernels unavailable: {_state.get('error')}; {BUILD_HINT}")
    return torch.ops.stattn_native


def forward(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale,
            save_logits: bool = False, lengths=None, want_probs: bool = False) -> tuple[Tensor, ...]:
    """(o [B, H, M, D] in q's dtype, lse [B, R + has_pin, H, M] float32, logits), and probs with
    ``want_probs``: lse as the Triton forward; logits [B, H, M, R * N] (scale q k_r^T, float32,
    float64 for float64 inputs; -inf at the padding keys of ``lengths``) when ``save_logits``, for
    :func:`backward` to skip recomputing them, else an empty tensor; probs [B, H, M, N] (logits'
    dtype, contiguous): region 0's probabilities as applied (pinned columns un-offset, 0 on its
    padding), from the same softmax as o. ``tokens`` int32 [T] or [B, T] and ``pin`` int32 flags
    [N] or [B, N]: shared by the batch rows or one row each; ``lengths`` int32 [R] or None: region r
    attends to its first lengths[r] keys (None: all N)."""
    # trailing arguments at the schema's defaults are left out: each one passed costs the dispatcher's
    # parsing (a host-bound call's fixed cost), and the call without want_probs is the one an older
    # build knows
    tail = (bool(save_logits), lengths, True)
    given = 3 if want_probs else 2 if lengths is not None else 1 if save_logits else 0
    out = _ops().region_attention(q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, float(scale),
                                  *tail[:given])
    return out if want_probs else out[:3]


def backward(grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, scale, lse, needs,
             logits=None, lengths=None, grad_probs=None):
    """(dq, dk, dv, dweights, dmasks, dtheta) with None where ``needs`` is False (dtheta is zeros
    when theta is given but no token is targeted; dk and dv are 0 at the padding keys of
    ``lengths``); ``logits``: the forward's saved logits, if any; ``grad_probs``: None or the
    gradient [B, H, M, N] (logits' dtype) w.r.t. the forward's probs, added to region 0's dL/dp (it
    reaches dq, dk and dtheta); the other arguments as :func:`forward`'s."""
    grads = _ops().region_attention_backward(
        grad_out, q, k, v, weights, masks, affine, theta, tokens, gy, gx, pin, float(scale), lse,
        [bool(n) for n in needs], logits, lengths, *(() if grad_probs is None else (grad_probs,)))
    return [g if n else None for g, n in zip(grads, needs)]


def inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, lr, qpos, quantile, m_target, weights):
    """stattn.regulation_core.inner_loop's CPU path (arguments already checked, as the Triton
    launcher's): (theta_best, best_iter 0-d int64, losses [iters]) in the compute dtype. ``qpos`` =
    quantile_position(quantile, M, compute dtype), m_target = thr / T, weights = (w0, w1, w2)."""
    lo, hi, frac = qpos
    return _ops().regulation_inner_loop(q, k, tokens, theta0, gy, gx, float(scale), int(iters), float(lr),
                                        float(quantile), int(lo), int(hi), float(frac), float(m_target),
                                        *(float(w) for w in weights))
