"""One setup of the train step: config -> mesh -> model -> optimizer -> shardings -> states and steps.

train(), the planner, the benchmarks and the tests all build through `build_setup`, so the state a
test checks or a benchmark times is laid out, initialised and compiled as train.py's run is.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import AbstractMesh, Mesh
from ml_collections import ConfigDict

import sharding
from model.quantization import fake_quantize_params
from training import distillation, guards, pruning, selection
from training.optimizer import build_optimizer, trainable_mask
from training.state import (
  TrainState,
  abstract_model,
  adapt,
  lora_key,
  new_train_state,
  split_trainable,
  state_rng,
  state_shardings,
  trainable_filter,
)
from training.step import make_eval_step, make_train_step
from training.validation import ConfigError


def use_cpu_devices(config: ConfigDict) -> None:
  """Applies config.cpu_devices before JAX's CPU backend starts (-1: one device per core, as many as
  the config's mesh and batch divide into); a bad value is a ConfigError naming the field."""
  try:
    sharding.use_cpu_devices(config.cpu_devices, config.mesh, config.train.global_batch_size, config.train.microbatches)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def make_mesh(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """config.mesh over `devices` (default: all), refusing an attention kernel that their platform lacks."""
  mesh = sharding.make_mesh(config.mesh, devices)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  platform = mesh.devices.flat[0].platform
  if config.model.attention == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs NVIDIA GPUs, not {platform}; use auto, xla or blockwise")
  if config.model.attention == "splash" and platform != "tpu":
    logging.warning(
      "model.attention='splash' on %s runs the TPU kernel in Pallas's interpreter, which is "
      "very slow; model.attention='auto' picks this platform's best",
      platform,
    )
  return mesh


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the train state and steps of one config on one mesh are made from.

  Built once by `build_setup`; its methods make states (fresh, from given parameters, or shapes
  alone) and the jitted steps, all in the layout `shardings` gives.
  """

  config: ConfigDict  # Validated, with its model.vocab_size known; a copy of the caller's.
  mesh: Mesh | AbstractMesh  # An AbstractMesh sizes and compiles steps, but holds no arrays.
  graphdef: nnx.GraphDef
  abstract_params: nnx.State  # ShapeDtypeStructs: nothing allocated.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  frozen: Any  # training.optimizer.trainable_mask's: 0 where a parameter is frozen; None: all train.
  shardings: TrainState  # A NamedSharding for every leaf of the train state.
  # The nnx filter of what the optimizer trains (nnx.LoRAParam with LoRA on), None: every parameter.
  # The rest is the frozen base: in the state's params, but no gradient, optimizer state or checkpoint.
  trainable: Any = None

  @property
  def lora(self) -> bool:
    return self.trainable is not None

  def plain_abstract_params(self) -> nnx.State:
    """The plain model's parameters (no adapters, as a checkpoint of a full run holds them), as
    ShapeDtypeStructs with shardings: what a LoRA run's base is restored into."""
    _, plain = abstract_model(self.config.model)
    shardings = sharding.tree_shardings(plain, self.mesh)
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), plain, shardings)

  def adapt_params(self, plain_params, seed: int | None = None) -> nnx.State:
    """A plain model's parameters made this LoRA run's (training.state.adapt): its base cast or
    quantized and the adapters of `seed` (default config.seed) added, laid out by the shardings."""
    seed = self.config.seed if seed is None else seed
    plain_graphdef, _ = abstract_model(self.config.model)

    def adapted(params):
      model = nnx.merge(plain_graphdef, params)
      adapt(model, self.config.lora, lora_key(jax.random.split(jax.random.key(seed))[0]))
      return nnx.state(model)

    return jax.jit(adapted, out_shardings=self.shardings.params)(plain_params)

  def saved_params(self, params: nnx.State) -> nnx.State:
    """What a checkpoint keeps of the parameters: the trainable part (a LoRA run's adapters alone)."""
    return split_trainable(params, self.trainable)[0]

  def saved_abstract_state(self) -> TrainState:
    """abstract_state with the parameters a checkpoint holds (`saved_params`): a restore target."""
    abstract = self.abstract_state()
    return abstract.replace(params=self.saved_params(abstract.params))

  def init_state(self, seed: int | None = None) -> TrainState:
    """A freshly initialised state (from config.seed unless given), created directly in its sharded
    layout: jitted with out_shardings, so with fsdp no device ever holds more than its shard of any
    parameter or moment."""
    seed = self.config.seed if seed is None else seed
    return jax.jit(
      lambda: new_train_state(self.config.model, self.tx, seed, self.config.lora), out_shardings=self.shardings
    )()

  def state_from_params(self, params, step: int = 0, opt_state=None, seed: int | None = None) -> TrainState:
    """The state that starts from `params` (host or device arrays: random, fixed or restored ones), placed
    with the shardings; a fresh optimizer state unless one is given, and the RNG an initialised state
    of `seed` (default config.seed) would have."""
    seed = self.config.seed if seed is None else seed
    params = jax.device_put(params, self.shardings.params)
    if opt_state is None:
      opt_state = jax.jit(
        lambda p: self.tx.init(split_trainable(p, self.trainable)[0]), out_shardings=self.shardings.opt_state
      )(params)
    return TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), self.shardings.step),
      params=params,
      opt_state=opt_state,
      rng=jax.device_put(state_rng(seed), self.shardings.rng),
    )

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the target a checkpoint is restored into, or what a step is
    compiled for without any array."""
    shapes = jax.eval_shape(lambda: new_train_state(self.config.model, self.tx, 0, self.config.lora))
    return jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), shapes, self.shardings
    )

  def load_teacher(self):
    """config.distillation's teacher, (graphdef, params) on this mesh in the compute dtype; None when
    distillation is off. On an AbstractMesh, its parameters are shapes with shardings."""
    cfg = self.config
    if not cfg.distillation.teacher:
      return None
    return distillation.load_teacher(
      cfg.distillation,
      self.mesh,
      cfg.model.dtype,
      cfg.model.vocab_size,
      seq_len=cfg.data.seq_len,
      model_overrides=distillation.runtime_fields(cfg.model),
    )

  def load_reference(self):
    """config.selection's reference model (RHO-loss), (graphdef, params) on this mesh in the compute
    dtype; None without one. On an AbstractMesh, its parameters are shapes with shardings."""
    cfg = self.config
    if not selection.reference_of(cfg):
      return None
    return distillation.load_fixed_model(
      cfg.selection.reference,
      cfg.selection.reference_step,
      self.mesh,
      cfg.model.dtype,
      cfg.model.vocab_size,
      seq_len=cfg.data.seq_len,
      model_overrides=distillation.runtime_fields(cfg.model),
      field=selection.FIELD,
      role="reference model",
      why_same_vocabulary="RHO-loss subtracts its loss on the same tokens",
    )

  def train_step(self, teacher=None, reference=None):
    """The jitted `step(state, batch) -> (state, metrics)` of training/step.py, the state donated;
    `teacher` (load_teacher's) when config.distillation.teacher is set, `reference` (load_reference's)
    when config.selection.reference is."""
    if (teacher is None) != (not self.config.distillation.teacher):
      raise ValueError("Setup.train_step: pass load_teacher()'s teacher exactly when distillation.teacher is set")
    if (reference is None) != (not selection.reference_of(self.config)):
      raise ValueError("Setup.train_step: pass load_reference()'s model exactly when selection.reference is set")
    distill = self.config.distillation
    return make_train_step(
      self.graphdef,
      self.tx,
      self.schedule,
      self.mesh,
      self.shardings,
      self.config.train.microbatches,
      dropout=self.config.model.dropout_rate > 0 or (self.lora and self.config.lora.dropout > 0),
      trainable=self.trainable,
      params_transform=self.params_transform(),
      teacher=None if teacher is None else (*teacher, distill.temperature, distill.alpha),
      sparsity_of=self.sparsity_of(),
      z_loss=self.config.train.z_loss,
      label_smoothing=self.config.train.label_smoothing,
      select_rows=selection.step_selection(self.config),  # config.selection (0: off).
      reference=reference,
    )

  def eval_step(self, per_row: bool = False, byte_lengths=None):
    """The jitted `eval(params, batch) -> (loss_sum, weight)`; with per_row, one of each per row; with
    byte_lengths, training.step.row_eval_sums' metrics (make_eval_step)."""
    return make_eval_step(
      self.graphdef,
      self.mesh,
      self.shardings.params,
      per_row=per_row,
      byte_lengths=byte_lengths,
      params_transform=self.params_transform(),
    )

  def sparsity_of(self):
    """With pruning on, the function of the parameters whose value the step logs as "sparsity"."""
    if self.config.pruning.method == "none":
      return None
    return functools.partial(pruning.overall_sparsity, targets=self.config.pruning.targets)

  def params_transform(self):
    """What the forward passes of training and evaluation apply to the parameters: quantization-aware
    training's fake quantization of the block kernels (quantization.qat), else None."""
    qat = self.config.quantization
    if qat.qat == "none":
      return None
    return functools.partial(fake_quantize_params, kind=qat.qat, block=qat.block)


def build_setup(
  config: ConfigDict, mesh: Mesh | AbstractMesh | None = None, devices: Sequence[jax.Device] | None = None
) -> Setup:
  """The setup of a validated config (training.validation.validate, with the tokenizer's vocabulary).

  `mesh`: the mesh to lay the state out on; an AbstractMesh of a target's shape plans a run without
  its devices. Default: config.mesh over `devices` (default: all), checked by `make_mesh`. A config
  the model or optimizer refuses (init.freeze naming no parameter) raises ConfigError.
  """
  config = config.copy_and_resolve_references()  # Later edits of the caller's config cannot reach it.
  if mesh is None:
    mesh = make_mesh(config, devices)
  try:
    graphdef, abstract_params = abstract_model(config.model, config.lora)
    frozen = trainable_mask(abstract_params, config.init.freeze, config.init.freeze_layers, config.model.num_layers)
  except ValueError as e:  # init.freeze or lora.targets naming no parameter.
    raise ConfigError(str(e)) from None
  trainable = trainable_filter(config.lora)
  trained_params = split_trainable(abstract_params, trainable)[0]
  tx, schedule = build_optimizer(
    config.optimizer, config.train.num_steps, trained_params, frozen, pruning=config.pruning
  )
  tx = guards.with_spike_guard(tx, config.train)  # train.spike_factor's window: optimizer state, checkpointed.
  return Setup(
    config=config,
    mesh=mesh,
    graphdef=graphdef,
    abstract_params=abstract_params,
    tx=tx,
    schedule=schedule,
    frozen=frozen,
    shardings=state_shardings(abstract_params, tx, mesh, trainable=trainable),
    trainable=trainable,
  )
