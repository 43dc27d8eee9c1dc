"""Named data sources: where documents come from, and what is wrong with them.

A config lists its sources in `config.data.sources` (name -> source ConfigDict
with the fields of SOURCE_DEFAULTS). This module checks a source cheaply before
anything expensive runs, streams its documents in a deterministic order and
reports every record it cannot use to a `BadData` (with "path:line"), so bad
input either stops the run before it starts or is skipped and counted; it never
crashes reading midway.

It also writes local text / JSONL files as a versioned TFDS dataset
(`write_tfds_dataset`, driven by tools/make_tfds_dataset.py), so a user's own
corpus can later be read like any other `kind='tfds'` source.

TensorFlow Datasets is imported only on the tfds code paths: it takes seconds.
"""

import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from typing import Any

from configs.base import SOURCE_DEFAULTS
from data import downloads
from data.bad_data import BadData
from data.prepared import META_FILE

# The fields of a source and their defaults are config data: configs/base.py holds them.
SOURCE_KINDS = ("text", "jsonl", "parquet", "tfds", "chat", "stdlib", "prepared")
TFDS_WRITABLE_KINDS = ("text", "jsonl")  # What write_tfds_dataset turns into a TFDS dataset.

# Kinds whose `paths` are globs of files read by this module.
_GLOB_KINDS = ("text", "jsonl", "parquet", "chat")
# Kinds for which `paths` means nothing: setting it is a mistake worth reporting.
_PATHLESS_KINDS = ("tfds", "stdlib")
# Fields that do not change which documents a source yields, so they stay out of
# source_identity (changing a mixture weight must not invalidate a token cache).
_NOT_IN_IDENTITY = ("weight",)
# Bump when the reading logic changes what a source yields (e.g. new checks).
_READER_VERSION = 1

# Test suites and the IDLE GUI are large and unrepresentative of library code.
# encodings/ is mostly generated code-page tables: noise for a language model.
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "encodings"})
# A prepared directory is recognised by this file (written by the prepare step).
# How much of a record's key list goes into a 'missing_field' message.
_MAX_KEYS_SHOWN = 10
_MAX_DETAIL_CHARS = 200


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: plain text, or a chat conversation (never both).

  `where` locates it for error messages: 'path:LINE' (1-based) for JSONL and
  chat, 'path' for a whole text file, 'path:row N' (0-based) for Parquet,
  'tfds:NAME/SPLIT:N' for TFDS (N: 0-based index within SPLIT, a slice such as
  'train[10:20]' counting from its own start).
  """

  text: str | None
  messages: list | None
  where: str


@dataclasses.dataclass(frozen=True)
class WrittenTfdsDataset:
  """What write_tfds_dataset produced."""

  directory: str  # data_dir/name/version
  num_examples: dict[str, int]  # split name -> number of documents


def _fields(name: str, source: Any) -> dict[str, Any]:
  """The source as a plain dict with defaults filled in; rejects unknown fields."""
  if source is None:
    raise ValueError(f"data.sources.{name} is None; expected a source with fields {', '.join(SOURCE_DEFAULTS)}.")
  items = dict(source.items()) if hasattr(source, "items") else None
  if items is None:
    raise ValueError(
      f"data.sources.{name} is a {type(source).__name__}; expected a "
      f"ConfigDict or dict with fields {', '.join(SOURCE_DEFAULTS)}."
    )
  unknown = sorted(set(items) - set(SOURCE_DEFAULTS))
  if unknown:
    raise ValueError(f"data.sources.{name}.{unknown[0]}: unknown field; allowed: {', '.join(SOURCE_DEFAULTS)}.")
  return {**SOURCE_DEFAULTS, **items}


def _patterns(paths: str) -> list[str]:
  return [os.path.expanduser(p.strip()) for p in paths.split(",") if p.strip()]


def _glob_files(pattern: str) -> list[str]:
  return [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]


def check_source(name: str, source: Any) -> None:
  """Cheap checks of one source, before anything is read or tokenized.

  Args:
    name: the source's name in config.data.sources (used in messages).
    source: an ml_collections ConfigDict or a dict; missing fields take
      SOURCE_DEFAULTS.

  Raises:
    ValueError: naming the field as data.sources.NAME.FIELD, what it was and
      what is allowed.
  """
  fields = _fields(name, source)
  prefix = f"data.sources.{name}"
  kind = fields["kind"]
  if kind not in SOURCE_KINDS:
    raise ValueError(f"{prefix}.kind={kind!r}; allowed: {', '.join(SOURCE_KINDS)}.")
  for key in ("paths", "field", "name", "split", "data_dir"):
    if not isinstance(fields[key], str):
      raise ValueError(f"{prefix}.{key}={fields[key]!r} is a {type(fields[key]).__name__}; expected a string.")
  for key in ("max_files", "max_documents"):
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{prefix}.{key}={value!r}; allowed: an integer >= 0 (0: no limit).")
  weight = fields["weight"]
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
    raise ValueError(f"{prefix}.weight={weight!r}; allowed: a finite number >= 0.")

  paths = fields["paths"]
  if kind in _PATHLESS_KINDS and paths.strip():
    raise ValueError(
      f"{prefix}.paths={paths!r} but kind={kind!r} reads no paths; "
      f"paths are for kinds {', '.join(_GLOB_KINDS)} and prepared."
    )
  if kind in _GLOB_KINDS:
    if not paths.strip():
      raise ValueError(
        f"{prefix}.paths is empty; kind={kind!r} needs comma-separated file globs, e.g. 'corpus/**/*.txt'."
      )
    for pattern in _patterns(paths):
      if not _glob_files(pattern):
        corpus = downloads.corpus_for_path(pattern)
        if corpus:  # A shipped config's corpus that was never fetched: say how to fetch it.
          raise ValueError(downloads.missing_message(corpus, f"{prefix}.paths"))
        hint = f" (it is a directory: use {os.path.join(pattern, '**', '*')!r})" if os.path.isdir(pattern) else ""
        raise ValueError(f"{prefix}.paths: pattern {pattern!r} matches no files{hint}.")
  if kind in ("jsonl", "parquet", "tfds") and not fields["field"]:
    raise ValueError(f"{prefix}.field is empty; kind={kind!r} needs the name of the field holding the text.")
  if kind == "tfds":
    if not fields["name"]:
      raise ValueError(f"{prefix}.name is empty; kind='tfds' needs a TFDS dataset name, e.g. 'lm1b' or 'c4/en:3.0.1'.")
    if not fields["split"]:
      raise ValueError(f"{prefix}.split is empty; kind='tfds' needs a split, e.g. 'train' or 'train[:1%]'.")
  if kind == "prepared":
    directory = os.path.expanduser(paths.strip())
    if not directory:
      raise ValueError(f"{prefix}.paths is empty; kind='prepared' needs the directory of a prepared dataset.")
    if not os.path.isdir(directory):
      raise ValueError(
        f"{prefix}.paths={paths!r}: no such directory; kind='prepared' needs the directory of a prepared dataset."
      )
    if not os.path.isfile(os.path.join(directory, META_FILE)):
      raise ValueError(
        f"{prefix}.paths={paths!r}: directory has no {META_FILE}; "
        "it is not a prepared dataset (or its preparation did not finish)."
      )


def _stdlib_python_files() -> list[str]:
  stdlib = sysconfig.get_paths()["stdlib"]
  files = []
  for root, dirs, names in os.walk(stdlib):
    dirs[:] = [d for d in dirs if d not in _STDLIB_SKIPPED_DIRS]
    files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
  return sorted(files)


def _is_nonblank_utf8(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return bool(f.read().decode("utf-8").strip())
  except (UnicodeDecodeError, OSError):
    return False


def resolve_files(name: str, source: Any) -> list[str]:
  """The files a source reads, sorted, first max_files of them.

  Globs (comma-separated, `**` recursive) are expanded and unioned. For
  kind='stdlib', the .py files of Python's standard library, minus tests,
  idlelib and encodings; stdlib files that are not UTF-8 or are blank (empty
  `__init__.py`) are left out silently, since a user cannot fix them; they are
  checked lazily so max_files stops the scan early. kind='tfds' has no files
  ([]); kind='prepared' gives every file under its directory.
  """
  check_source(name, source)
  fields = _fields(name, source)
  kind, max_files = fields["kind"], fields["max_files"]
  if kind == "tfds":
    return []
  if kind == "prepared":
    directory = os.path.expanduser(fields["paths"].strip())
    return sorted(os.path.join(root, n) for root, _, names in os.walk(directory) for n in names)
  if kind == "stdlib":
    candidates = (p for p in _stdlib_python_files() if _is_nonblank_utf8(p))
    return list(itertools.islice(candidates, max_files or None))
  files = set()
  for pattern in _patterns(fields["paths"]):
    files.update(_glob_files(pattern))
  return sorted(files)[: max_files or None]


def _undecodable_detail(data: bytes, error: UnicodeDecodeError, base_offset: int = 0, with_line: bool = True) -> str:
  offset = base_offset + error.start
  line_number = data.count(b"\n", 0, error.start) + 1
  line = f" (line {line_number})" if with_line else ""
  return f"bytes are not UTF-8: byte 0x{data[error.start]:02x} at byte offset {offset}{line}: {error.reason}"


def _read_text_file(path: str, bad_data: BadData) -> Iterator[Document]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    bad_data.report("undecodable", path, _undecodable_detail(data, e))
    return
  if not text.strip():
    bad_data.report("empty_file", path, "file is empty" if not data else "file has only whitespace")
    return
  if "\x00" in text:  # Valid UTF-8, but no text file holds NUL: binary data, or UTF-16 text.
    line = text.count("\n", 0, text.index("\x00")) + 1
    bad_data.report(
      "binary",
      path,
      f"a NUL byte at byte offset {data.index(0)} (line {line}): binary data or UTF-16 text, not UTF-8 text",
    )
    return
  yield Document(text=text, messages=None, where=path)


def _shorten(value: str) -> str:
  return value if len(value) <= _MAX_DETAIL_CHARS else value[:_MAX_DETAIL_CHARS] + "..."


def _keys_shown(record: dict) -> str:
  keys = [repr(k) for k in itertools.islice(record, _MAX_KEYS_SHOWN)]
  more = len(record) - len(keys)
  return ", ".join(keys) + (f" and {more} more" if more > 0 else "") if keys else "none"


def _jsonl_records(path: str, bad_data: BadData) -> Iterator[tuple[str, Any]]:
  """Yields (where, parsed value) for each non-blank line; reports the rest."""
  seen_content = False
  offset = 0
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      line_offset, offset = offset, offset + len(raw)
      try:
        # A byte-order mark is an encoding artefact, not content: json rejects it.
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        seen_content = True
        detail = _undecodable_detail(raw, e, line_offset, with_line=False)
        bad_data.report("undecodable", where, detail)
        continue
      if not line.strip():
        continue
      seen_content = True
      try:
        # Without its line break, an unclosed string reads as what it is.
        value = json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        bad_data.report(
          "malformed_json", where, f"not valid JSON: {e.msg} (column {e.colno}): {_shorten(line.strip())}"
        )
        continue
      yield where, value
  if not seen_content:
    bad_data.report("empty_file", path, "file has no JSON lines" if offset else "file is empty")


def _read_jsonl_file(path: str, field: str, bad_data: BadData) -> Iterator[Document]:
  for where, record in _jsonl_records(path, bad_data):
    if not isinstance(record, dict):
      bad_data.report(
        "missing_field", where, f"expected a JSON object with field {field!r}, got a JSON {type(record).__name__}"
      )
      continue
    if field not in record:
      bad_data.report(
        "missing_field", where, f"no field {field!r} (data.sources field); keys present: {_keys_shown(record)}"
      )
      continue
    text = record[field]
    if not isinstance(text, str):
      bad_data.report("wrong_type", where, f"field {field!r} is a JSON {type(text).__name__}, expected a string")
      continue
    if not text.strip():
      bad_data.report("empty_example", where, f"field {field!r} is empty or whitespace")
      continue
    yield Document(text=text, messages=None, where=where)


def _read_chat_file(path: str, bad_data: BadData) -> Iterator[Document]:
  for where, record in _jsonl_records(path, bad_data):
    if not isinstance(record, dict) or "messages" not in record:
      got = (
        f"keys present: {_keys_shown(record)}" if isinstance(record, dict) else f"got a JSON {type(record).__name__}"
      )
      bad_data.report("missing_field", where, f'expected a JSON object with a "messages" list; {got}')
      continue
    messages = record["messages"]
    if not isinstance(messages, list):
      bad_data.report("wrong_type", where, f'"messages" is a JSON {type(messages).__name__}, expected a list')
      continue
    # Roles and contents are checked later, by the chat formatting code.
    yield Document(text=None, messages=messages, where=where)


def _read_parquet_file(name: str, path: str, field: str, bad_data: BadData) -> Iterator[Document]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  if os.path.getsize(path) == 0:
    bad_data.report("empty_file", path, "file is empty")
    return
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    bad_data.report("undecodable", path, f"not a readable Parquet file: {e}")
    return
  columns = parquet.schema_arrow.names
  if field not in columns:
    raise ValueError(
      f"data.sources.{name}.field={field!r}: {path} has no such column; "
      f"columns present: {', '.join(columns) or 'none'}."
    )
  column_type = parquet.schema_arrow.field(field).type
  is_string = (
    pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or pa.types.is_string_view(column_type)
  )
  is_binary = (
    pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type) or pa.types.is_binary_view(column_type)
  )
  if parquet.metadata.num_rows == 0:
    bad_data.report("empty_file", path, "file has no rows")
    return
  row = 0
  # Row group by row group: a Parquet file can be far larger than memory.
  for group in range(parquet.num_row_groups):
    values = parquet.read_row_group(group, columns=[field]).column(0).to_pylist()
    for value in values:
      where = f"{path}:row {row}"
      row += 1
      if value is None:
        bad_data.report("missing_field", where, f"column {field!r} is null")
        continue
      if is_binary:
        try:
          value = value.decode("utf-8")
        except UnicodeDecodeError as e:
          detail = f"column {field!r}: " + _undecodable_detail(value, e)
          bad_data.report("undecodable", where, detail)
          continue
      elif not is_string:
        bad_data.report("wrong_type", where, f"column {field!r} has type {column_type}, expected string")
        continue
      if not value.strip():
        bad_data.report("empty_example", where, f"column {field!r} is empty or whitespace")
        continue
      yield Document(text=value, messages=None, where=where)


def _import_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _tfds_data_dir(fields: dict[str, Any]) -> str | None:
  return os.path.expanduser(fields["data_dir"]) if fields["data_dir"] else None


def _not_prepared_message(name: str, fields: dict[str, Any], detail: str) -> str:
  data_dir = _tfds_data_dir(fields) or "the TFDS default data_dir (~/tensorflow_datasets)"
  dataset = fields["name"]
  return (
    f"data.sources.{name}: TFDS dataset {dataset!r} is not prepared in {data_dir} "
    f"({detail}). Build it first with `tfds build {dataset} --data_dir=DIR`, or write "
    "your own files as a TFDS dataset with tools/make_tfds_dataset.py; then set "
    f"data.sources.{name}.data_dir=DIR."
  )


def _tfds_builder(name: str, fields: dict[str, Any]):
  tfds = _import_tfds()
  try:
    return tfds.builder(fields["name"], data_dir=_tfds_data_dir(fields))
  except tfds.core.registered.DatasetNotFoundError as e:
    first_line = str(e).splitlines()[0] if str(e) else "not found"
    raise ValueError(_not_prepared_message(name, fields, first_line)) from e


def _read_tfds(name: str, fields: dict[str, Any], bad_data: BadData) -> Iterator[Document]:
  tfds = _import_tfds()
  from data.tf_cpu import tf  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(name, fields)
  field, split = fields["field"], fields["split"]
  features = builder.info.features
  if field not in features:
    raise ValueError(
      f"data.sources.{name}.field={field!r}: TFDS dataset {fields['name']!r} "
      f"has no such feature; features: {', '.join(features.keys())}."
    )
  feature = features[field]
  if getattr(feature, "tf_dtype", None) != tf.string or feature.shape != ():
    raise ValueError(f"data.sources.{name}.field={field!r}: TFDS feature {field!r} is {feature!r}, not a text feature.")
  # One file at a time, in order: document N is example N of the split, every run.
  read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
  try:
    # Decode only the text feature: the others (images, metadata) are dropped unread.
    dataset = builder.as_dataset(
      split=split, shuffle_files=False, read_config=read_config, decoders=tfds.decode.PartialDecoding({field: True})
    )
  except AssertionError as e:  # How TFDS says "no data in data_dir".
    raise ValueError(_not_prepared_message(name, fields, "no data found")) from e
  except ValueError as e:  # Unknown split or bad split string.
    splits = ", ".join(builder.info.splits.keys()) or "unknown"
    raise ValueError(f"data.sources.{name}.split={split!r}: {e} (splits: {splits}).") from e
  dataset = dataset.map(lambda example: example[field]).prefetch(tf.data.AUTOTUNE)
  prefix = f"tfds:{fields['name']}/{split}"
  for index, value in enumerate(dataset.as_numpy_iterator()):
    where = f"{prefix}:{index}"
    try:
      text = value.decode("utf-8")
    except UnicodeDecodeError as e:
      bad_data.report("undecodable", where, f"feature {field!r}: " + _undecodable_detail(value, e))
      continue
    if not text.strip():
      bad_data.report("empty_example", where, f"feature {field!r} is empty or whitespace")
      continue
    yield Document(text=text, messages=None, where=where)


def _documents(name: str, fields: dict[str, Any], bad_data: BadData) -> Iterator[Document]:
  kind = fields["kind"]
  if kind == "tfds":
    yield from _read_tfds(name, fields, bad_data)
    return
  for path in resolve_files(name, fields):
    if kind in ("text", "stdlib"):
      yield from _read_text_file(path, bad_data)
    elif kind == "jsonl":
      yield from _read_jsonl_file(path, fields["field"], bad_data)
    elif kind == "chat":
      yield from _read_chat_file(path, bad_data)
    elif kind == "parquet":
      yield from _read_parquet_file(name, path, fields["field"], bad_data)


def read_documents(name: str, source: Any, bad_data: BadData) -> Iterator[Document]:
  """Streams a source's documents in a deterministic order.

  Bad records go to `bad_data.report(reason, where, detail)`, which raises
  BadDataError under the 'stop' policy and counts them under 'skip'. Config
  mistakes (no such Parquet column / TFDS feature, dataset not prepared) raise
  ValueError whatever the policy. Records whose text is empty or whitespace are
  reported as 'empty_example'. Stops after max_documents documents when set.
  """
  check_source(name, source)
  fields = _fields(name, source)
  if fields["kind"] == "prepared":
    raise ValueError(
      f"data.sources.{name}.kind='prepared' holds tokens, not documents; "
      "it is read by the prepared-dataset code, not by read_documents."
    )
  return itertools.islice(_documents(name, fields, bad_data), fields["max_documents"] or None)


def _file_stats(paths: Iterable[str]) -> list[tuple[str, int, int]]:
  stats = []
  for path in paths:
    stat = os.stat(path)
    # The inode change time too: `cp -p`, `rsync -t`, `touch -r` and unpacking an archive set
    # the modification time back, but any write moves ctime, and nothing can set it back.
    stats.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
  return stats


def source_identity(name: str, source: Any) -> str:
  """A short hex hash that changes whenever read_documents could yield otherwise.

  It covers the source's fields (except weight, which does not change the
  documents) and, for file kinds, each file's absolute path, size, inode and
  modification and change times; for tfds, the dataset name, split, data_dir and the
  builder's version (read from metadata, not from the data). Meant as a cache key.
  """
  check_source(name, source)
  fields = _fields(name, source)
  kind = fields["kind"]
  key: dict[str, Any] = {
    "reader_version": _READER_VERSION,
    "source": {k: v for k, v in sorted(fields.items()) if k not in _NOT_IN_IDENTITY},
  }
  if kind == "tfds":
    builder = _tfds_builder(name, fields)
    key["tfds"] = {
      "full_name": builder.info.full_name,
      "version": str(builder.version),
      "data_dir": os.path.abspath(builder.data_dir),
    }
    info_file = os.path.join(builder.data_dir, "dataset_info.json")
    if os.path.isfile(info_file):  # Regenerated in place: same version, new files.
      key["tfds"]["info_mtime_ns"] = os.stat(info_file).st_mtime_ns
  elif kind == "stdlib":
    # Stat every candidate rather than read them all for the UTF-8 check.
    key["files"] = _file_stats(_stdlib_python_files())
  else:
    key["files"] = _file_stats(resolve_files(name, fields))
  encoded = json.dumps(key, sort_keys=True, default=str).encode("utf-8")
  return hashlib.sha256(encoded).hexdigest()[:16]


def write_tfds_dataset(
  name: str,
  version: str,
  source: Any,
  *,
  data_dir: str = "",
  validation_fraction: float = 0.0,
  bad_data: BadData | None = None,
  description: str = "",
) -> WrittenTfdsDataset:
  """Writes a text / JSONL source as a TFDS dataset with one 'text' feature.

  The result is read back by a source `kind='tfds', name=NAME:VERSION,
  data_dir=DATA_DIR`. Documents keep their order. With validation_fraction > 0,
  every Nth document (N = round(1 / validation_fraction), starting with the
  first) goes to a 'validation' split, the rest to 'train'.

  Args:
    name: the TFDS dataset name (lower_snake_case).
    version: 'MAJOR.MINOR.PATCH'; an existing version is never overwritten.
    source: a source dict/ConfigDict of kind 'text' or 'jsonl'.
    data_dir: where to write ('' = the TFDS default, ~/tensorflow_datasets).
    validation_fraction: in [0, 0.5].
    bad_data: receives bad records (default: a 'skip' BadData).
    description: stored in the dataset info.

  Returns:
    The dataset's directory and the number of documents per split.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(
      f"name={name!r}; a TFDS dataset name is lower_snake_case (letters, digits, underscores; starting with a letter)."
    )
  if not re.fullmatch(r"\d+\.\d+\.\d+", version):
    raise ValueError(f"version={version!r}; allowed: 'MAJOR.MINOR.PATCH', e.g. '1.0.0'.")
  if not 0.0 <= validation_fraction <= 0.5:
    raise ValueError(f"validation_fraction={validation_fraction!r}; allowed: 0 to 0.5.")
  check_source("input", source)
  fields = _fields("input", source)
  if fields["kind"] not in TFDS_WRITABLE_KINDS:
    raise ValueError(f"data.sources.input.kind={fields['kind']!r}; allowed here: {', '.join(TFDS_WRITABLE_KINDS)}.")
  bad_data = bad_data or BadData("skip")
  every = round(1.0 / validation_fraction) if validation_fraction > 0 else 0

  # Each split re-reads the source (TFDS consumes the splits one after the other);
  # only the train pass reports to the caller's bad_data, so nothing counts twice.
  class _Split:
    def __init__(self, is_validation: bool, reporter: BadData):
      self.is_validation = is_validation
      self.reporter = reporter

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
      for index, document in enumerate(read_documents("input", fields, self.reporter)):
        in_validation = bool(every) and index % every == 0
        if in_validation == self.is_validation:
          yield index, {"text": document.text}

  splits = {"train": _Split(False, bad_data)}
  if every:
    splits["validation"] = _Split(True, BadData(bad_data.policy, max_logged=0))

  tfds = _import_tfds()
  tfds.disable_progress_bar()
  try:
    builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version=version,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      split_datasets=splits,
      data_dir=os.path.expanduser(data_dir) if data_dir else None,
      description=description or f"Written by write_tfds_dataset from {fields['paths']!r}.",
      # Keep the documents in file order, so a read-back matches the input.
      disable_shuffling=True,
    )
  except RuntimeError as e:
    if "already prepared" not in str(e):
      raise
    raise ValueError(
      f"TFDS dataset {name}:{version} already exists in "
      f"{data_dir or 'the default data_dir'}; choose a new version "
      "or delete the old one."
    ) from e
  except AssertionError as e:  # How TFDS says a split got no examples.
    if "No examples were yielded" not in str(e):
      raise
    raise ValueError(
      f"{e} Source {fields['paths']!r} gave too few usable documents for "
      f"the splits (bad records: {bad_data.summary()}); add documents "
      f"or lower validation_fraction={validation_fraction}."
    ) from e
  num_examples = {split: info.num_examples for split, info in builder.info.splits.items()}
  return WrittenTfdsDataset(directory=str(builder.data_dir), num_examples=num_examples)
