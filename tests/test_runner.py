"""stattn.Runner on tiny random models: equals the stock pipelines, encodes and projects once,
drives controllers, times and profiles, rejects bad input."""
import json

import pytest
import torch

import stattn
from stattn.integration import models
from stattn.integration.control import Controller
from stattn.integration.runner import Runner

STEPS = 3
PROMPT = "a photo of a cat and a frog"


@pytest.fixture(scope="module")
def sd():
    pipe = models.tiny(seed=0, kind="sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(pipe, seed=0, **kw):
    stattn.restore(pipe)
    kw.setdefault("num_inference_steps", STEPS)
    g = kw.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(PROMPT, generator=g, output_type="np", **kw).images


def _max_diff(a, b):
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler",
                                       "EulerAncestralDiscreteScheduler"])
def test_runner_equals_stock_pipeline(scheduler):
    pipe = models.tiny(seed=1, kind="sd", scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = _stock(pipe)
    plain = Runner(pipe, accelerate=False)(PROMPT, steps=STEPS, seed=0, output_type="np").images
    assert _max_diff(plain, expected) < 1e-5  # same code path up to the loop: bit-for-bit or nearly
    fused = Runner(pipe)(PROMPT, steps=STEPS, seed=0, output_type="np").images
    assert _max_diff(fused, expected) < 1e-3  # fused attention within fp32 tolerance


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_runner_equals_stock_other_families(kind):
    pipe = models.tiny(seed=2, kind=kind)
    pipe.set_progress_bar_config(disable=True)
    expected = _stock(pipe)
    got = Runner(pipe)(PROMPT, steps=STEPS, seed=0, output_type="np").images
    assert _max_diff(got, expected) < 1e-3


def test_several_images_generators_and_latents(sd):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = _stock(sd, generator=gens, num_images_per_prompt=2)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    runner = Runner(sd)
    got = runner(PROMPT, steps=STEPS, generator=gens, num_images=2, output_type="np")
    assert got.images.shape[0] == 2 and _max_diff(got.images, expected) < 1e-3
    again = runner(PROMPT, steps=STEPS, latents=got.latents * 0 + 0.1, num_images=2, output_type="latent")
    assert again.images.shape == got.latents.shape
    stattn.restore(sd)


def test_prompt_encoded_once_and_kv_projected_once_per_layer(sd, monkeypatch):
    from stattn.integration import processors

    runner = Runner(sd)
    calls = {"text": 0, "kv": 0}
    attn2 = next(m for n, m in sd.unet.named_modules() if n.endswith("attn2"))
    project = processors.project_kv

    def counting(attn, context):  # (a hook on to_k itself would switch the K/V cache off)
        calls["kv"] += attn is attn2
        return project(attn, context)

    monkeypatch.setattr(processors, "project_kv", counting)
    h1 = sd.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    try:
        runner(PROMPT, steps=STEPS, seed=0, output_type="latent")
        runner(PROMPT, steps=STEPS, seed=1, output_type="latent")
    finally:
        h1.remove()
        stattn.restore(sd)
    assert calls["text"] == 2  # uncond + cond, once for both generations
    assert calls["kv"] == 1  # one projection of the CFG context for 2 x STEPS evaluations


class _Spy(Controller):
    def __init__(self):
        self.resets, self.steps, self.seen, self.keys = 0, [], set(), []

    def reset(self):
        self.resets += 1

    def begin_step(self, step, timestep):
        self.steps.append(step)

    def graph_key(self, step):
        self.keys.append(step)
        return step < 2

    def attention(self, call):
        if not call.q.is_cuda:  # reading the tensor syncs: not inside a CUDA-graph capture
            assert int(call.step_tensor) == call.step
        assert call.grid[0] * call.grid[1] == call.q.shape[2]
        self.seen.add(call.grid)
        return None


def test_controller_sees_every_step_and_grid(sd):
    spy = _Spy()
    runner = Runner(sd)
    stattn.accelerate(runner, controller=spy)
    assert runner.controller is spy
    for _ in range(2):
        runner(PROMPT, steps=STEPS, seed=0, output_type="latent")
    stattn.restore(runner)
    evals = len(sd.scheduler.timesteps)  # PNDM's warm-up makes it more than STEPS
    assert spy.resets == 2 and spy.steps == list(range(evals)) * 2 and spy.keys == spy.steps
    assert len(spy.seen) >= 2  # cross-attention at two resolutions


def test_runner_keeps_a_controller_installed_on_the_pipeline(sd):
    """stattn.accelerate(pipe, controller=c) then Runner(pipe): c stays installed and sees the runner's
    steps (Runner's own accelerate used to drop it silently)."""
    spy = _Spy()
    stattn.accelerate(sd, controller=spy)
    try:
        runner = Runner(sd)
        assert runner.controller is spy
        runner(PROMPT, steps=STEPS, seed=0, output_type="latent")
    finally:
        stattn.restore(sd)
    assert spy.resets == 1 and spy.steps == list(range(len(sd.scheduler.timesteps)))


def test_timing_and_profile(sd, tmp_path):
    runner = Runner(sd)
    res = runner(PROMPT, steps=STEPS, seed=0, output_type="pil", profile=tmp_path)
    stattn.restore(sd)
    assert len(res.step_ms) == len(sd.scheduler.timesteps) and all(t > 0 for t in res.step_ms) and res.total_ms >= sum(res.step_ms)
    assert len(res.images) == 1 and res.images[0].size == (runner.default_size(),) * 2
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"unet.down_blocks.0", "unet.up_blocks.1"} <= names
    assert "stattn::region_attention" in (tmp_path / "ops.txt").read_text()
    assert res.settings["steps"] == STEPS and res.settings["scheduler"] and res.settings["accelerated"]
    json.dumps(res.report())


def test_from_pretrained_directory(tmp_path):
    pipe = models.tiny(seed=5)
    pipe.set_progress_bar_config(disable=True)
    models.save(pipe, tmp_path / "m")
    expected = _stock(pipe)
    runner = Runner.from_pretrained(tmp_path / "m", torch_dtype=torch.float32)
    assert _max_diff(runner(PROMPT, steps=STEPS, seed=0, output_type="np").images, expected) < 1e-3
    with pytest.raises(ValueError, match="disagree"):
        Runner.from_pretrained(tmp_path / "m", dtype=torch.float32, torch_dtype=torch.float16)
    with pytest.raises(ValueError):
        Runner.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("kwargs, match", [
    ({"height": 60}, "height: expected a positive multiple"),
    ({"width": 0}, "width"),
    ({"steps": 0}, "steps"),
    ({"num_images": 0}, "num_images"),
    ({"output_type": "jpg"}, "output_type"),
    ({"seed": 1, "generator": torch.Generator()}, "either generator or seed"),
])
def test_bad_arguments(sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Runner(sd, accelerate=False)(PROMPT, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": 2 ** 64}, ValueError, r"seed: expected an integer in \[0, 2\*\*64\)"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.7}, TypeError, "seed"),          # ran as seed 1
    ({"seed": True}, TypeError, "seed"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale: expected a finite number"),
    ({"guidance_scale": "7"}, TypeError, "guidance_scale"),
    ({"guidance_rescale": float("inf")}, ValueError, "guidance_rescale"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, ValueError, r"latents: expected shape \(1, 4, 8, 8\)"),
    ({"latents": torch.zeros(1, 4, 8, 8), "width": 128}, ValueError, r"latents: expected shape \(1, 4, 8, 16\)"),
    ({"latents": torch.zeros(1, 4, 8, 8), "num_images": 2}, ValueError, r"latents: expected shape \(2, 4, 8, 8\)"),
    ({"latents": [[0.0]]}, TypeError, "latents"),
    ({"steps": True}, ValueError, "steps"),
    ({"steps": 3, "timesteps": [999, 500]}, ValueError, "give steps or timesteps"),
    ({"timesteps": []}, TypeError, "timesteps"),
    ({"clip_skip": -1}, ValueError, "clip_skip"),
    ({"clip_skip": 3}, ValueError, r"clip_skip: expected None or an integer in \[0, 2\]"),
    ({"cross_attention_kwargs": 0.5}, TypeError, "cross_attention_kwargs"),
])
def test_bad_values_name_the_argument(sd, kwargs, error, match):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=match):
        Runner(sd, accelerate=False)(PROMPT, steps=kwargs.pop("steps", 1), output_type="latent", **kwargs)


def test_bad_prompt_and_pipe(sd):
    with pytest.raises(TypeError, match="prompt"):
        Runner(sd, accelerate=False)(42)
    with pytest.raises(TypeError, match="pipe: .*object is not a diffusers pipeline"):
        Runner(object())


def test_cuda_graphs_need_cuda(sd):
    if torch.cuda.is_available():
        pytest.skip("checked by test_cuda_graphs_equal_eager on this machine")
    with pytest.raises(RuntimeError, match="CUDA"):
        Runner(sd, cuda_graphs=True)(PROMPT, steps=2, output_type="latent")
    stattn.restore(sd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("with_controller", [False, True])
def test_cuda_graphs_equal_eager(with_controller):
    pipe = models.tiny(seed=0, kind="sd", dtype=torch.float16, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    eager = Runner(pipe)
    if with_controller:
        stattn.accelerate(eager, controller=_Spy())
    a = eager(PROMPT, steps=6, seed=0, output_type="latent").images
    graphed = Runner(pipe, cuda_graphs=True)
    if with_controller:
        stattn.accelerate(graphed, controller=_Spy())
    b = graphed(PROMPT, steps=6, seed=0, output_type="latent").images
    c = graphed(PROMPT, steps=6, seed=0, output_type="latent").images  # replays only
    assert torch.allclose(a.float(), b.float(), atol=2e-3) and torch.allclose(b.float(), c.float(), atol=2e-3)


def test_profile_names_each_kernel_launch(sd, tmp_path, triton_backend):
    runner = Runner(sd)
    runner(PROMPT, steps=1, seed=0, output_type="latent", profile=tmp_path)
    stattn.restore(sd)
    names = {e.get("name") for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]}
    assert "stattn._fwd_kernel" in names  # the Triton launch, ranged inside its UNet block
    from stattn.kernels import launch
    assert launch.RANGES is False  # switched off again after profiling
