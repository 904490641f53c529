#!/usr/bin/env bash
# On a lent GPU machine: install the carried wheels (the GPU image lacks diffusers) and stattn
# itself (editable, offline), then run the stages named in $STAGES (default: all; a device call
# lasts at most 10 minutes, so split them: STAGES="test micro aot", then "regulation e2e",
# then "spacetime"): the test suite on CUDA (bf16 included), the micro-benchmark, the sm_90 compile
# reports, the Attention-Regulation inner loop, end-to-end generation, spatial-temporal control.
# Logs and results go to $OUT.
#   prepare here:  echo /.whl/ >> .git/info/exclude
#                  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                      --implementation cp -d .whl diffusers==0.42.1
#   then:          device run: command "bash bench/gpu_run.sh", carry [".whl"]
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
STAGES=${STAGES:-test micro aot regulation e2e spacetime}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has test; then python3 -m pytest -q tests 2>&1 | tee "$OUT/pytest-cuda.log"; fi
if has micro; then python3 -m bench.micro --device cuda --out "$OUT" 2>&1 | tee "$OUT/micro.log"; fi
if has aot; then
  python3 -m stattn.kernels.aot 2>&1 | tee "$OUT/aot.md"
  python3 -m bench.regulation --aot 2>&1 | tee "$OUT/regulation-aot.md"
fi
if has regulation; then
  python3 -m bench.regulation --device cuda --out "$OUT" 2>&1 | tee "$OUT/regulation.log"
  for w in 4 8 16; do python3 -m bench.regulation --device cuda --quick --warps $w --out "$OUT/regulation-w$w"; done
fi
if has e2e; then
  python3 -m bench.e2e --model full:sd2-base --variants regulation --scheduler DPMSolverMultistepScheduler \
      --out "$OUT" 2>&1 | tee "$OUT/e2e-regulation.log"
  python3 -m bench.e2e --out "$OUT" 2>&1 | tee "$OUT/e2e.log"
fi
if has spacetime; then python3 -m bench.spacetime --device cuda --out "$OUT" 2>&1 | tee "$OUT/spacetime.log"; fi
