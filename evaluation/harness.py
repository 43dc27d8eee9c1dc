"""lm-evaluation-harness on a loom checkpoint: its `LM` interface over the jitted eval step.

  python tools/evaluate_tasks.py --checkpoint=WORKDIR --lm_eval=hellaswag,arc_easy [--limit=100]
  python tools/evaluate_tasks.py --checkpoint=WORKDIR --lm_eval=my_task --include_path=tasks/

or in Python, `lm_eval.simple_evaluate(model=LoomLM(checkpoint=...), tasks=[...])`; importing this
module registers the model as "loom" (`model="loom", model_args="checkpoint=DIR"`). lm_eval is an
optional dependency (evaluation/requirements.txt). Log-likelihoods go through scoring.Scorer (rows
padded to a few fixed lengths, so a task compiles the step a handful of times); generation through
model/decode.py's generate, greedy unless the task's gen_kwargs ask for sampling.
"""

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from evaluation import loading, scoring
from evaluation.tasks import cut_at_stops, encode_pair

DEFAULT_MAX_GEN_TOKS = 256


@register_model("loom")
class LoomLM(LM):
  """A loom checkpoint (`checkpoint`: a workdir, its checkpoints/ or one checkpoints/STEP), or an
  already loaded `model` (evaluation.loading.LoadedModel)."""

  def __init__(
    self,
    checkpoint: str | None = None,
    model: loading.LoadedModel | None = None,
    batch_size: int | str | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    **unused: Any,
  ):
    super().__init__()
    if model is None:
      if not checkpoint:
        raise ValueError("LoomLM needs checkpoint=DIR (a loom workdir or checkpoint) or a loaded model")
      model = loading.load_model(loading.checkpoint_config(checkpoint))
    self.model = model
    batch = int(batch_size) if str(batch_size or "").isdigit() else None  # lm_eval's "auto": the config's.
    self.scorer = scoring.Scorer(model, batch_size=batch)
    self.max_gen_toks = int(max_gen_toks)

  @property
  def tokenizer_name(self) -> str:
    return self.model.tokenizer.identity()

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    tokenizer = self.model.tokenizer
    pairs = [encode_pair(tokenizer, *request.args[:2]) for request in requests]
    return [(s.logprob, s.is_greedy) for s in self.scorer.score(pairs)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    texts = [request.args[0] for request in requests]
    token_lists = [ids.tolist() for ids in self.model.tokenizer.encode_batch(texts)] if texts else []
    return [s.logprob for s in self.scorer.rolling(token_lists)]

  def generate_until(self, requests) -> list[str]:
    tokenizer = self.model.tokenizer
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}  # Requests with the same generation settings run together.
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(_settings(request.args[1], self.max_gen_toks).items())), []).append(i)
    for indices in groups.values():
      settings = _settings(requests[indices[0]].args[1], self.max_gen_toks)
      stops = settings.pop("until")
      prompts = [ids.tolist() for ids in tokenizer.encode_batch([requests[i].args[0] for i in indices])]
      new_tokens = scoring.generate(
        self.model,
        prompts,
        settings.pop("max_gen_toks"),
        stop_tokens=tuple(i for i in (tokenizer.eos_id,) if i is not None),
        batch_size=self.scorer.batch_size,
        **settings,
      )
      for i, tokens in zip(indices, new_tokens):
        results[i] = cut_at_stops(tokenizer.decode(tokens), stops)
    return results


def _settings(gen_kwargs: dict[str, Any] | None, max_gen_toks: int) -> dict[str, Any]:
  """lm_eval's gen_kwargs as model/decode.py's options: greedy unless do_sample with a temperature."""
  gen_kwargs = dict(gen_kwargs or {})
  until = gen_kwargs.get("until") or []
  until = [until] if isinstance(until, str) else list(until)
  temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample") else 0.0
  return {
    "until": until,
    "max_gen_toks": int(gen_kwargs.get("max_gen_toks", max_gen_toks)),
    "temperature": temperature,
    "top_k": int(gen_kwargs.get("top_k", 0) or 0) if temperature else 0,
    "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0) if temperature else 1.0,
  }


def run_harness(
  lm: LoomLM,
  tasks: Sequence[str],
  *,
  include_path: str | None = None,
  limit: int | float | None = None,
  num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
  """lm_eval's simple_evaluate on `lm`: task name -> its metrics ("acc,none": ...). With include_path,
  the YAML tasks under it are known beside (and instead of scanning) lm_eval's own only when asked for."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
  unknown = [task for task in tasks if task not in manager.all_tasks]
  if unknown:
    if include_path is not None:  # Maybe one of lm_eval's own tasks next to the local ones.
      manager = TaskManager(include_path=include_path)
      unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
      raise ValueError(f"--lm_eval: no task named {', '.join(unknown)} in lm_eval's task index or --include_path")
  results = lm_eval.simple_evaluate(
    model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
  )
  return results["results"]
