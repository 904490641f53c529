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
