"""Spatial-temporal attention control (arXiv 2304.03869) as a :class:`stattn.Controller`.

Every object i of the prompt gets a region m_i (a :class:`stattn.layout.Layout`: centres, boxes,
masks, LLM-style text, or the rule-based predictor) and a local description "a photo of <phrase>",
encoded separately by the pipeline's own text encoder(s) into its own context E_i. In every
cross-attention layer the conditional rows compute, per pixel p (spec/spatial-temporal.md),

    same_branch (paper, first release):  out_c = O_D + Σ_i c_i[t]·m_i(p)·(O_i − O_D)
    uncond_ref  (current release):       out_c = O_D + Σ_i c_i[t]·m_i(p)·(O_i − O_u(p))

with O_D the full prompt's attention, O_i the object's own (its own softmax over its own 77 keys)
and O_u the unconditional row's output; the unconditional rows stay plain. The conditional rows are
one :func:`stattn.region_attention` call (region 0 = the prompt, regions 1..n = the objects,
α_i = c_i[t]·m_i, ``affine=True`` for same_branch); uncond_ref adds −(Σ_i α_i)·O_u from the plain
uncond output already computed, without another attention pass.

What is computed once: the local descriptions per prompt (at :meth:`SpatialTemporal.apply`), their
K/V per layer (and the concatenated region K/V per layer and batch), the masks per grid. Per step
the weights c[t] are read on the device from a [objects × steps] tensor indexed by
``call.step_tensor`` — no host sync, so it runs under ``stattn.Runner(cuda_graphs=True)`` — and any
scheduler and batch size work (the released code: PLMS and one image).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .control import Controller, CrossAttentionCall, project_kv
from .layout import (Layout, LayoutPredictor, Phrase, RuleLayoutPredictor, _locate, as_region, expand_to_phrase,
                     parse_layout_text)
from .ops import region_attention
from .processors import accelerate, restore, unet_of

__all__ = ["SpatialTemporal", "combine", "region_kv", "MODES", "TEMPLATE"]

MODES = ("same_branch", "uncond_ref")
TEMPLATE = "a photo of {}"          # the released local description
DEFAULT_TOTAL_WEIGHT = 5.0          # released initial weight: 5 / n_objects
MAX_EVALUATIONS = 4096              # UNet evaluations per run that per-step weights can address


def combine(q: Tensor, k: Tensor, v: Tensor, k_regions: Tensor, v_regions: Tensor, masks: Tensor, c: Tensor, *,
            mode: str = "same_branch", cond_start: int, scale: Optional[float] = None) -> Tensor:
    """One cross-attention layer of spatial-temporal control.

    q [B, H, M, D], rows [uncond (``cond_start`` rows); cond]; k, v [B, 1, H, N, D] the prompt's;
    k_regions, v_regions [B - cond_start, 1 + n, H, N, D]: the cond rows' prompt K/V followed by
    the n objects' (:func:`region_kv`); masks float [n, M]; c [n] this step's weights.
    Returns [B, H, M, D]: plain attention on the uncond rows, the combination on the cond rows."""
    c0 = cond_start
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "uncond_ref" and c0 == 0:
        raise ValueError("mode: 'uncond_ref' uses the unconditional row's output, so it needs classifier-free "
                         "guidance (a batch [uncond; cond]); use mode='same_branch' without guidance")
    ones = torch.ones(1, device=q.device, dtype=c.dtype)
    region_masks = torch.cat([ones.expand(1, masks.shape[1]).to(masks.dtype), masks])
    weights = torch.cat([ones, c])
    out_c = region_attention(q[c0:], k_regions, v_regions, masks=region_masks, region_weights=weights,
                             affine=(mode == "same_branch"), scale=scale)
    if c0 == 0:
        return out_c
    out_u = region_attention(q[:c0], k[:c0], v[:c0], scale=scale)
    if mode == "uncond_ref":   # the cross-row term −(Σ_i α_i)·O_u, computed in fp32
        alpha_sum = (c[:, None].to(masks.dtype) * masks).sum(0)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        out_c = (out_c.to(ct) - alpha_sum.to(ct)[None, None, :, None] * out_u.to(ct)).to(q.dtype)
    return torch.cat([out_u, out_c])


def region_kv(k: Tensor, v: Tensor, k_obj: Tensor, v_obj: Tensor, cond_start: int) -> tuple[Tensor, Tensor]:
    """The cond rows' region K/V [Bc, 1 + n, H, N, D]: the prompt's (k, v [B, 1, H, N, D]) then the
    objects' (k_obj, v_obj [1 or Bc, n, H, N, D])."""
    Bc = k.shape[0] - cond_start
    shape = (Bc,) + tuple(k_obj.shape[1:])
    return (torch.cat([k[cond_start:], k_obj.expand(shape)], 1), torch.cat([v[cond_start:], v_obj.expand(shape)], 1))


class SpatialTemporal(Controller):
    """Spatial-temporal attention control.

    objects   ``"auto"`` (the object phrases the layout predictor finds, or the names of a given
              layout) or a list of words / phrases of the prompt (a word is widened to the phrase
              containing it: "cat" -> "a black cat"; repeated words take successive occurrences).
    layout    None / ``"auto"`` (the predictor), a :class:`~stattn.layout.LayoutPredictor`, a
              :class:`~stattn.layout.Layout`, LLM-style text ("name [x, y, w, h]" lines on a 512
              canvas), a list of regions in object order — centres (x, y), boxes (x0, y0, x1, y1)
              in [0, 1], mask tensors [H, W] — or a dict object -> region.
    mode      ``"same_branch"`` (paper) or ``"uncond_ref"`` (the current release's cross-row term).
    weights   None (5 / n, as released), a float, a tensor [n] (per object) or [n, steps] (per
              object and step: one column per denoising step, evaluations at the same timestep
              sharing one, or one per UNet evaluation).
    cfg       True (default): the batch is [uncond; cond] (classifier-free guidance); False when
              generating with guidance_scale <= 1 (same_branch only).
    predictor the :class:`~stattn.layout.LayoutPredictor` used for ``layout="auto"`` (default
              :class:`~stattn.layout.RuleLayoutPredictor`).
    template  the local description ("a photo of {}").

    After :meth:`apply`: ``phrases`` (the object phrases), ``descriptions``, ``layout_used``.
    """

    def __init__(self, objects: Union[str, Sequence[str]] = "auto", layout=None, *, mode: str = "same_branch",
                 weights: Union[None, float, Tensor] = None, cfg: bool = True,
                 predictor: Optional[LayoutPredictor] = None, template: str = TEMPLATE):
        if isinstance(objects, str) and objects != "auto":
            objects = [objects]
        if objects != "auto":
            if not isinstance(objects, (list, tuple)) or not objects or \
                    not all(isinstance(o, str) and o.strip() for o in objects):
                raise ValueError(f"objects: expected 'auto' or a non-empty list of words/phrases of the prompt, "
                                 f"got {objects!r}")
            objects = list(objects)
        self.objects = objects
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        if not isinstance(cfg, bool):
            raise TypeError(f"cfg: expected a bool, got {cfg!r}")
        if mode == "uncond_ref" and not cfg:
            raise ValueError("mode: 'uncond_ref' needs classifier-free guidance (cfg=True)")
        self.cfg = cfg
        if predictor is not None and not isinstance(predictor, LayoutPredictor):
            raise TypeError(f"predictor: expected a stattn.layout.LayoutPredictor, got {type(predictor).__name__}")
        if isinstance(layout, LayoutPredictor):
            predictor, layout = layout, None
        self.predictor = predictor if predictor is not None else RuleLayoutPredictor()
        self.layout = self._check_layout(layout)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template: expected a string with one '{{}}' for the phrase, got {template!r}")
        self.template = template
        self.weights = _check_weights(weights, len(objects) if objects != "auto" else None)
        # resolved by apply()
        self.phrases: Optional[list] = None
        self.descriptions: Optional[list] = None
        self.layout_used: Optional[Layout] = None
        self.W: Optional[Tensor] = None       # [n, S] float32 on the UNet's device
        self._cols: Optional[Tensor] = None   # int64 [MAX_EVALUATIONS]: UNet evaluation -> column of W
        self._context: Optional[Tensor] = None  # [n, N, C] the local descriptions' encoder states
        self._owner = None
        self._kv: dict = {}

    # ------------------------------------------------------------------ apply / remove
    def apply(self, pipe_or_runner, prompt: str):
        """Resolve objects and layout for ``prompt``, encode the local descriptions with the
        pipeline's text encoder(s), and install the fused cross-attention processors with this
        controller (:func:`stattn.accelerate`). Returns what it was given."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected one prompt string (the layout is made for it), got "
                            f"{type(prompt).__name__}; generate several images with num_images")
        unet = unet_of(pipe_or_runner)
        pipe = getattr(pipe_or_runner, "pipe", pipe_or_runner)
        if not hasattr(pipe, "encode_prompt"):
            raise TypeError(f"pipe_or_runner: expected a diffusers SD / SDXL pipeline or stattn.Runner (the local "
                            f"descriptions are encoded with its text encoder), got {type(pipe_or_runner).__name__}")
        phrases, layout = self._resolve(prompt)
        n = len(phrases)
        weights = _check_weights(self.weights, n)
        device = unet.device
        self.phrases, self.layout_used = phrases, layout
        self.descriptions = [self.template.format(p.text) for p in phrases]
        self._context = _encode(pipe, self.descriptions, device)
        W = weights if isinstance(weights, Tensor) else torch.full((n,), float(weights))
        W = W.detach().to(device=device, dtype=torch.float32)
        self.W = (W[:, None] if W.dim() == 1 else W).contiguous()
        # evaluation index -> column of W, refilled in place per run (see _map_columns)
        self._cols = torch.arange(MAX_EVALUATIONS, dtype=torch.int64, device=device)
        self._owner = pipe_or_runner
        self._kv = {}
        accelerate(pipe_or_runner, controller=self)
        return pipe_or_runner

    def remove(self, pipe_or_runner):
        """Put the original attention processors back (:func:`stattn.restore`)."""
        self._kv = {}
        return restore(pipe_or_runner)

    def _resolve(self, prompt: str) -> tuple[list, Layout]:
        """(object phrases, layout) for the prompt; user objects must be in the prompt."""
        layout = self.layout
        named = None
        if isinstance(layout, str) and layout != "auto":
            named = parse_layout_text(layout)
        elif isinstance(layout, Layout):
            named = layout
        elif isinstance(layout, dict):
            if self.objects == "auto":
                named = Layout(list(layout), list(layout.values()))
            else:
                missing = [o for o in self.objects if o not in layout]
                if missing:
                    raise ValueError(f"layout: no region given for objects {missing} (keys: {list(layout)})")
                named = Layout(self.objects, [layout[o] for o in self.objects])
        if self.objects == "auto":
            if named is not None:
                return [Phrase(name, -1, -1) for name in named.names], named
            phrases = self.predictor.objects(prompt)
            if not phrases:
                raise ValueError(f"objects: no object phrase found in the prompt {prompt!r}; pass objects=[...]")
        else:
            phrases = [expand_to_phrase(prompt, p) for p in _locate(prompt, self.objects)]
        if named is not None:
            regions = named.regions
        elif isinstance(layout, list):
            regions = layout
        else:
            return phrases, self.predictor.predict(prompt, phrases)
        if len(regions) != len(phrases):
            raise ValueError(f"layout: {len(regions)} regions for {len(phrases)} objects "
                             f"{[p.text for p in phrases]}; give one region per object")
        return phrases, Layout([p.text for p in phrases], regions)

    @staticmethod
    def _check_layout(layout):
        """Validate regions early (a box outside [0, 1] or an empty mask fails here)."""
        if layout is None or layout == "auto":
            return None
        if isinstance(layout, (Layout, str)):
            return parse_layout_text(layout) if isinstance(layout, str) else layout
        if isinstance(layout, dict):
            return {k: as_region(v, f"layout[{k!r}]") for k, v in layout.items()}
        if isinstance(layout, (list, tuple)) and layout:
            return [as_region(r, f"layout[{i}]") for i, r in enumerate(layout)]
        raise TypeError(f"layout: expected None, 'auto', a LayoutPredictor, a Layout, layout text, a list of "
                        f"regions or a dict object -> region, got {type(layout).__name__}")

    # ------------------------------------------------------------------ Controller interface
    def begin_step(self, step: int, timestep) -> None:
        if step == 0 and self.W is not None and self.W.shape[1] > 1:
            self._map_columns()

    def _map_columns(self) -> None:
        """Fill the evaluation -> column table for this run (in place: a captured graph keeps reading
        it). W may have one column per UNet evaluation (len(scheduler.timesteps)) or one per
        denoising step (scheduler.num_inference_steps); in the second case evaluations at the same
        timestep share a column (PNDM's repeated warm-up timestep, Heun's two evaluations)."""
        S = self.W.shape[1]
        scheduler = getattr(self._owner, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return                      # no schedule known: column = evaluation index
        E = len(timesteps)
        if E > self._cols.numel():
            raise ValueError(f"weights: this run has {E} UNet evaluations, more than the {self._cols.numel()} "
                             "per-step weights supported")
        if E == S:
            self._cols[:E].copy_(torch.arange(E, device=self._cols.device))
        elif S == getattr(scheduler, "num_inference_steps", None):
            t = torch.as_tensor(timesteps).to(self._cols.device)
            new = torch.ones(E, dtype=torch.int64, device=t.device)
            new[1:] = (t[1:] != t[:-1]).to(torch.int64)
            self._cols[:E].copy_(new.cumsum(0) - 1)          # on the device: no host read
        else:
            raise ValueError(f"weights: per-step weights for {S} steps, but this run has "
                             f"{getattr(scheduler, 'num_inference_steps', '?')} denoising steps ({E} UNet "
                             "evaluations); give W one column per step or per evaluation")

    def attention(self, call: CrossAttentionCall) -> Optional[Tensor]:
        if self._context is None:
            raise ValueError("SpatialTemporal: not applied; install it with ctrl.apply(pipe_or_runner, prompt=...)")
        if call.grid is None:
            raise ValueError(f"layer {call.name}: the controller needs the feature-map grid (h, w) of "
                             f"M = {call.q.shape[2]} pixels, which the step tracker could not determine")
        c0 = self._cond_start(call)
        kc, vc = self._region_kv(call, c0)
        return combine(call.q, call.k, call.v, kc, vc, self._grid_masks(call), self.step_weights(call),
                       mode=self.mode, cond_start=c0, scale=call.scale)

    def step_weights(self, call: CrossAttentionCall) -> Tensor:
        """c[t] [n]: this step's column of W, picked on the device (no host sync)."""
        W = self.W
        if W.shape[1] == 1:
            return W[:, 0]
        step = call.step_tensor
        if step is None:
            step = torch.full((), call.step, dtype=torch.int64, device=W.device)
        col = self._cols.index_select(0, step.clamp(0, self._cols.numel() - 1).view(1))
        return W.index_select(1, col.clamp(0, W.shape[1] - 1))[:, 0]

    # ------------------------------------------------------------------ cached pieces
    def _cond_start(self, call: CrossAttentionCall) -> int:
        B = call.q.shape[0]
        if not self.cfg:
            return 0
        if B % 2:
            raise ValueError(f"cfg: with classifier-free guidance the batch is [uncond; cond], an even number of "
                             f"rows, but layer {call.name} got {B}; pass cfg=False when generating without "
                             "guidance (guidance_scale <= 1)")
        return B // 2

    def _region_kv(self, call: CrossAttentionCall, c0: int) -> tuple[Tensor, Tensor]:
        """[Bc, 1 + n, H, N, D] K and V: the prompt's cond rows, then the objects'. The objects'
        K/V are projected once per layer; the concatenation is kept while the prompt's K/V (the
        processor's cache) stay the same tensors."""
        entry = self._kv.get(call.name)
        attn = call.attn
        version = attn.to_k.weight._version, attn.to_v.weight._version
        if entry is None or entry["version"] != version:
            with torch.no_grad():  # text and UNet are constant: no gradient to the objects' K/V
                k, v = project_kv(attn, self._context.to(call.context.dtype))     # [n, 1, H, N, D]
            if k.shape[3] != call.k.shape[3]:
                raise ValueError(f"layer {call.name}: the local descriptions have {k.shape[3]} tokens but the "
                                 f"prompt has {call.k.shape[3]}; every region needs the same number of keys")
            entry = self._kv[call.name] = {"version": version, "k": k[:, 0][None], "v": v[:, 0][None]}
        if entry.get("k_src") is not call.k or entry.get("v_src") is not call.v or entry.get("c0") != c0:
            entry["kc"], entry["vc"] = region_kv(call.k, call.v, entry["k"], entry["v"], c0)
            entry["k_src"], entry["v_src"], entry["c0"] = call.k, call.v, c0
        return entry["kc"], entry["vc"]

    def _grid_masks(self, call: CrossAttentionCall) -> Tensor:
        return self.layout_used.masks(call.grid, call.q.device)     # built once per grid, cached

    def __repr__(self) -> str:
        objs = [p.text for p in self.phrases] if self.phrases is not None else self.objects
        return f"SpatialTemporal(objects={objs!r}, mode={self.mode!r}, weights={self.weights!r})"


# ---------------------------------------------------------------------- helpers
def _check_weights(weights, n: Optional[int]):
    """None -> 5/n; a finite float; or a float tensor [n] / [n, steps] (n checked once known)."""
    if weights is None:
        return None if n is None else DEFAULT_TOTAL_WEIGHT / n
    if isinstance(weights, Tensor):
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights: expected a float tensor [objects, steps], got {weights.dtype}")
        if weights.dim() not in (1, 2) or weights.numel() == 0 or (n is not None and weights.shape[0] != n):
            want = f"[objects={n}] or [objects={n}, steps]" if n is not None else "[objects] or [objects, steps]"
            raise ValueError(f"weights: expected a float, or a tensor {want}, got shape {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights: contains NaN or inf")
        return weights
    if isinstance(weights, bool) or not isinstance(weights, (int, float)) or not math.isfinite(weights):
        raise TypeError(f"weights: expected None, a finite float or a tensor [objects, steps], got {weights!r}")
    return float(weights)


def _encode(pipe, texts: list, device) -> Tensor:
    """Encoder hidden states [n, N, C] of each text alone, as the pipeline conditions its UNet
    (SDXL: both encoders concatenated)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    return out[0].detach()
