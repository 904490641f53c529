"""The kernels through Triton's real compiler and ptxas for sm_90 (H100/H200), without a GPU: the
interpreter accepts programs the compiler rejects, and a variant over the shared-memory limit
would compile yet fail at launch. Runs in a subprocess because the interpreter (set by conftest
when there is no GPU) replaces the JIT functions."""
import json
import os
import subprocess
import sys

HOPPER_SMEM_PER_BLOCK = 232448  # 227 KB opt-in dynamic shared memory per block on sm_90

SCRIPT = """
import json
from stattn.kernels import aot
rows = aot.report(aot.QUICK, 90)
print(json.dumps([[str(p), name, use] for p, name, meta, use in rows]))
"""


def test_every_kernel_variant_compiles_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {name for _, name, _ in rows}
    assert kernels == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    for problem, name, use in rows:
        assert use["SHARED"] <= HOPPER_SMEM_PER_BLOCK, (problem, name, use)


JIT_SCRIPT = """
import json
from triton.runtime import driver
from stattn.kernels import aot

driver.set_active(aot.StandInDriver())     # what the CUDA driver reports on an H100/H200, without one
same = []
for p in (aot.Problem(M=4096, D=40), aot.Problem(M=77, D=64, N=154, R=3, T=1, pinned=False, B=1, H=3)):
    for kernel, args, meta in aot.capture(p):
        jit = kernel.warmup(*args, grid=(1,), **meta)        # JITFunction.run(warmup=True): the JIT's compile
        spec = aot.jit_specialisation(kernel, args, meta)
        ours = aot.compile_specialisation(*aot.deserialise_specialisation(aot.serialise_specialisation(kernel, *spec)))
        same.append([kernel.__name__, jit.hash == aot.compile_launch(kernel, args, meta).hash == ours.hash])
print(json.dumps(same))
"""


def test_the_aot_specialisation_is_the_jits(tmp_path):
    """stattn.kernels.aot compiles what Triton's JIT compiles at run time (same specialisation of each
    argument, same cache entry), also after a round trip through its JSON: the JIT's own warmup, run
    against a stand-in driver for sm_90, gives the same compiled kernel hash."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", JIT_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    same = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(same) >= 8 and all(ok for _, ok in same), same
