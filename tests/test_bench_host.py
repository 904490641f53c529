"""bench.host's measured pairs compute the same thing (the gate before timing), at tiny sizes."""
import json
import time

import pytest
import torch

import stattn

from stattn.integration import models
from stattn.bench import host


@pytest.mark.parametrize("mode", host.MODES)
def test_op_case_compares_equal_results(mode):
    r = host.op_case(16, 40, mode, repeats=2, min_s=0.0)
    assert r["max_diff"] <= host.TOL and r["n"] >= 2 and r["ratio"] > 0 and r["mode"] == mode


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
    assert r["max_diff"] <= host.TOL and r["stock_ms"] > 0


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
    env = {"device": "cpu", "device_name": "cpu", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    op = dict(M=16, D=40, mode="no_grad", stattn_us=1.0, sdpa_us=2.0, ratio=0.5, ratio_paired=0.5, n=3)
    proc = dict(model="sd15", M=64, C=32, heads=2, D=16, stattn_ms=1.0, stock_ms=1.0, ratio=1.0, ratio_paired=1.0, n=3)
    step = dict(model="tiny", size=64, stattn_ms=1.1, stock_ms=1.0, ratio=1.1, n=3, fused_calls=44, sdpa_calls=33)
    text = host.markdown({"environment": env, "threads": 1, "dtype": "float32", "op": [op], "processor": [proc],
                          "step": [step]})
    assert "Worst ratio: 1.10 (over the 1.00 target)" in text and "| 33 / 44 |" in text
    assert "(cpu, 1 thread(s), float32)" in text
    cuda = host.markdown({"environment": {**env, "device": "cuda", "device_name": "H200"}, "threads": 1,
                          "dtype": "float16", "cuda_burst": 20, "op": [op], "processor": [], "step": []})
    assert "(H200, bursts of 20 eager calls, then a synchronize, float16)" in cuda


def test_op_only_markdown_has_the_op_table_alone():
    env = {"device": "cpu", "device_name": "cpu", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    op = dict(M=16, D=40, mode="no_grad", stattn_us=1.0, sdpa_us=2.0, ratio=0.5, ratio_paired=0.5, n=3)
    text = host.markdown({"environment": env, "threads": 1, "dtype": "float32", "op": [op], "processor": [],
                          "step": []})
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


def test_tolerance_by_device_and_dtype():
    assert host.tolerance("cpu", torch.float32) == host.TOL
    assert host.tolerance("cuda", torch.float32) > host.TOL                 # tf32 products in the Triton kernels
    assert host.tolerance("cpu", torch.float16) == host.tolerance("cuda", torch.float16) < \
        host.tolerance("cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_and_processor_cases_gate_half_precision_by_its_tolerance(dtype):
    for mode in host.MODES:
        r = host.op_case(16, 40, mode, repeats=2, min_s=0.0, dtype=dtype)
        assert 0 <= r["max_diff"] <= host.tolerance("cpu", dtype)
    r = host.processor_case("tiny", 64, 32, 2, 16, 24, repeats=2, min_s=0.0, dtype=dtype)
    assert 0 <= r["max_diff"] <= host.tolerance("cpu", dtype)


def test_the_gate_scales_by_the_reference_magnitude():
    big = torch.full((3,), 100.0)
    assert host._diff([big + 0.5], [big]) == pytest.approx(0.005)            # 0.5 / 100
    assert host._diff([torch.tensor([0.25])], [torch.tensor([0.0])]) == 0.25   # below 1: absolute


def test_cuda_samples_are_bursts_with_one_synchronize_reported_per_call(monkeypatch):
    calls, syncs = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))

    def slow():
        calls.append(1)
        time.sleep(0.002)

    t = host._timed_calls({"a": slow, "b": slow}, repeats=3, min_s=0.0, device="cuda")
    assert len(syncs) == 2 * (1 + 3) and len(calls) == host.CUDA_BURST * len(syncs)   # warm-up + 3 repeats each
    for r in t.values():
        assert r["n"] == 3 and len(r["times_ms"]) == 3
        assert 2.0 <= r["median"] < 0.5 * 2.0 * host.CUDA_BURST and all(x >= 2.0 for x in r["times_ms"])
    cpu = host._timed_calls({"a": slow}, repeats=3, min_s=0.0, device="cpu")
    assert len(syncs) == 8 and cpu["a"]["n"] == 3                             # one call a sample, no sync


def test_cli_refuses_cuda_without_a_device_and_bad_step_runs(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        host.main(["--device", "cuda"])
    assert e.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host.main(["--step-runs", "0"])
    assert "--step-runs must be at least 1, got 0" in capsys.readouterr().err


def test_cli_op_only_run_records_device_and_dtype(tmp_path):
    assert host.main(["--op-only", "--repeats", "1", "--min-time", "0", "--dtype", "bf16", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("host-*.json")
    result = json.loads(js.read_text())
    assert result["dtype"] == "bfloat16" and result["environment"]["device"] == "cpu" and len(result["op"]) == 27
    assert "1 thread(s), bfloat16" in js.with_suffix(".md").read_text()


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """The result files are rewritten after each table: an error (or a kill) in the processor table
    leaves the op table's, marked partial."""
    def broken(*args, **kwargs):
        raise RuntimeError("cut short")

    monkeypatch.setattr(host, "processor_case", broken)
    with pytest.raises(RuntimeError, match="cut short"):
        host.main(["--quick", "--repeats", "1", "--min-time", "0", "--out", str(tmp_path)])
    (js,) = tmp_path.glob("host-*.json")
    result = json.loads(js.read_text())
    assert result["complete"] is False and len(result["op"]) == 6 and result["processor"] == []
    assert "**Partial result**" in js.with_suffix(".md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # no temporary left


def test_write_results_replaces_the_files_whole(tmp_path, monkeypatch):
    from stattn.bench import env

    result = {"environment": {"device": "cpu"}, "x": 1}
    js, md = env.write_results(result, tmp_path, "t", lambda r: f"x = {r['x']}\n", stem="t-cpu-1")
    assert json.loads(js.read_text())["x"] == 1 and md.read_text() == "x = 1\n"

    def failing(r):
        raise KeyError("markdown failed")

    with pytest.raises(KeyError):
        env.write_results({**result, "x": 2}, tmp_path, "t", failing, stem="t-cpu-1")
    assert json.loads(js.read_text())["x"] == 1 and md.read_text() == "x = 1\n"            # the pair unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-cpu-1.json", "t-cpu-1.md"]


def test_the_jit_launch_column_turns_the_cached_launch_off_only_while_it_runs(monkeypatch):
    from stattn.kernels import launch

    monkeypatch.setattr(launch, "_CACHED", True)
    seen = []
    assert host._jit_launched(lambda: seen.append(launch._CACHED) or 7)() == 7 and seen == [False]
    assert launch._CACHED is True

    def boom():
        raise RuntimeError("inside")
    with pytest.raises(RuntimeError, match="inside"):
        host._jit_launched(boom)()
    assert launch._CACHED is True


def test_the_jit_launch_column_is_cuda_only():
    assert "stattn_jit_us" not in host.op_case(16, 40, "no_grad", repeats=2, min_s=0.0)   # no Triton launch here
    env = {"device": "cuda", "device_name": "H200", "git": {"commit": "abc"}, "torch": "t", "triton": "t"}
    op = dict(M=16, D=64, mode="no_grad", stattn_us=20.0, sdpa_us=25.0, ratio=0.8, ratio_paired=0.8, n=3,
              stattn_jit_us=40.0, ratio_jit=1.6)
    text = host.markdown({"environment": env, "threads": 1, "dtype": "float16", "cuda_burst": 20, "op": [op],
                          "processor": [], "step": []})
    assert "| stattn, JIT launch µs | its ratio |" in text and "| 40.0 | 1.60 |" in text
    cpu_op = {k: v for k, v in op.items() if "jit" not in k}
    assert "JIT launch µs" not in host.markdown({"environment": {**env, "device": "cpu"}, "threads": 1,
                                                 "dtype": "float32", "op": [cpu_op], "processor": [], "step": []})
