"""Drop-in diffusers attention processor running cross-attention through stattn's fused kernel.

``stattn.accelerate(pipe_or_unet, controller=None)`` puts :class:`StattnAttnProcessor` on every
cross-attention module (``attn2``) whose processor stattn reproduces exactly (:func:`exact_processors`:
the stock ``AttnProcessor2_0`` and ``AttnProcessor``, IP-Adapter's two processors through
:mod:`stattn.integration.ip_adapter`, and the Attend-and-Excite pipeline's ``AttendExciteAttnProcessor``
through :mod:`stattn.methods.attend_excite.stock`, its maps from the fused op); every other processor (sliced, fused QKV, xformers, Custom Diffusion,
a user's own class) stays in place, named in a :class:`NotAcceleratedWarning` and in :func:`status`.
A UNet forward pre-hook (a few identity checks) notices processors installed later
(``enable_attention_slicing``, ``fuse_qkv_projections``, ``set_attn_processor``, ``load_ip_adapter``,
a pipeline installing its own every call) and wraps those it reproduces, reporting the others.
:func:`restore` puts back what stattn replaced and is still installed.

The processor follows every convention of the stock processor it wraps (spatial/group norm,
``norm_cross``, qk norms, 4-D inputs, residual connection, ``rescale_output_factor``, the logit
scale each uses) and hands a call it does not accelerate (no context, an attention mask, another
batch size) to that stock processor, counted and warned once. The text keys/values are constant
over the denoising loop, so they are projected once per context and layer and reused while nothing
that determines them changes (:class:`_KVCache`). A plain host-bound CPU call (``HOST_BOUND_MACS``)
runs torch's SDPA, as the stock processor does, instead of stattn's op (counted in ``sdpa_calls``).
On the attention layers it leaves in place, the ``__call__`` of diffusers' processor classes gets its
signature cached (diffusers inspects it at every call; :mod:`stattn.integration.signatures`) until
:func:`restore`.
"""
from __future__ import annotations

import functools
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import pipeline_calls, signatures
from .control import Controller, CrossAttentionCall, StepTracker, layer_grid, project_kv
from ..ops import backend_choice, region_attention
from .signatures import fixed_signature

__all__ = ["StattnAttnProcessor", "Status", "NotAcceleratedWarning", "accelerate", "restore", "status",
           "exact_processors", "unet_of", "tracker_of", "HOST_BOUND_MACS"]

MAX_HEAD_DIM = 256
# A plain call (no controller output) on the CPU of at most this many multiply-adds per product
# (B * H * M * N * D) runs torch's SDPA, the call the stock processor makes, instead of stattn's op:
# inside a denoising step such a call costs more in cold code than it computes, and SDPA's code is
# warm from the self-attention layers, which run it too. Measured in the UNet (one thread, plain
# calls timed in place, alternating step by step): 0.16-1.6 M multiply-adds (the tiny test model, SD
# 1.5 at 64-128 px) 1.08-1.6x SDPA's time through the native op; 3.2 M 0.90-1.09x; 6.3 M and up
# 0.79-0.90x. 0 sends every call to the op; STATTN_BACKEND set to anything but auto does too.
HOST_BOUND_MACS = 1 << 22
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NotAcceleratedWarning(UserWarning):
    """Cross-attention that stattn leaves to another processor (named with the reason)."""


# ---------------------------------------------------------------------- what stattn reproduces
class _Exact(NamedTuple):
    scale: Callable         # (attn, head_dim) -> the logit scale this processor uses
    qk_norm: bool           # whether it applies attn.norm_q / attn.norm_k
    why: str
    wrapper: Callable       # (name, original, controller, tracker) -> stattn's processor
    module_check: Optional[Callable] = None   # attn -> why this module differs under this processor, or None


_EXACT: Optional[dict] = None


def exact_processors() -> dict:
    """The stock processor classes stattn replaces, by exact type (a subclass may override
    ``__call__``), with why the fused path equals each."""
    global _EXACT
    if _EXACT is None:
        from diffusers.models.attention_processor import (
            AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)

        from ..methods.attend_excite import stock as attend_excite
        from .ip_adapter import wrapper_class

        sdpa, classic = (lambda attn, d: d ** -0.5), (lambda attn, d: attn.scale)
        _EXACT = {
            AttnProcessor2_0: _Exact(
                sdpa, True, "F.scaled_dot_product_attention with its default scale head_dim ** -0.5 (attn.scale "
                "and the upcast flags unused), norm_q / norm_k applied; a mask goes to the stock processor",
                StattnAttnProcessor),
            AttnProcessor: _Exact(
                classic, False, "baddbmm(alpha=attn.scale), softmax, bmm: the same sum; upcast_attention / "
                "upcast_softmax change only fp16/bf16 rounding, which stattn's fp32 accumulation bounds; no "
                "norm_q / norm_k", StattnAttnProcessor),
            IPAdapterAttnProcessor2_0: _Exact(
                sdpa, False, "text SDPA plus each image-prompt branch's SDPA times its scale (and mask): one "
                "multi-region call with per-region key lengths (stattn.integration.ip_adapter); no norm_q / norm_k",
                wrapper_class(IPAdapterAttnProcessor2_0)),
            IPAdapterAttnProcessor: _Exact(
                classic, False, "the same sum with attn.scale and get_attention_scores' softmax "
                "(stattn.integration.ip_adapter); no norm_q / norm_k", wrapper_class(IPAdapterAttnProcessor)),
            attend_excite.processor_class(): _Exact(
                classic, False, "the Attend-and-Excite pipeline's plain softmax(q k^T attn.scale) v, its AttentionStore "
                "fed region 0's probabilities from the same fused call (return_probs) where it keeps them "
                "(stattn.methods.attend_excite.stock); no norms, residual or rescale on the module",
                attend_excite.StattnAttendExciteProcessor, attend_excite.module_reason),
        }
    return _EXACT


# why the others stay (diffusers' classes by name; anything else is a user's own processor)
_LEFT_REASONS = {
    "SlicedAttnProcessor": "sliced attention (enable_attention_slicing)",
    "SlicedAttnAddedKVProcessor": "sliced attention with added K/V projections",
    "FusedAttnProcessor2_0": "fused K/V projection (fuse_qkv_projections)",
    "XFormersAttnProcessor": "xformers attention",
    "AttnProcessorNPU": "NPU flash attention",
    "XLAFlashAttnProcessor2_0": "XLA flash attention",
    "CustomDiffusionAttnProcessor": "Custom Diffusion (its own K/V weights)",
    "CustomDiffusionAttnProcessor2_0": "Custom Diffusion (its own K/V weights)",
    "CustomDiffusionXFormersAttnProcessor": "Custom Diffusion (its own K/V weights)",
    "IPAdapterXFormersAttnProcessor": "IP-Adapter with xformers",
    "AttnAddedKVProcessor": "added K/V projections",
    "AttnAddedKVProcessor2_0": "added K/V projections",
    "XFormersAttnAddedKVProcessor": "added K/V projections with xformers",
}


def _class_reason(proc) -> str:
    cls = type(proc)
    if cls.__module__.startswith("diffusers.") and cls.__name__ in _LEFT_REASONS:
        return _LEFT_REASONS[cls.__name__]
    return "a processor stattn does not reproduce (its own __call__)"


def _exact_for(proc, original) -> Optional[_Exact]:
    """The registry entry by which ``proc`` reproduces ``original`` (None: it only delegates)."""
    exact = exact_processors().get(type(original))
    return exact if exact is not None and isinstance(proc, exact.wrapper) else None


def _why_not(attn, proc) -> Optional[str]:
    """None if stattn reproduces ``proc`` on this module exactly, else why not."""
    exact = exact_processors().get(type(proc))
    if exact is None:
        return _class_reason(proc)
    if getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
        return "no to_k / to_v projection"
    heads, inner, inner_kv = attn.heads, getattr(attn, "inner_dim", None), getattr(attn, "inner_kv_dim", None)
    if inner is None or inner != inner_kv or inner % heads:
        return "key/value heads differ from the query heads (kv_heads)"
    if inner // heads > MAX_HEAD_DIM:
        return f"head size {inner // heads} > {MAX_HEAD_DIM}"
    if not exact.qk_norm and (attn.norm_q is not None or attn.norm_k is not None):
        return f"{type(proc).__name__} ignores norm_q / norm_k"
    return exact.module_check(attn) if exact.module_check is not None else None


def _stock_of(proc):
    """The processor a stattn processor stands for (itself for any other)."""
    while isinstance(proc, StattnAttnProcessor):
        proc = proc.original
    return proc


# ---------------------------------------------------------------------- the K/V cache
# Module (re)registrations of these names on any module (PEFT wrapping / unwrapping to_k, a new
# norm) bump the epoch: a cached entry never survives one. PEFT's merge edits the base weight through
# `.data`, which no version counter sees; the layer is wrapped meanwhile, so the unwrap bumps it.
_EPOCH = [0]
_WATCHED_NAMES = frozenset({"to_k", "to_v", "norm_cross", "norm_k"})
_registration_hook = None


def _on_registration(module, name, submodule):
    if name in _WATCHED_NAMES:
        _EPOCH[0] += 1


def _watch_registrations() -> None:
    global _registration_hook
    if _registration_hook is None:
        _registration_hook = torch.nn.modules.module.register_module_module_registration_hook(_on_registration)


# modules whose output is a function of their own parameters / buffers only
_PLAIN = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GroupNorm)
_global_hooks = torch.nn.modules.module


def _kv_key(attn, context: torch.Tensor):
    """(key, tensors) of everything that determines this layer's K/V of ``context``, or None where
    that cannot be keyed cheaply (then K/V are projected at every call, as stock does):
    a to_k / to_v / norm that is not a plain module (PEFT LoRA layers and other wrappers: their
    output depends on adapter scales, merges and flags), forward hooks, torch.compile tracing,
    inference tensors (no version counter), gradients to the projections or the context."""
    if torch.compiler.is_compiling() or _global_hooks._global_forward_hooks or \
            _global_hooks._global_forward_pre_hooks:
        return None
    sub = attn._modules                     # (attribute access through nn.Module costs ~1 us each)
    mods = (sub.get("to_k"), sub.get("to_v"), sub.get("norm_cross"), sub.get("norm_k"))
    grad = torch.is_grad_enabled()
    tensors = [context]
    for m in mods:
        if m is None:
            continue
        if type(m) not in _PLAIN or m._forward_hooks or m._forward_pre_hooks or m._modules or \
                "forward" in m.__dict__:
            return None
        tensors += [t for t in m._parameters.values() if t is not None]
        tensors += [t for t in m._buffers.values() if t is not None]
    key = [_EPOCH[0], attn.heads, id(mods[0]), id(mods[1]), id(mods[2]), id(mods[3])]
    try:
        for t in tensors:
            if grad and t.requires_grad:
                return None
            # a dtype / device move gives a new storage: the entry pins the old one, so the pointer differs
            key += (id(t), t._version, t.data_ptr(), t.device, t.shape)
    except RuntimeError:            # an inference tensor: no version counter
        return None
    return tuple(key), tensors


class _KVCache:
    """K/V [B, 1, H, N, D] of the last context one layer saw. The key holds identities, version
    counters, storage pointers, devices and shapes of the context and of every projection tensor,
    the projection modules' identities and the registration epoch; the entry holds the context and
    aliases of the tensors, so that their memory (and ids) cannot be reused while it lives. Dtype /
    device moves, in-place edits (``copy_``, ``add_`` under no_grad, load_state_dict) and module
    swaps change the key. Not seen: in-place edits through ``.data`` of a plain layer's weight
    while it stays plain (PyTorch versions nothing there)."""

    def __init__(self):
        _watch_registrations()
        self.entry = None
        self.hits = 0

    def get(self, attn, context):
        keyed = _kv_key(attn, context)
        if keyed is None:
            self.entry = None
            return project_kv(attn, context)
        key, tensors = keyed
        e = self.entry
        if e is not None and e[0] == key:
            self.hits += 1
            return e[2], e[3]
        self.entry = None                      # release the old K/V before projecting the new
        k, v = project_kv(attn, context)
        self.entry = (key, [t.detach() for t in tensors], k, v)
        return k, v


def call_module(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``: m.forward(x) directly where ``nn.Module.__call__`` would do nothing else (no hooks of
    any kind, no ``module.compile()``, no TorchScript tracing), the same computation without its two
    Python frames (a few µs a call, several calls a layer); an ``nn.Dropout`` in eval mode is the
    identity its forward returns."""
    g = _global_hooks
    if m._compiled_call_impl is not None or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
            m._backward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks or \
            g._global_backward_hooks or g._global_backward_pre_hooks or torch._C._get_tracing_state():
        return m(x)
    if type(m) is torch.nn.Dropout and not m.training:
        return x
    return m.forward(x)


# ---------------------------------------------------------------------- the processor
_RESTORED = "restored"             # the accelerate state this processor belonged to was restored
_NOT_REPRODUCED = "not reproduced"  # built around a processor stattn does not reproduce


class _Counts:
    """Calls of the processors of one accelerate state (or of one standalone processor)."""

    def __init__(self):
        self.fused = 0
        self.stock = 0
        self.sdpa = 0
        self.warned: set = set()

    def stock_call(self, reason: str, proc: "StattnAttnProcessor") -> None:
        self.stock += 1
        if reason in (_RESTORED, _NOT_REPRODUCED) or reason in self.warned:
            return
        self.warned.add(reason)
        warnings.warn(f"stattn: cross-attention calls with {reason} run the stock {type(proc.original).__name__} "
                      f"(first: {proc.name}); counted in stattn.status(...).stock_calls",
                      NotAcceleratedWarning, stacklevel=4)


class StattnAttnProcessor:
    """Cross-attention through :func:`stattn.region_attention`, with an optional controller.

    ``original`` is the stock processor it stands for (default ``AttnProcessor2_0()``, so that
    ``type(proc)()`` works as diffusers' loaders expect); calls stattn does not accelerate, and every
    call when ``original`` is not in :func:`exact_processors`, go to it."""

    def __init__(self, name: Optional[str] = None, original=None, controller: Optional[Controller] = None,
                 tracker: Optional[StepTracker] = None):
        if original is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            original = AttnProcessor2_0()
        self.name = name
        self.original = original
        self.controller = controller
        self.tracker = tracker
        self.cache = _KVCache()
        self.counts = _Counts()
        self.owner = None          # (accelerate state, layer index) when installed by accelerate
        self._exact = _exact_for(self, original)

    def _stock_reason(self, hidden_states, context, attention_mask) -> Optional[str]:
        if self._exact is None:
            return _NOT_REPRODUCED
        if self.owner is not None and self.owner[0].closed:
            return _RESTORED
        if context is None:
            return "no encoder_hidden_states (self-attention)"
        if not isinstance(context, torch.Tensor):
            return f"encoder_hidden_states of type {type(context).__name__}"
        if attention_mask is not None:
            return "an attention mask"
        if hidden_states.shape[0] != context.shape[0]:
            return "encoder_hidden_states of another batch size"
        if hidden_states.dtype not in _DTYPES:
            return f"dtype {hidden_states.dtype}"
        return None

    @fixed_signature
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        why = self._stock_reason(hidden_states, encoder_hidden_states, attention_mask)
        if why is not None:
            self.counts.stock_call(why, self)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.counts.fused += 1
        return self._fused(attn, hidden_states, encoder_hidden_states, temb)

    def _fused(self, attn, hidden_states, context, temb):
        q, frame = self._query(attn, hidden_states, temb)
        k, v = self.cache.get(attn, context)              # norm_cross and norm_k applied
        q = _heads(q, attn.heads, k.shape[-1])
        if attn.norm_q is not None:                       # _why_not: only with processors that apply it
            q = attn.norm_q(q)
        scale = self._exact.scale(attn, q.shape[-1])
        out = self._controlled(attn, q, k, v, context, frame, scale)
        if out is None:
            out = self._plain(q, k, v, scale)
        return self._output(attn, out.to(q.dtype), frame)

    def _plain(self, q, k, v, scale):
        """Plain attention of q [B, H, M, D] over k, v [B, 1, H, N, D]: SDPA for a host-bound CPU call
        on the auto backend (HOST_BOUND_MACS), else stattn's op."""
        B, H, M, D = q.shape
        if B * H * M * k.shape[3] * D <= HOST_BOUND_MACS and q.device.type == "cpu" and \
                backend_choice() == "auto":
            self.counts.sdpa += 1
            return F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=scale)
        return region_attention(q, k, v, scale=scale)

    def _query(self, attn, hidden_states, temb):
        """to_q of the normalised hidden states [B, M, H * D], and what _output needs to undo."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            batch, channel, height, width = shape4
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return call_module(attn.to_q, hidden_states), (residual, shape4)

    def _controlled(self, attn, q, k, v, context, frame, scale):
        """The controller's output for this call (None: plain attention, or no controller)."""
        if self.controller is None:
            return None
        t, shape4, M = self.tracker, frame[1], q.shape[2]
        grid = layer_grid(t.latent_hw if t else None, M) if shape4 is None else tuple(shape4[2:])
        call = CrossAttentionCall(self.name, attn, q, k, v, context, grid,
                                  t.step if t else -1, t.timestep if t else None, scale,
                                  t.step_tensor if t else None, t.generation if t else None)
        return self.controller.attention(call)

    @staticmethod
    def _output(attn, out, frame):
        """out [B, H, M, D] -> to_out, back to 4-D, residual, rescale: the stock processors' tail."""
        residual, shape4 = frame
        B, H, M, D = out.shape
        hidden_states = out.transpose(1, 2).reshape(B, M, H * D)  # a view: the op writes [B, M, H, D] order
        to_out = attn.to_out
        hidden_states = call_module(to_out[1], call_module(to_out[0], hidden_states))
        if shape4 is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, M, H * D] -> [B, H, M, D], a view: the op reads q with its strides (and returns dq in this
    [B, M, H, D] order)."""
    B, M, _ = x.shape
    return x.view(B, M, heads, head_dim).transpose(1, 2)


# ---------------------------------------------------------------------- accelerate state
@dataclass
class Status:
    """What stattn runs on one UNet (:func:`status`)."""

    accelerated: list = field(default_factory=list)   # layer names running stattn's processor
    left: dict = field(default_factory=dict)          # layer name -> "ProcessorClass: why it is left"
    fused_calls: int = 0      # calls that ran stattn's fused path since accelerate
    stock_calls: int = 0      # calls of accelerated layers handed to their stock processor (e.g. a mask)
    controller: Optional[Controller] = None
    sdpa_calls: int = 0       # of fused_calls, plain host-bound ones whose attention ran SDPA (HOST_BOUND_MACS)


class _State:
    """What :func:`accelerate` did to one UNet. Its forward pre-hook (:meth:`check`) compares the
    processor of every attention module with the one seen last (identity: ~0.1 us a layer) and, on a
    change, wraps what stattn reproduces on cross-attention and records and warns about the rest
    (:meth:`sync`), and caches the call signature of the stock processors of the other layers
    (self-attention: :mod:`stattn.integration.signatures`)."""

    def __init__(self, unet, layers, others, controller, tracker):
        self.unet = unet
        self.names = [n for n, _ in layers]
        self.modules = [m for _, m in layers]
        self.seen = [None] * len(layers)
        self.others = others                # the other attention modules (self-attention)
        self.others_seen = [None] * len(others)
        self.held: set = set()              # the processor functions given a signature (signatures.hold)
        # released by restore, or when the UNet is collected without one
        self.release = weakref.finalize(unet, signatures.release, self.held)
        self.left: dict = {}
        self.controller, self.tracker, self.pipe = controller, tracker, None
        self.attend_excite = None  # the Attend-and-Excite pipeline whose self-attention registration is patched
        self.counts = _Counts()
        self.revision = 0          # bumped at every processor change noticed
        self.closed = False
        self.handles: list = []
        self._warned = frozenset()

    def owns(self, proc, index: int) -> bool:
        return isinstance(proc, StattnAttnProcessor) and proc.owner is not None and \
            proc.owner[0] is self and proc.owner[1] == index

    def check(self, module=None, args=None) -> None:
        if torch.compiler.is_compiling():
            return          # status() / restore() still sync; compiled graphs guard on the processors
        for attn, last in zip(self.modules, self.seen):
            if _processor(attn) is not last:
                self.sync()
                return
        for attn, last in zip(self.others, self.others_seen):
            if _processor(attn) is not last:
                self.hold_signatures()
                return

    def hold_signatures(self) -> None:
        for i, attn in enumerate(self.others):
            proc = self.others_seen[i] = _processor(attn)
            signatures.hold(proc, self.held)

    def sync(self) -> None:
        changed = False
        for i, (name, attn) in enumerate(zip(self.names, self.modules)):
            proc = attn.processor
            if proc is self.seen[i]:
                continue
            changed = True
            if not self.owns(proc, i):
                stock = _stock_of(proc)
                why = _why_not(attn, stock)
                if why is None:
                    attn.set_processor(self._wrap(i, stock))
                else:
                    if stock is not proc:      # another state's processor: what it stands for
                        attn.set_processor(stock)
                    self.left[name] = f"{type(stock).__name__}: {why}"
            if self.owns(attn.processor, i):
                self.left.pop(name, None)
            self.seen[i] = attn.processor
        if changed:
            self.revision += 1
            self._warn_left()
        self.hold_signatures()

    def _wrap(self, index: int, stock) -> StattnAttnProcessor:
        make = exact_processors()[type(stock)].wrapper
        proc = make(self.names[index], stock, self.controller, self.tracker)
        proc.counts, proc.owner = self.counts, (self, index)
        return proc

    def _warn_left(self) -> None:
        now = frozenset(self.left.items())
        new, self._warned = now - self._warned, now
        if new:
            warnings.warn(_left_message(dict(new), len(self.names)), NotAcceleratedWarning, stacklevel=4)

    def unwrap(self) -> None:
        """Put back the stock processor of every layer stattn's processor still runs."""
        for i, attn in enumerate(self.modules):
            if self.owns(attn.processor, i):
                attn.set_processor(attn.processor.original)

    def status(self) -> Status:
        self.sync()
        return Status([n for n in self.names if n not in self.left], dict(self.left), self.counts.fused,
                      self.counts.stock, self.controller, self.counts.sdpa)


def _processor(attn):
    """attn.processor, read directly (~0.1 us, not ~1 us): a plain processor is an attribute, an
    nn.Module one a submodule."""
    d = attn.__dict__
    proc = d.get("processor")
    return d["_modules"].get("processor") if proc is None else proc


def _left_message(left: dict, total: int) -> str:
    groups: dict = {}
    for name, reason in sorted(left.items()):
        groups.setdefault(reason, []).append(name)
    parts = []
    for reason, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{reason} ({shown})")
    return (f"stattn: {len(left)} of {total} cross-attention layers keep their processor and are not "
            f"accelerated: " + "; ".join(parts) + ". See stattn.status(...).left")


def _attention_layers(unet) -> tuple[list, list]:
    """([(name, module)] of the cross-attention modules, [module] of the other attention modules)."""
    cross, others = [], []
    for name, m in unet.named_modules():
        if hasattr(m, "processor"):
            if getattr(m, "is_cross_attention", False):
                cross.append((name, m))
            else:
                others.append(m)
    return cross, others


def _unwrap_compiled(module):
    """The module a torch.compile'd one (OptimizedModule) wraps."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def unet_of(pipe_or_unet) -> torch.nn.Module:
    """The UNet of a pipeline / Runner / UNet, through torch.compile's wrapper."""
    unet = _unwrap_compiled(getattr(pipe_or_unet, "unet", pipe_or_unet))
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"expected a diffusers pipeline or UNet, got {type(pipe_or_unet).__name__}")
    return unet


def _state_of(unet) -> Optional[_State]:
    return unet.__dict__.get("_stattn")


def _pipeline_of(x):
    """The diffusers pipeline to hook for generation boundaries: ``x`` itself, a Runner's pipe, or
    None for a bare UNet."""
    pipe = getattr(x, "pipe", x)              # stattn.Runner keeps its pipeline as .pipe
    if _unwrap_compiled(pipe) is unet_of(x) or not hasattr(pipe, "unet"):
        return None
    return pipe


def _set_default_attn_processor(state: _State) -> None:
    """``unet.set_default_attn_processor()`` on an accelerated UNet. diffusers checks every
    processor's class against its stock lists (ADDED_KV / CROSS_ATTENTION_PROCESSORS), so the check
    runs on the processors stattn stands for; the default it installs is then taken over as any other."""
    state.unwrap()
    try:
        type(state.unet).set_default_attn_processor(state.unet)
    finally:
        state.sync()


def accelerate(pipe_or_unet, controller: Optional[Controller] = None):
    """Put the fused cross-attention processor on every ``attn2`` (cross-attention) module whose
    processor stattn reproduces exactly; warn (:class:`NotAcceleratedWarning`) naming the others,
    which stay as they are (:func:`status`). Raises ValueError when there is none to accelerate.

    With a controller, a UNet pre-hook tracks the step and latent size and the controller sees
    every accelerated call; given a pipeline (or a Runner), its calls are hooked so that every call
    starts a new generation (:mod:`stattn.integration.pipeline_calls`). Calling again replaces the controller;
    :func:`restore` undoes everything. Returns the pipeline or UNet it was given.

    The other attention layers (self-attention) keep their processors; where one is of a diffusers
    class, the signature diffusers' ``Attention.forward`` inspects at every call is set on its
    class's ``__call__`` while accelerated (the same answer, ~5 µs instead of ~15-25 µs;
    :mod:`stattn.integration.signatures`), also for processors installed there later.

    diffusers' ``StableDiffusionAttendAndExcitePipeline`` installs its own processors at every call:
    on cross-attention they are wrapped as any other (its AttentionStore then gets the fused op's
    maps); given the pipeline itself, its self-attention layers run SDPA during its calls too
    (:mod:`stattn.methods.attend_excite.stock`)."""
    unet = unet_of(pipe_or_unet)
    layers, others = _attention_layers(unet)
    if not layers:
        raise ValueError("accelerate: this UNet has no cross-attention module to accelerate")
    reasons = {name: _why_not(m, _stock_of(m.processor)) for name, m in layers}
    if all(r is not None for r in reasons.values()):
        left = {n: f"{type(_stock_of(m.processor)).__name__}: {reasons[n]}" for n, m in layers}
        raise ValueError("accelerate: no cross-attention layer runs a processor stattn reproduces exactly ("
                         + _left_message(left, len(layers)).split(": ", 1)[1] + "); install the default "
                         "processors first, e.g. unet.set_default_attn_processor()")
    restore(unet)
    tracker = StepTracker(controller) if controller is not None else None
    state = _State(unet, layers, others, controller, tracker)
    state.sync()
    # the watcher first: the processors settle before the tracker and the layers run
    state.handles.append(unet.register_forward_pre_hook(state.check))
    if tracker is not None:
        state.handles.append(unet.register_forward_pre_hook(tracker, with_kwargs=True))
        state.pipe = _pipeline_of(pipe_or_unet)
        if state.pipe is not None:
            pipeline_calls.attach(state.pipe, tracker)
    if callable(getattr(type(unet), "set_default_attn_processor", None)):
        object.__setattr__(unet, "set_default_attn_processor", functools.partial(_set_default_attn_processor, state))
    pipe = _pipeline_of(pipe_or_unet)
    if pipe is not None and "diffusers.pipelines.deprecated" in sys.modules:
        from ..methods.attend_excite import stock as attend_excite

        if attend_excite.is_pipeline(pipe):          # SDPA on its self-attention layers too, at every call
            attend_excite.attach(pipe)
            state.attend_excite = pipe
    unet._stattn = state
    return pipe_or_unet


def restore(pipe_or_unet):
    """Put back the processors :func:`accelerate` replaced where stattn's still run (a processor
    installed since stays), and remove its hooks."""
    unet = unet_of(pipe_or_unet)
    state = _state_of(unet)
    if state is None:
        return pipe_or_unet
    state.unwrap()
    state.release()
    # fuse_qkv_projections keeps the processors it replaced, to put them back on unfuse
    kept = unet.__dict__.get("original_attn_processors")
    if isinstance(kept, dict):
        for key, proc in kept.items():
            if isinstance(proc, StattnAttnProcessor) and proc.owner is not None and proc.owner[0] is state:
                kept[key] = proc.original
    for handle in state.handles:
        handle.remove()
    if state.pipe is not None:
        pipeline_calls.detach(state.pipe, state.tracker)
    if state.attend_excite is not None:
        from ..methods.attend_excite import stock as attend_excite

        attend_excite.detach(state.attend_excite)
    patched = unet.__dict__.get("set_default_attn_processor")
    if isinstance(patched, functools.partial) and patched.func is _set_default_attn_processor:
        del unet.__dict__["set_default_attn_processor"]
    state.closed = True        # its processors, if installed again, behave as their stock ones
    del unet._stattn
    return pipe_or_unet


def status(pipe_or_unet) -> Optional[Status]:
    """What stattn accelerates on this pipeline's UNet now (processor changes since the last UNet
    call included), or None when it is not accelerated."""
    state = _state_of(unet_of(pipe_or_unet))
    return state.status() if state is not None else None


def tracker_of(pipe_or_unet) -> Optional[StepTracker]:
    state = _state_of(unet_of(pipe_or_unet))
    return state.tracker if state is not None else None
