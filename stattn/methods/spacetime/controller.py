"""Spatial-temporal attention control (arXiv 2304.03869) as a :class:`stattn.Controller`.

Every object i of the prompt gets a region m_i (a :class:`stattn.methods.spacetime.layout.Layout`: centres, boxes,
masks, LLM-style text, or the rule-based predictor) and a local description "a photo of <phrase>",
encoded separately by the pipeline's own text encoder(s) into its own context E_i. In every
cross-attention layer the conditional rows compute, per pixel p (as the released code does),

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
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import reference as ref
from ..._validate import value_checks
from ...integration.control import Controller, CrossAttentionCall, Generation, PromptEmbedsCheck, cond_start, project_kv
from .layout import (Layout, LayoutPredictor, Phrase, RuleLayoutPredictor, _locate, as_region, check_layout_names,
                     expand_to_phrase, match_layout_names, parse_layout_text, region_from_json, region_to_json)
from ...ops import region_attention
from ...integration.processors import accelerate, restore, unet_of

__all__ = ["SpatialTemporal", "combine", "region_kv", "ClipLoss", "OptimizationResult", "clip_resize",
           "sample_images", "max_weight_sum", "MODES", "TEMPLATE"]

MODES = ("same_branch", "uncond_ref")
TEMPLATE = "a photo of {}"          # the released local description
DEFAULT_TOTAL_WEIGHT = 5.0          # released initial weight: 5 / n_objects
MAX_EVALUATIONS = 4096              # UNet evaluations per run that per-step weights can address


def combine(q: Tensor, k: Tensor, v: Tensor, k_regions: Tensor, v_regions: Tensor, masks: Tensor, c: Tensor, *,
            mode: str = "same_branch", cond_start: int, scale: Optional[float] = None, offset=None) -> Tensor:
    """One cross-attention layer of spatial-temporal control.

    q [B, H, M, D], rows [uncond (``cond_start`` rows); cond]; k, v [B, 1, H, N, D] the prompt's;
    k_regions, v_regions [B - cond_start, 1 + n, H, N, D]: the cond rows' prompt K/V followed by
    the n objects' (:func:`region_kv`); masks float [n, M]; c [n] this step's weights; offset: a
    :class:`stattn.ScoreOffset` over the cond rows acting on the prompt region (region 0; a composed
    method's, :func:`stattn.compose`), None for none.
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
                             affine=(mode == "same_branch"), scale=scale, offset=offset)
    if c0 == 0:
        return out_c
    out_u = region_attention(q[:c0], k[:c0], v[:c0], scale=scale)
    if mode == "uncond_ref":   # the cross-row term −(Σ_i α_i)·O_u, computed in fp32
        alpha_sum = (c[:, None].to(masks.dtype) * masks).sum(0)
        ct = ref.compute_dtype(q)
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
    layout    None / ``"auto"`` (the predictor), a :class:`~stattn.methods.spacetime.layout.LayoutPredictor`, a
              :class:`~stattn.methods.spacetime.layout.Layout`, LLM-style text ("name [x, y, w, h]" lines on a 512
              canvas), a list of regions in object order — centres (x, y), boxes (x0, y0, x1, y1)
              in [0, 1], mask tensors [H, W] — or a dict object -> region. A named layout's regions
              go to the objects by name, in any order ("a cat [...]" to object "cat"); its names
              must name objects of the prompt.
    mode      ``"same_branch"`` (paper) or ``"uncond_ref"`` (the current release's cross-row term).
    weights   None (5 / n, as released), a float, a tensor [n] (per object) or [n, steps] (per
              object and step: one column per denoising step, evaluations at the same timestep
              sharing one, or one per UNet evaluation). Σ_i |c_i| of every step is bounded by
              :func:`max_weight_sum` of the model's dtype (fp16 ≈ 127.5, fp32 / bf16 ≈ 9.2e18).
    cfg       None (default): classifier-free guidance as the pipeline / Runner call runs it (on a
              bare UNet: True, the batch [uncond; cond]); a bool is for bare UNets and must agree
              with a pipeline's guidance. uncond_ref needs guidance.
    predictor the :class:`~stattn.methods.spacetime.layout.LayoutPredictor` used for ``layout="auto"`` (default
              :class:`~stattn.methods.spacetime.layout.RuleLayoutPredictor`).
    template  the local description ("a photo of {}").

    After :meth:`apply`: ``phrases`` (the object phrases), ``descriptions``, ``layout_used``.
    """

    def __init__(self, objects: Union[str, Sequence[str]] = "auto", layout=None, *, mode: str = "same_branch",
                 weights: Union[None, float, Tensor] = None, cfg: Optional[bool] = None,
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
        if cfg is not None and not isinstance(cfg, bool):
            raise TypeError(f"cfg: expected None or a bool, got {cfg!r}")
        if mode == "uncond_ref" and cfg is False:
            raise ValueError("mode: 'uncond_ref' needs classifier-free guidance (cfg=True)")
        self.cfg = cfg
        if predictor is not None and not isinstance(predictor, LayoutPredictor):
            raise TypeError(f"predictor: expected a stattn.methods.spacetime.layout.LayoutPredictor, got {type(predictor).__name__}")
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
        self._pipe = None
        self._dtype = torch.float32          # the UNet's, known at apply()
        self._prompt: Optional[str] = None
        self._optimized_for: Optional[str] = None   # the prompt W was optimised for
        self._embeds_check = PromptEmbedsCheck(None, None)
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
        self._owner, self._pipe = pipe_or_runner, pipe
        self._optimized_for = None
        self._dtype = unet.dtype
        self._setup(prompt, unet.device)
        accelerate(pipe_or_runner, controller=self)
        return pipe_or_runner

    def _setup(self, prompt: str, device) -> None:
        """Objects, layout, local descriptions (encoded) and weights for ``prompt``."""
        phrases, layout = self._resolve(prompt)
        n = len(phrases)
        weights = _check_weights(self.weights, n, self._dtype)
        self.phrases, self.layout_used = phrases, layout
        self.descriptions = [self.template.format(p.text) for p in phrases]
        self._context = _encode(self._pipe, self.descriptions, device)
        W = weights if isinstance(weights, Tensor) else torch.full((n,), float(weights))
        W = W.detach().to(device=device, dtype=torch.float32)
        self.W = (W[:, None] if W.dim() == 1 else W).contiguous()
        # evaluation index -> column of W, refilled in place per run (see _map_columns)
        self._cols = torch.arange(MAX_EVALUATIONS, dtype=torch.int64, device=device)
        self._prompt = prompt
        self._embeds_check = PromptEmbedsCheck(self._pipe, prompt)
        self._kv = {}

    def begin_generation(self, generation) -> None:
        """The call's own prompt: objects, layout and descriptions are re-resolved when it is not
        the one applied for (one prompt per call: a list of different prompts has no shared layout)."""
        if generation.prompts is not None:
            distinct = list(dict.fromkeys(generation.prompts))
            if len(distinct) > 1:
                raise ValueError(f"prompt: SpatialTemporal lays out one prompt per call, got {len(distinct)} different "
                                 f"prompts {distinct}; generate them in separate calls (num_images_per_prompt for "
                                 "several images of one prompt)")
            prompt = distinct[0]
            if prompt != self._prompt:
                if self._optimized_for is not None:
                    raise ValueError(f"prompt: the weights W were optimised for {self._optimized_for!r}, not for "
                                     f"{prompt!r}; optimize() this prompt, or apply(pipe, prompt=...) it afresh")
                self._setup(prompt, self.W.device)
        elif generation.prompt_embeds is not None:
            self._embeds_check(generation.prompt_embeds, "the objects and layout")
        if self.W is not None and self.W.shape[1] > 1:
            self._map_columns(generation)

    def remove(self, pipe_or_runner):
        """Put the original attention processors back (:func:`stattn.restore`)."""
        self._kv = {}
        return restore(pipe_or_runner)

    def _resolve(self, prompt: str) -> tuple[list, Layout]:
        """(object phrases, layout) for the prompt. User objects must be in the prompt; a named
        layout (a Layout, layout text, a dict) gives each object the region named after it, in
        whatever order the names come (:func:`~stattn.methods.spacetime.layout.match_layout_names`); a list of
        regions goes in object order. With objects="auto" a named layout's names are the objects
        and must name objects of the prompt."""
        layout = self.layout
        named, by_key = None, False
        if isinstance(layout, Layout):                # given as a Layout or as layout text
            named = layout
        elif isinstance(layout, dict):
            if self.objects == "auto":
                named = Layout(list(layout), list(layout.values()))
            else:
                missing = [o for o in self.objects if o not in layout]
                if missing:
                    raise ValueError(f"layout: no region given for objects {missing} (keys: {list(layout)})")
                extra = [k for k in layout if k not in self.objects]
                if extra:
                    raise ValueError(f"layout: regions given for {extra}, which are not among the objects "
                                     f"{self.objects}; give one region per object")
                named, by_key = Layout(self.objects, [layout[o] for o in self.objects]), True
        if self.objects == "auto":
            if named is not None:
                check_layout_names(prompt, named.names)
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
        if named is not None and not by_key:
            order = match_layout_names(named.names, self.objects, [p.text for p in phrases])
            regions = [regions[j] for j in order]
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
    def _map_columns(self, generation) -> None:
        """Fill the evaluation -> column table for this run (in place: a captured graph keeps reading
        it). W may have one column per UNet evaluation (the loop's turns) or one per denoising step
        (scheduler.num_inference_steps); in the second case evaluations at the same timestep share a
        column (PNDM's repeated warm-up timestep, Heun's two evaluations)."""
        S = self.W.shape[1]
        scheduler = getattr(self._pipe, "scheduler", None)
        timesteps = generation.timesteps
        E = generation.steps if generation.steps is not None else (None if timesteps is None else len(timesteps))
        if E is None:
            return                      # no schedule known: column = evaluation index
        if E > self._cols.numel():
            raise ValueError(f"weights: this run has {E} UNet evaluations, more than the {self._cols.numel()} "
                             "per-step weights supported")
        steps = getattr(scheduler, "num_inference_steps", None)
        if E == S:
            self._cols[:E].copy_(torch.arange(E, device=self._cols.device))
        elif S == steps and timesteps is not None and len(timesteps) == E:
            t = torch.as_tensor(timesteps).to(self._cols.device)
            new = torch.ones(E, dtype=torch.int64, device=t.device)
            new[1:] = (t[1:] != t[:-1]).to(torch.int64)
            self._cols[:E].copy_(new.cumsum(0) - 1)          # on the device: no host read
        else:
            raise ValueError(f"weights: per-step weights for {S} steps, but this run has {steps} denoising steps "
                             f"({E} UNet evaluations); give W one column per step or per evaluation")

    def attention(self, call: CrossAttentionCall, offset=None) -> Optional[Tensor]:
        """The combination of this layer call; ``offset`` (a :class:`stattn.ScoreOffset` over the
        conditional rows, on the prompt region) is a composed method's (:func:`stattn.compose`)."""
        if self._context is None:
            raise ValueError("SpatialTemporal: not applied; install it with ctrl.apply(pipe_or_runner, prompt=...)")
        if call.grid is None:
            raise ValueError(f"layer {call.name}: the controller needs the feature-map grid (h, w) of "
                             f"M = {call.q.shape[2]} pixels, which the step tracker could not determine")
        c0 = self._cond_start(call)
        kc, vc = self._region_kv(call, c0)
        # the masks and W are ours, checked finite when made (the layout's masks, _check_weights, each
        # optimisation step): reading them back for NaNs at every call would sync the host per layer on CUDA
        with value_checks(False):
            return combine(call.q, call.k, call.v, kc, vc, self._grid_masks(call), self.step_weights(call),
                           mode=self.mode, cond_start=c0, scale=call.scale, offset=offset)

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
        return cond_start(call, self.cfg)

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

    # ------------------------------------------------------------------ optimising W
    def optimize(self, pipe_or_runner, prompt: str, *, clip, steps: int = 50, passes: int = 3, lr: float = 0.005,
                 local_weight: float = 5.0, clip_normalize: bool = False, grad_steps: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[Tensor] = None, guidance_scale: float = 7.5, height: Optional[int] = None,
                 width: Optional[int] = None, num_images: int = 1, checkpoint: bool = True) -> OptimizationResult:
        """Optimise the temporal weights W [objects × steps] with Adam on the released CLIP loss.

        ``passes`` counts generations as the release does (3: the saved image comes from the pass
        after 2 updates): ``passes − 1`` differentiable passes, each a full sampling from the same
        x_T with autograd, VAE decode, loss, backward and one Adam step; the final image is then
        generated normally from the same seed / ``result.latents`` (no wasted backward). Gradients
        reach only W (UNet, VAE, text encoders and CLIP frozen; dQ and dW from the fused backward,
        no dK/dV); UNet evaluations and the decoder are checkpointed. ``grad_steps=k`` keeps
        autograd for the last k steps only (cheaper; earlier columns of W are then not updated).
        ``clip``: a (transformers CLIPModel, tokenizer) pair or a local model directory."""
        if self._context is None or self._prompt != prompt:
            raise ValueError("prompt: apply(x, prompt=...) this prompt before optimising its weights")
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
            raise ValueError(f"passes: expected an int >= 2 (generations, the last one not differentiated), got {passes!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        if grad_steps is not None and (isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or grad_steps < 1):
            raise ValueError(f"grad_steps: expected None or a positive int, got {grad_steps!r}")
        runner = _runner_of(pipe_or_runner)
        height = height or runner.default_size()
        width = width or runner.default_size()
        model, tokenizer = _load_clip(clip)
        loss_fn = ClipLoss(model, tokenizer, prompt, [p.name for p in self.phrases],
                           self.layout_used.crops(height, width), local_weight=local_weight, normalize=clip_normalize)
        device, dtype = runner.device, runner.unet.dtype
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            if generator is None and seed is not None:
                generator = torch.Generator(device).manual_seed(int(seed))
            shape = (num_images, runner.unet.config.in_channels, height // runner.pipe.vae_scale_factor,
                     width // runner.pipe.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if self.W.shape[1] == 1:                    # constant weights become one column per step
            self.W = self.W.repeat(1, steps).contiguous()
        W = self.W.requires_grad_(True)
        frozen = _freeze([runner.unet, runner.pipe.vae, getattr(runner.pipe, "text_encoder", None),
                          getattr(runner.pipe, "text_encoder_2", None), model])
        opt = torch.optim.Adam([W], lr=lr)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        losses, history, times = [], [], []
        try:
            for _ in range(passes - 1):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                images = sample_images(runner, prompt, latents, steps=steps, guidance_scale=guidance_scale,
                                       height=height, width=width, num_images=num_images, grad_steps=grad_steps,
                                       checkpoint=checkpoint)
                loss = loss_fn(images.float() if images.dtype == torch.float16 else images)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                history.append(W.detach().cpu().clone())
                if not bool(torch.isfinite(history[-1]).all()):     # the host copy: no extra sync
                    raise ValueError(f"optimize: Adam's step made the weights W NaN or inf (loss {losses[-1]}); "
                                     f"try a smaller lr (got {lr})")
                if cuda:
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            W.requires_grad_(False)
            W.grad = None
            _unfreeze(frozen)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        # W has new values (and maybe a new shape): re-install so CUDA graphs captured before are dropped
        self._optimized_for = prompt
        accelerate(pipe_or_runner, controller=self)
        return OptimizationResult(losses, history, times, peak, latents)

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        """Everything that determines the edit, JSON-able. ``kwargs`` rebuild the controller with
        :meth:`from_settings` (the weights as optimised, when apply() / optimize() ran: the same
        prompt then gives the same regions, descriptions and W); ``resolved`` is what apply()
        resolved for its prompt (objects, descriptions, the layout used)."""
        rule = type(self.predictor) is RuleLayoutPredictor
        if not rule and self.layout is None:
            raise TypeError(f"settings: a {type(self.predictor).__name__} layout predictor has no JSON form; "
                            "give its layout explicitly")
        W = self.W if self.W is not None else self.weights
        kwargs = {"objects": self.objects, "layout": _layout_to_json(self.layout), "mode": self.mode,
                  "weights": W.tolist() if isinstance(W, Tensor) else W, "cfg": self.cfg, "template": self.template,
                  "predictor": {"margin": self.predictor.margin, "shape": self.predictor.shape} if rule else None}
        resolved = None
        if self.phrases is not None:
            resolved = {"prompt": self._prompt, "objects": [p.text for p in self.phrases],
                        "descriptions": list(self.descriptions), "layout": self.layout_used.to_json(),
                        "optimized_for": self._optimized_for}
        return {"method": "spacetime", "kwargs": kwargs, "resolved": resolved}

    @classmethod
    def from_settings(cls, settings: dict) -> "SpatialTemporal":
        """The controller :meth:`settings` describes (apply it to the same prompt)."""
        kw = dict(settings["kwargs"])
        kw["layout"] = _layout_from_json(kw["layout"])
        kw["predictor"] = RuleLayoutPredictor(**kw["predictor"]) if kw["predictor"] is not None else None
        if isinstance(kw["weights"], list):
            kw["weights"] = torch.tensor(kw["weights"], dtype=torch.float32)
        return cls(**kw)

    def __repr__(self) -> str:
        objs = [p.text for p in self.phrases] if self.phrases is not None else self.objects
        return f"SpatialTemporal(objects={objs!r}, mode={self.mode!r}, weights={self.weights!r})"


# ---------------------------------------------------------------------- helpers
def max_weight_sum(dtype: torch.dtype = torch.float32) -> float:
    """The largest Σ_i |c_i[t]| (one step's weights) accepted for a model computing in ``dtype``.

    The combination is out = Σ_r α_r·O_r with O_r = softmax(z_r)·v_r a convex combination of
    v's rows (|O_r| ≤ max|v|) and α_i = c_i·m_i, m_i in [0, 1]; region 0 gets 1 − Σ_i α_i
    (same_branch), or the cross-row term −Σ_i α_i·O_u is added (uncond_ref). Either way
    |out| ≤ (1 + 2·Σ_i |c_i|)·max|v|: the weights magnify the values by up to A = 1 + 2·Σ_i |c_i|.
    The output is stored in the model's dtype and the next layer's normalisation squares it, so
    A is held to A² ≤ finfo(dtype).max, i.e. Σ_i |c_i| ≤ (√finfo.max − 1) / 2: fp16 ≈ 127.5,
    fp32 and bf16 ≈ 9.2e18 (the weights themselves are fp32, so wider dtypes get fp32's bound).
    Beyond it a unit-scale value already overflows there (1e30 gives NaN latents in fp32)."""
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return (math.sqrt(torch.finfo(dtype).max) - 1) / 2


def _layout_to_json(layout):
    """The four forms a given layout takes (see SpatialTemporal._check_layout), tagged."""
    if layout is None:
        return None
    if isinstance(layout, Layout):
        return {"named": layout.to_json()}
    if isinstance(layout, dict):
        return {"by_object": [[k, region_to_json(r)] for k, r in layout.items()]}
    return {"in_order": [region_to_json(r) for r in layout]}


def _layout_from_json(data):
    if data is None:
        return None
    if isinstance(data, dict) and len(data) == 1:
        (kind, value), = data.items()
        if kind == "named":
            return Layout.from_json(value)
        if kind == "by_object":
            return {k: region_from_json(r, f"layout[{k!r}]") for k, r in value}
        if kind == "in_order":
            return [region_from_json(r, f"layout[{i}]") for i, r in enumerate(value)]
    raise ValueError(f"layout: expected null or one of {{named, by_object, in_order}}, got {data!r}")


def _check_weights(weights, n: Optional[int], dtype: torch.dtype = torch.float32):
    """None -> 5/n; a finite float; or a float tensor [n] / [n, steps] (n checked once known);
    every step's Σ_i |c_i| at most :func:`max_weight_sum` of the model's dtype (fp32 before apply)."""
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
        total = float(weights.detach().double().abs().sum(0).max())     # the largest step's Σ_i |c_i|
    elif isinstance(weights, bool) or not isinstance(weights, (int, float)) or not math.isfinite(weights):
        raise TypeError(f"weights: expected None, a finite float or a tensor [objects, steps], got {weights!r}")
    else:
        weights = float(weights)
        total = abs(weights) * (n or 1)                                   # one weight for each object
    bound = max_weight_sum(dtype)
    if total > bound:
        name = str(dtype).replace("torch.", "")
        raise ValueError(f"weights: Σ_i |c_i| = {total:g} exceeds {bound:g}, the bound for a {name} model: the "
                         f"combination magnifies the values by up to 1 + 2·Σ_i |c_i|, which must stay below "
                         f"√finfo({name}).max for the output and its square to be finite (see max_weight_sum)")
    return weights


def _freeze(modules) -> list:
    """Turn off requires_grad of every parameter (gradients go to W only); returns what to undo."""
    changed = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                changed.append(p)
    return changed


def _unfreeze(params: list) -> None:
    for p in params:
        p.requires_grad_(True)


def _encode(pipe, texts: list, device) -> Tensor:
    """Encoder hidden states [n, N, C] of each text alone, as the pipeline conditions its UNet
    (SDXL: both encoders concatenated)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    return out[0].detach()


# ---------------------------------------------------------------------- optimising the temporal weights
CLIP_SIZE = 224
# OpenAI CLIP's normalisation, as transformers' image processors apply it (the release does not apply it)
from transformers.utils.constants import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD  # noqa: E402


@dataclass
class OptimizationResult:
    losses: list              # loss of each differentiable pass (before its update)
    weights: list             # W [objects, steps] after each update (CPU)
    pass_ms: list             # wall time of each differentiable pass (forward + backward + update)
    peak_bytes: Optional[int]  # peak CUDA memory of the optimisation (None on the CPU)
    latents: Tensor           # x_T used by every pass (generate the final image from it, or the same seed)


def clip_resize(x: Tensor, size: int = CLIP_SIZE) -> Tensor:
    """[B, C, H, W] -> [B, C, size, size] by exact area averaging, as the released code (512 px:
    nearest x7 up, average-pool 16): per axis nearest-upsample by size/g and pool by n/g, g =
    gcd(n, size). Falls back to antialiased bilinear when that upsampling would be huge."""
    B, C, H, W = x.shape
    gh, gw = math.gcd(H, size), math.gcd(W, size)
    uh, uw = size // gh, size // gw
    if H * uh * W * uw > 4096 * 4096:
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(x, scale_factor=(uh, uw), mode="nearest")
    return F.avg_pool2d(up, kernel_size=(H // gh, W // gw))


def clip_pixels(x: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP's input normalisation (OpenAI CLIP's mean / std per channel)."""
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipLoss:
    """The released loss: [1 − cos(CLIP(image), CLIP(prompt))] + local_weight·Σ_i [1 −
    cos(CLIP(crop_i), CLIP("A photo of " + name_i))], averaged over images. ``model`` is a
    transformers ``CLIPModel`` (released: ViT-B/32), ``tokenizer`` its tokenizer; images in [0, 1]."""

    def __init__(self, model, tokenizer, prompt: str, names: Sequence[str], crops: Sequence[tuple], *,
                 local_weight: float = 5.0, normalize: bool = False):
        self.model, self.crops, self.local_weight, self.normalize = model, list(crops), float(local_weight), normalize
        device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        texts = [prompt] + ["A photo of " + n for n in names]
        ids = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            t = _features(model.get_text_features(**ids))
        self.text = F.normalize(t.float() if self.dtype != torch.float64 else t, dim=-1)

    def _image_features(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = clip_pixels(x)
        f = _features(self.model.get_image_features(pixel_values=x.to(self.dtype)))
        return F.normalize(f.to(self.text.dtype), dim=-1)

    def __call__(self, images: Tensor) -> Tensor:
        B = images.shape[0]
        views = [clip_resize(images)]
        for rows, cols in self.crops:
            crop = images[:, :, rows, cols]
            views.append(F.interpolate(crop, size=(CLIP_SIZE, CLIP_SIZE), mode="bilinear", antialias=True,
                                       align_corners=False))
        f = self._image_features(torch.cat(views)).view(len(views), B, -1)      # [1 + n, B, E]
        cos = (f * self.text[:, None]).sum(-1)                                  # [1 + n, B]
        terms = 1 - cos
        return (terms[0] + self.local_weight * terms[1:].sum(0)).mean()


def _features(out) -> Tensor:
    """transformers 5 returns the projected features as ``pooler_output``; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _load_clip(clip):
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        return clip
    if isinstance(clip, (str, bytes)) or hasattr(clip, "__fspath__"):
        from transformers import CLIPModel, CLIPTokenizer

        folder = os.fsdecode(clip)      # a local folder only: never a hub repo id
        if not os.path.exists(folder):
            raise ValueError(f"clip: the CLIP model directory {folder!r} does not exist; expected a local "
                             "transformers CLIPModel directory (config.json, weights, tokenizer files) or a "
                             "(CLIPModel, tokenizer) pair")
        if not os.path.isdir(folder):
            raise ValueError(f"clip: {folder!r} is not a directory; expected a local transformers CLIPModel "
                             "directory or a (CLIPModel, tokenizer) pair")
        return (CLIPModel.from_pretrained(folder, local_files_only=True).eval(),
                CLIPTokenizer.from_pretrained(folder, local_files_only=True))
    raise TypeError(f"clip: expected a CLIP model directory or a (transformers CLIPModel, tokenizer) pair, "
                    f"got {type(clip).__name__}")


def _runner_of(x):
    from ...integration.runner import Runner

    return x if isinstance(x, Runner) else Runner(x, accelerate=False)


def sample_images(runner, prompt: str, latents: Tensor, *, steps: int, guidance_scale: float,
                  height: int, width: int, num_images: int = 1, grad_steps: Optional[int] = None,
                  checkpoint: bool = True) -> Tensor:
    """A denoising run from x_T = ``latents`` with autograd on (the last ``grad_steps`` steps only,
    if given), every UNet evaluation and the VAE decode checkpointed (only the latents between
    steps are kept); returns images [B, 3, H, W] in [0, 1]. The step index is set inside the
    checkpointed function, so the recomputation in the backward sees the same step (and weights)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
    from torch.utils.checkpoint import checkpoint as ckpt

    from ...integration.processors import tracker_of

    pipe, unet, device = runner.pipe, runner.unet, runner.device
    cfg = guidance_scale > 1.0
    cond = runner.encode(prompt, None, num_images, cfg, height, width)
    timesteps, steps = retrieve_timesteps(runner.scheduler, steps, device)
    x = pipe.prepare_latents(cond.batch, unet.config.in_channels, height, width, cond.context.dtype, device,
                             None, latents)
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    tracker = tracker_of(unet)
    if tracker is None or tracker.controller is None:
        raise ValueError("SpatialTemporal.optimize: the controller is not installed; call apply(x, prompt=...) first")
    tracker.begin_generation(Generation(cfg=cfg, prompts=[prompt] * cond.batch, steps=len(timesteps),
                                        timesteps=timesteps, batch=cond.context.shape[0], source="runner",
                                        pipeline=pipe))
    first_grad = 0 if grad_steps is None else max(0, len(timesteps) - grad_steps)

    def unet_eval(model_in, i, t):
        # runs again in the backward (recomputation): set the step here, and keep the tracker's own
        # counting (its UNet pre-hook) out of it
        driven, tracker.driven = tracker.driven, True
        try:
            tracker.latent_hw = tuple(model_in.shape[-2:])
            tracker.set_step(i, t, device)
            return unet(model_in, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added,
                        return_dict=False)[0]
        finally:
            tracker.driven = driven

    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad):
            model_in = runner.scheduler.scale_model_input(torch.cat([x] * 2) if cfg else x, t)
            if checkpoint and i >= first_grad:
                noise = ckpt(unet_eval, model_in, i, t, use_reentrant=False)
            else:
                noise = unet_eval(model_in, i, t)
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            x = runner.scheduler.step(noise, t, x, **extra, return_dict=False)[0]
    decode = lambda z: runner._decode(z, "pt")  # noqa: E731  (the pipeline's own decode, in [0, 1])
    return ckpt(decode, x, use_reentrant=False) if checkpoint and x.requires_grad else decode(x)
