"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Saves are asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written while training goes on. Orbax writes into a
temporary directory and renames it when complete, so an interrupted save is
never the checkpoint that `latest_step` returns.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from training.state import TrainState


class Checkpointer:

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, record: dict[str, Any]) -> None:
    """Saves `state` at its own step, with `record` (data position, config) beside it."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)

  def record(self, step: int) -> dict[str, Any]:
    """The JSON record saved with `step`, read without touching the arrays."""
    return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores into the shardings that `abstract_state`'s ShapeDtypeStructs carry."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
    return restored.state, restored.record

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
