"""Things that run outside the step itself: logging, evaluation, checkpoints.

The loop calls every hook through one interface, `Hooks`: `on_start` once before the first step,
`on_step` after every step and `on_end` once after the last, with the reason the loop ended
(FINISHED or PREEMPTED). Each hook decides from its own interval whether to act. The time a hook
takes is reported to the others (`on_time_in_other_hooks`): the logging hook leaves it out of the
step time.
"""

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from training.checkpointing import Checkpointer
from training.metric_writers import MetricWriter, StepTimer
from training.state import TrainState

FINISHED = "finished"  # The loop trained on every batch: the run reached its last step.
PREEMPTED = "preempted"  # SIGTERM: the loop stops early, and the run exits after its hooks end.


class Hook:
  """The interface the loop calls; every method does nothing unless a hook overrides it."""

  def on_start(self, step: int, state: TrainState) -> None:
    """Before the first step of this run (after compiling): `step` is the state's."""

  def on_step(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    """After every step: `state` and `metrics` are step `step`'s output."""

  def on_end(self, step: int, state: TrainState, metrics: dict[str, Any], reason: str) -> None:
    """Once after the last step of this run, `reason` FINISHED or PREEMPTED."""

  def on_time_in_other_hooks(self, seconds: float) -> None:
    """Another hook has just taken `seconds`: not step time."""


class IntervalHook(Hook):
  """Acts (`run`) every `every` steps, and at the end of a finished run on a step it has not acted on."""

  def __init__(self, every: int):
    self.every = every

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def __call__(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    """One hook alone, outside a loop (as tests call one): on_step."""
    self.on_step(step, state, metrics)

  def on_step(self, step, state, metrics):
    if self.due(step):
      self.run(step, state, metrics)

  def on_end(self, step, state, metrics, reason):
    if reason == FINISHED and not self.due(step):  # A due step has run already.
      self.run(step, state, metrics)

  def run(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    raise NotImplementedError


class Hooks(Hook):
  """Hooks called in order as one; the time each takes is reported to all the others."""

  def __init__(self, hooks: Sequence[Hook]):
    self.hooks = list(hooks)

  def _call_each(self, call: Callable[[Hook], None]) -> None:
    for hook in self.hooks:
      start = time.perf_counter()
      call(hook)
      seconds = time.perf_counter() - start
      for other in self.hooks:
        if other is not hook:
          other.on_time_in_other_hooks(seconds)

  def on_start(self, step, state):
    self._call_each(lambda hook: hook.on_start(step, state))

  def on_step(self, step, state, metrics):
    self._call_each(lambda hook: hook.on_step(step, state, metrics))

  def on_end(self, step, state, metrics, reason):
    self._call_each(lambda hook: hook.on_end(step, state, metrics, reason))


class LoggingHook(IntervalHook):
  """Reads the step's metrics back from the devices only every `every` steps."""

  def __init__(
    self,
    every: int,
    writer: MetricWriter,
    start_step: int,
    tokens_per_step: int,
    flops_per_token: float,
    peak_flops: float,
    extra_metrics: Callable[[], dict[str, float]] = dict,
  ):
    super().__init__(every)
    self.extra_metrics = extra_metrics
    self.writer = writer
    self.timer = StepTimer(start_step)
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.last_logged: dict[str, float] = {}

  def on_start(self, step, state):
    self.timer = StepTimer(step)  # Step times count from here (after compiling), not from construction.

  def on_time_in_other_hooks(self, seconds):
    self.timer.exclude(seconds)

  def run(self, step, state, metrics):
    # Reading the metrics waits for the step to finish, so the timer is read after it.
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    seconds_per_step = self.timer.read(step)
    values["perplexity"] = math.exp(min(values["loss"], 50.0))
    values.update(self.extra_metrics())
    if seconds_per_step:
      tokens_per_second = self.tokens_per_step / seconds_per_step
      values.update(
        step_time_ms=1000 * seconds_per_step,
        tokens_per_second=tokens_per_second,
        mfu=tokens_per_second * self.flops_per_token / self.peak_flops,
      )
    self.last_logged = values
    self.writer.write(step, values)
    self.writer.progress(step, values, seconds_per_step)


class EvalHook(IntervalHook):
  """Mean loss over each source's validation batches, weighted by target tokens.

  `eval_loss` covers every source's batches together; with several sources,
  `eval_loss/NAME` gives each one's (e.g. the replayed data of continued pre-training).
  """

  def __init__(
    self,
    every: int,
    eval_step: Callable,
    batches: dict[str, Callable[[], Iterable[Any]]],
    writer: MetricWriter,
    evaluate_at_start: bool = False,
  ):
    super().__init__(every)
    self.eval_step, self.batches, self.writer = eval_step, batches, writer
    self.evaluate_at_start = evaluate_at_start  # Where continued training starts from.
    self.history: list[tuple[int, float]] = []
    self.source_history: dict[str, list[tuple[int, float]]] = {name: [] for name in batches}

  def evaluate_sources(self, params) -> dict[str, tuple[float, float]]:
    """name -> (summed token loss, target tokens)."""
    totals = {}
    for name, batches in self.batches.items():
      loss_sum, weight = 0.0, 0.0
      for batch in batches():
        batch_loss, batch_weight = self.eval_step(params, batch)
        loss_sum += float(batch_loss)
        weight += float(batch_weight)
      totals[name] = (loss_sum, weight)
    return totals

  def evaluate(self, params) -> float:
    totals = self.evaluate_sources(params).values()
    return sum(loss for loss, _ in totals) / max(sum(weight for _, weight in totals), 1.0)

  def on_start(self, step, state):
    if self.evaluate_at_start and self.every:
      self.run(step, state, {})

  def run(self, step, state, metrics):
    totals = self.evaluate_sources(state.params)
    loss = sum(l for l, _ in totals.values()) / max(sum(w for _, w in totals.values()), 1.0)
    self.history.append((step, loss))
    record = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    if len(totals) > 1:
      for name, (loss_sum, weight) in totals.items():
        record[f"eval_loss/{name}"] = loss_sum / max(weight, 1.0)
        self.source_history[name].append((step, record[f"eval_loss/{name}"]))
    self.writer.write(step, record)
    self.writer.progress(step, record, None)


class MixtureStats:
  """The observed share of each source in the batches trained on so far (this run)."""

  def __init__(self, names: tuple[str, ...]):
    self.names = names
    self.counts = [0] * len(names)

  def add(self, source_counts) -> None:
    for i, count in enumerate(source_counts):
      self.counts[i] += int(count)

  def metrics(self) -> dict[str, float]:
    total = sum(self.counts)
    if len(self.names) < 2 or not total:
      return {}
    return {f"data/fraction/{name}": count / total for name, count in zip(self.names, self.counts)}


class CheckpointHook(IntervalHook):
  def __init__(self, every: int, checkpointer: Checkpointer, record: Callable[[int], dict[str, Any]]):
    super().__init__(every)
    self.checkpointer, self.record = checkpointer, record

  def run(self, step, state, metrics):
    self.checkpointer.save(state, self.record(step))

  def on_end(self, step, state, metrics, reason):
    self.run(step, state, metrics)  # Finished or preempted: the last step is saved (once, if due).
    self.checkpointer.wait()
