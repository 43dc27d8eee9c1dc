"""One setup of the train step: config -> mesh -> model -> optimizer -> shardings -> states and steps.

train(), the planner, the benchmarks and the tests all build through `build_setup`, so the state a
test checks or a benchmark times is laid out, initialised and compiled as train.py's run is.
"""

import dataclasses
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
from training.optimizer import build_optimizer, trainable_mask
from training.state import TrainState, abstract_model, new_train_state, state_rng, state_shardings
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

  def init_state(self, seed: int | None = None) -> TrainState:
    """A freshly initialised state (from config.seed unless given), created directly in its sharded
    layout: jitted with out_shardings, so with fsdp no device ever holds more than its shard of any
    parameter or moment."""
    seed = self.config.seed if seed is None else seed
    return jax.jit(lambda: new_train_state(self.config.model, self.tx, seed), out_shardings=self.shardings)()

  def state_from_params(self, params, step: int = 0, opt_state=None, seed: int | None = None) -> TrainState:
    """The state that starts from `params` (host or device arrays: random, fixed or restored ones), placed
    with the shardings; a fresh optimizer state unless one is given, and the RNG an initialised state
    of `seed` (default config.seed) would have."""
    seed = self.config.seed if seed is None else seed
    params = jax.device_put(params, self.shardings.params)
    if opt_state is None:
      opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
    return TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), self.shardings.step),
      params=params,
      opt_state=opt_state,
      rng=jax.device_put(state_rng(seed), self.shardings.rng),
    )

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: the target a checkpoint is restored into, or what a step is
    compiled for without any array."""
    shapes = jax.eval_shape(lambda: new_train_state(self.config.model, self.tx, 0))
    return jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), shapes, self.shardings
    )

  def train_step(self):
    """The jitted `step(state, batch) -> (state, metrics)` of training/step.py, the state donated."""
    return make_train_step(
      self.graphdef,
      self.tx,
      self.schedule,
      self.mesh,
      self.shardings,
      self.config.train.microbatches,
      dropout=self.config.model.dropout_rate > 0,
    )

  def eval_step(self, per_row: bool = False):
    """The jitted `eval(params, batch) -> (loss_sum, weight)`; with per_row, one of each per row."""
    return make_eval_step(self.graphdef, self.mesh, self.shardings.params, per_row=per_row)


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
  graphdef, abstract_params = abstract_model(config.model)
  try:
    frozen = trainable_mask(abstract_params, config.init.freeze, config.init.freeze_layers, config.model.num_layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  tx, schedule = build_optimizer(config.optimizer, config.train.num_steps, abstract_params, frozen)
  return Setup(
    config=config,
    mesh=mesh,
    graphdef=graphdef,
    abstract_params=abstract_params,
    tx=tx,
    schedule=schedule,
    frozen=frozen,
    shardings=state_shardings(abstract_params, tx, mesh),
  )
