"""Online batch selection against plain training, at equal tokens and at equal compute.

  python benchmarks/selection.py                               # about 10 minutes on 2 idle CPU cores
  python benchmarks/selection.py --steps=100 --fractions=0.5   # a smoke run

configs/quickstart.py (Python's standard library) trained --steps steps with selection.fraction f: each
step scores a candidate batch of 16 / f rows with a forward pass and trains on the 16 with the highest
loss. Against it, plain training of the same config:
- at equal tokens: --steps steps, the same trained tokens and learning-rate schedule;
- at equal compute: the steps the selecting run's FLOPs buy a plain run. A forward pass is a third of a
  training step's FLOPs, so a selecting step costs 1 + 1 / (3 f) plain steps (training/selection.py's
  flops_per_trained_token): round(--steps * (1 + 1 / (3 f))) plain steps, with their own schedule.
Each run is train.py's (training.run.train, one directory per run under --workdir, reused when there),
evaluated at its last step over the first --eval_batches validation batches: the same batches for every
run. The wall-clock column is the median logged step time; the load average is printed with the table.
With --seeds above 1, every loss is the mean over the seeds (config.seed: initialisation and data order).
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from training.cli import skip_absent_tpu  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loom_bench_selection", "Directory of the runs made here.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of the selecting runs and the equal-token plain run.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.5", "0.25"], "selection.fraction values to measure.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 20, "Validation batches of every final loss.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per run (losses averaged).")


def _config(steps: int, fraction: float, seed: int):
  from configs import quickstart

  config = quickstart.get_config()
  config.seed = seed
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
  config.train.update(
    num_steps=steps,
    eval_every=steps,
    eval_batches=_EVAL_BATCHES.value,
    checkpoint_every=steps,
    num_samples=0,
    log_every=max(1, steps // 12),
    plot_curves=False,
  )
  config.selection.fraction = fraction
  return config


def _run(steps: int, fraction: float, seed: int) -> dict:
  """The final eval loss and median step time of one run, trained here unless already finished."""
  from training.run import train

  workdir = os.path.join(_WORKDIR.value, f"steps{steps}_fraction{fraction:g}_seed{seed}")
  start = time.perf_counter()
  train(_config(steps, fraction, seed), workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval_loss" in r and r["step"] == steps]
  times = [r["step_time_ms"] for r in records if "step_time_ms" in r][1:]  # The first includes compiling.
  times.sort()
  print(f"  {workdir}: {time.perf_counter() - start:.0f} s", flush=True)
  return {"eval_loss": evals[-1]["eval_loss"], "step_ms": times[len(times) // 2] if times else float("nan")}


def _mean_run(steps: int, fraction: float) -> dict:
  runs = [_run(steps, fraction, seed) for seed in range(_SEEDS.value)]
  return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}


def main(argv):
  del argv
  skip_absent_tpu()
  logging.set_verbosity(logging.ERROR)
  import jax

  load = os.getloadavg()
  print(
    f"{jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}, {os.cpu_count()} cores, "
    f"load average {load[0]:.1f} at the start",
    flush=True,
  )
  start = time.perf_counter()
  steps = _STEPS.value
  fractions = [float(f) for f in _FRACTIONS.value]
  plain = _mean_run(steps, 1.0)
  rows = [
    "| run | steps | trained tokens | model FLOPs (plain steps) | eval loss | vs plain, equal tokens "
    "| vs plain, equal compute | step time (ms) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
    f"| plain | {steps} | 1.00x | {steps} | {plain['eval_loss']:.4f} | | | {plain['step_ms']:.1f} |",
  ]
  for fraction in fractions:
    cost = 1.0 + 1.0 / (3.0 * fraction)
    equal_compute_steps = round(steps * cost)
    selected = _mean_run(steps, fraction)
    matched = _mean_run(equal_compute_steps, 1.0)
    rows.append(
      f"| plain, equal compute to f={fraction:g} | {equal_compute_steps} | {cost:.2f}x | {equal_compute_steps} "
      f"| {matched['eval_loss']:.4f} | | | {matched['step_ms']:.1f} |"
    )
    rows.append(
      f"| selection f={fraction:g} ({round(16 / fraction)} candidates) | {steps} | 1.00x | {equal_compute_steps} "
      f"| {selected['eval_loss']:.4f} | {selected['eval_loss'] - plain['eval_loss']:+.4f} "
      f"| {selected['eval_loss'] - matched['eval_loss']:+.4f} | {selected['step_ms']:.1f} |"
    )
  print(f"\nconfigs/quickstart.py, batch 16 x 128, {_SEEDS.value} seed(s), eval over {_EVAL_BATCHES.value} batches\n")
  print("\n".join(rows))
  load = os.getloadavg()
  print(f"\n{time.perf_counter() - start:.0f} s in all; load average {load[0]:.1f} at the end")


if __name__ == "__main__":
  app.run(main)
