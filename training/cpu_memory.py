"""Keeps XLA's large CPU step buffers mapped between steps.

glibc hands out every allocation above its mmap threshold (which it never
raises past 32 MB on its own) as a fresh mmap, and unmaps it on free. XLA's CPU
runtime allocates a step's temporaries at every execution, so a step whose
temporary buffer is over that size faults in every page of it again on every
step. shakespeare_char on one CPU device has about 50 MB of temporaries, which comes
to about 12,700 page faults a step and a quarter to a third of its step time
(benchmarks/step_breakdown.py counts them). Above the threshold set here,
glibc serves those buffers from its heap, and with the trim threshold as high
it keeps the freed memory for the next step.

A thread other than the main one allocates from an arena of its own, made of
64 MB heaps. When a step's buffer does not fit in the arena's heap, glibc maps
another heap for it and, once the buffer is freed, unmaps that whole heap
again, whatever the trim threshold: shakespeare_char's two-device step did that
every step in some of the processes that ran it (6,481 faults a step: a
device's 26.7 MB of temporaries). glibc keeps such a heap when the top padding
is as large as a heap, which is what M_TOP_PAD is set to here.
"""

import ctypes
import os

import jax

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30
HEAP_BYTES = 64 << 20  # The size of a thread arena's heap on 64-bit glibc (HEAP_MAX_SIZE).


def keep_step_buffers_mapped() -> bool:
  """On a CPU backend with glibc, raises malloc's mmap and trim thresholds and its
  top padding; True if it did.

  Costs nothing but memory that stays with the process: up to THRESHOLD_BYTES of
  freed heap is kept for reuse instead of being returned to the system.
  """
  if jax.default_backend() != "cpu" or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
    return False  # Not glibc's heap, or the user set the threshold for this process: theirs stands.
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl): their allocators do not do this.
    return False
  return bool(
    mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)
    and mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    and mallopt(_M_TOP_PAD, HEAP_BYTES)
  )
