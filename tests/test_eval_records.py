"""stattn eval's records: settings hash, flushed appends, torn lines, idempotent merge."""
import json

from stattn.evaluation import records as R


def _rec(prompt, seed, method, h="h1", **kw):
    return {"prompt": prompt, "seed": seed, "method": method, "settings_hash": h, **kw}


def test_settings_hash():
    a = R.settings_hash({"steps": 2, "model": "tiny"})
    assert a == R.settings_hash({"model": "tiny", "steps": 2}) and len(a) == 16
    assert a != R.settings_hash({"model": "tiny", "steps": 3})


def test_writer_appends_and_reads(tmp_path):
    path = R.rank_path(tmp_path, 1)
    with R.Writer(path) as w:
        w.add(_rec("a", 0, "none", x=1))
    with R.Writer(path) as w:      # a rerun appends
        w.add(_rec("a", 1, "none"))
    assert [r["seed"] for r in R.read([path])] == [0, 1]
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2


def test_torn_line_is_skipped_and_cut(tmp_path):
    path = R.rank_path(tmp_path, 0)
    with R.Writer(path) as w:
        w.add(_rec("a", 0, "none"))
    with open(path, "ab") as f:
        f.write(b'{"prompt": "a", "se')          # a write torn by a kill
    assert len(R.read([path])) == 1
    with R.Writer(path) as w:
        w.add(_rec("a", 1, "none"))
    assert [r["seed"] for r in R.read([path])] == [0, 1]
    assert b'"se\n' not in path.read_bytes() and b'"se{' not in path.read_bytes()


def test_merge_is_idempotent_and_ordered(tmp_path):
    with R.Writer(R.rank_path(tmp_path, 0)) as w:
        w.add(_rec("b", 0, "none", v=1))
        w.add(_rec("a", 0, "none", v=2, h="other"))
    with R.Writer(R.rank_path(tmp_path, 1)) as w:
        w.add(_rec("a", 0, "none", v=3))
        w.add(_rec("b", 0, "none", v=9))         # a duplicate key: the first one stays
    order = [("a", 0, "none", "h1"), ("b", 0, "none", "h1")]
    first = R.merge(tmp_path, order)
    text = (tmp_path / R.MERGED).read_bytes()
    assert [r["v"] for r in first] == [3, 1, 2]
    assert R.merge(tmp_path, order) == first and (tmp_path / R.MERGED).read_bytes() == text
    assert [json.loads(line)["v"] for line in text.splitlines()] == [3, 1, 2]
    assert set(R.finished(tmp_path)) == {("a", 0, "none", "h1"), ("b", 0, "none", "h1"), ("a", 0, "none", "other")}
