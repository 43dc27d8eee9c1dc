"""A source's documents -> tokens -> packed (train, validation) rows.

Used on the fly for small corpora (data/datasets.py, one chunk: the last
validation_fraction of the source's tokens validates) and by
tools/prepare_data.py for big ones (chunk by chunk, so memory stays bounded:
the last validation_fraction of each chunk validates).

Text is one token stream: documents joined with eos, cut into rows of L+1
that overlap by one token, and the train rows of successive chunks continue
one stream, so shifted windows never straddle a seam. Chat examples are
rendered through the chat template and packed whole (data/packing.py).
"""

from collections.abc import Iterator

import numpy as np

from data import chat, packing, sources
from data.bad_data import BadData, BadExample
from data.special_tokens import IM_END, IM_START
from data.tokenizers import Tokenizer

_ENCODE_BATCH = 256  # documents per tokenizer call: batched calls run in C++ over the list.


def kept_documents(name, source, bad_data: BadData, keep: np.ndarray | None = None) -> Iterator[sources.Document]:
  """The source's documents, or with `keep` ([N] bool, one per document read_documents yields: an
  offline selection's, tools/prepare_data.py) those it marks; ValueError when the source no longer
  yields N documents (it changed since the selection was made)."""
  documents = sources.read_documents(name, source, bad_data)
  if keep is None:
    yield from documents
    return
  count = 0
  for document in documents:
    if count < len(keep) and keep[count]:
      yield document
    count += 1
  if count != len(keep):
    raise ValueError(
      f"data.sources.{name}: {count} documents now, {len(keep)} when the documents to keep were chosen; "
      "the source changed meanwhile: prepare it again"
    )


def _document_batches(name, source, bad_data: BadData, keep=None) -> Iterator[list[sources.Document]]:
  batch = []
  for document in kept_documents(name, source, bad_data, keep):
    batch.append(document)
    if len(batch) == _ENCODE_BATCH:
      yield batch
      batch = []
  if batch:
    yield batch


def tokenized_examples(
  name, source, tokenizer: Tokenizer, data_config, bad_data: BadData, keep=None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """(ids, loss mask or None) per usable document (of those `keep` marks), bad ones reported to `bad_data`."""
  is_chat = source.get("kind", "text") == "chat"
  width = data_config.seq_len + 1
  for batch in _document_batches(name, source, bad_data, keep):
    if not is_chat:
      for ids in tokenizer.encode_batch([d.text for d in batch]):
        yield ids, None
      continue
    valid = []
    for document in batch:
      try:
        chat.check_messages(document.messages)
        valid.append(document)
      except BadExample as error:
        bad_data.report_example(error, document.where)
    rendered = chat.render_chat_batch(
      [d.messages for d in valid], tokenizer, loss_on=data_config.chat_loss_on, template=data_config.chat_template
    )
    for document, (ids, mask) in zip(valid, rendered):
      if len(ids) > width:
        bad_data.report(
          "too_long", document.where, f"a chat example of {len(ids)} tokens does not fit data.seq_len + 1 = {width}"
        )
      else:
        yield ids, mask


class StreamPacker:
  """Cuts a token stream that arrives in pieces into rows of L+1 with stride L."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self._tokens = np.zeros(0, np.int32)
    self._documents = np.zeros(0, np.int64)

  def add(self, stream: packing.TokenStream) -> packing.PackedRows:
    """Appends tokens; returns the rows that are complete."""
    self._tokens = np.concatenate([self._tokens, stream.tokens])
    self._documents = np.concatenate([self._documents, stream.document_ids.astype(np.int64)])
    num_rows = max(0, (len(self._tokens) - 1) // self.seq_len)
    end = num_rows * self.seq_len
    rows = packing.pack_rows(packing.TokenStream(self._tokens[: end + 1], self._documents[: end + 1]), self.seq_len)
    # The last token of the last full row is the first of the next row (overlap).
    self._tokens, self._documents = self._tokens[end:], self._documents[end:]
    return rows

  def finish(self) -> packing.PackedRows:
    """The rest, padded (no rows when only the already-counted overlap token is left)."""
    rows = packing.pack_rows(packing.TokenStream(self._tokens, self._documents), self.seq_len)
    self._tokens, self._documents = self._tokens[:0], self._documents[:0]
    return rows


def packed_chunks(
  name, source, tokenizer: Tokenizer, data_config, bad_data: BadData, chunk_tokens: int | None = None, keep=None
) -> Iterator[tuple[packing.PackedRows, packing.PackedRows, int]]:
  """Yields (train rows, validation rows, train tokens) per chunk of ~chunk_tokens tokens.

  chunk_tokens=None: the whole source in one chunk. `keep`: kept_documents'.
  """
  seq_len = data_config.seq_len
  fraction = data_config.validation_fraction
  is_chat = source.get("kind", "text") == "chat"
  packer = StreamPacker(seq_len)
  pending: list[tuple[np.ndarray, np.ndarray | None]] = []
  pending_tokens = 0
  first_document = 0

  def flush() -> tuple[packing.PackedRows, packing.PackedRows, int]:
    nonlocal first_document
    if is_chat:
      num_val = int(round(len(pending) * fraction))
      train, val = pending[: len(pending) - num_val], pending[len(pending) - num_val :]
      return (
        packing.pack_examples(train, seq_len),
        packing.pack_examples(val, seq_len),
        sum(len(ids) for ids, _ in train),
      )
    stream = packing.concatenate_documents([ids for ids, _ in pending], tokenizer.eos_id)
    # Document ids stay unique across chunks, so no two documents ever merge at a seam.
    stream = packing.TokenStream(stream.tokens, stream.document_ids + first_document)
    first_document += len(pending)
    train_stream, val_stream = packing.split_by_position(stream, fraction)
    return packer.add(train_stream), packing.pack_rows(val_stream, seq_len), len(train_stream.tokens)

  for example in tokenized_examples(name, source, tokenizer, data_config, bad_data, keep):
    pending.append(example)
    pending_tokens += len(example[0])
    if chunk_tokens and pending_tokens >= chunk_tokens:
      yield flush()
      pending, pending_tokens = [], 0
  if pending:
    yield flush()
  if not is_chat:
    rest = packer.finish()
    if rest.num_rows:
      yield rest, packing.pack_rows(packing.TokenStream(np.zeros(0, np.int32), np.zeros(0, np.int32)), seq_len), 0


def document_texts(name, source, bad_data: BadData, keep=None) -> Iterator[str]:
  """The text of every document (of those `keep` marks), chat as rendered by the template: for
  training tokenizers."""
  for document in kept_documents(name, source, bad_data, keep):
    if document.text is not None:
      yield document.text
    elif isinstance(document.messages, list):
      yield "".join(
        f"{IM_START}{m.get('role')}\n{m.get('content')}{IM_END}\n" for m in document.messages if isinstance(m, dict)
      )
