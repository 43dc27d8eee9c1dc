"""Early stopping: the stop step a metric sequence dictates, the best checkpoint kept apart from
retention, and a resumed run that continues the count exactly (and stays stopped once stopped)."""

import math
import os
import types

import jax
import numpy as np
import pytest

from tests import synthetic
from tests.test_training import corpus_config
from training import early_stopping, reports
from training.checkpointing import Checkpointer
from training.run import train
from training.validation import ConfigError, validate


class FakeCheckpointer:
  directory = "/runs/x/best"

  def __init__(self):
    self.steps: list[int] = []
    self.records: dict[int, dict] = {}

  def save(self, state, record):
    self.steps = [int(state.step)]  # Keeps one, as the best checkpointer does.
    self.records = {int(state.step): record}

  def all_steps(self):
    return list(self.steps)

  def delete(self, step):
    self.steps.remove(step)

  def wait(self):
    pass


def scripted_hook(metric, values_by_step, saved=None, **options):
  """A hook fed one evaluation per scripted step; returns it and a function that runs it over steps."""
  evaluated = []
  lines = []
  options = {"mode": "auto", "patience": 2, "min_delta": 0.0, **options}
  hook = early_stopping.EarlyStoppingHook(
    metric,
    options["mode"],
    options["patience"],
    options["min_delta"],
    lambda: evaluated[-1] if evaluated else None,
    FakeCheckpointer(),
    lambda step: {"step": step},
    lines.append,
    saved=saved,
  )

  def run(steps):
    """Steps through `steps` as the loop would; the step it stops at, or None."""
    for step in steps:
      if step in values_by_step:
        evaluated.append((step, {metric: values_by_step[step], "eval_perplexity": 1.0}))
      hook.on_step(step, types.SimpleNamespace(step=step), {})
      if hook.stop_requested:
        return step
    return None

  return hook, run, lines


def test_stops_after_patience_evaluations_without_an_improvement_beyond_min_delta():
  losses = {10: 3.0, 20: 2.0, 30: 1.95, 40: 2.5, 50: 1.5, 60: 1.49, 70: 1.6, 80: 1.0}
  hook, run, lines = scripted_hook("eval_loss", losses, patience=2, min_delta=0.1)
  # 30 is better by less than min_delta, 40 worse: the second evaluation without one stops the run.
  assert run(range(1, 81)) == 40
  assert (hook.best, hook.best_step, hook.evaluations_since_best) == (2.0, 20, 2)
  assert hook.best_checkpointer.steps == [20]
  assert hook.best_checkpointer.records[20]["best"] == {"metric": "eval_loss", "mode": "min", "value": 2.0, "step": 20}
  assert lines == ["new best eval_loss 3 at step 10", "new best eval_loss 2 at step 20"]
  assert "has not improved by more than 0.1 for 2 evaluations; best 2 at step 20 (/runs/x/best/20)" in hook.summary()


def test_an_accuracy_is_maximised_and_nan_never_improves():
  accuracy = {1: 0.2, 2: 0.5, 3: math.nan, 4: 0.4, 5: 0.9}
  hook, run, _ = scripted_hook("eval_accuracy/main", accuracy, patience=3)
  assert hook.mode == "max"
  assert run(range(1, 6)) is None
  assert (hook.best, hook.best_step) == (0.9, 5)
  hook, run, _ = scripted_hook("eval_accuracy", accuracy, patience=2, mode="min")  # The mode as given.
  assert run(range(1, 6)) == 3 and hook.best_step == 1


def test_patience_0_never_stops_but_keeps_the_best():
  hook, run, _ = scripted_hook("eval_loss", {s: float(s % 7) for s in range(1, 50)}, patience=0)
  assert run(range(1, 50)) is None
  assert hook.best_step == 7 and hook.best_checkpointer.steps == [7]


def test_a_metric_the_evaluation_does_not_log_is_one_error_listing_those_it_does():
  hook = early_stopping.EarlyStoppingHook(
    "eval_bits_per_byte", "auto", 2, 0.0, lambda: (5, {"eval_loss": 1.0}), None, lambda step: {}, print
  )
  with pytest.raises(ConfigError, match=r"'eval_bits_per_byte' is not among the evaluation's values \(eval_loss\)"):
    hook.on_step(5, None, {})


def test_the_state_in_a_record_continues_the_count_exactly():
  losses = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.4, 10: 2.2, 12: 1.0}
  straight, run, _ = scripted_hook("eval_loss", losses, patience=3)
  assert run(range(1, 13)) == 10
  first, run_first, _ = scripted_hook("eval_loss", losses, patience=3)
  assert run_first(range(1, 8)) is None
  saved = first.state_record()
  resumed, run_resumed, _ = scripted_hook("eval_loss", losses, saved=saved, patience=3)
  assert run_resumed(range(8, 13)) == 10
  assert resumed.state_record() == straight.state_record()
  assert resumed.state_record()["stopped"]
  # Raising the patience lets a stopped run go on; another metric starts the count afresh.
  assert not scripted_hook("eval_loss", losses, saved=resumed.state_record(), patience=5)[0].stop_requested
  other, _, lines = scripted_hook("eval_perplexity", {}, saved=resumed.state_record(), patience=3)
  assert other.best is None and "starts afresh" in lines[0]


def test_a_best_checkpoint_a_kill_parted_from_the_resumed_record_is_reconciled():
  saved = {"metric": "eval_loss", "mode": "min", "best": 2.0, "best_step": 6, "evaluations_since_best": 0}
  saved.update(last_evaluated_step=6, stopped=False)
  # Killed after the best of step 8 was saved, before the checkpoint of step 8: resumed at 6, its
  # recorded best, whose checkpoint the save of 8 replaced.
  hook, _, lines = scripted_hook("eval_loss", {}, saved=saved)
  hook.best_checkpointer.steps = [8]
  hook.on_start(6, types.SimpleNamespace(step=6))
  assert hook.best_checkpointer.steps == [6] and lines == []
  # Resumed at 7, past the recorded best: it cannot be saved again, and the log says so.
  hook, _, lines = scripted_hook("eval_loss", {}, saved=saved)
  hook.best_checkpointer.steps = [8]
  hook.on_start(7, types.SimpleNamespace(step=7))
  assert hook.best_checkpointer.steps == [] and "the best checkpoint (step 6) was not saved" in lines[0]


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(early_stopping_metric="loss"), r"'loss' is not an evaluated metric"),
    (dict(early_stopping_metric="eval_loss/main"), r"per-source metrics are logged for each of several"),
    (dict(early_stopping_metric="eval_loss", eval_every=0), r"needs train.eval_every > 0"),
    (dict(early_stopping_patience=-1), r"train.early_stopping_patience=-1 must be >= 0"),
    (dict(early_stopping_min_delta=-0.5), r"train.early_stopping_min_delta=-0.5 must be >= 0"),
    (dict(early_stopping_mode="lowest"), r"'train.early_stopping_mode'='lowest'; allowed: auto, min, max"),
  ],
)
def test_config_checks(fields, message):
  config = synthetic.tiny_config()
  config.train.update(**fields)
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


# A scripted eval_loss for each evaluation step of the runs below (every 2 steps). An evaluation at
# another step (as train.stop_at_step once made) would read 0.0, a new best, and move the stop.
SCRIPT = {2: 3.0, 4: 2.0, 6: 2.5, 8: 1.95, 10: 2.1, 12: 0.5}
STOP_STEP, BEST_STEP = 10, 4  # With patience 3 and min_delta 0.1: 6, 8 and 10 do not improve on 4.


@pytest.fixture
def scripted_eval_loss(monkeypatch):
  """The real evaluation hook's records (its steps, its other values), eval_loss from SCRIPT."""
  real = early_stopping.latest_evaluation

  def scripted(eval_hook):
    latest = real(eval_hook)

    def evaluation():
      evaluated = latest()
      if evaluated is None:
        return None
      step, values = evaluated
      assert "eval_loss" in values  # The real record has it: the script replaces its value only.
      return step, {**values, "eval_loss": SCRIPT.get(step, 0.0)}

    return evaluation

  monkeypatch.setattr(early_stopping, "latest_evaluation", scripted)


def _config(tmp_path, **train_fields):
  return corpus_config(
    tmp_path,
    num_steps=40,
    eval_every=2,
    eval_batches=1,
    log_every=2,
    checkpoint_every=2,
    keep_checkpoints=1,  # Retention alone would have deleted step 4 long before the stop.
    num_samples=0,
    early_stopping_metric="eval_loss",
    early_stopping_patience=3,
    early_stopping_min_delta=0.1,
    **train_fields,
  )


def test_a_run_stops_keeps_its_best_apart_and_resumes_to_the_same_stop(tmp_path, capsys, scripted_eval_loss):
  straight = str(tmp_path / "straight")
  result = train(_config(tmp_path), straight)
  out = capsys.readouterr().out
  assert result.early_stopped and int(result.state.step) == STOP_STEP
  assert (result.best_step, result.best_value) == (BEST_STEP, 2.0)
  assert "new best eval_loss 2 at step 4\n" in out
  assert f"stopped early after step {STOP_STEP}: eval_loss has not improved by more than 0.1 for 3" in out
  regular = Checkpointer(os.path.join(straight, "checkpoints"), read_only=True)
  best = Checkpointer(os.path.join(straight, "best"), read_only=True)
  assert regular.all_steps() == [STOP_STEP] and best.all_steps() == [BEST_STEP]
  assert best.record(BEST_STEP)["best"] == {"metric": "eval_loss", "mode": "min", "value": 2.0, "step": BEST_STEP}
  assert regular.record(STOP_STEP)["early_stopping"] == {
    "metric": "eval_loss",
    "mode": "min",
    "best": 2.0,
    "best_step": BEST_STEP,
    "evaluations_since_best": 3,
    "last_evaluated_step": STOP_STEP,
    "stopped": True,
  }

  # Started again, a stopped run is complete: nothing is trained.
  again = train(_config(tmp_path), straight)
  assert again.resumed_from == STOP_STEP and again.early_stopped and again.best_step == BEST_STEP
  assert f"already at step {STOP_STEP}: nothing to train (it stopped early: " in capsys.readouterr().out

  # Cut off between evaluations (a checkpoint at 7), then resumed: the same stop and the same best.
  interrupted = str(tmp_path / "interrupted")
  first = train(_config(tmp_path, stop_at_step=7), interrupted)
  assert int(first.state.step) == 7 and not first.early_stopped and first.best_step == BEST_STEP
  resumed = train(_config(tmp_path), interrupted)
  assert resumed.resumed_from == 7 and resumed.early_stopped and int(resumed.state.step) == STOP_STEP
  assert resumed.best_step == BEST_STEP
  assert Checkpointer(os.path.join(interrupted, "best"), read_only=True).all_steps() == [BEST_STEP]
  for a, b in zip(jax.tree.leaves(jax.device_get(result.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state.params)
  best_params = [
    Checkpointer(os.path.join(workdir, "best"), read_only=True).restore_params(BEST_STEP, abstract)
    for workdir in (straight, interrupted)
  ]
  for a, b in zip(*(jax.tree.leaves(params) for params in best_params)):
    np.testing.assert_array_equal(a, b)

  # The report reads the same workdir: its steps, tokens and best checkpoint.
  (run,) = reports.compare([straight])
  assert run["steps"] == STOP_STEP and run["num_steps"] == 40 and run["best_checkpoint"] == BEST_STEP
  assert run["tokens"] == STOP_STEP * result.config.train.global_batch_size * result.config.data.seq_len
  assert run["best"]["eval_loss"]["step"] % 2 == 0 and run["train_seconds"] > 0
