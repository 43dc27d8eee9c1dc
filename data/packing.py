"""Documents -> one token stream -> fixed-length training rows.

Rows are `seq_len + 1` tokens wide and start every `seq_len` tokens, so row i
holds the inputs and the targets of positions i*L .. i*L+L-1 and no target is
lost between rows. All of it is vectorised numpy.
"""
import dataclasses
from typing import Sequence

import numpy as np

PAD_ID = 0  # Pad token in rows; the padded positions have segment id 0.


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Rows of `seq_len + 1` tokens, with per-row segment ids and positions.

  segment_ids: documents renumbered 1, 2, ... within each row; 0 is padding.
  positions: index of a token within its segment, restarting at each row.
  """
  tokens: np.ndarray  # (num_rows, seq_len + 1) int32
  segment_ids: np.ndarray  # (num_rows, seq_len + 1) int32
  positions: np.ndarray  # (num_rows, seq_len + 1) int32

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1


@dataclasses.dataclass(frozen=True)
class TokenStream:
  tokens: np.ndarray  # (n,) int32
  document_ids: np.ndarray  # (n,) int32, which document each token came from


def concatenate_documents(documents: Sequence[np.ndarray],
                          eos_id: int | None) -> TokenStream:
  """Joins documents into one stream, with eos after each when there is one."""
  if eos_id is not None:
    documents = [np.append(d, np.int32(eos_id)) for d in documents]
  lengths = np.array([len(d) for d in documents], np.int64)
  tokens = (np.concatenate(documents).astype(np.int32) if len(documents)
            else np.zeros(0, np.int32))
  document_ids = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
  return TokenStream(tokens, document_ids)


def split_by_position(stream: TokenStream, validation_fraction: float
                      ) -> tuple[TokenStream, TokenStream]:
  """First (1 - fraction) of the tokens train, the rest validate (nanoGPT)."""
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError('data.validation_fraction: must be in [0, 1), got '
                     f'{validation_fraction}.')
  n_train = int(len(stream.tokens) * (1.0 - validation_fraction))
  return (TokenStream(stream.tokens[:n_train], stream.document_ids[:n_train]),
          TokenStream(stream.tokens[n_train:], stream.document_ids[n_train:]))


def pack_rows(stream: TokenStream, seq_len: int) -> PackedRows:
  """Cuts the stream into rows of seq_len + 1 tokens with stride seq_len."""
  n = len(stream.tokens)
  # Enough rows that every target (stream positions 1 .. n-1) is in one row.
  num_rows = max(0, -(-(n - 1) // seq_len))
  index = (np.arange(num_rows, dtype=np.int64)[:, None] * seq_len
           + np.arange(seq_len + 1, dtype=np.int64)[None, :])
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
  columns = np.broadcast_to(np.arange(seq_len + 1), index.shape)
  segment_start_column = np.maximum.accumulate(
      np.where(starts, columns, 0), axis=1)
  positions = (columns - segment_start_column) * valid
  return PackedRows(tokens.astype(np.int32), segment_ids.astype(np.int32),
                    positions.astype(np.int32))
