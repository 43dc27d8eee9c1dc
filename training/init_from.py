"""Start a run from another run's checkpoint: continued pre-training, fine-tuning, converted models.

`init.checkpoint` names a loom workdir, its checkpoints/ directory or one
checkpoints/STEP directory. The parameters are restored onto this run's mesh and
dtypes (Orbax reshards them); a larger model.vocab_size extends the embedding
(and an untied head) with rows equal to the mean of the existing ones, so new
tokens start as an "average" token instead of noise. The optimizer state and
the step counter come along only when asked; otherwise this run's optimizer and
schedule start afresh (a re-warmup to the new peak, then its decay).
"""

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from training.checkpointing import Checkpointer, locate
from training.optimizer import parameter_paths
from training.setup import Setup
from training.state import TrainState


def _extend_rows(array: jax.Array, rows: int, axis: int) -> jax.Array:
  """Appends rows (along `axis`) equal to the mean of the existing ones."""
  mean = jnp.mean(array, axis=axis, keepdims=True)
  extra = list(array.shape)
  extra[axis] = rows - array.shape[axis]
  return jnp.concatenate([array, jnp.broadcast_to(mean, extra).astype(array.dtype)], axis=axis)


def initial_state(init_cfg, setup: Setup) -> tuple[TrainState, dict]:
  """The state this run starts from, built from init.checkpoint; and that checkpoint's record.

  A LoRA run (lora.rank > 0) takes the checkpoint's model as its base (Setup.adapt_params).
  """
  abstract_state, shardings = setup.abstract_state(), setup.shardings
  directory, step = locate(init_cfg.checkpoint, init_cfg.step, field="init.checkpoint")
  source = Checkpointer(directory, async_save=False, read_only=True)
  record = source.record(step)
  if (record.get("config") or {}).get("lora", {}).get("rank", 0) > 0:
    raise ValueError(
      f"init.checkpoint: {directory}/{step} is a LoRA run's checkpoint (adapters alone); merge it into "
      "its base first (tools/lora.py merge) and start from the merged checkpoint"
    )
  saved = source.params_shapes(step)
  abstract_params = setup.plain_abstract_params() if setup.lora else abstract_state.params
  paths = parameter_paths(abstract_params)
  missing = sorted(set(paths) - set(saved))
  if missing:
    raise ValueError(
      f"init.checkpoint: {directory}/{step} has no parameters {missing[:5]}; is it "
      "a checkpoint of this model? (its config is in its record)"
    )
  vocab = setup.config.model.vocab_size
  replicated = jax.sharding.NamedSharding(shardings.step.mesh, jax.sharding.PartitionSpec())

  def target(path, leaf):
    shape = saved[path]
    if shape == leaf.shape:
      return leaf
    grown = [axis for axis, (old, new) in enumerate(zip(shape, leaf.shape)) if old != new]
    if (
      path not in ("embed", "head")
      or len(shape) != len(leaf.shape)
      or len(grown) != 1
      or (leaf.shape[grown[0]] != vocab or shape[grown[0]] > vocab)
    ):
      raise ValueError(
        f"init.checkpoint: parameter {path} has shape {shape} there and {leaf.shape} "
        "here; only model.vocab_size may grow"
      )
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=replicated)

  targets = jax.tree.unflatten(
    jax.tree.structure(abstract_params), [target(p, leaf) for p, leaf in zip(paths, jax.tree.leaves(abstract_params))]
  )
  params = source.restore_params(step, targets)
  if jax.tree.leaves(targets) != jax.tree.leaves(abstract_params):

    def grow(path, array, leaf):
      if array.shape == leaf.shape:
        return array
      axis = 0 if path == "embed" else 1
      logging.info("init: %s extended from %d to %d rows with their mean", path, array.shape[axis], vocab)
      return _extend_rows(array, vocab, axis)

    grown = [grow(p, a, leaf) for p, a, leaf in zip(paths, jax.tree.leaves(params), jax.tree.leaves(abstract_params))]
    params = jax.device_put(
      jax.tree.unflatten(jax.tree.structure(params), grown), jax.tree.map(lambda a: a.sharding, abstract_params)
    )
  if setup.lora:
    params = setup.adapt_params(params)

  if init_cfg.load_optimizer:
    if not source.has_optimizer_state(step):
      raise ValueError(
        f"init.load_optimizer: {directory}/{step} holds no optimizer state (a converted model?); set it to False"
      )
    opt_state = source.restore_opt_state(step, abstract_state.opt_state)
  else:
    opt_state = None  # A fresh one.
  start = int(record.get("step", step)) if init_cfg.keep_step else 0
  state = setup.state_from_params(params, step=start, opt_state=opt_state)
  source.close()
  return state, dict(record, directory=directory, restored_step=step)


def with_base(setup: Setup, adapters):
  """A LoRA run's full parameters from its checkpointed `adapters`: the frozen base rebuilt as the
  run built it (init.checkpoint adapted, or the seed's initialisation), the adapters replaced."""
  if setup.config.init.checkpoint:
    start, _ = initial_state(setup.config.init, setup)
  else:
    start = setup.init_state()
  _, base = nnx.split_state(start.params, setup.trainable, ...)
  return nnx.merge_state(adapters, base)
