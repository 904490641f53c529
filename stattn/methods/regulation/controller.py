"""Attention Regulation (arXiv 2403.06381) as a :class:`stattn.Controller`.

At every edited cross-attention layer call of the first ``edit_steps`` denoising steps, the
conditional rows' attention scores of the target tokens get an additive Gaussian-basis offset
S = G_y θ G_xᵀ whose coefficients θ are optimised on the spot (``iters`` gradient steps on a
quantile + mean + ‖θ‖² loss), blended with the previous step's best and decayed by 0.99^t. The
defaults reproduce the released code; every
deviation the paper or good sense suggests is an option.

Two paths compute the same thing:

- ``fused=True`` (default): :func:`stattn.methods.regulation.core.inner_loop` (two Triton launches on a
  GPU, a vectorised closed form on the CPU) and one :func:`stattn.region_attention` launch with
  the offset for the whole batch (θ = 0 on the unconditional rows, which is plain attention).
  No host synchronisation; the step enters only through ``graph_key`` (edit or not) and
  ``call.step_tensor`` (the decay, the first-step rule), and the per-layer state lives in device
  buffers updated in place, so it runs under ``stattn.Runner(cuda_graphs=True)``.
- ``fused=False``: the eager autograd reference of the whole released algorithm
  (:mod:`stattn.methods.regulation.reference`), step for step. Slow; the oracle. Not CUDA-graph capturable.

Targets are resolved to key indices at :meth:`AttentionRegulation.apply` time from ``prompt=`` and
the pipeline's tokenizer (the controller never sees the prompt text later), or given directly as
``token_indices=`` (then also ``eos_index=``, unless ``prompt=`` is passed to ``apply`` or
``renormalize=True``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ... import reference as ref
from ..._validate import value_checks
from . import reference as rr
from .core import check_loss_weights
from ...basis import ScoreOffset, gaussian_basis
from ...integration.control import Controller, CrossAttentionCall, PromptEmbedsCheck, cond_start
from ...integration.tokens import check_targets
from ...ops import region_attention
from ...integration.processors import accelerate, restore, unet_of

__all__ = ["AttentionRegulation", "DEFAULT_LAYERS"]

DEFAULT_LAYERS = ("down_blocks.2", "up_blocks.1")
INITS = ("uniform", "zeros")


@dataclass
class _LayerState:
    """Device-resident state of one edited layer for one batch shape (allocated at the first,
    eager call; later calls, captured or not, only update it in place)."""
    basis: tuple                 # (gy [h, Ky], gx [w, Kx])
    tokens: Tensor               # int64 [T] target columns (row 0's when rows differ), on the device
    key_order: Optional[Tensor]  # int64 [Bc, N]: per-row key orders putting every row's targets at `tokens`
    theta_prev: Tensor           # [Bc, H, T, Ky, Kx]: the best θ of the previous step (carried raw)
    theta_full: Tensor           # [B, H, T, Ky, Kx]: applied θ_eff; zeros on the unconditional rows
    offset: ScoreOffset          # over theta_full, pinned SOS and first EOS
    cond_offset: ScoreOffset     # the same over the conditional rows only (theta_full[c0:], a view)
    ref_prev: Optional[Tensor] = None  # the reference path's carried θ_best (Python-held)
    theta_zero: Optional[Tensor] = None  # θ0 of init="zeros", allocated once (no fill launch per call)


class AttentionRegulation(Controller):
    """Attention Regulation controller.

    targets        words or phrases of the prompt to regulate (resolved at ``apply(x, prompt=...)``
                   by :func:`stattn.integration.tokens.token_indices`: whole words, repeated words take
                   successive occurrences, a multi-token word gives all its tokens), or
    token_indices  key indices directly (SOS is 0).
    layers         substrings selecting cross-attention layers by dotted name, or ``"all"``.
    edit_steps     steps 0 .. edit_steps-1 are edited (steps count UNet evaluations).
    iters, lr, quantile, loss_weights, thr
                   the inner optimisation: ``iters`` steps θ ← θ − lr·n·∇L, n = images·heads;
                   L = w0·(quantile_q(P_t) − q)² + w1·(mean P_t − thr/T)² + w2·θ², thr = min(1, 0.2 T).
    beta           the paper's β·‖A′ − A‖ term (not in the released code; reference path only).
    init           θ₀ each call: ``"uniform"`` (U[0,1), as released) or ``"zeros"``;
    generator      a torch.Generator for the uniform draws (default: the global RNG, as released).
                   With ``stattn.Runner(cuda_graphs=True)`` keep the default (the device's global
                   generator is capture-safe) or use ``init="zeros"``; a generator on another device
                   than the model costs a copy per call and cannot be captured.
    prev_weight, decay
                   θ_eff = decay^t·(prev_weight·θ_best(t−1) + (1 − prev_weight)·θ_best(t)).
    renormalize    False (released): SOS and the first EOS keep their unedited probabilities, so
                   rows no longer sum to 1; True: the plain softmax of the edited logits.
    fused          False runs the eager autograd reference (slow; the oracle).
    record_maps    keep the target tokens' attention maps of every step (see :attr:`maps`).
    cfg            None (default): classifier-free guidance as the pipeline / Runner call runs it
                   (the batch is then [uncond; cond] and only its second half is edited); on a bare
                   UNet, True. A bool is for bare UNets; it must agree with a pipeline's guidance.
    eos_index      the first end-of-text column, needed with ``token_indices`` when the prompt is
                   never seen (a bare UNet; renormalize False).

    Prompts: the targets are resolved in the prompts of every pipeline / Runner call (each row of a
    list of prompts gets its own key columns and EOS); ``apply(x, prompt=...)`` checks them up front
    and serves calls that give only ``prompt_embeds`` (which must be that prompt's) and bare UNets.
    Steps count UNet evaluations of the call (the denoising loop's ``i``, any scheduler).
    subtokens      ``"all"`` or ``"first"`` token of a target split into several tokens.
    """

    def __init__(self, targets: Union[None, str, Sequence[str]] = None, *,
                 token_indices: Optional[Sequence[int]] = None,
                 layers: Union[str, Sequence[str]] = DEFAULT_LAYERS, edit_steps: int = 25, iters: int = 20,
                 lr: float = 100.0, quantile: float = 0.9, loss_weights=(1.0, 80.0, 0.09),
                 thr: Optional[float] = None, beta: float = 0.0, init: str = "uniform",
                 generator: Optional[torch.Generator] = None, prev_weight: float = 0.25, decay: float = 0.99,
                 renormalize: bool = False, fused: bool = True, record_maps: bool = False, cfg: Optional[bool] = None,
                 eos_index: Optional[int] = None, subtokens: str = "all"):
        self.targets = check_targets(targets, token_indices)
        self.token_indices = None if token_indices is None else _indices("token_indices", token_indices)
        self.layers = _layers(layers)
        self.edit_steps = _int("edit_steps", edit_steps, 0)
        self.iters = _int("iters", iters, 1)
        self.lr = _float("lr", lr, positive=True)      # lr <= 0 would not descend the loss
        self.quantile = _float("quantile", quantile)
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile: expected a float in (0, 1), got {quantile!r}")
        self.loss_weights = check_loss_weights(loss_weights)
        self.thr = None if thr is None else _float("thr", thr, positive=True)
        self.beta = _float("beta", beta)
        if self.beta < 0:
            raise ValueError(f"beta: expected a non-negative float, got {beta!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        self.init = init
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.prev_weight = _float("prev_weight", prev_weight)
        if not 0.0 <= self.prev_weight <= 1.0:     # the weight of a convex blend of two θ
            raise ValueError(f"prev_weight: expected a float in [0, 1] (the previous step's share of θ_eff), "
                             f"got {prev_weight!r}")
        self.decay = _float("decay", decay)
        if not 0.0 < self.decay <= 1.0:             # decay^t: > 1 grows the offset with every step
            raise ValueError(f"decay: expected a float in (0, 1] (θ_eff is scaled by decay^step), got {decay!r}")
        for name, val in (("renormalize", renormalize), ("fused", fused), ("record_maps", record_maps),
                          ("cfg", True if cfg is None else cfg)):
            if not isinstance(val, bool):
                raise TypeError(f"{name}: expected a bool{' or None' if name == 'cfg' else ''}, got {val!r}")
        self.renormalize, self.fused, self.record_maps, self.cfg = renormalize, fused, record_maps, cfg
        if self.beta and fused:
            raise ValueError("beta: the ||A' - A|| term exists only on the reference path; pass fused=False "
                             "with beta > 0")
        self.eos_index = None if eos_index is None else _int("eos_index", eos_index, 1)
        if subtokens not in ("all", "first"):
            raise ValueError(f"subtokens: expected 'all' or 'first', got {subtokens!r}")
        self.subtokens = subtokens
        self.tokens: Optional[list] = self.token_indices   # resolved key columns
        self.eos: Optional[int] = self.eos_index
        self.layer_names: Optional[list] = None   # the selected layers, known at apply()
        self._states: dict = {}
        self._selected: dict = {}
        self._maps: dict = {}        # step -> {(h, w): [sum [Bc, T, h, w], count]}
        self._tokenizer = None
        self._prompt: Optional[str] = None      # the prompt given to apply()
        self._embeds_check = PromptEmbedsCheck(None, None)
        self._resolved: dict = {}    # prompt -> (tokens, eos)
        self.rows: Optional[list] = None   # this generation's (tokens, eos) per conditional row; None: apply's
        self._check_tokens()

    # ------------------------------------------------------------------ apply / remove
    def apply(self, pipe_or_runner, prompt: Optional[str] = None):
        """Resolve the targets (needs ``prompt`` and a tokenizer, i.e. a pipeline or Runner, when
        targets are words), check the layer selection against the UNet, and install the fused
        cross-attention processors with this controller (:func:`stattn.accelerate`).
        Returns what it was given."""
        unet = unet_of(pipe_or_runner)
        tokenizer = _tokenizer_of(pipe_or_runner)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected one prompt string (the targets are resolved in it), "
                                f"got {type(prompt).__name__}")
            if tokenizer is None:
                raise ValueError("prompt: resolving it needs a tokenizer; pass a diffusers pipeline or "
                                 "stattn.Runner, not a bare UNet")
        if self.targets is not None:
            if prompt is None:
                raise ValueError(f"prompt: targets {self.targets} are words; apply(x, prompt=...) must give "
                                 "the prompt they are found in (or construct with token_indices=)")
            from ...integration.tokens import token_indices

            self.tokens = token_indices(tokenizer, prompt, self.targets, subtokens=self.subtokens)
        if prompt is not None:
            from ...integration.tokens import eos_index

            self.eos = eos_index(tokenizer, prompt)
        if self.eos is None and not self.renormalize:
            raise ValueError("eos_index: pinning the first end-of-text column needs its index; pass "
                             "apply(x, prompt=...) or eos_index=, or use renormalize=True")
        self._check_tokens()
        names = [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)]
        chosen = [n for n in names if self._matches(n)]
        if not chosen:
            raise ValueError(f"layers: {self.layers!r} matches none of this UNet's cross-attention layers "
                             f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        self.layer_names = chosen
        self._tokenizer, self._prompt = tokenizer, prompt
        self._embeds_check = PromptEmbedsCheck(getattr(pipe_or_runner, "pipe", pipe_or_runner), prompt)
        self._resolved = {} if prompt is None else {prompt: (list(self.tokens), self.eos)}
        self.rows = None
        self._states, self._selected = {}, {}
        accelerate(pipe_or_runner, controller=self)
        return pipe_or_runner

    def remove(self, pipe_or_runner):
        """Put the original attention processors back (:func:`stattn.restore`)."""
        return restore(pipe_or_runner)

    # ------------------------------------------------------------------ settings
    _SETTINGS = ("targets", "token_indices", "layers", "edit_steps", "iters", "lr", "quantile", "loss_weights",
                 "thr", "beta", "init", "prev_weight", "decay", "renormalize", "fused", "record_maps", "cfg",
                 "eos_index", "subtokens")

    def settings(self) -> dict:
        """Everything that determines the edit, JSON-able: ``kwargs`` rebuild the controller with
        :meth:`from_settings` (the generator aside: θ₀'s uniform draws come from it, or from the
        global RNG); ``resolved`` is what apply() and the last generation resolved (the target
        key columns and first EOS, per conditional row when a call had several prompts, and the
        layers edited)."""
        kwargs = {name: getattr(self, name) for name in self._SETTINGS}
        kwargs["layers"] = kwargs["layers"] if kwargs["layers"] == "all" else list(kwargs["layers"])
        kwargs["loss_weights"] = [float(w) for w in kwargs["loss_weights"]]
        resolved = {"prompt": self._prompt, "tokens": self.tokens, "eos": self.eos, "layer_names": self.layer_names,
                    "rows": None if self.rows is None else [[list(t), e] for t, e in self.rows]}
        return {"method": "regulation", "kwargs": kwargs, "resolved": resolved}

    @classmethod
    def from_settings(cls, settings: dict, *, generator: Optional[torch.Generator] = None) -> "AttentionRegulation":
        """The controller :meth:`settings` describes (apply it to the same prompt)."""
        return cls(**settings["kwargs"], generator=generator)

    # ------------------------------------------------------------------ Controller interface
    def reset(self) -> None:
        self._maps = {}

    def begin_generation(self, generation) -> None:
        n = generation.steps
        if n is not None and self.edit_steps > n:
            raise ValueError(f"edit_steps: {self.edit_steps} edited steps but this run has only {n} UNet "
                             "evaluations (denoising-loop turns, after img2img's strength cut); lower edit_steps "
                             "or raise the number of steps")
        rows = self._rows_for(generation)
        if rows != self.rows:
            self._states = {}    # per-layer state belongs to one token layout
        self.rows = rows

    def _rows_for(self, gen) -> Optional[list]:
        """(tokens, eos) of every conditional row of this generation; None: apply()'s for all rows."""
        if gen.prompts is not None and self._tokenizer is not None:
            if gen.prompt_2 is not None and gen.prompt_2 != gen.prompts:
                raise ValueError("prompt_2: the targets are resolved in `prompt`; a different `prompt_2` puts other "
                                 "words at those key columns for the second text encoder. Give prompt_2=None")
            rows = [self._resolve(p) for p in gen.prompts]
            return None if all(r == rows[0] for r in rows) and rows[0] == (self.tokens, self.eos) else rows
        if gen.prompt_embeds is not None:
            self._check_embeds(gen.prompt_embeds)
        return None

    def _resolve(self, prompt) -> tuple:
        hit = self._resolved.get(prompt)
        if hit is None:
            from ...integration.tokens import eos_index, token_indices

            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected strings, got {type(prompt).__name__}")
            tokens = (token_indices(self._tokenizer, prompt, self.targets, subtokens=self.subtokens)
                      if self.targets is not None else list(self.token_indices))
            eos = eos_index(self._tokenizer, prompt)
            self._check_tokens(tokens, eos, prompt)
            hit = self._resolved[prompt] = (tokens, eos)
            if len(self._resolved) > 256:       # prompts of a long batch job: keep the table small
                self._resolved.pop(next(iter(self._resolved)))
        return hit

    def _check_embeds(self, embeds) -> None:
        """A call that gives prompt_embeds instead of prompts: they must be apply()'s prompt's."""
        if self._prompt is None and self.targets is None:
            return                   # key indices given directly: nothing to resolve
        self._embeds_check(embeds, f"the target columns of {self.targets}")

    def graph_key(self, step: int):
        # step 0 seeds the carried θ_best with θ0 (one extra copy): its own Python path
        return (step < self.edit_steps, step == 0)

    def attention(self, call: CrossAttentionCall) -> Optional[Tensor]:
        if not self._is_selected(call.name):
            return None
        self.check_call(call)
        if not self.fused:
            return self._reference_call(call)
        if call.step >= self.edit_steps:
            return self._attend(call, None) if self.record_maps else None
        return self._fused_call(call)

    def check_call(self, call: CrossAttentionCall) -> None:
        """What a selected layer call needs: resolved targets, the layer's grid, no map recording
        under CUDA-graph capture."""
        if self.rows is None and (self.tokens is None or (self.eos is None and not self.renormalize)):
            raise ValueError("targets: not resolved to key indices yet; install the controller with "
                             "ctrl.apply(pipe, prompt=...) (or construct it with token_indices= and eos_index=)")
        if self.record_maps and call.q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("record_maps=True copies maps every step and cannot run under CUDA-graph "
                               "capture; use cuda_graphs=False to record maps")
        if call.grid is None:
            raise ValueError(f"layer {call.name}: the controller needs the feature-map grid (h, w) of "
                             f"M = {call.q.shape[2]} pixels, which the step tracker could not determine")

    # ------------------------------------------------------------------ the two paths
    def _fused_call(self, call: CrossAttentionCall) -> Tensor:
        """θ0 draw, then 3 launches: the inner loop (Triton: logits + 20 iterations on-chip), the
        best-iterate choice with the across-steps blend written straight into the offset's θ, and
        the edited attention through region_attention. No host synchronisation."""
        st, _ = self.optimise(call)
        with value_checks(False):   # θ_eff is ours: reading it back for NaNs would sync the host per call
            return self._attend(call, st.offset)

    def optimise(self, call: CrossAttentionCall) -> tuple[_LayerState, int]:
        """This step's inner loop on the call's conditional rows (2 launches after the θ0 draw):
        θ_eff is written in place into the layer state's offsets (``offset`` over the whole batch,
        ``cond_offset`` over the conditional rows, which start at the returned row index). The
        edited attention is then the caller's: AttentionRegulation's own region 0, or the prompt
        region of a composed method (:func:`stattn.compose`)."""
        from .core import inner_loop_blend

        st, c0 = self._state(call)
        q, k = call.q, call.k
        theta0 = self._theta0(st, q.shape[0] - c0, q.device)
        if call.step == 0:  # the release's "S_best(−1)" at step 0 is this call's S(θ0)
            st.theta_prev.copy_(theta0)
        kc = k[c0:, 0]
        if st.key_order is not None:   # rows of different prompts: every row's targets at row 0's columns
            from .core import permute_keys

            kc = permute_keys(kc, st.key_order)
        inner_loop_blend(q[c0:], kc, st.tokens, theta0, st.basis, st.theta_prev, _step_tensor(call),
                         scale=call.scale, iters=self.iters, lr=self.lr, quantile=self.quantile,
                         loss_weights=self.loss_weights, thr=self.thr, decay=self.decay,
                         w_prev=self.prev_weight, out=st.theta_full[c0:])
        return st, c0

    def _theta0(self, st: _LayerState, Bc: int, device) -> Tensor:
        shape, dt = st.theta_prev.shape, st.theta_prev.dtype
        if self.init == "zeros":
            if st.theta_zero is None:
                st.theta_zero = torch.zeros(shape, dtype=dt, device=device)
            return st.theta_zero
        return rr.initial_theta(Bc, *shape[1:], init=self.init, generator=self.generator, device=device, dtype=dt)

    def _reference_call(self, call: CrossAttentionCall) -> Tensor:
        st, c0 = self._state(call)
        q = call.q
        Bc, H, T = q.shape[0] - c0, q.shape[1], st.tokens.numel()
        Ky, Kx = st.theta_prev.shape[-2:]
        tokens, eos = self._layout(Bc)
        theta0 = None
        if call.step < self.edit_steps:
            theta0 = rr.initial_theta(Bc, H, T, Ky, Kx, init=self.init, generator=self.generator,
                                      device=q.device, dtype=st.theta_prev.dtype)
        res = rr.reference_layer_call(
            q, call.k[:, 0], call.v[:, 0], step=call.step, theta0=theta0,
            theta_prev=st.ref_prev if call.step > 0 else None, tokens=tokens, eos=eos,
            grid=call.grid, scale=call.scale, cfg=c0 > 0, edit_steps=self.edit_steps, iters=self.iters,
            lr=self.lr, quantile=self.quantile, loss_weights=self.loss_weights, thr=self.thr, beta=self.beta,
            prev_weight=self.prev_weight, decay=self.decay, renormalize=self.renormalize)
        st.ref_prev = res.theta_best
        if self.record_maps:
            self._add_map(call, _take_columns(res.cond_probs, tokens).mean(1))
        return res.out

    # ------------------------------------------------------------------ state
    def _layout(self, Bc: int) -> tuple:
        """(tokens, eos) for ``Bc`` conditional rows: shared (T ints, an int) when every row has the
        same columns, else per row (Bc lists, Bc ints) — a batch of different prompts."""
        if self.rows is None:
            return list(self.tokens), self.eos
        if len(self.rows) != Bc:
            raise ValueError(f"prompt: the call has {len(self.rows)} conditional rows of prompts, but the layer got "
                             f"{Bc} conditional rows")
        if all(r == self.rows[0] for r in self.rows):
            return list(self.rows[0][0]), self.rows[0][1]
        return [list(t) for t, _ in self.rows], [e for _, e in self.rows]

    def _state(self, call: CrossAttentionCall) -> tuple[_LayerState, int]:
        q = call.q
        B, H, M, _ = q.shape
        c0 = self._cond_start(call)
        dt = ref.compute_dtype(q)
        key = (call.name, tuple(q.shape), q.device, dt, tuple(call.grid))
        st = self._states.get(key)
        if st is None:
            h, w = call.grid
            try:
                gy, gx = gaussian_basis(h, w, dtype=dt, device=q.device)
            except ValueError as e:
                raise ValueError(f"layers: layer {call.name} works on a {h}x{w} grid, too small for the "
                                 f"Gaussian basis ({e}); select other layers") from None
            N = call.k.shape[3]
            tokens, eos = self._layout(B - c0)
            per_row = isinstance(eos, list)
            rows_t, rows_e = (tokens, eos) if per_row else ([tokens] * (B - c0), [eos] * (B - c0))
            bad = sorted({t for r, e in zip(rows_t, rows_e) for t in r + ([e] if e is not None else []) if t >= N})
            if bad:
                raise ValueError(f"token_indices: {bad} out of range for the {N} text keys of layer {call.name}")
            from .core import key_order

            order = key_order(rows_t, N) if per_row else None
            shared = rows_t[0]
            tokens_t = torch.zeros(len(shared), dtype=torch.int64, device=q.device)
            for i, t in enumerate(shared):   # scalar fills, not a host-to-device copy
                tokens_t[i] = t
            order_t = None
            if order is not None:
                order_t = torch.tensor(order, dtype=torch.int64).to(q.device)
            T, Ky, Kx = len(shared), gy.shape[1], gx.shape[1]
            theta_full = torch.zeros(B, H, T, Ky, Kx, dtype=dt, device=q.device)
            # the uncond rows (θ = 0: plain attention whatever their columns) take the first cond row's
            full_t = [rows_t[0]] * c0 + rows_t
            pins = [() if self.renormalize else (0, e) for e in [rows_e[0]] * c0 + rows_e]
            offset, cond_offset = (
                (ScoreOffset(theta_full, full_t, (gy, gx), pinned=pins),
                 ScoreOffset(theta_full[c0:], rows_t, (gy, gx), pinned=pins[c0:])) if per_row else
                (ScoreOffset(theta_full, shared, (gy, gx), pinned=pins[0]),
                 ScoreOffset(theta_full[c0:], shared, (gy, gx), pinned=pins[0])))
            st = _LayerState((gy, gx), tokens_t, order_t,
                             torch.zeros(B - c0, H, T, Ky, Kx, dtype=dt, device=q.device), theta_full, offset,
                             cond_offset)
            self._states[key] = st
        return st, c0

    def _cond_start(self, call: CrossAttentionCall) -> int:
        return cond_start(call, self.cfg)

    def _is_selected(self, name: str) -> bool:
        hit = self._selected.get(name)
        if hit is None:
            hit = self._selected[name] = self._matches(name)
        return hit

    def _matches(self, name: str) -> bool:
        return self.layers == "all" or any(s in name for s in self.layers)

    def _check_tokens(self, tokens=None, eos=None, prompt: Optional[str] = None) -> None:
        """Targets must not be pinned columns (by default apply()'s tokens and EOS; a call's prompt's)."""
        if tokens is None:
            tokens, eos = self.tokens, self.eos
        if tokens is None:
            return
        pinned = set() if self.renormalize else {0, eos}
        clash = sorted(set(tokens) & pinned)
        if clash:
            where = f" of the prompt {prompt!r}" if prompt is not None else ""
            raise ValueError(f"token_indices: {clash} are pinned columns (SOS 0, first EOS {eos}){where} whose "
                             "edit the released rule overwrites; target prompt words, or use renormalize=True")

    # ------------------------------------------------------------------ maps
    # The maps are the target columns' probabilities as applied (the edited softmax there; pinning
    # touches only SOS and EOS), averaged over heads: the op's side output (return_probs), from the
    # pass that computes the layer's output.
    def _attend(self, call: CrossAttentionCall, offset: Optional[ScoreOffset]) -> Tensor:
        """The layer's output, edited by ``offset`` (over the whole batch) or plain, and with
        record_maps the conditional rows' maps from the same region_attention call."""
        if not self.record_maps:
            return region_attention(call.q, call.k, call.v, offset=offset, scale=call.scale)
        c0 = self._cond_start(call)
        out, P = region_attention(call.q, call.k, call.v, offset=offset, scale=call.scale,
                                  return_probs=self._map_columns(call.q.shape[0] - c0))
        self._add_map(call, self._target_maps(P[c0:]))
        return out

    def _record(self, call: CrossAttentionCall, cond_offset: Optional[ScoreOffset]) -> None:
        """Maps of a call whose output another method computes (:func:`stattn.compose`): one
        region_attention call on the conditional rows with ``cond_offset`` (or none)."""
        c0 = self._cond_start(call)
        _, P = region_attention(call.q[c0:], call.k[c0:], call.v[c0:], offset=cond_offset, scale=call.scale,
                                return_probs=self._map_columns(call.q.shape[0] - c0))
        self._add_map(call, self._target_maps(P))

    def _map_columns(self, Bc: int):
        """return_probs for the maps: the target columns when every row shares them, else all."""
        tokens, _ = self._layout(Bc)
        return list(tokens) if tokens and isinstance(tokens[0], int) else True

    def _target_maps(self, P: Tensor) -> Tensor:
        """[Bc, M, T] from the op's maps of the conditional rows (already at the targets when shared)."""
        tokens, _ = self._layout(P.shape[0])
        return P if tokens and isinstance(tokens[0], int) else _take_columns(P, tokens)

    def _add_map(self, call: CrossAttentionCall, P: Tensor) -> None:
        h, w = call.grid
        Bc, _, T = P.shape
        m = P.detach().float().transpose(1, 2).reshape(Bc, T, h, w)
        acc = self._maps.setdefault(call.step, {}).setdefault((h, w), [torch.zeros_like(m), 0])
        acc[0] += m
        acc[1] += 1

    @property
    def maps(self) -> list:
        """Per recorded step, a CPU tensor [images, T, h, w]: the target tokens' attention
        probabilities averaged over heads and over the edited layers (layers on smaller grids are
        bilinearly resized to the largest). Empty unless ``record_maps=True``."""
        out = []
        for step in sorted(self._maps):
            grids = self._maps[step]
            size = max(grids, key=lambda g: g[0] * g[1])
            total, count = 0, 0
            for (h, w), (s, n) in grids.items():
                if (h, w) != size:
                    s = torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False)
                total, count = total + s, count + n
            out.append((total / count).cpu())
        return out

    def __repr__(self) -> str:
        what = f"targets={self.targets}" if self.targets is not None else f"token_indices={self.token_indices}"
        return (f"AttentionRegulation({what}, tokens={self.tokens}, eos={self.eos}, layers={self.layers!r}, "
                f"edit_steps={self.edit_steps}, iters={self.iters}, fused={self.fused})")


# ---------------------------------------------------------------------- helpers
def _take_columns(P: Tensor, tokens) -> Tensor:
    """P [B, ..., N] at the target columns: shared (T ints) or per row (B lists) -> [B, ..., T]."""
    if tokens and isinstance(tokens[0], int):
        return P[..., list(tokens)]
    idx = torch.tensor(tokens, dtype=torch.int64, device=P.device)          # [B, T]
    return torch.take_along_dim(P, idx.view(idx.shape[0], *[1] * (P.dim() - 2), idx.shape[1]), dim=-1)


def _step_tensor(call: CrossAttentionCall) -> Tensor:
    if call.step_tensor is not None:
        return call.step_tensor
    return torch.full((), call.step, dtype=torch.int64, device=call.q.device)


def _tokenizer_of(x):
    tok = getattr(x, "tokenizer", None)
    if tok is None and hasattr(x, "pipe"):
        tok = getattr(x.pipe, "tokenizer", None)
    return tok


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a {'positive ' if positive else ''}finite float, got {value!r}")
    return float(value)


def _indices(name: str, values) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of ints, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name}: expected at least one target index, got none")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected key indices >= 1 (0 is the start token), got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: an index appears twice in {values!r}")
    return values


def _layers(layers):
    if layers == "all":
        return "all"
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or not layers or \
            not all(isinstance(s, str) and s for s in layers):
        raise ValueError(f"layers: expected 'all' or a non-empty list of name substrings, got {layers!r}")
    return tuple(layers)
