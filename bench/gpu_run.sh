#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels (the GPU image lacks diffusers) and
# stattn itself (editable, offline), then run the test suite on CUDA (bf16 included), the
# micro-benchmark and the sm_90 compile report; logs and results go to $OUT.
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
python3 -m pytest -q tests 2>&1 | tee "$OUT/pytest-cuda.log"
python3 -m bench.micro --device cuda --out "$OUT" 2>&1 | tee "$OUT/micro.log"
python3 -m stattn.kernels.aot 2>&1 | tee "$OUT/aot.md"
