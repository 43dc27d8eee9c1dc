"""train.profile_steps: a JAX profiler trace of those steps in WORKDIR/profile, and bad ranges refused."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from tests import synthetic
from tests.test_training import corpus_config
from training import hooks as hooks_lib
from training.run import train
from training.validation import ConfigError


class _FakeProfiler:
  """Records where the hook starts and stops the trace, and whether the state was ready then."""

  def __init__(self, monkeypatch):
    self.events = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory, **kw: self.events.append(("start", directory)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: self.events.append(("stop",)))


def _drive(hook, start_step, end_step, reason=hooks_lib.FINISHED):
  """The loop's calls for steps start_step + 1 .. end_step; the events after each step."""
  state = jnp.zeros(3)
  hook.on_start(start_step, state)
  for step in range(start_step + 1, end_step + 1):
    hook.on_step(step, state, {})
  hook.on_end(end_step, state, {}, reason)


def test_hook_traces_exactly_the_range(monkeypatch):
  profiler, logged = _FakeProfiler(monkeypatch), []
  hook = hooks_lib.ProfileHook(3, 5, "/w/profile", logged.append)
  starts_after = []
  original = hook._start
  hook._start = lambda step, state: (starts_after.append(step), original(step, state))
  _drive(hook, 0, 10)
  assert starts_after == [2]  # After step 2, so that step 3 is the first in the trace.
  assert profiler.events == [("start", "/w/profile"), ("stop",)]
  assert hook.traced == (3, 5)
  assert logged == ["profile of steps 3-5 written to /w/profile (tensorboard --logdir=/w/profile)"]


def test_hook_at_the_first_step_resumed_inside_and_ended_early(monkeypatch):
  profiler = _FakeProfiler(monkeypatch)
  first = hooks_lib.ProfileHook(1, 2, "/p", lambda _: None)
  _drive(first, 0, 4)  # Step 1 is the run's first: the trace starts at on_start.
  assert first.traced == (1, 2)
  resumed = hooks_lib.ProfileHook(3, 8, "/p", lambda _: None)
  _drive(resumed, 5, 6, reason=hooks_lib.PREEMPTED)  # Resumed at 5, preempted at 6: steps 6..6.
  assert resumed.traced == (6, 6)
  past = hooks_lib.ProfileHook(3, 5, "/p", lambda _: None)
  _drive(past, 5, 9)  # Resumed after the range: nothing.
  assert past.traced is None
  assert profiler.events == [("start", "/p"), ("stop",)] * 2


@pytest.mark.parametrize(
  "value, wrong",
  [
    ("3-2", "steps 3 to 2 are not within the run's"),
    ("0-2", "steps 0 to 2 are not within the run's"),
    ("2-41", "steps 2 to 41 are not within the run's"),
    ("5", "not a range of steps"),
    ("a-b", "not a range of steps"),
    ("-3", "not a range of steps"),
  ],
)
def test_bad_range_is_one_clear_error(value, wrong):
  config = synthetic.tiny_config()  # num_steps=40
  config.train.profile_steps = value
  with pytest.raises(ConfigError) as error:
    synthetic.validated(config, 1)
  assert str(error.value) == (
    f"config.train.profile_steps={value!r}: {wrong}; allowed: 'N-M' with 1 <= N <= M <= "
    "train.num_steps=40 (e.g. '10-15'), or '' for no trace"
  )


def test_run_writes_a_trace_of_the_steps(tmp_path, capsys):
  config = corpus_config(tmp_path, num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, num_samples=0)
  config.train.update(profile_steps="2-3", plot_curves=False)
  workdir = str(tmp_path / "run")
  train(config, workdir)
  directory = os.path.join(os.path.abspath(workdir), "profile")
  xplanes = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(xplanes) == 1 and os.path.getsize(xplanes[0]) > 1000
  perfetto = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz"))
  assert len(perfetto) == 1 and os.path.getsize(perfetto[0]) > 100
  out = capsys.readouterr().out
  assert f"profiling steps 2-3 into {directory}\n" in out
  assert f"profile of steps 2-3 written to {directory}" in out
