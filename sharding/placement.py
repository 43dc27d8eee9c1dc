"""Placing host data onto a mesh."""

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.rules import DEFAULT_RULES, Rules, logical_to_sharding


def global_batch_from_local(
  local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded along `act_batch`.

  Every process passes only its own slice of the global batch (rows in process
  order), so no host ever holds or sends the whole batch.
  """
  out = {}
  for name, local in local_batch.items():
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    axes = ("act_batch",) + (None,) * (local.ndim - 1)
    sharding = logical_to_sharding(axes, mesh, rules)
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def bytes_per_device(tree) -> int:
  """The most bytes any one device holds of the arrays in `tree`: each array's addressable shards, or
  for a ShapeDtypeStruct with a sharding, the shards that sharding would give."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    itemsize = np.dtype(leaf.dtype).itemsize
    if hasattr(leaf, "addressable_shards"):
      for shard in leaf.addressable_shards:
        totals[shard.device] = totals.get(shard.device, 0) + math.prod(shard.data.shape) * itemsize
    elif getattr(leaf, "sharding", None) is not None:
      for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
        size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
        totals[device] = totals.get(device, 0) + size * itemsize
    else:
      raise ValueError(f"bytes_per_device: a leaf of shape {leaf.shape} has no sharding to read")
  return max(totals.values(), default=0)
