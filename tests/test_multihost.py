"""The input pipeline across two real JAX processes (jax.distributed on localhost).

Two processes (tests/multihost_worker.py, 4 CPU devices each, gloo
collectives) read disjoint shares of a prepared corpus that together cover it,
and assemble, via sharding.placement.global_batch_from_local and
process_allgather, the same global batches one process computes alone.
"""

import collections
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import base
from data import build_datasets
from data.datasets import prepare_datasets
from data.prepared import PreparedRows
from training.validation import validate_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "multihost_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
GLOBAL_BATCH = 8
SEQ_LEN = 16
# 4 files of 303 words (seed 0) give exactly 256 train rows: 32 steps of 8 are one epoch.
MAIN_TRAIN_ROWS = 256
MAIN_VALIDATION_ROWS = 29
EPOCH_STEPS = MAIN_TRAIN_ROWS // GLOBAL_BATCH
EVAL_BATCHES = 4  # ceil(29 / 8): the last one half padding.
MIXTURE_STEPS = 8
WORKER_TIMEOUT_S = 120
SLICED_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _write_text(path, num_words: int, rng: np.random.Generator) -> None:
  vocabulary = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "café", "x=1", "\n"]
  path.write_text(" ".join(rng.choice(vocabulary, size=num_words)), encoding="utf-8")


def _data_config(sources: dict):
  config = base.get_config()
  config.data.sources = sources
  config.data.update(seq_len=SEQ_LEN, tokenizer="byte", windows="aligned")
  return validate_data(config).data


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(spec: dict, tmp_path) -> list[dict[str, np.ndarray]]:
  """Starts the worker processes, waits for all, returns each one's saved arrays."""
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(spec))
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    TF_CPP_MIN_LOG_LEVEL="3",
    TF_ENABLE_ONEDNN_OPTS="0",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO_ROOT,
  )
  outputs, logs, workers = [], [], []
  for process_id in range(NUM_PROCESSES):
    outputs.append(tmp_path / f"process{process_id}.npz")
    logs.append(open(tmp_path / f"process{process_id}.log", "w+"))
    workers.append(
      subprocess.Popen(
        [sys.executable, WORKER, str(spec_path), str(process_id), str(outputs[-1])],
        env=env,
        cwd=REPO_ROOT,
        stdout=logs[-1],
        stderr=subprocess.STDOUT,
      )
    )
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  failure = None
  try:
    # Poll both: when one dies, the other would wait for it until its own timeouts.
    while True:
      codes = [worker.poll() for worker in workers]
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        failure = f"process {failed[0]} exited with code {codes[failed[0]]}"
        break
      if all(code == 0 for code in codes):
        break
      if time.monotonic() > deadline:
        failure = f"a worker was still running after {WORKER_TIMEOUT_S}s"
        break
      time.sleep(0.2)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  if failure:
    reports = []
    for process_id, log in enumerate(logs):
      log.seek(0)
      reports.append(f"--- process {process_id} output (last 4000 chars) ---\n{log.read()[-4000:]}")
    for log in logs:
      log.close()
    pytest.fail(failure + "\n" + "\n".join(reports))
  for log in logs:
    log.close()
  results = []
  for path in outputs:
    with np.load(path) as saved:
      results.append(dict(saved))
  return results


class _LoggedReads:
  """Every row index PreparedRows.read is asked for in this process, per (directory, split)."""

  def __init__(self, monkeypatch):
    self.indices = collections.defaultdict(list)
    original = PreparedRows.read

    def logged_read(rows, indices):
      self.indices[(os.path.normpath(rows.directory), rows.split)].append(np.array(indices, np.int64).reshape(-1))
      return original(rows, indices)

    monkeypatch.setattr(PreparedRows, "read", logged_read)

  def take(self, directory: str, split: str) -> np.ndarray:
    parts = self.indices.pop((os.path.normpath(directory), split), [])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _one_process(case: dict, reads: _LoggedReads):
  """What a single process (process_count=1) computes for `case`: batches and rows read."""
  data_config = _data_config(case["sources"])
  datasets = build_datasets(data_config, global_batch_size=GLOBAL_BATCH, seed=case["seed"], workdir=case["workdir"])
  train = collections.defaultdict(list)
  for batch in datasets.train_batches(0, case["steps"]):
    for key, value in batch.items():
      train[key].append(value)
  result = {"names": datasets.names, "train": {key: np.stack(values) for key, values in train.items()}}
  result["reads"] = {name: reads.take(source["paths"], "train") for name, source in case["sources"].items()}
  if case.get("eval_batches"):
    evaluation = collections.defaultdict(list)
    for batch in datasets.eval_batches("main", case["eval_batches"]):
      for key, value in batch.items():
        evaluation[key].append(value)
    result["eval"] = {key: np.stack(values) for key, values in evaluation.items()}
    result["eval_reads"] = reads.take(case["sources"]["main"]["paths"], "validation")
  return result


def _assert_disjoint_cover(
  per_process: list[np.ndarray], expected_rows: np.ndarray, reads_each: int, what: str
) -> None:
  for process_id, rows in enumerate(per_process):
    assert len(rows) == reads_each, (what, process_id, len(rows))
    assert len(np.unique(rows)) == len(rows), f"{what}: process {process_id} read a row twice"
  first, second = (set(rows.tolist()) for rows in per_process)
  assert not first & second, f"{what}: both processes read rows {sorted(first & second)[:10]}"
  assert first | second == set(expected_rows.tolist()), what


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two sources prepared on disk (kind='prepared'), so row reads can be counted."""
  tmp_path = tmp_path_factory.mktemp("multihost")
  rng = np.random.default_rng(0)
  for i in range(4):
    _write_text(tmp_path / f"main{i}.txt", 303, rng)
  _write_text(tmp_path / "extra0.txt", 200, rng)
  text = _data_config(
    {
      "main": base.source(kind="text", paths=str(tmp_path / "main*.txt")),
      "extra": base.source(kind="text", paths=str(tmp_path / "extra*.txt")),
    }
  )
  metas = prepare_datasets(text, str(tmp_path / "prepared"), chunk_tokens=10**9)
  assert metas["main"]["splits"]["train"]["num_rows"] == MAIN_TRAIN_ROWS
  assert metas["main"]["splits"]["validation"]["num_rows"] == MAIN_VALIDATION_ROWS
  extra_rows = metas["extra"]["splits"]["train"]["num_rows"]
  # The mixture's steps stay inside both sources' first epoch, so no row repeats.
  assert extra_rows >= MIXTURE_STEPS * GLOBAL_BATCH // 4, extra_rows
  main = base.source(kind="prepared", paths=str(tmp_path / "prepared" / "main"))
  extra = base.source(kind="prepared", paths=str(tmp_path / "prepared" / "extra"))
  workdir = str(tmp_path / "work")
  cases = {
    # One source, one whole epoch of train rows, and the validation rows.
    "epoch": {
      "sources": {"main": main},
      "seed": 3,
      "steps": EPOCH_STEPS,
      "eval_batches": EVAL_BATCHES,
      "workdir": workdir,
    },
    # Weights 0.75/0.25: every period of 4 examples has 3 of main and 1 of extra.
    "mixture": {
      "sources": {
        "main": base.source(**{**main.to_dict(), "weight": 0.75}),
        "extra": base.source(**{**extra.to_dict(), "weight": 0.25}),
      },
      "seed": 5,
      "steps": MIXTURE_STEPS,
      "workdir": workdir,
    },
  }
  return tmp_path, cases


def test_two_processes_read_disjoint_halves_and_assemble_the_one_process_batches(corpus, monkeypatch):
  tmp_path, cases = corpus
  spec = {
    "coordinator_address": f"127.0.0.1:{_free_port()}",
    "num_processes": NUM_PROCESSES,
    "initialization_timeout": 60,
    "cases": {
      name: {
        "data": _data_config(case["sources"]).to_dict(),
        "global_batch_size": GLOBAL_BATCH,
        "seed": case["seed"],
        "steps": case["steps"],
        "workdir": case["workdir"],
        "eval_batches": case.get("eval_batches", 0),
      }
      for name, case in cases.items()
    },
  }
  processes = _run_workers(spec, tmp_path)
  reads = _LoggedReads(monkeypatch)
  alone = {name: _one_process(case, reads) for name, case in cases.items()}

  for process_id, saved in enumerate(processes):
    assert int(saved["process_index"]) == process_id
    assert int(saved["process_count"]) == NUM_PROCESSES
    assert int(saved["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert int(saved["local_device_count"]) == DEVICES_PER_PROCESS

  # Global batches: the same on both processes, and bitwise the one-process ones.
  for name, case in cases.items():
    parts = ["train"] + (["eval"] if case.get("eval_batches") else [])
    for part in parts:
      expected = alone[name][part]
      for key in SLICED_KEYS:
        first, second = (saved[f"{name}__{part}__{key}"] for saved in processes)
        assert first.shape == expected[key].shape, (name, part, key, first.shape)
        assert first.dtype == expected[key].dtype, (name, part, key, first.dtype)
        np.testing.assert_array_equal(first, second, err_msg=f"{name} {part} {key}")
        np.testing.assert_array_equal(first, expected[key], err_msg=f"{name} {part} {key}")
    # source_counts is global already: every process has the one-process value.
    for saved in processes:
      np.testing.assert_array_equal(saved[f"{name}__train__source_counts"], alone[name]["train"]["source_counts"])

  epoch = alone["epoch"]
  assert epoch["train"]["inputs"].shape == (EPOCH_STEPS, GLOBAL_BATCH, SEQ_LEN)
  # Not a degenerate pass: the epoch's batches hold 256 different rows.
  assert len({row.tobytes() for row in epoch["train"]["inputs"].reshape(-1, SEQ_LEN)}) == MAIN_TRAIN_ROWS

  # Rows read: each process its half, disjoint, together the whole epoch.
  local_batch = GLOBAL_BATCH // NUM_PROCESSES
  _assert_disjoint_cover(
    [saved["epoch__reads__main__train"] for saved in processes],
    np.arange(MAIN_TRAIN_ROWS),
    EPOCH_STEPS * local_batch,
    "epoch train",
  )
  np.testing.assert_array_equal(np.sort(epoch["reads"]["main"]), np.arange(MAIN_TRAIN_ROWS))
  # Validation: 29 rows in 4 batches of 8; the padding slots of the last batch
  # re-read the last row, so process 1 reads row 28 four times there.
  for process_id, saved in enumerate(processes):
    rows = saved["epoch__reads__main__validation"]
    assert len(rows) == EVAL_BATCHES * local_batch, (process_id, rows)
  first, second = (set(saved["epoch__reads__main__validation"].tolist()) for saved in processes)
  assert not first & second
  assert first | second == set(range(MAIN_VALIDATION_ROWS))
  assert first == {b * GLOBAL_BATCH + j for b in range(EVAL_BATCHES) for j in range(local_batch)}

  # Mixture: per process and step 3 main and 1 extra example (a period of 4 is half a batch).
  mixture = alone["mixture"]
  per_batch = {"main": 6, "extra": 2}
  np.testing.assert_array_equal(
    mixture["train"]["source_counts"], np.tile([per_batch[name] for name in mixture["names"]], (MIXTURE_STEPS, 1))
  )
  for source_name, per_step in (("main", 3), ("extra", 1)):
    _assert_disjoint_cover(
      [saved[f"mixture__reads__{source_name}__train"] for saved in processes],
      mixture["reads"][source_name],
      MIXTURE_STEPS * per_step,
      f"mixture {source_name}",
    )
    assert len(mixture["reads"][source_name]) == NUM_PROCESSES * MIXTURE_STEPS * per_step


TRAIN_OVERRIDES = dict(num_steps=12, checkpoint_every=6, log_every=6, eval_every=6, num_samples=0)


def _train_py(workdir, *extra):
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO_ROOT,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
  )
  flags = [f"--config.train.{key}={value}" for key, value in TRAIN_OVERRIDES.items()]
  return subprocess.Popen(
    [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags, *extra],
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_train_py_on_two_processes_trains_as_one_process(tmp_path):
  """`train.py --multihost` end to end: two processes (4 devices each) sharing a workdir train,
  evaluate and checkpoint exactly as one process with 8 devices (this test's own)."""
  from configs import tiny
  from training.run import train

  port = _free_port()
  processes = [
    _train_py(
      tmp_path / "two",
      "--multihost",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]
  for process in processes:
    output = process.communicate(timeout=WORKER_TIMEOUT_S)[0]
    assert process.returncode == 0, output[-4000:]
  config = tiny.get_config()
  config.train.update(**TRAIN_OVERRIDES)
  train(config, str(tmp_path / "one"))
  two, one = (json_lines(tmp_path / name / "metrics.jsonl") for name in ("two", "one"))
  assert [r["step"] for r in two] == [r["step"] for r in one] == [6, 6, 12, 12]
  for a, b in zip(two, one):
    for key in ("loss", "grad_norm", "eval_loss"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["12", "6"]


def json_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]
