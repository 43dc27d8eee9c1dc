"""training/cpu_memory.py: a step with a large temporary buffer stops re-faulting it every call."""
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step whose 32 MB temporary (sin(x), the matmul's operand) is above glibc's default
# mmap threshold: minor page faults per call, with or without keep_step_buffers_mapped().
_PROBE = """
import resource, sys
import jax, jax.numpy as jnp
from training.cpu_memory import keep_step_buffers_mapped
if sys.argv[1] == "keep":
  assert keep_step_buffers_mapped()
x = jnp.ones((2048, 4096), jnp.float32)
step = jax.jit(lambda x: (jnp.sin(x).T @ jnp.ones((2048, 4), jnp.float32)).sum())
# Warm-up: glibc gives each thread its own arena, and the first call that runs on a thread
# faults its arena's pages in once (822 faults per call averaged over 10 calls, in multiples).
for _ in range(10):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
  step(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
"""


def _faults_per_call(mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return float(out.stdout.split()[-1])


def test_large_step_buffers_stay_mapped_between_calls():
  default, kept = _faults_per_call("default"), _faults_per_call("keep")
  # 32 MB is 8,192 pages: glibc maps and faults them in afresh on every call by default...
  assert default > 6000, default
  # ...and keeps them mapped once the thresholds are raised.
  assert kept < 0.25 * default, (kept, default)
