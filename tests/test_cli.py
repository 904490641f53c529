"""The `stattn` command end to end on the tiny model: outputs written, bad input fails clearly."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import stattn
from stattn import cli
from stattn.integration import models
from stattn.integration.maps import AttentionMaps, heatmap_figure

PROMPT = "a photo of a cat and a frog"


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_generate_writes_image_heatmaps_and_report(tmp_path, capsys):
    code = run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 3, "--seed", 1,
               "--num-images", 2, "--out", tmp_path, "--no-progress")
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("image_0.png", "image_1.png", "attention_0.png", "attention_1.png", "report.json"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in printed
    img = Image.open(tmp_path / "image_0.png")
    fig = Image.open(tmp_path / "attention_0.png")
    assert fig.size[0] == 3 * img.size[0]  # the image + heatmaps of "cat" and "frog"
    report = json.loads((tmp_path / "report.json").read_text())
    item, = report["items"]
    assert report["args"]["steps"] == 3 and report["args"]["method"] == "none" and report["finished"] is True
    assert item["seed"] == 1 and item["settings"]["seed"] == 1 and item["heatmap_tokens"] == ["cat", "frog"]
    assert item["images"] == ["image_0.png", "image_1.png", "attention_0.png", "attention_1.png"]
    assert len(item["step_ms"]) >= 3 and report["total_ms"] > 0 and item["method"] is None


def test_generate_is_deterministic_and_targets_select_heatmaps(tmp_path):
    for d in ("a", "b"):
        assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 2, "--targets", "frog",
                   "--out", tmp_path / d, "--no-progress") == 0
    a, b = (Image.open(tmp_path / d / "image_0.png") for d in ("a", "b"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((tmp_path / "a" / "report.json").read_text())["items"][0]["heatmap_tokens"] == ["frog"]


def test_generate_with_attention_regulation(tmp_path):
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--method", "regulation", "--targets", "cat",
               "frog", "--steps", 3, "--out", tmp_path / "ar", "--no-progress") == 0
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 3, "--out", tmp_path / "plain",
               "--no-progress", "--no-maps") == 0
    report = json.loads((tmp_path / "ar" / "report.json").read_text())
    item, = report["items"]
    assert report["args"]["method"] == "regulation" and item["settings"]["controller"] == "AttentionMaps"
    assert item["method"]["kwargs"]["targets"] == ["cat", "frog"] and item["method"]["resolved"]["tokens"] == [5, 8]
    edited, plain = (Image.open(tmp_path / d / "image_0.png") for d in ("ar", "plain"))
    assert not np.array_equal(np.asarray(edited), np.asarray(plain))  # the method changed the image


def test_regulation_needs_targets(tmp_path, capsys):
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--method", "regulation", "--out", tmp_path) == 2
    assert "--method regulation needs --targets" in capsys.readouterr().err


def test_generate_with_spatial_temporal_control(tmp_path):
    prompt = "a cat to the left of a frog"
    assert run("generate", "--model", "tiny", "--prompt", prompt, "--method", "spacetime", "--steps", 3,
               "--out", tmp_path / "auto", "--no-progress") == 0
    assert run("generate", "--model", "tiny", "--prompt", prompt, "--method", "spacetime", "--steps", 3,
               "--targets", "cat", "frog", "--layout", "cat [0, 0, 256, 512]\nfrog [256, 0, 256, 512]",
               "--optimize", "--clip", "tiny", "--passes", 2, "--out", tmp_path / "opt", "--no-progress") == 0
    for d in ("auto", "opt"):
        report = json.loads((tmp_path / d / "report.json").read_text())
        assert report["items"][0]["method"]["method"] == "spacetime" and (tmp_path / d / "image_0.png").exists()


def test_spacetime_bad_input(tmp_path, capsys):
    base = ["generate", "--model", "tiny", "--prompt", PROMPT, "--method", "spacetime", "--out", tmp_path]
    assert run(*base, "--optimize") == 2
    assert "--optimize needs --clip" in capsys.readouterr().err
    assert run(*base, "--targets", "zebra") == 2
    assert "zebra" in capsys.readouterr().err


def test_generate_from_a_model_directory(tmp_path):
    models.save(models.tiny(seed=3), tmp_path / "model")
    assert run("generate", "--model", tmp_path / "model", "--prompt", PROMPT, "--steps", 2,
               "--out", tmp_path / "out", "--no-progress", "--no-maps") == 0
    assert (tmp_path / "out" / "image_0.png").exists() and not (tmp_path / "out" / "attention_0.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--model", "tiny", "--method", "telepathy"], "unknown method 'telepathy'"),
    (["--model", "tiny", "--targets", "zebra"], "zebra"),
    (["--model", "tiny", "--size", "100"], "--size: height: expected a positive multiple"),
    (["--model", "tiny", "--steps", "0"], "--num-inference-steps must be at least 1"),
])
def test_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    code = run("generate", "--prompt", PROMPT, "--out", tmp_path, "--no-progress", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("stattn generate: error:") and "\n" not in err
    assert not (tmp_path / "image_0.png").exists()


def test_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run("generate", "--model", tmp_path / "empty", "--prompt", PROMPT, "--out", tmp_path) == 2
    assert "--model" in capsys.readouterr().err


def test_profile_writes_trace_and_table(tmp_path, capsys):
    assert run("profile", "--model", "tiny", "--prompt", PROMPT, "--steps", 2, "--out", tmp_path) == 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert "stattn::region_attention" in (tmp_path / "ops.txt").read_text()
    assert "trace:" in capsys.readouterr().out


def test_console_script_and_bench_e2e(tmp_path):
    exe = shutil.which("stattn") or str(__import__("pathlib").Path(sys.executable).parent / "stattn")
    out = subprocess.run([exe, "bench", "e2e", "--model", "tiny", "--steps", "2", "--repeats", "1",
                          "--variants", "stock,runner", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    variants = result["models"][0]["variants"]
    assert set(variants) == {"stock", "runner"} and variants["runner"]["max_abs_diff_vs_first"] < 1e-3
    assert result["environment"]["git"]["commit"] and result["environment"]["diffusers"]


def test_attention_maps_and_figure():
    rec = AttentionMaps([1, 2], cfg=False)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        rec.maps()
    with pytest.raises(ValueError, match="tokens"):
        AttentionMaps([])
    img = Image.new("RGB", (32, 32), "gray")
    fig = heatmap_figure(img, torch.rand(2, 4, 4), ["cat", "frog"])
    assert fig.size == (96, 32 + 18)
    with pytest.raises(ValueError, match="maps"):
        heatmap_figure(img, torch.rand(3, 4, 4), ["cat", "frog"])


def test_attention_maps_average_the_cond_rows_over_heads_and_calls():
    from stattn.integration.control import CrossAttentionCall

    q, k = torch.randn(2, 3, 16, 8), torch.randn(2, 1, 3, 5, 8)
    call = CrossAttentionCall("x.attn2", None, q, k, k, None, (4, 4), 0, None, 0.5)
    rec = AttentionMaps([1, 3], cfg=True)
    probs = torch.softmax(0.5 * q.double() @ k[:, 0].double().transpose(-1, -2), -1)        # [2, 3, 16, 5]
    plain = (probs @ k[:, 0].double()).float()
    # the layer is plain: the recorder makes its call, output and maps from one pass of the op
    for _ in range(2):
        torch.testing.assert_close(rec.attention(call), plain, rtol=1e-5, atol=1e-6)
    p = probs[1:, ..., [1, 3]].mean(1).float()                                                # [1, 16, 2]
    torch.testing.assert_close(rec.maps(), p.transpose(1, 2).reshape(1, 2, 4, 4), rtol=1e-5, atol=1e-6)

    class Edit(stattn.Controller):           # an inner method's output passes through unchanged
        def attention(self, call):
            return torch.full_like(call.q, 7.0)

    rec = AttentionMaps([1, 3], cfg=True, inner=Edit())
    assert torch.equal(rec.attention(call), torch.full_like(q, 7.0))
    torch.testing.assert_close(rec.maps(), p.transpose(1, 2).reshape(1, 2, 4, 4), rtol=1e-5, atol=1e-6)
