"""bench/compile_demand.py: its xdist schedule on made-up numbers, and one whole run on a one-test
selection (capture under the interpreter, the sm_90 compile of each variant, the result files)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_demand as cd

REPO = Path(__file__).resolve().parent.parent


def test_schedule_hands_tests_to_the_first_free_process_and_shares_finished_compiles():
    seconds = {"a": 4.0, "b": 2.0, "c": 1.0}
    tests = [("t1", ["a"]), ("t2", ["a", "b"]), ("t3", ["c"]), ("t4", ["a", "c"])]
    assert cd.schedule(tests, seconds, 1) == {"makespan_s": 7.0, "compile_s": 7.0}
    # 2 processes: t1 compiles a (0-4) on p0 while t2 compiles a again (0-4) and b (4-6) on p1; t3 on
    # p0 compiles c (4-5); t4 on p0 at 5 finds a and c done
    assert cd.schedule(tests, seconds, 2) == {"makespan_s": 6.0, "compile_s": 11.0}


def test_a_run_on_one_test_compiles_each_of_its_variants(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    selection = ["tests/test_kernels.py", "-k", "test_kernel_matches_reference and D40-R1-T0"]
    done = subprocess.run([sys.executable, "-m", "bench.compile_demand", "--jobs", "1", "--workers", "1,2",
                           "--out", str(tmp_path), "--", *selection], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("compile-demand-*.json")
    result = json.loads(path.read_text())
    assert result["pytest_args"] == selection and result["tests_launching"] == 1
    # the forward and the backward's dq and dk/dv kernels
    kernels = {r["kernel"]: r["variants"] for r in result["kernels"]}
    assert set(kernels) == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}, kernels
    assert result["variants"] == sum(kernels.values()) and result["compile_s"] > 0
    one, two = result["workers"]
    assert one["makespan_s"] == pytest.approx(result["compile_s"]) and two["makespan_s"] == one["makespan_s"]
    assert "| 2 |" in next(tmp_path.glob("compile-demand-*.md")).read_text()


@pytest.mark.parametrize("argv, words", [(["--workers", "0,4"], "--workers takes positive integers"),
                                         (["--workers", "x"], "--workers takes positive integers"),
                                         (["--jobs", "0"], "--jobs must be at least 1")])
def test_bad_options_are_named(argv, words, capsys):
    with pytest.raises(SystemExit):
        cd.main(argv)
    assert words in capsys.readouterr().err
