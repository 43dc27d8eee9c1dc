"""One table maps logical axis names to mesh axes; everything sharded looks it up.

Parameters are annotated with names such as ("embed", "mlp"); activations with
"act_*" names. They differ because the same feature dimension is sharded over
`fsdp` in a weight (ZeRO-3) but must stay whole in an activation whose batch
dimension already uses `fsdp`.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx  # To read the logical names on Variable leaves.
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: Rules = (
  # Parameters: fsdp shards every weight along its model dimension (ZeRO-3);
  # tensor shards heads and the MLP hidden dimension (Megatron) and the vocabulary.
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("position", None),
  ("lora_rank", None),  # LoRA adapters' rank: small, kept whole.
  # Activations.
  ("act_batch", ("data", "fsdp")),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_head_dim", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def _lookup(name: str | None, rules: Rules) -> MeshAxes:
  if name is None:
    return None
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  raise KeyError(f"logical axis '{name}' has no rule; known names: {[n for n, _ in rules]}")


def _axis_size(mesh: Mesh, mesh_axes: MeshAxes) -> int:
  if mesh_axes is None:
    return 1
  names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(
  logical_axes: Sequence[str | None],
  rules: Rules = DEFAULT_RULES,
  shape: Sequence[int] | None = None,
  mesh: Mesh | None = None,
) -> PartitionSpec:
  """PartitionSpec for an array annotated with `logical_axes`.

  With `shape` and `mesh`, a dimension that its mesh axes do not divide is
  replicated (for example 8 key/value heads on a 16-way tensor axis); config
  validation rejects the cases where that would be a surprise.
  """
  spec = []
  used: set[str] = set()
  for dim, name in enumerate(logical_axes):
    mesh_axes = _lookup(name, rules)
    names = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
    if used & set(names):
      raise ValueError(
        f"logical axes {tuple(logical_axes)} map mesh axes {sorted(used & set(names))} "
        "twice; give the two dimensions different rules"
      )
    if shape is not None and mesh is not None and shape[dim] % _axis_size(mesh, mesh_axes):
      mesh_axes, names = None, ()
    used |= set(names)
    spec.append(mesh_axes)
  return PartitionSpec(*spec)


def logical_to_sharding(
  logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None
) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape, mesh))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree of (abstract) Flax variables or arrays.

  A leaf is sharded by its `out_sharding` metadata (the logical names that
  model/ attaches to every parameter) and replicated when it has none (step
  counters, RNG keys, scalars of the optimizer state).
  """

  def leaf_sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      if names is not None:
        return leaf.replace(logical_to_sharding(names, mesh, rules, leaf.shape))
      return leaf.replace(NamedSharding(mesh, PartitionSpec()))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The mesh and rules that `constrain` uses while a step is traced.
_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Within this context, `constrain` pins activations to `mesh` by `rules`."""
  _ACTIVE.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the innermost `activation_rules` context, or None outside one.

  For code that must name mesh axes itself (a shard_map around a kernel).
  """
  return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `activation_rules`."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical_axes, mesh, rules, x.shape))
