"""Text augmentation of training batches: token masking and replacement, span deletion, sentence shuffling.

All of it runs inside data/pipeline.py's tf.data graph, on the packed rows of the training
batches only (evaluation batches are never augmented), and every random choice is a hash of
(seed, step, the example's slot in the global batch, what is drawn, a column or sentence
number). So the batch at step s stays a function of (seed, s, data config): a resumed run gets
the same augmented batches, and each process draws its slice of the same global batch whatever
the process count or however many steps one tf.data call builds.

Why on token ids and not on text: text is tokenized and packed once (cached in the workdir or
prepared on disk), and a batch reads only its own rows. Redoing that per step would break both,
so sentences are found in the ids, at tokens whose text ends a sentence.

What each one does (each off at probability 0, the default):
  token_mask: each input token, with this probability, becomes `mask_id`.
  token_replace: each input token, with this probability, becomes a token drawn uniformly from the
    tokenizer's vocabulary. A token is masked or replaced, never both (one draw decides).
  Both act on the model's inputs only: the targets stay the clean next tokens, the weights are
  unchanged, so the model learns to predict the true text from a corrupted context.
  span_delete: each row, with this probability, loses one span of 1..span_delete_max tokens (a
    uniform length, at a uniform start); the rest of the row moves left and its end is padding
    (weight 0). Inputs and targets both come from the shortened row, so the model reads and
    predicts the text with the span gone (the target after the cut is the token after the span).
  sentence_shuffle: each row, with this probability, has the sentences of each of its documents
    put in a random order. A sentence is a run of tokens ending in a sentence-ending token (one
    whose text, trailing spaces and tabs removed, ends in a character of sentence_ends). A
    document's last piece without such an ending (its end-of-document token, or a sentence the
    row cuts off) stays last; a sentence the row's start cuts into counts as a whole one. Rows
    hold pieces of documents (packing), so sentences are shuffled within the row's piece of each
    document, never across documents.
Row-level ones (span deletion, then sentence shuffling) run before the inputs and targets are cut
from a row; the token-level ones after, on the inputs.
"""

from __future__ import annotations  # tf.Tensor annotations must not import TensorFlow.

import dataclasses
from collections.abc import Callable

import numpy as np

from data import special_tokens
from data.tf_cpu import tf

# What a draw is for: each has its own stream of random numbers.
_TOKEN, _RANDOM_TOKEN, _SPAN, _SPAN_LENGTH, _SPAN_START, _SHUFFLE, _SENTENCE_KEY = range(7)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """config.data.augment resolved against the tokenizer (the ids it needs)."""

  token_mask: float = 0.0
  mask_id: int = 0
  token_replace: float = 0.0
  vocab_size: int = 1
  span_delete: float = 0.0
  span_delete_max: int = 1
  sentence_shuffle: float = 0.0
  sentence_end_ids: tuple[int, ...] = ()

  @property
  def active(self) -> bool:
    return any(p > 0 for p in (self.token_mask, self.token_replace, self.span_delete, self.sentence_shuffle))


def from_config(augment_config, tokenizer) -> Augmentation | None:
  """config.data.augment -> an Augmentation, or None when every probability is 0 (or there is no
  such section, as in an older run's config): then batches are made exactly as without this module."""
  if augment_config is None:
    return None
  a = augment_config
  augmentation = Augmentation(
    token_mask=float(a.token_mask),
    token_replace=float(a.token_replace),
    span_delete=float(a.span_delete),
    span_delete_max=int(a.span_delete_max),
    sentence_shuffle=float(a.sentence_shuffle),
  )
  if not augmentation.active:
    return None
  mask_id = int(a.mask_id)
  if a.token_mask > 0:
    if mask_id == -1:
      unk = tokenizer.special_id(special_tokens.UNK)
      if unk is None:
        raise ValueError(
          f"data.augment.mask_id=-1 asks for the tokenizer's {special_tokens.UNK} token, but this "
          f"tokenizer ({tokenizer.identity()[:40]}) has none; allowed: a token id in [0, {tokenizer.vocab_size})"
        )
      mask_id = unk
    if not 0 <= mask_id < tokenizer.vocab_size:
      raise ValueError(
        f"data.augment.mask_id={a.mask_id}: not a token of the tokenizer's vocabulary; "
        f"allowed: -1 (its {special_tokens.UNK}) or an id in [0, {tokenizer.vocab_size})"
      )
  end_ids = ()
  if a.sentence_shuffle > 0:
    end_ids = sentence_end_ids(tokenizer, a.sentence_ends)
    if not end_ids:
      raise ValueError(
        f"data.augment.sentence_ends={a.sentence_ends!r}: no token of the tokenizer's vocabulary ends "
        "in one of these characters, so there are no sentences to shuffle; allowed: characters that end sentences"
      )
  return dataclasses.replace(
    augmentation, mask_id=max(mask_id, 0), vocab_size=tokenizer.vocab_size, sentence_end_ids=end_ids
  )


def sentence_end_ids(tokenizer, ends: str) -> tuple[int, ...]:
  """Ids of the tokens whose text, trailing spaces and tabs removed, ends in a character of `ends`."""
  ids = []
  for token_id in range(tokenizer.vocab_size):
    text = tokenizer.decode([token_id]).rstrip(" \t")
    if text and text[-1] in ends:
      ids.append(token_id)
  return tuple(ids)


def _mix(z: tf.Tensor) -> tf.Tensor:
  """splitmix64's finalizer: a bijection of uint64 whose outputs look independent for any inputs."""
  z = z + tf.constant(0x9E3779B97F4A7C15, tf.uint64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64)))
  z = z * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64)))
  z = z * tf.constant(0x94D049BB133111EB, tf.uint64)
  return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def _uniform(seed: tf.Tensor, steps: tf.Tensor, slots: tf.Tensor, kind: int, index: tf.Tensor) -> tf.Tensor:
  """float64 in [0, 1) for each entry of `index` [n, w], a hash of (seed, step, slot, kind, index).

  A hash and not a stateful or per-step generator: each number depends on nothing else, so the
  same example gets the same numbers in any batch, process or tf.data call that builds it.
  """
  u64 = lambda x: tf.cast(x, tf.uint64)  # noqa: E731
  h = _mix(_mix(tf.constant(kind, tf.uint64)) + u64(seed))
  h = _mix(_mix(h + u64(steps)) + u64(slots))  # [n]
  h = _mix(h[:, None] + u64(index))  # [n, w]
  return tf.cast(tf.bitwise.right_shift(h, tf.constant(11, tf.uint64)), tf.float64) * 2.0**-53


def _columns(like: tf.Tensor) -> tf.Tensor:
  return tf.broadcast_to(tf.range(tf.shape(like, out_type=tf.int64)[1])[None, :], tf.shape(like, out_type=tf.int64))


def mask_and_replace(
  augmentation: Augmentation,
  inputs: tf.Tensor,
  segment_ids: tf.Tensor,
  seed: tf.Tensor,
  steps: tf.Tensor,
  slots: tf.Tensor,
) -> tf.Tensor:
  """inputs [n, L] with tokens masked or replaced (padding never is); targets are left to the caller."""
  a = augmentation
  u = _uniform(seed, steps, slots, _TOKEN, _columns(inputs))
  real = segment_ids > 0
  if a.token_replace > 0:
    draw = _uniform(seed, steps, slots, _RANDOM_TOKEN, _columns(inputs))
    random_tokens = tf.cast(tf.floor(draw * a.vocab_size), inputs.dtype)
    replaced = real & (u >= a.token_mask) & (u < a.token_mask + a.token_replace)
    inputs = tf.where(replaced, random_tokens, inputs)
  if a.token_mask > 0:
    inputs = tf.where(real & (u < a.token_mask), tf.constant(a.mask_id, inputs.dtype), inputs)
  return inputs


def delete_spans(
  augmentation: Augmentation, rows: tuple[tf.Tensor, ...], seed: tf.Tensor, steps: tf.Tensor, slots: tf.Tensor
) -> tuple[tf.Tensor, ...]:
  """(tokens, segment_ids, loss_mask) [n, W], each row with probability span_delete losing one span."""
  a = augmentation
  tokens = rows[0]
  width = tf.shape(tokens, out_type=tf.int64)[1]
  first = tf.zeros_like(steps)[:, None]
  hit = _uniform(seed, steps, slots, _SPAN, first)[:, 0] < a.span_delete
  length = 1 + tf.cast(tf.floor(_uniform(seed, steps, slots, _SPAN_LENGTH, first)[:, 0] * a.span_delete_max), tf.int64)
  length = tf.where(hit, tf.minimum(length, width - 1), 0)
  start = tf.cast(
    tf.floor(_uniform(seed, steps, slots, _SPAN_START, first)[:, 0] * tf.cast(width - length + 1, tf.float64)), tf.int64
  )
  columns = _columns(tokens)
  source = tf.where(columns < start[:, None], columns, columns + length[:, None])
  kept = source < width
  source = tf.minimum(source, width - 1)
  # Padding (token, segment and loss mask 0) where the row ran out: weight 0 there.
  return tuple(tf.where(kept, tf.gather(array, source, batch_dims=1), tf.zeros([], array.dtype)) for array in rows)


def shuffle_sentences(
  augmentation: Augmentation, rows: tuple[tf.Tensor, ...], seed: tf.Tensor, steps: tf.Tensor, slots: tf.Tensor
) -> tuple[tf.Tensor, ...]:
  """(tokens, segment_ids, loss_mask) [n, W], each row with probability sentence_shuffle having the
  sentences of each document (segment) reordered; segments keep their columns."""
  a = augmentation
  tokens, segment_ids = rows[0], rows[1]
  n = tf.shape(tokens, out_type=tf.int64)[0]
  width = tf.shape(tokens, out_type=tf.int64)[1]
  columns = _columns(tokens)
  # A lookup table, not a comparison with each end id: a large vocabulary has hundreds of them.
  # Its last entry is never an end, so an id beyond it (none is, from the tokenizer) is not one.
  ends_table = np.zeros(max(a.vocab_size, max(a.sentence_end_ids, default=0) + 2), bool)
  ends_table[list(a.sentence_end_ids)] = True
  is_end = tf.gather(tf.constant(ends_table), tf.clip_by_value(tokens, 0, len(ends_table) - 1))
  is_end &= segment_ids > 0
  previous_segment = tf.concat([tf.fill([n, 1], tf.constant(-1, segment_ids.dtype)), segment_ids[:, :-1]], axis=1)
  new_run = tf.not_equal(segment_ids, previous_segment)
  after_end = tf.concat([tf.zeros([n, 1], tf.bool), is_end[:, :-1]], axis=1)
  run = tf.cumsum(tf.cast(new_run, tf.int64), axis=1) - 1  # [n, W] which segment run, from 0
  piece = tf.cumsum(tf.cast(new_run | after_end, tf.int64), axis=1) - 1  # which sentence, from 0
  # A piece ending in a sentence end moves; the last piece of a run (no ending) stays last.
  flat_piece = tf.reshape(piece + tf.range(n)[:, None] * width, [-1])
  ends_piece = tf.math.unsorted_segment_max(tf.reshape(tf.cast(is_end, tf.int64), [-1]), flat_piece, n * width)
  moves = tf.reshape(tf.gather(ends_piece, flat_piece), [n, width]) > 0
  # Sort key (run, random rank, piece): the stable sort keeps each piece's tokens in order.
  ranks = tf.minimum(tf.constant(2**31, tf.int64), tf.constant(2**62, tf.int64) // (width * width))
  rank = tf.cast(
    tf.floor(_uniform(seed, steps, slots, _SENTENCE_KEY, piece) * tf.cast(ranks - 1, tf.float64)), tf.int64
  )
  rank = tf.where(moves, rank, ranks - 1)
  key = (run * ranks + rank) * width + piece
  hit = _uniform(seed, steps, slots, _SHUFFLE, tf.zeros_like(steps)[:, None])[:, 0] < a.sentence_shuffle
  order = tf.argsort(tf.where(hit[:, None], key, columns), axis=1, stable=True)
  return tuple(tf.gather(array, order, batch_dims=1) for array in rows)


def augmented_features(
  augmentation: Augmentation,
  rows: tuple[tf.Tensor, ...],
  features: Callable[..., dict[str, tf.Tensor]],
  seed: tf.Tensor,
  steps: tf.Tensor,
  slots: tf.Tensor,
) -> dict[str, tf.Tensor]:
  """features(*rows) of the augmented rows [n, W], with augmented inputs.

  steps [n] and slots [n] are each row's step and place in its global batch: with the seed, all the
  randomness there is.
  """
  a = augmentation
  steps, slots = tf.cast(steps, tf.int64), tf.cast(slots, tf.int64)
  if a.span_delete > 0:
    rows = delete_spans(a, rows, seed, steps, slots)
  if a.sentence_shuffle > 0:
    rows = shuffle_sentences(a, rows, seed, steps, slots)
  batch = features(*rows)
  if a.token_mask > 0 or a.token_replace > 0:
    batch["inputs"] = mask_and_replace(a, batch["inputs"], batch["segment_ids"], seed, steps, slots)
  return batch
