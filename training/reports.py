"""Runs compared from what their workdirs hold: config.json and metrics.jsonl (and best/, when kept).

`compare(workdirs)` gives one dict per run; `markdown(runs)` the table tools/compare.py prints.
Reads files only (no jax, no TensorFlow), so a notebook or a shell compares runs in a moment.
"""

import json
import math
import os
import re
from typing import Any

# train.early_stopping_mode: auto is max for an accuracy, min for anything else (losses, bits per byte).
METRIC_MODES = ("auto", "min", "max")


def higher_is_better(metric: str) -> bool:
  """An accuracy is maximised; anything else a run logs (losses, perplexity, bits per byte) minimised."""
  return "accuracy" in metric.split("/")[0]


class RunError(ValueError):
  """A workdir that cannot be read as a loom run; the message names it."""


def read_run(workdir: str) -> dict[str, Any]:
  """One run's summary:

  workdir, steps (the last step logged), num_steps (the config's), tokens (steps x
  train.global_batch_size x data.seq_len), train_seconds (logged step times summed over the steps
  they cover: no compiling, evaluation or checkpointing), final {metric: value} (the last logged
  training loss and the last evaluation's values), best {metric: {"value", "step"}} (each eval_*
  metric's best evaluation, the highest for an accuracy), best_checkpoint (the step in best/, if any).
  """
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: no such directory")
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    batch_tokens = int(config["train"]["global_batch_size"]) * int(config["data"]["seq_len"])
    num_steps = int(config["train"]["num_steps"])
  except FileNotFoundError:
    raise RunError(f"{workdir}: no config.json (not a loom workdir, or its run never started)") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunError(f"{workdir}/config.json cannot be read ({type(e).__name__}: {e})") from None
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [record for record in map(_record, f) if record is not None]
  except FileNotFoundError:
    raise RunError(f"{workdir}: no metrics.jsonl (not a loom workdir, or its run never started)") from None
  except OSError as e:
    raise RunError(f"{workdir}/metrics.jsonl cannot be read ({e})") from None

  steps = max((record["step"] for record in records), default=0)
  final: dict[str, float] = {}
  best: dict[str, dict[str, float]] = {}
  train_seconds, last_timed_step = 0.0, 0
  for record in records:
    step = record["step"]
    if "loss" in record:
      final["loss"] = record["loss"]
      if "step_time_ms" in record:
        train_seconds += record["step_time_ms"] / 1000 * max(step - last_timed_step, 0)
      last_timed_step = step
    for name, value in record.items():
      if not name.startswith("eval_") or not isinstance(value, (int, float)):
        continue
      final[name] = value
      sign = 1 if higher_is_better(name) else -1
      if not math.isnan(value) and (name not in best or sign * value > sign * best[name]["value"]):
        best[name] = {"value": value, "step": step}
  return {
    "workdir": workdir,
    "steps": steps,
    "num_steps": num_steps,
    "tokens": steps * batch_tokens,
    "train_seconds": train_seconds,
    "final": final,
    "best": best,
    "best_checkpoint": _best_checkpoint(workdir),
  }


def compare(workdirs: list[str]) -> list[dict[str, Any]]:
  """read_run of each; a RunError naming every workdir that cannot be read, in one line."""
  runs, errors = [], []
  for workdir in workdirs:
    try:
      runs.append(read_run(workdir))
    except RunError as e:
      errors.append(str(e))
  if errors:
    raise RunError("; ".join(errors))
  return runs


def markdown(runs: list[dict[str, Any]]) -> str:
  """A Markdown table: one column per run, one row per measure (every metric any run logged)."""
  metrics = ["loss"] * any("loss" in run["final"] for run in runs)
  metrics += sorted({name for run in runs for name in run["final"] if name.startswith("eval_")}, key=_metric_order)
  rows = [
    ("steps", [f"{run['steps']:,} / {run['num_steps']:,}" for run in runs]),
    ("tokens", [f"{run['tokens']:,}" for run in runs]),
    ("train time", [_duration(run["train_seconds"]) if run["train_seconds"] else "-" for run in runs]),
  ]
  for name in metrics:
    rows.append((f"{name} (final)", [_number(run["final"].get(name)) for run in runs]))
    if name != "loss":
      best = [run["best"].get(name) for run in runs]
      rows.append((f"{name} (best)", [f"{_number(b['value'])} at step {b['step']:,}" if b else "-" for b in best]))
  if any(run["best_checkpoint"] is not None for run in runs):
    rows.append(("best checkpoint", [_optional_step(run["best_checkpoint"]) for run in runs]))
  header = ["workdir", *(_cell(run["workdir"]) for run in runs)]
  lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(runs) + "|"]
  lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
  return "\n".join(lines)


def _record(line: str) -> dict[str, Any] | None:
  """A metrics.jsonl record; None for a line a crash cut short."""
  try:
    record = json.loads(line)
    record["step"] = int(record["step"])
    return record
  except (ValueError, KeyError, TypeError):
    return None


def _best_checkpoint(workdir: str) -> int | None:
  directory = os.path.join(workdir, "best")
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if re.fullmatch(r"\d+", name)]
  return max(steps, default=None)


def _metric_order(name: str) -> tuple[bool, str]:
  return ("/" in name, name)  # The pooled metrics first, then each source's.


def _number(value) -> str:
  return "-" if value is None else f"{value:.4f}"


def _optional_step(step: int | None) -> str:
  return "-" if step is None else f"step {step:,}"


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _cell(text: str) -> str:
  return text.replace("|", "\\|")
