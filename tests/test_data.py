"""Tests for data/: tokenizers, packing, batching and build_datasets."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import base
from data import build_datasets, packing, pipeline, source_rows
from data.bad_data import BadDataError
from data.tokenizers import ByteTokenizer, CharTokenizer, build_tokenizer
from training.validation import validate_data

# ../shared beside the checkout, as on developer machines and in CI.
SHAKESPEARE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "shared",
  "data",
  "tinyshakespeare",
  "input.txt",
)


def make_config(paths: str = "", sources=None, **overrides) -> ml_collections.ConfigDict:
  """A filled-in data config: one text source at `paths`, or the given named sources."""
  config = base.get_config()
  config.data.sources = sources or {"main": base.source(kind="text", paths=paths)}
  config.data.update(seq_len=16, tokenizer="byte", tokenizer_vocab_size=300)
  config.data.update(overrides)
  return validate_data(config).data


def write_corpus(directory, num_files: int = 6, words: int = 120) -> str:
  rng = np.random.default_rng(0)
  vocabulary = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "café", "x=1", "\n"]
  for i in range(num_files):
    text = " ".join(rng.choice(vocabulary, size=words + 10 * i))
    (directory / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
  return str(directory / "*.txt")


def pack(documents, seq_len, eos_id=None):
  stream = packing.concatenate_documents([np.array(d, np.int32) for d in documents], eos_id)
  return packing.pack_rows(stream, seq_len)


# ---- packing -------------------------------------------------------------


def test_pack_hand_made_example():
  rows = pack([[10, 11, 12], [20, 21], [30, 31, 32, 33]], seq_len=4, eos_id=2)
  # stream: 10 11 12 2 | 20 21 2 | 30 31 32 33 2  (12 tokens, 11 targets)
  np.testing.assert_array_equal(
    rows.tokens,
    [
      [10, 11, 12, 2, 20],
      [20, 21, 2, 30, 31],
      [31, 32, 33, 2, 0],
    ],
  )
  np.testing.assert_array_equal(
    rows.segment_ids,
    [
      [1, 1, 1, 1, 2],
      [1, 1, 1, 2, 2],
      [1, 1, 1, 1, 0],
    ],
  )
  np.testing.assert_array_equal(
    rows.positions,
    [
      [0, 1, 2, 3, 0],
      [0, 1, 2, 0, 1],
      [0, 1, 2, 3, 0],
    ],
  )
  batch = next(pipeline.eval_batches(rows, global_batch_size=4))
  np.testing.assert_array_equal(batch["inputs"][:3], rows.tokens[:, :4])
  np.testing.assert_array_equal(batch["targets"][:3], rows.tokens[:, 1:])
  np.testing.assert_array_equal(
    batch["weights"],
    [
      [1, 1, 1, 0],
      [1, 1, 0, 1],
      [1, 1, 1, 0],
      [0, 0, 0, 0],  # Padding row filling the last eval batch.
    ],
  )
  assert batch["inputs"].dtype == np.int32
  assert batch["weights"].dtype == np.float32


def test_split_by_position_is_90_10():
  stream = packing.concatenate_documents([np.arange(100, dtype=np.int32)], eos_id=None)
  train, val = packing.split_by_position(stream, 0.1)
  np.testing.assert_array_equal(train.tokens, np.arange(90))
  np.testing.assert_array_equal(val.tokens, np.arange(90, 100))


def _rows_fixture(num_docs=40, seq_len=8, seed=0) -> packing.PackedRows:
  rng = np.random.default_rng(seed)
  documents = [rng.integers(3, 50, size=rng.integers(1, 20)) for _ in range(num_docs)]
  return pack(documents, seq_len, eos_id=2)


def test_no_token_lost_or_duplicated_over_an_epoch():
  rng = np.random.default_rng(1)
  documents = [rng.integers(3, 50, size=rng.integers(1, 20)).astype(np.int32) for _ in range(50)]
  stream = packing.concatenate_documents(documents, eos_id=2)
  rows = packing.pack_rows(stream, seq_len=8)
  # One epoch with 3 processes x 1 row: every row exactly once, shuffled.
  num_rows = rows.num_rows - rows.num_rows % 3
  rows = packing.PackedRows(rows.tokens[:num_rows], rows.segment_ids[:num_rows])
  by_first_input = {}
  for process in range(3):
    for batch in pipeline.train_batches(
      rows, global_batch_size=3, seed=3, stop_step=num_rows // 3, process_index=process, process_count=3
    ):
      key = batch["inputs"][0].tobytes()
      assert key not in by_first_input  # No row twice.
      by_first_input[key] = batch
  assert len(by_first_input) == num_rows
  row_of = {rows.tokens[i, :-1].tobytes(): i for i in range(num_rows)}
  in_order = sorted(by_first_input.values(), key=lambda b: row_of[b["inputs"][0].tobytes()])
  # Real tokens are >= 2 and pad is 0: the first input plus every non-pad
  # target, row after row, is the token stream exactly.
  targets = np.concatenate([b["targets"][0] for b in in_order])
  rebuilt = np.concatenate([in_order[0]["inputs"][0, :1], targets[targets != packing.PAD_ID]])
  expected_length = num_rows * 8 + 1
  np.testing.assert_array_equal(rebuilt, stream.tokens[: min(expected_length, len(stream.tokens))])


def test_one_epoch_of_shuffled_train_rows_is_a_permutation():
  rows = _rows_fixture()
  n = rows.num_rows
  batches = list(pipeline.train_batches(rows, global_batch_size=1, seed=5, stop_step=n))
  row_ids = [int(np.where((rows.tokens[:, :-1] == b["inputs"][0]).all(axis=1))[0][0]) for b in batches]
  assert sorted(row_ids) == list(range(n))
  assert row_ids != list(range(n))


def test_no_weighted_target_crosses_a_document_boundary():
  rng = np.random.default_rng(2)
  documents = [rng.integers(3, 50, size=rng.integers(1, 12)).astype(np.int32) for _ in range(60)]
  stream = packing.concatenate_documents(documents, eos_id=2)
  rows = packing.pack_rows(stream, seq_len=8)
  index = np.arange(rows.num_rows)[:, None] * 8 + np.arange(8)[None, :]
  for batch in pipeline.eval_batches(rows, global_batch_size=rows.num_rows):
    weighted = batch["weights"] == 1
    in_stream = index < len(stream.tokens) - 1
    doc = stream.document_ids
    same_doc = np.zeros_like(weighted)
    same_doc[in_stream] = doc[index[in_stream]] == doc[index[in_stream] + 1]
    assert not (weighted & ~same_doc).any()
    assert (weighted == same_doc).all()  # And every in-document target counts.


# ---- batching -------------------------------------------------------------


def _batches(rows, **kwargs):
  kwargs.setdefault("global_batch_size", 8)
  kwargs.setdefault("seed", 0)
  return list(pipeline.train_batches(rows, **kwargs))


def test_same_seed_same_batches_and_different_seed_different():
  rows = _rows_fixture()
  first = _batches(rows, seed=1, stop_step=10)
  again = _batches(rows, seed=1, stop_step=10)
  other = _batches(rows, seed=2, stop_step=10)
  for a, b in zip(first, again):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  assert any((a["inputs"] != c["inputs"]).any() for a, c in zip(first, other))


def test_resume_at_step_equals_run_from_zero():
  rows = _rows_fixture()
  full = _batches(rows, stop_step=20)  # Several epochs of a small corpus.
  resumed = _batches(rows, start_step=13, stop_step=20)
  for a, b in zip(full[13:], resumed):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def test_process_slices_concatenate_to_global_batch():
  rows = _rows_fixture()
  whole = _batches(rows, stop_step=5)
  part0 = _batches(rows, stop_step=5, process_index=0, process_count=2)
  part1 = _batches(rows, stop_step=5, process_index=1, process_count=2)
  for w, p0, p1 in zip(whole, part0, part1):
    assert p0["inputs"].shape == (4, 8)
    for name in set(w) - {"source_counts"}:  # Global counts: the same on every process.
      np.testing.assert_array_equal(np.concatenate([p0[name], p1[name]]), w[name])


def test_eval_batches_in_order_capped_and_reiterable():
  rows = _rows_fixture()
  batches = list(pipeline.eval_batches(rows, global_batch_size=4))
  assert len(batches) == -(-rows.num_rows // 4)
  np.testing.assert_array_equal(batches[0]["inputs"], rows.tokens[:4, :-1])
  assert len(list(pipeline.eval_batches(rows, global_batch_size=4, max_batches=2))) == 2
  empty = packing.PackedRows(*(np.zeros((0, 9), np.int32),) * 2)
  assert not list(pipeline.eval_batches(empty, global_batch_size=4))


def test_too_few_rows_for_a_batch():
  rows = _rows_fixture(num_docs=2)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.train_batches(rows, global_batch_size=1000, seed=0)


# ---- tokenizers -----------------------------------------------------------


def test_byte_tokenizer_round_trip():
  tokenizer = ByteTokenizer()
  text = "héllo\n\twörld ✓"
  (ids,) = tokenizer.encode_batch([text])
  assert tokenizer.vocab_size == 259
  assert ids[0] == ord("h") + 3 and ids.dtype == np.int32
  assert tokenizer.decode(ids) == text


def test_char_tokenizer_round_trip_save_load(tmp_path):
  tokenizer = CharTokenizer.from_texts(["hello", "world!"])
  assert tokenizer.vocab_size == len(set("helloworld!"))
  assert tokenizer.eos_id is None and tokenizer.pad_id is None
  (ids,) = tokenizer.encode_batch(["low!"])
  assert tokenizer.decode(ids) == "low!"
  tokenizer.save(str(tmp_path / "v.json"))
  loaded = CharTokenizer.load(str(tmp_path / "v.json"))
  np.testing.assert_array_equal(loaded.encode_batch(["low!"])[0], ids)
  with pytest.raises(ValueError, match=r"not in the 8-character"):
    tokenizer.encode_batch(["xyz"])


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no corpus")
def test_char_tokenizer_on_shakespeare_has_65_chars(tmp_path):
  config = make_config(tokenizer="char", paths=SHAKESPEARE)
  tokenizer = build_tokenizer(config, lambda: iter([open(SHAKESPEARE, encoding="utf-8").read()]), str(tmp_path))
  assert tokenizer.vocab_size == 65
  assert os.path.exists(tmp_path / "tokenizer" / "char_vocab.json")


def test_unknown_tokenizer_name(tmp_path):
  config = ml_collections.ConfigDict(dict(tokenizer="wp"))
  with pytest.raises(ValueError, match="data.tokenizer: unknown tokenizer 'wp'"):
    build_tokenizer(config, lambda: iter(()), str(tmp_path))


def test_missing_tokenizer_path(tmp_path):
  config = ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path="/x/y.model"))
  with pytest.raises(ValueError, match=("data.tokenizer_path: file /x/y.model does not exist")):
    build_tokenizer(config, lambda: iter(()), str(tmp_path))


# ---- build_datasets -------------------------------------------------------


def test_build_datasets_end_to_end_and_cache(tmp_path):
  (tmp_path / "corpus").mkdir()
  pattern = write_corpus(tmp_path / "corpus")
  config = make_config(paths=pattern, tokenizer="char")
  workdir = str(tmp_path / "work")
  datasets = build_datasets(config, global_batch_size=4, seed=0, workdir=workdir)
  batch = next(datasets.train_batches(0, 1))
  assert batch["inputs"].shape == (4, 16)
  assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "weights", "source_counts"}
  assert batch["source_counts"].tolist() == [4]
  num_chars = sum(len(open(p, encoding="utf-8").read()) for p in sorted((tmp_path / "corpus").iterdir()))
  (main,) = datasets.sources
  assert main.num_train_tokens == int(num_chars * 0.9)
  assert len(list(datasets.eval_batches("main"))) == len(list(datasets.eval_batches("main"))) > 0
  cache_files = os.listdir(os.path.join(workdir, "data_cache"))
  assert len(cache_files) == 1
  again = build_datasets(config, global_batch_size=4, seed=0, workdir=workdir)
  np.testing.assert_array_equal(again.sources[0].train.tokens, main.train.tokens)
  second = next(again.train_batches(0, 1))
  np.testing.assert_array_equal(second["inputs"], batch["inputs"])


def test_an_edited_source_file_is_tokenized_again(tmp_path, monkeypatch):
  """The row cache is keyed by the files: an edit, even one that keeps the size and sets the
  modification time back (cp -p, rsync -t, touch -r do), makes the next build read the new text."""
  (tmp_path / "corpus").mkdir()
  config = make_config(paths=write_corpus(tmp_path / "corpus", num_files=3))
  workdir = str(tmp_path / "work")
  tokenized = []
  packed_chunks = source_rows.packed_chunks

  def counting_packed_chunks(name, *args, **kwargs):
    tokenized.append(name)
    return packed_chunks(name, *args, **kwargs)

  monkeypatch.setattr(source_rows, "packed_chunks", counting_packed_chunks)

  def text_of_rows() -> str:
    datasets = build_datasets(config, global_batch_size=4, seed=0, workdir=workdir)
    (main,) = datasets.sources
    # Rows overlap by one token: all but the last of each row is the stream, once.
    return "".join(datasets.tokenizer.decode(row[:-1]) for rows in (main.train, main.validation) for row in rows.tokens)

  before = text_of_rows()
  assert text_of_rows() == before and tokenized == ["main"]  # Unchanged files: read from the cache.
  path = tmp_path / "corpus" / "doc01.txt"
  stat = os.stat(path)
  path.write_text("EDITED" + path.read_text(encoding="utf-8")[6:], encoding="utf-8")
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # Size and mtime as before the edit...
  while os.stat(path).st_ctime_ns == stat.st_ctime_ns:  # ...but ctime moved (by one tick of its clock).
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
  edited = text_of_rows()
  assert tokenized == ["main"] * 2 and "EDITED" in edited and "EDITED" not in before
  assert len(edited) == len(before)
  with open(path, "a", encoding="utf-8") as f:  # An ordinary edit: the file grows.
    f.write(" APPENDED")
  assert "APPENDED" in text_of_rows() and tokenized == ["main"] * 3


def test_build_datasets_trains_and_caches_sentencepiece(tmp_path):
  (tmp_path / "corpus").mkdir()
  pattern = write_corpus(tmp_path / "corpus", num_files=20, words=400)
  config = make_config(paths=pattern, tokenizer="sentencepiece", tokenizer_vocab_size=300)
  workdir = str(tmp_path / "work")
  datasets = build_datasets(config, global_batch_size=8, seed=0, workdir=workdir)
  assert datasets.tokenizer.vocab_size == 300
  model_path = os.path.join(workdir, "tokenizer", "sp.model")
  assert os.path.exists(model_path)
  # eos ends every document, so the stream holds one eos per file.
  (main,) = datasets.sources
  stream_eos = (main.train.tokens[:, :-1] == 2).sum() + (main.validation.tokens[:, :-1] == 2).sum()
  assert stream_eos in (19, 20)  # The very last eos may be a row's last token.
  mtime = os.path.getmtime(model_path)
  build_datasets(config, global_batch_size=8, seed=0, workdir=workdir)
  assert os.path.getmtime(model_path) == mtime  # Reused, not retrained.
  with pytest.raises(ValueError, match="data.tokenizer_vocab_size=512"):
    build_datasets(
      make_config(paths=pattern, tokenizer="sentencepiece", tokenizer_vocab_size=512),
      global_batch_size=8,
      seed=0,
      workdir=workdir,
    )


def test_build_datasets_too_few_rows(tmp_path):
  pattern = write_corpus(tmp_path, num_files=1, words=10)
  config = make_config(paths=pattern, seq_len=64)
  with pytest.raises(ValueError, match="fewer than one global batch.*data.seq_len"):
    build_datasets(config, global_batch_size=64, seed=0, workdir=str(tmp_path / "work"))


def _chat_line(*turns) -> str:
  roles = ["system", "user", "assistant"]
  return json.dumps(
    {
      "messages": [
        {"role": roles[i % 3] if len(turns) == 3 else ["user", "assistant"][i % 2], "content": text}
        for i, text in enumerate(turns)
      ]
    }
  )


def test_mixture_of_text_jsonl_and_chat_with_bad_data(tmp_path):
  """Three kinds of source in one mixture: proportions, per-source eval, chat masks, bad-data counts."""
  (tmp_path / "text").mkdir()
  pattern = write_corpus(tmp_path / "text", num_files=8, words=300)
  (tmp_path / "text" / "empty.txt").write_text("")
  records = [json.dumps({"text": f"record {i}: " + "jsonl words " * (5 + i % 7)}) for i in range(80)]
  records.insert(3, '{"text": broken')
  (tmp_path / "web.jsonl").write_text("\n".join(records) + "\n")
  chats = [_chat_line(f"question {i}?", f"answer {i}.") for i in range(60)]
  chats.insert(5, json.dumps({"messages": [{"role": "bot", "content": "hi"}]}))
  chats.insert(9, json.dumps({"messages": [{"role": "user"}]}))
  chats.insert(11, _chat_line("long " * 50, "x"))  # Over seq_len + 1 tokens.
  (tmp_path / "chat.jsonl").write_text("\n".join(chats) + "\n")
  sources = {
    "books": base.source(paths=pattern, weight=0.5),
    "web": base.source(kind="jsonl", paths=str(tmp_path / "web.jsonl"), weight=0.25),
    "chat": base.source(kind="chat", paths=str(tmp_path / "chat.jsonl"), weight=0.25),
  }
  config = make_config(sources=sources, seq_len=128, validation_fraction=0.2)
  datasets = build_datasets(config, global_batch_size=8, seed=0, workdir=str(tmp_path / "work"))
  assert datasets.names == ("books", "chat", "web")  # ConfigDict keeps keys sorted.
  assert datasets.bad_data_counts == {
    "empty_file": 1,
    "malformed_json": 1,
    "unknown_role": 1,
    "missing_content": 1,
    "too_long": 1,
  }
  counts = np.zeros(3)
  for batch in datasets.train_batches(0, 20):
    counts += batch["source_counts"]
  np.testing.assert_array_equal(counts, [80, 40, 40])
  chat = datasets.sources[1]
  assert not chat.train.stream
  # Every weighted target of a chat row is an assistant token: 'answer N.' or <|im_end|>.
  tokenizer = datasets.tokenizer
  answers = 0
  for batch in datasets.eval_batches("chat"):
    for targets, weights in zip(batch["targets"], batch["weights"]):
      parts = tokenizer.decode(targets[weights > 0]).split("<|im_end|>")
      assert all(part.startswith("answer ") for part in parts[:-1]) and parts[-1] == ""
      answers += len(parts) - 1
  assert answers == 12  # The last 20% of the 60 good conversations validate.
  with pytest.raises(BadDataError, match=r'empty.txt: file is empty .*data.bad_data="stop"'):
    build_datasets(
      make_config(sources=sources, seq_len=128, bad_data="stop"),
      global_batch_size=8,
      seed=0,
      workdir=str(tmp_path / "work2"),
    )


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "char"])
def test_prepared_source_trains_like_the_on_the_fly_one(tmp_path, tokenizer):
  """A prepared directory carries its tokenizer: training from it elsewhere gives the same batches."""
  from data.datasets import prepare_datasets

  (tmp_path / "corpus").mkdir()
  pattern = write_corpus(tmp_path / "corpus", num_files=10, words=300)
  config = make_config(paths=pattern, tokenizer=tokenizer, tokenizer_vocab_size=300)
  metas = prepare_datasets(config, str(tmp_path / "prepared"), chunk_tokens=10**9)
  on_disk = make_config(
    sources={"main": base.source(kind="prepared", paths=str(tmp_path / "prepared" / "main"))},
    tokenizer=tokenizer,
    tokenizer_vocab_size=300,
  )
  prepared = build_datasets(on_disk, global_batch_size=4, seed=0, workdir=str(tmp_path / "w1"))
  in_memory = build_datasets(config, global_batch_size=4, seed=0, workdir=str(tmp_path / "w2"))
  assert prepared.tokenizer.identity() == in_memory.tokenizer.identity()
  assert metas["main"]["splits"]["train"]["num_tokens"] == in_memory.sources[0].num_train_tokens
  for a, b in zip(prepared.train_batches(0, 30), in_memory.train_batches(0, 30)):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  # Chunked preparation keeps the train rows one stream: the same tokens, in more, smaller chunks.
  chunked = prepare_datasets(config, str(tmp_path / "chunked"), chunk_tokens=500)
  assert (
    chunked["main"]["splits"]["train"]["num_tokens"] + chunked["main"]["splits"]["validation"]["num_tokens"]
    == metas["main"]["splits"]["train"]["num_tokens"] + metas["main"]["splits"]["validation"]["num_tokens"]
  )


def _unique_token_stream(seq_len=8):
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 20, 30)
  start = np.cumsum(np.concatenate([[0], lengths]))[:-1]
  # Unique token values, so a window's first token says where in the stream it starts.
  documents = [np.arange(s, s + n, dtype=np.int32) + 10 for s, n in zip(start, lengths)]
  stream = packing.concatenate_documents(documents, eos_id=None)
  return stream, packing.pack_rows(stream, seq_len=seq_len)


def _assert_is_stream_window(batch, b, stream, seq_len):
  """Row b of `batch` is a contiguous stream slice with segments and positions of its documents."""
  window = np.concatenate([batch["inputs"][b], batch["targets"][b][-1:]])
  begin = int(window[0]) - 10
  np.testing.assert_array_equal(window, stream.tokens[begin : begin + seq_len + 1])
  docs = stream.document_ids[begin : begin + seq_len]
  expected_segments = np.cumsum(np.concatenate([[1], docs[1:] != docs[:-1]]))
  np.testing.assert_array_equal(batch["segment_ids"][b], expected_segments)
  expected_positions = [i - np.argmax(docs == docs[i]) for i in range(seq_len)]
  np.testing.assert_array_equal(batch["positions"][b], expected_positions)
  next_docs = stream.document_ids[begin + 1 : begin + seq_len + 1]
  np.testing.assert_array_equal(batch["weights"][b], (docs == next_docs).astype(np.float32))
  return begin


def test_later_epochs_read_shifted_windows_of_the_stream():
  """Epoch 1 windows are contiguous stream slices at one random offset, with
  segment ids and positions recomputed from the document boundaries."""
  seq_len, batch_size = 8, 4
  stream, rows = _unique_token_stream(seq_len)
  steps_per_epoch = rows.num_rows // batch_size
  shifts = set()
  for step in range(steps_per_epoch + 1, 2 * steps_per_epoch - 1):
    batch = next(
      pipeline.train_batches(rows, global_batch_size=batch_size, seed=5, start_step=step, stop_step=step + 1)
    )
    for b in range(batch_size):
      shifts.add(_assert_is_stream_window(batch, b, stream, seq_len) % seq_len)
  # One shift for the whole epoch (the last row cannot shift), and not the first epoch's 0.
  assert len(shifts - {0}) == 1


def test_random_windows_are_stream_slices_at_any_offset():
  seq_len, batch_size = 8, 4
  stream, rows = _unique_token_stream(seq_len)
  batches = _batches(rows, global_batch_size=batch_size, seed=7, windows="random", stop_step=30)
  begins = [_assert_is_stream_window(batch, b, stream, seq_len) for batch in batches for b in range(batch_size)]
  assert len({begin % seq_len for begin in begins}) == seq_len  # every offset occurs
  again = _batches(rows, global_batch_size=batch_size, seed=7, windows="random", start_step=20, stop_step=30)
  for a, b in zip(batches[20:], again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  halves = [
    _batches(
      rows, global_batch_size=batch_size, seed=7, windows="random", stop_step=30, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  for full, first, second in zip(batches, *halves):
    np.testing.assert_array_equal(full["inputs"], np.concatenate([first["inputs"], second["inputs"]]))


def test_a_validation_split_without_a_row_is_refused(tmp_path):
  (tmp_path / "small.txt").write_text("abcdefghij" * 60)  # 600 tokens: 0.001 of it is under one row.
  config = make_config(str(tmp_path / "small.txt"), validation_fraction=0.001)
  with pytest.raises(
    ValueError,
    match=r"data.sources.main: the validation split holds no row of "
    r"data.seq_len=16 tokens \(data.validation_fraction=0.001 of .* training tokens\)",
  ):
    build_datasets(config, global_batch_size=4, seed=0, workdir=str(tmp_path / "run"))
  config = make_config(str(tmp_path / "small.txt"), validation_fraction=0.1)
  assert (
    build_datasets(config, global_batch_size=4, seed=0, workdir=str(tmp_path / "run")).sources[0].validation.num_rows
    > 0
  )


def test_tokenizer_training_follows_bad_data_and_names_an_empty_corpus(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_corpus(corpus)
  (corpus / "zz_bad.txt").write_bytes(b"ok \xff bad\n")
  config = make_config(str(corpus / "*.txt"), tokenizer="sentencepiece", bad_data="stop")
  with pytest.raises(BadDataError, match=r"zz_bad.txt: .*not UTF-8"):
    build_datasets(config, global_batch_size=4, seed=0, workdir=str(tmp_path / "run"))
  # Stopped before a tokenizer was trained without that file and cached for the next run.
  assert not os.path.exists(tmp_path / "run" / "tokenizer" / "sp.model")

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text(" \n")
  config = make_config(str(empty / "*.txt"), tokenizer="sentencepiece")
  with pytest.raises(ValueError, match=r"^data.sources.main: no text to train the sentencepiece tokenizer on"):
    build_datasets(config, global_batch_size=4, seed=0, workdir=str(tmp_path / "run2"))
