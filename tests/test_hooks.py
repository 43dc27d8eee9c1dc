"""The hook interface: what the loop calls (on_start, on_step, on_end with its reason), in order, and
step times that leave out the time hooks take."""

import signal
import time

import pytest

from tests.synthetic import RecordingWriter
from tests.test_training import corpus_config
from training import hooks as hooks_lib
from training.preemption import Preemption
from training.run import train


class RecordingHook(hooks_lib.Hook):
  """Records every call; optionally sends this process SIGTERM after one step (a preemption)."""

  def __init__(self, sigterm_after: int | None = None):
    self.calls = []
    self.sigterm_after = sigterm_after

  def on_start(self, step, state):
    self.calls.append(("start", step, int(state.step)))

  def on_step(self, step, state, metrics):
    self.calls.append(("step", step, int(state.step)))
    if step == self.sigterm_after:
      # Only into Preemption's handler: the default one would end the test process.
      assert isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Preemption)
      signal.raise_signal(signal.SIGTERM)

  def on_end(self, step, state, metrics, reason):
    self.calls.append(("end", step, int(state.step), reason))


def test_a_run_calls_a_hook_at_start_every_step_and_end_preempted_or_finished(tmp_path):
  config = corpus_config(tmp_path, num_steps=6, log_every=2, eval_every=0, checkpoint_every=6, num_samples=0)
  preempted_hook = RecordingHook(sigterm_after=3)
  result = train(config, str(tmp_path / "run"), extra_hooks=[preempted_hook])
  assert result.preempted
  assert preempted_hook.calls == [
    ("start", 0, 0),
    ("step", 1, 1),
    ("step", 2, 2),
    ("step", 3, 3),
    ("end", 3, 3, hooks_lib.PREEMPTED),
  ]
  # The resumed run starts from the checkpoint the preemption saved.
  resumed_hook = RecordingHook()
  result = train(config, str(tmp_path / "run"), extra_hooks=[resumed_hook])
  assert result.resumed_from == 3 and not result.preempted
  assert resumed_hook.calls == [
    ("start", 3, 3),
    ("step", 4, 4),
    ("step", 5, 5),
    ("step", 6, 6),
    ("end", 6, 6, hooks_lib.FINISHED),
  ]


class Sleeper(hooks_lib.Hook):
  def on_start(self, step, state):
    time.sleep(0.2)

  def on_step(self, step, state, metrics):
    time.sleep(0.2)


@pytest.mark.parametrize("reason", [hooks_lib.FINISHED, hooks_lib.PREEMPTED])
def test_step_time_leaves_out_other_hooks_and_interval_hooks_end_once(reason):
  writer = RecordingWriter()
  logging_hook = hooks_lib.LoggingHook(
    every=2, writer=writer, start_step=0, tokens_per_step=100, flops_per_token=1.0, peak_flops=1.0
  )
  hooks = hooks_lib.Hooks([Sleeper(), logging_hook])
  metrics = {"loss": 1.0, "tokens": 100.0}
  hooks.on_start(0, None)
  for step in (1, 2, 3):
    hooks.on_step(step, None, metrics)
  hooks.on_end(3, None, metrics, reason)
  logged = {step: record for step, record in writer.records}
  # Without the sleeps left out, a step would take at least 200 ms.
  assert logged[2]["step_time_ms"] < 100
  if reason == hooks_lib.FINISHED:  # The last step is logged though not a multiple of log_every...
    assert sorted(logged) == [2, 3] and logged[3]["step_time_ms"] < 100
  else:  # ...but a preempted run logs no extra step (its checkpoint hook saves one).
    assert sorted(logged) == [2]
