"""Held-out metrics of a checkpoint on its data sources: what training's EvalHook reports, on any split.

`heldout_datasets` builds the sources' rows with the run's tokenizer (never training a new one) and
`evaluate_heldout` runs make_eval_step over them, pooling the sums per source and over all of them.
"""

import os
import shutil
import tempfile
from typing import Any

import data
import sharding
from configs import base
from data import pipeline
from data.files import writable_directory
from evaluation import loading
from evaluation.metrics import add_totals, summarize
from training.step import make_eval_step

SPLITS = ("validation", "train")
_KINDS_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def select_sources(info: loading.CheckpointInfo, sources: str = "", data_paths: str = "") -> None:
  """Narrows info.config's data sources to the comma-separated names in `sources`, or replaces them
  by one source "data" of the comma-separated globs `data_paths` (text, .jsonl or .parquet files)."""
  data_cfg = info.config.data
  if data_paths:
    extension = os.path.splitext(data_paths.split(",")[0])[1].lower()
    data_cfg.sources = {"data": base.source(kind=_KINDS_BY_EXTENSION.get(extension, "text"), paths=data_paths)}
  if sources:
    names = [n.strip() for n in sources.split(",") if n.strip()]
    unknown = [n for n in names if n not in data_cfg.sources]
    if unknown:
      raise ValueError(f"--sources: no source {', '.join(unknown)}; the config has {', '.join(data_cfg.sources)}")
    data_cfg.sources = {n: data_cfg.sources[n] for n in names}
  for source in data_cfg.sources.values():
    source.weight = 1.0  # Every named source is evaluated, whatever its share of training was.


def heldout_datasets(info: loading.CheckpointInfo, batch_size: int) -> data.Datasets:
  """The sources' rows, built (or read from the run's row cache) with the run's tokenizer."""
  data_cfg = info.config.data
  path = loading.tokenizer_path(info)  # Raises before any data is read when the tokenizer is missing.
  if data_cfg.tokenizer in ("sentencepiece", "huggingface"):
    data_cfg.tokenizer_path = path
  workdir = info.workdir
  try:
    writable_directory(workdir)
  except OSError:  # A read-only run: rows are built in a scratch directory, the char vocabulary copied in.
    workdir = tempfile.mkdtemp(prefix="loom-evaluate-")
    if data_cfg.tokenizer == "char":
      os.makedirs(os.path.join(workdir, "tokenizer"))
      shutil.copy(path, os.path.join(workdir, "tokenizer", "char_vocab.json"))
  return data.build_datasets(data_cfg, global_batch_size=batch_size, seed=info.config.seed, workdir=workdir)


def evaluate_heldout(
  model: loading.LoadedModel, datasets: data.Datasets, split: str = "validation", max_batches: int = 0
) -> dict[str, Any]:
  """{"all": metrics, "sources": {name: metrics}}, metrics {"loss", "perplexity", "bits_per_byte",
  "accuracy", "tokens", "bytes"}, pooled over target tokens (bytes for bits per byte)."""
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {', '.join(SPLITS)}")
  step = make_eval_step(model.graphdef, model.mesh, model.param_shardings, byte_lengths=model.byte_lengths)
  per_source, pooled = {}, {}
  for source in datasets.sources:
    rows = source.validation if split == "validation" else source.train
    totals: dict[str, float] = {}
    for local in pipeline.eval_batches(
      rows, global_batch_size=datasets.global_batch_size, max_batches=max_batches or None
    ):
      local.pop("source_counts", None)
      sums = step(model.params, sharding.global_batch_from_local(local, model.mesh))
      totals = add_totals(totals, {key: float(value) for key, value in sums.items()})
    per_source[source.name] = dict(summarize(totals), tokens=totals.get("tokens", 0.0), bytes=totals.get("bytes", 0.0))
    pooled = add_totals(pooled, totals)
  return {
    "all": dict(summarize(pooled), tokens=pooled.get("tokens", 0.0), bytes=pooled.get("bytes", 0.0)),
    "sources": per_source,
  }
