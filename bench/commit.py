"""The commit a result was measured at (no torch import: bench.gpu_check's parent process uses it too).

A checkout answers through git; a copy of the tree without .git (as a GPU machine gets it) through
the first word of its COMMIT file (``git rev-parse HEAD > COMMIT`` before copying); else "unknown".
"""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str:
    """git's stdout as written (not stripped: a porcelain line starts with its status, maybe a space)."""
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def tree_state(root: Path = REPO) -> dict:
    """{"commit", "source" ("git" / "COMMIT file" / why unknown), "dirty" (None when unknown),
    "dirty_paths"}: dirty when the working tree differs from HEAD, results (bench/results) excluded."""
    if (root / ".git").exists():
        try:
            commit = _git(root, "rev-parse", "HEAD").strip()
            status = _git(root, "status", "--porcelain", "--", ".", ":(exclude)bench/results")
            paths = [line[3:] for line in status.splitlines()]
            return {"commit": commit, "source": "git", "dirty": bool(paths), "dirty_paths": paths[:50]}
        except (OSError, subprocess.SubprocessError):
            pass
    words = (root / "COMMIT").read_text().split() if (root / "COMMIT").is_file() else []
    if words:
        return {"commit": words[0], "source": "COMMIT file", "dirty": None, "dirty_paths": []}
    return {"commit": "unknown", "source": "no .git, no COMMIT file", "dirty": None, "dirty_paths": []}
