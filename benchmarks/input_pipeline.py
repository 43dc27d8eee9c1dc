"""Does the input pipeline keep up with training? The default configs, in memory and prepared.

  SHAKESPEARE=../shared/data/tinyshakespeare/input.txt   # a local copy; or: python tools/download.py tinyshakespeare
  python benchmarks/input_pipeline.py --shakespeare=$SHAKESPEARE   # both configs, about 4 minutes on 2 cores
  python benchmarks/input_pipeline.py --configs=shakespeare_char --rounds=15 --shakespeare=$SHAKESPEARE

For each config (its model and batch as they are, on one CPU device: cpu_devices
is not applied) and each pipeline, the rows
in memory (what train.py does) or a prepared ArrayRecord copy of the same
sources (written once by prepare_datasets into a temporary directory):
  pipeline tok/s: tokens of the batches `train_batches` yields, iterated alone;
    median of rounds of consecutive batches after a warm-up.
  train tok/s: the compiled train step on one device-resident synthetic batch.
  step ms real / synthetic: the training loop of train.py (next batch, then
    global_batch_from_local, then the step) fed by the pipeline, or by host
    numpy batches made in advance, so the only difference is where the numpy
    batch comes from. The arms of a round (resident, synthetic, each pipeline)
    run in turn, in an order rotated every round, so all meet the same machine
    load; real/synthetic is the median over rounds of the two arms' ratio
    (the step ms columns are each arm's own median, so on a loaded machine
    their quotient can differ from it).
  CPU ms: process CPU time (every thread: XLA's, tf.data's, Python's) per
    batch of the pipeline alone and per step of each arm. Other processes on a
    shared machine do not count in it, so CPU real/synthetic is the steadier
    measure of what the pipeline takes from the step there.
Each pipeline keeps one iterator for the whole run, as training does: its
prefetch buffer is full at the start of a round, as it is in a training run
whose pipeline is faster than the step.
"""

import importlib
import itertools
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import data  # noqa: E402
import sharding  # noqa: E402
from configs import base  # noqa: E402
from data.datasets import prepare_datasets  # noqa: E402
from tests.synthetic import batch as synthetic_batch  # noqa: E402
from training.setup import build_setup  # noqa: E402
from training.validation import validate  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["quickstart", "shakespeare_char"], "Modules of configs/ to measure.")
_SHAKESPEARE = flags.DEFINE_string(
  "shakespeare",
  "",
  "shakespeare_char's corpus, e.g. a local copy; '': loom's download cache (python tools/download.py tinyshakespeare).",
)
_PIPELINES = flags.DEFINE_list("pipelines", ["memory", "prepared"], "memory and/or prepared.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Interleaved rounds of train steps.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps of each arm per round.")
_PIPELINE_ROUNDS = flags.DEFINE_integer("pipeline_rounds", 5, "Rounds of the pipeline alone.")
_PIPELINE_STEPS = flags.DEFINE_integer("pipeline_steps", 300, "Batches per round of the pipeline alone.")
flags.register_validator(
  "pipelines", lambda names: set(names) <= {"memory", "prepared"}, "--pipelines takes memory and/or prepared."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "", "Tokenizers, row caches and prepared data; '': a temporary directory, removed at the end."
)


def build_pipelines(config, workdir: str) -> dict[str, data.Datasets]:
  """The config's sources read in memory, and from a prepared copy made here."""
  sizes = {"global_batch_size": config.train.global_batch_size, "seed": config.seed}
  built = {}
  if "memory" in _PIPELINES.value:
    built["in memory"] = data.build_datasets(config.data, workdir=os.path.join(workdir, "memory"), **sizes)
  if "prepared" in _PIPELINES.value:
    prepared_dir = os.path.join(workdir, "prepared")
    prepare_datasets(config.data, prepared_dir, overwrite=True)
    prepared = config.data.copy_and_resolve_references()
    prepared.sources = ml_collections.ConfigDict(
      {
        name: base.source(kind="prepared", paths=os.path.join(prepared_dir, name), weight=source.weight)
        for name, source in config.data.sources.items()
      }
    )
    # The preparing workdir: a char vocabulary stays in its tokenizer/ (only a
    # sentencepiece model is copied next to the prepared rows).
    built["prepared"] = data.build_datasets(prepared, workdir=prepared_dir, **sizes)
  return built


def without_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  batch.pop("source_counts")  # The step takes model inputs only (train() pops it the same way).
  return batch


def pipeline_alone(batches, tokens_per_batch: int) -> tuple[list[float], list[float]]:
  """Tokens/s and process CPU ms per batch of rounds of consecutive batches, after a warm-up.

  The rounds touch, so no prefetch buffer refills between them: each round
  measures how fast the pipeline makes batches, not how fast it empties a buffer.
  """
  for _ in range(_PIPELINE_STEPS.value // 10):
    next(batches)
  rates, cpu_ms = [], []
  for _ in range(_PIPELINE_ROUNDS.value):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(_PIPELINE_STEPS.value):
      next(batches)
    rates.append(_PIPELINE_STEPS.value * tokens_per_batch / (time.perf_counter() - start))
    cpu_ms.append(1000 * (time.process_time() - start_cpu) / _PIPELINE_STEPS.value)
  return rates, cpu_ms


def run_steps(step, state, device_batches):
  """Wall and process CPU ms per step of a loop over the device batches, and the state after it.

  The batches are made lazily, inside the timing, as train() makes them.
  """
  start, start_cpu = time.perf_counter(), time.process_time()
  count = 0
  for batch in device_batches:
    state, metrics = step(state, batch)
    count += 1
  jax.block_until_ready((state, metrics))
  wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
  return (1000 * wall / count, 1000 * cpu / count), state


def measure(config_name: str, workdir: str) -> list[dict]:
  """One table row per pipeline of configs/CONFIG_NAME.py."""
  config = importlib.import_module(f"configs.{config_name}").get_config()
  if config_name == "shakespeare_char" and _SHAKESPEARE.value:
    config.data.sources.shakespeare.paths = _SHAKESPEARE.value
  pipelines = build_pipelines(config, os.path.join(workdir, config_name))
  vocab_sizes = {datasets.tokenizer.vocab_size for datasets in pipelines.values()}
  if len(vocab_sizes) != 1:
    raise ValueError(f"{config_name}: the pipelines' tokenizers have different vocabularies {vocab_sizes}")
  config = validate(config, jax.device_count(), tokenizer_vocab_size=vocab_sizes.pop())
  b, l, v = config.train.global_batch_size, config.data.seq_len, config.model.vocab_size
  steps = _STEPS.value

  alone = {name: pipeline_alone(datasets.train_batches(0, None), b * l) for name, datasets in pipelines.items()}

  setup = build_setup(config)
  mesh = setup.mesh
  state = setup.init_state()
  host_batches = [synthetic_batch(b, l, v, seed=i) for i in range(steps)]
  resident = sharding.global_batch_from_local(host_batches[0], mesh)
  step = setup.train_step().lower(state, resident).compile()

  def from_pipeline(batches):
    return lambda: (sharding.global_batch_from_local(without_counts(next(batches)), mesh) for _ in range(steps))

  arms = {
    "resident": lambda: (resident for _ in range(steps)),
    "synthetic": lambda: (sharding.global_batch_from_local(batch, mesh) for batch in host_batches),
  }
  for name, datasets in pipelines.items():
    arms[name] = from_pipeline(datasets.train_batches(0, None))
  for make_batches in arms.values():  # Warm-up: fill every prefetch buffer, touch every code path.
    for batch in itertools.islice(make_batches(), 3):
      state, _ = step(state, batch)
  times = {arm: [] for arm in arms}
  order = list(arms)
  for r in range(_ROUNDS.value):
    for arm in order[r % len(order) :] + order[: r % len(order)]:
      ms, state = run_steps(step, state, arms[arm]())
      times[arm].append(ms)
  wall = {arm: np.array([ms[0] for ms in arm_times]) for arm, arm_times in times.items()}
  cpu = {arm: np.array([ms[1] for ms in arm_times]) for arm, arm_times in times.items()}

  rows = []
  for name in pipelines:
    ratios = wall[name] / wall["synthetic"]
    rows.append(
      {
        "config": config_name,
        "pipeline": name,
        "batch": f"{b} x {l}",
        "pipeline_tps": np.median(alone[name][0]),
        "pipeline_cpu_ms": np.median(alone[name][1]),
        "train_tps": b * l / (np.median(wall["resident"]) / 1000),
        "real_ms": np.median(wall[name]),
        "synthetic_ms": np.median(wall["synthetic"]),
        "ratio": np.median(ratios),
        "ratio_iqr": np.percentile(ratios, [25, 75]),
        "cpu_ratio": np.median(cpu[name] / cpu["synthetic"]),
        "real_cpu_ms": np.median(cpu[name]),
        "synthetic_cpu_ms": np.median(cpu["synthetic"]),
      }
    )
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    rows = [row for name in _CONFIGS.value for row in measure(name, _WORKDIR.value or tmp)]
  print(
    f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {_ROUNDS.value} rounds of {_STEPS.value} "
    f"steps per arm; {time.perf_counter() - start:.0f}s in all"
  )
  print(
    "| config | pipeline | pipeline tok/s | train tok/s | ratio (target >= 10x) | step ms real | "
    "step ms synthetic | real/synthetic (target <= 1.03) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    print(
      f"| {row['config']} ({row['batch']}) | {row['pipeline']} | {row['pipeline_tps']:,.0f} | "
      f"{row['train_tps']:,.0f} | {row['pipeline_tps'] / row['train_tps']:,.0f}x | {row['real_ms']:.1f} | "
      f"{row['synthetic_ms']:.1f} | {row['ratio']:.3f} |"
    )
  print("\nreal/synthetic is the median over rounds of the paired ratio of wall times.")
  print(
    "| config | pipeline | real/synthetic interquartile | CPU ms per batch, pipeline alone | "
    "CPU ms per step real | CPU ms per step synthetic | CPU real/synthetic |"
  )
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    low, high = row["ratio_iqr"]
    print(
      f"| {row['config']} | {row['pipeline']} | {low:.3f} to {high:.3f} | {row['pipeline_cpu_ms']:.2f} | "
      f"{row['real_cpu_ms']:.1f} | {row['synthetic_cpu_ms']:.1f} | {row['cpu_ratio']:.3f} |"
    )


if __name__ == "__main__":
  app.run(main)
