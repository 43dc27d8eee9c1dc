"""Where a train step's time goes, for a config's shapes and a few model variants.

  python benchmarks/step_breakdown.py                                  # shakespeare_char shapes
  python benchmarks/step_breakdown.py --config=configs/quickstart.py --config.model.vocab_size=2048
  python benchmarks/step_breakdown.py --profile      # and the configured step's time per kind of op

For each variant, times the forward loss, forward + backward, and the whole
train step (gradients, clipping, AdamW) on one fixed batch, and prints medians.
Each variant runs in a process of its own, as train.py runs one config per
process, and the processes alternate over `--rounds`. The page-fault column
counts minor faults per train step: a few hundred is normal; thousands mean
the C allocator unmapped the step's buffers and faults them in again every
step, which slows the step down. That happens in some processes and not in
others, and an earlier version of this script, which compiled every variant
in one process, met it in most runs. Compare variants within one run only.
"""
import collections
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import model as model_lib  # noqa: E402
import sharding  # noqa: E402
from training.cli import define_config_flag  # noqa: E402
from training.cpu_memory import keep_step_buffers_mapped  # noqa: E402
from training.optimizer import build_optimizer  # noqa: E402
from training.peak_flops import measured_matmul_flops  # noqa: E402
from training.run import STEPS_IN_FLIGHT  # noqa: E402
from training.state import abstract_model, init_train_state, state_shardings  # noqa: E402
from training.step import make_train_step, token_losses  # noqa: E402
from training.validation import validate  # noqa: E402

_CONFIG = define_config_flag("configs/shakespeare_char.py", "loom config.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Processes per variant, run in alternating order.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per process (forward, backward, step interleaved).")
_STEPS = flags.DEFINE_integer("steps", 20, "Calls per timed round.")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace the configured train step and print where its "
                             "time goes, per kind of XLA op (CPU only).")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: build and time this one variant, print the result.")
_TRACE = flags.DEFINE_bool("trace", False, "Internal: with --variant, trace the train step instead.")

# Model-field overrides per variant; "devices": 1 runs the whole batch on the first device alone,
# "mesh" overrides mesh axes, "xla_flags" are added to the variant's process's XLA_FLAGS.
VARIANTS = {
    "as configured": {},
    "one device (no cpu_devices split)": {"devices": 1},
    "scanned layers": {"scan_layers": True},
    "unrolled layers": {"scan_layers": False},
    "bfloat16 compute": {"dtype": "bfloat16"},
    "fsdp over the devices instead of data": {"mesh": {"data": 1, "fsdp": -1}},
    "YNNPACK fusions off (XLA flag)": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="},
}


def build(config, overrides):
  overrides = dict(overrides)
  devices = jax.devices()[:overrides.pop("devices", jax.device_count())]
  overrides.pop("xla_flags", None)  # Applied by the parent, when it starts this process.
  config.mesh.update(**overrides.pop("mesh", {}))
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
  for _ in range(steps):  # At most STEPS_IN_FLIGHT calls ahead of the devices, as train.py.
    out, carry = call(carry)
    in_flight.append(out[1] if isinstance(out, tuple) else out)  # A donated state cannot be awaited.
    if len(in_flight) > STEPS_IN_FLIGHT:
      jax.block_until_ready(in_flight.pop(0))
  jax.block_until_ready(out)
  return 1000 * (time.perf_counter() - start) / steps, carry


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _VARIANT.value:
    return run_variant(_VARIANT.value)
  # The same flags for every child process, less the ones this parent consumes.
  forwarded = [arg for arg in sys.argv[1:] if not re.match(r"--(no)?(rounds|profile)\b", arg)]
  times = {name: collections.defaultdict(list) for name in VARIANTS}
  for _ in range(_ROUNDS.value):
    for name, overrides in VARIANTS.items():
      result = run_child(forwarded + [f"--variant={name}"], _xla_flags_env(overrides.get("xla_flags", "")))
      for part, ms in result["ms"].items():
        times[name][part].append(ms)
  peak = measured_matmul_flops()
  print(f"\n{result['shapes']}: {result['step_flops'] / 1e9:.2f} GFLOP per train step, "
        f"{1000 * result['step_flops'] / peak:.1f} ms at the measured float32 matmul peak ({peak / 1e9:.0f} GFLOP/s)")
  print(f"{_ROUNDS.value} processes per variant, median of their medians:")
  print("| variant | forward ms | forward+backward ms | train step ms | page faults per train step |")
  print("|---|---|---|---|---|")
  for name in VARIANTS:
    cells = " | ".join(f"{np.median(times[name][part]):.1f}" for part in ("forward", "forward+backward", "train step"))
    print(f"| {name} | {cells} | {np.median(times[name]['faults']):,.0f} |")
  if _PROFILE.value:
    print_op_profile(run_child(forwarded + ["--variant=as configured", "--trace"],
                               _xla_flags_env("--xla_cpu_enable_xprof_traceme=true")),
                     float(np.median(times["as configured"]["train step"])))


def _xla_flags_env(flags_to_add: str) -> dict:
  return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags_to_add}".strip())


def run_child(args, env) -> dict:
  """Runs this script on one variant in a fresh process and returns what it printed."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env, capture_output=True,
                       text=True, check=False)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  sys.exit(f"step_breakdown child {args} failed:\n{out.stderr[-3000:]}")


def run_variant(name):
  """In a child process: build one variant, time it (or trace its train step), print one RESULT line."""
  base = _CONFIG.value
  sharding.use_cpu_devices(base.cpu_devices)
  keep_step_buffers_mapped()  # As train.py does.
  config, parts = build(base, VARIANTS[name])
  if _TRACE.value:
    fn, state, batch = parts["train step"]
    print("RESULT " + json.dumps(trace_op_kinds(fn, state, batch)))
    return
  times = collections.defaultdict(list)
  for _ in range(_REPEATS.value):
    for part, (fn, carry, batch) in parts.items():
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ms, carry = time_calls(fn, carry, batch, _STEPS.value)
      if part == "train step":  # Minor faults: memory the process maps afresh, here every step.
        times["faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (_STEPS.value + 1))
      parts[part] = (fn, carry, batch)
      times[part].append(ms)
  m = config.model
  tokens = config.train.global_batch_size * config.data.seq_len
  print("RESULT " + json.dumps({
      "ms": {part: float(np.median(t)) for part, t in times.items()},
      "step_flops": model_lib.flops_per_token(m, config.data.seq_len) * tokens,
      "shapes": f"{m.num_layers} layers, {m.embed_dim} wide, vocab {m.vocab_size}, "
                f"batch {config.train.global_batch_size} x {config.data.seq_len}"}))


# Trace events that only contain or wait for others; the rest are ops, one event per op run.
_CONTAINERS = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await", "Rendezvous", "Wait: ")


def trace_op_kinds(step, state, batch, steps=20) -> dict:
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
  traced_ms, state = time_calls(step, state, batch, steps)
  jax.profiler.stop_trace()
  trace = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
  totals, threads = collections.Counter(), set()
  for plane in _profile_data.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # XLA's pool threads, which run every device's ops.
        continue
      threads.add(line.name)
      for event in line.events:
        if event.name.startswith("all-reduce"):  # Including its waits for the other devices.
          totals["all-reduce (gradients), waits included"] += event.duration_ns
        elif not event.name.startswith(_CONTAINERS):
          totals[kinds.get(event.name, "elementwise, copies and the rest")] += event.duration_ns
  per_step_thread = 1e6 * (steps + 1) * len(threads)  # time_calls adds one warm-up call.
  return {"traced_step_ms": traced_ms, "devices": jax.device_count(), "threads": len(threads),
          "kinds": {kind: ns / per_step_thread for kind, ns in totals.most_common()}}


def print_op_profile(profile: dict, untraced_step_ms: float):
  ops_ms = sum(profile["kinds"].values())
  print(f"\nwhere the configured train step's time goes ({profile['devices']} devices, {profile['threads']} "
        f"threads in XLA's pool): {ops_ms:.1f} ms of ops per thread in a step of {profile['traced_step_ms']:.1f} ms under the trace "
        f"({untraced_step_ms:.1f} ms untraced, the table above)")
  print("| op kind | ms per step per thread |")
  print("|---|---|")
  for kind, ms in profile["kinds"].items():
    print(f"| {kind} | {ms:.1f} |")


if __name__ == "__main__":
  app.run(main)
