"""build_datasets: config -> tokenizer, packed rows and batch iterators."""
import dataclasses
import functools
import time
from typing import Callable, Iterator

from absl import logging

from data import corpus
from data import packing
from data import pipeline
from data import row_cache
from data.tokenizers import build_tokenizer
from data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Everything the trainer needs from the data side."""
  tokenizer: Tokenizer
  train_rows: packing.PackedRows
  val_rows: packing.PackedRows
  num_train_tokens: int
  _train_batches: Callable[..., Iterator[pipeline.Batch]]
  _eval_batches: Callable[..., Iterator[pipeline.Batch]]

  def train_batches(self, start_step: int = 0,
                    stop_step: int | None = None) -> Iterator[pipeline.Batch]:
    return self._train_batches(start_step=start_step, stop_step=stop_step)

  def eval_batches(self, max_batches: int | None = None
                   ) -> Iterator[pipeline.Batch]:
    """A fresh pass over the validation rows each call."""
    return self._eval_batches(max_batches=max_batches)


def build_datasets(data_config, *, global_batch_size: int, seed: int,
                   workdir: str, process_index: int = 0,
                   process_count: int = 1) -> Datasets:
  """Resolves, tokenizes and packs the corpus (or loads it from the cache)."""
  paths = corpus.resolve_paths(data_config.get('paths', ''),
                               data_config.get('max_files', 0))
  tokenizer = build_tokenizer(data_config, paths, workdir)
  seq_len = data_config.seq_len
  validation_fraction = data_config.validation_fraction
  key = row_cache.fingerprint(paths, tokenizer_identity=tokenizer.identity(),
                              seq_len=seq_len,
                              validation_fraction=validation_fraction)
  path = row_cache.cache_path(workdir, key)

  start = time.perf_counter()
  cached = row_cache.load(path)
  if cached is not None:
    train_rows, val_rows, num_train_tokens = cached
    logging.info('Loaded packed data from %s in %.2fs', path,
                 time.perf_counter() - start)
  else:
    documents = corpus.read_documents(paths, tokenizer)
    stream = packing.concatenate_documents(documents, tokenizer.eos_id)
    train_stream, val_stream = packing.split_by_position(
        stream, validation_fraction)
    train_rows = packing.pack_rows(train_stream, seq_len)
    val_rows = packing.pack_rows(val_stream, seq_len)
    num_train_tokens = len(train_stream.tokens)
    row_cache.save(path, train_rows, val_rows, num_train_tokens)
    logging.info('Tokenized %d files (%d tokens) and packed them in %.2fs; '
                 'cached to %s', len(paths), len(stream.tokens),
                 time.perf_counter() - start, path)
  logging.info('Data: %d files, vocab %d, %d train tokens -> %d train rows, '
               '%d val rows of seq_len %d', len(paths), tokenizer.vocab_size,
               num_train_tokens, train_rows.num_rows, val_rows.num_rows,
               seq_len)

  batch_args = dict(global_batch_size=global_batch_size,
                    process_index=process_index, process_count=process_count)
  # Fail now, not at the first training step, if a batch cannot be filled.
  pipeline.check_fills_a_batch(train_rows, global_batch_size)
  return Datasets(
      tokenizer=tokenizer, train_rows=train_rows, val_rows=val_rows,
      num_train_tokens=num_train_tokens,
      _train_batches=functools.partial(
          pipeline.train_batches, train_rows, seed=seed,
          shuffle=data_config.get('shuffle', True),
          windows=data_config.get('windows', 'shifted'), **batch_args),
      _eval_batches=functools.partial(
          pipeline.eval_batches, val_rows, **batch_args))
