"""Prepare once, train many times: packed rows in ArrayRecord shards on disk.

A corpus is tokenized and packed once (`write_prepared`); every training run
then reads integers by random access (`PreparedRows.read`). Random access is
what makes the data order a pure function of (seed, step): a run resumed at
step 100,000 reads only that step's rows, and each host reads only the rows of
its own slice of the batch.

Layout of a prepared directory:

  DIR/meta.json                                    written last, atomically
  DIR/{split}-{shard:05d}-of-{num:05d}.array_record

One ArrayRecord record is one packed row (see `_encode_rows`). meta.json is the
mark of a finished preparation: a directory without it was interrupted and is
refused by the reader.
"""

import json
import os
import re
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from array_record.python import array_record_module

from data.files import atomic_write, fsync_file
from data.packing import PackedRows

FORMAT_VERSION = 1  # Bump when the record layout or meta.json changes meaning.
META_FILE = "meta.json"

# group_size:1 puts every record in its own chunk, so reading one row
# decompresses that row only; ArrayRecordDataSource logs an error for any other
# group size. (array_record 0.8.6 defaults to exactly these options; spelled
# out so an older or newer default cannot change the files.) zstd applies per
# record: token ids have zero high bytes and segment ids and the mask are long
# runs, so a row of random 15-bit tokens takes ~31% of its raw size. Measured
# on 2 shared CPU cores, warm page cache, batches of 64 random rows of seq_len
# 1024: zstd:3 ~23k rows/s, uncompressed ~30k, snappy (55% of raw) ~26k; the
# 3x smaller files are worth more on a real corpus than that read speed, which
# is already far above what a training step consumes.
WRITER_OPTIONS = "group_size:1,zstd:3"
# readahead_buffer_size:0 and max_parallelism:0 are what the reader documents
# for random access: no prefetching of neighbouring chunks that a random batch
# would throw away.
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
# Every file write_prepared may have left behind, finished shards or not.
_OWN_FILE = re.compile(r".+-\d{5}(-of-\d{5})?\.array_record(\.partial)?")


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def _row_bytes(seq_len: int) -> int:
  return (seq_len + 1) * (4 + 4 + 1)


def _encode_rows(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
  """(n, row_bytes) uint8: each row's tokens, segment ids and mask, raw.

  Raw little-endian fixed-width arrays, not tf.train.Example or protobuf: every
  record has the same length, so a batch decodes with one np.frombuffer and two
  slices (no per-row parsing in Python), any numpy reads it without a schema,
  and the explicit '<i4' keeps files portable across byte orders. The
  redundancy in it (high bytes of token ids, runs of segment ids and mask) is
  left to the shard's zstd compression.
  """
  n, width = tokens.shape
  return np.concatenate(
    [
      np.ascontiguousarray(tokens, "<i4").view(np.uint8).reshape(n, 4 * width),
      np.ascontiguousarray(segment_ids, "<i4").view(np.uint8).reshape(n, 4 * width),
      loss_mask.astype(np.uint8).reshape(n, width),
    ],
    axis=1,
  )


def _decode_rows(records: list[bytes], seq_len: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  width = seq_len + 1
  row_bytes = _row_bytes(seq_len)
  data = b"".join(records)
  if len(data) != len(records) * row_bytes:
    sizes = sorted({len(r) for r in records} - {row_bytes})
    raise ValueError(
      f"{where}: a record of {sizes[0]} bytes where every row of "
      f"seq_len {seq_len} takes {row_bytes} bytes; the shard is "
      "corrupt or not from this meta.json."
    )
  raw = np.frombuffer(data, np.uint8).reshape(len(records), row_bytes)
  tokens = np.ascontiguousarray(raw[:, : 4 * width]).view("<i4")
  segment_ids = np.ascontiguousarray(raw[:, 4 * width : 8 * width]).view("<i4")
  loss_mask = raw[:, 8 * width :].copy()
  return (tokens.astype(np.int32, copy=False), segment_ids.astype(np.int32, copy=False), loss_mask)


class _SplitWriter:
  """Streams one split's rows into shards of rows_per_shard rows."""

  def __init__(self, directory: str, split: str, rows_per_shard: int):
    self._directory = directory
    self._split = split
    self._rows_per_shard = rows_per_shard
    self._writer = None
    self._rows_in_shard = 0
    self.partial_paths: list[str] = []
    self.shard_rows: list[int] = []
    self.num_rows = 0
    # Non-padding tokens in columns 0..L-1 of every row, plus the last column
    # of the last row seen (see write_prepared on stream rows).
    self.num_tokens_before_last_column = 0
    self.last_column_is_token = False

  def _open_shard(self) -> None:
    path = os.path.join(self._directory, f"{self._split}-{len(self.partial_paths):05d}.array_record.partial")
    self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
    self.partial_paths.append(path)
    self.shard_rows.append(0)
    self._rows_in_shard = 0

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      # So that meta.json, once on disk, never points at shards still in flight.
      fsync_file(self.partial_paths[-1])
      self._writer = None

  def add(self, rows: PackedRows, stream: bool) -> None:
    mask = rows.full_loss_mask()
    encoded = _encode_rows(rows.tokens, rows.segment_ids, mask)
    for row in encoded:
      if self._writer is None or self._rows_in_shard == self._rows_per_shard:
        self._close_shard()
        self._open_shard()
      self._writer.write(row.tobytes())
      self._rows_in_shard += 1
      self.shard_rows[-1] += 1
    self.num_rows += rows.num_rows
    if rows.num_rows:
      is_token = rows.segment_ids > 0
      if stream:
        self.num_tokens_before_last_column += int(is_token[:, :-1].sum())
        self.last_column_is_token = bool(is_token[-1, -1])
      else:
        self.num_tokens_before_last_column += int(is_token.sum())

  def finish(self) -> list[str]:
    """Closes the last shard and gives the shards their final names."""
    self._close_shard()
    names = [shard_name(self._split, i, len(self.partial_paths)) for i in range(len(self.partial_paths))]
    for partial, name in zip(self.partial_paths, names):
      os.replace(partial, os.path.join(self._directory, name))
    return names

  @property
  def num_tokens(self) -> int:
    return self.num_tokens_before_last_column + int(self.last_column_is_token)


def _check_chunk(rows: Any, split: str, chunk: int) -> None:
  where = f"write_prepared: split {split!r} chunk {chunk}"
  if not isinstance(rows, PackedRows):
    raise ValueError(f"{where}: expected a data.packing.PackedRows, got {type(rows).__name__}.")
  if rows.tokens.ndim != 2 or rows.tokens.shape[1] < 2:
    raise ValueError(
      f"{where}: tokens must have shape (num_rows, seq_len + 1) with seq_len >= 1, got {rows.tokens.shape}."
    )
  for name in ("tokens", "segment_ids", "loss_mask"):
    array = getattr(rows, name)
    if array is None:
      continue
    if array.shape != rows.tokens.shape:
      raise ValueError(f"{where}: {name} has shape {array.shape}, tokens {rows.tokens.shape}; they must be equal.")
    if array.dtype.kind not in "iub":
      raise ValueError(f"{where}: {name} has dtype {array.dtype}; integers expected.")
    # Stored as int32 (the mask as uint8): refuse values a cast would wrap.
    low, high = (0, 1) if name == "loss_mask" else (-(2**31), 2**31 - 1)
    if array.size and (array.min() < low or array.max() > high):
      raise ValueError(
        f"{where}: {name} has values in [{array.min()}, {array.max()}], outside [{low}, {high}] that the format stores."
      )


class NothingToWrite(ValueError):
  """Every split was empty: the source had no usable rows."""


def write_prepared(
  directory: str,
  splits: dict[str, Iterable[PackedRows]],
  *,
  metadata: dict,
  rows_per_shard: int = 8192,
  overwrite: bool = False,
) -> dict:
  """Writes each split's chunks of rows as ArrayRecord shards, then meta.json.

  Streaming: each split is an iterable of PackedRows chunks, consumed one chunk
  at a time, so a corpus larger than memory can be written. All chunks of all
  splits must have the same seq_len and `stream` flag.

  num_tokens of a split counts the distinct non-padding tokens: stream rows
  overlap by one token (row i's last token is row i+1's first), so for them the
  last column counts only in the split's last row. For rows packed from one
  stream that is the stream's length.

  Args:
    directory: created if missing. If it holds a finished preparation
      (meta.json) it is refused unless overwrite=True. Before writing, every
      file in it named like a shard (*-NNNNN[-of-NNNNN].array_record[.partial])
      is deleted: the old preparation's, or what an interrupted one left.
    splits: split name ('train', 'validation', ...) -> chunks of rows.
    metadata: JSON-serialisable dict stored as meta['metadata'] (tokenizer
      identity, source, bad-data counts, ...).
    rows_per_shard: rows in each shard file but the last of a split.
    overwrite: replace a finished preparation in `directory`.

  Returns:
    The meta dict written to meta.json.
  """
  if not splits:
    raise ValueError('write_prepared: no splits given; pass e.g. {"train": chunks, "validation": chunks}.')
  for split in splits:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
      raise ValueError(
        f"write_prepared: split name {split!r}: allowed are "
        'letters, digits, "_" and "." (not first), as it is part '
        "of the shard file names."
      )
  if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or (rows_per_shard < 1):
    raise ValueError(f"write_prepared: rows_per_shard must be an integer >= 1, got {rows_per_shard!r}.")
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"write_prepared: metadata must be JSON-serialisable (str, numbers, bools, None, lists, dicts): {e}"
    ) from None

  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path):
    if not overwrite:
      raise ValueError(
        f"{directory}: already holds a prepared dataset "
        f"({META_FILE}); pass overwrite=True (tools/prepare_data.py: --overwrite) to replace it, or "
        "choose another directory."
      )
    # First, so that a replacement interrupted midway cannot look finished.
    os.remove(meta_path)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if _OWN_FILE.fullmatch(name):
      os.remove(os.path.join(directory, name))

  seq_len = stream = None
  split_meta = {}
  for split, chunks in splits.items():
    writer = _SplitWriter(directory, split, rows_per_shard)
    for chunk_index, rows in enumerate(chunks):
      _check_chunk(rows, split, chunk_index)
      if seq_len is None:
        seq_len, stream, first = rows.seq_len, bool(rows.stream), (split, chunk_index)
      where = f"write_prepared: split {split!r} chunk {chunk_index}"
      if rows.seq_len != seq_len:
        raise ValueError(
          f"{where}: seq_len {rows.seq_len} differs from seq_len "
          f"{seq_len} of split {first[0]!r} chunk {first[1]}; "
          "every chunk must have the same seq_len."
        )
      if bool(rows.stream) != stream:
        raise ValueError(
          f"{where}: stream={rows.stream} differs from "
          f"stream={stream} of split {first[0]!r} chunk "
          f"{first[1]}; every chunk must agree."
        )
      writer.add(rows, stream)
    shards = writer.finish()
    split_meta[split] = {
      "num_rows": writer.num_rows,
      "num_tokens": writer.num_tokens,
      "shards": shards,
      "shard_rows": writer.shard_rows,
    }
  if seq_len is None:
    raise NothingToWrite(
      "write_prepared: every split was empty (no PackedRows chunks), so there is no seq_len to record."
    )

  meta = {
    "format_version": FORMAT_VERSION,
    "seq_len": seq_len,
    "stream": stream,
    "record_layout": (f"tokens <i4[{seq_len + 1}], segment_ids <i4[{seq_len + 1}], loss_mask u1[{seq_len + 1}]"),
    "writer_options": WRITER_OPTIONS,
    "splits": split_meta,
    "metadata": metadata,
  }
  with atomic_write(meta_path) as f:  # A reader sees either no meta.json or a complete one.
    json.dump(meta, f, indent=2)  # Key order kept: splits as given.
  return meta


def read_metadata(directory: str) -> dict:
  """meta.json of a finished preparation; ValueError for anything else."""
  if not os.path.isdir(directory):
    raise ValueError(
      f"{directory}: no such directory (a prepared dataset is a directory written by data.prepared.write_prepared)."
    )
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.exists(meta_path):
    raise ValueError(
      f"{directory}: no {META_FILE}: not a prepared dataset, or its preparation did not finish; prepare it again."
    )
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path}: not valid JSON ({e}); prepare the dataset again.") from None
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{meta_path}: format_version {version!r}, this loom reads "
      f"format_version {FORMAT_VERSION}; prepare the dataset "
      "again with this version."
    )
  _check_meta_keys(meta, meta_path)
  return meta


# What write_prepared puts in meta.json and the reader relies on.
_REQUIRED_KEYS = ("seq_len", "stream", "splits", "metadata")
_REQUIRED_SPLIT_KEYS = ("num_rows", "num_tokens", "shards", "shard_rows")


def _check_meta_keys(meta: dict, meta_path: str) -> None:
  """ValueError naming what a meta.json lacks, instead of a KeyError later."""
  again = "not written by data.prepared.write_prepared, or edited; prepare it again."
  missing = [key for key in _REQUIRED_KEYS if key not in meta]
  if missing:
    raise ValueError(
      f"{meta_path}: missing keys {', '.join(missing)} (a prepared dataset has {', '.join(_REQUIRED_KEYS)}); {again}"
    )
  seq_len, splits = meta["seq_len"], meta["splits"]
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"{meta_path}: seq_len {seq_len!r}, expected an integer >= 1; {again}")
  if not isinstance(splits, dict) or not splits:
    raise ValueError(
      f"{meta_path}: splits {splits!r}, expected a non-empty mapping of split name to its shards; {again}"
    )
  for split, info in splits.items():
    where = f"{meta_path}: split {split!r}"
    if not isinstance(info, dict):
      raise ValueError(f"{where} is {info!r}, expected a mapping with {', '.join(_REQUIRED_SPLIT_KEYS)}; {again}")
    missing = [key for key in _REQUIRED_SPLIT_KEYS if key not in info]
    if missing:
      raise ValueError(
        f"{where}: missing keys {', '.join(missing)} (each split has {', '.join(_REQUIRED_SPLIT_KEYS)}); {again}"
      )
    shards, shard_rows = info["shards"], info["shard_rows"]
    if (
      not isinstance(shards, list)
      or not isinstance(shard_rows, list)
      or not all(isinstance(s, str) for s in shards)
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shard_rows)
      or len(shards) != len(shard_rows)
    ):
      raise ValueError(
        f"{where}: shards must be a list of file names and "
        "shard_rows a list of row counts >= 0 of the same "
        f"length, got shards {shards!r:.200} and shard_rows "
        f"{shard_rows!r:.200}; {again}"
      )


def _check_shards(directory: str, split: str, paths: list[str], shard_rows: list[int]) -> None:
  """ValueError now, not at the first read, for missing or truncated shards.

  Opening an ArrayRecordReader reads only the file's footer and chunk index
  (cheap at any shard size), not its records, so every shard's
  record count is checked against meta.json too.
  """
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(
      f"{directory}: split {split!r}: {len(missing)} of "
      f"{len(paths)} shard files listed in {META_FILE} are "
      f"missing: {shown}; the prepared dataset is incomplete, "
      "prepare it again."
    )
  for path, expected in zip(paths, shard_rows):
    try:  # A damaged file opens with ok() False; close() raises its status.
      reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
      found = reader.num_records()
      reader.close()
    except RuntimeError as e:
      raise ValueError(
        f"{path}: not a readable ArrayRecord shard ({e}); the prepared dataset is damaged, prepare it again."
      ) from None
    if found != expected:
      raise ValueError(
        f"{path}: {found} rows, {META_FILE} says {expected}; "
        "the shard is truncated or not from this preparation, "
        "prepare it again."
      )


class PreparedRows:
  """Random access to the rows of one split of a prepared directory.

  Same `read` interface as data.packing.PackedRows. Opening checks that every
  shard of the split exists and holds the rows meta.json says (so a damaged
  directory fails before training, not at its first read or evaluation);
  readers for reading are opened lazily, on the first read of a shard, so an
  instance pickles (to worker processes) without open files.

  Thread safety: `read` may be called from several threads at once.
  ArrayRecordReader is thread-compatible, not thread-safe: its sequential
  read()/seek() move a shared cursor, but the batched read(list_of_indices)
  used here is the C++ const ParallelReadRecordsWithIndices, which opens its
  own positioned reader per call and keeps no cursor, so one reader per shard
  is shared (as ArrayRecordDataSource does). Only opening readers and the
  rows_read counter take the lock.

  Not ArrayRecordDataSource itself: its __getitems__ starts a thread pool per
  call, which costs more than the reads it parallelises (docs/performance_notes.md);
  parallelism comes from tf.data's parallel calls instead.
  """

  def __init__(self, directory: str, split: str):
    self.directory = directory
    self.split = split
    self.metadata = read_metadata(directory)
    splits = self.metadata["splits"]
    if split not in splits:
      raise ValueError(f"{directory}: no split {split!r}; it has {', '.join(repr(s) for s in splits) or 'no splits'}.")
    info = splits[split]
    self.seq_len: int = self.metadata["seq_len"]
    self.stream: bool = self.metadata["stream"]
    self.num_rows: int = info["num_rows"]
    self.num_tokens: int = info["num_tokens"]
    self._shard_paths = [os.path.join(directory, name) for name in info["shards"]]
    self._shard_rows = list(info["shard_rows"])
    # Global row index of each shard's first row.
    self._shard_starts = np.concatenate([[0], np.cumsum(self._shard_rows, dtype=np.int64)])
    if self._shard_starts[-1] != self.num_rows:
      raise ValueError(
        f"{directory}/{META_FILE}: split {split!r} has num_rows "
        f"{self.num_rows} but its shard_rows add up to "
        f"{self._shard_starts[-1]}; prepare it again."
      )
    _check_shards(directory, split, self._shard_paths, self._shard_rows)
    self.rows_read = 0
    self._lock = threading.Lock()
    self._readers: list[Any] = [None] * len(self._shard_paths)

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"], state["_readers"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._readers = [None] * len(self._shard_paths)

  def __len__(self) -> int:
    return self.num_rows

  def __repr__(self) -> str:
    return f"PreparedRows({self.directory!r}, {self.split!r}: {self.num_rows} rows of seq_len {self.seq_len})"

  def _reader(self, shard: int):
    reader = self._readers[shard]
    if reader is not None:
      return reader
    with self._lock:
      if self._readers[shard] is None:
        path = self._shard_paths[shard]
        if not os.path.exists(path):
          raise ValueError(f"{path}: shard listed in {META_FILE} is missing; the prepared dataset is incomplete.")
        reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
        if reader.num_records() != self._shard_rows[shard]:
          raise ValueError(
            f"{path}: {reader.num_records()} rows, {META_FILE} "
            f"says {self._shard_rows[shard]}; the prepared "
            "dataset is inconsistent, prepare it again."
          )
        self._readers[shard] = reader
      return self._readers[shard]

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, segment_ids int32, loss_mask uint8), each (n, seq_len + 1).

    Rows come in the order of `indices`, which may repeat and be unsorted.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
      raise ValueError(
        f"PreparedRows.read: indices must be a 1-D integer array, got dtype {indices.dtype} shape {indices.shape}."
      )
    indices = indices.astype(np.int64)
    bad = (indices < 0) | (indices >= self.num_rows)
    if bad.any():
      raise IndexError(
        f"{self.directory} split {self.split!r}: row index {int(indices[bad][0])} out of range [0, {self.num_rows})."
      )
    shards = np.searchsorted(self._shard_starts, indices, side="right") - 1
    records: list[bytes] = [b""] * len(indices)
    for shard in np.unique(shards):
      where = np.flatnonzero(shards == shard)
      positions = (indices[where] - self._shard_starts[shard]).tolist()
      for i, record in zip(where.tolist(), self._reader(shard).read(positions)):
        records[i] = record
    with self._lock:
      self.rows_read += len(indices)
    return _decode_rows(records, self.seq_len, f"{self.directory} split {self.split!r}")

  def close(self) -> None:
    with self._lock:
      for reader in self._readers:
        if reader is not None:
          reader.close()
      self._readers = [None] * len(self._shard_paths)
