"""Things that run every N steps, outside the step itself: logging, evaluation, checkpoints.

The loop calls `hook(step, state, metrics)` after every step; each hook decides
from its own interval whether to act, and `finish` runs once at the end.
"""
import math
import time
from typing import Any, Callable, Iterable

import jax

from training.checkpointing import Checkpointer
from training.metric_writers import MetricWriter, StepTimer
from training.state import TrainState


class Hook:

  def __init__(self, every: int):
    self.every = every

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def __call__(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    if self.due(step):
      self.run(step, state, metrics)

  def run(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    raise NotImplementedError

  def finish(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    if not self.due(step):
      self.run(step, state, metrics)


class LoggingHook(Hook):
  """Reads the step's metrics back from the devices only every `every` steps."""

  def __init__(self, every: int, writer: MetricWriter, start_step: int, tokens_per_step: int,
               flops_per_token: float, peak_flops: float,
               extra_metrics: Callable[[], dict[str, float]] = dict):
    super().__init__(every)
    self.extra_metrics = extra_metrics
    self.writer = writer
    self.timer = StepTimer(start_step)
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.last_logged: dict[str, float] = {}

  def restart_timer(self, step: int) -> None:
    """Step times count from here (after compiling), not from construction."""
    self.timer = StepTimer(step)

  def run(self, step, state, metrics):
    # Reading the metrics waits for the step to finish, so the timer is read after it.
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    seconds_per_step = self.timer.read(step)
    values["perplexity"] = math.exp(min(values["loss"], 50.0))
    values.update(self.extra_metrics())
    if seconds_per_step:
      tokens_per_second = self.tokens_per_step / seconds_per_step
      values.update(step_time_ms=1000 * seconds_per_step, tokens_per_second=tokens_per_second,
                    mfu=tokens_per_second * self.flops_per_token / self.peak_flops)
    self.last_logged = values
    self.writer.write(step, values)
    self.writer.progress(step, values, seconds_per_step)


class EvalHook(Hook):
  """Mean loss over each source's validation batches, weighted by target tokens.

  `eval_loss` covers every source's batches together; with several sources,
  `eval_loss/NAME` gives each one's (e.g. the replayed data of continued pre-training).
  """

  def __init__(self, every: int, eval_step: Callable, batches: dict[str, Callable[[], Iterable[Any]]],
               writer: MetricWriter):
    super().__init__(every)
    self.eval_step, self.batches, self.writer = eval_step, batches, writer
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


class CheckpointHook(Hook):

  def __init__(self, every: int, checkpointer: Checkpointer, record: Callable[[int], dict[str, Any]]):
    super().__init__(every)
    self.checkpointer, self.record = checkpointer, record

  def run(self, step, state, metrics):
    self.checkpointer.save(state, self.record(step))

  def finish(self, step, state, metrics):
    self.run(step, state, metrics)
    self.checkpointer.wait()


def run_hooks(hooks: list[Hook], step: int, state: TrainState, metrics: dict[str, Any],
              final: bool = False) -> None:
  """Runs every hook; the time that evaluation and checkpoints take is not step time."""
  timers = [hook.timer for hook in hooks if isinstance(hook, LoggingHook)]
  for hook in hooks:
    start = time.perf_counter()
    hook.finish(step, state, metrics) if final else hook(step, state, metrics)
    if not isinstance(hook, LoggingHook):
      for timer in timers:
        timer.exclude(time.perf_counter() - start)
