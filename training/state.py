"""The train state (parameters, optimizer state, step and RNG) and its shardings on a mesh;
training/setup.py creates it sharded."""

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import sharding
from model import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data; jax.random.wrap_key_data gives the key.


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only parameters: nothing is allocated."""
  model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
  return nnx.split(model)


def state_rng(seed: int) -> jax.Array:
  """The state's RNG for `seed`: the second half of its split, the first initialises the parameters.
  Raw uint32 key data, so that it checkpoints as a plain array."""
  return jax.random.key_data(jax.random.split(jax.random.key(seed))[1])


def new_train_state(model_cfg, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A freshly initialised state (traceable: jit it, or eval_shape it for shapes alone); the sharded
  one is training.setup.Setup.init_state."""
  params_key = jax.random.split(jax.random.key(seed))[0]
  params = nnx.state(Transformer(model_cfg, nnx.Rngs(params=params_key)))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng(seed))


def state_shardings(
  abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules=sharding.DEFAULT_RULES
) -> TrainState:
  """NamedShardings for every leaf of the train state.

  Optimizer moments mirror the parameters' structure, so they take the
  parameters' shardings; factored or scalar leaves are replicated.
  """
  param_shardings = sharding.tree_shardings(abstract_params, mesh, rules)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  by_path = [(tuple(str(k) for k in path), leaf.shape, s) for (path, leaf), s in zip(flat_params, flat_shardings)]

  def opt_leaf_sharding(path, leaf):
    matching = _param_sharding_at(by_path, path, leaf)
    return matching if matching is not None else replicated

  opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf_sharding, abstract_opt_state)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)


def _param_sharding_at(by_path, opt_path, leaf):
  """The sharding of the parameter whose path ends `opt_path` and whose shape is the leaf's."""
  opt_keys = tuple(str(k) for k in opt_path)
  for keys, shape, param_sharding in by_path:
    if len(keys) <= len(opt_keys) and opt_keys[-len(keys) :] == keys and shape == leaf.shape:
      return param_sharding
  return None
