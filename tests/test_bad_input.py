"""Bad input is answered, never silently wrong (the library's part): a pinned target and NaN/inf in
the basis (the op), the regulation's lr / prev_weight / decay, spatial-temporal layouts matched by
name (not position) and naming only the prompt's objects, weights within the stated bound, Unicode
object words, and model / CLIP folders that name what is missing. Each valid edge case next to a
rejected one still works (and matches the reference where there is one)."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import stattn
from stattn import native
from stattn.integration import models
from stattn import reference as ref
from stattn.methods.spacetime.layout import Box, Layout, find_objects
from stattn.methods.regulation.controller import AttentionRegulation
from stattn.methods.spacetime.controller import SpatialTemporal, combine, max_weight_sum, region_kv
from stattn.integration.tokens import token_indices

from helpers import TOL, rel_err

PROMPT = "a photo of a cat and a frog"
B, H, h, w, D, R, N = 2, 2, 3, 4, 8, 2, 11
M = h * w


def _qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g, dtype=dtype), torch.randn(B, R, H, N, D, generator=g, dtype=dtype),
            torch.randn(B, R, H, N, D, generator=g, dtype=dtype))


def _theta(T=2, dtype=torch.float32):
    gy, gx = stattn.gaussian_basis(h, w, sigma=1, dtype=dtype)
    return torch.randn(B, H, T, gy.shape[1], gx.shape[1], generator=torch.Generator().manual_seed(1),
                       dtype=dtype), (gy, gx)


# ---------------------------------------------------------------------------------------- the op

@pytest.mark.parametrize("tokens,pinned,words", [
    ((1, 4), (0, 4), r"token indices \[4\] are both targets \(tokens\) and pinned; a pinned column keeps its "
                     r"un-offset probability, so its own attention would never be edited"),
    (((1, 4), (5, 2)), ((0,), (2, 9)), r"token indices \[2\] are both targets \(tokens\) and pinned in batch row 1"),
    (((1, 4), (5, 2)), (5,), r"\[5\] are both targets \(tokens\) and pinned in batch row 1"),
    ((1, 4), ((0,), (0, 1)), r"\[1\] are both targets \(tokens\) and pinned in batch row 1"),
], ids=["shared", "per-row-both", "per-row-tokens", "per-row-pins"])
def test_a_pinned_target_is_rejected_per_row(tokens, pinned, words):
    theta, basis = _theta()
    with pytest.raises(ValueError, match=words):
        stattn.ScoreOffset(theta, tokens, basis, pinned=pinned)


def test_a_column_pinned_in_one_row_may_be_a_target_of_another():
    """Valid edge: row 0 pins 1, row 1 targets it; equals each row computed alone."""
    q, k, v = _qkv(torch.float64)
    theta, basis = _theta(dtype=torch.float64)
    off = stattn.ScoreOffset(theta, ((2, 4), (1, 3)), basis, pinned=((0, 1), (0,)))
    out = stattn.region_attention(q, k, v, offset=off)
    for b in range(B):
        row = stattn.ScoreOffset(theta[b:b + 1], off.row_tokens(b), basis, pinned=off.row_pinned(b))
        expected = ref.region_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], torch.ones(1, R, M, dtype=q.dtype),
                                        torch.ones(1, R, dtype=q.dtype), False, row)
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-12, atol=1e-12)


def _backends():
    names = ["reference", "triton"] + (["native"] if native.load() else [])
    return names


@pytest.mark.parametrize("backend", _backends())
def test_the_custom_op_still_computes_a_pinned_target_as_the_reference(backend, monkeypatch, device):
    """The kernels keep their pinned-target path (the column keeps its un-offset probability,
    its offset still enters the edited softmax's sum); only the public op rejects it, so it is
    reached through torch.ops.stattn.region_attention."""
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, v = (t.to(device) for t in _qkv())
    theta, (gy, gx) = _theta()
    theta, gy, gx = theta.to(device).requires_grad_(), gy.to(device), gx.to(device)
    tokens, pinned = ((1, 4), (5, 2)), ((0, 4), (2,))                    # row 0 pins 4, row 1 pins 2
    pin = torch.zeros(B, N, dtype=torch.int32)
    for b, row in enumerate(pinned):
        pin[b, list(row)] = 1
    weights, masks = torch.rand(B, R, device=device), torch.rand(B, R, M, device=device)
    o, _, _, _ = torch.ops.stattn.region_attention(q, k, v, weights, masks, True, theta,
                                                torch.tensor(tokens, dtype=torch.int32, device=device), gy, gx,
                                                pin.to(device), D ** -0.5)
    dtheta, = torch.autograd.grad(o.square().sum(), theta)
    off = SimpleNamespace(theta=theta.detach().double().requires_grad_(), tokens=tokens, pinned=pinned,
                          gy=gy.double(), gx=gx.double())
    expected = ref.region_attention(q.double(), k.double(), v.double(), masks.double(), weights.double(), True, off)
    unpinned = SimpleNamespace(theta=off.theta.detach(), tokens=tokens, pinned=(), gy=off.gy, gx=off.gx)
    edited = ref.region_attention(q.double(), k.double(), v.double(), masks.double(), weights.double(), True, unpinned)
    assert rel_err(expected, edited) > 1e-6                   # the pinning does change the output
    tol = TOL[(device, torch.float32)]
    assert rel_err(o, expected) < tol
    ref_dtheta, = torch.autograd.grad(expected.square().sum(), off.theta)
    assert rel_err(dtheta, ref_dtheta) < tol * 3


@pytest.mark.parametrize("which", ["gy", "gx"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_basis_is_rejected(which, bad):
    q, k, v = _qkv()
    theta, (gy, gx) = _theta()
    (gy if which == "gy" else gx)[1, 0] = bad
    off = stattn.ScoreOffset(theta, (1, 4), (gy, gx), pinned=(0,))
    with pytest.raises(ValueError, match=rf"offset.{which} \(basis\) contains NaN or inf"):
        stattn.region_attention(q, k, v, offset=off)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # numpy, in the interpreter
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_in_qkv_propagate_as_in_torch(where, bad, backend, monkeypatch):
    """Documented, not checked: the output has NaN / inf exactly where torch's
    softmax(q k^T scale) v has them, and equals it elsewhere (R = 1, every backend)."""
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, v = _qkv()
    k, v = k[:, :1].contiguous(), v[:, :1].contiguous()
    {"q": q[0, 0, 2], "k": k[0, 0, 1, 2], "v": v[0, 0, 1, 2]}[where][3] = bad
    out = stattn.region_attention(q, k, v)
    expected = torch.softmax(q.double() @ k[:, 0].double().transpose(-1, -2) * D ** -0.5, -1) @ v[:, 0].double()
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    assert out.isnan().any() or out.isinf().any()
    ok = expected.isfinite()
    torch.testing.assert_close(out[ok].double(), expected[ok], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- AttentionRegulation

@pytest.mark.parametrize("kwargs,words", [
    (dict(lr=0.0), "lr: expected a positive finite float, got 0.0"),
    (dict(lr=-100.0), "lr: expected a positive finite float"),
    (dict(prev_weight=-0.25), r"prev_weight: expected a float in \[0, 1\]"),
    (dict(prev_weight=1.5), r"prev_weight: expected a float in \[0, 1\]"),
    (dict(decay=0.0), r"decay: expected a float in \(0, 1\]"),
    (dict(decay=-0.99), r"decay: expected a float in \(0, 1\]"),
    (dict(decay=1.01), r"decay: expected a float in \(0, 1\]"),
])
def test_regulation_rejects_lr_prev_weight_and_decay_out_of_range(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AttentionRegulation("cat", **kwargs)


def test_regulation_accepts_the_edges_of_the_ranges():
    for kwargs in (dict(prev_weight=0.0), dict(prev_weight=1.0), dict(decay=1.0), dict(lr=1e-6),
                   dict(prev_weight=0, decay=1)):
        ctrl = AttentionRegulation("cat", **kwargs)
        for name, value in kwargs.items():
            assert getattr(ctrl, name) == value


# ---------------------------------------------------------------------------- SpatialTemporal

@pytest.fixture(scope="module")
def pipe():
    return models.tiny(0)


def _applied(pipe, prompt=PROMPT, **kwargs):
    st = SpatialTemporal(**kwargs)
    st.apply(pipe, prompt=prompt)
    stattn.restore(pipe)
    return st


LEFT, RIGHT = Box(0.0, 0.25, 0.5, 0.75), Box(0.5, 0.25, 1.0, 0.75)      # [0, 128, 256, 256] on 512 px


@pytest.mark.parametrize("layout", [
    "a frog [256, 128, 256, 256]\na cat [0, 128, 256, 256]",                       # layout text
    Layout(["frog", "a cat"], [RIGHT, LEFT]),                                     # a Layout
    Layout(["a green frog", "cat"], [RIGHT, LEFT]),                               # names containing the object
], ids=["text", "layout", "containing"])
def test_named_layout_regions_go_to_their_objects_by_name(pipe, layout):
    st = _applied(pipe, objects=["cat", "frog"], layout=layout)
    assert [p.text for p in st.phrases] == ["a cat", "a frog"]
    assert st.layout_used.regions == [LEFT, RIGHT]                  # the cat on the left, as named
    in_order = _applied(pipe, objects=["cat", "frog"], layout=[LEFT, RIGHT])
    assert torch.equal(st.layout_used.masks((8, 8)), in_order.layout_used.masks((8, 8)))


def test_repeated_objects_take_their_own_named_regions(pipe):
    prompt = "a black cat next to a white cat"
    st = _applied(pipe, prompt, objects=["cat", "cat"],
                  layout=Layout(["a white cat", "a black cat"], [RIGHT, LEFT]))
    assert [p.text for p in st.phrases] == ["a black cat", "a white cat"]
    assert st.layout_used.regions == [LEFT, RIGHT]


@pytest.mark.parametrize("kwargs,words", [
    (dict(objects=["cat", "frog"], layout="a cat [0, 100, 256, 300]\na dog [256, 100, 256, 300]"),
     r"no region is named for object 'frog' \(the phrase 'a frog'\) among the layout's names \['a dog'\]"),
    (dict(objects=["cat", "frog"], layout=Layout(["cat", "zebra"], [LEFT, RIGHT])),
     r"no region is named for object 'frog'"),
    (dict(layout="a cat [0, 100, 256, 300]\na zebra [256, 100, 256, 300]"),
     r"layout: objects \['a zebra'\] are not in the prompt"),
    (dict(layout={"cat": (0.25, 0.5), "zebra": (0.75, 0.5)}), r"layout: objects \['zebra'\] are not in the prompt"),
    (dict(objects=["cat", "frog"], layout={"cat": (0.25, 0.5), "frog": (0.5, 0.5), "zebra": (0.75, 0.5)}),
     r"layout: regions given for \['zebra'\], which are not among the objects \['cat', 'frog'\]"),
], ids=["text-other-name", "layout-zebra", "auto-text-zebra", "auto-dict-zebra", "dict-extra-zebra"])
def test_a_layout_naming_an_object_not_in_the_prompt_is_rejected(pipe, kwargs, words):
    with pytest.raises(ValueError, match=words):
        SpatialTemporal(**kwargs).apply(pipe, prompt=PROMPT)


def test_auto_objects_from_a_layout_may_qualify_the_prompts_nouns(pipe):
    """Valid edge: the names are the objects and refine the prompt's nouns ("a red cat")."""
    st = _applied(pipe, layout="a red cat [0, 100, 256, 300]\na frog [256, 100, 256, 300]")
    assert st.descriptions == ["a photo of a red cat", "a photo of a frog"]


@pytest.mark.parametrize("weights", [1e30, torch.tensor([1e30, 0.0]), torch.full((2, 3), 5e18)],
                         ids=["float", "per-object", "per-step"])
def test_overflowing_weights_are_rejected_with_the_bound(weights):
    bound = f"{max_weight_sum(torch.float32):g}".replace("+", r"\+")          # 9.22337e+18
    with pytest.raises(ValueError, match=rf"weights: Σ_i \|c_i\| = .* exceeds {bound}, the bound for a float32 model: "
                                         r"the combination magnifies the values by up to 1 \+ 2·Σ_i \|c_i\|"):
        SpatialTemporal(["cat", "frog"], weights=weights)


def test_the_weight_bound_follows_the_models_dtype(pipe):
    # (sqrt(finfo.max) - 1) / 2; the weights are fp32, so fp64 models get fp32's bound
    assert max_weight_sum(torch.float16) == pytest.approx(127.4687, abs=1e-4)
    assert max_weight_sum(torch.float64) == max_weight_sum(torch.float32) == pytest.approx(9.2234e18, rel=1e-4)
    st = SpatialTemporal(weights=64.0)            # 2 objects ("a cat", "a frog"), known at apply: 128 in all
    with pytest.raises(ValueError, match=r"Σ_i \|c_i\| = 128 exceeds 127.469, the bound for a float16 model"):
        st.apply(models.tiny(0, dtype=torch.float16), prompt=PROMPT)
    assert _applied(pipe, weights=64.0).W.max() == 64.0          # fp32: within its bound (valid edge)


@pytest.mark.parametrize("mode", ["same_branch", "uncond_ref"])
def test_the_magnification_bound_holds(mode):
    """|out| <= (1 + 2 sum_i |c_i|) max|v| on the combination (the bound's derivation)."""
    g = torch.Generator().manual_seed(3)
    d = dict(generator=g, dtype=torch.float64)
    q, k, v = torch.randn(2, 2, M, D, **d), torch.randn(2, 1, 2, N, D, **d), torch.randn(2, 1, 2, N, D, **d)
    k_obj, v_obj = torch.randn(1, 2, 2, N, D, **d), torch.randn(1, 2, 2, N, D, **d)
    kc, vc = region_kv(k, v, k_obj, v_obj, 1)
    c = torch.tensor([40.0, -25.0], dtype=torch.float64)
    masks = torch.rand(2, M, **d)
    out = combine(q, k, v, kc, vc, masks, c, mode=mode, cond_start=1)
    vmax = torch.cat([v.flatten(), v_obj.flatten()]).abs().max()
    assert out.abs().max() <= (1 + 2 * c.abs().sum()) * vmax


@pytest.mark.parametrize("prompt,phrases", [
    ("a café next to a piñata", ["a café", "a piñata"]),
    ("a cafe\u0301 next to a pin\u0303ata", ["a cafe\u0301", "a pin\u0303ata"]),      # decomposed accents
    ("a naïve crème brûlée and a 猫", ["a naïve crème brûlée", "a 猫"]),
], ids=["composed", "decomposed", "more"])
def test_auto_objects_are_whole_unicode_words_and_tokenise_as_in_the_prompt(prompt, phrases):
    found = find_objects(prompt)
    assert found == phrases
    tok = models.tokenizer()
    body = tok(prompt).input_ids[1:-1]
    for text in found:                           # each phrase is a contiguous run of the prompt's tokens
        idx = token_indices(tok, prompt, [text])
        assert [body[i - 1] for i in idx] == tok(text, add_special_tokens=False).input_ids
        assert idx == list(range(idx[0], idx[-1] + 1))


def test_unicode_objects_in_spatial_temporal(pipe):
    st = _applied(pipe, "a café next to a piñata")
    assert [p.text for p in st.phrases] == ["a café", "a piñata"]
    with pytest.raises(ValueError, match="objects: 'caf' is not in the prompt"):     # not inside "café"
        SpatialTemporal(["caf"]).apply(pipe, prompt="a café next to a piñata")
    assert [p.text for p in _applied(pipe, "a café next to a piñata", objects=["café"]).phrases] == ["a café"]


# ---------------------------------------------------------------------------- model and CLIP folders

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    models.save(models.tiny(0), root / "m")
    return root / "m"


def _copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("part,cls", [("unet", "UNet2DConditionModel"), ("tokenizer", "CLIPTokenizer"),
                                      ("vae", "AutoencoderKL")])
def test_a_model_folder_missing_a_part_names_it(saved, tmp_path, part, cls):
    path = _copy(saved, tmp_path)
    shutil.rmtree(path / part)
    with pytest.raises(ValueError, match=rf"model directory {path} lacks {part}/ \({cls}\), listed in its "
                                         r"model_index.json"):
        models.load(path)
    with pytest.raises(ValueError, match=rf"lacks {part}/"):
        models.resolve(str(path))


def test_an_unreadable_model_index_names_the_file(saved, tmp_path, monkeypatch):
    path = _copy(saved, tmp_path)
    index = path / "model_index.json"
    index.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match=rf"{index} is not a valid model_index.json \('utf-8' codec"):
        models.load(path)
    index.write_text(json.dumps(["StableDiffusionPipeline"]))
    with pytest.raises(ValueError, match=rf"{index} is not a valid model_index.json \(a JSON list, not an object\)"):
        models.load(path)
    index.write_text("{}")
    with pytest.raises(ValueError, match=rf'{index} names no pipeline class \(no "_class_name"\)'):
        models.load(path)

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(models, "_read_json", denied)
    with pytest.raises(ValueError, match=rf"{index} cannot be read \(Permission denied\)"):
        models.load(path)


def test_a_complete_model_folder_still_loads(saved, tmp_path):
    path = _copy(saved, tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]               # an absent part needs no folder
    assert type(models.load(path)) is type(models.tiny(0))


@pytest.mark.parametrize("form", [str, os.fsencode, lambda p: p])
def test_a_missing_clip_folder_says_it_does_not_exist(pipe, tmp_path, form):
    st = SpatialTemporal(["cat", "frog"])
    st.apply(pipe, prompt=PROMPT)
    try:
        with pytest.raises(ValueError, match=r"clip: the CLIP model directory '.*noclip' does not exist; expected a "
                                             r"local transformers CLIPModel directory"):
            st.optimize(pipe, PROMPT, clip=form(tmp_path / "noclip"), steps=1, passes=2)
        (tmp_path / "file").write_text("x")
        with pytest.raises(ValueError, match="clip: '.*file' is not a directory"):
            st.optimize(pipe, PROMPT, clip=form(tmp_path / "file"), steps=1, passes=2)
    finally:
        stattn.restore(pipe)
