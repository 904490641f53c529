# Two commands: `make demo` (the main job: `stattn generate` on the offline tiny model, on whatever
# device there is) and `make test` (the test suite; Triton kernels run under the CPU interpreter
# without a GPU).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0: a CPU build on the development machines (a newer range pulls a multi-GB CUDA
# build); triton 3.6.0 as on the GPU machines; numpy < 2.4 because the Triton 3.6 interpreter
# converts 1-element arrays to scalars, which numpy 2.4 rejects; diffusers/transformers as tested.
PINS   := torch==2.13.0 triton==3.6.0 "numpy<2.4" diffusers==0.42.1 transformers==5.23.0

.PHONY: install test demo bench aot clean gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(PINS)
	# no build isolation: setup.py builds the native CPU extension against the torch pinned above
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/stattn generate --model tiny --prompt "a photo of a cat and a frog on a bench" \
		--num-inference-steps 20 --out demo-out --overwrite

bench: install
	$(PY) -m bench.micro
	$(PY) -m bench.e2e

# compile every kernel variant for sm_90 with Triton's real compiler (no GPU needed)
aot: install
	env -u TRITON_INTERPRET $(PY) -m stattn.kernels.aot

# the whole GPU check as one call (bench/gpu_check.py, docs/gpu-check.md): python3 on a GPU machine
# (no venv there); DRY=1: the CPU dry run in the venv; ARGS: more options (--out DIR --archive F.tar.gz)
gpu-check: $(if $(DRY),install)
	$(if $(DRY),$(PY),$(PYTHON)) -m bench.gpu_check $(if $(DRY),--dry) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
