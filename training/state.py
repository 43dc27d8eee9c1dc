"""The train state (parameters, optimizer state, step and RNG) and its shardings on a mesh;
training/setup.py creates it sharded."""

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import sharding
from model import Transformer
from model.lora import LoraSpec, add_lora, kernel_paths, targeted_paths


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data; jax.random.wrap_key_data gives the key.


def abstract_model(model_cfg, lora_cfg=None) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only parameters: nothing is allocated. With `lora_cfg` (config.lora,
  rank > 0), the model with its adapters and its base as stored (see `adapt`)."""
  model = nnx.eval_shape(lambda: build_model(model_cfg, jax.random.key(0), lora_cfg))
  return nnx.split(model)


def build_model(model_cfg, key: jax.Array, lora_cfg=None) -> nnx.Module:
  """The Transformer initialised from `key`; with LoRA on, adapted (`adapt`) with adapters from `key` too."""
  model = Transformer(model_cfg, nnx.Rngs(params=key))
  if LoraSpec.from_config(lora_cfg) is not None:
    adapt(model, lora_cfg, lora_key(key))
  return model


def lora_key(params_key: jax.Array) -> jax.Array:
  """The key of the adapters' initialisation: from the seed's, whatever base they are added to."""
  return jax.random.fold_in(params_key, 1)


def adapt(model: nnx.Module, lora_cfg, key: jax.Array) -> None:
  """A plain model made a LoRA model in place: its base stored in lora.base_dtype, the block kernels
  quantized with lora.base_quantization (QLoRA), then adapters added on lora.targets. The parameters
  lora.train_full selects keep the dtype they were built (or restored) in, model.param_dtype: they
  train, and an optimizer's small updates would round away in a bfloat16 copy."""
  from model import quantization  # Its storage is only needed here.

  selected = set(full_paths(model, lora_cfg))
  kept = [(variable, variable.get_value()) for path, variable in _param_variables(model) if path in selected]
  base_dtype = jnp.dtype(lora_cfg.base_dtype)
  if lora_cfg.base_quantization != "none":
    quantization.quantize_kernels(model, lora_cfg.base_quantization, lora_cfg.quantization_block, base_dtype)
  else:
    nnx.update(model, jax.tree.map(lambda x: x.astype(base_dtype), nnx.state(model, nnx.Param)))
  for variable, value in kept:  # Undo the cast: the values, and dtypes, they had.
    variable.set_value(value)
  add_lora(model, LoraSpec.from_config(lora_cfg), key)


def _param_variables(model: nnx.Module) -> list[tuple[str, nnx.Param]]:
  """('blocks/attn/wq'-style path, variable) of every plain parameter (no adapter) of `model`."""
  return [
    ("/".join(str(k) for k in path), variable)
    for path, variable in nnx.iter_graph(model)
    if isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam)
  ]


def _full_matcher(pattern: str) -> re.Pattern:
  """lora.train_full's regex read as init.freeze reads its patterns: over whole path prefixes ("embed"
  is embed, not pos_embed; "final_norm" is final_norm/scale)."""
  return re.compile(f"(?:{pattern})(?:/.*)?")


def full_paths(model: nnx.Module, lora_cfg) -> list[str]:
  """The paths of the plain parameters of `model` that lora.train_full selects, trained in full beside
  the adapters ([] when it is empty or LoRA is off). A ValueError naming the field when it is not a
  regex, selects nothing, selects a kernel lora.targets adapts (the adapter would learn a part of the
  kernel's own update), or selects a block kernel lora.base_quantization stores quantized (its integer
  codes have no gradient)."""
  pattern = lora_cfg.get("train_full", "") if lora_cfg else ""
  if not pattern or LoraSpec.from_config(lora_cfg) is None:
    return []
  try:
    matcher = _full_matcher(pattern)
  except re.error as e:
    raise ValueError(f"lora.train_full={pattern!r} is not a regular expression ({e})") from None
  paths = [path for path, _ in _param_variables(model)]
  selected = [path for path in paths if matcher.fullmatch(path)]
  if not selected:
    raise ValueError(f"lora.train_full={pattern!r} matches no parameter; the paths are: {', '.join(paths)}")
  adapted = sorted(set(selected) & set(targeted_paths(model, lora_cfg.targets)))
  if adapted:
    raise ValueError(
      f"lora.train_full={pattern!r} selects {', '.join(adapted)}, which lora.targets={lora_cfg.targets!r} "
      "adapts: train a kernel either in full or through its adapter; narrow one of the two"
    )
  quantized = sorted(set(selected) & set(kernel_paths(model)))
  if quantized and lora_cfg.base_quantization != "none":
    raise ValueError(
      f"lora.train_full={pattern!r} selects the block kernels {', '.join(quantized)}, which "
      f"lora.base_quantization={lora_cfg.base_quantization!r} stores quantized, where they cannot train; "
      "select embeddings, norms or the head (e.g. 'embed|head'), or set lora.base_quantization='none'"
    )
  return selected


@dataclasses.dataclass(frozen=True)
class TrainFull:
  """The nnx filter of what a LoRA run with lora.train_full trains: the adapters and the plain
  parameters whose path the regex selects (full_paths checked it when the model was built). A frozen
  dataclass: equal filters compare and hash equal, as the step's static arguments need."""

  pattern: str

  def __call__(self, path, value) -> bool:
    if isinstance(value, nnx.LoRAParam):
      return True
    if not isinstance(value, nnx.Param):  # A quantized kernel's codes and scales.
      return False
    return _full_matcher(self.pattern).fullmatch("/".join(str(k) for k in path)) is not None


def trainable_filter(lora_cfg):
  """What the optimizer trains: with LoRA on, the adapters (with lora.train_full, also the parameters
  it selects: TrainFull), else None (every parameter)."""
  if LoraSpec.from_config(lora_cfg) is None:
    return None
  pattern = lora_cfg.get("train_full", "")
  return TrainFull(pattern) if pattern else nnx.LoRAParam


def split_trainable(params: nnx.State, trainable) -> tuple[nnx.State, nnx.State | None]:
  """(the trained part, the frozen rest): with `trainable` None, all of it and None."""
  if trainable is None:
    return params, None
  return nnx.split_state(params, trainable, ...)


def join_trainable(trained: nnx.State, frozen: nnx.State | None) -> nnx.State:
  return trained if frozen is None else nnx.merge_state(trained, frozen)


def state_rng(seed: int) -> jax.Array:
  """The state's RNG for `seed`: the second half of its split, the first initialises the parameters.
  Raw uint32 key data, so that it checkpoints as a plain array."""
  return jax.random.key_data(jax.random.split(jax.random.key(seed))[1])


def new_train_state(model_cfg, tx: optax.GradientTransformation, seed: int, lora_cfg=None) -> TrainState:
  """A freshly initialised state (traceable: jit it, or eval_shape it for shapes alone); the sharded
  one is training.setup.Setup.init_state. The optimizer state covers the trainable parameters."""
  params_key = jax.random.split(jax.random.key(seed))[0]
  params = nnx.state(build_model(model_cfg, params_key, lora_cfg))
  trained, _ = split_trainable(params, trainable_filter(lora_cfg))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trained), rng=state_rng(seed))


def state_shardings(
  abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules=sharding.DEFAULT_RULES, trainable=None
) -> TrainState:
  """NamedShardings for every leaf of the train state (the optimizer's over the `trainable` part).

  Optimizer moments mirror the parameters' structure, so they take the
  parameters' shardings; factored or scalar leaves are replicated.
  """
  param_shardings = sharding.tree_shardings(abstract_params, mesh, rules)
  abstract_opt_state = jax.eval_shape(tx.init, split_trainable(abstract_params, trainable)[0])
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
