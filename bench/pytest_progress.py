"""A pytest plugin that appends each test's outcome to a JSON-lines file the moment it is known, so
a run killed by a time-out still leaves the results of the tests that finished (junit.xml is only
written at the end). The GPU check's 02-correctness loads it:

    STATTN_PYTEST_PROGRESS=FILE python -m pytest -p bench.pytest_progress ...

One line per test: {"nodeid", "outcome": passed | failed | skipped | error, "when", "duration_s"}.
Under pytest-xdist the controller writes every line (it receives each worker's reports); the
workers write nothing, so no line is doubled and no two processes share the file.
"""
from __future__ import annotations

import json
import os

ENV = "STATTN_PYTEST_PROGRESS"


def _outcome(report) -> str | None:
    """The test's outcome if this report settles it (pytest's own rules), else None."""
    if report.when == "call":
        return "skipped" if report.skipped else "passed" if report.passed else "failed"
    if report.when == "setup" and not report.passed:
        return "skipped" if report.skipped else "error"
    if report.when == "teardown" and report.failed:
        return "error"     # after the call's line: the test is then counted as both, as pytest does
    return None


class _Progress:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")

    def pytest_runtest_logreport(self, report):
        outcome = _outcome(report)
        if outcome is None:
            return
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if outcome == "skipped" else "xpassed"
        self.file.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                                    "duration_s": round(report.duration, 4)}) + "\n")
        self.file.flush()     # line by line: a kill keeps every line written before it

    def pytest_unconfigure(self, config):
        self.file.close()


def pytest_configure(config):
    path = os.environ.get(ENV)
    if path and not hasattr(config, "workerinput"):     # xdist workers have workerinput: the controller writes
        config.pluginmanager.register(_Progress(path), "stattn-progress")


def read(path) -> list:
    """The records of a progress file; a line cut short by a kill is left out."""
    records = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records
