"""Where a train step's time goes, for a config's shapes and a few model variants.

  python benchmarks/step_breakdown.py                                  # shakespeare_char shapes
  python benchmarks/step_breakdown.py --config=configs/quickstart.py --config.model.vocab_size=2048
  python benchmarks/step_breakdown.py --profile      # and the configured step's time per kind of op

For each variant, times the forward loss, forward + backward, and the whole
train step (gradients, clipping, AdamW) on one fixed batch, in interleaved
rounds, and prints medians. Compare variants within one run only.
"""
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import model as model_lib  # noqa: E402
import sharding  # noqa: E402
from training.optimizer import build_optimizer  # noqa: E402
from training.peak_flops import measured_matmul_flops  # noqa: E402
from training.state import abstract_model, init_train_state, state_shardings  # noqa: E402
from training.step import make_train_step, token_losses  # noqa: E402
from training.validation import validate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "loom config.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 20, "Calls per round.")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the configured train step and print where its "
                             "time goes, per kind of XLA op (CPU only).")

# Model-field overrides per variant; "devices": 1 runs the whole batch on the first device alone.
VARIANTS = {
    "as configured": {},
    "one device (no cpu_devices split)": {"devices": 1},
    "scanned layers": {"scan_layers": True},
    "unrolled layers": {"scan_layers": False},
    "bfloat16 compute": {"dtype": "bfloat16"},
}


def build(config, overrides):
  overrides = dict(overrides)
  devices = jax.devices()[:overrides.pop("devices", jax.device_count())]
  config = validate(config, len(devices), tokenizer_vocab_size=config.model.vocab_size or 65)
  config.model.update(**overrides)
  mesh = sharding.make_mesh(config.mesh, devices)
  graphdef, abstract_params = abstract_model(config.model)
  tx, schedule = build_optimizer(config.optimizer, config.train.num_steps, abstract_params)
  shardings = state_shardings(abstract_params, tx, mesh)
  state = init_train_state(config.model, tx, config.seed, shardings)
  rng = np.random.default_rng(0)
  b, l, v = config.train.global_batch_size, config.data.seq_len, config.model.vocab_size
  tokens = rng.integers(0, v, (b, l + 1)).astype(np.int32)
  batch = sharding.global_batch_from_local({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, l), np.int32),
      "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
      "weights": np.ones((b, l), np.float32)}, mesh)

  def mean_loss(params, batch):
    loss_sum, weight = token_losses(graphdef, params, batch)
    return loss_sum / weight

  params = jax.tree.map(jax.numpy.copy, state.params)  # The train step donates `state`.
  forward = jax.jit(mean_loss)
  backward = jax.jit(jax.grad(mean_loss))
  step = make_train_step(graphdef, tx, schedule, mesh, shardings).lower(state, batch).compile()
  return config, {"forward": (forward, params, batch), "forward+backward": (backward, params, batch),
                  "train step": (step, state, batch)}


def time_calls(fn, carry, batch, steps):
  """Mean ms per call after one warm-up call; a train step's donated state is threaded through."""
  def call(carry):
    out = fn(carry, batch)
    return out, (out[0] if isinstance(out, tuple) else carry)

  out, carry = call(carry)
  jax.block_until_ready(out)
  start = time.perf_counter()
  in_flight = []
  for _ in range(steps):  # At most 2 calls ahead of the devices, as train.py.
    out, carry = call(carry)
    in_flight.append(out[1] if isinstance(out, tuple) else out)  # A donated state cannot be awaited.
    if len(in_flight) > 2:
      jax.block_until_ready(in_flight.pop(0))
  jax.block_until_ready(out)
  return 1000 * (time.perf_counter() - start) / steps, carry


def main(argv):
  del argv
  if _PROFILE.value:  # Per-op trace events; XLA reads its flags when the backend starts, below.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
  base = _CONFIG.value
  sharding.use_cpu_devices(base.cpu_devices)
  built = {name: build(base, overrides) for name, overrides in VARIANTS.items()}
  times = {(name, part): [] for name in built for part in built[name][1]}
  for _ in range(_ROUNDS.value):
    for name, (_, parts) in built.items():
      for part, (fn, first, batch) in parts.items():
        ms, carry = time_calls(fn, first, batch, _STEPS.value)
        parts[part] = (fn, carry, batch)
        times[(name, part)].append(ms)
  config = built["as configured"][0]
  tokens = config.train.global_batch_size * config.data.seq_len
  step_flops = model_lib.flops_per_token(config.model, config.data.seq_len) * tokens
  peak = measured_matmul_flops()
  print(f"\n{config.model.num_layers} layers, {config.model.embed_dim} wide, vocab {config.model.vocab_size}, "
        f"batch {config.train.global_batch_size} x {config.data.seq_len}: {step_flops / 1e9:.2f} GFLOP per "
        f"train step, {1000 * step_flops / peak:.1f} ms at the measured float32 matmul peak "
        f"({peak / 1e9:.0f} GFLOP/s)")
  print("| variant | forward ms | forward+backward ms | train step ms |")
  print("|---|---|---|---|")
  for name in built:
    cells = " | ".join(f"{np.median(times[(name, part)]):.1f}" for part in ("forward", "forward+backward", "train step"))
    print(f"| {name} | {cells} |")


  if _PROFILE.value:
    fn, state, batch = built["as configured"][1]["train step"]
    print_op_profile(fn, state, batch, len(jax.devices()))


# Trace events that only contain or wait for others; the rest are ops, one event per op run.
_CONTAINERS = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await", "Rendezvous", "Wait: ")


def print_op_profile(step, state, batch, num_devices, steps=10):
  """Milliseconds per train step and device spent in each kind of op, from a jax.profiler trace."""
  from jax._src.lib import _profile_data
  kinds = {}  # XLA op name -> what it computes, from the compiled HLO's metadata.
  for line in step.as_text().splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      what = op_name.group(1) if op_name else ""
      kinds[match[1]] = ("matmul" if "dot_general" in what or match[2] == "dot" else
                         "reduction" if "reduce" in what else "elementwise, copies and the rest")
  _, state = time_calls(step, state, batch, steps)  # Warm.
  directory = tempfile.mkdtemp()
  jax.profiler.start_trace(directory)
  _, state = time_calls(step, state, batch, steps)
  jax.profiler.stop_trace()
  trace = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
  totals = collections.Counter()
  for plane in _profile_data.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for event in line.events:
        if event.name.startswith("all-reduce"):  # Including its waits for the other devices.
          totals["all-reduce (gradients), waits included"] += event.duration_ns
        elif not event.name.startswith(_CONTAINERS):
          totals[kinds.get(event.name, "elementwise, copies and the rest")] += event.duration_ns
  calls = steps + 1  # time_calls runs one warm-up call besides `steps`.
  print(f"\nwhere the configured train step's time goes, per device ({num_devices} devices; "
        f"ms per step, summed over each device's ops):")
  print("| op kind | ms per step per device |")
  print("|---|---|")
  for kind, ns in totals.most_common():
    print(f"| {kind} | {ns / 1e6 / calls / num_devices:.1f} |")


if __name__ == "__main__":
  app.run(main)
