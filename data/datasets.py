"""build_datasets: data config -> tokenizer, each source's packed rows, batch iterators."""

import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from data import augment as augment_lib
from data import packing, pipeline, row_cache, source_rows
from data import sources as sources_lib
from data.bad_data import BadData, BadDataError
from data.files import atomic_copy
from data.prepared import NothingToWrite, PreparedRows, write_prepared
from data.tokenizers import CharTokenizer, NoTextError, Tokenizer, build_tokenizer


@dataclasses.dataclass(frozen=True)
class DocumentSelection:
  """Which documents of a source prepare_datasets keeps (deduplication, a reference model's perplexity:
  tools/prepare_data.py chooses them), and the record of why, stored in meta.json's metadata."""

  keep: np.ndarray  # [N] bool: one per document sources.read_documents yields, in its order.
  record: dict  # JSON-serialisable: the settings and the documents removed per reason.


@dataclasses.dataclass(frozen=True)
class SourceData:
  """One named source of the mixture: its rows and weight."""

  name: str
  weight: float
  train: pipeline.RowStore
  validation: pipeline.RowStore
  num_train_tokens: int
  rows_id: str = ""  # Changes whenever the rows would: files, tokenizer, packing settings.


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Everything the trainer needs from the data side."""

  tokenizer: Tokenizer
  sources: tuple[SourceData, ...]
  bad_data_counts: dict[str, int]
  global_batch_size: int  # Of evaluation batches, and of training batches unless train_batch_size is set.
  seed: int
  shuffle: bool
  windows: str
  process_index: int = 0
  process_count: int = 1
  augment: augment_lib.Augmentation | None = None  # data.augment on training batches; None: off.
  train_batch_size: int | None = None  # Rows of a training batch (online selection's candidates); None: global.

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(source.name for source in self.sources)

  @property
  def weights(self) -> tuple[float, ...]:
    return tuple(source.weight for source in self.sources)

  @property
  def rows_ids(self) -> dict[str, str]:
    """Source name -> an id of its rows: a checkpoint keeps them to tell whether resumed data differ."""
    return {source.name: source.rows_id for source in self.sources}

  def train_batches(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[pipeline.Batch]:
    """This process's slices of the global batches start_step..stop_step-1 (endless if None)."""
    return pipeline.train_batches(
      [source.train for source in self.sources],
      weights=self.weights,
      global_batch_size=self.train_batch_size or self.global_batch_size,
      seed=self.seed,
      shuffle=self.shuffle,
      windows=self.windows,
      start_step=start_step,
      stop_step=stop_step,
      process_index=self.process_index,
      process_count=self.process_count,
      augment=self.augment,
    )

  def eval_batches(self, name: str, max_batches: int | None = None) -> Iterator[pipeline.Batch]:
    """A fresh pass over source `name`'s validation rows each call."""
    source = self.sources[self.names.index(name)]
    return pipeline.eval_batches(
      source.validation,
      global_batch_size=self.global_batch_size,
      max_batches=max_batches,
      process_index=self.process_index,
      process_count=self.process_count,
    )


def build_datasets(
  data_config,
  *,
  global_batch_size: int,
  seed: int,
  workdir: str,
  process_index: int = 0,
  process_count: int = 1,
  train_batch_size: int | None = None,
) -> Datasets:
  """Reads, tokenizes and packs every source (or loads it from the cache / a prepared dataset).
  `train_batch_size`: rows of a training batch when not global_batch_size (a candidate batch)."""
  named_sources = list(data_config.sources.items())
  for name, source in named_sources:
    sources_lib.check_source(name, source)
  bad_data = BadData(data_config.bad_data)
  tokenizer = _tokenizer(data_config, named_sources, workdir)

  built = []
  for name, source in named_sources:
    start = time.perf_counter()
    if source.kind == "prepared":
      train, validation, info = _open_prepared(name, source, tokenizer, data_config)
    else:
      train, validation, info = _rows_on_the_fly(name, source, tokenizer, data_config, workdir)
    bad_data.merge(info.get("bad_data", {}))
    logging.info(
      "data.sources.%s: %d train rows (%d tokens), %d validation rows of seq_len %d in %.2fs",
      name,
      train.num_rows,
      info["num_train_tokens"],
      validation.num_rows,
      train.seq_len,
      time.perf_counter() - start,
    )
    built.append(
      SourceData(
        name=name,
        weight=float(source.weight),
        train=train,
        validation=validation,
        num_train_tokens=info["num_train_tokens"],
        rows_id=info["rows_id"],
      )
    )
  if bad_data.counts:
    logging.warning("bad data skipped: %s", bad_data.summary())
  # Fail now, not at the first training step, if a batch cannot be filled.
  if len(built) == 1:
    pipeline.check_fills_a_batch(built[0].train, train_batch_size or global_batch_size, built[0].name)
  for source in built:
    if source.weight > 0:
      pipeline.check_fills_a_batch(source.train, 1, source.name)
    if source.validation.num_rows == 0:  # Else every evaluation would average nothing and log 0.
      raise ValueError(
        f"data.sources.{source.name}: the validation split holds no row of data.seq_len="
        f"{source.train.seq_len} tokens (data.validation_fraction={data_config.validation_fraction} "
        f"of {source.num_train_tokens:,} training tokens); raise data.validation_fraction or add data."
      )
  return Datasets(
    tokenizer=tokenizer,
    sources=tuple(built),
    bad_data_counts=dict(bad_data.counts),
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=data_config.shuffle,
    windows=data_config.windows,
    process_index=process_index,
    process_count=process_count,
    augment=augment_lib.from_config(data_config.get("augment"), tokenizer),
    train_batch_size=train_batch_size,
  )


# The files a prepared dataset keeps its tokenizer in, by data.tokenizer.
_TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json", "char": "char_vocab.json"}


def _tokenizer(data_config, named_sources, workdir: str, selections=None) -> Tokenizer:
  """The configured tokenizer; a prepared dataset's own one when none is named. A learned one is
  learned from the documents `selections` (name -> DocumentSelection) keep, where given."""
  prepared = [(name, source) for name, source in named_sources if source.kind == "prepared"]
  stored = prepared and _TOKENIZER_FILES.get(data_config.tokenizer)
  if stored and not data_config.get("tokenizer_path"):
    name, source = prepared[0]
    path = os.path.join(source.paths, stored)
    logging.info("using the tokenizer of data.sources.%s: %s", name, path)
    if data_config.tokenizer == "char":
      return CharTokenizer.load(path)
    data_config = ml_collections.ConfigDict(data_config.to_dict())
    data_config.tokenizer_path = path

  stopped = []  # Under 'stop': the bad record, which sentencepiece would wrap in its own error.

  def corpus_texts() -> Iterator[str]:
    # The real pass counts bad records; under 'stop' the first one ends the run here, before
    # a tokenizer is trained without it and cached in the workdir.
    quiet = BadData(data_config.bad_data, max_logged=0)
    try:
      yield from itertools.chain.from_iterable(
        source_rows.document_texts(name, source, quiet, _keep_of(selections, name))
        for name, source in named_sources
        if source.kind != "prepared"
      )
    except BadDataError as e:
      stopped.append(e)
      raise

  try:
    return build_tokenizer(data_config, corpus_texts, workdir)
  except NoTextError:
    names = ", ".join(f"data.sources.{name}" for name, source in named_sources if source.kind != "prepared")
    raise ValueError(
      f"{names}: no text to train the {data_config.tokenizer} tokenizer on (every document "
      "is empty or was skipped as bad data)"
    ) from None
  except ValueError:
    if stopped:
      raise stopped[0] from None
    raise


def _copy_tokenizer(tokenizer: Tokenizer, data_config, directory: str) -> None:
  """Stores the tokenizer beside prepared rows, so the directory is all a run needs."""
  stored = _TOKENIZER_FILES.get(data_config.tokenizer)
  if isinstance(tokenizer, CharTokenizer):
    tokenizer.save(os.path.join(directory, stored))
  elif stored:
    source = getattr(tokenizer, "model_path", None) or getattr(tokenizer, "path", None)
    atomic_copy(source, os.path.join(directory, stored))
    config_file = os.path.join(os.path.dirname(source), "tokenizer_config.json")
    if data_config.tokenizer == "huggingface" and os.path.exists(config_file):  # Its bos/eos/pad.
      atomic_copy(config_file, os.path.join(directory, "tokenizer_config.json"))


def _open_prepared(name: str, source, tokenizer: Tokenizer, data_config):
  try:  # Also checks meta.json and that every shard of both splits is there.
    train = PreparedRows(source.paths, "train")
    validation = PreparedRows(source.paths, "validation")
  except ValueError as e:
    raise ValueError(f"data.sources.{name}: {e}") from None
  meta = train.metadata.get("metadata", {})
  if meta.get("tokenizer") != tokenizer.identity():
    raise ValueError(
      f"data.sources.{name}: {source.paths} was prepared with another tokenizer "
      f"({meta.get('tokenizer')}) than this run's ({tokenizer.identity()}); leave "
      "data.tokenizer_path empty to use the one stored with it, or prepare it again."
    )
  # The rows are cut and rendered already: the run's settings for that must be the prepared ones,
  # or config.json, tokens/s and the model's context would describe data it does not train on.
  prepared = {"seq_len": train.seq_len}
  if meta.get("source", {}).get("kind", "chat") == "chat":  # Chat settings matter to chat rows only.
    prepared.update({key: meta[key] for key in ("chat_template", "chat_loss_on") if key in meta})
  mismatches = [(key, value) for key, value in prepared.items() if data_config.get(key) != value]
  if mismatches:
    raise ValueError(
      f"data.sources.{name}: {source.paths} was prepared with "
      + ", ".join(f"data.{key}={value!r}" for key, value in mismatches)
      + " but this run has "
      + ", ".join(f"data.{key}={data_config.get(key)!r}" for key, _ in mismatches)
      + "; set "
      + " ".join(f"--config.data.{key}={value}" for key, value in mismatches)
      + ", or prepare it again with this run's settings (tools/prepare_data.py)."
    )
  rows_id = hashlib.sha256(json.dumps(train.metadata, sort_keys=True).encode("utf-8")).hexdigest()[:24]
  return (
    train,
    validation,
    {"num_train_tokens": train.num_tokens, "bad_data": meta.get("bad_data", {}), "rows_id": rows_id},
  )


def _rows_on_the_fly(name: str, source, tokenizer: Tokenizer, data_config, workdir: str):
  key = row_cache.cache_key(
    source=sources_lib.source_identity(name, source),
    tokenizer=tokenizer.identity(),
    seq_len=data_config.seq_len,
    validation_fraction=data_config.validation_fraction,
    chat_template=data_config.chat_template,
    chat_loss_on=data_config.chat_loss_on,
  )
  path = row_cache.cache_path(workdir, key)
  cached = row_cache.load(path)
  if cached is not None:
    logging.info("data.sources.%s: packed rows from the cache %s", name, path)
    train, validation, info = cached
    return train, validation, {**info, "rows_id": info.get("rows_id") or _rows_digest(train, validation)}
  bad_data = BadData(data_config.bad_data)
  chunks = list(source_rows.packed_chunks(name, source, tokenizer, data_config, bad_data))
  if not chunks:
    raise ValueError(f"data.sources.{name}: no usable documents ({bad_data.summary()}).")
  train = packing.concatenate_rows([train for train, _, _ in chunks])
  validation = packing.concatenate_rows([val for _, val, _ in chunks])
  info = {
    "num_train_tokens": sum(tokens for _, _, tokens in chunks),
    "bad_data": dict(bad_data.counts),
    "rows_id": _rows_digest(train, validation),
  }
  row_cache.save(path, train, validation, info)
  return train, validation, info


def _rows_digest(*splits: packing.PackedRows) -> str:
  """A hash of the rows' contents: equal whenever the same rows were built again."""
  digest = hashlib.sha256()
  for rows in splits:
    for array in (rows.tokens, rows.segment_ids, rows.full_loss_mask()):
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:24]


def prepare_datasets(
  data_config,
  output_dir: str,
  *,
  names: list[str] | None = None,
  chunk_tokens: int = 16_000_000,
  rows_per_shard: int = 8192,
  overwrite: bool = False,
  loom_version: str = "",
  selections: dict[str, DocumentSelection] | None = None,
) -> dict[str, dict]:
  """Tokenizes and packs sources once into OUTPUT/NAME/ (ArrayRecord shards, data/prepared.py).

  Memory stays bounded by `chunk_tokens` (plus the validation rows, a
  validation_fraction of the data, held until the train split is written).
  The tokenizer travels with the data (NAME/tokenizer.model, tokenizer.json or
  char_vocab.json), so a kind='prepared' source needs nothing else. Returns each source's meta.

  `selections`: source name -> DocumentSelection; such a source keeps only those documents (text
  sources only: a chat conversation has no document text to compare), and its meta.json's metadata
  gets the selection's record as "document_selection".
  """
  named_sources = [(name, source) for name, source in data_config.sources.items() if names is None or name in names]
  unknown = sorted(set(names or ()) - set(data_config.sources.keys()))
  if unknown:
    raise ValueError(f"no data.sources named {unknown}; there are {', '.join(data_config.sources.keys())}")
  for name, source in named_sources:
    sources_lib.check_source(name, source)
    if source.kind == "prepared":
      raise ValueError(f"data.sources.{name} is already prepared ({source.paths}).")
  selections = selections or {}
  for name in selections:
    kind = data_config.sources[name].kind if name in data_config.sources else None
    if name not in dict(named_sources) or kind == "chat":
      raise ValueError(
        f"a document selection for data.sources.{name}, "
        + ("a chat source: selections apply to text sources" if kind == "chat" else "which is not being prepared")
      )
  tokenizer = _tokenizer(data_config, named_sources, output_dir, selections)
  metas = {}
  for name, source in named_sources:
    start = time.perf_counter()
    bad_data = BadData(data_config.bad_data)
    validation_chunks = []

    def train_chunks(chunks, validation_chunks, bad_data, metadata):
      for train, validation, _ in chunks:
        validation_chunks.append(validation)
        yield train
      # write_prepared writes meta.json after every shard, so the counts still go in it.
      metadata["bad_data"] = dict(bad_data.counts)

    directory = os.path.join(output_dir, name)
    metadata = {
      "tokenizer": tokenizer.identity(),
      "source": source.to_dict(),
      "seq_len": data_config.seq_len,
      "validation_fraction": data_config.validation_fraction,
      "chat_template": data_config.chat_template,
      "chat_loss_on": data_config.chat_loss_on,
      "loom_version": loom_version,
      "bad_data": {},
    }
    if name in selections:
      metadata["document_selection"] = selections[name].record
    try:
      meta = write_prepared(
        directory,
        {
          "train": train_chunks(
            source_rows.packed_chunks(
              name, source, tokenizer, data_config, bad_data, chunk_tokens=chunk_tokens, keep=_keep_of(selections, name)
            ),
            validation_chunks,
            bad_data,
            metadata,
          ),
          "validation": iter(validation_chunks),
        },
        metadata=metadata,
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
      )
    except NothingToWrite:
      raise ValueError(f"data.sources.{name}: no usable documents ({bad_data.summary()}).") from None
    _copy_tokenizer(tokenizer, data_config, directory)
    logging.info(
      "prepared data.sources.%s into %s in %.1fs: %s",
      name,
      directory,
      time.perf_counter() - start,
      {s: v["num_rows"] for s, v in meta["splits"].items()},
    )
    metas[name] = meta
  return metas


def _keep_of(selections, name: str) -> np.ndarray | None:
  """The keep mask of source `name`'s DocumentSelection, or None (every document)."""
  selection = (selections or {}).get(name)
  return None if selection is None else selection.keep
