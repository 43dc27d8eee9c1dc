"""Packed rows -> per-process batches, with tf.data doing the work.

The global batch at step s is a pure function of (seed, s, rows): example
i = s*B + b is row `index_shuffle(i % N, seed=[seed, i // N, 0])`, a fresh
permutation each epoch. Resuming at step s therefore starts instantly, and
every process computes only its own slice of the same global batch.
"""
from typing import Iterator

import numpy as np

from data.packing import PackedRows
from data.tf_cpu import tf

Batch = dict[str, np.ndarray]


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible '
                     f'by the process count {process_count}.')
  return global_batch_size // process_count


def _rows_as_tensors(rows: PackedRows) -> tuple[tf.Tensor, ...]:
  return (tf.constant(rows.tokens), tf.constant(rows.segment_ids),
          tf.constant(rows.positions))


def _features(tokens: tf.Tensor, segment_ids: tf.Tensor,
              positions: tf.Tensor) -> dict[str, tf.Tensor]:
  """(b, L+1) rows -> model inputs, shifted targets and loss weights."""
  # A target counts only if it continues the input's (non-pad) document, so
  # no loss is taken across a document boundary or on padding.
  same_segment = tf.equal(segment_ids[:, :-1], segment_ids[:, 1:])
  weights = tf.cast(same_segment & (segment_ids[:, :-1] > 0), tf.float32)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': segment_ids[:, :-1],
      'positions': positions[:, :-1],
      'weights': weights,
  }


def check_fills_a_batch(rows: PackedRows, global_batch_size: int) -> None:
  """Raises if the training rows cannot fill one global batch."""
  if rows.num_rows < global_batch_size:
    raise ValueError(
        f'The training split has {rows.num_rows} rows of data.seq_len='
        f'{rows.seq_len}, fewer than one global batch ({global_batch_size}). '
        'Use more data (data.paths / data.max_files), a smaller data.seq_len '
        'or data.validation_fraction, or a smaller global batch size.')


def train_batches(rows: PackedRows, *, global_batch_size: int, seed: int,
                  shuffle: bool = True, start_step: int = 0,
                  stop_step: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """Yields this process's slice of the global batches start_step..stop_step-1.

  Endless when stop_step is None; epochs roll over inside a batch.
  """
  check_fills_a_batch(rows, global_batch_size)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  num_rows = tf.constant(rows.num_rows, tf.int64)
  tokens, segment_ids, positions = _rows_as_tensors(rows)
  offset = process_index * local_batch_size
  seed = tf.constant(seed, tf.int64)

  def gather_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
    example = (step * global_batch_size + offset
               + tf.range(local_batch_size, dtype=tf.int64))
    index_in_epoch = example % num_rows
    if shuffle:
      epoch = example // num_rows
      # The raw op takes a [b, 3] seed; the public wrapper only pads a single
      # [2] seed and mis-pads a batch of them, so a per-example epoch needs
      # the raw op.
      row_seed = tf.stack(
          [tf.fill([local_batch_size], seed), epoch,
           tf.zeros([local_batch_size], tf.int64)], axis=1)
      row = tf.raw_ops.RandomIndexShuffle(
          index=index_in_epoch, seed=row_seed, max_index=num_rows - 1,
          rounds=4)
    else:
      row = index_in_epoch
    return _features(tf.gather(tokens, row), tf.gather(segment_ids, row),
                     tf.gather(positions, row))

  stop = np.iinfo(np.int64).max if stop_step is None else stop_step
  dataset = (tf.data.Dataset.range(start_step, stop)
             .map(gather_batch, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
             .prefetch(tf.data.AUTOTUNE))
  return dataset.as_numpy_iterator()


def eval_batches(rows: PackedRows, *, global_batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Yields the validation rows in order, this process's slice of each batch.

  The last batch is padded with all-padding rows, whose weights are 0, so
  every process sees the same number of same-shaped batches.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  num_batches = -(-rows.num_rows // global_batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  num_rows = rows.num_rows
  if num_batches == 0:  # validation_fraction=0 or a tiny corpus.
    return iter(())
  tokens, segment_ids, positions = _rows_as_tensors(rows)
  offset = process_index * local_batch_size

  def gather_batch(batch_index: tf.Tensor) -> dict[str, tf.Tensor]:
    row = (batch_index * global_batch_size + offset
           + tf.range(local_batch_size, dtype=tf.int64))
    real = (row < num_rows)[:, None]
    safe_row = tf.minimum(row, num_rows - 1)

    def masked(array: tf.Tensor) -> tf.Tensor:
      return tf.where(real, tf.gather(array, safe_row),
                      tf.zeros([], array.dtype))

    return _features(masked(tokens), masked(segment_ids), masked(positions))

  dataset = (tf.data.Dataset.range(num_batches)
             .map(gather_batch, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
             .prefetch(tf.data.AUTOTUNE))
  return dataset.as_numpy_iterator()
