"""Sweeps: many trials of one config, each a field or a few changed, run one after another.

A sweep is plain data (a dict), returned by `get_sweep()` beside `get_config()` in a config file, or
by a sweep file of its own (tools/sweep.py --sweep=FILE.py):

  def get_sweep():
    return {
      "method": "grid",  # grid | random | optuna
      "fields": {"optimizer.learning_rate": [1e-3, 3e-3], "model.num_layers": [1, 2]},
    }

  {"method": "random", "num_trials": 8, "seed": 0, "fields": {
      "optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]},
      "optimizer.weight_decay": {"uniform": [0.0, 0.1]},
      "model.num_layers": {"int": [1, 4]},  # inclusive
      "model.mlp": {"choice": ["gelu", "swiglu"]},  # a plain list means the same
  }}

Keys:
  method: "grid" (every combination of the lists, the first field varying slowest), "random" (num_trials
    draws from a seeded generator: the same seed picks the same trials) or "optuna" (Optuna's TPE sampler,
    Bayesian, told each trial's final metric; seeded per trial, so a restarted sweep asks what it would
    have asked; needs `pip install optuna`).
  fields: dotted config field -> a list of values, or (random, optuna) a distribution {"uniform": [lo, hi]},
    {"log_uniform": [lo, hi]}, {"int": [lo, hi]} or {"choice": [values]}. The helpers below build them.
  num_trials, seed: random and optuna only.
  metric: the evaluation metric trials are judged by (default "eval_loss"; an accuracy is maximised).
  stop_trials: absent (no trial is stopped), the median rule or successive halving, on `metric`:
    {"rule": "median", "warmup_evaluations": 1, "min_finished": 2} stops a trial at an evaluation that is
      worse than the median of the finished trials' values at the same step, once the trial has made more
      than `warmup_evaluations` evaluations and at least `min_finished` finished trials evaluated that step
      (as Optuna's MedianPruner and Vizier's median stopping do).
    {"rule": "halving", "min_steps": 10, "reduction_factor": 3, "min_trials": 3}: successive halving as
      Optuna's SuccessiveHalvingPruner applies it to trials that run one after another (ASHA's rule,
      without ASHA's later promotion of a trial it paused: a stopped trial stays stopped). Its rungs are
      the steps min_steps * reduction_factor**k below train.num_steps, each one an evaluated step (a
      multiple of train.eval_every, else a ConfigError). At a rung, a trial continues while its value
      is among the best max(1, n // reduction_factor) of the n values there: its own and those of every
      earlier trial that reached the rung, stopped ones included (ties continue). No rung stops a trial
      before `min_trials` trials, this one included, have reached it (default: reduction_factor, the
      fewest of which a 1/reduction_factor share is one trial). min_steps has no default.
    A stop is final: the trial's workdir keeps a marker of it, so a sweep killed and started again never
    resumes a stopped trial, and a resumed trial is judged again at every rung it had reached, against
    the same earlier trials, so it gets the same decisions (and one a kill cut short).

The specs are plain data so that config files, which import nothing of loom, can hold them, and so
that DIR/sweep.json records the spec verbatim: a sweep started again with another spec is refused.

`run_sweep` runs the trials in DIR/trial_NNN_<field=value,...> (training.run.train), recording each
trial's overrides and status in DIR/sweep.json before and after it trains. Started again, it skips
trials that finished, stopped early or failed, and resumes an unfinished one from its own checkpoint:
no trial trains a step twice. After every trial it writes DIR/results.csv and DIR/results.md.
"""

import copy
import csv
import fcntl
import io
import itertools
import json
import math
import os
import re
import shlex
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from data.files import atomic_write, writable_directory
from training import hooks as hooks_lib
from training import reports
from training.validation import ConfigError

METHODS = ("grid", "random", "optuna")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "choice")
STOP_RULES = ("median", "halving")
SPEC_KEYS = ("method", "fields", "num_trials", "seed", "metric", "stop_trials")
# Each rule's keys beside "rule", with their defaults (halving's min_steps has none; its min_trials
# defaults to its reduction_factor, set in _check_stop).
STOP_RULE_KEYS = {
  "median": {"warmup_evaluations": 1, "min_finished": 2},
  "halving": {"min_steps": None, "reduction_factor": 3, "min_trials": None},
}
STOP_KEYS = ("rule", *dict.fromkeys(key for keys in STOP_RULE_KEYS.values() for key in keys))

PENDING = "pending"  # Not started.
RUNNING = "running"  # Started and not ended: killed, preempted or stopped at train.stop_at_step; resumed next time.
FINISHED = "finished"  # Trained to train.num_steps (or to the config's own early stop).
STOPPED_EARLY = "stopped_early"  # Stopped by stop_trials: it fell behind the finished trials.
FAILED = "failed"  # train() raised; the error is in sweep.json. Not retried.
DONE = (FINISHED, STOPPED_EARLY, FAILED)

STOPPED_MARKER = "stopped_by_sweep.json"  # In a trial's workdir: the stop survives a kill before sweep.json is written.


def uniform(lo: float, hi: float) -> dict[str, list[float]]:
  return {"uniform": [lo, hi]}


def log_uniform(lo: float, hi: float) -> dict[str, list[float]]:
  return {"log_uniform": [lo, hi]}


def int_range(lo: int, hi: int) -> dict[str, list[int]]:
  """Integers lo to hi, both included."""
  return {"int": [lo, hi]}


def choice(values: Sequence[Any]) -> dict[str, list[Any]]:
  return {"choice": list(values)}


def check_spec(spec: Any, config: ConfigDict | None = None) -> dict[str, Any]:
  """The spec with its defaults, or a ConfigError naming the key at fault (and each field that the
  config lacks), before anything trains."""
  if not isinstance(spec, dict):
    raise ConfigError(f"sweep: get_sweep() returned a {type(spec).__name__}; a dict is expected (training/sweeps.py)")
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown:
    raise ConfigError(f"sweep: unknown key(s) {unknown}; allowed: {', '.join(SPEC_KEYS)}")
  spec = {"metric": "eval_loss", "stop_trials": None, **copy.deepcopy(spec)}
  method = spec.get("method", "grid")
  spec["method"] = method
  if method not in METHODS:
    raise ConfigError(f"sweep.method={method!r}: not a sweep method; allowed: {', '.join(METHODS)}")
  fields = spec.get("fields")
  if not isinstance(fields, dict) or not fields:
    raise ConfigError(f"sweep.fields={fields!r}: a non-empty dict of dotted config field -> values is expected")
  for field, values in fields.items():
    _check_values(method, field, values)
    if config is not None:
      _field_parent(config, field)  # Raises for a field the config lacks.
  if method == "grid":
    for key in ("num_trials", "seed"):
      if key in spec:
        raise ConfigError(f"sweep.{key}={spec[key]!r}: a grid runs every combination; {key} is for random and optuna")
  else:
    trials = spec.get("num_trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
      raise ConfigError(f"sweep.num_trials={trials!r}: a positive integer is expected (method {method})")
    seed = spec.setdefault("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise ConfigError(f"sweep.seed={seed!r}: an integer is expected")
  if not isinstance(spec["metric"], str) or not spec["metric"].startswith("eval_"):
    raise ConfigError(f"sweep.metric={spec['metric']!r}: an evaluation metric (eval_loss, eval_accuracy, ...)")
  if spec["stop_trials"] is not None:
    spec["stop_trials"] = _check_stop(spec["stop_trials"])
    if config is not None and not {"train.num_steps", "train.eval_every"} & set(fields):
      check_rungs(spec["stop_trials"], config)  # Else each trial's config is checked (run_sweep).
  return spec


def _check_stop(stop: Any) -> dict[str, Any]:
  """stop_trials with its rule's defaults, or a ConfigError naming the key at fault."""
  if not isinstance(stop, dict) or set(stop) - set(STOP_KEYS):
    raise ConfigError(f"sweep.stop_trials={stop!r}: a dict with keys {', '.join(STOP_KEYS)} is expected")
  rule = stop.get("rule", "median")
  if rule not in STOP_RULES:
    raise ConfigError(f"sweep.stop_trials.rule={rule!r}: allowed: {', '.join(STOP_RULES)}")
  keys = STOP_RULE_KEYS[rule]
  foreign = sorted(set(stop) - {"rule", *keys})
  if foreign:
    raise ConfigError(f"sweep.stop_trials.{foreign[0]}: not a key of rule {rule!r}, which takes {', '.join(keys)}")
  if rule == "halving" and "min_steps" not in stop:
    raise ConfigError("sweep.stop_trials.min_steps: rule 'halving' needs it, the step of its first rung")
  stop = {"rule": rule, **{key: default for key, default in keys.items() if default is not None}, **stop}
  if rule == "halving":
    stop.setdefault("min_trials", stop["reduction_factor"])
  minimum = {"warmup_evaluations": 0, "reduction_factor": 2}
  for key in keys:
    value, least = stop[key], minimum.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ConfigError(f"sweep.stop_trials.{key}={value!r}: an integer of at least {least} is expected")
  return stop


def rung_steps(stop: dict[str, Any], num_steps: int) -> list[int]:
  """Successive halving's rungs: min_steps * reduction_factor**k below num_steps (a trial that reaches
  num_steps has finished; there is nothing left to save by stopping it)."""
  steps, step = [], stop["min_steps"]
  while step < num_steps:
    steps.append(step)
    step *= stop["reduction_factor"]
  return steps


def check_rungs(stop: dict[str, Any], config: ConfigDict) -> None:
  """A ConfigError unless every successive-halving rung of this (trial's) config is an evaluated step:
  a rung the run never evaluates would judge nothing and stop nothing."""
  if stop["rule"] != "halving":
    return
  num_steps, eval_every = config.train.num_steps, config.train.eval_every
  rungs = rung_steps(stop, num_steps)
  prefix = f"sweep.stop_trials.min_steps={stop['min_steps']}"
  if not rungs:
    raise ConfigError(f"{prefix}: no rung below train.num_steps={num_steps}, so no trial would ever be stopped")
  if eval_every <= 0:
    raise ConfigError(f"{prefix}: successive halving judges evaluations, and train.eval_every={eval_every}")
  unevaluated = [step for step in rungs if step % eval_every]
  if unevaluated:
    raise ConfigError(
      f"{prefix}: rung step(s) {', '.join(map(str, unevaluated))} are not evaluated "
      f"(train.eval_every={eval_every}); make min_steps a multiple of train.eval_every"
    )


def _check_values(method: str, field: str, values: Any) -> None:
  where = f"sweep.fields[{field!r}]={values!r}"
  if isinstance(values, (list, tuple)):
    if not values:
      raise ConfigError(f"{where}: an empty list of values")
    return
  if method == "grid":
    raise ConfigError(f"{where}: a grid takes a list of values; distributions are for random and optuna")
  if not isinstance(values, dict) or len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS:
    raise ConfigError(f"{where}: a list or one distribution is expected; allowed: {', '.join(DISTRIBUTIONS)}")
  ((kind, args),) = values.items()
  if kind == "choice":
    if not isinstance(args, (list, tuple)) or not args:
      raise ConfigError(f"{where}: choice takes a non-empty list")
    return
  if not isinstance(args, (list, tuple)) or len(args) != 2:
    raise ConfigError(f"{where}: {kind} takes [lo, hi]")
  lo, hi = args
  numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
  if not numbers or not lo <= hi or (kind != "int" and lo == hi):
    raise ConfigError(f"{where}: {kind} needs numbers lo < hi (lo <= hi for int)")
  if kind == "int" and not all(isinstance(v, int) for v in args):
    raise ConfigError(f"{where}: int takes integer bounds")
  if kind == "log_uniform" and lo <= 0:
    raise ConfigError(f"{where}: log_uniform needs 0 < lo < hi")


def _field_parent(config: ConfigDict, field: str) -> tuple[Any, str]:
  node = config
  parts = field.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise ConfigError(
        f"sweep.fields[{field!r}]: the config has no field {'.'.join(parts[: i + 1])} "
        "(configs/base.py lists every field)"
      )
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def apply_overrides(config: ConfigDict, overrides: dict[str, Any]) -> ConfigDict:
  """A copy of the config with each dotted field set; an integer becomes a float for a float field."""
  config = copy.deepcopy(config)
  for field, value in overrides.items():
    parent, name = _field_parent(config, field)
    if isinstance(parent[name], float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      parent[name] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"sweep.fields[{field!r}]: {value!r} cannot be set ({e})") from None
  return config


def expand_trials(spec: dict[str, Any]) -> list[dict[str, Any]]:
  """Each trial's overrides {field: value}, for grid and random (optuna asks as it goes)."""
  fields = spec["fields"]
  if spec["method"] == "grid":
    return [dict(zip(fields, values)) for values in itertools.product(*fields.values())]
  if spec["method"] != "random":
    raise ValueError(f"{spec['method']} trials are chosen as the sweep runs")
  rng = np.random.default_rng(spec["seed"])
  return [{field: _draw(rng, values) for field, values in fields.items()} for _ in range(spec["num_trials"])]


def _draw(rng: np.random.Generator, values: Any) -> Any:
  if isinstance(values, (list, tuple)):
    values = {"choice": values}
  ((kind, args),) = values.items()
  if kind == "choice":
    return _plain(args[int(rng.integers(len(args)))])
  if kind == "int":
    return int(rng.integers(args[0], args[1] + 1))
  if kind == "log_uniform":
    return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
  return float(rng.uniform(args[0], args[1]))


def _plain(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def trial_name(index: int, overrides: dict[str, Any]) -> str:
  """trial_NNN_<name=value,...>: each field by its last name (its full name where two share one)."""
  last = [field.rsplit(".", 1)[-1] for field in overrides]
  parts = []
  for field, short, value in zip(overrides, last, overrides.values()):
    name = short if last.count(short) == 1 else field
    parts.append(f"{name}={_short_value(value)}")
  summary = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))[:80]
  return f"trial_{index:03d}_{summary}"


def _short_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


def override_flag(field: str, value: Any) -> str:
  """--config.FIELD=VALUE as train.py's config flags parse it, quoted for a shell."""
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, float):
    text = repr(value)
  else:
    text = str(value)
  return shlex.quote(f"--config.{field}={text}")


def print_commands(
  spec: dict[str, Any], config_path: str, workdir: str, base_flags: Sequence[str] = (), python: str = "python"
) -> list[str]:
  """One train.py command per trial (grid and random): for a cluster scheduler, one job each."""
  if spec["method"] == "optuna":
    raise ConfigError("sweep.method='optuna' chooses each trial from the ones before: it runs here, not as commands")
  lines = []
  for index, overrides in enumerate(expand_trials(spec)):
    words = [
      python,
      "train.py",
      shlex.quote(f"--config={config_path}"),
      shlex.quote(f"--workdir={os.path.join(workdir, trial_name(index, overrides))}"),
      *(shlex.quote(flag) for flag in base_flags),
      *(override_flag(field, value) for field, value in overrides.items()),
    ]
    lines.append(" ".join(words))
  return lines


def eval_history(workdir: str, metric: str) -> dict[int, float]:
  """step -> the metric at each evaluation in the workdir's metrics.jsonl (the last record per step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  history: dict[int, float] = {}
  if not os.path.isfile(path):
    return history
  with open(path) as f:
    for line in f:
      _add_record(line, metric, history)
  return history


def _add_record(line: str, metric: str, history: dict[int, float]) -> None:
  try:
    record = json.loads(line)
    if metric in record:
      history[int(record["step"])] = float(record[metric])
  except (ValueError, KeyError, TypeError):
    pass  # A line a kill cut short.


def median_rule(
  value: float, others: Sequence[float], evaluations: int, warmup_evaluations: int, min_finished: int, maximize: bool
) -> bool:
  """Whether a trial's evaluation `value` (its `evaluations`-th) is to be stopped: worse than the median of
  `others` (the finished trials' values at the same step), past the warm-up, with enough others."""
  if evaluations <= warmup_evaluations or len(others) < min_finished:
    return False
  if math.isnan(value):
    return True
  median = statistics.median(others)
  return value < median if maximize else value > median


def halving_rule(value: float, others: Sequence[float], reduction_factor: int, min_trials: int, maximize: bool) -> bool:
  """Whether a trial's `value` at a rung is to be stopped by successive halving: not among the best
  max(1, n // reduction_factor) of the n values there (`others`, the earlier trials' values at the rung,
  and its own; ties continue), once n >= min_trials. A NaN ranks last."""
  n = len(others) + 1
  if n < min_trials:
    return False
  if math.isnan(value):
    return True
  keep = max(1, n // reduction_factor)
  return _rank_key(value, maximize) > sorted(_rank_key(v, maximize) for v in [*others, value])[keep - 1]


def _rank_key(value: float, maximize: bool) -> float:
  """Smaller is better; a NaN is worse than anything."""
  if math.isnan(value):
    return math.inf
  return -value if maximize else value


class _TrialStopper(hooks_lib.Hook):
  """Stops a trial at one of its evaluations that a rule judges to be behind the other trials.

  It reads the trial's evaluations from its own metrics.jsonl, which the evaluation hook writes (and
  flushes) before this hook runs after a step: what the run logged is what is judged, and a resumed
  trial counts the evaluations it made before it was stopped. A stop is written to the trial's
  STOPPED_MARKER before the run is asked to end, so a kill after it cannot undo it.
  """

  def __init__(self, workdir: str, metric: str, log: Callable[[str], None] = print):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.workdir, self.metric = workdir, metric
    self.maximize = reports.higher_is_better(metric)
    self.log = log
    self.history: dict[int, float] = {}
    self.offset = 0
    self.stopped: dict[str, Any] | None = None

  def _read_new_records(self) -> None:
    try:
      size = os.path.getsize(self.path)
    except OSError:
      return
    if size < self.offset:  # Rewritten (a resumed run drops the records past its checkpoint).
      self.offset, self.history = 0, {}
    if size == self.offset:
      return
    with open(self.path) as f:
      f.seek(self.offset)
      text = f.read()
    complete = text.rsplit("\n", 1)[0] if "\n" in text else ""
    self.offset += len(complete.encode()) + (1 if "\n" in text else 0)
    for line in complete.splitlines():
      _add_record(line, self.metric, self.history)

  def on_start(self, step, state):
    self.offset, self.history = 0, {}
    self._read_new_records()

  def on_step(self, step, state, metrics):
    if self.stopped:
      return
    self._read_new_records()
    stopped = self._judge()
    if stopped:
      self.stopped = {**stopped, "metric": self.metric}
      with atomic_write(os.path.join(self.workdir, STOPPED_MARKER)) as f:
        json.dump(self.stopped, f)

  def _judge(self) -> dict[str, Any] | None:
    """The stop's record ({"step", "value", ...}) when the evaluations read so far call for one."""
    raise NotImplementedError

  @property
  def stop_requested(self) -> bool:
    return self.stopped is not None


class MedianStoppingHook(_TrialStopper):
  """Stops a trial that falls behind (the median rule) at one of its evaluations. `finished`: the
  finished trials' {step: value} histories of the metric. Evaluations logged before this process
  started (a resumed trial's) count towards the warm-up and are not judged again."""

  def __init__(
    self,
    workdir: str,
    metric: str,
    finished: Sequence[dict[int, float]],
    warmup_evaluations: int,
    min_finished: int,
    log: Callable[[str], None] = print,
  ):
    super().__init__(workdir, metric, log)
    self.finished = list(finished)
    self.warmup_evaluations, self.min_finished = warmup_evaluations, min_finished
    self.judged_step: int | None = None

  def on_start(self, step, state):
    super().on_start(step, state)
    self.judged_step = max(self.history, default=None)

  def _judge(self) -> dict[str, Any] | None:
    latest = max(self.history, default=None)
    if latest is None or latest == self.judged_step:
      return None
    self.judged_step = latest
    value = self.history[latest]
    others = [history[latest] for history in self.finished if latest in history]
    evaluations = sum(1 for s in self.history if s <= latest)
    if not median_rule(value, others, evaluations, self.warmup_evaluations, self.min_finished, self.maximize):
      return None
    median = statistics.median(others)
    self.log(
      f"sweep: stopping this trial at step {latest}: {self.metric} {value:.5g} is worse than the median "
      f"{median:.5g} of {len(others)} finished trials there"
    )
    return {"rule": "median", "step": latest, "value": value, "median": median, "others": len(others)}


class SuccessiveHalvingHook(_TrialStopper):
  """Stops a trial at the first rung (an evaluated step) where successive halving ranks it out.

  `earlier`: the {step: value} histories of the metric of every trial that ran before this one, stopped
  and failed ones included (what each reached a rung with counts there). Every rung in the trial's
  history is judged, those of a resumed trial's earlier run too: against the same earlier trials the
  decision is the one made before, and a rung whose judgement a kill cut short is judged now."""

  def __init__(
    self,
    workdir: str,
    metric: str,
    earlier: Sequence[dict[int, float]],
    rungs: Sequence[int],
    reduction_factor: int,
    min_trials: int,
    log: Callable[[str], None] = print,
  ):
    super().__init__(workdir, metric, log)
    self.earlier, self.rungs = list(earlier), list(rungs)
    self.reduction_factor, self.min_trials = reduction_factor, min_trials
    self.passed: set[int] = set()  # Rungs judged in this process, and continued.

  def on_start(self, step, state):
    super().on_start(step, state)
    self.passed = set()

  def _judge(self) -> dict[str, Any] | None:
    for rung, step in enumerate(self.rungs):
      if step not in self.history or step in self.passed:
        continue
      value = self.history[step]
      others = [history[step] for history in self.earlier if step in history]
      if not halving_rule(value, others, self.reduction_factor, self.min_trials, self.maximize):
        self.passed.add(step)
        continue
      n = len(others) + 1
      keep = max(1, n // self.reduction_factor)
      cutoff = sorted([*others, value], key=lambda v: _rank_key(v, self.maximize))[keep - 1]
      self.log(
        f"sweep: stopping this trial at rung {rung} (step {step}): {self.metric} {value:.5g} is not among "
        f"the best {keep} of the {n} trials there (the {keep}. best: {cutoff:.5g})"
      )
      return {
        "rule": "halving",
        "step": step,
        "rung": rung,
        "value": value,
        "kept": keep,
        "others": n - 1,
        "cutoff": cutoff,
      }
    return None


def _lock(workdir: str):
  handle = open(os.path.join(workdir, ".sweep_lock"), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise ConfigError(
      f"--workdir={workdir} is in use by another running sweep; wait for it, or use another --workdir"
    ) from None
  except OSError:  # A filesystem without locks: unguarded.
    pass
  return handle


class Sweep:
  """DIR/sweep.json: the spec and every trial's index, name, overrides, status (and error, stop)."""

  def __init__(self, workdir: str, spec: dict[str, Any]):
    self.workdir, self.spec = workdir, spec
    self.path = os.path.join(workdir, "sweep.json")
    self.trials: list[dict[str, Any]] = []
    if os.path.isfile(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      if saved.get("spec") != json.loads(json.dumps(spec)):
        raise ConfigError(
          f"{self.path} holds another sweep (spec {json.dumps(saved.get('spec'))}); "
          "use a new --workdir, or that spec to continue it"
        )
      self.trials = saved["trials"]
    if spec["method"] != "optuna":
      planned = expand_trials(spec)
      if not self.trials:
        self.trials = [
          {"index": i, "name": trial_name(i, o), "overrides": o, "status": PENDING} for i, o in enumerate(planned)
        ]

  def save(self) -> None:
    with atomic_write(self.path) as f:
      json.dump({"spec": self.spec, "trials": self.trials}, f, indent=2)

  def trial_dir(self, trial: dict[str, Any]) -> str:
    return os.path.join(self.workdir, trial["name"])


def run_sweep(
  config: ConfigDict,
  spec: dict[str, Any],
  workdir: str,
  extra_hooks: Callable[[int], Sequence[hooks_lib.Hook]] = lambda index: (),
  log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Runs the sweep's trials in `workdir` one after another (resuming one that did not end, skipping
  those that did) and writes the results; returns the results' rows. `extra_hooks(trial_index)`: more
  hooks for a trial's train(). A preempted trial (SIGTERM) ends the sweep there, to be started again."""
  from training.run import train  # jax and the model: only when trials train.

  spec = check_spec(spec, config)
  try:
    writable_directory(workdir)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be used as a directory ({e})") from None
  lock = _lock(workdir)
  try:
    sweep = Sweep(workdir, spec)
    if spec["method"] != "optuna":
      for trial in sweep.trials:  # Every trial's config is checked before the first trains.
        _check_trial_config(config, trial["overrides"], spec["stop_trials"])
    sweep.save()
    index = 0
    while True:
      if spec["method"] == "optuna":
        if index >= spec["num_trials"]:
          break
        if index == len(sweep.trials):
          overrides = _ask_optuna(spec, sweep.trials, index)
          _check_trial_config(config, overrides, spec["stop_trials"])
          sweep.trials.append(
            {"index": index, "name": trial_name(index, overrides), "overrides": overrides, "status": PENDING}
          )
      elif index >= len(sweep.trials):
        break
      trial = sweep.trials[index]
      index += 1
      directory = sweep.trial_dir(trial)
      if trial["status"] == RUNNING and os.path.isfile(os.path.join(directory, STOPPED_MARKER)):
        trial["status"] = STOPPED_EARLY  # Stopped, then killed before sweep.json said so.
        with open(os.path.join(directory, STOPPED_MARKER)) as f:
          trial["stopped"] = json.load(f)
      if trial["status"] in DONE:
        log(f"sweep: {trial['name']}: {trial['status']}, skipped")
        continue
      log(f"sweep: {trial['name']} ({trial['index'] + 1} of {_planned(sweep)}): {_describe(trial['overrides'])}")
      trial["status"] = RUNNING
      sweep.save()
      trial_config = apply_overrides(config, trial["overrides"])
      hooks = list(extra_hooks(trial["index"]))
      stopper = _stopper(spec, sweep, trial, trial_config.train.num_steps, log)
      if stopper is not None:
        hooks.append(stopper)
      try:
        result = train(trial_config, directory, extra_hooks=hooks)
      except Exception as e:  # noqa: BLE001 -- one failed trial (a diverged model, bad data) ends only itself.
        trial["status"], trial["error"] = FAILED, f"{type(e).__name__}: {str(e)[:500]}"
        log(f"sweep: {trial['name']} failed: {trial['error']}")
        sweep.save()
        write_results(sweep)
        continue
      if result.preempted:
        sweep.save()
        write_results(sweep)
        log(f"sweep: preempted in {trial['name']}; run the same command again to resume it")
        break
      steps = max(reports_steps(directory), default=0)
      if stopper is not None and stopper.stopped:
        trial["status"], trial["stopped"] = STOPPED_EARLY, stopper.stopped
      elif result.early_stopped or steps >= trial_config.train.num_steps:
        trial["status"] = FINISHED
      # Else it stopped at train.stop_at_step: still RUNNING, resumed when the sweep is started again.
      sweep.save()
      write_results(sweep)
    return write_results(sweep)
  finally:
    lock.close()


def reports_steps(directory: str) -> list[int]:
  try:
    return [reports.read_run(directory)["steps"]]
  except reports.RunError:
    return []


def _planned(sweep: Sweep) -> int:
  return sweep.spec["num_trials"] if sweep.spec["method"] == "optuna" else len(sweep.trials)


def _describe(overrides: dict[str, Any]) -> str:
  return ", ".join(f"{field}={value!r}" for field, value in overrides.items())


def _check_trial_config(config: ConfigDict, overrides: dict[str, Any], stop: dict[str, Any] | None) -> None:
  import jax

  from training.validation import validate

  try:
    trial_config = apply_overrides(config, overrides)
    validate(trial_config, jax.device_count())
    if stop is not None:
      check_rungs(stop, trial_config)
  except ConfigError as e:
    raise ConfigError(f"sweep trial {_describe(overrides)}: {e}") from None


def _stopper(spec: dict[str, Any], sweep: Sweep, trial: dict[str, Any], num_steps: int, log) -> _TrialStopper | None:
  stop, metric, directory = spec["stop_trials"], spec["metric"], sweep.trial_dir(trial)
  if stop is None:
    return None
  if stop["rule"] == "halving":
    earlier = [eval_history(sweep.trial_dir(t), metric) for t in sweep.trials if t["index"] < trial["index"]]
    rungs = rung_steps(stop, num_steps)
    return SuccessiveHalvingHook(directory, metric, earlier, rungs, stop["reduction_factor"], stop["min_trials"], log)
  finished = [eval_history(sweep.trial_dir(t), metric) for t in sweep.trials if t["status"] == FINISHED]
  return MedianStoppingHook(directory, metric, finished, stop["warmup_evaluations"], stop["min_finished"], log)


def _optuna_distribution(values: Any):
  import optuna

  if isinstance(values, (list, tuple)):
    values = {"choice": values}
  ((kind, args),) = values.items()
  if kind == "choice":
    return optuna.distributions.CategoricalDistribution(list(args))
  if kind == "int":
    return optuna.distributions.IntDistribution(args[0], args[1])
  return optuna.distributions.FloatDistribution(args[0], args[1], log=kind == "log_uniform")


def _ask_optuna(spec: dict[str, Any], trials: list[dict[str, Any]], index: int) -> dict[str, Any]:
  """Trial `index`'s overrides from Optuna's TPE sampler, told every earlier trial's outcome.

  The study is rebuilt from sweep.json each time with a sampler seeded by (seed, index): a sweep
  started again asks exactly what it would have asked."""
  try:
    import optuna
  except ImportError:
    raise ConfigError("sweep.method='optuna' needs Optuna: pip install optuna") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  distributions = {field: _optuna_distribution(values) for field, values in spec["fields"].items()}
  maximize = reports.higher_is_better(spec["metric"])
  study = optuna.create_study(
    direction="maximize" if maximize else "minimize",
    sampler=optuna.samplers.TPESampler(seed=spec["seed"] * 100003 + index),
  )
  for trial in trials[:index]:
    value = trial.get("value")
    if trial["status"] == FINISHED and value is not None and math.isfinite(value):
      state = optuna.trial.TrialState.COMPLETE
    elif trial["status"] == STOPPED_EARLY:
      state, value = optuna.trial.TrialState.PRUNED, None
    else:
      state, value = optuna.trial.TrialState.FAIL, None
    study.add_trial(
      optuna.trial.create_trial(params=trial["overrides"], distributions=distributions, value=value, state=state)
    )
  asked = study.ask(distributions)
  return {field: _plain(asked.params[field]) for field in spec["fields"]}


RESULT_COLUMNS_AFTER_FIELDS = ("final_eval_loss", "best_eval_loss", "steps", "status", "best", "workdir")


def result_rows(sweep: Sweep) -> list[dict[str, Any]]:
  """One row per trial: trial, field:<dotted.name> per swept field, final_eval_loss, best_eval_loss,
  steps, status, best (1 for the best trial: the lowest final eval loss among the finished trials, or
  among all when none finished) and workdir (the trial's directory, relative to the sweep's)."""
  rows = []
  for trial in sweep.trials:
    directory = sweep.trial_dir(trial)
    try:
      run = reports.read_run(directory)
    except reports.RunError:
      run = {"final": {}, "best": {}, "steps": 0}
    row = {"trial": trial["index"]}
    row.update({f"field:{field}": trial["overrides"].get(field) for field in sweep.spec["fields"]})
    best = run["best"].get("eval_loss")
    row.update(
      final_eval_loss=run["final"].get("eval_loss"),
      best_eval_loss=best["value"] if best else None,
      steps=run["steps"],
      status=trial["status"],
      best=0,
      workdir=trial["name"],
    )
    metric_value = run["final"].get(sweep.spec["metric"])
    if metric_value is not None:
      trial["value"] = metric_value  # Optuna is told this.
    rows.append(row)
  finished = [row for row in rows if row["status"] == FINISHED] or rows
  scored = [row for row in finished if row["final_eval_loss"] is not None and math.isfinite(row["final_eval_loss"])]
  if scored:
    min(scored, key=lambda row: row["final_eval_loss"])["best"] = 1
  return rows


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
  """DIR/results.csv and DIR/results.md from the trials' workdirs; the rows."""
  rows = result_rows(sweep)
  columns = ["trial", *(f"field:{field}" for field in sweep.spec["fields"]), *RESULT_COLUMNS_AFTER_FIELDS]
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({key: "" if value is None else value for key, value in row.items()})
  with atomic_write(os.path.join(sweep.workdir, "results.csv")) as f:
    f.write(text.getvalue())
  with atomic_write(os.path.join(sweep.workdir, "results.md")) as f:
    f.write(markdown(rows, columns) + "\n")
  sweep.save()  # With each trial's metric value.
  return rows


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
  def cell(key: str, value: Any) -> str:
    if value is None:
      return "-"
    if key == "best":
      return "**best**" if value else ""
    if isinstance(value, float):
      return f"{value:.4f}" if key.endswith("eval_loss") else f"{value:.4g}"
    return str(value).replace("|", "\\|")

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(key, row[key]) for key in columns) + " |" for row in rows]
  return "\n".join(lines)


def results_summary(rows: list[dict[str, Any]]) -> str:
  best = [row for row in rows if row["best"]]
  counts = {status: sum(row["status"] == status for row in rows) for status in (FINISHED, STOPPED_EARLY, FAILED)}
  text = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
  if best:
    text += f"; best: trial {best[0]['trial']} ({best[0]['workdir']}), final eval_loss {best[0]['final_eval_loss']:.4f}"
  return text
