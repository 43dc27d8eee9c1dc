"""Things that run outside the step itself: logging, evaluation, checkpoints.

The loop calls every hook through one interface, `Hooks`: `on_start` once before the first step,
`on_step` after every step and `on_end` once after the last, with the reason the loop ended
(FINISHED, PREEMPTED, STOPPED or EARLY_STOPPED). Each hook decides from its own interval whether to
act. A hook ends the run early by answering `stop_requested` (the early-stopping hook does): the loop
asks after every step. The time a hook takes is reported to the others (`on_time_in_other_hooks`):
the logging hook leaves it out of the step time.
"""

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from evaluation.metrics import summarize
from training.checkpointing import Checkpointer
from training.metric_writers import MetricWriter, StepTimer
from training.state import TrainState

FINISHED = "finished"  # The loop trained on every batch: the run reached its last step.
PREEMPTED = "preempted"  # SIGTERM: the loop stops early, and the run exits after its hooks end.
STOPPED = "stopped"  # At train.stop_at_step: as a preemption would, without the signal.
EARLY_STOPPED = "early_stopped"  # A hook asked to stop (no improvement): the run is complete.
DIVERGED = "diverged"  # A non-finite loss, gradient or parameter (training/guards.py): nothing more is saved.
COMPLETE = (FINISHED, EARLY_STOPPED)  # The run is over: its last step is logged and evaluated.


class Hook:
  """The interface the loop calls; every method does nothing unless a hook overrides it."""

  def on_start(self, step: int, state: TrainState) -> None:
    """Before the first step of this run (after compiling): `step` is the state's."""

  def on_step(self, step: int, state: TrainState, metrics: dict[str, Any]) -> None:
    """After every step: `state` and `metrics` are step `step`'s output."""

  def on_end(self, step: int, state: TrainState, metrics: dict[str, Any], reason: str) -> None:
    """Once after the last step of this run, `reason` FINISHED, PREEMPTED, STOPPED or EARLY_STOPPED."""

  @property
  def stop_requested(self) -> bool:
    """Asked after every step (after on_step): True ends the loop there, with `stop_reason`."""
    return False

  stop_reason = EARLY_STOPPED  # Why the loop ends when this hook asks it to.

  def on_time_in_other_hooks(self, seconds: float) -> None:
    """Another hook has just taken `seconds`: not step time."""


class IntervalHook(Hook):
  """Acts (`run`) every `every` steps, and at the end of a complete run on a step it has not acted on."""

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
    if reason in COMPLETE and not self.due(step):  # A due step has run already.
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

  @property
  def stop_requested(self) -> bool:
    return any(hook.stop_requested for hook in self.hooks)

  @property
  def stop_reason(self) -> str:
    return next((hook.stop_reason for hook in self.hooks if hook.stop_requested), EARLY_STOPPED)


UNLOGGED = ("tokens", "nonfinite", "spike")  # Step metrics others read: the guards' verdicts are counted instead.


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
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in UNLOGGED}
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
  """Loss, perplexity, bits per byte and next-token accuracy over each source's validation batches,
  every one weighted by target tokens (bytes for bits per byte: evaluation/metrics.py).

  `eval_loss` (and `eval_perplexity`, `eval_bits_per_byte`, `eval_accuracy`) cover every source's
  batches together; with several sources, `eval_loss/NAME` etc. give each one's (e.g. the replayed
  data of continued pre-training). `eval_step(params, batch)` returns make_eval_step's sums: a dict
  {"loss", "tokens", "correct", "bytes"}, or a (loss, tokens) pair, which reports loss and
  perplexity alone. `latest` is the last record written.
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
    self.latest: dict[str, float] = {}

  def evaluate_totals(self, params) -> dict[str, dict[str, float]]:
    """name -> the summed {"loss", "tokens"} (and "correct", "bytes" when the step gives them)."""
    totals = {}
    for name, batches in self.batches.items():
      sums: dict[str, float] = {}
      for batch in batches():
        out = jax.device_get(self.eval_step(params, batch))
        out = out if isinstance(out, dict) else dict(zip(("loss", "tokens"), out))
        for key, value in out.items():
          sums[key] = sums.get(key, 0.0) + float(value)
      totals[name] = sums
    return totals

  def evaluate_sources(self, params) -> dict[str, tuple[float, float]]:
    """name -> (summed token loss, target tokens)."""
    totals = self.evaluate_totals(params)
    return {name: (sums.get("loss", 0.0), sums.get("tokens", 0.0)) for name, sums in totals.items()}

  def evaluate(self, params) -> float:
    totals = self.evaluate_sources(params).values()
    return sum(loss for loss, _ in totals) / max(sum(weight for _, weight in totals), 1.0)

  def on_start(self, step, state):
    if self.evaluate_at_start and self.every:
      self.run(step, state, {})

  def run(self, step, state, metrics):
    totals = self.evaluate_totals(state.params)
    pooled: dict[str, float] = {}
    for sums in totals.values():
      for key, value in sums.items():
        pooled[key] = pooled.get(key, 0.0) + value
    record = {f"eval_{key}": value for key, value in summarize(pooled).items()}
    self.history.append((step, record["eval_loss"]))
    if len(totals) > 1:
      for name, sums in totals.items():
        record.update({f"eval_{key}/{name}": value for key, value in summarize(sums).items()})
        self.source_history[name].append((step, record[f"eval_loss/{name}"]))
    self.latest = record
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
    if not all_finite(state.params):  # The step never makes one (training/guards.py): a last line of defence.
      logging.error("step %d: a parameter is not finite: not checkpointed (the last checkpoint stays)", step)
      return
    self.checkpointer.save(state, self.record(step))

  def on_end(self, step, state, metrics, reason):
    if reason != DIVERGED:  # A diverged run's last checkpoint is the one to resume or inspect.
      self.run(step, state, metrics)  # However else the loop ended, the last step is saved (once, if due).
    self.checkpointer.wait()


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
  """Whether every value in `tree` is finite: one reduction on the devices, one bool read back."""
  return bool(_all_finite(tree)) if jax.tree.leaves(tree) else True


class ProfileHook(Hook):
  """A JAX profiler trace of steps `first` to `last` (train.profile_steps) in `directory`.

  Steps are dispatched ahead of the devices, so the hook waits for the state before starting the
  trace (no earlier step's work in it) and before stopping it (all of the last step's work in it).
  The trace starts after the hooks of step `first - 1` (it is the last hook) and covers what the
  loop does up to step `last`'s hooks. TensorBoard's profile plugin reads `directory`
  (plugins/profile/RUN/HOST.xplane.pb); Perfetto opens the .trace.json.gz beside it.
  """

  def __init__(self, first: int, last: int, directory: str, log: Callable[[str], None] = print):
    self.first, self.last, self.directory, self.log = first, last, directory, log
    self.tracing_from: int | None = None  # The first step in the trace, while one is being taken.
    self.traced: tuple[int, int] | None = None  # The steps the finished trace covers.

  def _start(self, step: int, state: TrainState) -> None:
    jax.block_until_ready(state)
    jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
    self.tracing_from = step + 1

  def _stop(self, step: int, state: TrainState) -> None:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.traced, self.tracing_from = (self.tracing_from, step), None
    self.log(
      f"profile of steps {self.traced[0]}-{step} written to {self.directory} (tensorboard --logdir={self.directory})"
    )

  def on_start(self, step, state):
    # A run resumed inside the range traces the rest of it; one resumed past it traces nothing.
    if self.first - 1 <= step < self.last:
      self._start(step, state)

  def on_step(self, step, state, metrics):
    if self.tracing_from is None and step == self.first - 1:
      self._start(step, state)
    elif self.tracing_from is not None and step == self.last:
      self._stop(step, state)

  def on_end(self, step, state, metrics, reason):
    if self.tracing_from is not None:  # The run ended inside the range (preempted, stopped early).
      self._stop(step, state)
