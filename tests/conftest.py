"""Test set-up: without a GPU the Triton kernels run under the interpreter (set before the kernels
module is imported); tests pick the backend per case through STATTN_BACKEND."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
def poisoned(monkeypatch):
    """Every kernel output starts NaN-filled, so an element a kernel fails to write fails the test."""
    from stattn.kernels import launch

    def nan_empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-(2 ** 30))

    monkeypatch.setattr(launch, "_empty", nan_empty)
