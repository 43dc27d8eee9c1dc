"""The ground floor: device meshes, logical-axis rules and placement of arrays.

Imports no other loom package, so model/, data/ and training/ can all build on it.
"""

from sharding.mesh import MESH_AXES, make_mesh, resolve_mesh_shape, use_cpu_devices
from sharding.placement import bytes_per_device, global_batch_from_local
from sharding.rules import (
  DEFAULT_RULES,
  activation_rules,
  active_mesh_and_rules,
  constrain,
  logical_to_sharding,
  logical_to_spec,
  tree_shardings,
)

__all__ = [
  "MESH_AXES",
  "make_mesh",
  "resolve_mesh_shape",
  "use_cpu_devices",
  "global_batch_from_local",
  "bytes_per_device",
  "DEFAULT_RULES",
  "activation_rules",
  "active_mesh_and_rules",
  "constrain",
  "logical_to_sharding",
  "logical_to_spec",
  "tree_shardings",
]
