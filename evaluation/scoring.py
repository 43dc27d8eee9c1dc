"""Per-row log-likelihood of continuations with the jitted eval step, and greedy generation.

A request is (context ids, continuation ids). Each becomes one row: context + continuation, cut from
the left to the model's length, with weight 1 on the continuation's targets, so the per-row eval step
(training/step.py's make_eval_step, the one training evaluates with) gives its summed loss (minus the
log-likelihood), its target count, how many targets are the argmax (all of them: the continuation
is the greedy one) and its bytes. Rows are padded to the smallest of a few fixed lengths (powers of
two up to the model's) and batches to one fixed number of rows: at most a handful of compiles.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

import sharding
from evaluation.loading import LoadedModel
from training.step import make_eval_step

MIN_LENGTH = 32  # The shortest padded row.


@dataclasses.dataclass(frozen=True)
class Score:
  logprob: float  # Summed natural log-probability of the scored continuation tokens.
  is_greedy: bool  # Every scored token is the model's argmax.
  tokens: int  # Continuation tokens scored (fewer than given when the row was cut or has no context).
  bytes: float  # Their UTF-8 bytes.


def bucket_lengths(max_len: int, min_length: int = MIN_LENGTH) -> list[int]:
  """min_length, 2 * min_length, ... up to max_len, and max_len itself."""
  lengths, length = [], min(min_length, max_len)
  while length < max_len:
    lengths.append(length)
    length *= 2
  return lengths + [max_len]


class Scorer:
  """Scores (context, continuation) token requests on a loaded model, `batch_size` rows at a time.

  `prefix_id` is put before an empty context (lm_eval's convention: bos, else eos); with none, the
  first token of such a continuation cannot be scored and is left out.
  """

  def __init__(self, model: LoadedModel, batch_size: int | None = None, max_len: int | None = None):
    self.model = model
    config = model.config
    self.max_len = min(max_len or config.model.max_seq_len, config.model.max_seq_len)
    self.batch_size = batch_size or config.train.global_batch_size
    self.lengths = bucket_lengths(self.max_len)
    tokenizer = model.tokenizer
    self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    self._step = make_eval_step(
      model.graphdef, model.mesh, model.param_shardings, per_row=True, byte_lengths=model.byte_lengths
    )

  def _row(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
    """(tokens, number of scored targets at its end) of one request."""
    context, continuation = list(context), list(continuation)
    if not context and self.prefix_id is not None:
      context = [self.prefix_id]
    tokens = (context + continuation)[-(self.max_len + 1) :]
    return tokens, min(len(continuation), len(tokens) - 1)

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Score]:
    """One Score per request, in order."""
    rows = [self._row(context, continuation) for context, continuation in requests]
    # Longest first, so each batch's rows are of similar length and pad to the same bucket.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores: list[Score | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      sums = self._run([rows[i] for i in chunk])
      for j, i in enumerate(chunk):
        tokens = int(round(sums["tokens"][j]))
        scores[i] = Score(
          logprob=-float(sums["loss"][j]),
          is_greedy=bool(sums["correct"][j] == sums["tokens"][j]),
          tokens=tokens,
          bytes=float(sums["bytes"][j]),
        )
    return scores

  def _run(self, rows: list[tuple[list[int], int]]) -> dict[str, np.ndarray]:
    longest = max(len(tokens) - 1 for tokens, _ in rows)
    length = next(n for n in self.lengths if n >= longest)
    shape = (self.batch_size, length)
    batch = {name: np.zeros(shape, np.int32) for name in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = np.zeros(shape, np.float32)
    for b, (tokens, scored) in enumerate(rows):
      n = len(tokens) - 1
      batch["inputs"][b, :n] = tokens[:-1]
      batch["targets"][b, :n] = tokens[1:]
      batch["segment_ids"][b, :n] = 1  # Padding is segment 0, which no real token attends to.
      batch["positions"][b, :n] = np.arange(n)
      batch["weights"][b, n - scored : n] = 1.0
    sums = self._step(self.model.params, sharding.global_batch_from_local(batch, self.model.mesh))
    return {key: np.asarray(value) for key, value in sums.items()}

  def rolling(self, token_lists: Sequence[Sequence[int]]) -> list[Score]:
    """Each sequence's whole log-likelihood (lm_eval's loglikelihood_rolling): windows of max_len
    targets, each after the prefix token or the tokens before it, every token scored once."""
    requests, owners = [], []
    for i, tokens in enumerate(token_lists):
      tokens = list(tokens)
      for start in range(0, len(tokens), self.max_len):
        window = tokens[start : start + self.max_len]
        # Context: as many earlier tokens as fit (the last window gets a full context too).
        context_len = self.max_len + 1 - len(window)
        context = tokens[max(start - context_len, 0) : start]
        requests.append((context, window))
        owners.append(i)
    totals = [Score(0.0, True, 0, 0.0) for _ in token_lists]
    for i, s in zip(owners, self.score(requests)):
      t = totals[i]
      totals[i] = Score(t.logprob + s.logprob, t.is_greedy and s.is_greedy, t.tokens + s.tokens, t.bytes + s.bytes)
    return totals


def generate(
  model: LoadedModel,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  stop_tokens: Sequence[int] = (),
  batch_size: int | None = None,
  **options,
) -> list[list[int]]:
  """The new tokens of each prompt, greedy unless `options` (model/decode.py's generate) say otherwise;
  prompts too long for the model keep their last tokens."""
  from model.decode import generate as decode_generate

  max_len = model.config.model.max_seq_len
  keep = max(max_len - max_new_tokens, 1)
  prompts = [list(p)[-keep:] or [model.tokenizer.bos_id or 0] for p in prompts]
  batch_size = batch_size or model.config.train.global_batch_size
  outputs = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # Every call one batch shape, split over the mesh.
    new_tokens = decode_generate(
      model.graphdef,
      model.params,
      filled,
      min(max_new_tokens, max_len - 1),
      stop_tokens=tuple(stop_tokens),
      mesh=model.mesh,
      **options,
    )
    outputs += new_tokens[: len(chunk)]
  return outputs
