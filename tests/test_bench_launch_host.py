"""bench/launch_host.py runs on the CPU (no GPU, no driver) and writes its files; the launch and
Triton's driver are restored after it. No timing is judged here (bench/results holds the measured
runs). It compiles for sm_90, so it runs in a subprocess without the interpreter conftest sets."""
import json
import os
import subprocess
import sys

from bench import launch_host

SCRIPT = """
import sys
from triton.runtime import driver
from bench import launch_host
from stattn.kernels import launch
real, active = launch._launch, driver._active
assert launch_host.main(["--repeats", "2", "--min-time", "0", "--out", sys.argv[1]]) == 0
assert launch._launch is real and driver._active is active and not launch._entries and not launch._layouts
print("restored")
"""


def test_launch_host_measures_every_problem_and_restores_the_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("restored"), done.stderr[-4000:]
    (path,) = tmp_path.glob("launch-host-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["problem"] for r in rows] == [p[0] for p in launch_host.PROBLEMS]
    assert all(r[k] > 0 for r in rows for k in ("forward_us", "backward_us", "jit_launch_us", "cached_launch_us"))
    assert [r["op_us"] is not None for r in rows] == [True, True, False]
    assert "| plain M=4096 D=40 |" in next(tmp_path.glob("launch-host-*.md")).read_text()


def test_bad_counts_are_named(capsys):
    import pytest

    with pytest.raises(SystemExit):
        launch_host.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_host.main(["--min-time", "-1"])
    assert "--min-time must be at least 0" in capsys.readouterr().err


def test_the_interpreter_is_refused(monkeypatch, capsys):
    import pytest

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        launch_host.main(["--repeats", "2"])
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
