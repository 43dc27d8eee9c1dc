"""Mixtures, prepared (on-disk) row stores and resume in data/pipeline.py."""

import time

import numpy as np
import pytest

from data import packing, pipeline
from data.prepared import PreparedRows, write_prepared


def _source_rows(source: int, num_docs: int, seq_len: int = 8, seed: int = 0) -> packing.PackedRows:
  """Rows whose tokens all lie in [100*source + 3, 100*source + 50): the batch tells the source."""
  rng = np.random.default_rng(seed + source)
  documents = [rng.integers(3, 50, size=rng.integers(1, 20)).astype(np.int32) + 100 * source for _ in range(num_docs)]
  return packing.pack_rows(packing.concatenate_documents(documents, eos_id=2), seq_len)


def _source_of_examples(batch) -> np.ndarray:
  return batch["inputs"].max(axis=1) // 100


def test_make_mixture_is_exact_per_period_and_spread_evenly():
  mixture = pipeline.make_mixture([0.7, 0.3])
  assert mixture.period == 10 and mixture.counts.tolist() == [7, 3]
  # Spread evenly: every prefix of the period holds its share of each source within one example.
  for n in range(1, 11):
    assert abs((mixture.pattern[:n] == 1).sum() - 0.3 * n) < 1
  for source in (0, 1):  # rank numbers each source's examples 0, 1, 2, ... in order.
    assert mixture.rank[mixture.pattern == source].tolist() == list(range(mixture.counts[source]))
  three = pipeline.make_mixture([5, 3, 2])  # Weights are normalised.
  assert three.period == 10 and three.counts.tolist() == [5, 3, 2]
  assert pipeline.make_mixture([1.0]).pattern.tolist() == [0]
  odd = pipeline.make_mixture([1, 1, 1])
  assert odd.counts.tolist() == [1, 1, 1]
  with pytest.raises(ValueError, match="must be >= 0 with a positive sum"):
    pipeline.make_mixture([0, 0])


def test_mixture_proportions_match_the_weights():
  weights = [0.5, 0.3, 0.2]
  stores = [_source_rows(k, num_docs=[200, 30, 60][k]) for k in range(3)]
  batch_size, steps = 16, 50
  counted = np.zeros(3)
  observed = np.zeros(3)
  for batch in pipeline.train_batches(stores, weights=weights, global_batch_size=batch_size, seed=1, stop_step=steps):
    counted += batch["source_counts"]
    observed += np.bincount(_source_of_examples(batch), minlength=3)
  np.testing.assert_array_equal(counted, observed)  # The reported counts are what was read.
  fractions = observed / observed.sum()
  # Exact within every period of 10 examples: 800 examples are 80 periods, so exactly the weights.
  np.testing.assert_allclose(fractions, weights, atol=1e-12)
  # And every single batch of 16 is within one example (rounding) of its share per source.
  for batch in pipeline.train_batches(stores, weights=weights, global_batch_size=batch_size, seed=1, stop_step=5):
    assert np.all(np.abs(batch["source_counts"] - np.array(weights) * batch_size) <= 1.0 + 1e-9)


def test_each_source_runs_its_own_epochs():
  """A small source repeats while a large one is read once: each source's first
  epoch is a permutation of its rows (aligned windows)."""
  stores = [_source_rows(0, num_docs=300), _source_rows(1, num_docs=10)]
  small = stores[1]
  seen = {0: [], 1: []}
  for batch in pipeline.train_batches(
    stores, weights=[0.5, 0.5], global_batch_size=4, seed=3, windows="aligned", stop_step=small.num_rows // 2 * 3
  ):
    for inputs, source in zip(batch["inputs"], _source_of_examples(batch)):
      store = stores[source]
      seen[source].append(int(np.where((store.tokens[:, :-1] == inputs).all(axis=1))[0][0]))
  n = small.num_rows
  assert sorted(seen[1][:n]) == list(range(n))  # First epoch: each row once.
  assert sorted(seen[1][n : 2 * n]) == list(range(n))  # Second epoch: again each once...
  assert seen[1][:n] != seen[1][n : 2 * n]  # ...in a new order.
  assert len(set(seen[0])) == len(seen[0])  # The large source never repeated.


def test_mixture_resume_and_process_slices():
  stores = [_source_rows(k, num_docs=40) for k in range(2)]
  kwargs = dict(weights=[0.75, 0.25], global_batch_size=8, seed=5)
  full = list(pipeline.train_batches(stores, stop_step=30, **kwargs))
  resumed = list(pipeline.train_batches(stores, start_step=21, stop_step=30, **kwargs))
  halves = [
    list(pipeline.train_batches(stores, stop_step=30, process_index=p, process_count=2, **kwargs)) for p in range(2)
  ]
  for whole, again, first, second in zip(full[21:], resumed, halves[0][21:], halves[1][21:]):
    for name in whole:
      np.testing.assert_array_equal(whole[name], again[name])
      if name != "source_counts":
        np.testing.assert_array_equal(whole[name], np.concatenate([first[name], second[name]]))
  for windows in ("aligned", "shifted", "random"):  # An evaluation-only source (weight 0) is never read.
    batch = next(
      pipeline.train_batches(stores, weights=[1.0, 0.0], global_batch_size=8, seed=5, windows=windows, stop_step=1)
    )
    assert batch["source_counts"].tolist() == [8, 0] and batch["inputs"].max() < 100
  for windows in ("shifted", "random"):  # Windows of mixed sources stay inside their source.
    for batch in pipeline.train_batches(stores, windows=windows, stop_step=30, **kwargs):
      real = batch["inputs"][batch["segment_ids"] > 0]
      assert np.all((real >= 2) & (real < 200))
      assert np.all(np.abs(batch["source_counts"] - [6, 2]) == 0)


def _prepared(tmp_path, rows: packing.PackedRows) -> PreparedRows:
  write_prepared(str(tmp_path / "prepared"), {"train": [rows]}, metadata={}, rows_per_shard=64)
  return PreparedRows(str(tmp_path / "prepared"), "train")


@pytest.mark.parametrize("windows", ["aligned", "shifted", "random"])
def test_prepared_store_gives_the_same_batches_as_memory(tmp_path, windows):
  rows = _source_rows(0, num_docs=200)
  prepared = _prepared(tmp_path, rows)
  kwargs = dict(global_batch_size=8, seed=2, windows=windows, stop_step=3 * rows.num_rows // 8)
  for in_memory, on_disk in zip(pipeline.train_batches(rows, **kwargs), pipeline.train_batches(prepared, **kwargs)):
    for name in in_memory:
      np.testing.assert_array_equal(in_memory[name], on_disk[name])
  for a, b in zip(
    pipeline.eval_batches(rows, global_batch_size=8), pipeline.eval_batches(prepared, global_batch_size=8)
  ):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def test_resume_reads_only_the_rows_of_its_step(tmp_path):
  """Resuming at step s reads step s's rows, not the s batches before it."""
  rows = _source_rows(0, num_docs=400)
  prepared = _prepared(tmp_path, rows)
  step = 5000  # Many epochs in.
  kwargs = dict(global_batch_size=4, seed=0, windows="aligned")
  start = time.perf_counter()
  through = list(pipeline.train_batches(prepared, stop_step=step + 1, **kwargs))[-1]
  read_through_seconds = time.perf_counter() - start
  read_through = prepared.rows_read
  assert read_through == (step + 1) * 4

  resumed_store = PreparedRows(str(tmp_path / "prepared"), "train")
  start = time.perf_counter()
  resumed = next(pipeline.train_batches(resumed_store, start_step=step, stop_step=step + 1, **kwargs))
  resume_seconds = time.perf_counter() - start
  for name in resumed:
    np.testing.assert_array_equal(resumed[name], through[name])
  assert resumed_store.rows_read <= 4 * 2  # This step's rows (tf.data may prefetch nothing more).
  print(
    f"resume at step {step}: {resume_seconds * 1e3:.1f} ms, {resumed_store.rows_read} rows read; "
    f"reading through: {read_through_seconds * 1e3:.0f} ms, {read_through} rows read"
  )
