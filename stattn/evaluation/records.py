"""records of `stattn eval`: one JSON line per finished image, resumable and mergeable.

Each process appends to its own file (records/rank-<r>.jsonl) with one os.write of the whole
line on an O_APPEND descriptor, then fsync: a killed process loses only the images in flight, and
a line is either all there or (at worst, a torn write at the very end) cut short without its
newline, which the reader skips and the next writer cuts off. A record's key is (prompt, seed,
method, settings hash): changing any setting gives new keys, so old and new records never mix.
Merging reads every rank file, keeps the first record of each key and writes records.jsonl in the
work list's order (atomically): running it again gives the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

RECORDS_DIR = "records"
MERGED = "records.jsonl"


def settings_hash(settings: dict) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key(record: dict) -> tuple:
    return (record["prompt"], record["seed"], record["method"], record["settings_hash"])


def rank_path(out: Path, rank: int) -> Path:
    return Path(out) / RECORDS_DIR / f"rank-{rank}.jsonl"


def _complete_end(path: Path) -> None:
    """Cut a last line that has no newline (a write torn by a kill) off the file."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


class Writer:
    """Appends records to one process's file, one flushed and fsynced line each."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _complete_end(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def add(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        os.write(self.fd, line)     # one call: the line is never interleaved with another writer's
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(paths: Iterable[Path]) -> list:
    """Every complete record of the files, in file order (a torn last line is skipped)."""
    out = []
    for path in paths:
        data = Path(path).read_bytes()
        lines = data.split(b"\n")
        for n, line in enumerate(lines[:-1], 1):    # lines[-1]: after the last newline (empty or torn)
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: not a record ({e})") from e
    return out


def rank_files(out: Path) -> list:
    return sorted((Path(out) / RECORDS_DIR).glob("rank-*.jsonl"))


def finished(out: Path) -> dict:
    """key -> record of everything already recorded under out (every rank's file)."""
    done = {}
    for r in read(rank_files(out)):
        done.setdefault(key(r), r)
    return done


def merge(out: Path, order: Optional[list] = None) -> list:
    """records.jsonl: one record per key, in the order of the keys `order` (the work list; the
    records of other settings or work lists follow in file order). Idempotent."""
    from .. import cli

    done = finished(out)
    rank = {k: i for i, k in enumerate(order or [])}
    records = sorted(done.values(), key=lambda r: rank.get(key(r), len(rank)))   # stable: file order after
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records).encode()
    cli._write_atomic(Path(out) / MERGED, lambda f: f.write(text))
    return records
