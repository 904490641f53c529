"""A minimal Stable Diffusion runner: the denoising loop and nothing else, measured.

:class:`Runner` wraps the components of a diffusers SD 1.x / 2.x / SDXL pipeline (UNet, VAE, text
encoder(s), tokenizer(s), scheduler) and reuses the pipeline's own code for everything that is not
the loop (prompt encoding, latent preparation, SDXL time ids, image post-processing), so its
images equal the stock pipeline's. What it adds:

- prompts are encoded once (cached per prompt and settings), and the fused cross-attention processor
  (:func:`stattn.accelerate`) projects the constant text K/V once per layer instead of every step;
- controllers (Attention Regulation, spatial-temporal control, yours) plug in through
  ``stattn.accelerate(runner, controller=...)`` exactly as they do on a stock pipeline;
- an optional CUDA-graph mode (``cuda_graphs=True``): one UNet evaluation captured per latent shape
  and controller ``graph_key`` and replayed from static buffers;
- per-step wall time (CUDA events on a GPU), and on request a ``torch.profiler`` Chrome trace, a
  per-op table and NVTX / profiler ranges per UNet block.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .control import Generation, prompt_rows as _prompt_rows
from .processors import accelerate as _accelerate, tracker_of

__all__ = ["Runner", "RunResult"]


@dataclass
class RunResult:
    images: Any                       # list of PIL images, or a tensor / array per `output_type`
    latents: torch.Tensor             # final latents [B, C, h, w] (before VAE decode)
    step_ms: list                     # wall time of each denoising step (UNet + CFG + scheduler)
    total_ms: float                   # the whole call: encoding, loop, decode
    trace: Optional[str] = None       # Chrome trace path when profiled
    table: Optional[str] = None       # per-op profiler table when profiled
    settings: dict = field(default_factory=dict)

    def report(self) -> dict:
        """Timings and settings as a JSON-able dict."""
        steps = sorted(self.step_ms)
        med = steps[len(steps) // 2] if steps else None
        return {"total_ms": self.total_ms, "step_ms": self.step_ms, "step_ms_median": med,
                "trace": self.trace, "settings": self.settings}


@dataclass
class _Conditioning:
    context: torch.Tensor             # encoder_hidden_states, [uncond; cond] under CFG
    added: Optional[dict]             # SDXL added_cond_kwargs
    batch: int                        # images (rows of one CFG half)


class Runner:
    """The denoising loop of a diffusers SD / SDXL pipeline, lean and measured.

    ``Runner(pipe)`` takes any loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
    (or compatible); :meth:`from_pretrained` loads a model directory (or ``"tiny"``)."""

    def __init__(self, pipe, *, cuda_graphs: bool = False, accelerate: bool = True):
        for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
            if getattr(pipe, part, None) is None and not (part == "text_encoder" and _is_xl(pipe)):
                raise ValueError(f"pipe: expected a Stable Diffusion pipeline with a {part}, "
                                 f"got {type(pipe).__name__} without one")
        self.pipe = pipe
        self.unet = pipe.unet
        self.scheduler = pipe.scheduler
        self.cuda_graphs = bool(cuda_graphs)
        self._cond_cache: dict = {}
        self._graphs = _GraphCache()
        if accelerate:
            _accelerate(self.unet)

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], *, dtype=None, torch_dtype=None, device=None,
                        scheduler=None, cuda_graphs: bool = False, accelerate: bool = True) -> "Runner":
        """Load a diffusers model directory (SD 1.x, 2.x, SDXL) or a name ``stattn.models.resolve``
        accepts (``"tiny"``, ``"tiny-sdxl"``, ``"full:sd15"`` ...)."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one of them")
        from . import models

        dtype = dtype if dtype is not None else torch_dtype
        kw = {"device": device, "scheduler": scheduler}
        if dtype is not None:
            kw["dtype"] = dtype
        return cls(models.resolve(str(model), **kw), cuda_graphs=cuda_graphs, accelerate=accelerate)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_xl(self) -> bool:
        return _is_xl(self.pipe)

    @property
    def controller(self):
        t = tracker_of(self.unet)
        return t.controller if t is not None else None

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompt, negative_prompt=None, num_images: int = 1, cfg: bool = True,
               height: Optional[int] = None, width: Optional[int] = None) -> _Conditioning:
        """Text conditioning through the pipeline's own ``encode_prompt``, cached per arguments
        (the same tensors are returned again, so the processors' K/V cache hits)."""
        key = (_hashable(prompt), _hashable(negative_prompt), num_images, cfg, height, width)
        hit = self._cond_cache.get(key)
        if hit is not None:
            return hit
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images
        with torch.no_grad():
            if self.is_xl:
                cond = self._encode_xl(prompt, negative_prompt, num_images, cfg, height, width)
            else:
                pe, ne = self.pipe.encode_prompt(prompt, self.device, num_images, cfg, negative_prompt)
                cond = _Conditioning(torch.cat([ne, pe]) if cfg else pe, None, batch)
        self._cond_cache = {key: cond}  # keep one: a new prompt frees the old tensors
        return cond

    def _encode_xl(self, prompt, negative_prompt, num_images, cfg, height, width) -> _Conditioning:
        pe, ne, ppe, npe = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
        proj = (int(ppe.shape[-1]) if self.pipe.text_encoder_2 is None
                else self.pipe.text_encoder_2.config.projection_dim)
        size = (height, width)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype,
                                               text_encoder_projection_dim=proj)
        if cfg:
            pe, ppe, time_ids = torch.cat([ne, pe]), torch.cat([npe, ppe]), torch.cat([time_ids, time_ids])
        batch = pe.shape[0] // (2 if cfg else 1)
        time_ids = time_ids.to(self.device).repeat(batch, 1)
        return _Conditioning(pe, {"text_embeds": ppe.to(self.device), "time_ids": time_ids}, batch)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(self, prompt: Union[str, list], *, negative_prompt=None, steps: int = 50,
                 guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0, height: Optional[int] = None,
                 width: Optional[int] = None, num_images: int = 1, generator=None, seed: Optional[int] = None,
                 latents: Optional[torch.Tensor] = None, eta: float = 0.0, output_type: str = "pil",
                 progress: bool = False, profile: Union[None, str, Path] = None, callback=None) -> RunResult:
        """Generate images. ``seed`` builds a generator on the runner's device when no ``generator``
        (a ``torch.Generator`` or a list, one per image) is given. ``profile=DIR`` writes a Chrome
        trace (``DIR/trace.json``) and a per-op table (``DIR/ops.txt``). ``callback(i, t, latents)``
        runs after every step. ``guidance_scale`` defaults as in the stock pipelines: 7.5 (SD), 5 (SDXL)."""
        if guidance_scale is None:
            guidance_scale = 5.0 if self.is_xl else 7.5
        height, width = self._check_call(prompt, steps, height, width, num_images, output_type,
                                         guidance_scale, generator, seed)
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(int(seed))
        t_start = time.perf_counter()
        with _profiling(profile, self.unet) as prof:
            result = self._generate(prompt, negative_prompt, steps, guidance_scale, guidance_rescale,
                                    height, width, num_images, generator, latents, eta, output_type,
                                    progress, callback)
        result.total_ms = (time.perf_counter() - t_start) * 1e3
        if prof is not None:
            result.trace, result.table = prof.trace, prof.table
        result.settings = self._settings(prompt, negative_prompt, steps, guidance_scale, height, width,
                                         num_images, seed, output_type)
        return result

    def _check_call(self, prompt, steps, height, width, num_images, output_type, guidance_scale,
                    generator, seed):
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and prompt
                                                and all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images: expected a positive integer, got {num_images!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: expected 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        multiple = self.pipe.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        size = self.default_size()
        height = size if height is None else height
        width = size if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % multiple:
                raise ValueError(f"{name}: expected a positive multiple of {multiple} for this model "
                                 f"(VAE factor x UNet downsampling), got {v!r}")
        return height, width

    def _generate(self, prompt, negative_prompt, steps, guidance_scale, guidance_rescale, height, width,
                  num_images, generator, latents, eta, output_type, progress, callback) -> RunResult:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg, retrieve_timesteps)

        pipe, unet, device = self.pipe, self.unet, self.device
        cfg = guidance_scale > 1.0
        cond = self.encode(prompt, negative_prompt, num_images, cfg, height, width)
        timesteps, steps = retrieve_timesteps(self.scheduler, steps, device)
        latents = pipe.prepare_latents(cond.batch, unet.config.in_channels, height, width,
                                       cond.context.dtype, device, generator, latents)
        extra = pipe.prepare_extra_step_kwargs(generator, eta)
        tracker = tracker_of(unet)
        if tracker is not None:
            tracker.driven = True
            tracker.begin_generation(Generation(
                cfg=cfg, prompts=_prompt_rows(prompt, num_images), steps=len(timesteps), timesteps=timesteps,
                batch=cond.context.shape[0], source="runner", pipeline=pipe))
        step_fn = self._graphs.step if self.cuda_graphs else _eager_unet
        timer = _StepTimer(device)
        bar = pipe.progress_bar(total=len(timesteps)) if progress else contextlib.nullcontext()
        try:
            with bar:
                for i, t in enumerate(timesteps):
                    timer.start()
                    model_in = torch.cat([latents] * 2) if cfg else latents
                    model_in = self.scheduler.scale_model_input(model_in, t)
                    if tracker is not None:
                        tracker.latent_hw = tuple(model_in.shape[-2:])
                        tracker.set_step(i, t, device)
                    key = tracker.controller.graph_key(i) if tracker is not None and tracker.controller else None
                    noise = step_fn(unet, model_in, t, cond, key)
                    if cfg:
                        uncond, text = noise.chunk(2)
                        noise = uncond + guidance_scale * (text - uncond)
                        if guidance_rescale > 0:
                            noise = rescale_noise_cfg(noise, text, guidance_rescale=guidance_rescale)
                    latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                    timer.stop()
                    if callback is not None:
                        callback(i, t, latents)
                    if progress:
                        bar.update()
        finally:
            if tracker is not None:
                tracker.driven = False
        images = self._decode(latents, output_type)
        return RunResult(images=images, latents=latents, step_ms=timer.elapsed_ms(), total_ms=0.0)

    def _decode(self, latents, output_type):
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            z = latents * std / cfg.scaling_factor + mean
        else:
            z = latents / cfg.scaling_factor
        if upcast:  # the fp16 SDXL VAE overflows: decode in fp32 as the stock pipeline does
            vae.to(torch.float32)
        try:
            image = vae.decode(z.to(dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    def _settings(self, prompt, negative_prompt, steps, guidance_scale, height, width, num_images, seed,
                  output_type) -> dict:
        import diffusers

        from . import __version__

        ctrl = self.controller
        return {
            "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
            "guidance_scale": guidance_scale, "height": height, "width": width,
            "num_images": num_images, "seed": seed, "output_type": output_type,
            "scheduler": type(self.scheduler).__name__, "model": type(self.pipe).__name__,
            "dtype": str(self.dtype).replace("torch.", ""), "device": _device_name(self.device),
            "cuda_graphs": self.cuda_graphs, "controller": type(ctrl).__name__ if ctrl else None,
            "accelerated": hasattr(self.unet, "_stattn"),
            "versions": {"stattn": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
        }


# ---------------------------------------------------------------------- UNet evaluation
def _eager_unet(unet, model_in, t, cond: _Conditioning, key=None):
    return unet(model_in, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added,
                return_dict=False)[0]


class _GraphCache:
    """CUDA graphs of one UNet evaluation for the current conditioning and controller, per (input
    shape, dtype, controller ``graph_key``).

    The first step with a new key runs eagerly (the warm-up: Triton compiles, cuBLAS workspaces,
    controller state, all on real data); the next one captures, then every later step replays.
    Inputs are copied into static buffers. The processors' K/V of the conditioning and the
    controller's Python path are baked into a graph, so a new conditioning or controller drops
    the graphs (the objects are held, so their ids cannot be reused meanwhile)."""

    def __init__(self):
        self.owner = None     # (conditioning, accelerate state) the graphs belong to
        self.entries: dict = {}
        self.warm: set = set()
        self.pool = None

    def step(self, unet, model_in, t, cond: _Conditioning, key):
        if not model_in.is_cuda:
            raise RuntimeError("cuda_graphs=True needs the model on a CUDA device")
        owner = (cond, getattr(unet, "_stattn", None))
        if self.owner is None or any(a is not b for a, b in zip(owner, self.owner)):
            self.owner, self.entries, self.warm = owner, {}, set()
        full_key = (tuple(model_in.shape), model_in.dtype, key)
        entry = self.entries.get(full_key)
        if entry is None:
            if full_key not in self.warm:
                self.warm.add(full_key)
                return _eager_unet(unet, model_in, t, cond)
            entry = self.entries[full_key] = self._capture(unet, model_in, t, cond)
        graph, static_in, static_t, static_out = entry
        static_in.copy_(model_in)
        static_t.copy_(_as_tensor(t, static_t))
        graph.replay()
        return static_out.clone()  # graphs share a pool: the output may be reused by another graph

    def _capture(self, unet, model_in, t, cond):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_in = model_in.clone()
        static_t = _as_tensor(t, None).to(model_in.device).clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = _eager_unet(unet, static_in, static_t, cond)
        return graph, static_in, static_t, static_out


def _as_tensor(t, like):
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t)
    return t.to(like.dtype) if like is not None else t


class _StepTimer:
    """Per-step wall time: CUDA events on a GPU (read once at the end: no sync inside the loop),
    perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append([e, None])
        else:
            self.marks.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[-1][1] = e
        else:
            self.marks[-1][1] = time.perf_counter()

    def elapsed_ms(self) -> list:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


# ---------------------------------------------------------------------- profiling
class _Profile:
    trace: Optional[str] = None
    table: Optional[str] = None


@contextlib.contextmanager
def _profiling(out_dir, unet):
    """torch.profiler around the call, with a named range per UNet block and per stattn kernel
    launch (profiler + NVTX on CUDA)."""
    if out_dir is None:
        yield None
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if unet.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    handles = _block_ranges(unet)
    result = _Profile()
    from stattn.kernels import launch

    launch.RANGES = True
    try:
        with torch.profiler.profile(activities=acts) as prof:
            yield result
        result.trace = str(out / "trace.json")
        prof.export_chrome_trace(result.trace)
        sort = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
        result.table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (out / "ops.txt").write_text(result.table)
    finally:
        launch.RANGES = False
        for h in handles:
            h.remove()


def _block_ranges(unet) -> list:
    """Forward hooks opening a profiler range (and an NVTX range on CUDA) per UNet block."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    nvtx = unet.device.type == "cuda"
    handles = []
    for name, block in blocks:
        stack = []

        def pre(_m, _a, name=name, stack=stack):
            rf = torch.profiler.record_function(f"unet.{name}")
            rf.__enter__()
            stack.append(rf)
            if nvtx:
                torch.cuda.nvtx.range_push(f"unet.{name}")

        def post(_m, _a, _o, stack=stack):
            if nvtx:
                torch.cuda.nvtx.range_pop()
            stack.pop().__exit__(None, None, None)

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return handles


# ---------------------------------------------------------------------- helpers
def _is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def save_report(result: RunResult, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(result.report(), indent=2, default=str))
