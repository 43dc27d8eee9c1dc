"""Will a config fit the slice it names, and how fast will it run? Answered from any machine.

For a TPU slice the real train step is compiled for that topology here (libtpu compiles
ahead of time without a TPU), and the compiler's memory analysis is the per-chip memory. A GPU
that is not attached has no compiler here: its memory is estimated from the model instead, and
the plan says so. Step time and MFU are a roofline estimate that loom counts itself (matmul
FLOPs with the remat policy's recomputation, collective bytes over the chip's links), since
XLA's cost analysis counts a scanned layer body once.
"""

import dataclasses
import itertools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

import model as model_lib
import sharding
from training import accelerators, selection
from training.accelerators import Chip, GiB
from training.setup import build_setup
from training.validation import ConfigError, validate

# Chips per slice name for TPUs whose name counts TensorCores (two per chip), and the
# slice shapes that get_topology_desc accepts.
_TENSORCORES_IN_NAME = {"v4", "v5p"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
  4096: "16x16x16",
}
_GPU_KINDS = ("a100", "h100", "h200")
# model.REMAT_POLICIES, least recomputation first: the order --search tries them in.
REMAT_SEARCH = tuple(sorted(model_lib.REMAT_POLICIES, key=("none", "dots", "proj", "full", "offload").index))


@dataclasses.dataclass
class Target:
  """Where a plan is for: `num_chips` of `chip`, and the devices to compile for (None: no compiler)."""

  name: str
  chip: Chip | None
  num_chips: int
  devices: list | None


def resolve_target(name: str) -> Target:
  """`v5p-64`, `v5e-16`, `v6e:8x8`, `h100-8`, or `local` (the devices attached to this process)."""
  name = name.strip()
  if name == "local":
    devices = jax.devices()
    return Target(
      f"local ({len(devices)} x {devices[0].device_kind})",
      accelerators.chip_for_device_kind(devices[0].device_kind),
      len(devices),
      devices,
    )
  gpu = re.fullmatch(r"(a100|h100|h200)-(\d+)", name.lower())
  if gpu:
    return Target(name, accelerators.CHIPS[gpu.group(1)], int(gpu.group(2)), None)
  by_count = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.lower())
  by_shape = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name.lower())
  if not (by_count or by_shape):
    raise ConfigError(
      f"--topology={name!r}: expected a TPU slice (v5e-16, v5p-64, v6e-256, or v5p:4x4x4), "
      f"a GPU count ({', '.join(k + '-8' for k in _GPU_KINDS)}) or 'local'"
    )
  generation = (by_count or by_shape).group(1)
  if by_count:
    count = int(by_count.group(2))
    chips = count // 2 if generation in _TENSORCORES_IN_NAME else count
    shapes = _SHAPES_3D if generation in _TENSORCORES_IN_NAME else _SHAPES_2D
    if chips not in shapes:
      raise ConfigError(
        f"--topology={name!r}: no {generation} slice of {count} "
        f"{'TensorCores' if generation in _TENSORCORES_IN_NAME else 'chips'}; known sizes: "
        + ", ".join(f"{generation}-{n * (2 if generation in _TENSORCORES_IN_NAME else 1)}" for n in shapes)
      )
    shape = shapes[chips]
  else:
    shape = by_shape.group(2)
  from jax.experimental import topologies  # Needs libtpu (pip install "jax[tpu]").

  try:
    devices = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{generation}:{shape}", chips_per_host_bounds=(2, 2, 1)
    ).devices
  except Exception as e:  # noqa: BLE001 -- no libtpu, or a shape it does not know.
    raise ConfigError(
      f"--topology={name!r}: cannot describe TPU {generation}:{shape} here ({e}); "
      "compiling for a TPU needs libtpu: pip install 'jax[tpu]'"
    ) from None
  return Target(
    f"{name} ({generation}:{shape}, {len(devices)} chips)", accelerators.CHIPS[generation], len(devices), list(devices)
  )


@dataclasses.dataclass
class Plan:
  """One config on one target, per chip."""

  target: str
  mesh: dict[str, int]
  batch: str  # "global x length (per chip per microbatch)"
  settings: dict[str, Any]  # remat, attention, microbatches, loss_chunk
  params_bytes: float
  opt_state_bytes: float
  batch_bytes: float
  temp_bytes: float | None  # temporaries (compiler) or activations (estimate)
  code_bytes: float | None
  total_bytes: float | None
  hbm_bytes: float | None
  fits: bool | None
  memory_source: str  # "compiled for ..." or "estimated from the model"
  model_flops: float  # per step, all chips (6N + attention: what MFU counts)
  executed_flops: float  # with rematerialisation's recomputation
  step_seconds: float | None  # roofline estimate
  mfu: float | None
  compile_seconds: float | None
  error: str = ""

  def overrides(self) -> str:
    fields = [f"--config.mesh.{axis}={size}" for axis, size in self.mesh.items()]
    fields += [
      f"--config.model.{key}={str(value).split(' ')[0]}"
      for key, value in self.settings.items()
      if key != "microbatches"
    ]
    fields.append(f"--config.train.microbatches={self.settings['microbatches']}")
    return " ".join(fields)

  def floor_bytes(self) -> float:
    """What is known to be needed: the state, the batch and the temporaries."""
    return self.params_bytes + self.opt_state_bytes + self.batch_bytes + (self.temp_bytes or 0)

  def report(self) -> str:
    def gib(b):
      return "?" if b is None else f"{b / GiB:.2f} GiB" if b >= 0.01 * GiB else f"{b / 2**20:.1f} MiB"

    lines = [
      f"target        {self.target}",
      f"mesh          {self.mesh}   batch {self.batch}",
      "settings      " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
      f"per chip      parameters {gib(self.params_bytes)}, optimizer state {gib(self.opt_state_bytes)}, "
      f"batch {gib(self.batch_bytes)}",
      f"              temporaries {gib(self.temp_bytes)}, code {gib(self.code_bytes)}",
      f"              total {gib(self.total_bytes) if self.total_bytes else 'at least ' + gib(self.floor_bytes())}"
      f" of {gib(self.hbm_bytes)} HBM ({self.memory_source})",
      f"FLOPs/step    {self.model_flops:.3e} model, {self.executed_flops:.3e} executed (with recomputation)",
    ]
    if self.step_seconds is not None:
      lines.append(
        f"estimate      {self.step_seconds * 1e3:.0f} ms/step, MFU {self.mfu:.1%} (roofline: matmul "
        "FLOPs at peak, collectives over the chip's links, overlapped; an upper bound)"
      )
    if self.compile_seconds is not None:
      lines.append(f"compile       {self.compile_seconds:.1f} s")
    verdict = ("FITS" if self.fits else "DOES NOT FIT") if self.fits is not None else "UNKNOWN (no memory limit known)"
    lines.append(f"verdict       {verdict}" + (f": {self.error}" if self.error else ""))
    return "\n".join(lines)


def _per_device_bytes(abstract_tree, shardings_tree) -> float:
  total = 0.0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
    shard_shape = leaf_sharding.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(global_batch: int, length: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as shapes, sharded as sharding.global_batch_from_local places it."""
  batch_sharding = sharding.logical_to_sharding(("act_batch", None), mesh)
  return {
    name: jax.ShapeDtypeStruct(
      (global_batch, length), jnp.float32 if name == "weights" else jnp.int32, sharding=batch_sharding
    )
    for name in ("inputs", "targets", "segment_ids", "positions", "weights")
  }


def compiled_bytes(memory) -> float:
  """Peak bytes per device a compiled step holds: its arguments, temporaries, code, and outputs
  that are not written into donated arguments."""
  return (
    memory.argument_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )


_OUT_OF_MEMORY = re.compile(
  r"Ran out of memory in memory space (\w+)|Ran out of memory on (\w+)|"
  r"RESOURCE_EXHAUSTED",
  re.IGNORECASE,
)
_SIZES = re.compile(r"\(([\d.]+)([KMGT])\)")


def out_of_memory_summary(error: Exception) -> tuple[str, float | None] | None:
  """(one line, bytes needed) from a compiler's out-of-memory error; None for other errors."""
  text = str(error)
  if not _OUT_OF_MEMORY.search(text):
    return None
  line = next((l.strip() for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
  line = line.split("RESOURCE_EXHAUSTED: ")[-1]
  sizes = [float(v) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[u] for v, u in _SIZES.findall(line)]
  return line[:300], (sizes[0] if sizes else None)


def _weights(cfg) -> tuple[float, float, float]:
  """(all matmul weights, the blocks' weights, the output projection's) as parameter counts."""
  blocks = model_lib.num_params(cfg, include_embeddings=False) - cfg.embed_dim * (
    0 if cfg.tie_embeddings else cfg.vocab_size
  )
  head = cfg.vocab_size * cfg.embed_dim
  return blocks + head, blocks, head


def estimate_step(cfg: ConfigDict, chip: Chip, num_chips: int, mesh_sizes: dict[str, int]) -> dict[str, float]:
  """The roofline estimate: FLOPs (model and executed) and seconds per step.

  Recomputation by remat policy (forward FLOPs per token per layer): full repeats the block's
  forward; proj/offload the MLP's up (and gate) matmuls and the attention core; dots and none
  recompute no matmul. A chunked loss repeats the output projection's forward. Collectives:
  fsdp gathers the weights twice and reduce-scatters the gradients once per microbatch; data
  parallelism all-reduces the gradients once; tensor parallelism all-reduces the block's
  activations four times a layer (six with full remat).
  """
  m, t = cfg.model, cfg.train
  length, tokens = cfg.data.seq_len, t.global_batch_size * cfg.data.seq_len
  weights, block_weights, head_weights = _weights(m)
  attention_fwd = 4 * m.num_layers * m.num_heads * m.head_dim * length  # per token, all layers
  model_flops = model_lib.flops_per_token(m, length) * tokens
  recompute = {
    "none": 0.0,
    "dots": 0.0,
    "full": 2 * block_weights + attention_fwd,
    "proj": m.num_layers * 2 * m.embed_dim * m.mlp_dim * (2 if m.mlp == "swiglu" else 1) + attention_fwd,
  }
  recompute["offload"] = recompute["proj"]
  executed = model_flops + tokens * (recompute[m.remat] + (2 * head_weights if m.loss_chunk else 0))
  compute_s = executed / num_chips / chip.peak_flops

  c = 2 if m.dtype == "bfloat16" else 4
  data, fsdp, tensor = mesh_sizes["data"], mesh_sizes["fsdp"], mesh_sizes["tensor"]
  k = t.microbatches
  link_bytes = 0.0
  if fsdp > 1:
    shard = (fsdp - 1) / fsdp / tensor
    link_bytes += k * weights * (2 * c + 4) * shard
  if data > 1:
    link_bytes += 2 * (data - 1) / data * weights * 4 / (fsdp * tensor)
  if tensor > 1:
    tokens_per_shard = tokens / (data * fsdp)
    reductions = 6 if m.remat == "full" else 4
    link_bytes += reductions * m.num_layers * 2 * (tensor - 1) / tensor * tokens_per_shard * m.embed_dim * c
  link_s = link_bytes / chip.ici_bytes_per_s
  host_s = 0.0
  if m.remat == "offload":  # Saved projections go out in the forward pass and come back in the backward.
    saved = m.num_layers * (2 * m.num_heads * m.head_dim + 2 * m.num_kv_heads * m.head_dim + m.embed_dim + m.mlp_dim)
    host_s = 2 * tokens / (data * fsdp) * saved * c / tensor / chip.host_bytes_per_s
  step_s = max(compute_s, link_s, host_s)
  return dict(
    model_flops=model_flops,
    executed_flops=executed,
    step_seconds=step_s,
    mfu=model_flops / num_chips / chip.peak_flops / step_s,
  )


def _platform(target: Target) -> str:
  return target.devices[0].platform if target.devices else "gpu"  # Only an absent GPU has no devices.


def resolved_attention(cfg: ConfigDict, platform: str) -> str:
  """What model.attention runs as on `platform` (model/attention.resolve_implementation's rule for
  the shapes a plan is for)."""
  if cfg.model.attention != "auto":
    return cfg.model.attention
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    cudnn_fits = cfg.model.dtype == "bfloat16" and cfg.model.head_dim % 8 == 0 and cfg.model.head_dim <= 128
    return "cudnn" if cudnn_fits and cfg.data.seq_len % 2 == 0 else "blockwise"
  return "xla" if cfg.data.seq_len < 512 else "blockwise"


def estimate_activation_bytes(cfg: ConfigDict, mesh_sizes: dict[str, int], platform: str = "tpu") -> float:
  """Per chip, without a compiler: what the remat policy saves for every layer, one layer's full
  working set, the gathered weights of one layer, and the loss chunk's float32 logits; with cuDNN,
  packed rows' [L, L] segment mask, the bias cuDNN makes of it and that bias's gradient."""
  m, t = cfg.model, cfg.train
  c = 2 if m.dtype == "bfloat16" else 4
  rows = t.global_batch_size // t.microbatches // (mesh_sizes["data"] * mesh_sizes["fsdp"])
  tokens = rows * cfg.data.seq_len
  tensor = mesh_sizes["tensor"]
  d, f, qkv = m.embed_dim, m.mlp_dim * (2 if m.mlp == "swiglu" else 1), (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
  whole_layer = 4 * d + (qkv + m.num_heads * m.head_dim + f + m.mlp_dim) / tensor + 2 * d
  saved = {
    "none": whole_layer,
    "dots": 2 * d + (qkv + m.num_heads * m.head_dim + f) / tensor,
    "proj": 2 * d + (qkv + m.mlp_dim) / tensor,
    "offload": d,
    "full": d,
  }[m.remat]
  _, block_weights, _ = _weights(m)
  layer_weights = block_weights / m.num_layers * c / tensor
  chunk = (m.loss_chunk or cfg.data.seq_len) * rows
  logits = 3 * chunk * m.vocab_size / tensor * 4
  mask = rows * cfg.data.seq_len**2 * (1 + 4 + 4) if resolved_attention(cfg, platform) == "cudnn" else 0
  return tokens * c * (m.num_layers * saved + 2 * whole_layer) + 2 * layer_weights + logits + mask


def plan(config: ConfigDict, target: Target, compile_step: bool = True) -> Plan:
  """Compiles (or, for an absent GPU, estimates) `config`'s train step on `target`."""
  cfg = validate(config, target.num_chips)
  if cfg.model.vocab_size == 0:
    raise ConfigError(
      "model.vocab_size=0 (the tokenizer's): a plan needs the model's vocabulary size; set model.vocab_size"
    )
  mesh_sizes = sharding.resolve_mesh_shape(dict(cfg.mesh), target.num_chips)
  chip = target.chip
  # Shardings need a mesh of the target's shape; without its devices a same-shaped mesh of
  # abstract devices gives the same per-device shapes.
  mesh = (
    sharding.make_mesh(cfg.mesh, target.devices)
    if target.devices
    else jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  )
  setup = build_setup(cfg, mesh)
  abstract_state = setup.abstract_state()
  params_bytes = _per_device_bytes(abstract_state.params, setup.shardings.params)
  opt_bytes = _per_device_bytes(abstract_state.opt_state, setup.shardings.opt_state)
  global_batch, length = cfg.train.global_batch_size, cfg.data.seq_len
  batch = abstract_batch(selection.loaded_batch_size(cfg), length, mesh)  # Online selection's candidates.
  batch_bytes = sum(_per_device_bytes(leaf, leaf.sharding) for leaf in batch.values())
  rows = global_batch // (mesh_sizes["data"] * mesh_sizes["fsdp"]) // cfg.train.microbatches
  platform = _platform(target)
  attention = resolved_attention(cfg, platform)
  settings = dict(
    remat=cfg.model.remat,
    attention=attention if cfg.model.attention == attention else f"auto ({attention})",
    loss_chunk=cfg.model.loss_chunk,
    microbatches=cfg.train.microbatches,
  )
  estimate = (
    estimate_step(cfg, chip, target.num_chips, mesh_sizes)
    if chip
    else dict(
      model_flops=model_lib.flops_per_token(cfg.model, length) * global_batch * length,
      executed_flops=float("nan"),
      step_seconds=None,
      mfu=None,
    )
  )
  result = Plan(
    target=target.name,
    mesh=mesh_sizes,
    batch=f"{global_batch} x {length} ({rows} rows per chip per microbatch)",
    settings=settings,
    params_bytes=params_bytes,
    opt_state_bytes=opt_bytes,
    batch_bytes=batch_bytes,
    temp_bytes=None,
    code_bytes=None,
    total_bytes=None,
    hbm_bytes=chip.hbm_bytes if chip else None,
    fits=None,
    memory_source="",
    compile_seconds=None,
    **estimate,
  )
  if not target.devices or not compile_step:
    activations = estimate_activation_bytes(cfg, mesh_sizes, platform)
    # Parameters, optimizer state, float32 gradients (the size of the parameters) and the batch.
    result.temp_bytes = activations + params_bytes
    result.total_bytes = params_bytes + opt_bytes + batch_bytes + result.temp_bytes
    result.memory_source = "estimated from the model: no compiler for this target here"
  else:
    start = time.perf_counter()
    try:
      compiled = setup.train_step(setup.load_teacher(), setup.load_reference()).lower(abstract_state, batch).compile()
    except Exception as e:  # noqa: BLE001 -- the compiler's out-of-memory error is the answer.
      summary = out_of_memory_summary(e)
      if summary is None:
        raise
      result.compile_seconds = time.perf_counter() - start
      result.error, result.temp_bytes = summary
      result.fits = False
      result.memory_source = f"the compiler for {target.name}, which stopped: out of memory"
      return result
    result.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result.temp_bytes = memory.temp_size_in_bytes
    result.code_bytes = memory.generated_code_size_in_bytes
    result.total_bytes = compiled_bytes(memory)
    result.memory_source = f"compiled for {target.name}"
  if result.hbm_bytes is not None:
    result.fits = result.total_bytes <= result.hbm_bytes
    if not result.fits and not result.error:
      result.error = f"needs {result.total_bytes / GiB:.2f} GiB per chip, {result.hbm_bytes / GiB:.2f} GiB available"
  return result


def _loss_chunk(cfg: ConfigDict, mesh_sizes: dict[str, int], logits_bytes: float = GiB) -> int:
  """The longest power-of-two chunk of positions whose float32 logits per chip stay under `logits_bytes`."""
  rows = cfg.train.global_batch_size // cfg.train.microbatches // (mesh_sizes["data"] * mesh_sizes["fsdp"])
  chunk = 1 << (cfg.data.seq_len.bit_length() - 1)
  while chunk > 16 and rows * chunk * cfg.model.vocab_size / mesh_sizes["tensor"] * 4 > logits_bytes:
    chunk //= 2
  return chunk


def candidates(config: ConfigDict, target: Target) -> list[ConfigDict]:
  """Configs that differ from `config` in remat, microbatches, the tensor-parallel size and the
  loss chunk, every one valid on the target, fastest estimate first."""
  cfg = validate(config, target.num_chips)
  on_tpu = target.devices is not None and target.devices[0].platform == "tpu"
  remats = [r for r in REMAT_SEARCH if r != "offload" or on_tpu]
  meshes = [dict(cfg.mesh)] + [dict(data=1, fsdp=-1, tensor=t) for t in (1, 2, 4, 8)]
  out, seen = [], set()
  for remat, micro, mesh, chunked in itertools.product(remats, (1, 2, 4, 8, 16, 32), meshes, (False, True)):
    candidate = ConfigDict(config.to_dict())
    candidate.model.remat = remat
    candidate.train.microbatches = micro
    candidate.mesh.update(mesh)
    try:
      checked = validate(candidate, target.num_chips)
    except ConfigError:
      continue
    sizes = sharding.resolve_mesh_shape(dict(checked.mesh), target.num_chips)
    chunk = _loss_chunk(checked, sizes) if chunked else cfg.model.loss_chunk
    candidate.model.loss_chunk = checked.model.loss_chunk = chunk
    key = (remat, micro, tuple(sizes.values()), chunk)
    if key in seen:
      continue
    seen.add(key)
    seconds = estimate_step(checked, target.chip, target.num_chips, sizes)["step_seconds"]
    # Equal estimates (compute-bound candidates) prefer fewer, larger microbatches, which the
    # roofline does not see but a chip does, then less memory.
    out.append(
      (
        (
          round(seconds, 3 - int(math.floor(math.log10(seconds)))),
          micro,
          estimate_activation_bytes(checked, sizes, _platform(target)),
        ),
        candidate,
      )
    )
  out.sort(key=lambda item: item[0])
  return [candidate for _, candidate in out]


def search(config: ConfigDict, target: Target, max_compiles: int = 8, log=print) -> Plan:
  """The fastest (by estimate) candidate that fits; raises ConfigError with the numbers if none
  of the first `max_compiles` compiled candidates does."""
  if target.chip is None:
    raise ConfigError(f"--search on {target.name}: no memory limit is known for these devices")
  tried = []
  for candidate in candidates(config, target):
    cfg = validate(candidate, target.num_chips)
    sizes = sharding.resolve_mesh_shape(dict(cfg.mesh), target.num_chips)
    # Candidates estimated at over twice the chip's memory are not worth a compile.
    if estimate_activation_bytes(cfg, sizes, _platform(target)) < 2 * target.chip.hbm_bytes:
      result = plan(candidate, target)
      tried.append(result)
      need = (
        f"{result.total_bytes / GiB:.2f} GiB" if result.total_bytes else f"over {result.floor_bytes() / GiB:.2f} GiB"
      )
      log(
        f"  tried {result.overrides()}: {need}, {'fits' if result.fits else 'does not fit'}, "
        f"est. {result.step_seconds * 1e3:.0f} ms/step"
      )
      if result.fits:
        return result
      if len(tried) >= max_compiles:
        break
  best = min(tried, key=lambda p: p.total_bytes or p.floor_bytes()) if tried else None
  raise ConfigError(
    f"no plan fits {target.name} among the {len(tried)} compiled: the smallest, "
    f"{best.overrides() if best else '-'}, needs "
    f"{(best.total_bytes or best.floor_bytes()) / GiB if best else 0:.2f} GiB per chip of "
    f"{target.chip.hbm_bytes / GiB:.2f} GiB; "
    "lower train.global_batch_size or data.seq_len, or use a larger slice"
  )


def check_fits(compiled, device) -> None:
  """Stops a run whose compiled step needs more memory than its devices have, with the numbers.

  TPUs refuse such a program when it compiles (see compile_error); GPUs would fail at the first
  allocation. CPUs report no limit and are not checked.
  """
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 -- devices without memory statistics.
    limit = None
  if not limit:
    return
  memory = compiled.memory_analysis()
  need = compiled_bytes(memory)
  if need > limit:
    raise ConfigError(
      f"the train step needs {need / GiB:.2f} GiB per device (arguments {memory.argument_size_in_bytes / GiB:.2f}"
      f", temporaries {memory.temp_size_in_bytes / GiB:.2f}, code {memory.generated_code_size_in_bytes / GiB:.2f})"
      f" but {device.device_kind} has {limit / GiB:.2f} GiB; " + _ADVICE
    )


_ADVICE = (
  "python tools/plan.py --config=CONFIG --topology=local --search finds remat, microbatches and a "
  "mesh that fit (model.remat, train.microbatches, mesh.*, model.loss_chunk)"
)


def compile_error(error: Exception) -> ConfigError | None:
  """A compiler's out-of-memory error as one config error with its numbers; None for other errors."""
  summary = out_of_memory_summary(error)
  if summary is None:
    return None
  return ConfigError(f"the train step does not fit the devices' memory: {summary[0]}; " + _ADVICE)
