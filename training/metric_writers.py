"""Where metrics go: a progress line on the console, WORKDIR/metrics.jsonl and TensorBoard."""

import json
import os
import sys
import time
from typing import Any

import jax

from data.files import atomic_write


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s")


class MetricWriter:
  """Writes on process 0 only; every record carries its `step`."""

  def __init__(self, workdir: str, num_steps: int, resume_step: int = 0, stream=None):
    self.enabled = jax.process_index() == 0
    self.num_steps = num_steps
    self._stream = stream  # None: sys.stdout when printing, so redirecting stdout redirects the log.
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if not self.enabled:
      return
    _drop_records_after(self.jsonl_path, resume_step)
    self._jsonl = open(self.jsonl_path, "a")
    try:
      import tensorflow as tf  # TensorBoard's writer; TF is already loaded by the data pipeline.

      self._tensorboard = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tensorboard = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      import tensorflow as tf

      with self._tensorboard.as_default(step=int(step)):
        for name, value in record.items():
          if name != "step" and isinstance(value, (int, float)):
            tf.summary.scalar(name, value)
      self._tensorboard.flush()

  def progress(self, step: int, metrics: dict[str, Any], seconds_per_step: float | None) -> None:
    if not self.enabled:
      return
    parts = [f"step {step}/{self.num_steps}"]
    for name, fmt in (
      ("loss", "{:.4f}"),
      ("eval_loss", "{:.4f}"),
      ("perplexity", "{:.2f}"),
      ("learning_rate", "{:.2e}"),
      ("grad_norm", "{:.3f}"),
      ("step_time_ms", "{:.1f}ms"),
      ("tokens_per_second", "{:,.0f} tok/s"),
      ("mfu", "{:.1%} MFU"),
    ):
      if name in metrics:
        label = (
          "" if name in ("step_time_ms", "tokens_per_second", "mfu") else name.replace("learning_rate", "lr") + " "
        )
        parts.append(label + fmt.format(metrics[name]))
    if seconds_per_step:
      parts.append("ETA " + _format_duration(seconds_per_step * (self.num_steps - step)))
    print(" | ".join(parts), file=self._stream or sys.stdout, flush=True)

  def text(self, message: str) -> None:
    if self.enabled:
      print(message, file=self._stream or sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tensorboard is not None:
        self._tensorboard.close()


def _to_python(value):
  value = jax.device_get(value)
  return value.item() if hasattr(value, "item") else value


def _drop_records_after(path: str, step: int) -> None:
  """A resumed run rewrites the steps after its checkpoint, so their old records go."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
  # Replaced whole, never truncated in place: a kill mid-rewrite leaves the old file or the new one.
  with atomic_write(path) as f:
    f.writelines(kept)


def _step_of(line: str) -> int | None:
  """A record's step; None for a line a crash cut short (a full disk, a lost host), which is dropped."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class StepTimer:
  """Wall time per train step since the last reading, less the time hooks took."""

  def __init__(self, step: int):
    self._start, self._step, self._excluded = time.perf_counter(), step, 0.0

  def exclude(self, seconds: float) -> None:
    self._excluded += seconds

  def read(self, step: int) -> float | None:
    now = time.perf_counter()
    elapsed = now - self._start - self._excluded
    per_step = elapsed / (step - self._step) if step > self._step else None
    self._start, self._step, self._excluded = now, step, 0.0
    return per_step
