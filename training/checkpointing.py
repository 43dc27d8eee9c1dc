"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

A checkpoint holds four items: `params`, `opt_state`, `progress` (step and RNG)
and `record` (config, data position, loom version). Keeping the parameters an
item of their own lets a new run start from another run's parameters alone
(continued pre-training, a converted Hugging Face model) on any mesh.

Saves are asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written while training goes on. Orbax writes into a
temporary directory and renames it when complete, so an interrupted save is
never the checkpoint that `latest_step` returns.
"""

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from training.state import TrainState

ITEMS = ("params", "opt_state", "progress", "record")


REQUIRED = ("params", "record")  # What every loom checkpoint holds, an imported model's included.
# Written when a save is finalised and removed first when an old step is deleted: without it a
# step directory is unfinished or half-deleted (a kill during the cleanup of old checkpoints).
FINISHED_MARKER = "_CHECKPOINT_METADATA"


def _is_loom_checkpoint(step_directory: str, items: tuple[str, ...] = REQUIRED) -> bool:
  return os.path.isfile(os.path.join(step_directory, FINISHED_MARKER)) and all(
    os.path.isdir(os.path.join(step_directory, item)) for item in items
  )


def locate(path: str, step: int = -1, field: str = "checkpoint") -> tuple[str, int]:
  """(checkpoints directory, step) for a workdir, its checkpoints/ directory or one checkpoints/STEP.

  step=-1 takes the latest finished checkpoint; errors name `field`.
  """
  path = os.path.abspath(os.path.expanduser(path))
  parent, base = os.path.split(path)
  if not os.path.isdir(path) and re.fullmatch(r"\d+", base) and os.path.isdir(parent):
    steps = sorted(int(n) for n in os.listdir(parent) if re.fullmatch(r"\d+", n))
    raise ValueError(f"{field}: {parent} has no step {base}; its steps: {steps or 'none'}")
  if not os.path.isdir(path):
    raise ValueError(
      f"{field}: {path} is not a directory (a loom workdir, its checkpoints/ directory or checkpoints/STEP is expected)"
    )
  if re.fullmatch(r"\d+", os.path.basename(path)):
    directory, named_step = os.path.dirname(path), int(os.path.basename(path))
    if step >= 0 and step != named_step:
      raise ValueError(f"{field} names step {named_step} but step {step} was asked for")
    if not _is_loom_checkpoint(path):
      raise ValueError(
        f"{field}: {path} is not a complete loom checkpoint (it needs {'/, '.join(REQUIRED)}/ and {FINISHED_MARKER})"
      )
    return directory, named_step
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  # Finished checkpoints only: an interrupted save is a temporary directory with another name.
  steps = sorted(
    int(name)
    for name in os.listdir(path)
    if re.fullmatch(r"\d+", name) and _is_loom_checkpoint(os.path.join(path, name))
  )
  if not steps:
    raise ValueError(f"{field}: {path} holds no finished loom checkpoint (directories named by step)")
  if step < 0:
    return path, steps[-1]
  if step not in steps:
    raise ValueError(f"{field}: step {step} is not in {path}, which has steps {steps}")
  return path, step


class Checkpointer:
  def __init__(
    self,
    directory: str,
    keep: int = 3,
    keep_every: int = 0,
    async_save: bool = True,
    read_only: bool = False,
    saved_params: Callable[[Any], Any] | None = None,
  ):
    """Keeps the last `keep` checkpoints and, beyond them, every step divisible by `keep_every`.

    `saved_params`: what `save` keeps of the state's parameters (training.setup.Setup.saved_params: a
    LoRA run's adapters, not its frozen base); default all of them.
    """
    self.directory = os.path.abspath(directory)
    self._saved_params = saved_params or (lambda params: params)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_every or None,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
    )
    # Handlers named up front, so a manager that has not saved (a reader) can read item metadata.
    handlers = {
      name: ocp.JsonCheckpointHandler() if name == "record" else ocp.StandardCheckpointHandler() for name in ITEMS
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def latest_resumable_step(self) -> tuple[int | None, list[tuple[int, str]]]:
    """The newest step whose four items are all there and whose record reads, and why newer ones
    were passed over (a damaged disk, a half-deleted step): resuming falls back to an older step
    instead of failing, and says so."""
    passed_over = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      directory = os.path.join(self.directory, str(step))
      if not _is_loom_checkpoint(directory, ITEMS):
        missing = [item for item in (FINISHED_MARKER, *ITEMS) if not os.path.exists(os.path.join(directory, item))]
        passed_over.append((step, f"lacks {', '.join(missing)}"))
        continue
      try:
        self.record(step)
      except Exception as e:  # noqa: BLE001 -- any way the record cannot be read.
        passed_over.append((step, f"its record cannot be read ({type(e).__name__}: {str(e)[:120]})"))
        continue
      return step, passed_over
    return None, passed_over

  def set_aside(self, step: int) -> str:
    """Renames a damaged step directory out of the way (kept for inspection, never restored or
    counted again), so the run saves that step afresh. Every process calls it; process 0 renames."""
    source = os.path.join(self.directory, str(step))
    target = f"{source}.damaged"
    if jax.process_index() == 0:
      os.rename(source, target if not os.path.exists(target) else f"{target}-{os.getpid()}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"loom_set_aside_{step}")
    self._manager.reload()
    return target

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def delete(self, step: int) -> None:
    """Removes a step's checkpoint (every process calls it, as Orbax's deletion expects)."""
    self._manager.delete(step)

  def save(self, state: TrainState, record: dict[str, Any]) -> None:
    """Saves `state` at its own step, with `record` (data position, config) beside it."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return
    self._manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(self._saved_params(state.params)),
        opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        record=ocp.args.JsonSave(record),
      ),
      force=True,
    )

  def save_params(self, step: int, params, record: dict[str, Any]) -> None:
    """A parameters-only checkpoint (no optimizer state): what a model import writes."""
    self._manager.save(
      step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), record=ocp.args.JsonSave(record)), force=True
    )

  def record(self, step: int) -> dict[str, Any]:
    """The JSON record saved with `step`, read without touching the arrays."""
    return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

  def params_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """'blocks/attn/wq'-style path -> saved shape, read from the metadata alone."""
    tree = self._manager.item_metadata(step)["params"].tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    shapes = {}
    for path, leaf in flat:
      names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
      shapes["/".join(n for n in names if n and n != "value")] = tuple(leaf.shape)
    return shapes

  def has_optimizer_state(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), "opt_state"))

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores into the shardings (and dtypes) that `abstract_state`'s ShapeDtypeStructs carry."""
    progress = {"step": abstract_state.step, "rng": abstract_state.rng}
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        progress=ocp.args.StandardRestore(progress),
        record=ocp.args.JsonRestore(),
      ),
    )
    state = TrainState(
      step=restored.progress["step"], params=restored.params, opt_state=restored.opt_state, rng=restored.progress["rng"]
    )
    return state, restored.record

  def restore_params(self, step: int, abstract_params):
    """Only the parameters, resharded and cast to `abstract_params`' shardings and dtypes."""
    return self._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

  def restore_opt_state(self, step: int, abstract_opt_state):
    return self._manager.restore(
      step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(abstract_opt_state))
    ).opt_state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
