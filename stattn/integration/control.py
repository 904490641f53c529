"""The one small interface through which attention-control methods plug into a UNet.

A :class:`Controller` sees every accelerated cross-attention call of a UNet (stock diffusers
pipeline or :class:`stattn.Runner` alike) as a :class:`CrossAttentionCall` and may return the
attention output itself (usually through :func:`stattn.region_attention` with regions, weights or
an offset); returning None means plain cross-attention. The step bookkeeping is done by a UNet
forward pre-hook (:class:`StepTracker`), so the same controller works with any pipeline.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import torch


@dataclass
class CrossAttentionCall:
    """One cross-attention layer call, after the projections and before ``to_out``."""

    name: str                     # dotted module name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn: torch.nn.Module         # the diffusers Attention module (heads, scale, to_q / to_k / to_v, flags)
    q: torch.Tensor               # [B, H, M, D]
    k: torch.Tensor               # [B, 1, H, N, D]: the prompt's keys as region 0
    v: torch.Tensor               # [B, 1, H, N, D]
    context: torch.Tensor         # encoder_hidden_states [B, N, C] the keys were projected from
    grid: Optional[tuple]         # (h, w) of this layer's feature map (M = h * w), None if unknown
    step: int                     # index of the UNet evaluation in the current generation (0-based)
    timestep: Optional[torch.Tensor]
    scale: float                  # the layer's logit scale (attn.scale)
    step_tensor: Optional[torch.Tensor] = None  # 0-d int64 on q's device holding `step`
    generation: Optional["Generation"] = None   # what is known of the generation under way

    @property
    def cfg(self) -> Optional[bool]:
        """Classifier-free guidance of this generation as the pipeline runs it (None: unknown)."""
        return self.generation.cfg if self.generation is not None else None

    # Under CUDA-graph replay (stattn.Runner(cuda_graphs=True)) Python runs only at capture, so
    # `step` is the step the graph was captured at. Per-step arithmetic must read `step_tensor`
    # (updated in place before every replay) and step-dependent control flow must be declared via
    # Controller.graph_key, which selects the graph. Persistent state must be updated in place.

    def project(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, 1, H, N, D] of another context (e.g. an object's own description) through this
        layer's to_k / to_v, shaped as one more region."""
        return project_kv(self.attn, context)


class Controller:
    """Base controller: plain attention everywhere. Subclass and override what you need."""

    def reset(self) -> None:
        """A new generation starts (the first UNet call of a run)."""

    def begin_generation(self, generation: "Generation") -> None:
        """Called right after :meth:`reset` with what is known of the new generation: guidance,
        the prompts of the conditional rows, the number of UNet evaluations (see
        :class:`Generation`). Resolve per-prompt state here."""

    def begin_step(self, step: int, timestep) -> None:
        """Called before every UNet evaluation with its index in the run."""

    def attention(self, call: CrossAttentionCall) -> Optional[torch.Tensor]:
        """Return the attention output [B, H, M, D] for this call, or None for plain attention."""
        return None

    def graph_key(self, step: int) -> Hashable:
        """Steps with equal keys run the same Python path in `attention` (CUDA-graph mode captures
        one graph per key). The default says every step behaves alike."""
        return None


@dataclass
class Generation:
    """What is known of one generation when it starts (a pipeline call, a Runner call, or the
    first UNet evaluation of a run on a bare UNet). None means unknown."""

    cfg: Optional[bool] = None        # the batch is [uncond; cond] (classifier-free guidance)
    prompts: Optional[list] = None    # the prompt of every conditional row (images), in batch order
    prompt_embeds: Optional[torch.Tensor] = None  # the call's conditional prompt_embeds, if given instead
    prompt_2: Optional[list] = None   # SDXL's second prompts per row, when given
    steps: Optional[int] = None       # UNet evaluations (denoising-loop turns) this generation runs
    timesteps: Optional[torch.Tensor] = None  # the loop's timesteps, one per evaluation, when known
    batch: Optional[int] = None       # rows of the UNet batch
    source: str = "unet"              # "pipeline", "runner" or "unet"
    pipeline: Any = field(default=None, repr=False)

    @property
    def images(self) -> Optional[int]:
        return len(self.prompts) if self.prompts is not None else None

    @classmethod
    def from_pipeline(cls, pipe, arguments: dict, batch: int) -> "Generation":
        """Read at the call's first UNet evaluation, when the pipeline has set up its loop:
        guidance from ``pipe.do_classifier_free_guidance`` (the property every SD-family pipeline
        defines: guidance_scale > 1 and no guidance embedding), else from the call's guidance_scale;
        loop turns from ``pipe._num_timesteps`` (set before the loop, after img2img's strength cut),
        else from the scheduler; prompts from the call's arguments."""
        cfg = None
        try:
            cfg = bool(pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):
            scale = arguments.get("guidance_scale")
            cfg = None if scale is None else float(scale) > 1.0
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        begin = getattr(scheduler, "begin_index", None) if scheduler is not None else None
        if timesteps is not None and isinstance(begin, int):
            timesteps = timesteps[begin:]
        steps = getattr(pipe, "_num_timesteps", None)
        if not isinstance(steps, int) and timesteps is not None:
            steps = len(timesteps)
        if isinstance(steps, int) and timesteps is not None and len(timesteps) != steps:
            timesteps = None        # the pipeline cut its schedule where we cannot see (e.g. denoising_end)
        per = arguments.get("num_images_per_prompt") or 1
        prompts = prompt_rows(arguments.get("prompt"), per)
        embeds = arguments.get("prompt_embeds") if prompts is None else None
        return cls(cfg=cfg, prompts=prompts, prompt_embeds=embeds, prompt_2=prompt_rows(arguments.get("prompt_2"), per),
                   steps=steps if isinstance(steps, int) else None, timesteps=timesteps, batch=batch,
                   source="pipeline", pipeline=pipe)


def prompt_rows(prompt, per_prompt: int) -> Optional[list]:
    """Prompts of the conditional rows: each prompt repeated num_images_per_prompt times in a row,
    as diffusers' encode_prompt orders them."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [p for p in prompts for _ in range(int(per_prompt))]


def bind_call(fn, args: tuple, kwargs: dict) -> dict:
    """The arguments of a pipeline call by name, defaults filled in (``self`` left out)."""
    try:
        bound = inspect.signature(fn).bind(None, *args, **kwargs)
    except TypeError:
        return dict(kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(out)), None)          # self
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


class PromptEmbedsCheck:
    """For calls that give ``prompt_embeds`` instead of prompts: are they the embeddings of the
    prompt a controller was applied for? (Encoded once with the pipeline's own ``encode_prompt``;
    equal within 1e-3 relative per row: the same encoder gives the same values, another prompt
    differs by O(1).)"""

    def __init__(self, pipe, prompt: Optional[str]):
        self.pipe, self.prompt, self._embeds = pipe, prompt, None

    def __call__(self, embeds: torch.Tensor, what: str) -> None:
        if self.prompt is None or self.pipe is None:
            raise ValueError(f"prompt_embeds: {what} need the prompt, but neither this call nor apply() gave it; "
                             "apply(pipe, prompt=...) the prompt these embeddings encode")
        if self._embeds is None:
            with torch.no_grad():
                pe = self.pipe.encode_prompt(prompt=self.prompt, device=embeds.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)[0]
            self._embeds = pe.detach().float()
        ref = self._embeds.to(embeds.device)
        e = embeds.detach().float()
        same = e.shape[1:] == ref.shape[1:] and bool(
            ((e - ref).flatten(1).norm(dim=1) <= 1e-3 * ref.flatten(1).norm(dim=1).clamp_min(1e-12)).all())
        if not same:
            raise ValueError(f"prompt_embeds: these embeddings are not those of the prompt the controller was applied "
                             f"for ({self.prompt!r}), so {what} would be another prompt's; pass the prompt itself, "
                             "or apply(pipe, prompt=...) the prompt these embeddings encode")


def cond_start(call: CrossAttentionCall, cfg: Optional[bool]) -> int:
    """First conditional row of the batch: B/2 under classifier-free guidance (diffusers orders the
    batch [uncond; cond]), else 0. Guidance is taken from the generation (the pipeline call) when
    known; a controller's own ``cfg`` (for bare UNets) must agree with it."""
    B = call.q.shape[0]
    gen = call.generation
    known = gen.cfg if gen is not None else None
    if cfg is not None and known is not None and cfg != known:
        how = "with" if known else "without"
        raise ValueError(f"cfg: the controller was given cfg={cfg}, but this {gen.source} call runs {how} "
                         "classifier-free guidance (guidance_scale); leave cfg=None to take it from the pipeline")
    use = known if known is not None else (True if cfg is None else cfg)
    rows = gen.images if gen is not None else None
    if rows is not None and known is not None and B != rows * (2 if use else 1):
        raise ValueError(f"layer {call.name}: the {gen.source} call has {rows} conditional rows "
                         f"({'[uncond; cond]' if use else 'no guidance'}), but the UNet batch has {B} rows; this "
                         "pipeline orders its batch in a way stattn's controllers do not know")
    if not use:
        return 0
    if B % 2:
        raise ValueError(f"cfg: with classifier-free guidance the batch is [uncond; cond], an even number of "
                         f"rows, but layer {call.name} got {B}; pass cfg=False when generating without "
                         "guidance (guidance_scale <= 1)")
    return B // 2


def project_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """to_k / to_v of `context` [B, N, C] as [B, 1, H, N, D] (norm_cross / norm_k honoured)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    B, N, _ = context.shape
    k, v = attn.to_k(context), attn.to_v(context)
    D = k.shape[-1] // attn.heads
    k = k.view(B, N, attn.heads, D).transpose(1, 2)
    v = v.view(B, N, attn.heads, D).transpose(1, 2)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k.unsqueeze(1).contiguous(), v.unsqueeze(1).contiguous()


def layer_grid(latent_hw: Optional[tuple], M: int) -> Optional[tuple]:
    """(h, w) of a UNet level with M pixels, from the latent size: each downsampling is a stride-2
    convolution with padding 1, so sizes go n -> ceil(n / 2)."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    while h * w > M and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == M else None


class StepTracker:
    """UNet forward pre-hook: counts the UNet evaluations of a generation and records the latent size.

    A controller's step is the index of the denoising loop's turn (one UNet evaluation per turn: the
    ``i`` diffusers' ``callback_on_step_end`` reports), for every scheduler. Where a generation starts:

    - a pipeline call, when stattn was given the pipeline (:func:`stattn.accelerate(pipe)`,
      ``controller.apply(pipe)``): :mod:`stattn.integration.pipeline_calls` hooks its ``__call__``; the call's
      guidance, prompts and number of loop turns are read from the pipeline (:class:`Generation`);
    - :class:`stattn.Runner`: it drives the steps itself (``driven``) and says what it runs;
    - a bare UNet: the first evaluation after ``accelerate`` / :meth:`reset`, and every evaluation
      whose timestep is *larger* than the previous one (samplers walk timesteps downwards and may
      repeat one: PNDM's warm-up, Heun's second evaluation). Two runs whose first timestep equals the
      previous run's last one need an explicit :meth:`reset` between them.
    """

    def __init__(self, controller: Optional[Controller] = None):
        self.controller = controller
        self.step = -1
        self.timestep = None
        self.latent_hw = None
        self.step_tensor = None  # 0-d int64 on the UNet's device, = step
        self.generation: Optional[Generation] = None
        self._last_t = None
        self._call = None        # the pipeline call under way: (pipeline, bound arguments)
        self._pending = True     # the next evaluation starts a generation (bare-UNet rule)
        self.driven = False      # set by the runner, which then calls `set_step` itself

    def reset(self) -> None:
        """Make the next UNet evaluation step 0 of a new generation."""
        self.step, self._last_t, self._pending = -1, None, True
        self.generation = None

    def begin_generation(self, generation: "Generation") -> None:
        """A generation starts now with what is known of it: step -1, the controller told."""
        self.step, self._last_t, self._pending = -1, None, False
        self.generation = generation
        if self.controller is not None:
            self.controller.reset()
            self.controller.begin_generation(generation)

    # the pipeline-call hook (stattn.integration.pipeline_calls) brackets every call of a hooked pipeline
    def begin_pipeline_call(self, pipe, arguments: dict) -> None:
        self._call = (pipe, arguments)
        self.reset()

    def end_pipeline_call(self) -> None:
        self._call = None

    def set_step(self, step: int, timestep, device) -> None:
        """Make `step` current: outside any graph capture (fill_ of a Python scalar is baked in)."""
        if self.step_tensor is None or self.step_tensor.device != torch.device(device):
            self.step_tensor = torch.zeros((), dtype=torch.int64, device=device)
        self.step_tensor.fill_(step)
        self.step, self.timestep = step, timestep
        if self.controller is not None:
            self.controller.begin_step(step, timestep)

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.latent_hw = tuple(sample.shape[-2:])
        if self.driven:
            return
        if self._call is None:      # bare UNet: a larger timestep starts a new generation
            t_val = float(t.flatten()[0]) if isinstance(t, torch.Tensor) and not _capturing(t) else t
            if isinstance(t_val, (int, float)):
                if self._last_t is not None and t_val > self._last_t:
                    self._pending = True
                self._last_t = t_val
        if self._pending:
            pipe, arguments = self._call if self._call is not None else (None, None)
            last_t = self._last_t
            self.begin_generation(Generation.from_pipeline(pipe, arguments, sample.shape[0])
                                  if pipe is not None else Generation(batch=sample.shape[0]))
            self._last_t = last_t
        self.set_step(self.step + 1, t, sample.device)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
