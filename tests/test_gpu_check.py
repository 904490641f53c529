"""bench/gpu_check.py's stage runner with fake stages (sleep, small scripts): time-outs kill the
stage's process group and keep the earlier stages, summary.json is valid after every stage, the
commit without .git. Seconds, no benchmark, no dry run (CI runs that: .ci/run)."""
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import gpu_check as gc
from bench.commit import tree_state


def _stage(name, budget_s, *argvs, keys=lambda d: {}):
    def run(ctx):
        for argv in argvs:
            ctx.call(argv(ctx) if callable(argv) else argv)
    return gc.Stage(name, budget_s, run, keys)


def _check(stages, tmp_path, budget_s=60.0, **kw):
    return gc.run_check(stages, tmp_path / "out", budget_s, dry=True, log=lambda *a: None, **kw)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_stage_past_its_budget_is_killed_and_the_earlier_stages_are_kept(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the sleep is a grandchild: only killing the whole process group ends it
    slow = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    stages = [_stage("01-first", 30, [sys.executable, "-c", "pass"]),
              _stage("02-slow", 1.5, slow),
              _stage("03-after", 30, ["true"])]
    t0 = time.monotonic()
    summary = _check(stages, tmp_path)
    assert time.monotonic() - t0 < 20
    status = {r["name"]: r["status"] for r in summary["stages"]}
    assert status["01-first"] == "ok" and status["03-after"] == "ok"
    assert status["02-slow"].startswith("timed out")
    assert not summary["ok"]
    deadline = time.monotonic() + 5
    while _alive(int(pidfile.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(pidfile.read_text()))
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in written["stages"]] == [status[n] for n in ("01-first", "02-slow", "03-after")]
    assert "timed out" in (tmp_path / "out" / "02-slow" / "log.txt").read_text()
    assert "02-slow | timed out" in (tmp_path / "out" / "summary.md").read_text()


def test_summary_json_is_valid_after_every_stage(tmp_path):
    """Each stage reads the summary the earlier ones left: valid JSON, the earlier stage done, this one running."""
    out = tmp_path / "out"
    probe = ("import json, sys; s = json.load(open(sys.argv[1])); st = {{r['name']: r['status'] for r in s['stages']}}; "
             "assert st['{prev}'] == 'ok' and st['{this}'] == 'running', st")
    stages = [_stage("01-a", 30, ["true"])]
    for prev, this in (("01-a", "02-b"), ("02-b", "03-c")):
        stages.append(_stage(this, 30, [sys.executable, "-c", probe.format(prev=prev, this=this), out / "summary.json"]))
    summary = _check(stages, tmp_path, archive=tmp_path / "out.tar.gz")
    assert summary["ok"], summary["stages"]
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = tar.getnames()
    assert "out/summary.json" in names and "out/03-c/log.txt" in names


def test_the_overall_budget_caps_the_stages(tmp_path):
    stages = [_stage("01-a", 30, ["sleep", "30"]), _stage("02-b", 30, ["true"])]
    t0 = time.monotonic()
    summary = _check(stages, tmp_path, budget_s=1.5)
    assert time.monotonic() - t0 < 15
    assert summary["stages"][0]["status"].startswith("timed out")
    assert summary["stages"][1]["status"] == "not run: the overall budget is spent"


def test_a_failing_command_and_a_broken_stage_do_not_stop_the_rest(tmp_path):
    def broken(ctx):
        raise RuntimeError("no wheel")

    def bad_keys(directory):
        return json.loads("{half written")

    stages = [_stage("01-fails", 30, ["false"], ["true"]), gc.Stage("02-broken", 30, broken),
              _stage("03-keys", 30, ["true"], keys=bad_keys), _stage("04-ok", 30, ["true"])]
    summary = _check(stages, tmp_path)
    rec = {r["name"]: r for r in summary["stages"]}
    assert rec["01-fails"]["status"].startswith("failed: false (exit 1)")
    assert [c["status"] for c in rec["01-fails"]["commands"]] == ["exit 1", "ok"]
    assert rec["02-broken"]["status"] == "error: RuntimeError: no wheel"
    assert rec["03-keys"]["status"] == "ok" and "JSONDecodeError" in rec["03-keys"]["keys"]["error"]
    assert rec["04-ok"]["status"] == "ok"


def test_a_command_skipped_for_lack_of_stage_time(tmp_path):
    stage = gc.Stage("01-a", 30, lambda ctx: ctx.call(["true"], min_left_s=1000))
    rec = _check([stage], tmp_path)["stages"][0]
    assert rec["status"] == "ok" and rec["commands"][0]["status"].startswith("skipped: ")


def test_the_summary_survives_missing_result_files(tmp_path):
    """The real stages' readers on empty folders: every number n/a, no exception."""
    summary = {"mode": "gpu", "budget_s": 480, "started": "now", "stages": []}
    for stage in gc.default_stages():
        keys = gc._guarded(stage.keys, tmp_path)
        summary["stages"].append({"name": stage.name, "budget_s": stage.budget_s, "status": "timed out: x",
                                  "keys": keys, "details": stage.details(keys), "commands": []})
    text = gc.markdown(summary)
    assert "| CUDA tests (`pytest -m gpu`) pass | missing (pytest did not finish) | n/a |" in text
    assert "| yes |" not in text and "| NO |" not in text


def test_junit_counts(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" name="test_b">'
        '<failure message="boom"/></testcase><testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    keys = gc.keys_correctness(tmp_path)
    assert (keys["passed"], keys["failures"], keys["skipped"]) == (1, 1, 1)
    assert keys["not_passed"] == ["tests.test_x::test_b"]


_PROGRESS_TESTS = """
import pytest, time

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

@pytest.mark.gpu
def test_a():
    pass

@pytest.mark.gpu
def test_b():
    assert False

@pytest.mark.gpu
def test_c():
    pytest.skip("no")

@pytest.mark.gpu
def test_d(broken):
    pass

@pytest.mark.gpu
@pytest.mark.xfail(strict=True)
def test_e():
    assert False

@pytest.mark.gpu
def test_f():
    time.sleep(120)

@pytest.mark.gpu
def test_g():
    pass
"""


def test_a_timed_out_pytest_still_gives_the_counts_of_the_tests_done(tmp_path):
    """02's pytest killed by its budget mid-run: no junit.xml, the counts come from progress.jsonl."""
    tests = tmp_path / "test_progress_case.py"
    tests.write_text(_PROGRESS_TESTS)
    stage = gc.Stage("02-correctness", 8, lambda ctx: gc.run_gpu_tests(ctx, [str(tests)]), gc.keys_correctness)
    rec = _check([stage], tmp_path)["stages"][0]
    assert rec["status"].startswith("timed out")
    assert not (tmp_path / "out" / "02-correctness" / "junit.xml").exists()
    keys = rec["keys"]
    assert keys["partial"] is True
    assert (keys["tests"], keys["passed"], keys["failures"], keys["errors"], keys["skipped"]) == (5, 1, 1, 1, 2)
    assert sorted(n.split("::")[-1] for n in keys["not_passed"]) == ["test_b", "test_d"]
    assert gc.brief_correctness(keys).startswith("partial (pytest did not finish): 1 passed, 1 failed")
    lines = gc.pytest_progress.read(tmp_path / "out" / "02-correctness" / gc.PROGRESS)
    assert [r["outcome"] for r in lines] == ["passed", "failed", "skipped", "error", "xfailed"]


def test_progress_lines_match_the_junit_counts_of_a_finished_run(tmp_path):
    tests = tmp_path / "test_progress_case.py"
    tests.write_text(_PROGRESS_TESTS.replace("time.sleep(120)", "pass"))
    stage = gc.Stage("02-correctness", 60, lambda ctx: gc.run_gpu_tests(ctx, [str(tests)]), gc.keys_correctness)
    rec = _check([stage], tmp_path)["stages"][0]
    junit = rec["keys"]
    assert "partial" not in junit and junit["passed"] == 3
    (tmp_path / "out" / "02-correctness" / "junit.xml").unlink()
    progress = gc.keys_correctness(tmp_path / "out" / "02-correctness")
    for k in ("passed", "failures", "errors", "skipped"):
        assert progress[k] == junit[k], k


def test_progress_ignores_a_line_cut_short(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"nodeid": "t::a", "outcome": "passed", "when": "call", "duration_s": 0.1}\n{"nodeid": "t::b", "outc')
    assert [r["nodeid"] for r in gc.pytest_progress.read(path)] == ["t::a"]


@pytest.mark.parametrize("keys, met", [
    ({"partial": True, "tests": 3, "passed": 3, "failures": 0, "errors": 0, "skipped": 0}, None),   # not all ran
    ({"partial": True, "tests": 3, "passed": 2, "failures": 1, "errors": 0, "skipped": 0}, False),  # one failed
    ({"tests": 3, "passed": 3, "failures": 0, "errors": 0, "skipped": 0}, True),
    ({"tests": 3, "passed": 2, "failures": 0, "errors": 1, "skipped": 0}, False),
    ({"junit": "missing (pytest did not finish)"}, None)])
def test_the_cuda_tests_target_from_partial_and_whole_counts(keys, met):
    row = next(r for r in gc._targets({"02-correctness": keys}) if r[0].startswith("CUDA tests"))
    assert row[2] is met


@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 1), (4, 2), (16, 12), (64, 12)])
def test_xdist_workers_leave_two_cores(cpus, workers):
    assert gc.xdist_workers(cpus) == workers


def test_commit_without_git(tmp_path):
    assert tree_state(tmp_path)["commit"] == "unknown"
    (tmp_path / "COMMIT").write_text("0123abc\n")
    assert tree_state(tmp_path) == {"commit": "0123abc", "source": "COMMIT file", "dirty": None, "dirty_paths": []}


def test_commit_from_git(tmp_path):
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f").write_text("x")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    head = git("rev-parse", "HEAD")
    assert tree_state(tmp_path) == {"commit": head, "source": "git", "dirty": False, "dirty_paths": []}
    (tmp_path / "COMMIT").write_text("not this one\n")   # git wins; the untracked file makes the tree dirty
    assert tree_state(tmp_path) == {"commit": head, "source": "git", "dirty": True, "dirty_paths": ["COMMIT"]}
    (tmp_path / "f").write_text("y")     # a modified tracked file: porcelain " M f", first line (a leading space)
    assert tree_state(tmp_path)["dirty_paths"] == ["f", "COMMIT"]


def test_gpu_budgets_fit_eight_minutes_and_the_dry_run_gets_loose_ones():
    assert sum(s.budget_s for s in gc.default_stages()) <= gc.DEFAULT_BUDGET_S["gpu"] <= 480
    assert {s.budget_s for s in gc.default_stages(dry=True)} == {gc.DRY_STAGE_BUDGET_S}
    assert [s.name for s in gc.default_stages(dry=True)] == [s.name for s in gc.default_stages()]


def test_gpu_tests_are_selected_by_their_marker():
    files = gc.gpu_test_files()
    assert "tests/test_kernels.py" in files and "tests/test_runner.py" in files
    # this file holds the marker only inside a string (a test file it writes)
    assert "tests/test_gpu_check.py" not in files and "tests/test_cli.py" not in files


@pytest.mark.parametrize("source, marked", [
    ("@pytest.mark.gpu\ndef test_a(): pass\n", True),
    ("@pytest.mark.gpu()\nclass TestA:\n    def test_a(self): pass\n", True),
    ("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.gpu]\n", True),
    ("pytestmark = pytest.mark.gpu\n", True),
    ("@pytest.mark.slow\ndef test_a(): pass\nTEXT = '@pytest.mark.gpu'\n", False),
    ("# @pytest.mark.gpu\ndef test_a(): pass\n", False)])
def test_the_gpu_marker_is_read_from_the_syntax_tree(source, marked):
    assert gc._marks_gpu(source) is marked


@pytest.mark.parametrize("argv, words", [
    (["--budget-s", "0"], "--budget-s must be a positive number"),
    (["--archive", "x.zip"], "--archive must name a .tar.gz"),
])
def test_bad_options_are_named(argv, words, capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(argv)
    assert words in capsys.readouterr().err


def test_out_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an earlier gpu_check folder"):
        gc._prepare_out(tmp_path)
    assert (tmp_path / "keep.txt").exists()


def test_main_replaces_an_earlier_check_and_returns_the_status(tmp_path):
    out = tmp_path / "out"
    assert gc.main(["--dry", "--out", str(out)], stages=[_stage("01-a", 30, ["true"])]) == 0
    (out / "stale.txt").write_text("old")
    assert gc.main(["--dry", "--out", str(out)], stages=[_stage("01-a", 30, ["false"])]) == 1
    assert not (out / "stale.txt").exists()


def test_host_stage_reads_bench_hosts_results_and_judges_the_target(tmp_path):
    """keys_host on a real bench.host result (the CPU, op cells only), then on one with a slow cell."""
    from stattn.bench import host

    assert host.main(["--op-only", "--repeats", "1", "--min-time", "0", "--out", str(tmp_path / "real")]) == 0
    keys = gc.keys_host(tmp_path / "real")
    assert keys["dtype"] == "float32" and len(keys["rows"]) == 27
    assert gc.brief_host(keys).startswith("27 cells (float32), worst stattn / stock ")
    result = {"dtype": "float16", "op": [{"M": 16, "D": 64, "mode": "no_grad", "ratio": 0.8, "ratio_jit": 1.4}],
              "processor": [{"model": "sd15", "M": 4096, "ratio": 1.2}], "step": [{"model": "tiny", "size": 64, "ratio": 0.9}]}
    (tmp_path / "host-cuda-20990101-000000.json").write_text(json.dumps({**result, "complete": False}))
    assert gc.brief_host(gc.keys_host(tmp_path)) == "3 cells (float16, partial run), worst stattn / stock 1.20 " \
        "(layer sd15 M=4096)"
    (tmp_path / "host-cuda-20990101-000000.json").write_text(json.dumps(result))
    keys = gc.keys_host(tmp_path)
    assert gc.brief_host(keys) == "3 cells (float16), worst stattn / stock 1.20 (layer sd15 M=4096)"
    assert gc.details_host(keys)[2:] == ["| op M=16 D=64 no_grad | 0.80 | 1.40 |", "| layer sd15 M=4096 | 1.20 | – |",
                                         "| step tiny 64 px | 0.90 | – |"]
    (row,) = [r for r in gc._targets({"08-host": keys}) if r[0].startswith("host cost")]
    assert row[1:] == ("worst 1.20 (layer sd15 M=4096)", False)
    (row,) = [r for r in gc._targets({}) if r[0].startswith("host cost")]
    assert row[1:] == ("n/a", None)


def test_attend_excite_target_compares_per_image_refinement_lists():
    """bench.attend_excite records a list of refinement counts per variant (one per image)."""
    ae = {"model": "tiny", "size": 64, "steps": 2, "speedup": {"stattn": 1.2, "diffusers+accelerate": 1.0}}
    for counts, met in (({"diffusers": [1, 2], "stattn": [1, 2]}, True), ({"diffusers": [1, 2], "stattn": [1, 3]}, False)):
        (row,) = [r for r in gc._targets({"07-attend-excite": {**ae, "refinements": counts}})
                  if r[0].startswith("Attend-and-Excite")]
        assert row[2] is met


def test_a_failing_target_reader_shows_in_the_summary(monkeypatch):
    def broken(keys):
        raise TypeError("boom")

    monkeypatch.setattr(gc, "_targets", broken)
    summary = {"mode": "gpu", "budget_s": 480, "started": "now", "stages": []}
    assert "| (the targets could not be read: TypeError: boom) | n/a | n/a |" in gc.markdown(summary)


@pytest.mark.parametrize("outcome", ["failed", "error", "passed", None])
def test_a_failed_cached_launch_test_sends_the_later_stages_through_the_jit(tmp_path, outcome):
    """02's verdict on the cached Triton launch: failed (or errored) on CUDA, the later stages run
    with STATTN_TRITON_LAUNCH=jit and the summary says so; passed, or not reached, nothing changes."""
    records = [{"nodeid": "tests/test_kernels.py::test_x", "outcome": "failed"}]
    if outcome:
        records.append({"nodeid": gc.LAUNCH_TEST, "outcome": outcome})
    seen = tmp_path / "seen"
    stages = [gc.Stage("02-correctness", 30, lambda ctx: gc.launch_fallback(ctx, records)),
              gc.Stage("03-later", 30, lambda ctx: ctx.call(
                  ["sh", "-c", f'echo "${{STATTN_TRITON_LAUNCH:-cached}}" > {seen}']))]
    summary = _check(stages, tmp_path)
    falls_back = outcome in ("failed", "error")
    assert seen.read_text().strip() == ("jit" if falls_back else "cached")
    assert ("triton_launch" in summary) is falls_back
    text = (tmp_path / "out" / "summary.md").read_text()
    assert ("**Triton launch fallback**: jit: test_on_cuda_the_cached_launch_computes_what_the_jit_launch_computes "
            f"{outcome}; the later stages launch" in text) is falls_back


def test_the_correctness_stage_collects_the_cached_launch_test_first(monkeypatch, tmp_path):
    import ast

    seen = []
    monkeypatch.setattr(gc, "run_gpu_tests", lambda ctx, selection: seen.append(selection))
    monkeypatch.setattr(gc, "_importable", lambda ctx, name: False)
    ctx = gc.StageContext(tmp_path, time.monotonic() + 60, {}, False)
    gc.stage_correctness(ctx)
    (selection,) = seen
    assert selection[0] == gc.LAUNCH_TEST_FILE and sorted(selection) == sorted(gc.gpu_test_files())
    path, name = gc.LAUNCH_TEST.split("::")
    tree = ast.parse((gc.REPO / path).read_text())
    assert name in {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}     # the id stays true


def test_a_timed_out_correctness_stage_still_judges_the_cached_launch(monkeypatch, tmp_path):
    def killed(ctx, selection):
        (ctx.directory / gc.PROGRESS).write_text(json.dumps({"nodeid": gc.LAUNCH_TEST, "outcome": "failed"}) + "\n")
        raise gc.StageTimedOut("pytest -m gpu")
    monkeypatch.setattr(gc, "run_gpu_tests", killed)
    ctx = gc.StageContext(tmp_path, time.monotonic() + 60, {}, True)
    with pytest.raises(gc.StageTimedOut):
        gc.stage_correctness(ctx)
    assert ctx.env["STATTN_TRITON_LAUNCH"] == "jit" and ctx.facts["triton_launch"].startswith("jit: ")


@pytest.mark.parametrize("outcome, measured, met", [("passed", "passed", True), ("failed", "failed", False),
                                                    ("skipped", "skipped", None), (None, "not run", None)])
def test_the_cached_launch_target_reads_its_tests_outcome(tmp_path, outcome, measured, met):
    lines = [{"nodeid": "tests/test_kernels.py::test_x", "outcome": "passed"}]
    lines += [{"nodeid": gc.LAUNCH_TEST, "outcome": outcome}] if outcome else []
    (tmp_path / gc.PROGRESS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    for junit in (False, True):          # pytest finished (junit.xml) or was cut short
        if junit:
            (tmp_path / "junit.xml").write_text('<testsuite tests="2" failures="0" errors="0" skipped="0"/>')
        keys = gc.keys_correctness(tmp_path)
        (row,) = [r for r in gc._targets({"02-correctness": keys}) if r[0].startswith("cached Triton launch")]
        assert row[1:] == (measured, met)
