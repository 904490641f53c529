"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023) on stattn's fused attention.

:class:`AttendAndExcite` reproduces diffusers' ``StableDiffusionAttendAndExcitePipeline`` (its
conventions are listed in :mod:`stattn.methods.attend_excite.core` and docs/attend-and-excite.md)
on any SD 1.x / 2.x pipeline::

    ae = stattn.AttendAndExcite(targets=["cat", "frog"])
    ae.apply(pipe, prompt="a cat and a frog")      # resolves the words, installs the fused processors
    image = pipe("a cat and a frog", num_inference_steps=50, generator=g).images[0]
    ae.remove(pipe)

``apply`` accelerates the UNet with this controller (every cross-attention layer runs the fused op)
and routes the pipeline's calls to :func:`stattn.methods.attend_excite.loop.generate`, the
pipeline's loop with the whole batch at once. In the forwards whose maps the loss reads, the
controller serves the layers at the ``attn_res`` grid with ``region_attention(...,
return_probs=columns)``, which returns their maps beside the output from the same pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from torch import Tensor

from ...integration.control import Controller, CrossAttentionCall, PromptEmbedsCheck
from ...integration.tokens import check_targets
from ...integration.processors import accelerate, restore, status, tracker_of, unet_of
from ...ops import region_attention
from .core import map_columns

__all__ = ["AttendAndExcite", "DEFAULT_THRESHOLDS"]

# the pipeline's defaults (its __call__ and _perform_iterative_refinement_step)
DEFAULT_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
SUBTOKENS = ("all", "first")


class MapsRead(Exception):
    """Raised by the last layer whose map the loss reads: the rest of that UNet forward cannot
    change the loss, so it is not run (caught by the loop)."""


@dataclass
class Capture:
    """The maps of one UNet forward (the loop sets it, the controller fills it)."""
    cells: int                          # attn_res[0] * attn_res[1]: the layers read are those with M == cells
    stop_after: Optional[int] = None    # layers read per forward (known after the first): stop there
    maps: list = field(default_factory=list)    # per layer [B, M, N - 2] fp32
    heads: list = field(default_factory=list)   # per layer head count
    columns: Optional[tuple] = None


class AttendAndExcite(Controller):
    """Attend-and-Excite, diffusers' pipeline conventions and defaults.

    targets        words or phrases of the prompt to excite (whole words, repeated words take
                   successive occurrences, a word of several tokens gives all of them with
                   ``subtokens="all"``), resolved in every call's prompts; or
    token_indices  key indices (SOS is 0) as the pipeline takes them: a list of ints for every
                   prompt, or one list per prompt of a call.
    max_iter_to_alter  loop turns 0 .. max_iter_to_alter-1 update the latents (default 25).
    thresholds     {loop turn: threshold}: the iterative refinement (default {0: 0.05, 10: 0.5, 20: 0.8}).
    scale_factor   the step size scale_factor * sqrt(linspace(1, 0.5, turns)[i]) (default 20).
    attn_res       (h, w) of the maps read (default (16, 16)); None: (ceil(width / 32), ceil(height / 32)).
    max_refinement_steps  refinement iterations at most per threshold turn (default 20).
    subtokens      ``"all"`` or ``"first"`` token of a target word split into several tokens.

    After a call: ``losses`` (per loop turn, the loss of each image that the update used, as the
    pipeline logs it) and ``refinement_iterations`` (per threshold turn, each image's count).
    """

    def __init__(self, targets: Union[None, str, Sequence[str]] = None, *,
                 token_indices: Optional[Sequence] = None, max_iter_to_alter: int = 25,
                 thresholds: Optional[dict] = None, scale_factor: float = 20, attn_res: Optional[tuple] = (16, 16),
                 max_refinement_steps: int = 20, subtokens: str = "all"):
        self.targets = check_targets(targets, token_indices)
        self.token_indices = None if token_indices is None else _token_indices(token_indices)
        self.max_iter_to_alter = _int("max_iter_to_alter", max_iter_to_alter, 0)
        self.thresholds = _thresholds(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or \
                not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"scale_factor: expected a positive finite number, got {scale_factor!r}")
        self.scale_factor = scale_factor
        self.attn_res = _attn_res(attn_res)
        self.max_refinement_steps = _int("max_refinement_steps", max_refinement_steps, 1)
        if subtokens not in SUBTOKENS:
            raise ValueError(f"subtokens: expected one of {SUBTOKENS}, got {subtokens!r}")
        self.subtokens = subtokens
        self.losses: dict = {}
        self.refinement_iterations: dict = {}
        self._tokenizer = None
        self._prompt: Optional[str] = None
        self._embeds_check = PromptEmbedsCheck(None, None)
        self._capture: Optional[Capture] = None

    # ------------------------------------------------------------------ apply / remove
    def apply(self, pipe, prompt: Optional[str] = None):
        """Check the pipeline and the targets (in ``prompt``, which word targets need), install the
        fused cross-attention processors with this controller on its UNet
        (:func:`stattn.accelerate`), and route the pipeline's calls to the Attend-and-Excite loop.
        Returns the pipeline."""
        _check_pipeline(pipe)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt: expected one prompt string (the targets are checked in it), got "
                            f"{type(prompt).__name__}")
        if self.targets is not None and prompt is None:
            raise ValueError(f"prompt: targets {self.targets} are words; apply(pipe, prompt=...) must give the "
                             "prompt they are found in (or construct with token_indices=)")
        self._tokenizer = pipe.tokenizer
        self._check_indices_range()
        if prompt is not None:
            self.indices_for([prompt])           # raises now when a target is not in the prompt
        unet = unet_of(pipe)
        _check_attention(unet)
        accelerate(unet, controller=self)
        left = status(unet).left
        if left:
            restore(unet)
            raise ValueError("pipe: AttendAndExcite reads its maps from stattn's fused cross-attention, but these "
                             f"layers keep their own processor: {left}; install the default processors first, "
                             "e.g. pipe.unet.set_default_attn_processor()")
        self._prompt = prompt
        self._embeds_check = PromptEmbedsCheck(pipe, prompt)
        if "_stattn_ae_stock_class" not in type(pipe).__dict__:
            pipe.__class__ = _routed_class(type(pipe))
        object.__setattr__(pipe, "_stattn_attend_excite", self)
        return pipe

    def remove(self, pipe):
        """The UNet's original processors back (:func:`stattn.restore`) and the pipeline's own call."""
        tracker = tracker_of(pipe)
        if tracker is not None and tracker.controller is self:
            restore(pipe)
        if vars(pipe).get("_stattn_attend_excite") is self:
            object.__delattr__(pipe, "_stattn_attend_excite")
        stock = type(pipe).__dict__.get("_stattn_ae_stock_class")
        if stock is not None:
            pipe.__class__ = stock
        return pipe

    def installed_on(self, pipe) -> bool:
        tracker = tracker_of(pipe)
        return tracker is not None and tracker.controller is self

    # ------------------------------------------------------------------ targets
    def indices_for(self, prompts: Optional[list], embeds: Optional[Tensor] = None, batch: int = 1) -> list:
        """The target key indices of each prompt of a call (one list per prompt)."""
        if self.token_indices is not None:
            if isinstance(self.token_indices[0], int):
                return [list(self.token_indices)] * (len(prompts) if prompts is not None else batch)
            n = len(prompts) if prompts is not None else batch
            if len(self.token_indices) != n:
                raise ValueError(f"token_indices: {len(self.token_indices)} lists of indices but the call has {n} "
                                 "prompts; give one list per prompt (or one list of ints for all)")
            return [list(t) for t in self.token_indices]
        if prompts is None:
            self._embeds_check(embeds, f"the target columns of {self.targets}")
            prompts = [self._prompt] * batch
        from ...integration.tokens import token_indices

        out = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompt: expected strings, got {type(p).__name__}")
            out.append(token_indices(self._tokenizer, p, self.targets, subtokens=self.subtokens))
        for p, idx in zip(prompts, out):
            if max(idx) > self._tokenizer.model_max_length - 2:
                raise ValueError(f"targets: {self.targets} in {p!r} are at key indices {idx}, beyond "
                                 f"{self._tokenizer.model_max_length - 2}, the last column the loss reads")
        return out

    def _check_indices_range(self) -> None:
        if self.token_indices is None:
            return
        last = self._tokenizer.model_max_length - 2
        rows = [self.token_indices] if isinstance(self.token_indices[0], int) else self.token_indices
        bad = sorted({i for r in rows for i in r if i > last})
        if bad:
            raise ValueError(f"token_indices: {bad} out of range: the loss reads key columns 1 .. {last} (the start "
                             f"token 0 and the last position {last + 1} are dropped, as diffusers' pipeline does)")

    # ------------------------------------------------------------------ the maps
    def attention(self, call: CrossAttentionCall) -> Optional[Tensor]:
        cap = self._capture
        if cap is None or call.q.shape[2] != cap.cells:
            return None
        if cap.columns is None:
            cap.columns = tuple(map_columns(call.k.shape[3]))
        out, maps = region_attention(call.q, call.k, call.v, scale=call.scale, return_probs=cap.columns)
        cap.maps.append(maps)
        cap.heads.append(call.q.shape[1])
        if cap.stop_after is not None and len(cap.maps) == cap.stop_after:
            raise MapsRead()
        return out

    def _call(self, pipe, *args, **kwargs):
        from .loop import generate

        if not self.installed_on(pipe):
            raise ValueError("pipe: this AttendAndExcite is no longer installed on the pipeline's UNet (stattn.restore "
                             "or another accelerate replaced it); ae.apply(pipe, prompt=...) it again, or "
                             "ae.remove(pipe) for the pipeline's own call")
        return generate(self, pipe, *args, **kwargs)

    def __repr__(self) -> str:
        what = f"targets={self.targets}" if self.targets is not None else f"token_indices={self.token_indices}"
        return (f"AttendAndExcite({what}, max_iter_to_alter={self.max_iter_to_alter}, thresholds={self.thresholds}, "
                f"scale_factor={self.scale_factor}, attn_res={self.attn_res}, "
                f"max_refinement_steps={self.max_refinement_steps})")


# ---------------------------------------------------------------------- the routed call
_ROUTED: dict = {}


def _routed_class(cls: type) -> type:
    """A subclass of the pipeline's class (same name and module) whose calls run Attend-and-Excite
    while an AttendAndExcite is applied to the instance, and the stock call otherwise."""
    sub = _ROUTED.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            ae = vars(self).get("_stattn_attend_excite")
            if ae is None:
                return cls.__call__(self, *args, **kwargs)
            return ae._call(self, *args, **kwargs)

        __call__.__doc__ = ("Attend-and-Excite (stattn.AttendAndExcite applied): the arguments of diffusers' "
                            "StableDiffusionAttendAndExcitePipeline.__call__ without token_indices and the "
                            "method's settings (given to AttendAndExcite).")
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_stattn_ae_stock_class": cls})
        _ROUTED[cls] = sub
    return sub


# ---------------------------------------------------------------------- checks
def _check_pipeline(pipe) -> None:
    needed = ("unet", "tokenizer", "text_encoder", "scheduler", "vae", "encode_prompt", "prepare_latents",
              "prepare_extra_step_kwargs", "image_processor")
    missing = [n for n in needed if getattr(pipe, n, None) is None]
    if missing:
        raise TypeError(f"pipe: expected a diffusers Stable Diffusion 1.x / 2.x pipeline (e.g. "
                        f"StableDiffusionPipeline, StableDiffusionAttendAndExcitePipeline), got "
                        f"{type(pipe).__name__} without {', '.join(missing)}")
    config = unet_of(pipe).config
    if config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
        raise TypeError(f"pipe: {type(pipe).__name__}'s UNet takes added conditioning "
                        f"({config.get('addition_embed_type') or config.get('class_embed_type')}), which diffusers' "
                        "Attend-and-Excite loop does not give; SD 1.x / 2.x pipelines only")


def _check_attention(unet) -> None:
    """diffusers' AttendExciteAttnProcessor computes softmax(q k^T attn.scale) v from to_q / to_k / to_v
    alone (no norms, residual or rescale) on every layer; stattn's processors follow each module's
    own conventions. The two agree where a module has none of what that processor ignores."""
    from diffusers.models.attention_processor import Attention

    for name, m in unet.named_modules():
        if not isinstance(m, Attention):
            continue
        head_dim = m.inner_dim // m.heads
        why = None
        if abs(m.scale - head_dim ** -0.5) > 1e-12 * head_dim ** -0.5:
            why = f"logit scale {m.scale} (not head_dim ** -0.5)"
        elif any(getattr(m, a, None) is not None for a in ("spatial_norm", "group_norm", "norm_cross", "norm_q",
                                                           "norm_k")):
            why = "normalisations"
        elif m.residual_connection or m.rescale_output_factor != 1.0:
            why = "a residual connection or output rescale"
        if why is not None:
            raise ValueError(f"pipe: attention layer {name} has {why}, which diffusers' Attend-and-Excite processor "
                             "ignores; AttendAndExcite reproduces that pipeline only on UNets where it computes "
                             "the model's own attention")


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _thresholds(thresholds) -> dict:
    if not isinstance(thresholds, dict):
        raise TypeError(f"thresholds: expected a dict {{loop turn: threshold}}, got {type(thresholds).__name__}")
    out = {}
    for step, thr in thresholds.items():
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"thresholds: keys are loop turns (ints >= 0), got {step!r}")
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise ValueError(f"thresholds: the threshold of turn {step} must be a number in [0, 1] (the maximum "
                             f"attention each target should reach), got {thr!r}")
        out[step] = thr
    return out


def _attn_res(attn_res) -> Optional[tuple]:
    if attn_res is None:
        return None
    if not isinstance(attn_res, (tuple, list)) or len(attn_res) != 2 or \
            not all(isinstance(r, int) and not isinstance(r, bool) and r >= 2 for r in attn_res):
        raise ValueError(f"attn_res: expected None or (h, w), two ints >= 2 (the grid of the maps read; "
                         f"reflection padding needs 2), got {attn_res!r}")
    return tuple(attn_res)


def _token_indices(values) -> list:
    def ints(row, what):
        if isinstance(row, (str, bytes)) or not isinstance(row, (list, tuple)) or not row:
            raise TypeError(f"token_indices: expected a non-empty list of ints or a list of such lists, got {what!r}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"token_indices: expected key indices >= 1 (0 is the start token), got {row!r}")
        return list(row)

    if isinstance(values, (list, tuple)) and values and all(isinstance(v, (list, tuple)) for v in values):
        return [ints(r, values) for r in values]
    return ints(values, values)
