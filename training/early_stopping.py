"""Early stopping on a validation metric, and the best checkpoint kept apart from the latest.

`EarlyStoppingHook` reads each evaluation the evaluation hook makes (it runs after that hook and
before the checkpoint hook, so a checkpoint's record holds the state after that step's evaluation).
An evaluation that beats the best by more than `min_delta` is the new best: its state is saved to
WORKDIR/best/STEP, a checkpoint directory of its own that keeps one step, so the regular
checkpoints' retention never touches it. After `patience` evaluations without such an improvement
the hook asks the loop to stop (`stop_requested`), and the loop ends with EARLY_STOPPED.

Its state (best value and step, evaluations since) goes into every checkpoint's record: a resumed
run continues it exactly, and a run that stopped early and is started again stays stopped, unless
its patience was raised or its metric changed.
"""

import math
from collections.abc import Callable
from typing import Any

from training import hooks as hooks_lib
from training.checkpointing import Checkpointer
from training.reports import higher_is_better
from training.state import TrainState
from training.validation import ConfigError

# The latest evaluation: (its step, every value it logged), or None before the first.
Evaluation = tuple[int, dict[str, float]] | None


def resolve_mode(metric: str, mode: str) -> str:
  if mode != "auto":
    return mode
  return "max" if higher_is_better(metric) else "min"


def latest_evaluation(eval_hook) -> Callable[[], Evaluation]:
  """The evaluation hook's last record and its step, as the early-stopping hook reads them."""

  def latest() -> Evaluation:
    if not eval_hook.history:
      return None
    return eval_hook.history[-1][0], dict(eval_hook.latest)

  return latest


class EarlyStoppingHook(hooks_lib.Hook):
  def __init__(
    self,
    metric: str,
    mode: str,
    patience: int,
    min_delta: float,
    evaluation: Callable[[], Evaluation],
    best_checkpointer: Checkpointer | None,
    record: Callable[[int], dict[str, Any]],
    text: Callable[[str], None],
    saved: dict[str, Any] | None = None,
  ):
    """`evaluation`: the latest evaluation (latest_evaluation); `best_checkpointer`: where the best
    state is saved (None: not kept); `record`: a checkpoint record for a step; `text`: a log line;
    `saved`: the state a resumed checkpoint's record holds (`state_record()`)."""
    self.metric, self.mode = metric, resolve_mode(metric, mode)
    self.patience, self.min_delta = patience, min_delta
    self.evaluation, self.best_checkpointer = evaluation, best_checkpointer
    self.record, self.text = record, text
    self.best: float | None = None
    self.best_step: int | None = None
    self.evaluations_since_best = 0
    self.last_evaluated_step: int | None = None
    self.resumed = False
    if saved and (saved.get("metric"), saved.get("mode")) == (self.metric, self.mode):
      self.best, self.best_step = saved["best"], saved["best_step"]
      self.evaluations_since_best = saved["evaluations_since_best"]
      self.last_evaluated_step = saved["last_evaluated_step"]
      self.resumed = True
    elif saved:
      text(
        f"early stopping: the checkpoint tracked {saved.get('mode')} {saved.get('metric')}, this run "
        f"{self.mode} {self.metric}: its count starts afresh"
      )

  @property
  def stop_requested(self) -> bool:
    return self.patience > 0 and self.evaluations_since_best >= self.patience

  def state_record(self) -> dict[str, Any]:
    """What a checkpoint's record holds to continue this state exactly."""
    return {
      "metric": self.metric,
      "mode": self.mode,
      "best": self.best,
      "best_step": self.best_step,
      "evaluations_since_best": self.evaluations_since_best,
      "last_evaluated_step": self.last_evaluated_step,
      "stopped": self.stop_requested,
    }

  def summary(self) -> str:
    return (
      f"{self.metric} has not improved by more than {self.min_delta:g} for {self.evaluations_since_best} "
      f"evaluations; best {self.best:.6g} at step {self.best_step}"
      + (f" ({self.best_checkpointer.directory}/{self.best_step})" if self.best_checkpointer else "")
    )

  def on_start(self, step, state):
    if self.best_checkpointer is not None:
      self._reconcile_best_checkpoint(step, state)
    self._observe(step, state)  # An evaluation of the start (continued training): the baseline.

  def on_step(self, step, state, metrics):
    self._observe(step, state)

  def on_end(self, step, state, metrics, reason):
    self._observe(step, state)  # The final evaluation of a finished run may be the best.
    if self.best_checkpointer is not None:
      self.best_checkpointer.wait()

  def close(self) -> None:
    if self.best_checkpointer is not None:
      self.best_checkpointer.close()

  def _observe(self, step: int, state: TrainState) -> None:
    evaluation = self.evaluation()
    if evaluation is None:
      return
    evaluated_step, values = evaluation
    if self.last_evaluated_step is not None and evaluated_step <= self.last_evaluated_step:
      return  # Already counted (or from before the checkpoint this run resumed).
    if self.metric not in values:
      raise ConfigError(
        f"train.early_stopping_metric={self.metric!r} is not among the evaluation's values "
        f"({', '.join(sorted(values))})"
      )
    value = float(values[self.metric])
    self.last_evaluated_step = evaluated_step
    if self._improves(value):
      self.best, self.best_step, self.evaluations_since_best = value, evaluated_step, 0
      self.text(f"new best {self.metric} {value:.6g} at step {evaluated_step}")
      if self.best_checkpointer is not None and evaluated_step == step:
        self.best_checkpointer.save(state, {**self.record(step), "best": self.best_record()})
    else:
      self.evaluations_since_best += 1

  def _improves(self, value: float) -> bool:
    if math.isnan(value):
      return False
    if self.best is None:
      return True
    if self.mode == "min":
      return value < self.best - self.min_delta
    return value > self.best + self.min_delta

  def best_record(self) -> dict[str, Any]:
    return {"metric": self.metric, "mode": self.mode, "value": self.best, "step": self.best_step}

  def _reconcile_best_checkpoint(self, step: int, state: TrainState) -> None:
    """A kill can part the best checkpoint from the checkpoint this run starts from: a best saved
    after the start step is from steps this run trains again, so it goes (the same evaluation saves
    it again); a recorded best at the start step itself is saved from the restored state."""
    for saved_step in self.best_checkpointer.all_steps():
      if saved_step > step:
        self.best_checkpointer.delete(saved_step)
    if self.best_step is None or self.best_step in self.best_checkpointer.all_steps():
      return
    if self.best_step == step:
      self.best_checkpointer.save(state, {**self.record(step), "best": self.best_record()})
    else:
      self.text(
        f"early stopping: the best checkpoint (step {self.best_step}) was not saved before the run was "
        f"stopped; {self.best_checkpointer.directory} holds the next best this run finds"
      )
