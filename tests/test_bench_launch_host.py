"""bench/launch_host.py runs on the CPU (no GPU, no driver) and writes its files; the launch is
restored after it. No timing is judged here (bench/results holds the measured runs)."""
import json

from bench import launch_host
from stattn.kernels import launch


def test_launch_host_measures_every_problem_and_restores_the_launch(tmp_path):
    real = launch._launch
    assert launch_host.main(["--repeats", "2", "--min-time", "0", "--out", str(tmp_path)]) == 0
    assert launch._launch is real
    (path,) = tmp_path.glob("launch-host-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["problem"] for r in rows] == [p[0] for p in launch_host.PROBLEMS]
    assert all(r[k] > 0 for r in rows for k in ("forward_us", "backward_us", "binder_us"))
    assert "| plain M=4096 D=40 |" in next(tmp_path.glob("launch-host-*.md")).read_text()


def test_bad_counts_are_named(capsys):
    import pytest

    with pytest.raises(SystemExit):
        launch_host.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_host.main(["--min-time", "-1"])
    assert "--min-time must be at least 0" in capsys.readouterr().err
