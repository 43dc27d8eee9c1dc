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
WINDOWS = ('aligned', 'shifted', 'random')


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


def _epoch_shift(seed: tf.Tensor, epoch: tf.Tensor, seq_len: int) -> tf.Tensor:
  """A pseudo-random window shift in [0, seq_len) for each epoch after the first."""
  scrambled = tf.raw_ops.RandomIndexShuffle(
      index=epoch, seed=tf.stack([tf.fill(tf.shape(epoch), seed), tf.ones_like(epoch),
                                  tf.ones_like(epoch)], axis=1),
      max_index=tf.constant(2**31 - 1, tf.int64), rounds=4)
  return tf.where(epoch > 0, scrambled % seq_len, tf.zeros_like(epoch))


def _shifted_windows(tokens: tf.Tensor, segment_ids: tf.Tensor, row: tf.Tensor,
                     shift: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The window that starts `shift` tokens into `row`: row[shift:L] + next_row[:shift+1].

  Rows overlap by one token (row i is stream[i*L : i*L+L+1]), so the window is
  the stream slice stream[row*L + shift : ... + L + 1]. Segment ids and
  positions are recomputed from the document boundaries inside the window.
  """
  num_rows = tf.shape(tokens, out_type=tf.int64)[0]
  length = tf.shape(tokens, out_type=tf.int64)[1] - 1  # L
  shift = tf.where(row < num_rows - 1, shift, tf.zeros_like(shift))  # The last row has no successor.
  j = tf.range(length + 1, dtype=tf.int64)[None, :]
  first_part = length - shift[:, None]
  in_next = j >= first_part
  src_row = row[:, None] + tf.cast(in_next, tf.int64)
  src_col = tf.where(in_next, j - first_part, j + shift[:, None])
  # Column 0 of the next row is column L of this row: read it there, so each
  # token's predecessor is in the same row and same numbering of segments.
  alias_row = tf.where(in_next & (src_col == 0), src_row - 1, src_row)
  alias_col = tf.where(in_next & (src_col == 0), length, src_col)
  coords = tf.stack([alias_row, alias_col], axis=-1)
  window_tokens = tf.gather_nd(tokens, coords)
  raw_segments = tf.gather_nd(segment_ids, coords)
  previous = tf.gather_nd(segment_ids, tf.stack([alias_row, tf.maximum(alias_col - 1, 0)], axis=-1))
  starts = (raw_segments != previous) | (j == 0)
  window_segments = tf.cumsum(tf.cast(starts, tf.int32), axis=1)
  # Position = index - index where the token's segment starts in the window.
  batch = tf.shape(row, out_type=tf.int64)[0]
  flat_segment = tf.reshape(tf.cast(window_segments, tf.int64) + tf.range(batch)[:, None] * (length + 2), [-1])
  flat_index = tf.reshape(tf.broadcast_to(j, tf.shape(window_segments, out_type=tf.int64)), [-1])
  segment_start = tf.math.unsorted_segment_min(flat_index, flat_segment, batch * (length + 2))
  positions = tf.reshape(flat_index - tf.gather(segment_start, flat_segment), tf.shape(window_segments))
  window_segments = tf.where(raw_segments > 0, window_segments, 0)  # Padding stays segment 0.
  return window_tokens, window_segments, tf.cast(positions, tf.int32)


def train_batches(rows: PackedRows, *, global_batch_size: int, seed: int,
                  shuffle: bool = True, windows: str = 'shifted', start_step: int = 0,
                  stop_step: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """Yields this process's slice of the global batches start_step..stop_step-1.

  Endless when stop_step is None; epochs roll over inside a batch. `windows`
  (with shuffle) chooses which stretches of the token stream become examples:
    'aligned': the packed rows, a new permutation each epoch;
    'shifted': epoch 0 as aligned (each training token read exactly once),
      every later epoch a random number of tokens later, so repeated epochs
      show the model new contexts instead of the same rows again;
    'random': every example an independent window at any offset, drawn with
      replacement (nanoGPT's sampling); there are no epochs.
  """
  if windows not in WINDOWS:
    raise ValueError(f'data.windows={windows!r}; allowed: {", ".join(WINDOWS)}')
  check_fills_a_batch(rows, global_batch_size)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  num_rows = tf.constant(rows.num_rows, tf.int64)
  tokens, segment_ids, positions = _rows_as_tensors(rows)
  offset = process_index * local_batch_size
  seed = tf.constant(seed, tf.int64)

  def random_windows(step: tf.Tensor) -> dict[str, tf.Tensor]:
    # The whole global batch is drawn from (seed, step), then sliced, so every
    # process agrees on it. Start (N-1)*L is the last row, which cannot shift.
    starts = tf.random.stateless_uniform(
        [global_batch_size], seed=tf.stack([seed, step]), minval=0,
        maxval=(num_rows - 1) * rows.seq_len + 1, dtype=tf.int64)
    starts = starts[offset:offset + local_batch_size]
    return _features(*_shifted_windows(tokens, segment_ids, starts // rows.seq_len,
                                       starts % rows.seq_len))

  def gather_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
    if shuffle and windows == 'random':
      return random_windows(step)
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
      if windows == 'shifted':
        shift = _epoch_shift(seed, epoch, rows.seq_len)
        return _features(*_shifted_windows(tokens, segment_ids, row, shift))
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
