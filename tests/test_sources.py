"""Tests for data.sources: every kind, every bad-data case, identities, TFDS."""

import json
import os
import subprocess
import sys
import sysconfig
import time

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import sources
from data.bad_data import BadData, BadDataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, str):
    content = content.encode("utf-8")
  path.write_bytes(content)
  return str(path)


def _jsonl(*records):
  return "".join(json.dumps(r) + "\n" for r in records)


def _parquet(path, table, row_group_size=2):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, str(path), row_group_size=row_group_size)
  return str(path)


def _read(source, policy="stop", name="src"):
  bad_data = BadData(policy)
  documents = list(sources.read_documents(name, source, bad_data))
  return documents, bad_data


# --- Each kind yields the right documents, in order, with the right `where`. ---


def test_text_files_sorted_union_of_globs_with_recursion(tmp_path):
  b = _write(tmp_path / "b.txt", "bee")
  a = _write(tmp_path / "a.txt", "ay\n")
  c = _write(tmp_path / "sub" / "deep" / "c.txt", "sea")
  _write(tmp_path / "notes.md", "not matched")
  # a.txt is matched by both patterns but read once.
  source = dict(kind="text", paths=f"{tmp_path}/**/*.txt, {tmp_path}/a.txt")
  documents, bad_data = _read(source)
  assert documents == [
    sources.Document(text="ay\n", messages=None, where=a),
    sources.Document(text="bee", messages=None, where=b),
    sources.Document(text="sea", messages=None, where=c),
  ]
  assert bad_data.total == 0
  assert sources.resolve_files("src", dict(source, max_files=2)) == [a, b]
  assert [d.text for d in _read(dict(source, max_files=2))[0]] == ["ay\n", "bee"]


def test_jsonl_lines_in_order_blank_lines_ignored(tmp_path):
  first = _write(tmp_path / "1.jsonl", _jsonl({"body": "one", "id": 1}) + "\n  \n" + _jsonl({"body": "two"}))
  second = _write(tmp_path / "2.jsonl", _jsonl({"body": "three"}))
  documents, bad_data = _read(dict(kind="jsonl", paths=f"{tmp_path}/*.jsonl", field="body"))
  assert [(d.text, d.messages, d.where) for d in documents] == [
    ("one", None, f"{first}:1"),
    ("two", None, f"{first}:4"),
    ("three", None, f"{second}:1"),
  ]
  assert bad_data.total == 0


def test_jsonl_byte_order_mark_on_first_line_is_not_content(tmp_path):
  path = _write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + _jsonl({"text": "hi"}).encode())
  documents, _ = _read(dict(kind="jsonl", paths=path))
  assert [(d.text, d.where) for d in documents] == [("hi", f"{path}:1")]


def test_chat_passes_messages_through(tmp_path):
  conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  odd = [{"role": "robot"}]  # Role checks belong to the chat module, not here.
  path = _write(tmp_path / "chat.jsonl", _jsonl({"messages": conversation}, {"messages": odd}))
  documents, _ = _read(dict(kind="chat", paths=path))
  assert documents == [
    sources.Document(text=None, messages=conversation, where=f"{path}:1"),
    sources.Document(text=None, messages=odd, where=f"{path}:2"),
  ]


def test_parquet_rows_across_row_groups(tmp_path):
  path = _parquet(tmp_path / "d.parquet", pa.table({"id": [0, 1, 2, 3, 4], "text": ["a", "b", "c", "d", "e"]}))
  assert pq.ParquetFile(path).num_row_groups == 3
  documents, _ = _read(dict(kind="parquet", paths=path))
  assert [(d.text, d.where) for d in documents] == [
    ("a", f"{path}:row 0"),
    ("b", f"{path}:row 1"),
    ("c", f"{path}:row 2"),
    ("d", f"{path}:row 3"),
    ("e", f"{path}:row 4"),
  ]


def test_parquet_binary_column_is_decoded(tmp_path):
  path = _parquet(tmp_path / "b.parquet", pa.table({"text": pa.array([b"x", b"y"], pa.binary())}))
  assert [d.text for d in _read(dict(kind="parquet", paths=path))[0]] == ["x", "y"]


def test_stdlib_files(tmp_path):
  source = dict(kind="stdlib", max_files=3)
  files = sources.resolve_files("src", source)
  stdlib = sysconfig.get_paths()["stdlib"]
  assert len(files) == 3
  assert files == sorted(files)
  assert all(f.startswith(stdlib) and f.endswith(".py") for f in files)
  documents, bad_data = _read(source)
  assert [d.where for d in documents] == files
  assert documents[0].text == open(files[0], encoding="utf-8").read()
  assert bad_data.total == 0


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "chat"])
def test_max_documents_stops_every_kind(tmp_path, kind):
  for i in range(3):
    if kind == "text":
      _write(tmp_path / f"{i}.x", f"doc {i}")
    elif kind == "parquet":
      _parquet(tmp_path / f"{i}.x", pa.table({"text": [f"doc {i}a", f"doc {i}b"]}))
    else:
      key = "messages" if kind == "chat" else "text"
      _write(
        tmp_path / f"{i}.x",
        _jsonl({key: [f"doc {i}a"]}, {key: [f"doc {i}b"]})
        if kind == "chat"
        else _jsonl({key: f"doc {i}a"}, {key: f"doc {i}b"}),
      )
  documents, _ = _read(dict(kind=kind, paths=f"{tmp_path}/*.x", max_documents=3))
  assert len(documents) == 3
  expected = {
    "text": ["0.x", "1.x", "2.x"],
    "jsonl": ["0.x:1", "0.x:2", "1.x:1"],
    "chat": ["0.x:1", "0.x:2", "1.x:1"],
    "parquet": ["0.x:row 0", "0.x:row 1", "1.x:row 0"],
  }[kind]
  assert [os.path.basename(d.where) for d in documents] == expected


# --- Bad data: reason, file and line; 'skip' counts and goes on, 'stop' raises. ---

_GOOD_TEXT = "good document"

# (kind, file name, file bytes, reason, `where` suffix after the path, words in the message)
_BAD_CASES = [
  ("text", "empty.txt", b"", "empty_file", "", "file is empty"),
  ("text", "blank.txt", b" \n\t\n", "empty_file", "", "only whitespace"),
  ("text", "latin1.txt", b"ok\nbad \xff here", "undecodable", "", "byte offset 7 (line 2)"),
  ("text", "utf16.txt", "hi\nthere".encode("utf-16-le"), "binary", "", "NUL byte at byte offset 1 (line 1)"),
  ("text", "zeros.bin", b"ok\n" + bytes(100), "binary", "", "NUL byte at byte offset 3 (line 2)"),
  ("jsonl", "empty.jsonl", b"", "empty_file", "", "file is empty"),
  ("jsonl", "blank.jsonl", b"\n \n", "empty_file", "", "no JSON lines"),
  ("jsonl", "broken.jsonl", b'{"text": "fine"}\n{"text": "no end\n', "malformed_json", ":2", "Unterminated string"),
  (
    "jsonl",
    "missing.jsonl",
    b'{"body": "x", "id": 3}\n',
    "missing_field",
    ":1",
    "no field 'text' (data.sources field); keys present: 'body', 'id'",
  ),
  ("jsonl", "array.jsonl", b'["text"]\n', "missing_field", ":1", "got a JSON list"),
  ("jsonl", "number.jsonl", b'{"text": 7}\n', "wrong_type", ":1", "field 'text' is a JSON int, expected a string"),
  ("jsonl", "emptytext.jsonl", b'{"text": " "}\n', "empty_example", ":1", "empty"),
  (
    "jsonl",
    "latin1.jsonl",
    b'{"text": "a"}\n{"text": "\xe9"}\n',
    "undecodable",
    ":2",
    "byte 0xe9 at byte offset 24: invalid continuation byte",
  ),
  (
    "chat",
    "nomsg.jsonl",
    b'{"text": "hi"}\n',
    "missing_field",
    ":1",
    "expected a JSON object with a \"messages\" list; keys present: 'text'",
  ),
  ("chat", "broken.jsonl", b'{"messages": [\n', "malformed_json", ":1", "not valid JSON"),
  (
    "chat",
    "dict.jsonl",
    b'{"messages": {"role": "user"}}\n',
    "wrong_type",
    ":1",
    '"messages" is a JSON dict, expected a list',
  ),
  ("chat", "empty.jsonl", b"", "empty_file", "", "file is empty"),
  ("chat", "latin1.jsonl", b"\xff\n", "undecodable", ":1", "byte offset 0"),
  ("parquet", "empty.parquet", b"", "empty_file", "", "file is empty"),
  ("parquet", "garbage.parquet", b"not parquet at all", "undecodable", "", "not a readable Parquet file"),
]


def _good_file(tmp_path, kind):
  if kind == "text":
    return _write(tmp_path / "zz_good.txt", _GOOD_TEXT)
  if kind == "parquet":
    return _parquet(tmp_path / "zz_good.parquet", pa.table({"text": [_GOOD_TEXT]}))
  if kind == "chat":
    return _write(tmp_path / "zz_good.jsonl", _jsonl({"messages": [_GOOD_TEXT]}))
  return _write(tmp_path / "zz_good.jsonl", _jsonl({"text": _GOOD_TEXT}))


@pytest.mark.parametrize(
  "kind,file_name,content,reason,suffix,words", _BAD_CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in _BAD_CASES]
)
def test_bad_data_skip_counts_and_continues_stop_raises(tmp_path, kind, file_name, content, reason, suffix, words):
  bad = _write(tmp_path / file_name, content)
  good = _good_file(tmp_path, kind)  # Sorts after the bad file: reading must go on.
  source = dict(kind=kind, paths=f"{bad},{good}")

  documents, bad_data = _read(source, policy="skip")
  assert dict(bad_data.counts) == {reason: 1}
  assert len(bad_data.examples) == 1
  message = bad_data.examples[0]
  assert message.startswith(f"{bad}{suffix}: "), message
  assert words in message, message
  # The bad file's good lines (if any) come first; the good file is still read.
  assert all(d.where.startswith(f"{bad}:") for d in documents[:-1])
  assert documents[-1].where.startswith(good)
  assert (documents[-1].messages or [documents[-1].text]) == [_GOOD_TEXT]

  with pytest.raises(BadDataError) as error:
    _read(source, policy="stop")
  assert str(error.value).startswith(f"{bad}{suffix}: ")
  assert words in str(error.value)


def test_parquet_nulls_and_wrong_types(tmp_path):
  nulls = _parquet(tmp_path / "a.parquet", pa.table({"text": ["x", None, "y"]}))
  ints = _parquet(tmp_path / "b.parquet", pa.table({"text": [1, 2]}))
  documents, bad_data = _read(dict(kind="parquet", paths=f"{tmp_path}/*.parquet"), "skip")
  assert [(d.text, d.where) for d in documents] == [("x", f"{nulls}:row 0"), ("y", f"{nulls}:row 2")]
  assert dict(bad_data.counts) == {"missing_field": 1, "wrong_type": 2}
  assert bad_data.examples == [
    f"{nulls}:row 1: column 'text' is null",
    f"{ints}:row 0: column 'text' has type int64, expected string",
    f"{ints}:row 1: column 'text' has type int64, expected string",
  ]
  with pytest.raises(BadDataError, match=f"{nulls}:row 1: column 'text' is null"):
    _read(dict(kind="parquet", paths=nulls), "stop")


def test_parquet_missing_column_is_a_config_error_under_any_policy(tmp_path):
  path = _parquet(tmp_path / "a.parquet", pa.table({"id": [1], "body": ["x"]}))
  for policy in ("skip", "stop"):
    with pytest.raises(ValueError) as error:
      _read(dict(kind="parquet", paths=path, field="content"), policy, name="web")
    assert not isinstance(error.value, BadDataError)
    assert str(error.value) == (
      f"data.sources.web.field='content': {path} has no such column; columns present: id, body."
    )


# --- check_source: cheap checks naming data.sources.NAME.FIELD. ---


def test_check_source_accepts_configdict_and_dict(tmp_path):
  path = _write(tmp_path / "a.txt", "x")
  sources.check_source("mine", ml_collections.ConfigDict(dict(sources.SOURCE_DEFAULTS, paths=path)))
  sources.check_source("mine", dict(paths=path))  # Missing fields take the defaults.
  sources.check_source("lm", dict(kind="tfds", name="lm1b"))
  sources.check_source("py", dict(kind="stdlib"))
  prepared = tmp_path / "prepared"
  _write(prepared / "meta.json", "{}")
  sources.check_source("p", dict(kind="prepared", paths=str(prepared)))


@pytest.mark.parametrize(
  "source,expected",
  [
    (dict(kind="csv"), "data.sources.s.kind='csv'; allowed: text, jsonl, parquet, tfds, chat, stdlib, prepared."),
    (dict(kind="text", path="x"), "data.sources.s.path: unknown field; allowed: kind, paths"),
    (dict(kind="jsonl"), "data.sources.s.paths is empty; kind='jsonl' needs"),
    (dict(kind="text", paths="NOPE/*.txt"), "data.sources.s.paths: pattern 'NOPE/*.txt' matches no files."),
    (dict(kind="tfds"), "data.sources.s.name is empty; kind='tfds' needs a TFDS dataset name"),
    (dict(kind="tfds", name="lm1b", paths="x"), "data.sources.s.paths='x' but kind='tfds'"),
    (dict(kind="stdlib", weight=-1.0), "data.sources.s.weight=-1.0; allowed: a finite number >= 0."),
    (dict(kind="stdlib", weight=float("inf")), "data.sources.s.weight=inf; allowed: a finite number >= 0."),
    (dict(kind="stdlib", max_files=-2), "data.sources.s.max_files=-2; allowed: an integer >= 0"),
    (dict(kind="stdlib", max_documents=-1), "data.sources.s.max_documents=-1; allowed"),
    (dict(kind="stdlib", max_documents=1.5), "data.sources.s.max_documents=1.5; allowed"),
    (
      dict(kind="prepared", paths="NO_SUCH_DIR"),
      "data.sources.s.paths='NO_SUCH_DIR': no such directory; kind='prepared'",
    ),
  ],
)
def test_check_source_errors_name_the_field(source, expected):
  with pytest.raises(ValueError) as error:
    sources.check_source("s", source)
  assert str(error.value).startswith(expected), str(error.value)


def test_check_source_glob_on_directory_and_prepared_without_meta(tmp_path):
  _write(tmp_path / "corpus" / "a.txt", "x")
  with pytest.raises(ValueError, match=r"matches no files \(it is a directory: use "):
    sources.check_source("s", dict(paths=str(tmp_path / "corpus")))
  with pytest.raises(ValueError, match="directory has no meta.json"):
    sources.check_source("s", dict(kind="prepared", paths=str(tmp_path / "corpus")))


def test_read_documents_of_prepared_source_is_an_error(tmp_path):
  _write(tmp_path / "meta.json", "{}")
  with pytest.raises(ValueError, match="data.sources.src.kind='prepared' holds tokens"):
    sources.read_documents("src", dict(kind="prepared", paths=str(tmp_path)), BadData("stop"))


# --- source_identity: stable, and changes with anything that changes the documents. ---


def test_source_identity_tracks_files_and_config(tmp_path):
  path = tmp_path / "a.txt"
  _write(path, "hello")
  source = dict(kind="text", paths=f"{tmp_path}/*.txt")
  identity = sources.source_identity("s", source)
  assert len(identity) == 16 and int(identity, 16) >= 0
  assert sources.source_identity("s", dict(source)) == identity
  assert sources.source_identity("other_name", source) == identity
  assert sources.source_identity("s", dict(source, weight=3.0)) == identity
  assert sources.source_identity("s", dict(source, max_documents=5)) != identity

  stat = os.stat(path)
  _write(path, "hellO")  # Same size: caught by the modification time.
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  changed = sources.source_identity("s", source)
  assert changed != identity
  assert sources.source_identity("s", source) == changed

  _write(path, "hello, world")  # New size.
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  resized = sources.source_identity("s", source)
  assert resized not in (identity, changed)

  _write(tmp_path / "b.txt", "more")
  with_b = sources.source_identity("s", source)
  assert with_b != resized

  # Rewritten with its old size and modification time restored, as `cp -p` or `touch -r` leave it.
  stat = os.stat(path)
  time.sleep(0.02)  # File times tick with the kernel's clock (a few ms).
  _write(path, "HELLO, WORLD")
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
  assert sources.source_identity("s", source) != with_b


def test_source_identity_of_stdlib_is_stable():
  source = dict(kind="stdlib", max_files=2)
  assert sources.source_identity("py", source) == sources.source_identity("py", source)
  assert sources.source_identity("py", source) != sources.source_identity("py", dict(source, max_files=3))


# --- TFDS: mocked registered datasets, errors, and the write / read-back round trip. ---


def test_tfds_registered_dataset_reads_offline_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = dict(kind="tfds", name="lm1b", split="train", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=5):
    documents, bad_data = _read(source)
    again, _ = _read(source)
    first_two, _ = _read(dict(source, max_documents=2))
  assert [d.where for d in documents] == [f"tfds:lm1b/train:{i}" for i in range(5)]
  assert all(isinstance(d.text, str) and d.text.strip() and d.messages is None for d in documents)
  assert again == documents
  assert first_two == documents[:2]
  assert bad_data.total == 0


def test_tfds_unknown_feature_lists_features():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=1):
    with pytest.raises(ValueError) as error:
      _read(dict(kind="tfds", name="lm1b", field="sentence"), name="lm")
  assert str(error.value) == (
    "data.sources.lm.field='sentence': TFDS dataset 'lm1b' has no such feature; features: text."
  )


def test_tfds_reads_the_text_feature_of_a_multi_feature_dataset():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=2):
    documents, _ = _read(dict(kind="tfds", name="imdb_reviews", split="test"))
    with pytest.raises(ValueError) as error:
      _read(dict(kind="tfds", name="imdb_reviews", field="label"), name="imdb")
  assert [d.where for d in documents] == ["tfds:imdb_reviews/test:0", "tfds:imdb_reviews/test:1"]
  assert all(isinstance(d.text, str) for d in documents)
  assert str(error.value).startswith("data.sources.imdb.field='label': TFDS feature 'label' is ClassLabel(")
  assert str(error.value).endswith("not a text feature.")


def test_tfds_not_prepared_names_data_dir_and_the_way_out(tmp_path):
  for name in ("lm1b", "no_such_dataset_xyz"):
    with pytest.raises(ValueError) as error:
      _read(dict(kind="tfds", name=name, data_dir=str(tmp_path)), name="lm")
    message = str(error.value)
    assert message.startswith(f"data.sources.lm: TFDS dataset '{name}' is not prepared in {tmp_path} ")
    assert "tfds build" in message and "tools/make_tfds_dataset.py" in message


def test_write_tfds_dataset_round_trip(tmp_path):
  corpus = tmp_path / "corpus"
  texts = [f"document number {i}\nwith two lines" for i in range(7)]
  for i, text in enumerate(texts):
    _write(corpus / f"{i:02d}.txt", text)
  _write(corpus / "03_empty.txt", "")  # Skipped and counted.
  data_dir = str(tmp_path / "tfds")
  bad_data = BadData("skip")
  written = sources.write_tfds_dataset(
    "my_corpus",
    "1.0.0",
    dict(kind="text", paths=f"{corpus}/*.txt"),
    data_dir=data_dir,
    validation_fraction=0.3,
    bad_data=bad_data,
  )
  assert written.directory == os.path.join(data_dir, "my_corpus", "1.0.0")
  assert written.num_examples == {"train": 4, "validation": 3}
  assert dict(bad_data.counts) == {"empty_file": 1}  # Once, though each split reads it.

  def read_back(split):
    source = dict(kind="tfds", name="my_corpus:1.0.0", split=split, data_dir=data_dir)
    return [d.text for d in _read(source)[0]]

  # round(1 / 0.3) = 3: documents 0, 3 and 6 go to validation, in order.
  assert read_back("validation") == [texts[0], texts[3], texts[6]]
  assert read_back("train") == [texts[1], texts[2], texts[4], texts[5]]
  assert read_back("train[:50%]") == [texts[1], texts[2]]
  with pytest.raises(ValueError, match=r"data\.sources\.src\.split='test': Unknown split"):
    read_back("test")
  tfds_source = dict(kind="tfds", name="my_corpus", data_dir=data_dir)
  assert sources.source_identity("t", tfds_source) == sources.source_identity("t", tfds_source)
  assert sources.source_identity("t", tfds_source) != sources.source_identity(
    "t", dict(tfds_source, split="validation")
  )

  with pytest.raises(ValueError, match="my_corpus:1.0.0 already exists"):
    sources.write_tfds_dataset("my_corpus", "1.0.0", dict(kind="text", paths=f"{corpus}/*.txt"), data_dir=data_dir)


def test_write_tfds_dataset_from_jsonl_without_validation(tmp_path):
  path = _write(tmp_path / "a.jsonl", _jsonl({"body": "first"}, {"body": 2}, {"body": "last"}))
  data_dir = str(tmp_path / "tfds")
  bad_data = BadData("skip")
  written = sources.write_tfds_dataset(
    "lines", "0.1.0", dict(kind="jsonl", paths=path, field="body"), data_dir=data_dir, bad_data=bad_data
  )
  assert written.num_examples == {"train": 2}
  assert dict(bad_data.counts) == {"wrong_type": 1}
  documents, _ = _read(dict(kind="tfds", name="lines", data_dir=data_dir))
  assert [d.text for d in documents] == ["first", "last"]


@pytest.mark.parametrize(
  "name,version,fraction,source,expected",
  [
    ("MyCorpus", "1.0.0", 0.0, dict(kind="text", paths="x"), "name='MyCorpus'"),
    ("c", "1.0", 0.0, dict(kind="text", paths="x"), "version='1.0'"),
    ("c", "1.0.0", 0.9, dict(kind="text", paths="x"), "validation_fraction=0.9"),
    ("c", "1.0.0", 0.0, dict(kind="stdlib"), "data.sources.input.kind='stdlib'"),
  ],
)
def test_write_tfds_dataset_argument_errors(name, version, fraction, source, expected):
  with pytest.raises(ValueError, match=expected.replace(".", r"\.").replace("(", r"\(")):
    sources.write_tfds_dataset(name, version, source, validation_fraction=fraction)


def test_make_tfds_dataset_tool_runs(tmp_path):
  _write(tmp_path / "corpus" / "a.txt", "alpha")
  _write(tmp_path / "corpus" / "b.txt", "beta")
  _write(tmp_path / "corpus" / "c.txt", "\xff".encode("latin-1"))
  data_dir = str(tmp_path / "tfds")
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO_ROOT, "tools", "make_tfds_dataset.py"),
      "--name=tool_corpus",
      "--version=2.0.0",
      f"--paths={tmp_path}/corpus/*.txt",
      f"--data_dir={data_dir}",
    ],
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train: 2 documents" in result.stdout
  assert "Skipped bad records: 1 undecodable." in result.stdout
  documents, _ = _read(dict(kind="tfds", name="tool_corpus:2.0.0", data_dir=data_dir))
  assert [d.text for d in documents] == ["alpha", "beta"]
