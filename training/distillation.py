"""Knowledge distillation: a student learns a fixed teacher's softened next-token distribution.

The loss of a position (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") is

  alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)

with T = config.distillation.temperature. Softening both distributions by T exposes the teacher's
ranking of the unlikely tokens; the T^2 keeps the distillation term's gradients (which scale as 1/T)
of the same size as the cross-entropy's whatever T is, so alpha alone sets the balance. Losses are
summed per row over weighted target tokens, as training/step.row_losses sums the cross-entropy, so
gradient accumulation and the mean over the batch's weight work unchanged.

The teacher is another loom checkpoint (a run's, or a tools/hf_import.py output) with the student's
vocabulary: `load_teacher` builds it from its record's model config on the student's mesh, in the
student's compute dtype, and the train step takes its parameters as an argument, never updated.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

import sharding
from model.config import ModelConfig
from model.layers import dense
from model.transformer import CHECKPOINT_INDEPENDENT_FIELDS, COMPUTE_DTYPES
from training.checkpointing import Checkpointer, locate
from training.optimizer import parameter_paths
from training.state import abstract_model
from training.validation import ConfigError

Batch = dict[str, jax.Array]

FIELD = "config.distillation.teacher"

# Model fields the student's config decides for the teacher: how the same parameters are computed on
# this run's devices (the teacher's run may have used a kernel of another platform), never what they are.
RUNTIME_FIELDS = ("attention", "attention_block", "scan_layers")


def _position_losses(student_logits_BLV, teacher_logits_BLV, targets_BL, temperature: float, alpha: float):
  """The distillation loss of every position [B, L] (float32), the teacher under stop_gradient.

  A term whose weight is 0 is not computed at all: alpha=0 is the plain cross-entropy exactly.
  """
  if student_logits_BLV.shape[-1] != teacher_logits_BLV.shape[-1]:
    raise ValueError(
      f"{FIELD}: the teacher's vocabulary has {teacher_logits_BLV.shape[-1]} tokens and the student's "
      f"{student_logits_BLV.shape[-1]}; distillation compares their distributions token by token, so both "
      "need the same tokenizer and model.vocab_size"
    )
  student_BLV = student_logits_BLV.astype(jnp.float32)
  losses_BL = jnp.zeros(targets_BL.shape, jnp.float32)
  if alpha != 1.0:
    losses_BL += (1.0 - alpha) * optax.softmax_cross_entropy_with_integer_labels(student_BLV, targets_BL)
  if alpha != 0.0:
    teacher_BLV = jax.lax.stop_gradient(teacher_logits_BLV.astype(jnp.float32))
    log_p_teacher_BLV = jax.nn.log_softmax(teacher_BLV / temperature, axis=-1)
    log_p_student_BLV = jax.nn.log_softmax(student_BLV / temperature, axis=-1)
    kl_BL = jnp.sum(jnp.exp(log_p_teacher_BLV) * (log_p_teacher_BLV - log_p_student_BLV), axis=-1)
    losses_BL += alpha * temperature**2 * kl_BL
  return losses_BL


def distillation_row_losses(
  student_logits_BLV: jax.Array,
  teacher_logits_BLV: jax.Array,
  targets_BL: jax.Array,
  weights_BL: jax.Array,
  temperature: float,
  alpha: float,
) -> tuple[jax.Array, jax.Array]:
  """Per row: the distillation loss summed over weighted target tokens [B], and the weight total [B].

  `temperature` and `alpha` are Python numbers (config values), fixed when the step is traced.
  """
  losses_BL = _position_losses(student_logits_BLV, teacher_logits_BLV, targets_BL, temperature, alpha)
  return jnp.sum(losses_BL * weights_BL, axis=1), jnp.sum(weights_BL, axis=1)


def chunked_distillation_row_losses(
  x_BLD: jax.Array,
  kernel_DV: jax.Array,
  teacher_x_BLD: jax.Array,
  teacher_kernel_DV: jax.Array,
  targets_BL: jax.Array,
  weights_BL: jax.Array,
  temperature: float,
  alpha: float,
  chunk: int,
) -> tuple[jax.Array, jax.Array]:
  """distillation_row_losses' numbers from hidden states, `chunk` positions of every row at a time.

  x [B, L, D] and kernel [D, V] are the student's final norm output and output projection
  (Transformer.hidden_states, output_kernel); teacher_x and teacher_kernel the teacher's, whose D may
  differ. As model/loss.chunked_row_losses, a lax.scan makes both logits of one chunk in a
  rematerialised step, so neither pass holds more than one chunk's [B, C, V] logits of each model.
  """
  if kernel_DV.shape[-1] != teacher_kernel_DV.shape[-1]:  # Before anything is traced.
    raise ValueError(
      f"{FIELD}: the teacher's vocabulary has {teacher_kernel_DV.shape[-1]} tokens and the student's "
      f"{kernel_DV.shape[-1]}; distillation compares their distributions token by token, so both "
      "need the same tokenizer and model.vocab_size"
    )
  batch, length, _ = x_BLD.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  weight_B = jnp.sum(weights_BL, axis=1)
  teacher_x_BLD = jax.lax.stop_gradient(teacher_x_BLD)
  teacher_kernel_DV = jax.lax.stop_gradient(teacher_kernel_DV)
  if pad:
    x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
    teacher_x_BLD = jnp.pad(teacher_x_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))

  def chunks(a_BL):  # [B, T*C, ...] -> [T, B, C, ...]: the scan's slices keep the batch sharding.
    a_TBC = a_BL.reshape((batch, num_chunks, chunk) + a_BL.shape[2:]).swapaxes(0, 1)
    return sharding.constrain(a_TBC, (None, "act_batch", "act_length", "act_embed")[: a_TBC.ndim])

  # Gather each fsdp-sharded feature dimension once here rather than in every chunk (in both passes).
  kernel_DV = sharding.constrain(kernel_DV, ("act_embed", "vocab"))
  teacher_kernel_DV = sharding.constrain(teacher_kernel_DV, ("act_embed", "vocab"))
  dtype, teacher_dtype = x_BLD.dtype, teacher_x_BLD.dtype

  @functools.partial(jax.checkpoint, prevent_cse=False)  # Inside a scan: nothing to fear from CSE.
  def chunk_losses(kernel_DV, teacher_kernel_DV, x_BCD, teacher_x_BCD, targets_BC, weights_BC):
    logits_BCV = dense(x_BCD, kernel_DV, 1, dtype).astype(jnp.float32)
    logits_BCV = sharding.constrain(logits_BCV, ("act_batch", "act_length", "act_vocab"))
    teacher_logits_BCV = dense(teacher_x_BCD, teacher_kernel_DV, 1, teacher_dtype).astype(jnp.float32)
    teacher_logits_BCV = sharding.constrain(teacher_logits_BCV, ("act_batch", "act_length", "act_vocab"))
    return _position_losses(logits_BCV, teacher_logits_BCV, targets_BC, temperature, alpha) * weights_BC

  def body(carry, xs):
    return carry, chunk_losses(kernel_DV, teacher_kernel_DV, *xs)

  xs = (chunks(x_BLD), chunks(teacher_x_BLD), chunks(targets_BL), chunks(weights_BL))
  _, losses_TBC = jax.lax.scan(body, None, xs)
  return jnp.sum(losses_TBC, axis=(0, 2)), weight_B


def teacher_hidden_states(teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State, batch: Batch):
  """The teacher's final norm output [B, L, D] and output kernel [D, V]: no dropout, no gradient."""
  teacher = nnx.merge(teacher_graphdef, teacher_params)
  x_BLD = teacher.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"])
  return jax.lax.stop_gradient(x_BLD), jax.lax.stop_gradient(teacher.output_kernel())


def teacher_logits(teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State, batch: Batch) -> jax.Array:
  """The teacher's logits [B, L, V] (float32) of a batch: no dropout, no gradient."""
  teacher = nnx.merge(teacher_graphdef, teacher_params)
  return jax.lax.stop_gradient(teacher(batch["inputs"], batch["segment_ids"], batch["positions"]))


def row_losses_with_teacher(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  teacher_graphdef: nnx.GraphDef,
  teacher_params: nnx.State,
  batch: Batch,
  temperature: float,
  alpha: float,
  dropout_key=None,
) -> tuple[jax.Array, jax.Array]:
  """training/step.row_losses with a teacher: per row, the distillation loss summed over weighted
  target tokens [B] and the weight total [B]. With the student's model.loss_chunk, both models' logits
  are made that many positions at a time. Dropout (dropout_key) applies to the student alone."""
  model = nnx.merge(graphdef, params)
  inputs = (batch["inputs"], batch["segment_ids"], batch["positions"])
  if model.cfg.loss_chunk:
    x_BLD = model.hidden_states(*inputs, dropout_key)
    teacher_x_BLD, teacher_kernel_DV = teacher_hidden_states(teacher_graphdef, teacher_params, batch)
    return chunked_distillation_row_losses(
      x_BLD,
      model.output_kernel(),
      teacher_x_BLD,
      teacher_kernel_DV,
      batch["targets"],
      batch["weights"],
      temperature,
      alpha,
      model.cfg.loss_chunk,
    )
  logits_BLV = model(*inputs, dropout_key)
  teacher_logits_BLV = teacher_logits(teacher_graphdef, teacher_params, batch)
  return distillation_row_losses(logits_BLV, teacher_logits_BLV, batch["targets"], batch["weights"], temperature, alpha)


def token_losses_with_teacher(
  graphdef, params, teacher_graphdef, teacher_params, batch: Batch, temperature: float, alpha: float, dropout_key=None
) -> tuple[jax.Array, jax.Array]:
  """training/step.token_losses with a teacher: the summed distillation loss and the weight total."""
  loss_sum_B, weight_B = row_losses_with_teacher(
    graphdef, params, teacher_graphdef, teacher_params, batch, temperature, alpha, dropout_key
  )
  return jnp.sum(loss_sum_B), jnp.sum(weight_B)


def runtime_fields(student_model_cfg) -> dict[str, Any]:
  """The `model_overrides` for load_teacher from the student's config.model: RUNTIME_FIELDS."""
  return {field: student_model_cfg[field] for field in RUNTIME_FIELDS}


def load_teacher(
  distillation_cfg,
  mesh: Mesh | AbstractMesh,
  compute_dtype,
  student_vocab_size: int,
  seq_len: int | None = None,
  model_overrides: Mapping[str, Any] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
  """The teacher of config.distillation on `mesh`: (graphdef, parameters), by load_fixed_model."""
  return load_fixed_model(
    distillation_cfg.teacher,
    distillation_cfg.step,
    mesh,
    compute_dtype,
    student_vocab_size,
    seq_len,
    model_overrides,
    field=FIELD,
    role="teacher",
    why_same_vocabulary="distillation compares their distributions token by token",
  )


def load_fixed_model(
  path: str,
  step: int,
  mesh: Mesh | AbstractMesh,
  compute_dtype,
  student_vocab_size: int,
  seq_len: int | None = None,
  model_overrides: Mapping[str, Any] | None = None,
  *,
  field: str,
  role: str,
  why_same_vocabulary: str,
) -> tuple[nnx.GraphDef, nnx.State]:
  """A fixed model (a distillation teacher, a selection reference) from checkpoint `path` (`step`;
  -1: the latest) on `mesh`: (graphdef, parameters).

  The model is the one in the checkpoint's record (its config, as a loom run or tools/hf_import.py
  saved it), sharded by the same logical-axis rules as the student; only the parameters are
  restored, floating ones cast to `compute_dtype` (the student's model.dtype: a name or a dtype),
  in which it runs. Dropout is off and nothing is rematerialised (no gradient flows through it).
  `seq_len` (data.seq_len), when given, must fit its max_seq_len. `model_overrides` sets
  CHECKPOINT_INDEPENDENT_FIELDS of it (runtime_fields of the student's config: its attention
  kernel). On an AbstractMesh, the parameters are ShapeDtypeStructs with shardings (for compiling a
  step without devices). Every error is one ConfigError naming `field`; `role` names the model in
  it and `why_same_vocabulary` says why the vocabularies must match.
  """
  where = f"{field}={path!r}"
  if not path:
    raise ConfigError(f"{field} is empty: there is no {role} to load")
  dtype_name = jnp.dtype(compute_dtype).name
  if dtype_name not in COMPUTE_DTYPES:
    raise ConfigError(f"{where}: compute dtype {dtype_name}; allowed: {', '.join(COMPUTE_DTYPES)}")
  overrides = dict(model_overrides or {})
  unknown = sorted(set(overrides) - CHECKPOINT_INDEPENDENT_FIELDS)
  if unknown:
    raise ValueError(
      f"load_fixed_model: model_overrides {unknown} are not among {sorted(CHECKPOINT_INDEPENDENT_FIELDS)}"
    )
  try:
    directory, step = locate(path, step, field=where)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  where = f"{where} ({directory}/{step})"
  checkpointer = Checkpointer(directory, async_save=False, read_only=True)
  try:
    try:
      record, saved = checkpointer.record(step), checkpointer.params_shapes(step)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign checkpoint: say which, in one line.
      raise ConfigError(f"{where}: its record cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    saved_config = record.get("config") or {}
    model_values = dict(saved_config.get("model") or {})
    if not model_values or "embed" not in saved:
      raise ConfigError(f"{where}: its record holds no model config (not a loom checkpoint of a model?)")
    if (saved_config.get("lora") or {}).get("rank", 0) > 0:
      raise ConfigError(
        f"{where}: a LoRA run's checkpoints hold its adapters alone; merge them into a plain model first "
        f"(python tools/lora.py merge --checkpoint=THAT_RUN --output=DIR) and name DIR as the {role}"
      )
    saved_vocab = saved["embed"][0]
    if saved_vocab != student_vocab_size:
      raise ConfigError(
        f"{where}: the {role}'s vocabulary has {saved_vocab} tokens and this run's (model.vocab_size) "
        f"{student_vocab_size}; {why_same_vocabulary}, so both need the same tokenizer and model.vocab_size"
      )
    model_values.update(vocab_size=saved_vocab, dtype=dtype_name, dropout_rate=0.0, remat="none", **overrides)
    try:
      model_cfg = ModelConfig.from_config(model_values)
    except ValueError as e:
      raise ConfigError(f"{where}: its record's model config does not fit this loom ({e})") from None
    if seq_len is not None and seq_len > model_cfg.max_seq_len:
      raise ConfigError(
        f"{where}: data.seq_len={seq_len} exceeds the {role}'s model.max_seq_len={model_cfg.max_seq_len}; "
        f"the {role} has no positions beyond it"
      )
    graphdef, abstract = abstract_model(model_cfg)
    paths, leaves = parameter_paths(abstract), jax.tree.leaves(abstract)
    mismatched = [f"{p} {saved.get(p)} != {leaf.shape}" for p, leaf in zip(paths, leaves) if saved.get(p) != leaf.shape]
    if mismatched:
      raise ConfigError(f"{where}: its parameters do not match the model of its record ({'; '.join(mismatched[:5])})")
    shardings = sharding.tree_shardings(abstract, mesh)

    def target(leaf, leaf_sharding):
      dtype = dtype_name if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
      return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf_sharding)

    targets = jax.tree.map(target, abstract, shardings)
    if isinstance(mesh, AbstractMesh):
      return graphdef, targets
    try:
      params = checkpointer.restore_params(step, targets)
    except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: say which, in one line.
      raise ConfigError(f"{where}: its parameters cannot be restored ({type(e).__name__}: {str(e)[:200]})") from None
  finally:
    checkpointer.close()
  return graphdef, params
