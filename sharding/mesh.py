"""Named device meshes built from a config's `mesh` section."""

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Outer to inner: data parallelism crosses the slowest links, tensor parallelism
# the fastest, so `tensor` is the minor axis of the device order.
MESH_AXES = ("data", "fsdp", "tensor")


def available_cores() -> int:
  """The CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS and Windows have no affinity masks.
    return os.cpu_count() or 1


def resolve_cpu_devices(
  count: int, mesh_config: Mapping[str, int] | None = None, global_batch_size: int = 0, microbatches: int = 1
) -> int:
  """The CPU device count that config field `cpu_devices`=`count` asks for.

  0 or a positive count is itself. -1 is one device per core this process may
  use (available_cores()), fewer where needed so that `mesh_config` can be laid
  out over them and each (micro)batch of `global_batch_size` rows splits evenly
  over mesh.data*mesh.fsdp; where no count fits, every core (validation then
  names the field at fault).
  """
  if not isinstance(count, int) or isinstance(count, bool) or count < -1:
    raise ValueError(
      f"config field 'cpu_devices'={count!r}: must be 0 (JAX's default), a positive number "
      "of CPU devices, or -1 (one per core, as many as the mesh and batch allow)"
    )
  if count != -1:
    return count
  cores = available_cores()
  if mesh_config is None:
    return cores
  # A batch that microbatches does not divide is validation's to report; it constrains nothing here.
  split = microbatches > 0 and global_batch_size > 0 and global_batch_size % microbatches == 0
  rows = global_batch_size // microbatches if split else 0
  for devices in range(cores, 0, -1):
    try:
      sizes = resolve_mesh_shape(mesh_config, devices)
    except ValueError:
      continue
    if not rows or rows % (sizes["data"] * sizes["fsdp"]) == 0:
      return devices
  return cores


def use_cpu_devices(
  count: int, mesh_config: Mapping[str, int] | None = None, global_batch_size: int = 0, microbatches: int = 1
) -> None:
  """Makes JAX's CPU backend `count` devices (0: leave JAX's default of one; -1: see resolve_cpu_devices,
  which the other arguments are for).

  On a CPU, a small model can run as one device per core, each with its slice
  of the batch (data parallel), instead of one device splitting every small op
  across the cores (benchmarks/shakespeare_char.py measures both). It must run
  before JAX starts its backends; afterwards a count is accepted only if the
  CPU backend already has that many devices, and -1 keeps whatever it has.
  """
  devices = resolve_cpu_devices(count, mesh_config, global_batch_size, microbatches)
  if devices == 0:
    return
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:  # Backends already started in this process.
    have = len(jax.devices("cpu"))
    if have != devices and count != -1:
      raise ValueError(
        f"config field 'cpu_devices'={count}: JAX's CPU backend already started in this process "
        f"with {have} devices; set cpu_devices before any JAX computation runs (train.py does), "
        f"or use cpu_devices=0 to keep the devices it has"
      ) from None


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Returns {axis: size} with at most one -1 ("the rest") filled in.

  Raises ValueError naming the `mesh.<axis>` field when the shape cannot cover
  exactly `num_devices` devices.
  """
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axis {unknown}; allowed axes are {list(MESH_AXES)}")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size}: an axis size must be a positive integer or -1 (the rest)")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"mesh: the fixed axes {sizes} multiply to {fixed}, which does not divide the "
        f"{num_devices} available devices, so mesh.{free[0]}=-1 cannot be filled in"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {fixed}, "
      f"but there are {num_devices} devices; set the axes to multiply to {num_devices} "
      f"(or set one of them to -1)"
    )
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the axes of MESH_AXES.

  Axis types are Auto: the compiler propagates shardings from the annotated
  parameters, batches and activations, so no op needs an explicit annotation.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    # Topology-aware device order on real TPU/GPU slices.
    device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Forced host devices and odd counts have no topology to follow.
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
