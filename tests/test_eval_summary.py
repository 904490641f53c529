"""stattn eval's summary: bootstrap intervals and the per-method table, from records."""
import numpy as np
import pytest

from stattn.evaluation import summary as S


def test_bootstrap_ci():
    assert S.bootstrap_ci([0.25] * 5) == (0.25, 0.25, 0.25)
    x = [0.1, 0.4, 0.35, 0.8, 0.2, 0.5]
    mean, lo, hi = S.bootstrap_ci(x)
    assert mean == pytest.approx(np.mean(x)) and lo < mean < hi
    rng = np.random.default_rng(S.BOOTSTRAP_SEED)            # the same procedure, written out
    means = [np.mean([x[i] for i in rng.integers(0, len(x), len(x))]) for _ in range(S.BOOTSTRAP)]
    assert (lo, hi) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    assert S.bootstrap_ci(x) == (mean, lo, hi)
    with pytest.raises(ValueError, match="values"):
        S.bootstrap_ci([])


def _r(prompt, seed, method, clip, ms, s="ae"):
    return {"prompt": prompt, "seed": seed, "method": method, "set": s, "generate_ms": ms, "peak_bytes": None,
            "scores": {"clip_score": clip}}


def test_summarize_by_hand():
    records = [_r("p", 0, "none", 0.2, 10), _r("p", 1, "none", 0.4, 30), _r("q", 0, "none", 0.6, 20),
               _r("p", 0, "regulation", 0.5, 30), _r("q", 0, "regulation", 0.7, 30)]
    out = S.summarize(records, {"clip": "tiny"})
    none, reg = out["sets"]["ae"]["none"], out["sets"]["ae"]["regulation"]
    assert none["clip_score"]["mean"] == pytest.approx((0.3 + 0.6) / 2)      # prompt means, then their mean
    assert none["clip_score"]["prompts"] == 2 and none["images"] == 3
    assert none["ms_per_image"] == 20 and reg["overhead_vs_none"] == pytest.approx(0.5)
    assert "detected" not in none and out["metric_models"] == {"clip": "tiny"}
    md = S.markdown(out)
    assert "| regulation | 2 |" in md and "+50.0 %" in md


def test_summary_has_an_all_row_for_several_sets():
    records = [_r("p", 0, "none", 0.2, 10, "a"), _r("q", 0, "none", 0.6, 10, "b")]
    sets = S.summarize(records)["sets"]
    assert set(sets) == {"a", "b", S.ALL} and sets[S.ALL]["none"]["clip_score"]["mean"] == pytest.approx(0.4)


def _two_methods():
    return [_r("p", 0, "none", 0.2, 10), _r("q", 0, "none", 0.6, 20), _r("p", 0, "regulation", 0.5, 30)]


def test_write_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")       # an optional extra: summary.png only where it is installed
    from PIL import Image

    s = S.write(tmp_path, _two_methods(), {"clip": "tiny"})
    assert s["plot"] == str(tmp_path / "summary.png") and Image.open(s["plot"]).size[0] > 100
    assert "no plot" not in (tmp_path / "summary.md").read_text()


def test_write_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    s = S.write(tmp_path, _two_methods())
    assert s["plot"] is None and not (tmp_path / "summary.png").exists()
    assert "(no plot: matplotlib is not installed)" in (tmp_path / "summary.md").read_text()
    import json
    assert json.loads((tmp_path / "summary.json").read_text())["sets"] == s["sets"]
