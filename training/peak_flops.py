"""The FLOP/s that MFU is measured against."""

import time

import jax
import jax.numpy as jnp

from training.accelerators import chip_for_device_kind


def measured_matmul_flops(dtype=jnp.float32, size: int = 1024, repeats: int = 20) -> float:
  """Best FLOP/s of a square matmul on the default device: the CPU's practical peak.

  The fastest of many repeats, not the median: a shared machine's load only
  ever slows a run down, and a peak is the rate the hardware can reach.
  """
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times)


def peak_flops(compute_dtype) -> tuple[float, str]:
  """Total peak FLOP/s of all devices, and where the figure comes from."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    # Forced host devices share the same cores, so the CPU is measured once.
    return measured_matmul_flops(compute_dtype), "measured CPU matmul"
  chip = chip_for_device_kind(device.device_kind)
  if chip is not None:
    return chip.peak_flops * jax.device_count(), f"{device.device_kind} data sheet"
  return float("nan"), f"unknown peak for {device.device_kind}"
