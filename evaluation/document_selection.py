"""Offline data selection before preparation: which documents of a source tools/prepare_data.py keeps.

Two stages, in this order, over each text source's documents as sources.read_documents yields them
(bad records skipped, so indices are those prepare_datasets sees):

1. Deduplication (data/dedup.py): exact, or exact and then MinHash near-duplicates; the first
   document of each cluster in corpus order stays.
2. A reference model's perplexity (a loom run directory or a tools/hf_import.py output, loaded by
   evaluation/loading.py): each surviving document is tokenized with the model's tokenizer by the
   same batched `encode_batch` call the preparation uses, followed by EOS as packing appends it
   (data/packing.py), and scored as training scores a document: its first token is context only and
   every later token (EOS included) is predicted once. A document longer than the model's context is
   scored in windows of max_seq_len targets, each after as many preceding tokens as fit (lm_eval's
   rolling log-likelihood, evaluation/scoring.py). Its loss is the mean nats per scored token; its
   perplexity exp(loss). `max_perplexity` keeps documents at or under the bound; `keep_fraction`
   keeps the ceil(fraction * n) lowest-loss documents of the n scored, ties going to the earlier
   document. A document with no scored token (one token under a tokenizer without EOS) is kept by
   both rules and counts in neither n nor the removals: nothing says it is bad.

The model's tokenizer need not be the preparation's (a perplexity is only defined in the model's
own vocabulary); both identities go in the record, which prepare_datasets stores in meta.json.
"""

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from data import dedup as dedup_lib
from data import sources as sources_lib
from data.bad_data import BadData
from data.datasets import DocumentSelection

_SCORE_BATCH_DOCUMENTS = 256  # Documents tokenized and scored per call (as source_rows tokenizes them).


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
  """What tools/prepare_data.py's flags ask for; each field is named as its flag. A minhash_* field
  left None takes data.dedup.MinHashSettings's default; given with dedup != 'minhash' it is an error,
  as are filter_* values without filter_checkpoint."""

  dedup: str = "none"
  minhash_threshold: float | None = None
  minhash_num_perm: int | None = None
  minhash_bands: int | None = None
  minhash_ngram: int | None = None
  minhash_shingle: str | None = None
  minhash_seed: int | None = None
  filter_checkpoint: str = ""
  filter_keep_fraction: float | None = None
  filter_max_perplexity: float | None = None

  @property
  def active(self) -> bool:
    return self.dedup != "none" or bool(self.filter_checkpoint)

  def minhash_settings(self) -> dedup_lib.MinHashSettings:
    given = {
      field: getattr(self, f"minhash_{field}")
      for field in ("threshold", "num_perm", "bands", "ngram", "shingle", "seed")
      if getattr(self, f"minhash_{field}") is not None
    }
    return dedup_lib.MinHashSettings(**given)

  def check(self) -> None:
    """ValueError naming the flag, its value, what is wrong and what is allowed. Cheap: no file read."""
    if self.dedup not in dedup_lib.DEDUP_MODES:
      raise ValueError(f"--dedup={self.dedup!r}: must be one of {', '.join(dedup_lib.DEDUP_MODES)}")
    minhash_given = [
      f.name for f in dataclasses.fields(self) if f.name.startswith("minhash_") and getattr(self, f.name) is not None
    ]
    if minhash_given and self.dedup != "minhash":
      name = minhash_given[0]
      raise ValueError(
        f"--{name}={getattr(self, name)!r}: applies to --dedup=minhash only, and --dedup={self.dedup}; "
        "pass --dedup=minhash or leave it out"
      )
    if self.dedup == "minhash":
      self.minhash_settings().check(prefix="--minhash_")
    fraction, bound = self.filter_keep_fraction, self.filter_max_perplexity
    if not self.filter_checkpoint:
      for name, value in (("filter_keep_fraction", fraction), ("filter_max_perplexity", bound)):
        if value is not None:
          raise ValueError(f"--{name}={value!r}: needs --filter_checkpoint, the reference model to score with")
      return
    if (fraction is None) == (bound is None):
      raise ValueError(
        f"--filter_checkpoint={self.filter_checkpoint}: give exactly one of --filter_keep_fraction "
        f"(the lowest-perplexity share to keep) and --filter_max_perplexity (got {'both' if bound else 'neither'})"
      )
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
      raise ValueError(f"--filter_keep_fraction={fraction!r}: must be in (0, 1], the share of documents to keep")
    if bound is not None and not (isinstance(bound, (int, float)) and 1.0 <= bound < math.inf):
      raise ValueError(f"--filter_max_perplexity={bound!r}: must be a finite number >= 1 (a perplexity is at least 1)")


@dataclasses.dataclass(frozen=True)
class DocumentScores:
  loss: np.ndarray  # [N] float64: mean nats per scored token; nan where none was scored.
  tokens: np.ndarray  # [N] int64: tokens scored.

  @property
  def perplexity(self) -> np.ndarray:
    return np.exp(self.loss)


def scoring_requests(ids: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) requests that score every token of `ids` but the first, each once, in
  windows of up to max_len targets after as many preceding tokens as fit."""
  ids = list(ids)
  requests = []
  for start in range(1, len(ids), max_len):
    window = ids[start : start + max_len]
    context = ids[max(start - (max_len + 1 - len(window)), 0) : start]
    requests.append((context, window))
  return requests


def score_documents(model, texts: Iterable[str], batch_size: int | None = None) -> DocumentScores:
  """Each text's mean loss per token under a loaded model (evaluation.loading.load_model)."""
  from evaluation.scoring import Scorer  # Imports JAX's step code: only when a model scores.

  scorer = Scorer(model, batch_size=batch_size)
  tokenizer = model.tokenizer
  eos = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
  losses, counts = [], []
  iterator = iter(texts)
  while batch := list(itertools.islice(iterator, _SCORE_BATCH_DOCUMENTS)):
    requests, owners = [], []
    for i, ids in enumerate(tokenizer.encode_batch(batch)):
      for request in scoring_requests(list(ids) + eos, scorer.max_len):
        requests.append(request)
        owners.append(i)
    logprob, tokens = np.zeros(len(batch)), np.zeros(len(batch), np.int64)
    for i, score in zip(owners, scorer.score(requests)):
      logprob[i] += score.logprob
      tokens[i] += score.tokens
    with np.errstate(invalid="ignore", divide="ignore"):
      losses.append(np.where(tokens > 0, -logprob / np.maximum(tokens, 1), np.nan))
    counts.append(tokens)
  if not losses:
    return DocumentScores(np.zeros(0), np.zeros(0, np.int64))
  return DocumentScores(np.concatenate(losses), np.concatenate(counts))


def keep_by_perplexity(
  scores: DocumentScores, *, max_perplexity: float | None = None, keep_fraction: float | None = None
) -> np.ndarray:
  """[N] bool: the documents to keep (module docstring: the rules, the tie rule, unscored ones)."""
  if (max_perplexity is None) == (keep_fraction is None):
    raise ValueError("keep_by_perplexity: give exactly one of max_perplexity and keep_fraction")
  scored = ~np.isnan(scores.loss)
  if max_perplexity is not None:
    # On the loss, not exp(loss), which overflows for gibberish under a confident model.
    return ~scored | (scores.loss <= math.log(max_perplexity))
  indices = np.flatnonzero(scored)
  order = indices[np.argsort(scores.loss[indices], kind="stable")]  # Stable: ties keep corpus order.
  keep = ~scored
  keep[order[: math.ceil(keep_fraction * len(indices))]] = True
  return keep


def _texts(name: str, source, bad_data_policy: str, keep: np.ndarray | None = None) -> Iterable[str]:
  """The source's document texts in read order (those `keep` marks, when given)."""
  documents = sources_lib.read_documents(name, source, BadData(bad_data_policy, max_logged=0))
  if keep is None:
    return (document.text for document in documents)
  return (document.text for document, kept in zip(documents, keep) if kept)


def refuse_chat_sources(data_config, names: Sequence[str]) -> None:
  """ValueError for a chat source among `names`: it has no document text to compare or score."""
  for name in names:
    if data_config.sources[name].kind == "chat":
      raise ValueError(
        f"data.sources.{name} is a chat source: deduplication and perplexity filtering apply to text "
        "sources; prepare it without them (--sources names the others)"
      )


def select_documents(data_config, names: Sequence[str], options: SelectionOptions, model=None) -> dict:
  """Source name -> DocumentSelection for every named text source; `model`: the loaded reference
  model when options.filter_checkpoint is set. Reads each source once per stage."""
  refuse_chat_sources(data_config, names)
  selections = {}
  for name in names:
    source = data_config.sources[name]
    record: dict = {"removed": {}}
    if options.dedup != "none":
      settings = options.minhash_settings()
      result = dedup_lib.deduplicate(_texts(name, source, data_config.bad_data), options.dedup, settings)
      keep = result.keep
      record["dedup"] = {"mode": options.dedup, "normalization": "NFC, whitespace runs as one space, stripped"}
      record["removed"]["exact_duplicate"] = result.exact_duplicates
      if options.dedup == "minhash":
        bands, rows = settings.bands_and_rows
        record["dedup"]["minhash"] = dict(dataclasses.asdict(settings), bands=bands, rows=rows)
        record["removed"]["near_duplicate"] = result.near_duplicates
    else:
      keep = np.ones(sum(1 for _ in _texts(name, source, data_config.bad_data)), bool)
    if options.filter_checkpoint:
      survivors = np.flatnonzero(keep)
      scores = score_documents(model, _texts(name, source, data_config.bad_data, keep))
      kept = keep_by_perplexity(
        scores, max_perplexity=options.filter_max_perplexity, keep_fraction=options.filter_keep_fraction
      )
      keep = keep.copy()
      keep[survivors[~kept]] = False
      scored = scores.loss[~np.isnan(scores.loss)]
      record["perplexity"] = {
        "checkpoint": options.filter_checkpoint,
        "step": model.info.step,
        "tokenizer": model.tokenizer.identity(),
        "keep_fraction": options.filter_keep_fraction,
        "max_perplexity": options.filter_max_perplexity,
        "scored_documents": int(len(scored)),
        "median_perplexity": float(np.exp(np.median(scored))) if len(scored) else None,
        "highest_kept_perplexity": float(np.exp(scores.loss[kept & ~np.isnan(scores.loss)].max()))
        if (kept & ~np.isnan(scores.loss)).any()
        else None,
      }
      record["removed"]["perplexity"] = int((~kept).sum())
    record.update(documents=int(len(keep)), kept=int(keep.sum()))
    logging.info(
      "data.sources.%s: keeping %d of %d documents (removed: %s)", name, keep.sum(), len(keep), record["removed"]
    )
    selections[name] = DocumentSelection(keep=keep, record=record)
  return selections
