"""stattn.compose(AttentionRegulation, SpatialTemporal): one region_attention call per layer with the
regulation offset on spatial-temporal's prompt region. Checked: zero spatial weights = Attention
Regulation alone, no edit steps = spatial-temporal alone (tiny SD in fp64: the inner loop is a
chaotic map, so two fp32 runs through differently-shaped calls need not share a trajectory; two fp64
ones agree to rounding), the launch count of an edited layer call, settings round trip, the CLI's
--method regulation+spacetime, and bad input."""
import json

import pytest
import torch

import stattn
from stattn.integration import models
from stattn.integration.control import CrossAttentionCall
from stattn.methods.compose import METHOD, Composed, compose
from stattn.methods.regulation.controller import AttentionRegulation
from stattn.methods.spacetime.controller import SpatialTemporal

PROMPT = "a photo of a cat and a frog"


@pytest.fixture(scope="module")
def sd():
    pipe = models.tiny(seed=0, kind="sd", scheduler="DPMSolverMultistepScheduler", dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, ctrl, steps=3, seeds=(1, 2)):
    ctrl.apply(pipe, prompt=PROMPT)
    try:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(PROMPT, num_inference_steps=steps, num_images_per_prompt=len(seeds), generator=gens,
                    height=64, width=64, output_type="latent").images
    finally:
        ctrl.remove(pipe)


def _ar(**kw):
    kw = {"edit_steps": 2, "iters": 5, "generator": torch.Generator().manual_seed(0), **kw}
    return AttentionRegulation(["cat", "frog"], layers="all", **kw)


def _close(a, b):
    # fp64 throughout: the only differences are the rounding of calls with one region vs 1 + n regions
    # (weights 0 add exact zeros, but the products are blocked differently), far below the effect
    return (a - b).abs().max() <= 1e-9 * a.abs().max()


def test_zero_spatial_weights_equal_regulation_alone(sd):
    alone = _latents(sd, _ar())
    composed = _latents(sd, compose(_ar(), SpatialTemporal(["cat", "frog"], weights=0.0)))
    assert _close(composed, alone)
    plain = _latents(sd, _ar(edit_steps=0))
    assert (alone - plain).abs().max() > 1e-2 * alone.abs().max()     # the edit is visible


@pytest.mark.parametrize("mode", ["same_branch", "uncond_ref"])
def test_no_edit_steps_equal_spacetime_alone(sd, mode):
    alone = _latents(sd, SpatialTemporal(["cat", "frog"], mode=mode))
    composed = _latents(sd, compose(_ar(edit_steps=0), SpatialTemporal(["cat", "frog"], mode=mode)))
    assert _close(composed, alone)
    both = _latents(sd, compose(_ar(), SpatialTemporal(["cat", "frog"], mode=mode)))
    assert (both - alone).abs().max() > 1e-2 * alone.abs().max()      # and regulation adds its edit


def test_regulation_layers_only_are_edited(sd):
    """On the layers Attention Regulation does not select, the composed call is spatial-temporal's."""
    st_alone = _latents(sd, SpatialTemporal(["cat", "frog"]))
    composed = _latents(sd, compose(AttentionRegulation(["cat", "frog"], layers="mid_block", edit_steps=0),
                                    SpatialTemporal(["cat", "frog"])))
    assert _close(composed, st_alone)


def _layer_call(step, B=4, H=2, h=8, w=8, D=16, N=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, h * w, D), (B, 1, H, N, D), (B, 1, H, N, D)))
    return CrossAttentionCall("up_blocks.1.attentions.0.transformer_blocks.0.attn2", None, q, k, v, None, (h, w),
                              step, None, D ** -0.5, torch.tensor(step))


def test_edited_layer_call_launches_spacetime_plus_inner_loop(triton_backend, monkeypatch):
    """An edited layer call after step 0 (guidance: uncond + cond rows): the inner loop's 2 launches,
    then spatial-temporal's own launches (one region_attention for the cond rows, one for the uncond
    rows), and nothing else through the Triton launcher."""
    from stattn.kernels import launch

    st = SpatialTemporal(["cat", "frog"], mode="same_branch")
    st._context = True                                   # what apply() sets; the K/V below stand in for it
    n, N, H, D = 2, 77, 2, 16
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, n, H, N, D, generator=g)
    monkeypatch.setattr(st, "_region_kv", lambda call, c0: (torch.cat([call.k[c0:], kv[:1].expand(2, -1, -1, -1, -1)], 1),
                                                            torch.cat([call.v[c0:], kv[1:].expand(2, -1, -1, -1, -1)], 1)))
    monkeypatch.setattr(st, "_grid_masks", lambda call: torch.ones(n, call.q.shape[2]) / 2)
    st.W = torch.full((n, 1), 0.5)
    ar = AttentionRegulation(token_indices=[3, 6], eos_index=9, iters=3, cfg=True)
    both = Composed(ar, st)
    st.cfg = True

    def names_of(ctrl, step):
        names = []
        real = launch._launch
        monkeypatch.setattr(launch, "_launch", lambda kernel, *a: (names.append(kernel.fn.__name__), real(kernel, *a)))
        ctrl.attention(_layer_call(step))
        monkeypatch.setattr(launch, "_launch", real)
        return names

    names_of(both, 0)                                      # step 0 allocates the state (and seeds θ_best)
    st_only = names_of(st, 1)
    assert names_of(both, 1) == ["_inner_loop_kernel", "_best_kernel"] + st_only
    assert st_only == ["_fwd_kernel", "_fwd_kernel"]


def test_settings_round_trip(sd):
    both = compose(_ar(), SpatialTemporal(["cat", "frog"]))
    both.apply(sd, prompt=PROMPT)
    try:
        settings = json.loads(json.dumps(both.settings()))
    finally:
        both.remove(sd)
    assert settings["method"] == METHOD and [p["method"] for p in settings["parts"]] == ["regulation", "spacetime"]
    again = Composed.from_settings(settings)
    again.apply(sd, prompt=PROMPT)
    try:
        assert again.settings() == settings
    finally:
        again.remove(sd)
    assert stattn.compose is compose


def test_bad_input():
    st = SpatialTemporal(["cat", "frog"])
    with pytest.raises(TypeError, match="regulation"):
        compose(st, st)
    with pytest.raises(TypeError, match="spacetime"):
        compose(_ar(), _ar())
    with pytest.raises(ValueError, match="fused=False"):
        compose(_ar(fused=False), st)
    with pytest.raises(ValueError, match="settings"):
        Composed.from_settings({"method": "regulation"})


def test_cli_method_regulation_plus_spacetime(tmp_path):
    from stattn import cli

    out = tmp_path / "run"
    rc = cli.main(["generate", "--model", "tiny", "--prompt", PROMPT, "--method", METHOD, "--targets", "cat", "frog",
                   "--steps", "2", "--size", "64", "--no-maps", "--out", str(out)])
    assert rc in (0, None)
    report = json.loads((out / "report.json").read_text())
    method = report["items"][0]["method"]
    assert method["method"] == METHOD and method["parts"][1]["kwargs"]["objects"] == ["cat", "frog"]
    again = tmp_path / "again"
    rc = cli.main(["generate", "--from-report", str(out / "report.json"), "--out", str(again)])
    assert rc in (0, None)
    first, second = sorted(out.glob("*.png")), sorted(again.glob("*.png"))
    assert first and [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_recorded_maps_with_zero_spatial_weights_equal_regulation_alone(sd):
    alone = _ar(record_maps=True)
    _latents(sd, alone)
    both = compose(_ar(record_maps=True), SpatialTemporal(["cat", "frog"], weights=0.0))
    _latents(sd, both)
    assert len(alone.maps) == len(both.regulation.maps) == 3
    for ma, mb in zip(alone.maps, both.regulation.maps):
        torch.testing.assert_close(mb, ma, rtol=1e-6, atol=1e-9)     # fp32 maps of fp64 runs
