"""Attention forward+backward: blockwise (flash, pure JAX) against xla ([L, L] scores) on this CPU.

  python benchmarks/attention.py                # 3-10 minutes on 2 cores (xla at 8192: a minute a call)
  python benchmarks/attention.py --repeats=9 --block=256

For each shape, compiles jax.value_and_grad of both implementations (causal, two packed documents
per row, float32) and prints the compiled temporary bytes (memory_analysis) and the median time of
`--repeats` calls, the two implementations called in alternation so both see the same machine load.
xla is compiled but not run where its temporaries exceed `--max_gib`. The short shapes are
shakespeare_char-like (nanoGPT's 256 x 64 rows and loom's 64 x 12), the long ones one row of 8 heads;
model.attention=auto's CPU threshold (model/attention.CPU_BLOCKWISE_FROM_LENGTH) comes from this table.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # A CPU comparison; also leaves libtpu's lock alone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model import attention  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per implementation and shape, alternating.")
_BLOCK = flags.DEFINE_integer("block", 512, "blockwise's block length (model.attention_block).")
_MAX_GIB = flags.DEFINE_float("max_gib", 8.0, "Run xla only where its compiled temporaries fit in this.")
_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192"], "Long lengths (batch 1).")

# (label, batch, length, heads, head_dim)
SHORT_SHAPES = [("shakespeare_char (loom)", 12, 64, 6, 64), ("shakespeare_char (nanoGPT)", 64, 256, 6, 64)]


def inputs(batch, length, heads, head_dim):
  rng = np.random.default_rng(0)
  q, k, v, d_out = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in range(4))
  segment_ids = jnp.asarray(
    np.broadcast_to(np.where(np.arange(length) < length // 3, 1, 2), (batch, length)), jnp.int32
  )
  return q, k, v, segment_ids, d_out


def forward_backward(implementation, block):
  def loss(q, k, v, segment_ids, d_out):
    return jnp.sum(attention.attend(q, k, v, segment_ids, implementation, block) * d_out)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def measure(batch, length, heads, head_dim):
  """{implementation: (temp bytes, median seconds or None, why not run)}."""
  args = inputs(batch, length, heads, head_dim)
  compiled, results = {}, {}
  for implementation in ("xla", "blockwise"):
    exe = forward_backward(implementation, _BLOCK.value).lower(*args).compile()
    temp = exe.memory_analysis().temp_size_in_bytes
    if implementation == "xla" and temp > _MAX_GIB.value * 2**30:
      results[implementation] = (temp, None, f"temporaries over --max_gib={_MAX_GIB.value:g}")
    else:
      compiled[implementation] = exe
      jax.block_until_ready(exe(*args))  # Warm up.
  times = {name: [] for name in compiled}
  for _ in range(_REPEATS.value):
    for name, exe in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(exe(*args))
      times[name].append(time.perf_counter() - start)
  for name, exe in compiled.items():
    results[name] = (exe.memory_analysis().temp_size_in_bytes, float(np.median(times[name])), "")
  return results


def main(argv):
  del argv
  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; float32, causal, "
    f"2 documents per row; blockwise block {_BLOCK.value}; median of {_REPEATS.value} alternating calls"
  )
  print(
    "| shape | B x L x heads x head_dim | [L, L] f32 per head | xla temp | blockwise temp | xla ms "
    "| blockwise ms | blockwise / xla time |"
  )
  print("|---|---|---|---|---|---|---|---|")
  shapes = SHORT_SHAPES + [("one row", 1, int(length), 8, 64) for length in _LENGTHS.value]
  for label, batch, length, heads, head_dim in shapes:
    results = measure(batch, length, heads, head_dim)
    (xla_temp, xla_s, why), (bw_temp, bw_s, _) = results["xla"], results["blockwise"]
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    xla_ms = f"{xla_s * 1e3:,.1f}" if xla_s is not None else f"not run: {why}"
    ratio = f"{bw_s / xla_s:.2f}x" if xla_s is not None else "-"
    print(
      f"| {label} | {batch} x {length} x {heads} x {head_dim} | {mib(length * length * 4)} "
      f"| {mib(xla_temp)} | {mib(bw_temp)} | {xla_ms} | {bw_s * 1e3:,.1f} | {ratio} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
