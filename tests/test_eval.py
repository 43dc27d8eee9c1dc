"""Evaluation pools its sources: eval_loss is the loss per target token over all of them."""

import json
import math
import types

import jax
import pytest

import data
from configs import base
from tests.synthetic import RecordingWriter
from tests.test_training import corpus_config
from training import hooks as hooks_lib
from training import step as step_lib
from training.run import train


def test_eval_loss_pools_every_token_of_every_source():
  # (summed loss, target tokens) per batch: 'small' has 8 targets at 2.0 each, 'large' 100 at 0.01.
  # The mean of the sources' losses would be 1.005, the mean of the batches' 1.34.
  batches = {"small": [(10.0, 5.0), (6.0, 3.0)], "large": [(1.0, 100.0)]}
  hook = hooks_lib.EvalHook(
    every=10,
    eval_step=lambda params, batch: batch,
    batches={name: (lambda b=b: iter(b)) for name, b in batches.items()},
    writer=RecordingWriter(),
  )
  pooled = (10.0 + 6.0 + 1.0) / (5.0 + 3.0 + 100.0)
  assert hook.evaluate(params=None) == pytest.approx(pooled, rel=1e-12)
  hook(10, types.SimpleNamespace(params=None), {})
  ((step, record),) = hook.writer.records
  assert step == 10 and record["eval_loss"] == pytest.approx(pooled, rel=1e-12)
  assert record["eval_loss/small"] == pytest.approx(2.0) and record["eval_loss/large"] == pytest.approx(0.01)
  assert hook.history == [(10, record["eval_loss"])]
  assert hook.source_history == {"small": [(10, record["eval_loss/small"])], "large": [(10, record["eval_loss/large"])]}


def test_a_run_logs_the_loss_pooled_over_its_sources(tmp_path):
  """train(): eval_loss over two sources of very different sizes (and losses) is their summed
  loss over their summed target tokens, each source's own loss computed on its own rows."""
  config = corpus_config(
    tmp_path, num_steps=20, eval_every=20, eval_batches=0, log_every=20, checkpoint_every=20, num_samples=0
  )
  (tmp_path / "letters").mkdir()
  (tmp_path / "letters" / "ab.txt").write_text("abcabcabd " * 200)
  config.data.sources = {
    "numbers": config.data.sources.main,
    "letters": base.source(paths=str(tmp_path / "letters" / "*.txt")),
  }
  result = train(config, str(tmp_path / "run"))

  datasets = data.build_datasets(
    result.config.data,
    global_batch_size=result.config.train.global_batch_size,
    seed=result.config.seed,
    workdir=str(tmp_path / "run"),
  )
  params = jax.device_get(result.state.params)
  losses = jax.jit(lambda p, b: step_lib.token_losses(result.graphdef, p, b))
  totals = {}
  for name in datasets.names:
    sums = [
      jax.device_get(losses(params, {k: v for k, v in batch.items() if k != "source_counts"}))
      for batch in datasets.eval_batches(name)
    ]
    totals[name] = tuple(float(sum(s[i] for s in sums)) for i in (0, 1))
  (numbers_loss, numbers_tokens), (letters_loss, letters_tokens) = totals["numbers"], totals["letters"]
  assert numbers_tokens > 10 * letters_tokens
  pooled = (numbers_loss + letters_loss) / (numbers_tokens + letters_tokens)
  ((step, logged),) = result.eval_history
  assert step == 20 and logged == pytest.approx(pooled, rel=1e-5)
  for name, (loss, tokens) in totals.items():
    assert result.eval_history_by_source[name][-1][1] == pytest.approx(loss / tokens, rel=1e-5)
  mean = (numbers_loss / numbers_tokens + letters_loss / letters_tokens) / 2
  assert abs(mean - pooled) > 1e-3 * pooled  # The two ways of averaging give different numbers here.
  # Beside the loss, each source's and the pooled perplexity, bits per byte and accuracy.
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  (logged,) = [r for r in records if "eval_loss" in r]
  for metric in ("eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_accuracy"):
    assert {metric, f"{metric}/numbers", f"{metric}/letters"} <= set(logged)
  # The byte tokenizer: every target is a byte but the eos after each line, so bits per byte exceed
  # the loss in bits per token.
  assert logged["eval_bits_per_byte"] > logged["eval_loss"] / math.log(2)
  assert 0.0 < logged["eval_accuracy"] < 1.0
