"""Task files: JSONL, one example a line, of three kinds (evaluation/examples/ has one of each).

  translation  {"prompt": "English: cat\\nFrench:", "reference": " chat"}   -> BLEU, chrF (sacrebleu, 0-100)
  qa           {"prompt": "Q: ...\\nA:", "references": ["Paris", "paris"]}  -> exact_match, f1 (0-1)
  choice       {"prompt": "...", "choices": [" a", " b"], "answer": 1}    -> accuracy, accuracy_norm_bytes,
                                                                           accuracy_norm_tokens (0-1)

translation and qa generate greedily from the prompt, up to max_new_tokens or the first stop string
("\\n" by default), and compare the stripped text with the reference(s) ("reference": one string,
"references": a list). choice scores each choice as the continuation of the prompt by its
log-likelihood (accuracy), by log-likelihood per UTF-8 byte of the choice text (HellaSwag's and ARC's
acc_norm) and per token; the choice's leading space belongs to the choice, as in lm_eval.

`read_task` checks the whole file first, so a bad line is one ValueError naming FILE:LINE before
any model is loaded.
"""

import math
from collections.abc import Sequence
from typing import Any

from data.files import read_json_lines
from evaluation import metrics

KINDS = ("translation", "qa", "choice")


def read_task(path: str, kind: str) -> list[dict[str, Any]]:
  """The examples of a task file, each checked for its kind's fields: {"prompt", "references"} or
  {"prompt", "choices", "answer"}."""
  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")
  examples = [_check(record, kind, f"{path}:{number}") for number, record in read_json_lines(path)]
  if not examples:
    raise ValueError(f"{path}: no examples (a {kind} task has one JSON object a line)")
  return examples


def _check(record: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
  prompt = record.get("prompt")
  if not isinstance(prompt, str):
    raise ValueError(f'{where}: needs a "prompt" string')
  if kind == "choice":
    choices, answer = record.get("choices"), record.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise ValueError(f'{where}: needs "choices", a list of at least two non-empty strings')
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
      raise ValueError(f'{where}: needs "answer", the index of the right choice (0 to {len(choices) - 1})')
    return {"prompt": prompt, "choices": choices, "answer": answer}
  references = record.get("references", [record["reference"]] if "reference" in record else None)
  if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
    raise ValueError(f'{where}: needs "reference" (a string) or "references" (a non-empty list of strings)')
  return {"prompt": prompt, "references": references}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm_eval splits them: the context's trailing spaces move to
  the continuation, the two are encoded together and split where the context's own encoding ends
  (so a tokenizer that merges across the boundary scores the tokens the model would see)."""
  stripped = context.rstrip(" ")
  continuation = context[len(stripped) :] + continuation
  context = stripped
  context_ids, whole = (ids.tolist() for ids in tokenizer.encode_batch([context, context + continuation]))
  if whole[: len(context_ids)] == context_ids:
    return context_ids, whole[len(context_ids) :]
  return context_ids, tokenizer.encode_batch([continuation])[0].tolist()


def choice_metrics(examples: Sequence[dict[str, Any]], scores: Sequence[Sequence[Any]]) -> dict[str, float]:
  """Accuracy of the highest-scoring choice (scoring.Score per choice): raw log-likelihood, per byte
  of the choice's text and per scored token."""
  right = {"accuracy": 0, "accuracy_norm_bytes": 0, "accuracy_norm_tokens": 0}
  for example, choice_scores in zip(examples, scores):
    ranked = {
      "accuracy": [s.logprob for s in choice_scores],
      "accuracy_norm_bytes": [
        s.logprob / max(len(c.encode("utf-8")), 1) for s, c in zip(choice_scores, example["choices"])
      ],
      "accuracy_norm_tokens": [s.logprob / max(s.tokens, 1) for s in choice_scores],
    }
    for name, values in ranked.items():
      right[name] += int(max(range(len(values)), key=values.__getitem__) == example["answer"])
  return {name: count / len(examples) for name, count in right.items()}


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
  """The text before the first of the stop strings (all of it when none occurs)."""
  end = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
  return text[:end]


def generation_metrics(kind: str, predictions: Sequence[str], examples: Sequence[dict[str, Any]]) -> dict[str, float]:
  references = [e["references"] for e in examples]
  if kind == "translation":
    return {"bleu": metrics.bleu(predictions, references), "chrf": metrics.chrf(predictions, references)}
  return {
    "exact_match": math.fsum(metrics.exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions),
    "f1": math.fsum(metrics.token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions),
  }


def evaluate_task(
  model,
  examples: Sequence[dict[str, Any]],
  kind: str,
  *,
  max_new_tokens: int = 32,
  stops: Sequence[str] = ("\n",),
  batch_size: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(the task's metrics, one record per example with what the model answered) on a loaded model
  (evaluation.loading.LoadedModel)."""
  from evaluation import scoring  # Imported here: scoring loads JAX and the model, the checks above do not.

  tokenizer = model.tokenizer
  if kind == "choice":
    scorer = scoring.Scorer(model, batch_size=batch_size)
    requests = [encode_pair(tokenizer, e["prompt"], c) for e in examples for c in e["choices"]]
    flat = iter(scorer.score(requests))
    scores = [[next(flat) for _ in e["choices"]] for e in examples]
    outputs = [dict(e, logprobs=[s.logprob for s in choice_scores]) for e, choice_scores in zip(examples, scores)]
    return choice_metrics(examples, scores), outputs
  prompts = [ids.tolist() for ids in tokenizer.encode_batch([e["prompt"] for e in examples])]
  new_tokens = scoring.generate(model, prompts, max_new_tokens, batch_size=batch_size, stop_tokens=_stop_ids(tokenizer))
  predictions = [cut_at_stops(tokenizer.decode(tokens), stops).strip() for tokens in new_tokens]
  outputs = [dict(e, prediction=p) for e, p in zip(examples, predictions)]
  return generation_metrics(kind, predictions, examples), outputs


def _stop_ids(tokenizer) -> tuple[int, ...]:
  return tuple(i for i in (tokenizer.eos_id,) if i is not None)
