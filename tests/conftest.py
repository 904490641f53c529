"""Test set-up: without a GPU the Triton kernels run under the interpreter (set before the kernels
module is imported); tests pick the backend per case through STATTN_BACKEND. Every test starts from
the same global state and leaves it as it found it (see _isolated)."""
import os
import random

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _seed_global_rngs():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


_seed_global_rngs()   # module-scoped fixtures built before the first test see the same state too


_HOST_BOUND: dict = {}


def shipped_host_bound_macs() -> int:
    """The processors' HOST_BOUND_MACS as shipped (read before the first test sets it to 0)."""
    from stattn.integration import processors

    return _HOST_BOUND.setdefault("default", processors.HOST_BOUND_MACS)


@pytest.fixture(autouse=True)
def _isolated():
    """No result may depend on the order tests run in: the global RNGs start seeded (a test drawing
    from them, or one that seeds them for a model's init, gets the same numbers wherever it runs) and
    are seeded again afterwards (for the module fixtures built between tests); the thread count, the
    default dtype, stattn's value checks and the STATTN_ / thread / ISA variables are put back as they
    were, whatever the test did to them. The processors' plain calls go through stattn's op at every
    size (HOST_BOUND_MACS = 0), so that the integration tests test it; ``host_bound_sdpa`` puts back
    the shipped threshold (host-bound CPU calls to SDPA)."""
    import stattn
    from stattn.integration import processors

    checks = stattn.set_value_checks(True)     # (read through the public setter, then put back)
    stattn.set_value_checks(checks)
    shipped_host_bound_macs()
    processors.HOST_BOUND_MACS = 0             # the processors' plain calls through the op (not SDPA)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    prefixes = ("STATTN_", "OMP_", "MKL_", "ONEDNN_", "DNNL_", "ATEN_CPU_CAPABILITY", "TRITON_")
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    _seed_global_rngs()
    yield
    for k in [k for k in os.environ if k.startswith(prefixes) and k not in env]:
        del os.environ[k]
    os.environ.update(env)
    stattn.set_value_checks(checks)
    processors.HOST_BOUND_MACS = 0
    torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _seed_global_rngs()


@pytest.fixture
def host_bound_sdpa():
    """The processors' shipped HOST_BOUND_MACS: plain host-bound CPU calls run SDPA."""
    from stattn.integration import processors

    processors.HOST_BOUND_MACS = shipped_host_bound_macs()
    return processors.HOST_BOUND_MACS


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    """Route the op to the Triton kernels (CUDA, or the interpreter on CPU)."""
    monkeypatch.setenv("STATTN_BACKEND", "triton")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", "reference")


@pytest.fixture
def value_reads(monkeypatch):
    """The names the op's NaN / inf checks read while they are on (a host read, a sync per call on a
    GPU): a list that fills during the test."""
    from stattn import _validate as V

    read, real = [], V.check_finite

    def recorded(name, t):
        if V._value_checks:
            read.append(name)
        return real(name, t)
    monkeypatch.setattr(V, "check_finite", recorded)
    return read


def nan_empty(*args, **kwargs):
    """torch.empty filled with NaN (integers: a huge negative value): what poisoned outputs start as."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-(2 ** 30))


def nan_empty_strided(*args, **kwargs):
    """torch.empty_strided filled with NaN: the op's o and dq as poisoned outputs start."""
    return torch.empty_strided(*args, **kwargs).fill_(float("nan"))


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts NaN-filled, so an element a kernel fails to write fails the test."""
    from stattn.kernels import launch

    monkeypatch.setattr(launch, "_empty", nan_empty)
    monkeypatch.setattr(launch, "_empty_strided", nan_empty_strided)


def require_native():
    """Skip without the native extension, except where CI sets STATTN_REQUIRE_NATIVE=1: there a broken
    build must fail."""
    from stattn import native

    if native.load():
        return
    if os.environ.get("STATTN_REQUIRE_NATIVE") == "1":
        pytest.fail(f"native extension unavailable: {native._state.get('error')}", pytrace=False)
    pytest.skip(f"native extension unavailable: {native._state.get('error')}")


@pytest.fixture
def backend(request, monkeypatch):
    """The op routed to one backend (an indirect parameter: reference, triton, native), every output of
    it (the reference's, the launcher's, the native kernels') NaN-poisoned before the call."""
    from stattn import ops

    name = request.param
    if name == "native":
        require_native()
        monkeypatch.setenv("STATTN_NATIVE_POISON", "1")
    if name == "triton":
        from stattn.kernels import launch

        monkeypatch.setattr(launch, "_empty", nan_empty)
        monkeypatch.setattr(launch, "_empty_strided", nan_empty_strided)
    monkeypatch.setattr(ops, "_empty_strided", nan_empty_strided)
    monkeypatch.setenv("STATTN_BACKEND", name)
    return name
