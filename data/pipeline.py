"""Row stores -> per-process batches, with tf.data doing the work.

The global batch at step s is a pure function of (seed, s, data config):
example i = s*B + b belongs to source `pattern[i % P]` of the mixture (an exact
interleaving of the sources by weight, period P) and is that source's example
number n = (i // P) * count + rank. Within a source, example n is row
`index_shuffle(n % N, seed=[seed, n // N, source])`: a fresh permutation each
epoch of that source, independently of the other sources. Resuming at step s
therefore reads only step s's rows, and every process computes, and reads,
only its own slice of the same global batch.
"""

from __future__ import annotations  # tf.Tensor annotations must not import TensorFlow.

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from data.augment import Augmentation, augmented_features
from data.packing import WINDOWS
from data.tf_cpu import tf

Batch = dict[str, np.ndarray]
# Steps whose batches one tf.data call builds: the per-call costs (graph dispatch, a
# prepared store's read) are then shared, and the step time barely feels the pipeline.
_STEPS_PER_CALL = 8


class RowStore(Protocol):
  """Random access to packed rows: in memory (PackedRows) or on disk (PreparedRows)."""

  num_rows: int
  seq_len: int
  stream: bool

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, segment_ids int32, loss_mask uint8), each (len(indices), seq_len + 1)."""


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Sources interleaved by weight: example j of every period of P comes from pattern[j].

  Counts are exact within each period, so the proportions of any run of
  examples are within one period's rounding of the weights.
  """

  pattern: np.ndarray  # (P,) int64 source of the j-th example of a period
  rank: np.ndarray  # (P,) int64 how many earlier examples of the period have the same source
  counts: np.ndarray  # (K,) int64 examples of each source per period

  @property
  def period(self) -> int:
    return len(self.pattern)

  def source_of(self, examples: np.ndarray) -> np.ndarray:
    return self.pattern[np.asarray(examples) % self.period]


def make_mixture(weights: Sequence[float], max_period: int = 1000, tolerance: float = 1e-3) -> Mixture:
  """The shortest period whose integer counts match the weights within `tolerance`.

  Examples of a period are spread evenly (smooth weighted round-robin), so
  every global batch holds close to the weighted share of each source.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 1 or not len(weights) or (weights < 0).any() or weights.sum() <= 0:
    raise ValueError(f"mixture weights {weights.tolist()} must be >= 0 with a positive sum.")
  shares = weights / weights.sum()
  counts = None
  for period in range(1, max_period + 1):
    counts = _round_to_sum(shares * period, period)
    if np.all(np.abs(counts / period - shares) <= tolerance) and np.all(counts[shares > 0] > 0):
      break
  credit = np.zeros(len(counts), np.int64)
  pattern = []
  for _ in range(counts.sum()):
    credit += counts
    chosen = int(np.argmax(credit))
    credit[chosen] -= counts.sum()
    pattern.append(chosen)
  pattern = np.asarray(pattern, np.int64)
  rank = np.zeros_like(pattern)
  for source in range(len(counts)):
    where = pattern == source
    rank[where] = np.arange(where.sum())
  return Mixture(pattern=pattern, rank=rank, counts=counts.astype(np.int64))


def _round_to_sum(values: np.ndarray, total: int) -> np.ndarray:
  """Largest-remainder rounding: integers that sum to `total`."""
  floors = np.floor(values).astype(np.int64)
  order = np.argsort(-(values - floors), kind="stable")
  floors[order[: total - floors.sum()]] += 1
  return floors


def check_fills_a_batch(rows: RowStore, global_batch_size: int, name: str = "") -> None:
  """Raises if the training rows cannot fill one global batch."""
  if rows.num_rows < global_batch_size:
    where = f"data.sources.{name}: " if name else ""
    raise ValueError(
      f"{where}the training split has {rows.num_rows} rows of data.seq_len="
      f"{rows.seq_len}, fewer than one global batch ({global_batch_size}). "
      "Use more data (data.sources.*.paths / max_files), a smaller data.seq_len "
      "or data.validation_fraction, or a smaller global batch size."
    )


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count {process_count}.")
  return global_batch_size // process_count


def _reader(rows: RowStore):
  """rows -> (tokens, segment_ids, loss_mask) tensors: a graph gather in memory, else numpy."""
  width = rows.seq_len + 1
  if hasattr(rows, "tokens"):  # In memory: constants in the graph, no Python per batch.
    tables = [tf.constant(array) for array in rows.read(np.arange(rows.num_rows))]

    def read(indices: tf.Tensor) -> tuple[tf.Tensor, ...]:
      return tuple(tf.gather(table, indices) for table in tables)

    return read

  def read_from_store(indices: tf.Tensor) -> tuple[tf.Tensor, ...]:
    arrays = tf.numpy_function(rows.read, [indices], (tf.int32, tf.int32, tf.uint8), stateful=False)
    for array in arrays:
      array.set_shape([None, width])
    return tuple(arrays)

  return read_from_store


def _segment_positions(segment_ids: tf.Tensor) -> tf.Tensor:
  """Index of each token within its segment (segments are contiguous runs in a row)."""
  batch = tf.shape(segment_ids, out_type=tf.int64)[0]
  width = tf.shape(segment_ids, out_type=tf.int64)[1]
  column = tf.broadcast_to(tf.range(width)[None, :], tf.shape(segment_ids, out_type=tf.int64))
  previous = tf.concat([tf.fill([batch, 1], -1), segment_ids[:, :-1]], axis=1)
  run = tf.cumsum(tf.cast(tf.not_equal(segment_ids, previous), tf.int64), axis=1)  # 1, 2, ... per row
  flat_run = tf.reshape(run + tf.range(batch)[:, None] * (width + 1), [-1])
  run_start = tf.math.unsorted_segment_min(tf.reshape(column, [-1]), flat_run, batch * (width + 1))
  positions = tf.reshape(tf.reshape(column, [-1]) - tf.gather(run_start, flat_run), tf.shape(segment_ids))
  return tf.cast(tf.where(segment_ids > 0, positions, 0), tf.int32)


def _features(tokens: tf.Tensor, segment_ids: tf.Tensor, loss_mask: tf.Tensor) -> dict[str, tf.Tensor]:
  """(b, L+1) rows -> model inputs, shifted targets and loss weights."""
  # A target counts only if it continues the input's (non-pad) document, so
  # no loss is taken across a document boundary or on padding; chat data
  # further masks everything but the assistant's tokens.
  same_segment = tf.equal(segment_ids[:, :-1], segment_ids[:, 1:])
  weights = same_segment & (segment_ids[:, :-1] > 0) & (loss_mask[:, 1:] > 0)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segment_ids[:, :-1],
    "positions": _segment_positions(segment_ids[:, :-1]),
    "weights": tf.cast(weights, tf.float32),
  }


def _epoch_shift(seed: tf.Tensor, epoch: tf.Tensor, source: int, seq_len: int) -> tf.Tensor:
  """A pseudo-random window shift in [0, seq_len) for each epoch after the first."""
  ones = tf.ones_like(epoch)
  scrambled = tf.raw_ops.RandomIndexShuffle(
    index=epoch,
    seed=tf.stack([tf.fill(tf.shape(epoch), seed), ones, ones + source], axis=1),
    max_index=tf.constant(2**31 - 1, tf.int64),
    rounds=4,
  )
  return tf.where(epoch > 0, scrambled % seq_len, tf.zeros_like(epoch))


def _window(
  current: tuple[tf.Tensor, ...], following: tuple[tf.Tensor, ...], shift: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The window that starts `shift` tokens into row r: stream[r*L + shift : ... + L + 1].

  Stream rows overlap by one token (row r is stream[r*L : r*L+L+1]), so row r
  followed by row r+1 without its first token is stream[r*L : r*L+2L+1]. Row
  r+1's segments are renumbered to continue row r's (its column 0 is row r's
  column L, the same token), and the window's segments are renumbered from 1.
  """
  tokens, segments, mask = current
  next_tokens, next_segments, next_mask = following
  length = tf.shape(tokens, out_type=tf.int64)[1] - 1
  continued = tf.where(next_segments > 0, next_segments + segments[:, -1:] - next_segments[:, :1], 0)
  joined = [
    tf.concat([a, b[:, 1:]], axis=1) for a, b in ((tokens, next_tokens), (segments, continued), (mask, next_mask))
  ]
  columns = shift[:, None] + tf.range(length + 1)[None, :]
  window_tokens, raw_segments, window_mask = (tf.gather(a, columns, batch_dims=1) for a in joined)
  previous = tf.concat([raw_segments[:, :1], raw_segments[:, :-1]], axis=1)
  starts = tf.not_equal(raw_segments, previous)
  window_segments = 1 + tf.cumsum(tf.cast(starts, tf.int32), axis=1)
  return window_tokens, tf.where(raw_segments > 0, window_segments, 0), window_mask


def _no_rows(rows: RowStore) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  width = rows.seq_len + 1
  return (tf.zeros([0, width], tf.int32), tf.zeros([0, width], tf.int32), tf.zeros([0, width], tf.uint8))


def train_batches(
  rows: RowStore | Sequence[RowStore],
  *,
  global_batch_size: int,
  seed: int,
  weights: Sequence[float] | None = None,
  shuffle: bool = True,
  windows: str = "shifted",
  start_step: int = 0,
  stop_step: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  augment: Augmentation | None = None,
) -> Iterator[Batch]:
  """Yields this process's slice of the global batches start_step..stop_step-1.

  `rows` is one row store or several mixed by `weights`. Endless when
  stop_step is None: each source runs through its epochs independently (a small
  source repeats while a large one is still in its first pass), so no source
  and no process ever runs dry. `windows` (with shuffle) chooses which stretches
  of a stream source become examples:
    'aligned': the packed rows, a new permutation each epoch;
    'shifted': epoch 0 as aligned (each training token read exactly once),
      every later epoch a random number of tokens later, so repeated epochs
      show the model new contexts instead of the same rows again;
    'random': every example an independent window at any offset, drawn with
      replacement (nanoGPT's sampling); there are no epochs.
  Sources of whole examples (chat, stream=False) always read aligned rows.
  Each batch also carries 'source_counts': examples of each source in the
  global batch (for the observed mixture proportions). `augment` (data/augment.py)
  edits the examples, from (seed, step, slot) alone; None makes them exactly as before it.
  """
  if windows not in WINDOWS:
    raise ValueError(f"data.windows={windows!r}; allowed: {', '.join(WINDOWS)}")
  sources = [rows] if hasattr(rows, "num_rows") else list(rows)
  mixture = make_mixture([1.0] * len(sources) if weights is None else weights)
  if len(mixture.counts) != len(sources):
    raise ValueError(f"{len(sources)} row stores but {len(mixture.counts)} weights.")
  for source, count in zip(sources, mixture.counts):
    if count:
      check_fills_a_batch(source, 1)
  if len(sources) == 1:
    check_fills_a_batch(sources[0], global_batch_size)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  offset = process_index * local_batch_size
  seed_t = tf.constant(seed, tf.int64)
  pattern, rank, counts = (tf.constant(a) for a in (mixture.pattern, mixture.rank, mixture.counts))
  readers = [_reader(source) for source in sources]

  def source_examples(
    k: int, source: RowStore, n: tf.Tensor, slot: tf.Tensor, steps: tf.Tensor
  ) -> tuple[tf.Tensor, ...]:
    """Windows for this source's examples number n (at `slot` of the global batch of step `steps`)."""
    read = readers[k]
    num_rows = tf.constant(source.num_rows, tf.int64)
    can_shift = shuffle and source.stream and windows != "aligned"
    if can_shift and windows == "random":
      # Each step's global batch of starts is drawn from (seed, step, source) and
      # the process's slots picked out, so every process agrees on them.
      def draw(step):
        draw_seed = tf.stack([seed_t, step])
        if k:
          draw_seed = tf.random.experimental.stateless_fold_in(draw_seed, k)
        return tf.random.stateless_uniform(
          [global_batch_size], seed=draw_seed, minval=0, maxval=(num_rows - 1) * source.seq_len + 1, dtype=tf.int64
        )

      unique_steps, step_index = tf.unique(steps)
      starts = tf.map_fn(draw, unique_steps)
      starts = tf.gather_nd(starts, tf.stack([tf.cast(step_index, tf.int64), slot], axis=1))
      row, shift = starts // source.seq_len, starts % source.seq_len
    else:
      epoch, row = n // num_rows, n % num_rows
      if shuffle:
        # The raw op takes a [b, 3] seed; the public wrapper mis-pads a batch of seeds.
        row_seed = tf.stack(
          [tf.fill(tf.shape(n), seed_t), epoch, tf.fill(tf.shape(n), tf.constant(k, tf.int64))], axis=1
        )
        row = tf.raw_ops.RandomIndexShuffle(index=row, seed=row_seed, max_index=num_rows - 1, rounds=4)
      if not (can_shift and windows == "shifted"):
        return read(row)
      shift = _epoch_shift(seed_t, epoch, k, source.seq_len)
    shift = tf.where(row < num_rows - 1, shift, tf.zeros_like(shift))  # The last row has no successor.
    # One read of both rows: an on-disk store pays a fixed cost per call.
    both = read(tf.concat([row, tf.minimum(row + 1, num_rows - 1)], axis=0))
    size = tf.shape(row)[0]
    return _window(tuple(a[:size] for a in both), tuple(a[size:] for a in both), shift)

  def gather_steps(steps: tf.Tensor) -> dict[str, tf.Tensor]:
    """The batches of several steps at once: the per-call costs are paid once for all of them."""
    num_steps = tf.shape(steps)[0]
    example = steps[:, None] * global_batch_size + tf.range(global_batch_size, dtype=tf.int64)[None, :]
    position = example % mixture.period
    source_id = tf.gather(pattern, position)  # [steps, global batch]
    n = (example // mixture.period) * tf.gather(counts, source_id) + tf.gather(rank, position)
    local = tf.range(offset, offset + local_batch_size, dtype=tf.int64)
    # This process's examples of every step, flattened: [steps * local batch].
    local_n = tf.reshape(tf.gather(n, local, axis=1), [-1])
    local_source = tf.reshape(tf.gather(source_id, local, axis=1), [-1])
    slot = tf.tile(local, [num_steps])
    step_of = tf.repeat(steps, local_batch_size)
    if len(sources) == 1:
      arrays = source_examples(0, sources[0], local_n, slot, step_of)
    else:
      partition = tf.cast(local_source, tf.int32)
      picked = tf.dynamic_partition(tf.range(tf.size(local_n)), partition, len(sources))
      # A source of weight 0 (evaluation only) never appears: nothing to read for it.
      parts = [
        source_examples(
          k, source, tf.gather(local_n, picked[k]), tf.gather(slot, picked[k]), tf.gather(step_of, picked[k])
        )
        if mixture.counts[k]
        else _no_rows(source)
        for k, source in enumerate(sources)
      ]
      arrays = [tf.dynamic_stitch(picked, [part[i] for part in parts]) for i in range(3)]
    if augment is None:
      features = _features(*arrays)
    else:
      features = augmented_features(augment, tuple(arrays), _features, seed_t, step_of, slot)
    batch = {
      name: tf.reshape(value, tf.concat([[num_steps, local_batch_size], tf.shape(value)[1:]], 0))
      for name, value in features.items()
    }
    batch["source_counts"] = tf.reduce_sum(tf.one_hot(source_id, len(sources), dtype=tf.int32), axis=1)
    return batch

  stop = np.iinfo(np.int64).max if stop_step is None else stop_step
  dataset = (
    tf.data.Dataset.range(start_step, stop)
    .batch(_STEPS_PER_CALL)
    .map(gather_steps, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    .unbatch()
    .prefetch(tf.data.AUTOTUNE)
  )
  return dataset.as_numpy_iterator()


def eval_batches(
  rows: RowStore,
  *,
  global_batch_size: int,
  max_batches: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Yields the validation rows in order, this process's slice of each batch.

  The last batch is padded with all-padding rows, whose weights are 0, so
  every process sees the same number of same-shaped batches.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  num_batches = math.ceil(rows.num_rows / global_batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  if num_batches == 0:  # validation_fraction=0 or a tiny corpus.
    return iter(())
  read = _reader(rows)
  num_rows = rows.num_rows
  offset = process_index * local_batch_size

  def gather_batch(batch_index: tf.Tensor) -> dict[str, tf.Tensor]:
    row = batch_index * global_batch_size + offset + tf.range(local_batch_size, dtype=tf.int64)
    real = (row < num_rows)[:, None]
    arrays = read(tf.minimum(row, num_rows - 1))
    return _features(*(tf.where(real, array, tf.zeros([], array.dtype)) for array in arrays))

  dataset = (
    tf.data.Dataset.range(num_batches)
    .map(gather_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    .prefetch(tf.data.AUTOTUNE)
  )
  return dataset.as_numpy_iterator()
