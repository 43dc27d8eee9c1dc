"""JSONL tasks: their checks, and multiple-choice and generated answers from a tiny trained model."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from evaluation import loading, scoring, tasks
from tests.test_training import corpus_config
from training.run import train

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "examples")


SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot"}
STEPS = 300


def trained_workdir(base_dir) -> str:
  """A tiny model trained on 'the cow says moo.' sentences (six animals), once per directory."""
  workdir = base_dir / "animals-run"
  if not (workdir / "checkpoints" / str(STEPS)).is_dir():
    rng = np.random.default_rng(0)
    (base_dir / "animals").mkdir(exist_ok=True)
    animals = list(SOUNDS)
    lines = [f"the {a} says {SOUNDS[a]}." for a in rng.choice(animals, 1200)]
    (base_dir / "animals" / "facts.txt").write_text("\n".join(lines) + "\n")
    config = corpus_config(
      base_dir, num_steps=STEPS, eval_every=STEPS, eval_batches=2, log_every=50, checkpoint_every=STEPS, num_samples=0
    )
    config.data.sources = {"main": base.source(paths=str(base_dir / "animals" / "facts.txt"))}
    config.optimizer.learning_rate = 1e-2
    train(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return loading.load_model(loading.checkpoint_config(trained_workdir(tmp_path_factory.getbasetemp())))


def test_the_example_files_read():
  for kind in tasks.KINDS:
    examples = tasks.read_task(os.path.join(EXAMPLES, f"{kind}.jsonl"), kind)
    assert len(examples) >= 3
  assert tasks.read_task(os.path.join(EXAMPLES, "qa.jsonl"), "qa")[0]["references"] == ["Paris"]


@pytest.mark.parametrize(
  "lines, kind, message",
  [
    ([], "qa", r"empty.jsonl: no examples"),
    (["", "  "], "choice", r"empty.jsonl: no examples"),
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", "refer'], "qa", r"bad.jsonl:2: not a JSON object"),
    (['["a", "b"]'], "qa", r"bad.jsonl:1: not a JSON object but a list"),
    (['{"prompt": "a"}'], "translation", r"bad.jsonl:1: needs \"reference\""),
    (['{"prompt": 3, "reference": "b"}'], "qa", r"bad.jsonl:1: needs a \"prompt\" string"),
    (['{"prompt": "a", "choices": ["x"], "answer": 0}'], "choice", r"bad.jsonl:1: needs \"choices\""),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'], "choice", r"bad.jsonl:1: needs \"answer\".*0 to 1"),
    (['{"prompt": "a", "reference": "b"}'], "summaries", r"--kind='summaries'"),
  ],
)
def test_bad_task_files_are_one_line_naming_the_place(tmp_path, lines, kind, message):
  path = tmp_path / ("empty.jsonl" if "empty" in message else "bad.jsonl")
  path.write_text("\n".join(lines))
  with pytest.raises(ValueError, match=message):
    tasks.read_task(str(path), kind)


def test_a_missing_task_file_is_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"nothing.jsonl: cannot be read"):
    tasks.read_task(str(tmp_path / "nothing.jsonl"), "qa")


def test_choice_metrics_rank_raw_per_byte_and_per_token():
  score = lambda logprob, tokens: scoring.Score(logprob, False, tokens, 0.0)  # noqa: E731
  example = {"prompt": "p", "choices": [" a", " longer choice"], "answer": 1}
  # Raw: -4 beats -6; per byte: -4/2 = -2 loses to -6/14; per token: -4/1 loses to -6/3.
  result = tasks.choice_metrics([example], [[score(-4.0, 1), score(-6.0, 3)]])
  assert result == {"accuracy": 0.0, "accuracy_norm_bytes": 1.0, "accuracy_norm_tokens": 1.0}


def test_cut_at_stops():
  assert tasks.cut_at_stops(" four.\nfive plus", ["\n"]) == " four."
  assert tasks.cut_at_stops("abc", ["x", ""]) == "abc"
  assert tasks.cut_at_stops("a. b\nc", ["\n", "."]) == "a"


def test_multiple_choice_picks_the_planted_answer(model, tmp_path):
  lines = []
  animals = list(SOUNDS)
  for i, animal in enumerate(animals):
    wrong = [SOUNDS[animals[(i + k) % len(animals)]] for k in (1, 2)]
    choices = [f" {s}." for s in (wrong[0], SOUNDS[animal], wrong[1])]
    lines.append(json.dumps({"prompt": f"the {animal} says", "choices": choices, "answer": 1}))
  path = tmp_path / "sums.jsonl"
  path.write_text("\n".join(lines) + "\n")
  examples = tasks.read_task(str(path), "choice")
  results, answers = tasks.evaluate_task(model, examples, "choice")
  assert results["accuracy"] == 1.0 and results["accuracy_norm_bytes"] == 1.0, answers
  assert all(len(a["logprobs"]) == 3 for a in answers)


def test_scores_do_not_depend_on_the_batch_or_the_padding(model):
  tokenizer = model.tokenizer
  pair = tasks.encode_pair(tokenizer, "the cow says ", "moo.")  # The space moves to the continuation.
  assert tokenizer.decode(pair[1]) == " moo."
  alone = scoring.Scorer(model, batch_size=8).score([pair])[0]
  others = [tasks.encode_pair(tokenizer, "the dog says woof. " * k, "the owl") for k in range(1, 12)]
  together = scoring.Scorer(model, batch_size=8).score(others + [pair])[-1]
  assert together.logprob == pytest.approx(alone.logprob, abs=1e-4)
  assert alone.tokens == len(" moo.") and alone.bytes == len(" moo.") and alone.is_greedy
  # The continuation's log-probabilities, read off the model's logits for the whole sequence.
  context, continuation = pair
  tokens = np.asarray([context + continuation])
  logits = nnx.merge(model.graphdef, jax.device_get(model.params))(tokens)[0, :-1]
  logprobs = np.asarray(jax.nn.log_softmax(logits))[np.arange(tokens.shape[1] - 1), tokens[0, 1:]]
  assert alone.logprob == pytest.approx(float(logprobs[-len(continuation) :].sum()), abs=1e-4)


def test_generated_answers_score_exact_match_and_f1(model, tmp_path):
  lines = [
    json.dumps({"prompt": f"the {animal} says", "reference": f"The {sound}!"}) for animal, sound in SOUNDS.items()
  ]
  path = tmp_path / "qa.jsonl"
  path.write_text("\n".join(lines))
  results, answers = tasks.evaluate_task(model, tasks.read_task(str(path), "qa"), "qa", max_new_tokens=8)
  assert results == {"exact_match": 1.0, "f1": 1.0}, answers
  assert answers[0]["prediction"] == "meow."
