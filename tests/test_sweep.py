"""Sweeps: a 2x2 grid killed in its second trial and started again (4 trials, none trained twice, the
planted bad ones stopped by the median rule, the best row the lowest final eval loss), seeded random
search, print_commands' train.py lines, and Optuna's asks (where Optuna is installed)."""

import csv
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from tests.test_training import corpus_config
from training import hooks as hooks_lib
from training import sweeps
from training.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_LR, BAD_LR = 3e-3, 1e-5  # The bad one barely moves from the initial loss: planted to be stopped.
SPEC = {
  "method": "grid",
  # A seed changes no compiled program: two compilations for four trials.
  "fields": {"optimizer.learning_rate": [GOOD_LR, BAD_LR], "seed": [0, 1]},
  "stop_trials": {"rule": "median", "warmup_evaluations": 1, "min_finished": 2},
}
KILL_AT = 25  # In trial 1, after its checkpoint at step 20.


class Killed(BaseException):
  """What a kill looks like to the sweep: not an Exception, so no trial records it as failed."""


class StepRecorder(hooks_lib.Hook):
  """The steps a trial trains in this process; raises Killed after step `kill_at`, once the checkpoint
  of step 20 (saved asynchronously) is complete on disk, so that the restart resumes from it."""

  def __init__(self, trained: list[int], kill_at: int | None = None, checkpoint_glob: str = ""):
    self.trained, self.kill_at, self.checkpoint_glob = trained, kill_at, checkpoint_glob

  def on_step(self, step, state, metrics):
    self.trained.append(step)
    if step == self.kill_at:
      deadline = time.monotonic() + 120
      while not glob.glob(self.checkpoint_glob) and time.monotonic() < deadline:
        time.sleep(0.05)
      raise Killed()


def steps_logged(directory, key):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [record["step"] for record in map(json.loads, f) if key in record]


def final_eval_loss(directory):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [record["eval_loss"] for record in map(json.loads, f) if "eval_loss" in record][-1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """The grid sweep killed in trial 1 at step KILL_AT, then started again to the end."""
  tmp = tmp_path_factory.mktemp("sweep")
  config = corpus_config(tmp, num_steps=40, eval_every=10, log_every=10, checkpoint_every=10, num_samples=0)
  config.mesh.update(data=-1, fsdp=1, tensor=1)  # Data parallel alone: the quickest to compile, per trial.
  if "plot_curves" in config.train:
    config.train.plot_curves = False
  workdir = str(tmp / "sweep")
  first = {i: [] for i in range(4)}
  saved = os.path.join(workdir, "trial_001_*", "checkpoints", "20", "_CHECKPOINT_METADATA")
  with pytest.raises(Killed):
    sweeps.run_sweep(config, SPEC, workdir, lambda i: [StepRecorder(first[i], KILL_AT if i == 1 else None, saved)])
  with open(os.path.join(workdir, "sweep.json")) as f:
    after_kill = json.load(f)
  second = {i: [] for i in range(4)}
  rows = sweeps.run_sweep(config, SPEC, workdir, lambda i: [StepRecorder(second[i])])
  with open(os.path.join(workdir, "sweep.json")) as f:
    record = json.load(f)
  return {
    "config": config,
    "workdir": workdir,
    "rows": rows,
    "first": first,
    "second": second,
    "after_kill": after_kill,
    "record": record,
  }


def trial_dirs(sweep):
  return [os.path.join(sweep["workdir"], trial["name"]) for trial in sweep["record"]["trials"]]


def test_killed_sweep_resumes_and_trains_no_trial_twice(sweep):
  assert [t["status"] for t in sweep["after_kill"]["trials"]] == ["finished", "running", "pending", "pending"]
  assert sweep["first"][0] == list(range(1, 41))
  assert sweep["first"][1] == list(range(1, KILL_AT + 1))
  assert sweep["second"][0] == []  # Finished: skipped.
  assert sweep["second"][1] == list(range(21, 41))  # Resumed from its checkpoint at step 20, not from 0.
  assert len(sweep["record"]["trials"]) == 4
  for directory in trial_dirs(sweep):
    logged = steps_logged(directory, "loss")
    assert logged == sorted(set(logged)), directory  # Each step once: the killed run's records were rewritten.
  assert steps_logged(trial_dirs(sweep)[1], "eval_loss") == [10, 20, 30, 40]


def test_median_rule_stops_the_planted_bad_trials(sweep):
  trials = sweep["record"]["trials"]
  assert [t["status"] for t in trials] == ["finished", "finished", "stopped_early", "stopped_early"]
  for index in (2, 3):
    # Warm-up of one evaluation: judged, and stopped, at its second (step 20).
    assert sweep["second"][index] == list(range(1, 21))
    stopped = trials[index]["stopped"]
    assert stopped["step"] == 20 and stopped["others"] == 2
    good = [final_eval_loss_at(d, 20) for d in trial_dirs(sweep)[:2]]
    assert stopped["median"] == pytest.approx(sum(good) / 2)
    assert stopped["value"] > stopped["median"] + 0.5  # The bad learning rate is far behind.


def final_eval_loss_at(directory, step):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return next(r["eval_loss"] for r in map(json.loads, f) if r["step"] == step and "eval_loss" in r)


def test_results_table_marks_the_lowest_final_eval_loss(sweep):
  with open(os.path.join(sweep["workdir"], "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == [
    "trial",
    "field:optimizer.learning_rate",
    "field:seed",
    "final_eval_loss",
    "best_eval_loss",
    "steps",
    "status",
    "best",
    "workdir",
  ]
  losses = [final_eval_loss(d) for d in trial_dirs(sweep)]
  assert [float(row["final_eval_loss"]) for row in rows] == pytest.approx(losses, abs=1e-9)
  assert [int(row["steps"]) for row in rows] == [40, 40, 20, 20]
  assert [float(row["field:optimizer.learning_rate"]) for row in rows] == [GOOD_LR, GOOD_LR, BAD_LR, BAD_LR]
  best = [int(row["trial"]) for row in rows if row["best"] == "1"]
  assert best == [losses.index(min(losses))]
  assert best[0] in (0, 1)
  with open(os.path.join(sweep["workdir"], "results.md")) as f:
    table = f.read().splitlines()
  assert table[2 + best[0]].startswith(f"| {best[0]} |") and "**best**" in table[2 + best[0]]
  assert sum("**best**" in line for line in table) == 1


def test_a_changed_spec_is_refused(sweep):
  changed = {**SPEC, "fields": {"optimizer.learning_rate": [GOOD_LR]}}
  with pytest.raises(ConfigError, match="holds another sweep"):
    sweeps.run_sweep(sweep["config"], changed, sweep["workdir"])


RANDOM = {
  "method": "random",
  "num_trials": 6,
  "seed": 3,
  "fields": {
    "optimizer.learning_rate": sweeps.log_uniform(1e-4, 1e-2),
    "optimizer.weight_decay": sweeps.uniform(0.0, 0.1),
    "model.num_layers": sweeps.int_range(1, 2),
    "model.mlp": ["gelu", "swiglu"],
  },
}


def test_random_search_with_a_seed_picks_the_same_trials():
  spec = sweeps.check_spec(RANDOM)
  trials = sweeps.expand_trials(spec)
  assert trials == sweeps.expand_trials(sweeps.check_spec(json.loads(json.dumps(RANDOM))))
  assert trials != sweeps.expand_trials({**spec, "seed": 4})
  assert len(trials) == 6 and len({json.dumps(t) for t in trials}) == 6
  for trial in trials:
    assert 1e-4 <= trial["optimizer.learning_rate"] <= 1e-2
    assert 0.0 <= trial["optimizer.weight_decay"] <= 0.1
    assert trial["model.num_layers"] in (1, 2) and trial["model.mlp"] in ("gelu", "swiglu")
  assert {t["model.num_layers"] for t in trials} == {1, 2}  # Both ends of the inclusive range.


@pytest.mark.parametrize(
  "spec, message",
  [
    ({"method": "bayes", "fields": {"seed": [1]}}, "sweep.method='bayes'"),
    ({"fields": {"optimizer.learning_rat": [1]}}, "no field optimizer.learning_rat"),
    ({"fields": {"seed": {"uniform": [0, 1]}}}, "a grid takes a list"),
    ({"method": "random", "fields": {"seed": [1]}}, "sweep.num_trials=None"),
    ({"method": "random", "num_trials": 2, "fields": {"optimizer.learning_rate": {"log_uniform": [0, 1]}}}, "0 < lo"),
    ({"fields": {"seed": [1]}, "stop_trials": {"rule": "halving"}}, "sweep.stop_trials.rule='halving'"),
  ],
)
def test_bad_specs_are_one_line_naming_the_key(spec, message):
  from configs import tiny

  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
    sweeps.check_spec(spec, tiny.get_config())


def test_median_rule():
  rule = lambda value, others, n=2, warmup=1, min_finished=2, maximize=False: sweeps.median_rule(  # noqa: E731
    value, others, n, warmup, min_finished, maximize
  )
  assert rule(1.9, [1.0, 2.0, 3.0]) is False  # Better than the median, 2.0.
  assert rule(2.1, [1.0, 2.0]) is True  # Worse than 1.5.
  assert rule(9.0, [1.0, 2.0], n=1) is False  # In the warm-up.
  assert rule(9.0, [1.0]) is False  # Too few finished trials.
  assert rule(float("nan"), [1.0, 2.0]) is True
  assert rule(0.4, [0.5, 0.7], maximize=True) is True  # An accuracy below the median.


def test_print_commands_prints_one_runnable_train_line_per_trial(tmp_path):
  config_path = os.path.join(REPO, "configs", "tiny_sweep.py")
  out = subprocess.run(
    [sys.executable, "tools/sweep.py", f"--config={config_path}", f"--workdir={tmp_path}", "--print_commands"]
    + ["--config.train.num_steps=30"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 4
  assert not os.listdir(tmp_path)  # Nothing ran, nothing was written.
  from configs import tiny_sweep

  trials = sweeps.expand_trials(sweeps.check_spec(tiny_sweep.get_sweep()))
  for index, (line, overrides) in enumerate(zip(lines, trials)):
    words = shlex.split(line)
    assert words[:2] == ["python", "train.py"]
    # Parsed as train.py's flags parse them: the trial's config and its own workdir.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=words[1:])
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(words[1:])
    assert flag_values.workdir == os.path.join(str(tmp_path), sweeps.trial_name(index, overrides))
    assert flag_values.config.train.num_steps == 30
    for field, value in overrides.items():
      section, name = field.split(".")
      assert flag_values.config[section][name] == value


def test_optuna_asks_within_the_space_and_the_same_again():
  pytest.importorskip("optuna")
  spec = sweeps.check_spec({**RANDOM, "method": "optuna"})
  first = sweeps._ask_optuna(spec, [], 0)
  assert first == sweeps._ask_optuna(spec, [], 0)
  done = [{"overrides": first, "status": sweeps.FINISHED, "value": 2.5}]
  second = sweeps._ask_optuna(spec, done, 1)
  assert second == sweeps._ask_optuna(spec, done, 1) and second != first
  assert 1e-4 <= second["optimizer.learning_rate"] <= 1e-2 and second["model.mlp"] in ("gelu", "swiglu")
  with pytest.raises(ConfigError, match="runs here, not as commands"):
    sweeps.print_commands(spec, "configs/tiny.py", "/tmp/x")


def test_a_finished_sweep_started_again_trains_nothing(sweep):
  trained = {i: [] for i in range(4)}
  rows = sweeps.run_sweep(sweep["config"], SPEC, sweep["workdir"], lambda i: [StepRecorder(trained[i])])
  assert trained == {0: [], 1: [], 2: [], 3: []}  # Stopped trials stay stopped: none resumes to step 40.
  assert rows == sweep["rows"]
