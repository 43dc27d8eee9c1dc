"""Curves of runs as a PNG: training loss, evaluation loss (per source) and learning rate against step,
and for a sweep its metric against each swept field.

`plot(paths, output)` draws what tools/plot.py draws; `write_curves(workdir)` is what a finished run
calls for WORKDIR/curves.png. Reads files only (metrics.jsonl, a sweep's results.csv), and draws
with matplotlib's Agg canvas on a Figure of its own: no pyplot state, so it runs in a training
process, a shell or a notebook (which can display the returned Figure) without changing its backend.

A path is either a workdir (it has metrics.jsonl: one JSON record per line with its `step`; logged
steps carry `loss` and `learning_rate`, evaluations `eval_loss` and, with several sources,
`eval_loss/NAME`) or a sweep directory. A sweep directory (tools/sweep.py writes one) holds
`results.csv`, one row per trial, read by column name and nothing else:
  - `field:<dotted.name>`: the value of each swept config field (e.g. `field:optimizer.learning_rate`);
    numbers are plotted on a number axis (logarithmic when positive and spanning more than 10x),
    anything else as categories;
  - `final_eval_loss` (else the first `final_*` column): the metric; an empty or non-numeric cell
    (a trial stopped early or not yet run) leaves that row out of the metric panels;
  - `workdir` (optional): the trial's workdir, absolute or relative to the sweep directory. Without it,
    every directory beneath the sweep directory that has a metrics.jsonl is a trial.
Other columns (a best-trial marker, steps, times) are ignored.
"""

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence

from data.files import atomic_write
from training.reports import higher_is_better

RESULTS_CSV = "results.csv"  # A sweep directory's results table (tools/sweep.py).
FIELD_PREFIX = "field:"  # A results column holding a swept config field's value.
METRIC_COLUMN = "final_eval_loss"
CURVES_PNG = "curves.png"  # What a finished run writes into its workdir.
LOG_SPAN = 10.0  # A positive field whose largest value exceeds this times its smallest gets a log axis.

Series = tuple[list[int], list[float]]  # (steps, values)


class PlotError(ValueError):
  """A path that is neither a loom workdir nor a sweep directory, or cannot be read; the message names it."""


@dataclasses.dataclass
class Sweep:
  directory: str
  fields: list[str]  # The swept config fields (dotted names), in the table's column order.
  metric: str  # The metric column (final_eval_loss).
  values: dict[str, list]  # field -> its value in each trial with a metric (floats where all are numbers).
  metric_values: list[float]  # The metric of those trials, in the same order.
  trials: list[str]  # The trials' workdirs (those that exist).


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "metrics.jsonl"))


def is_sweep(path: str) -> bool:
  return os.path.isfile(os.path.join(path, RESULTS_CSV))


def read_curves(workdir: str) -> dict[str, Series]:
  """metric -> (steps, values) for `loss`, `learning_rate`, `eval_loss` and each `eval_loss/NAME` the run
  logged; a later record of a step replaces an earlier one (a resumed run rewrote it)."""
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    raise PlotError(f"{workdir}: no metrics.jsonl (not a loom workdir, or its run never started)") from None
  except OSError as e:
    raise PlotError(f"{path} cannot be read ({e})") from None
  points: dict[str, dict[int, float]] = {}
  for line in lines:
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):  # A line a kill cut short.
      continue
    for name, value in record.items():
      if _is_curve(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
        points.setdefault(name, {})[step] = float(value)
  return {name: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for name, by_step in points.items()}


def _is_curve(name: str) -> bool:
  return name in ("loss", "learning_rate", "eval_loss") or name.startswith("eval_loss/")


def read_sweep(directory: str) -> Sweep:
  """The sweep's results table (the format is in this module's docstring) and its trials' workdirs."""
  path = os.path.join(directory, RESULTS_CSV)
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise PlotError(f"{path} cannot be read ({e})") from None
  except csv.Error as e:
    raise PlotError(f"{path} is not a CSV table ({e})") from None
  columns = list(rows[0]) if rows else []
  fields = [c.removeprefix(FIELD_PREFIX) for c in columns if c and c.startswith(FIELD_PREFIX)]
  metric = METRIC_COLUMN if METRIC_COLUMN in columns else next((c for c in columns if c.startswith("final_")), "")
  values: dict[str, list] = {field: [] for field in fields}
  metric_values = []
  for row in rows:
    value = _number(row.get(metric))
    if value is None:
      continue
    metric_values.append(value)
    for field in fields:
      values[field].append((row.get(FIELD_PREFIX + field) or "").strip())
  for field, cells in values.items():
    numbers = [_number(cell) for cell in cells]
    if cells and all(number is not None for number in numbers):
      values[field] = numbers
  if "workdir" in columns:
    trials = [os.path.join(directory, row["workdir"]) for row in rows if row.get("workdir")]
  else:
    trials = [
      os.path.join(root, name)
      for root, names, _ in sorted(os.walk(directory))
      for name in sorted(names)
      if is_workdir(os.path.join(root, name))
    ]
  return Sweep(directory, fields, metric, values, metric_values, [t for t in trials if is_workdir(t)])


def _number(cell) -> float | None:
  try:
    value = float(cell)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _labels(workdirs: Sequence[str]) -> list[str]:
  """Each workdir's name, with as many parent directories as it takes to tell them apart."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(map(len, parts), default=1) + 1):
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return [str(w) for w in workdirs]


def plot(paths: Sequence[str], output: str | None = None):
  """A matplotlib Figure of the runs' curves (a sweep directory adds its trials' curves and one panel of
  its metric per swept field), written as a PNG to `output` when given. PlotError names every path that
  is neither a workdir nor a sweep directory."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  bad = [path for path in paths if not (is_workdir(path) or is_sweep(path))]
  if bad:
    raise PlotError(
      "; ".join(
        f"{path}: not a loom workdir (no metrics.jsonl) nor a sweep directory (no {RESULTS_CSV})" for path in bad
      )
    )
  workdirs, sweeps = [], []
  for path in paths:
    if is_sweep(path):
      sweep = read_sweep(path)
      sweeps.append(sweep)
      workdirs += sweep.trials
    if is_workdir(path):
      workdirs.append(path)
  curves = [read_curves(workdir) for workdir in workdirs]
  field_panels = [(sweep, field) for sweep in sweeps for field in sweep.fields]

  columns = 3
  rows = 1 + math.ceil(len(field_panels) / columns)
  figure = Figure(figsize=(5 * columns, 3.6 * rows), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  loss_ax, eval_ax, lr_ax = (figure.add_subplot(rows, columns, i + 1) for i in range(3))
  for ax, title in ((loss_ax, "training loss"), (eval_ax, "evaluation loss"), (lr_ax, "learning rate")):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
  for index, (label, run) in enumerate(zip(_labels(workdirs), curves)):
    color = f"C{index % 10}"
    if "loss" in run:
      loss_ax.plot(*run["loss"], color=color, label=label)
    if "learning_rate" in run:
      lr_ax.plot(*run["learning_rate"], color=color, label=label)
    if "eval_loss" in run:
      eval_ax.plot(*run["eval_loss"], color=color, marker=".", label=label)
    sources = sorted(name for name in run if name.startswith("eval_loss/"))
    for source_index, name in enumerate(sources):
      style = ("--", ":", "-.")[source_index % 3]
      eval_ax.plot(*run[name], color=color, linestyle=style, marker=".", label=f"{label} {name.split('/', 1)[1]}")
  for ax in (loss_ax, eval_ax, lr_ax):
    if ax.lines:
      ax.legend(fontsize="small")
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")

  for index, (sweep, field) in enumerate(field_panels):
    ax = figure.add_subplot(rows, columns, columns + index + 1)
    _field_panel(ax, sweep, field, len(sweeps) > 1)
  if output:
    with atomic_write(output, "wb") as f:  # Whole or not at all: a kill leaves no half PNG.
      figure.savefig(f, format="png")
  return figure


def _field_panel(ax, sweep: Sweep, field: str, name_sweep: bool) -> None:
  """The sweep's metric against one swept field: a log axis for positive numbers spanning more than
  LOG_SPAN, categories for values that are not all numbers."""
  xs, ys = sweep.values[field], sweep.metric_values
  title = f"{os.path.basename(os.path.normpath(sweep.directory))}: {field}" if name_sweep else field
  ax.set(title=title, xlabel=field, ylabel=sweep.metric)
  ax.grid(alpha=0.3)
  if not ys:
    ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes, color="gray")
    return
  if all(isinstance(x, float) for x in xs):
    if min(xs) > 0 and max(xs) > LOG_SPAN * min(xs):
      ax.set_xscale("log")
  else:
    categories = sorted(set(xs))
    xs = [categories.index(x) for x in xs]
    ax.set_xticks(range(len(categories)), categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
  ax.scatter(xs, ys)
  pick = max if higher_is_better(sweep.metric.removeprefix("final_")) else min
  best = pick(range(len(ys)), key=ys.__getitem__)
  ax.scatter([xs[best]], [ys[best]], marker="*", s=200, color="C3", label="best", zorder=3)
  ax.legend(fontsize="small")


def write_curves(workdir: str, output: str | None = None) -> str:
  """The run's curves as a PNG (WORKDIR/curves.png unless `output`); its path."""
  output = output or os.path.join(workdir, CURVES_PNG)
  plot([workdir], output)
  return output
