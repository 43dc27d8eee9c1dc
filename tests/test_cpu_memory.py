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
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, mode], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  return float(out.stdout.split()[-1])


def test_large_step_buffers_stay_mapped_between_calls():
  default, kept = _faults_per_call("default"), _faults_per_call("keep")
  # 32 MB is 8,192 pages: glibc maps and faults them in afresh on every call by default...
  assert default > 6000, default
  # ...and keeps them mapped once the thresholds are raised.
  assert kept < 0.25 * default, (kept, default)


# A thread's arena: a 40 MB block stays allocated, so each 30 MB buffer needs a second heap,
# which glibc unmaps when the buffer is freed unless the top padding keeps it.
_THREAD_PROBE = """
import ctypes, resource, sys, threading
from training import cpu_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "keep":
  assert cpu_memory.keep_step_buffers_mapped()
else:  # The thresholds alone, without the top padding.
  assert libc.mallopt(cpu_memory._M_MMAP_THRESHOLD, cpu_memory.THRESHOLD_BYTES)
  assert libc.mallopt(cpu_memory._M_TRIM_THRESHOLD, cpu_memory.THRESHOLD_BYTES)
MB = 1 << 20
faults = []

def step():
  buffer = libc.malloc(30 * MB)
  ctypes.memset(buffer, 1, 30 * MB)
  libc.free(buffer)

def worker():
  resident = libc.malloc(40 * MB)
  ctypes.memset(resident, 1, 40 * MB)
  for _ in range(3):
    step()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(10):
    step()
  faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
print(faults[0])
"""


def test_a_threads_arena_keeps_its_extra_heap_between_calls():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  faults = {}
  for mode in ("thresholds", "keep"):
    out = subprocess.run(
      [sys.executable, "-c", _THREAD_PROBE, mode], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    faults[mode] = float(out.stdout.split()[-1])
  # 30 MB is 7,680 pages, faulted in afresh with the heap on every call with the thresholds alone...
  assert faults["thresholds"] > 6000, faults
  # ...and not at all once the top padding keeps that heap.
  assert faults["keep"] < 100, faults
