"""Placing host data onto a mesh."""

from collections.abc import Mapping

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
