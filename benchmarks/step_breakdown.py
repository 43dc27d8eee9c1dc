"""Where a train step's time goes, for a config's shapes and a few model variants.

  SHAKESPEARE=../shared/data/tinyshakespeare/input.txt   # a local copy; or: python tools/download.py tinyshakespeare
  python benchmarks/step_breakdown.py --config.data.sources.shakespeare.paths=$SHAKESPEARE   # shakespeare_char
  python benchmarks/step_breakdown.py --config=configs/quickstart.py --config.model.vocab_size=2048
  python benchmarks/step_breakdown.py --profile      # and the configured step's time per kind of op
  python benchmarks/step_breakdown.py --variants="as configured,torch peer (nanoGPT float32)" --parts="train step"

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
from training.peak_flops import measured_matmul_flops  # noqa: E402
from training.run import STEPS_IN_FLIGHT  # noqa: E402
from training.setup import build_setup, use_cpu_devices  # noqa: E402
from training.step import token_losses  # noqa: E402
from training.validation import validate  # noqa: E402

_CONFIG = define_config_flag("configs/shakespeare_char.py", "loom config.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Processes per variant, run in alternating order.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per process (forward, backward, step interleaved).")
_STEPS = flags.DEFINE_integer("steps", 20, "Calls per timed round.")
_PROFILE = flags.DEFINE_bool(
  "profile", False, "Also trace the configured train step and print where its time goes, per kind of XLA op (CPU only)."
)
_VARIANT = flags.DEFINE_string("variant", "", "Internal: build and time this one variant, print the result.")
_TRACE = flags.DEFINE_bool("trace", False, "Internal: with --variant, trace the train step instead.")
_VARIANTS = flags.DEFINE_list(
  "variants",
  [],
  "Run only these variants (names as in VARIANTS, which hold no "
  "commas), in this order; the first is what `/ first` divides by. Empty: the usual set.",
)
_PARTS = flags.DEFINE_list(
  "parts", list(("forward", "forward+backward", "train step")), "Time only these parts of each variant."
)
_PROFILE_VARIANT = flags.DEFINE_string("profile_variant", "as configured", "The variant --profile traces.")

# Model-field overrides per variant; "devices": 1 runs the whole batch on the first device alone,
# "mesh" overrides mesh axes, "xla_flags" are added to the variant's process's XLA_FLAGS.
VARIANTS = {
  "as configured": {},
  "one device (no cpu_devices split)": {"devices": 1},
  "scanned layers": {"scan_layers": True},
  "unrolled layers": {"scan_layers": False},
  "bfloat16 compute": {"dtype": "bfloat16"},
  "bfloat16 compute on one device": {"dtype": "bfloat16", "devices": 1},
  "tanh GELU": {"gelu_approximate": True},
  "fsdp over the devices instead of data": {"mesh": {"data": 1, "fsdp": -1}},
  "YNNPACK fusions off (XLA flag)": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="},
  "blockwise attention": {"attention": "blockwise"},
  "blockwise attention (block 128)": {"attention": "blockwise", "attention_block": 128},
  "bfloat16 compute and blockwise attention": {"dtype": "bfloat16", "attention": "blockwise"},
  # nanoGPT's PyTorch model and step (benchmarks/torch_peer.py) at the config's shapes, float32,
  # PyTorch's default threads: the peer beside loom in the same alternation.
  "torch peer (nanoGPT float32)": {"peer": True},
  # glibc malloc backs its mmap'd chunks with transparent huge pages (where THP is `madvise`, the
  # kernel's default): a step whose buffers are mapped afresh every step faults 2 MiB at a time.
  "malloc huge pages (GLIBC_TUNABLES)": {"env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}},
  # Every thread allocates from the main arena, which grows without the 64 MiB heap limit of a
  # thread's arena, so keep_step_buffers_mapped's thresholds apply to XLA's worker threads too.
  "one malloc arena (MALLOC_ARENA_MAX=1)": {"env": {"MALLOC_ARENA_MAX": "1"}},
  "one arena with 16 GiB thresholds": {
    "env": {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=17179869184"
      ":glibc.malloc.trim_threshold=17179869184"
    }
  },
}
_DEFAULT_VARIANTS = (
  "as configured",
  "one device (no cpu_devices split)",
  "scanned layers",
  "unrolled layers",
  "bfloat16 compute",
  "fsdp over the devices instead of data",
  "YNNPACK fusions off (XLA flag)",
)


def build(config, overrides):
  overrides = dict(overrides)
  devices = jax.devices()[: overrides.pop("devices", jax.device_count())]
  overrides.pop("xla_flags", None)  # Applied by the parent, when it starts this process,
  overrides.pop("env", None)  # as are these environment variables.
  config.mesh.update(**overrides.pop("mesh", {}))
  config = validate(config, len(devices), tokenizer_vocab_size=config.model.vocab_size or 65)
  config.model.update(**overrides)
  setup = build_setup(config, devices=devices)
  mesh, graphdef = setup.mesh, setup.graphdef
  state = setup.init_state()
  rng = np.random.default_rng(0)
  b, l, v = config.train.global_batch_size, config.data.seq_len, config.model.vocab_size
  tokens = rng.integers(0, v, (b, l + 1)).astype(np.int32)
  batch = sharding.global_batch_from_local(
    {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones((b, l), np.int32),
      "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
      "weights": np.ones((b, l), np.float32),
    },
    mesh,
  )

  def mean_loss(params, batch):
    loss_sum, weight = token_losses(graphdef, params, batch)
    return loss_sum / weight

  params = jax.tree.map(jax.numpy.copy, state.params)  # The train step donates `state`.
  forward = jax.jit(mean_loss)
  backward = jax.jit(jax.grad(mean_loss))
  step = setup.train_step().lower(state, batch).compile()
  return config, {
    "forward": (forward, params, batch),
    "forward+backward": (backward, params, batch),
    "train step": (step, state, batch),
  }


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
  forwarded = [arg for arg in sys.argv[1:] if not re.match(r"--(no)?(rounds|profile|variants)\b", arg)]
  names = _VARIANTS.value or list(_DEFAULT_VARIANTS)
  unknown = [name for name in names if name not in VARIANTS]
  if unknown:
    sys.exit(f"--variants: unknown {unknown}; known are {list(VARIANTS)}")
  times = {name: collections.defaultdict(list) for name in names}
  for _ in range(_ROUNDS.value):
    for name in names:
      env = dict(_xla_flags_env(VARIANTS[name].get("xla_flags", "")), **VARIANTS[name].get("env", {}))
      result = run_child(forwarded + [f"--variant={name}"], env)
      for part, ms in result["ms"].items():
        times[name][part].append(ms)
      print(
        f"{name}: " + ", ".join(f"{part} {result['ms'][part]:.1f} ms" for part in _PARTS.value if part in result["ms"]),
        flush=True,
      )
      if "step_flops" in result:
        loom_result = result
  peak = measured_matmul_flops()
  result = loom_result
  parts = [part for part in ("forward", "forward+backward", "train step") if part in _PARTS.value]
  print(
    f"\n{result['shapes']}: {result['step_flops'] / 1e9:.2f} GFLOP per train step, "
    f"{1000 * result['step_flops'] / peak:.1f} ms at the measured float32 matmul peak ({peak / 1e9:.0f} GFLOP/s)"
  )
  print(
    f"{_ROUNDS.value} processes per variant, median of their medians; `/ first` is the train step's time "
    f"over the first variant's, the median of the rounds' ratios (processes run in alternation):"
  )
  print(
    "| variant | " + " | ".join(f"{part} ms" for part in parts) + " | / first | train step CPU ms "
    "(all threads) | page faults per train step |"
  )
  print("|---|" + "---|" * len(parts) + "---|---|---|")
  for name in names:
    cells = " | ".join(f"{np.median(times[name][part]):.1f}" for part in parts)
    ratio = (
      f"{np.median(np.array(times[name]['train step']) / np.array(times[names[0]]['train step'])):.2f}"
      if "train step" in parts
      else ""
    )
    faults = f"{np.median(times[name]['faults']):,.0f}" if times[name]["faults"] else "n/a"
    cpu = f"{np.median(times[name]['train step cpu']):.0f}" if times[name]["train step cpu"] else "n/a"
    print(f"| {name} | {cells} | {ratio} | {cpu} | {faults} |")
  if _PROFILE.value:
    name = _PROFILE_VARIANT.value
    print_op_profile(
      run_child(
        forwarded + [f"--variant={name}", "--trace"],
        _xla_flags_env(f"{VARIANTS[name].get('xla_flags', '')} --xla_cpu_enable_xprof_traceme=true"),
      ),
      float(np.median(times[name]["train step"])) if name in times else float("nan"),
      name,
    )


def _xla_flags_env(flags_to_add: str) -> dict:
  return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags_to_add}".strip())


def run_child(args, env) -> dict:
  """Runs this script on one variant in a fresh process and returns what it printed."""
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__)] + args, env=env, capture_output=True, text=True, check=False
  )
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  sys.exit(f"step_breakdown child {args} failed:\n{out.stderr[-3000:]}")


def run_variant(name):
  """In a child process: build one variant, time it (or trace its train step), print one RESULT line."""
  base = _CONFIG.value
  if VARIANTS[name].get("peer"):
    return run_peer(base)
  use_cpu_devices(base)
  keep_step_buffers_mapped()  # As train.py does.
  config, parts = build(base, VARIANTS[name])
  if _TRACE.value:
    fn, state, batch = parts["train step"]
    print("RESULT " + json.dumps(trace_op_kinds(fn, state, batch, config, _STEPS.value)))
    return
  parts = {part: value for part, value in parts.items() if part in _PARTS.value}
  times = collections.defaultdict(list)
  for _ in range(_REPEATS.value):
    for part, (fn, carry, batch) in parts.items():
      before = resource.getrusage(resource.RUSAGE_SELF)
      ms, carry = time_calls(fn, carry, batch, _STEPS.value)
      after = resource.getrusage(resource.RUSAGE_SELF)
      if part == "train step":  # Minor faults: memory the process maps afresh, here every step.
        times["faults"].append((after.ru_minflt - before.ru_minflt) / (_STEPS.value + 1))
        times["train step cpu"].append(_cpu_ms(before, after) / (_STEPS.value + 1))
      parts[part] = (fn, carry, batch)
      times[part].append(ms)
  m = config.model
  tokens = config.train.global_batch_size * config.data.seq_len
  print(
    "RESULT "
    + json.dumps(
      {
        "ms": {part: float(np.median(t)) for part, t in times.items()},
        "step_flops": model_lib.flops_per_token(m, config.data.seq_len) * tokens,
        "shapes": f"{m.num_layers} layers, {m.embed_dim} wide, vocab {m.vocab_size}, "
        f"batch {config.train.global_batch_size} x {config.data.seq_len}",
      }
    )
  )


def _cpu_ms(before, after) -> float:
  """Milliseconds of CPU time (user and system, all threads) between two getrusage calls."""
  return 1000 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def run_peer(base):
  """In a child process: time the PyTorch peer's forward loss, forward+backward and train step."""
  import torch

  from benchmarks.torch_peer import peer_for

  config = validate(base, 1, tokenizer_vocab_size=base.model.vocab_size or 65)
  m = config.model
  peer = peer_for(config, config.train.num_steps)
  rng = np.random.default_rng(0)
  b, l = config.train.global_batch_size, config.data.seq_len
  tokens = rng.integers(0, m.vocab_size, (b, l + 1))
  x, y = peer._tensor(tokens[:, :-1]), peer._tensor(tokens[:, 1:])

  def forward():
    with torch.no_grad():
      return float(peer.model(x, y)[1])

  def backward():
    peer.model(x, y)[1].backward()
    peer.model.zero_grad(set_to_none=True)
    return 0.0

  calls = {
    "forward": forward,
    "forward+backward": backward,
    "train step": lambda: peer.train_step(tokens[:, :-1], tokens[:, 1:]),
  }
  times = collections.defaultdict(list)
  for _ in range(_REPEATS.value):
    for part, call in calls.items():
      if part not in _PARTS.value:
        continue
      call()
      start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
      for _ in range(_STEPS.value):
        call()
      times[part].append(1000 * (time.perf_counter() - start) / _STEPS.value)
      if part == "train step":
        times["train step cpu"].append(_cpu_ms(before, resource.getrusage(resource.RUSAGE_SELF)) / _STEPS.value)
  print("RESULT " + json.dumps({"ms": {part: float(np.median(t)) for part, t in times.items()}}))


# Trace events that only contain or wait for others; the rest are ops, one event per op run.
_CONTAINERS = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await", "Rendezvous", "Wait: ")


def op_kind(line: str, length: int, vocab: int) -> str | None:
  """What one instruction of the compiled HLO computes, from its shapes and metadata: the part of the
  model (attention's [L, L] tensors, the logits, the optimizer, the rest of the layers) and the kind."""
  match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
  if not match:
    return None
  op_name = re.search(r'op_name="([^"]*)"', line)
  what = op_name.group(1) if op_name else ""
  kind = (
    "matmul"
    if "dot_general" in what or match[3] == "dot"
    else "reduction"
    if "reduce" in what
    else "elementwise, copies and the rest"
  )
  # Shapes in the whole line: the result's and the operands' (a fusion's operands are listed by name
  # only, so a fusion is placed by its result's shape).
  shapes = match[2] + line[match.end() :].split(", metadata=")[0]
  if re.search(rf"\b{length},{length}\]", shapes):
    part = "attention [L, L]"
  elif re.search(rf"\b{vocab}\]", match[2]) or re.search(rf"\[{vocab},", match[2]):
    part = "logits and loss (incl. output embedding)"
  elif "jvp" not in what and "transpose(" not in what:
    part = "optimizer, clipping, casts outside the model"
  else:
    part = "layers (projections, MLP, norms)"
  return f"{part}: {kind}"


def trace_op_kinds(step, state, batch, config, steps=20) -> dict:
  """Milliseconds per train step and device spent in each kind of op, from a jax.profiler trace."""
  from jax._src.lib import _profile_data

  kinds = {}  # XLA op name -> what it computes, from the compiled HLO's metadata and shapes.
  for line in step.as_text().splitlines():
    kind = op_kind(line, config.data.seq_len, config.model.vocab_size)
    if kind:
      kinds[re.match(r"\s*(?:ROOT )?%?([\w.\-]+)", line)[1]] = kind
  _, state = time_calls(step, state, batch, 1)  # Warm.
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
  return {
    "traced_step_ms": traced_ms,
    "devices": jax.device_count(),
    "threads": len(threads),
    "kinds": {kind: ns / per_step_thread for kind, ns in totals.most_common()},
  }


def print_op_profile(profile: dict, untraced_step_ms: float, name: str):
  ops_ms = sum(profile["kinds"].values())
  print(
    f"\nwhere the train step's time goes ({name}; {profile['devices']} devices, {profile['threads']} "
    f"threads in XLA's pool): {ops_ms:.1f} ms of ops per thread in a step of {profile['traced_step_ms']:.1f} ms "
    f"under the trace ({untraced_step_ms:.1f} ms untraced, the table above)"
  )
  print("| part: op kind | ms per step per thread | share |")
  print("|---|---|---|")
  for kind, ms in sorted(profile["kinds"].items()):
    print(f"| {kind} | {ms:.1f} | {ms / ops_ms:.0%} |")


if __name__ == "__main__":
  app.run(main)
