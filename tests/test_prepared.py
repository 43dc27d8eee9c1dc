"""Tests for data/prepared.py: packed rows written once as ArrayRecord shards."""

import json
import os
import pickle
import re
import threading
import time

import numpy as np
import pytest

from configs import base
from data import packing, prepared
from data.datasets import build_datasets

SEQ_LEN = 16
ROWS_PER_SHARD = 7  # Small, so that rows and chunks span several shards.


def random_documents(rng, count: int, max_len: int = 40) -> list[np.ndarray]:
  return [rng.integers(3, 1000, size=rng.integers(1, max_len), dtype=np.int32) for _ in range(count)]


def slice_rows(rows: packing.PackedRows, bounds) -> list[packing.PackedRows]:
  """Rows [a, b) for each (a, b): one stream's rows written chunk by chunk."""
  return [
    packing.PackedRows(
      rows.tokens[a:b], rows.segment_ids[a:b], None if rows.loss_mask is None else rows.loss_mask[a:b], rows.stream
    )
    for a, b in bounds
  ]


def concatenate(chunks: list[packing.PackedRows]) -> packing.PackedRows:
  return packing.PackedRows(
    np.concatenate([c.tokens for c in chunks]),
    np.concatenate([c.segment_ids for c in chunks]),
    np.concatenate([c.full_loss_mask() for c in chunks]),
    chunks[0].stream,
  )


@pytest.fixture(name="stream_data")
def fixture_stream_data():
  rng = np.random.default_rng(0)
  stream = packing.concatenate_documents(random_documents(rng, 60), eos_id=2)
  train_stream, val_stream = packing.split_by_position(stream, 0.2)
  # 4 validation rows whose last column is a real token (n = 4 * L + 1), so the
  # token a stream row shares with the next row is counted exactly once.
  n_val = 4 * SEQ_LEN + 1
  val_stream = packing.TokenStream(val_stream.tokens[:n_val], val_stream.document_ids[:n_val])
  train = packing.pack_rows(train_stream, SEQ_LEN)
  val = packing.pack_rows(val_stream, SEQ_LEN)
  assert train.num_rows > 3 * ROWS_PER_SHARD and val.num_rows == 4
  assert val.segment_ids[-1, -1] > 0
  # Uneven chunks, one empty, with boundaries off the shard boundaries.
  n = train.num_rows
  train_chunks = slice_rows(train, [(0, 5), (5, 5), (5, 19), (19, n)])
  return dict(train=train, val=val, train_chunks=train_chunks, num_train_tokens=len(train_stream.tokens))


def write_stream_data(directory, data, **kwargs) -> dict:
  return prepared.write_prepared(
    str(directory),
    {"train": iter(data["train_chunks"]), "validation": [data["val"]]},
    metadata={"tokenizer": "byte", "bad_data": {"undecodable": 3}},
    rows_per_shard=ROWS_PER_SHARD,
    **kwargs,
  )


def assert_rows_equal(actual, expected):
  for got, want, name in zip(actual, expected, ("tokens", "segment_ids", "loss_mask")):
    assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_meta_counts_rows_tokens_and_shards(tmp_path, stream_data):
  meta = write_stream_data(tmp_path / "prep", stream_data)
  assert meta == prepared.read_metadata(str(tmp_path / "prep"))
  assert meta["format_version"] == prepared.FORMAT_VERSION
  assert meta["seq_len"] == SEQ_LEN and meta["stream"] is True
  assert meta["metadata"] == {"tokenizer": "byte", "bad_data": {"undecodable": 3}}
  assert list(meta["splits"]) == ["train", "validation"]

  num_train = stream_data["train"].num_rows
  train = meta["splits"]["train"]
  assert train["num_rows"] == num_train
  assert train["num_tokens"] == stream_data["num_train_tokens"]
  num_shards = -(-num_train // ROWS_PER_SHARD)
  assert train["shard_rows"] == ([ROWS_PER_SHARD] * (num_shards - 1) + [num_train - ROWS_PER_SHARD * (num_shards - 1)])
  assert train["shards"] == [f"train-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]

  validation = meta["splits"]["validation"]
  assert validation == {
    "num_rows": 4,
    "num_tokens": 4 * SEQ_LEN + 1,
    "shards": ["validation-00000-of-00001.array_record"],
    "shard_rows": [4],
  }
  assert sorted(os.listdir(tmp_path / "prep")) == sorted(["meta.json"] + train["shards"] + validation["shards"])


def test_reads_equal_in_memory_rows(tmp_path, stream_data):
  write_stream_data(tmp_path, stream_data)
  train = stream_data["train"]
  rows = prepared.PreparedRows(str(tmp_path), "train")
  assert (rows.num_rows, rows.seq_len, rows.stream) == (train.num_rows, SEQ_LEN, True)
  assert rows.num_tokens == stream_data["num_train_tokens"]
  assert rows.metadata["metadata"]["tokenizer"] == "byte"
  assert rows.rows_read == 0

  everything = np.arange(train.num_rows)
  assert_rows_equal(rows.read(everything), train.read(everything))
  assert rows.rows_read == train.num_rows

  rng = np.random.default_rng(1)
  indices = rng.integers(0, train.num_rows, size=50)  # unsorted, with repeats
  indices[:3] = [train.num_rows - 1, 0, train.num_rows - 1]
  assert len(np.unique(indices)) < len(indices)
  tokens, segment_ids, loss_mask = rows.read(indices)
  assert tokens.shape == (50, SEQ_LEN + 1)
  np.testing.assert_array_equal(tokens, train.tokens[indices])
  np.testing.assert_array_equal(segment_ids, train.segment_ids[indices])
  np.testing.assert_array_equal(loss_mask, np.ones((50, SEQ_LEN + 1), np.uint8))
  assert rows.rows_read == train.num_rows + 50

  empty = rows.read(np.zeros(0, np.int64))
  assert [a.shape for a in empty] == [(0, SEQ_LEN + 1)] * 3
  assert rows.rows_read == train.num_rows + 50

  validation = prepared.PreparedRows(str(tmp_path), "validation")
  assert_rows_equal(validation.read(np.arange(4)), stream_data["val"].read(np.arange(4)))


def test_resumed_step_reads_only_its_rows(tmp_path, stream_data):
  write_stream_data(tmp_path, stream_data)
  rows = prepared.PreparedRows(str(tmp_path), "train")
  batch = 4
  # "Step 3" of a run with a fixed permutation: only its 4 rows are read.
  order = np.random.default_rng(7).permutation(rows.num_rows)
  step_rows = order[3 * batch : 4 * batch]
  assert_rows_equal(rows.read(step_rows), stream_data["train"].read(step_rows))
  assert rows.rows_read == batch


def test_chat_rows_with_loss_mask(tmp_path):
  rng = np.random.default_rng(2)
  chunks = []
  for num_rows in (3, 9, 5):
    tokens = rng.integers(0, 50_000, size=(num_rows, SEQ_LEN + 1), dtype=np.int32)
    segment_ids = np.sort(rng.integers(0, 4, size=(num_rows, SEQ_LEN + 1)), axis=1)[:, ::-1].astype(
      np.int32
    )  # padding at the end
    tokens[segment_ids == 0] = packing.PAD_ID
    loss_mask = (rng.random((num_rows, SEQ_LEN + 1)) < 0.5).astype(np.uint8)
    loss_mask[segment_ids == 0] = 0
    chunks.append(packing.PackedRows(tokens, segment_ids, loss_mask, stream=False))
  expected = concatenate(chunks)
  meta = prepared.write_prepared(str(tmp_path), {"train": chunks}, metadata={}, rows_per_shard=ROWS_PER_SHARD)
  assert meta["stream"] is False
  assert meta["splits"]["train"]["num_tokens"] == int((expected.segment_ids > 0).sum())
  assert meta["splits"]["train"]["shard_rows"] == [7, 7, 3]

  rows = prepared.PreparedRows(str(tmp_path), "train")
  assert rows.stream is False
  indices = np.array([16, 0, 5, 5, 11, 3, 16])
  assert_rows_equal(rows.read(indices), expected.read(indices))
  assert_rows_equal(rows.read(np.arange(17)), expected.read(np.arange(17)))


def test_concurrent_reads_from_four_threads(tmp_path, stream_data):
  write_stream_data(tmp_path, stream_data)
  train = stream_data["train"]
  rows = prepared.PreparedRows(str(tmp_path), "train")
  reads_per_thread, batch = 40, 16
  failures = []

  def reader(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(reads_per_thread):
      indices = rng.integers(0, train.num_rows, size=batch)
      got = rows.read(indices)
      want = train.read(indices)
      if not all(np.array_equal(g, w) for g, w in zip(got, want)):
        failures.append((seed, indices))

  threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not failures
  assert rows.rows_read == 4 * reads_per_thread * batch


def test_pickles_without_open_readers(tmp_path, stream_data):
  write_stream_data(tmp_path, stream_data)
  rows = prepared.PreparedRows(str(tmp_path), "train")
  rows.read(np.arange(10))
  copy = pickle.loads(pickle.dumps(rows))
  indices = np.array([9, 1, 30])
  assert_rows_equal(copy.read(indices), stream_data["train"].read(indices))
  assert copy.rows_read == 13


def test_interrupted_write_is_refused_then_redone(tmp_path, stream_data):
  directory = str(tmp_path / "prep")

  def chunks_then_crash():
    yield from stream_data["train_chunks"][:3]
    raise RuntimeError("tokenizer crashed")

  with pytest.raises(RuntimeError, match="tokenizer crashed"):
    prepared.write_prepared(directory, {"train": chunks_then_crash()}, metadata={}, rows_per_shard=ROWS_PER_SHARD)
  left_behind = os.listdir(directory)
  assert left_behind and "meta.json" not in left_behind
  for open_it in (lambda: prepared.read_metadata(directory), lambda: prepared.PreparedRows(directory, "train")):
    with pytest.raises(ValueError, match="preparation did not finish"):
      open_it()

  # Not finished, so no overwrite=True needed; the leftovers are replaced.
  meta = write_stream_data(directory, stream_data)
  assert sorted(os.listdir(directory)) == sorted(
    ["meta.json"] + meta["splits"]["train"]["shards"] + meta["splits"]["validation"]["shards"]
  )


def test_refuses_to_overwrite_unless_asked(tmp_path, stream_data):
  directory = str(tmp_path)
  write_stream_data(directory, stream_data)
  with pytest.raises(ValueError, match="already holds a prepared dataset.*overwrite=True"):
    write_stream_data(directory, stream_data)

  shorter = packing.pack_rows(packing.concatenate_documents(random_documents(np.random.default_rng(3), 5), eos_id=2), 8)
  meta = prepared.write_prepared(directory, {"train": [shorter]}, metadata={"v": 2}, overwrite=True)
  assert meta["seq_len"] == 8 and list(meta["splits"]) == ["train"]
  # The old splits' shards went with the old meta.json.
  assert sorted(os.listdir(directory)) == ["meta.json", "train-00000-of-00001.array_record"]
  assert_rows_equal(
    prepared.PreparedRows(directory, "train").read(np.arange(shorter.num_rows)),
    shorter.read(np.arange(shorter.num_rows)),
  )


def test_chunks_must_agree_on_seq_len_and_stream(tmp_path, stream_data):
  other_len = packing.pack_rows(
    packing.concatenate_documents(random_documents(np.random.default_rng(4), 5), eos_id=2), 8
  )
  with pytest.raises(
    ValueError,
    match=r"split 'train' chunk 1: seq_len 8 "
    r"differs from seq_len 16 of split 'train' chunk 0",
  ):
    prepared.write_prepared(str(tmp_path / "a"), {"train": [stream_data["val"], other_len]}, metadata={})
  assert not os.path.exists(tmp_path / "a" / "meta.json")

  val = stream_data["val"]
  not_stream = packing.PackedRows(val.tokens, val.segment_ids, stream=False)
  with pytest.raises(
    ValueError,
    match=r"split 'validation' chunk 0: "
    r"stream=False differs from stream=True",
  ):
    prepared.write_prepared(str(tmp_path / "b"), {"train": [val], "validation": [not_stream]}, metadata={})


def test_bad_arguments_and_lookups(tmp_path, stream_data):
  with pytest.raises(ValueError, match="no such directory"):
    prepared.read_metadata(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="JSON-serialisable"):
    prepared.write_prepared(str(tmp_path / "x"), {"train": []}, metadata={"tokenizer": object()})
  with pytest.raises(ValueError, match="split name"):
    prepared.write_prepared(str(tmp_path / "x"), {"a/b": []}, metadata={})
  with pytest.raises(ValueError, match="every split was empty"):
    prepared.write_prepared(str(tmp_path / "x"), {"train": []}, metadata={})

  write_stream_data(tmp_path, stream_data)
  with pytest.raises(ValueError, match="no split 'test'; it has 'train', 'validation'"):
    prepared.PreparedRows(str(tmp_path), "test")
  rows = prepared.PreparedRows(str(tmp_path), "validation")
  for bad in (4, -1):
    with pytest.raises(IndexError, match=rf"row index {bad} out of range \[0, 4\)"):
      rows.read(np.array([0, bad]))
  assert rows.rows_read == 0

  meta_path = tmp_path / "meta.json"
  meta = json.loads(meta_path.read_text())
  meta["format_version"] = prepared.FORMAT_VERSION + 1
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="format_version 2, this loom reads format_version 1"):
    prepared.PreparedRows(str(tmp_path), "train")


def build_from_prepared(directory, **data_fields):
  """build_datasets of a run whose one source is the prepared `directory`."""
  data = base.get_config().data
  data.sources = {"main": base.source(kind="prepared", paths=str(directory))}
  data.update(tokenizer="byte", seq_len=SEQ_LEN)  # write_stream_data's tokenizer 'byte'.
  data.update(data_fields)
  return build_datasets(data, global_batch_size=4, seed=0, workdir=str(directory / "workdir"))


@pytest.mark.parametrize("seq_len", [8, 32])
def test_run_seq_len_must_be_the_prepared_one(tmp_path, stream_data, seq_len):
  write_stream_data(tmp_path, stream_data)
  with pytest.raises(ValueError) as error:
    build_from_prepared(tmp_path, seq_len=seq_len)
  assert str(error.value) == (
    f"data.sources.main: {tmp_path} was prepared with data.seq_len=16 but "
    f"this run has data.seq_len={seq_len}; set --config.data.seq_len=16, or "
    "prepare it again with this run's settings (tools/prepare_data.py)."
  )
  datasets = build_from_prepared(tmp_path, seq_len=SEQ_LEN)
  assert datasets.sources[0].train.seq_len == SEQ_LEN


def test_chat_settings_must_be_the_prepared_ones(tmp_path, stream_data):
  def write(directory, kind):
    prepared.write_prepared(
      str(directory),
      {"train": stream_data["train_chunks"], "validation": [stream_data["val"]]},
      metadata={
        "tokenizer": "byte",
        "source": {"kind": kind},
        "seq_len": SEQ_LEN,
        "chat_template": "chatml",
        "chat_loss_on": "all",
      },
      rows_per_shard=ROWS_PER_SHARD,
    )

  write(tmp_path / "chat", "chat")
  with pytest.raises(
    ValueError,
    match=re.escape(
      "was prepared with data.chat_loss_on='all' but this run has "
      "data.chat_loss_on='assistant'; set --config.data.chat_loss_on=all, or "
      "prepare it again"
    ),
  ):
    build_from_prepared(tmp_path / "chat", chat_loss_on="assistant")
  with pytest.raises(
    ValueError,
    match=re.escape(
      "with data.seq_len=16, data.chat_loss_on='all' but this run has "
      "data.seq_len=32, data.chat_loss_on='assistant'; set "
      "--config.data.seq_len=16 --config.data.chat_loss_on=all, or"
    ),
  ):
    build_from_prepared(tmp_path / "chat", seq_len=32, chat_loss_on="assistant")
  build_from_prepared(tmp_path / "chat", chat_loss_on="all")
  # Rows of a text source carry no chat rendering: its chat settings are moot.
  write(tmp_path / "text", "text")
  build_from_prepared(tmp_path / "text", chat_loss_on="assistant")


def test_meta_json_without_required_keys(tmp_path, stream_data):
  meta_path = tmp_path / "meta.json"
  meta_path.write_text(json.dumps({"format_version": prepared.FORMAT_VERSION}))
  for open_it in (lambda: prepared.read_metadata(str(tmp_path)), lambda: prepared.PreparedRows(str(tmp_path), "train")):
    with pytest.raises(ValueError) as error:
      open_it()
    assert str(error.value) == (
      f"{meta_path}: missing keys seq_len, stream, splits, metadata (a "
      "prepared dataset has seq_len, stream, splits, metadata); not written "
      "by data.prepared.write_prepared, or edited; prepare it again."
    )

  meta = write_stream_data(tmp_path / "prep", stream_data)
  del meta["splits"]["validation"]["shard_rows"]
  (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(
    ValueError,
    match=re.escape(
      "meta.json: split 'validation': missing keys shard_rows (each split has "
      "num_rows, num_tokens, shards, shard_rows); not written by "
      "data.prepared.write_prepared, or edited; prepare it again."
    ),
  ):
    prepared.PreparedRows(str(tmp_path / "prep"), "train")
  with pytest.raises(
    ValueError,
    match=re.escape(
      "data.sources.main: " + str(tmp_path / "prep" / "meta.json") + ": split 'validation': missing keys shard_rows"
    ),
  ):
    build_from_prepared(tmp_path / "prep")


@pytest.mark.parametrize("split,shard", [("train", 1), ("validation", 0)])
def test_missing_shard_fails_when_the_split_is_opened(tmp_path, stream_data, split, shard):
  meta = write_stream_data(tmp_path, stream_data)
  names = meta["splits"][split]["shards"]
  missing = tmp_path / names[shard]
  os.remove(missing)
  with pytest.raises(ValueError) as error:
    prepared.PreparedRows(str(tmp_path), split)
  assert str(error.value) == (
    f"{tmp_path}: split {split!r}: 1 of {len(names)} shard files listed in "
    f"meta.json are missing: {missing}; the prepared dataset is incomplete, "
    "prepare it again."
  )
  other = {"train": "validation", "validation": "train"}[split]
  prepared.PreparedRows(str(tmp_path), other)  # Whole: opens.
  # A run stops while building its data: before model init, not at the first
  # read (train) or the first evaluation (validation).
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"data.sources.main: {tmp_path}: split {split!r}: 1 of {len(names)} "
      f"shard files listed in meta.json are missing: {missing}"
    ),
  ):
    build_from_prepared(tmp_path)


def test_damaged_shard_fails_when_the_split_is_opened(tmp_path, stream_data):
  meta = write_stream_data(tmp_path, stream_data)
  path = tmp_path / meta["splits"]["train"]["shards"][0]
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(
    ValueError,
    match=re.escape(f"{path}: not a readable ArrayRecord shard (") + r".+\); the prepared "
    "dataset is damaged, prepare it again.",
  ):
    prepared.PreparedRows(str(tmp_path), "train")

  # A shard from another preparation: meta.json's row count is checked too.
  meta["splits"]["validation"].update(num_rows=5, shard_rows=[5])
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError) as error:
    prepared.PreparedRows(str(tmp_path), "validation")
  assert str(error.value) == (
    f"{tmp_path / 'validation-00000-of-00001.array_record'}: 4 rows, "
    "meta.json says 5; the shard is truncated or not from this preparation, "
    "prepare it again."
  )


def test_random_read_throughput(tmp_path):
  """Prints rows/s and tokens/s of random batches of 64 rows of seq_len 1024."""
  seq_len, batch, num_batches = 1024, 64, 100
  rng = np.random.default_rng(5)
  documents = [rng.integers(3, 32_000, size=rng.integers(50, 3000), dtype=np.int32) for _ in range(1400)]
  rows = packing.pack_rows(packing.concatenate_documents(documents, 2), seq_len)
  start = time.perf_counter()
  prepared.write_prepared(str(tmp_path), {"train": [rows]}, metadata={}, rows_per_shard=512)
  write_seconds = time.perf_counter() - start
  on_disk = sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path))
  raw = rows.num_rows * (seq_len + 1) * 9

  store = prepared.PreparedRows(str(tmp_path), "train")
  batches = rng.integers(0, rows.num_rows, size=(num_batches, batch))
  store.read(batches[0])  # Opens the readers.
  start = time.perf_counter()
  for indices in batches:
    store.read(indices)
  seconds = time.perf_counter() - start
  assert_rows_equal(store.read(batches[-1]), rows.read(batches[-1]))
  rows_per_second = num_batches * batch / seconds
  print(
    f"\nprepared: {rows.num_rows} rows of seq_len {seq_len} in "
    f"{len(store.metadata['splits']['train']['shards'])} shards, "
    f"{on_disk / 2**20:.1f} MiB on disk for {raw / 2**20:.1f} MiB raw, "
    f"written in {write_seconds:.2f}s; random reads of {batch} rows: "
    f"{rows_per_second:,.0f} rows/s, "
    f"{rows_per_second * (seq_len + 1) / 1e6:.1f}M tokens/s (one thread)"
  )
