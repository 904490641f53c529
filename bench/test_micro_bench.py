"""pytest-benchmark entry to bench/micro.py: a few representative cases (plain, offset, 4 regions),
every implementation, forward and forward+backward, grouped per case and pass.

    TRITON_INTERPRET=1 python -m pytest bench/test_micro_bench.py -q     # CPU: tiny shapes
    python -m pytest bench/test_micro_bench.py -q                        # CUDA: SD 1.5 64x64 layer

Each test asserts correctness only (the fp64 gate of bench/micro.py); pytest-benchmark records
the times. No timing is asserted anywhere.
"""
import functools
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before stattn imports its kernels

from bench import micro  # noqa: E402

DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
INTERPRETER_ROUNDS = 3  # the interpreter takes ~0.1-1 s a call: a fixed, small number of rounds


@functools.cache
def problem(case: micro.Case):
    """Inputs and their fp64 oracle, shared by every implementation and pass of a case."""
    inp = micro.make_inputs(case, DEVICE, DTYPE)
    return inp, micro.fp64_oracle(inp)


def measure(benchmark, fn, interpreted: bool) -> None:
    if DEVICE == "cuda":
        def synced():  # the GPU's time, not the launch's
            fn()
            torch.cuda.synchronize()
        benchmark(synced)
    elif interpreted:
        benchmark.pedantic(fn, rounds=INTERPRETER_ROUNDS, warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.mark.parametrize("pass_name", micro.PASSES)
@pytest.mark.parametrize("impl_name", list(micro.IMPLS))
@pytest.mark.parametrize("case", micro.representative_cases(DEVICE), ids=str)
def test_region_attention(benchmark, case, impl_name, pass_name):
    impl = micro.IMPLS[impl_name]
    reason = micro.skip_reason(impl, case, DEVICE)
    if reason:
        pytest.skip(reason)
    inp, oracle = problem(case)
    benchmark.group = f"{case.name} {pass_name}"
    with micro.stattn_backend(impl.backend):
        result = micro.gate(impl, inp, oracle, micro.tolerance(DEVICE, DTYPE), pass_name)
        assert result["ok"], result
        benchmark.extra_info.update(rel_err=result["err"], bytes=micro.bytes_moved(case, DTYPE, pass_name))
        with micro.value_checks(False):
            measure(benchmark, micro.pass_fn(impl, inp, pass_name),
                    interpreted=DEVICE == "cpu" and impl.backend == "triton")
