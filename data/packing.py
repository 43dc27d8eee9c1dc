"""Documents -> one token stream -> fixed-length training rows.

Rows are `seq_len + 1` tokens wide and start every `seq_len` tokens, so row i
holds the inputs and the targets of positions i*L .. i*L+L-1 and no target is
lost between rows. All of it is vectorised numpy.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

PAD_ID = 0  # Pad token in rows; the padded positions have segment id 0.
# How data/pipeline.py cuts each epoch's training windows from these rows (data.windows). Here, not
# beside that tf.data code, so that validating a config does not import TensorFlow.
WINDOWS = ("aligned", "shifted", "random")


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
  """Index of each token within its segment, counted from the row start (0 on padding)."""
  columns = np.broadcast_to(np.arange(segment_ids.shape[-1]), segment_ids.shape)
  starts = np.ones(segment_ids.shape, bool)
  starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  segment_start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=-1)
  return ((columns - segment_start_column) * (segment_ids > 0)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Rows of `seq_len + 1` tokens with per-row segment ids, in memory.

  segment_ids: documents renumbered 1, 2, ... within each row; 0 is padding.
  loss_mask: 1 where a token may be a loss target (chat data: assistant turns
    only); None means every non-padding token.
  stream: rows are consecutive slices of one token stream that overlap by one
    token (row i is stream[i*L : i*L+L+1]), so a window may start inside a row
    and run into the next. False for rows of whole examples (chat).
  """

  tokens: np.ndarray  # (num_rows, seq_len + 1) int32
  segment_ids: np.ndarray  # (num_rows, seq_len + 1) int32
  loss_mask: np.ndarray | None = None  # (num_rows, seq_len + 1) uint8
  stream: bool = True

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1

  @property
  def positions(self) -> np.ndarray:
    return positions_from_segments(self.segment_ids)

  def full_loss_mask(self) -> np.ndarray:
    if self.loss_mask is None:
      return np.ones(self.tokens.shape, np.uint8)
    return self.loss_mask.astype(np.uint8)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, loss_mask) of the given rows: the row-store interface."""
    indices = np.asarray(indices, np.int64)
    mask = (
      np.ones((len(indices), self.seq_len + 1), np.uint8)
      if self.loss_mask is None
      else self.loss_mask[indices].astype(np.uint8)
    )
    return self.tokens[indices], self.segment_ids[indices], mask


@dataclasses.dataclass(frozen=True)
class TokenStream:
  tokens: np.ndarray  # (n,) int32
  document_ids: np.ndarray  # (n,) int32, which document each token came from


def concatenate_documents(documents: Sequence[np.ndarray], eos_id: int | None) -> TokenStream:
  """Joins documents into one stream, with eos after each when there is one."""
  if eos_id is not None:
    documents = [np.append(d, np.int32(eos_id)) for d in documents]
  lengths = np.array([len(d) for d in documents], np.int64)
  tokens = np.concatenate(documents).astype(np.int32) if len(documents) else np.zeros(0, np.int32)
  document_ids = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
  return TokenStream(tokens, document_ids)


def split_by_position(stream: TokenStream, validation_fraction: float) -> tuple[TokenStream, TokenStream]:
  """First (1 - fraction) of the tokens train, the rest validate (nanoGPT)."""
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"data.validation_fraction: must be in [0, 1), got {validation_fraction}.")
  n_train = int(len(stream.tokens) * (1.0 - validation_fraction))
  return (
    TokenStream(stream.tokens[:n_train], stream.document_ids[:n_train]),
    TokenStream(stream.tokens[n_train:], stream.document_ids[n_train:]),
  )


def pack_rows(stream: TokenStream, seq_len: int) -> PackedRows:
  """Cuts the stream into rows of seq_len + 1 tokens with stride seq_len."""
  n = len(stream.tokens)
  # Enough rows that every target (stream positions 1 .. n-1) is in one row.
  num_rows = max(0, -(-(n - 1) // seq_len))
  index = np.arange(num_rows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
  valid = index < n
  safe_index = np.minimum(index, max(n - 1, 0))
  if n:
    tokens = np.where(valid, stream.tokens[safe_index], PAD_ID)
    docs = np.where(valid, stream.document_ids[safe_index], -1)
  else:
    tokens = np.zeros(index.shape, np.int32)
    docs = np.full(index.shape, -1, np.int32)

  # A segment starts at column 0 and wherever the document changes.
  starts = np.ones(index.shape, bool)
  starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
  starts &= valid
  segment_ids = np.cumsum(starts, axis=1) * valid
  return PackedRows(tokens.astype(np.int32), segment_ids.astype(np.int32))


def pack_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> PackedRows:
  """Packs whole examples (ids, loss mask) into rows of seq_len + 1, never splitting one.

  Greedy and in order: an example goes into the current row if it fits, else
  starts a new row; the rest of a row is padding. Rows do not overlap
  (stream=False): each example's first token is an input only, its last a
  target only, as in unpacked fine-tuning. Examples longer than seq_len + 1
  must be dealt with by the caller (they are bad data: 'too_long').
  """
  width = seq_len + 1
  row_of, column_of = [], []
  row, column = 0, 0
  for ids, _ in examples:
    if len(ids) > width:
      raise ValueError(f"an example of {len(ids)} tokens does not fit a row of {width}.")
    if column + len(ids) > width:
      row, column = row + 1, 0
    row_of.append(row)
    column_of.append(column)
    column += len(ids)
  num_rows = row + 1 if examples else 0
  tokens = np.full((num_rows, width), PAD_ID, np.int32)
  segment_ids = np.zeros((num_rows, width), np.int32)
  loss_mask = np.zeros((num_rows, width), np.uint8)
  segment = 0
  for i, (ids, mask) in enumerate(examples):
    segment = 1 if column_of[i] == 0 else segment + 1
    span = slice(column_of[i], column_of[i] + len(ids))
    tokens[row_of[i], span] = ids
    segment_ids[row_of[i], span] = segment
    loss_mask[row_of[i], span] = mask
  return PackedRows(tokens, segment_ids, loss_mask, stream=False)


def concatenate_rows(chunks: Sequence[PackedRows]) -> PackedRows:
  """One PackedRows from several of the same layout (chunks of one source)."""
  if not chunks:
    raise ValueError("no rows to concatenate.")
  masks = [c.loss_mask for c in chunks]
  loss_mask = None if all(m is None for m in masks) else np.concatenate([c.full_loss_mask() for c in chunks])
  return PackedRows(
    np.concatenate([c.tokens for c in chunks]),
    np.concatenate([c.segment_ids for c in chunks]),
    loss_mask,
    stream=chunks[0].stream,
  )
