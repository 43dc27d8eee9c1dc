"""Sweeps: a 2x2 grid killed in its second trial and started again (4 trials, none trained twice, the
planted bad ones stopped by the median rule, the best row the lowest final eval loss), seeded random
search, print_commands' train.py lines, and Optuna's asks (where Optuna is installed)."""

import csv
import glob
import json
import os
import re
import shlex
import shutil
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


def halving(**stop):
  return {"fields": {"seed": [1]}, "stop_trials": {"rule": "halving", "min_steps": 10, **stop}}


@pytest.mark.parametrize(
  "spec, message",
  [
    ({"method": "bayes", "fields": {"seed": [1]}}, "sweep.method='bayes'"),
    ({"fields": {"optimizer.learning_rat": [1]}}, "no field optimizer.learning_rat"),
    ({"fields": {"seed": {"uniform": [0, 1]}}}, "a grid takes a list"),
    ({"method": "random", "fields": {"seed": [1]}}, "sweep.num_trials=None"),
    ({"method": "random", "num_trials": 2, "fields": {"optimizer.learning_rate": {"log_uniform": [0, 1]}}}, "0 < lo"),
    ({"fields": {"seed": [1]}, "stop_trials": {"rule": "hyperband"}}, "sweep.stop_trials.rule='hyperband'"),
    (
      {"fields": {"seed": [1]}, "stop_trials": {"rule": "halving"}},
      "sweep.stop_trials.min_steps: rule 'halving' needs",
    ),
    (halving(reduction_factor=1), "sweep.stop_trials.reduction_factor=1: an integer of at least 2"),
    (halving(min_trials=0), "sweep.stop_trials.min_trials=0: an integer of at least 1"),
    (halving(min_finished=2), "sweep.stop_trials.min_finished: not a key of rule 'halving'"),
    ({"fields": {"seed": [1]}, "stop_trials": {"min_steps": 10}}, "min_steps: not a key of rule 'median'"),
    # configs/tiny.py evaluates every 20 of 40 steps: rungs at 15 (45 is past the end), then at 40 (none).
    (halving(min_steps=15), "min_steps=15: rung step(s) 15 are not evaluated (train.eval_every=20)"),
    (halving(min_steps=40), "min_steps=40: no rung below train.num_steps=40"),
  ],
)
def test_bad_specs_are_one_line_naming_the_key(spec, message):
  from configs import tiny

  with pytest.raises(ConfigError, match=re.escape(message)):
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


def test_halving_rule_keeps_the_best_share_of_a_rung():
  rule = lambda value, others, factor=2, min_trials=2, maximize=False: sweeps.halving_rule(  # noqa: E731
    value, others, factor, min_trials, maximize
  )
  assert rule(9.0, []) is False  # The first trial at a rung: fewer than min_trials.
  assert rule(2.1, [2.0]) is True  # Two trials keep one, the better.
  assert rule(2.0, [2.0]) is False  # A tie continues.
  assert rule(2.1, [2.0, 3.0, 2.2]) is False  # Four keep two: 2.0 and 2.1.
  assert rule(2.3, [2.0, 3.0, 2.2]) is True
  assert rule(2.1, [2.0, 3.0], factor=3, min_trials=4) is False  # Three of four needed.
  assert rule(2.1, [2.0, 3.0, 2.2], factor=3, min_trials=4) is True  # Four keep one.
  assert rule(2.1, [2.0, 3.0, 2.2, 2.5, 2.6], factor=3) is False  # Six keep two.
  assert rule(float("nan"), [9.0]) is True
  assert rule(5.0, [float("nan")]) is False  # A NaN ranks last.
  assert rule(0.6, [0.5], maximize=True) is False and rule(0.4, [0.5], maximize=True) is True  # Accuracies.


def planted_history(directory, evaluations, losses_every=5, until=None):
  """A trial's metrics.jsonl as train() writes it: a loss record every few steps, evaluations at theirs."""
  os.makedirs(directory, exist_ok=True)
  until = until or max(evaluations)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    for step in range(losses_every, until + 1, losses_every):
      f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
      if step in evaluations:
        f.write(json.dumps({"step": step, "eval_loss": evaluations[step]}) + "\n")
  return sweeps.eval_history(directory, "eval_loss")


def drive(hook, directory, evaluations, first_step=1, last_step=80):
  """Runs the hook as train() does, the trial logging `evaluations`; the step it stopped after, or None."""
  path = os.path.join(directory, "metrics.jsonl")
  hook.on_start(first_step - 1, None)
  for step in range(first_step, last_step + 1):
    if step in evaluations:
      with open(path, "a") as f:
        f.write(json.dumps({"step": step, "eval_loss": evaluations[step]}) + "\n")
    hook.on_step(step, None, {})
    if hook.stop_requested:
      return step
  return None


# Earlier trials of a sweep with rungs at steps 10, 20 and 40 (80 steps, reduction factor 2): A finished,
# B was stopped at rung 0 and C at rung 1; their values at each rung are what a later trial is ranked among.
EARLIER = {"A": {10: 2.0, 20: 1.5, 40: 1.2}, "B": {10: 3.0}, "C": {10: 2.2, 20: 1.9}}


@pytest.mark.parametrize(
  "evaluations, stopped_at",
  [
    ({10: 3.5, 20: 1.0, 40: 0.5}, 10),  # Rung 0: not in the best 2 of 4 (2.0 and 2.2).
    ({10: 2.1, 20: 1.6, 40: 0.5}, 20),  # Rung 0: 2nd of 4, continues; rung 1: 2nd of 3, keeps 1.
    ({10: 2.1, 20: 1.4, 40: 1.3}, 40),  # Best at rung 1; rung 2: 1.3 against A's 1.2, keeps 1.
    ({10: 2.1, 20: 1.4, 40: 1.1}, None),  # Best at every rung: trains to the end.
  ],
)
def test_successive_halving_stops_a_trial_at_the_rung_it_falls_behind(tmp_path, evaluations, stopped_at):
  earlier = [planted_history(str(tmp_path / name), history) for name, history in EARLIER.items()]
  directory = str(tmp_path / "trial")
  os.makedirs(directory)
  logged = []
  hook = sweeps.SuccessiveHalvingHook(directory, "eval_loss", earlier, [10, 20, 40], 2, 2, logged.append)
  assert drive(hook, directory, evaluations) == stopped_at
  marker = os.path.join(directory, sweeps.STOPPED_MARKER)
  if stopped_at is None:
    assert not os.path.exists(marker) and not logged
    return
  with open(marker) as f:
    stopped = json.load(f)
  rung = [10, 20, 40].index(stopped_at)
  others = [history[stopped_at] for history in EARLIER.values() if stopped_at in history]
  assert stopped == {
    "rule": "halving",
    "step": stopped_at,
    "rung": rung,
    "value": evaluations[stopped_at],
    "kept": max(1, (len(others) + 1) // 2),
    "others": len(others),
    "cutoff": sorted([*others, evaluations[stopped_at]])[max(1, (len(others) + 1) // 2) - 1],
    "metric": "eval_loss",
  }
  assert logged == [
    f"sweep: stopping this trial at rung {rung} (step {stopped_at}): eval_loss {evaluations[stopped_at]:.5g} is not "
    f"among the best {stopped['kept']} of the {len(others) + 1} trials there "
    f"(the {stopped['kept']}. best: {stopped['cutoff']:.5g})"
  ]


def test_successive_halving_judges_a_resumed_trial_as_before(tmp_path):
  """A restarted sweep's hook starts with the trial's logged evaluations: the rungs it passed pass again,
  and a rung whose evaluation was logged just before a kill (never judged) is judged now."""
  earlier = [planted_history(str(tmp_path / name), history) for name, history in EARLIER.items()]
  directory = str(tmp_path / "trial")
  new_hook = lambda: sweeps.SuccessiveHalvingHook(directory, "eval_loss", earlier, [10, 20, 40], 2, 2, print)  # noqa: E731
  planted_history(directory, {10: 2.1}, until=15)  # Passed rung 0, killed at step 15, resumed from 10.
  assert drive(new_hook(), directory, {20: 1.4}, first_step=11, last_step=30) is None
  planted_history(directory, {10: 2.1, 20: 1.6}, until=20)  # Killed after rung 1's evaluation, before its stop.
  assert drive(new_hook(), directory, {}, first_step=21, last_step=30) == 21
  with open(os.path.join(directory, sweeps.STOPPED_MARKER)) as f:
    assert json.load(f)["step"] == 20


def test_a_rung_a_trial_never_evaluates_is_refused_before_anything_trains(tmp_path):
  from configs import tiny

  spec = {
    "fields": {"train.eval_every": [10, 15]},
    "stop_trials": {"rule": "halving", "min_steps": 10, "reduction_factor": 2},
  }
  assert sweeps.check_spec(spec, tiny.get_config())  # The base config's eval_every is swept: checked per trial.
  with pytest.raises(ConfigError, match=r"trial train.eval_every=15: .*rung step\(s\) 10, 20 are not evaluated"):
    sweeps.run_sweep(tiny.get_config(), spec, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [".sweep_lock"]  # No trial started.


HALVING = {
  **SPEC,
  # Rungs at 10 and 20 of 40 steps; three trials at a rung before it stops any: the good pair (trials 0
  # and 1, in either order) continue, the planted bad trials (2 and 3) are the worst of three and four.
  "stop_trials": {"rule": "halving", "min_steps": 10, "reduction_factor": 2, "min_trials": 3},
}


class KilledAtEnd(StepRecorder):
  """Records the steps, then kills the sweep as the trial ends: after the trial's stop marker, before
  sweep.json records the stop."""

  def on_end(self, step, state, metrics, reason):
    raise Killed()


@pytest.fixture(scope="module")
def halving_sweep(sweep, tmp_path_factory):
  """The grid sweep with successive halving, its good trials 0 and 1 the median sweep's (the same configs,
  finished: copied rather than trained again), killed as trial 2 is stopped, then started again."""
  workdir = str(tmp_path_factory.mktemp("halving") / "sweep")
  record = sweeps.Sweep(workdir, sweeps.check_spec(HALVING))
  for trial in record.trials[:2]:
    shutil.copytree(os.path.join(sweep["workdir"], trial["name"]), record.trial_dir(trial))
    trial["status"] = sweeps.FINISHED
  record.save()
  trained = [{i: [] for i in range(4)} for _ in range(2)]
  with pytest.raises(Killed):
    sweeps.run_sweep(
      sweep["config"], HALVING, workdir, lambda i: [(KilledAtEnd if i == 2 else StepRecorder)(trained[0][i])]
    )
  with open(os.path.join(workdir, "sweep.json")) as f:
    after_kill = json.load(f)
  rows = sweeps.run_sweep(sweep["config"], HALVING, workdir, lambda i: [StepRecorder(trained[1][i])])
  with open(os.path.join(workdir, "sweep.json")) as f:
    record = json.load(f)
  return {"workdir": workdir, "trained": trained, "after_kill": after_kill, "record": record, "rows": rows}


def test_successive_halving_stops_the_planted_bad_trials_at_their_first_rung_through_a_kill(halving_sweep, sweep):
  trained, record = halving_sweep["trained"], halving_sweep["record"]
  assert [t["status"] for t in halving_sweep["after_kill"]["trials"]] == ["finished", "finished", "running", "pending"]
  assert trained[0] == {0: [], 1: [], 2: list(range(1, 11)), 3: []}  # Trial 2 stopped at rung 0 (step 10)...
  assert trained[1] == {0: [], 1: [], 2: [], 3: list(range(1, 11))}  # ...stays stopped after the kill; 3 too.
  assert [t["status"] for t in record["trials"]] == ["finished", "finished", "stopped_early", "stopped_early"]
  directories = [os.path.join(halving_sweep["workdir"], t["name"]) for t in record["trials"]]
  good = [final_eval_loss_at(d, 10) for d in directories[:2]]
  for index in (2, 3):
    stopped = record["trials"][index]["stopped"]
    assert stopped["rule"] == "halving" and stopped["step"] == 10 and stopped["rung"] == 0
    assert stopped["others"] == index and stopped["kept"] == (index + 1) // 2  # Of 3 keep 1; of 4 keep 2.
    assert stopped["value"] == final_eval_loss_at(directories[index], 10)
    assert stopped["value"] > max(good) + 0.5  # The bad learning rate is far behind both good trials.
  with open(os.path.join(directories[2], sweeps.STOPPED_MARKER)) as f:
    assert record["trials"][2]["stopped"] == json.load(f)  # The decision made before the kill.
  assert [row["steps"] for row in halving_sweep["rows"]] == [40, 40, 10, 10]
  again = {i: [] for i in range(4)}
  rows = sweeps.run_sweep(sweep["config"], HALVING, halving_sweep["workdir"], lambda i: [StepRecorder(again[i])])
  assert again == {0: [], 1: [], 2: [], 3: []} and rows == halving_sweep["rows"]
