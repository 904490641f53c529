"""bench.host's measured pairs compute the same thing (the gate before timing), at tiny sizes."""
import pytest
import torch

import stattn

from stattn.integration import models
from stattn.bench import host


@pytest.mark.parametrize("mode", host.MODES)
def test_op_case_compares_equal_results(mode):
    r = host.op_case(16, 40, mode, repeats=2, min_s=0.0)
    assert r["max_abs_diff"] <= host.TOL and r["n"] >= 2 and r["ratio"] > 0 and r["mode"] == mode


def test_op_case_gates_the_gradients_too(monkeypatch):
    """fwd+bwd compares dq, dk, dv as well as o: a wrong backward is not timed."""
    real = stattn.region_attention

    def wrong_backward(q, k, v, **kw):
        o = real(q, k, v, **kw)
        return o + 1e-3 * (q - q.detach()) if q.requires_grad else o

    monkeypatch.setattr(host.stattn, "region_attention", wrong_backward)
    host.op_case(16, 40, "no_grad", repeats=2, min_s=0.0)
    with pytest.raises(AssertionError, match="not timing a wrong result"):
        host.op_case(16, 40, "fwd+bwd", repeats=2, min_s=0.0)


def test_op_case_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        host.op_case(16, 40, "on", repeats=2, min_s=0.0)


def test_processor_case_compares_equal_results():
    r = host.processor_case("tiny", 64, 32, 2, 16, 24, repeats=2, min_s=0.0)
    assert r["max_abs_diff"] <= host.TOL and r["stock_ms"] > 0


def test_step_case_restores_the_stock_processors():
    pipe = models.tiny()
    before = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    r = host.step_case("tiny", pipe, 64, steps=3, runs=1)
    assert r["n"] >= 2 and {n: type(p) for n, p in pipe.unet.attn_processors.items()} == before
    assert r["fused_calls"] > 0 and r["sdpa_calls"] == 0      # (the tests' HOST_BOUND_MACS = 0: every call the op)


def test_step_case_reports_the_host_bound_calls_that_ran_sdpa(host_bound_sdpa):
    r = host.step_case("tiny", models.tiny(), 64, steps=2, runs=1)
    assert r["sdpa_calls"] == r["fused_calls"] > 0            # the tiny model's layers are all host-bound


def test_the_gate_refuses_to_time_a_wrong_result():
    with pytest.raises(AssertionError, match="not timing a wrong result"):
        host._gate("x", 1.0)
    with pytest.raises(AssertionError):
        host._gate("x", float("nan"))


def test_markdown_states_the_worst_ratio():
    env = {"device_name": "cpu", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    op = dict(M=16, D=40, mode="no_grad", stattn_us=1.0, sdpa_us=2.0, ratio=0.5, ratio_paired=0.5, n=3)
    proc = dict(model="sd15", M=64, C=32, heads=2, D=16, stattn_ms=1.0, stock_ms=1.0, ratio=1.0, ratio_paired=1.0, n=3)
    step = dict(model="tiny", size=64, stattn_ms=1.1, stock_ms=1.0, ratio=1.1, n=3, fused_calls=44, sdpa_calls=33)
    text = host.markdown({"environment": env, "threads": 1, "op": [op], "processor": [proc], "step": [step]})
    assert "Worst ratio: 1.10 (over the 1.00 target)" in text and "| 33 / 44 |" in text


def test_op_only_markdown_has_the_op_table_alone():
    env = {"device_name": "cpu", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    op = dict(M=16, D=40, mode="no_grad", stattn_us=1.0, sdpa_us=2.0, ratio=0.5, ratio_paired=0.5, n=3)
    text = host.markdown({"environment": env, "threads": 1, "op": [op], "processor": [], "step": []})
    assert "The op (R = 1) vs SDPA" in text and "One cross-attention layer" not in text
    assert "Denoising step" not in text and "Worst ratio: 0.50 (every cell within the 1.00 target)" in text


def test_host_bound_bench_times_both_paths_in_place_and_restores():
    from stattn.bench import host_bound
    from stattn.integration import processors

    rows = host_bound.in_context("tiny", 64, 2)
    assert {(r["M"], r["D"]) for r in rows} == {(64, 16), (16, 32)}           # the tiny model's two shapes
    assert all(r["op_us"] > 0 and r["sdpa_us"] > 0 and r["n"] >= 1 for r in rows)
    assert processors.HOST_BOUND_MACS == 0 and processors.region_attention is stattn.region_attention
    env = {"device_name": "cpu", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    text = host_bound.markdown({"environment": env, "threads": 1, "host_bound_macs": 1 << 22, "rows": rows})
    assert "| tiny | 64 | 2 × 2 × 64 × 77 × 16 | 0.32 |" in text
