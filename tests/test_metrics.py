"""Held-out metrics (perplexity, bits per byte, accuracy), bytes per token, and the text metrics."""

import math
import types

import jax
import numpy as np
import pytest
import tokenizers as hf_tokenizers
from flax import nnx

from data.tokenizers import (
  ByteTokenizer,
  CharTokenizer,
  HuggingFaceTokenizer,
  SentencePieceTokenizer,
  train_sentencepiece,
)
from evaluation import metrics
from tests import synthetic
from tests.synthetic import RecordingWriter
from training import hooks as hooks_lib
from training import step as step_lib
from training.state import abstract_model

TEXT = "naïve café, 25 €: Ünïcödé ☃ text\nand a second line"


def uniform_model(vocab_size=259, **model):
  """The tiny model with a zero output kernel: every logit 0, so every token has probability 1/V."""
  config = synthetic.tiny_config(vocab_size=vocab_size)
  config.model.update(tie_embeddings=False, **model)
  graphdef, abstract = abstract_model(config.model)
  params = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.02, leaf.dtype), abstract)
  params = nnx.State(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
  pure = nnx.to_pure_dict(params)
  pure["head"] = np.zeros_like(pure["head"])
  nnx.replace_by_pure_dict(params, pure)
  return config, graphdef, params


def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
  config, graphdef, params = uniform_model()
  vocab = config.model.vocab_size
  batch = synthetic.batch(4, 32, vocab, seed=3)
  table = metrics.byte_lengths(ByteTokenizer())
  sums = jax.device_get(step_lib.make_eval_step(graphdef, mesh(), None, byte_lengths=table)(params, batch))
  summary = metrics.summarize({key: float(value) for key, value in sums.items()})
  assert summary["perplexity"] == pytest.approx(vocab, rel=1e-5)
  assert summary["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
  # Bits per byte by hand: every target costs log2(V) bits; a byte token is one byte, a special none.
  targets, weights = batch["targets"], batch["weights"]
  target_bytes = float(np.sum(weights * (targets >= 3)))
  assert sums["bytes"] == target_bytes
  assert summary["bits_per_byte"] == pytest.approx(np.sum(weights) * math.log2(vocab) / target_bytes, rel=1e-5)
  # Equal logits: the argmax is token 0, right exactly where the target is 0.
  assert sums["correct"] == float(np.sum(weights * (targets == 0)))
  # The loss and token count are those of the plain eval step, which training logged before.
  loss_sum, weight = jax.device_get(step_lib.make_eval_step(graphdef, mesh(), None)(params, batch))
  assert sums["loss"] == pytest.approx(float(loss_sum), rel=1e-7) and sums["tokens"] == float(weight)


def test_the_chunked_loss_path_gives_the_same_sums():
  config, graphdef, params = uniform_model(vocab_size=256)
  _, chunked_graphdef, _ = uniform_model(vocab_size=256, loss_chunk=12)  # 12 does not divide 32.
  key = jax.random.key(0)
  pure = nnx.to_pure_dict(params)
  pure["head"] = np.asarray(0.3 * jax.random.normal(key, pure["head"].shape))  # Not uniform: argmax matters.
  nnx.replace_by_pure_dict(params, pure)
  batch = synthetic.batch(4, 32, 256, seed=4)
  predictions = np.asarray(
    jax.numpy.argmax(nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"]), axis=-1)
  )
  batch["targets"][:, ::2] = predictions[:, ::2]  # Half the targets are the model's guesses.
  table = np.arange(256, dtype=np.float32) % 3
  plain = jax.device_get(
    step_lib.make_eval_step(graphdef, mesh(), None, per_row=True, byte_lengths=table)(params, batch)
  )
  chunked = jax.device_get(
    step_lib.make_eval_step(chunked_graphdef, mesh(), None, per_row=True, byte_lengths=table)(params, batch)
  )
  for key in ("loss", "tokens", "correct", "bytes"):
    np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-5)
  assert plain["correct"].sum() >= np.sum(batch["weights"][:, ::2])


def test_bits_per_byte_by_hand():
  # 4 targets of 2.0 nats each over 10 bytes: 8 / ln 2 / 10 bits per byte; 3 of 4 targets right.
  summary = metrics.summarize({"loss": 8.0, "tokens": 4.0, "correct": 3.0, "bytes": 10.0})
  assert summary["bits_per_byte"] == pytest.approx(8.0 / math.log(2) / 10.0)
  assert summary["loss"] == 2.0 and summary["perplexity"] == pytest.approx(math.exp(2.0))
  assert summary["accuracy"] == 0.75
  assert set(metrics.summarize({"loss": 8.0, "tokens": 4.0})) == {"loss", "perplexity"}


def _byte_level_tokenizer(path):
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tokenizer.train_from_iterator([TEXT] * 20, trainer)
  tokenizer.save(str(path))
  return HuggingFaceTokenizer(str(path))


def test_byte_lengths_add_up_to_the_text_for_every_tokenizer(tmp_path):
  texts = [TEXT * 3, "plain words and more words\n" * 20]
  sp = SentencePieceTokenizer(train_sentencepiece(iter(texts), str(tmp_path / "sp.model"), vocab_size=300))
  hf = _byte_level_tokenizer(tmp_path / "tokenizer.json")
  for tokenizer in (ByteTokenizer(), CharTokenizer.from_texts([TEXT]), sp, hf):
    table = metrics.byte_lengths(tokenizer)
    assert table.shape == (tokenizer.vocab_size,)
    ids = tokenizer.encode_batch([TEXT])[0]
    assert table[ids].sum() == len(TEXT.encode("utf-8")), type(tokenizer).__name__
  assert metrics.byte_lengths(ByteTokenizer())[:4].tolist() == [0, 0, 0, 1]  # pad, bos, eos, then byte 0.
  assert hf.eos_id is not None and metrics.byte_lengths(hf)[hf.eos_id] == 0
  assert metrics.byte_lengths(ByteTokenizer(), vocab_size=264)[259:].tolist() == [0] * 5


def test_the_eval_hook_writes_every_metric_per_source_and_pooled():
  # (loss, tokens, correct, bytes) per batch.
  batches = {
    "small": [dict(loss=10.0, tokens=5.0, correct=1.0, bytes=20.0), dict(loss=6.0, tokens=3.0, correct=2.0, bytes=9.0)],
    "large": [dict(loss=1.0, tokens=100.0, correct=90.0, bytes=300.0)],
  }
  hook = hooks_lib.EvalHook(
    every=10,
    eval_step=lambda params, batch: batch,
    batches={name: (lambda b=b: iter(b)) for name, b in batches.items()},
    writer=RecordingWriter(),
  )
  hook(10, types.SimpleNamespace(params=None), {})
  ((step, record),) = hook.writer.records
  assert record["eval_loss"] == pytest.approx(17.0 / 108.0)
  assert record["eval_perplexity"] == pytest.approx(math.exp(17.0 / 108.0))
  assert record["eval_bits_per_byte"] == pytest.approx(17.0 / math.log(2) / 329.0)
  assert record["eval_accuracy"] == pytest.approx(93.0 / 108.0)
  assert record["eval_bits_per_byte/small"] == pytest.approx(16.0 / math.log(2) / 29.0)
  assert record["eval_accuracy/large"] == pytest.approx(0.9)
  assert record["eval_perplexity/large"] == pytest.approx(math.exp(0.01))
  assert hook.latest == record and hook.history == [(10, record["eval_loss"])]
  assert hook.source_history["small"] == [(10, 2.0)]


@pytest.mark.parametrize(
  "prediction, references, exact, f1",
  [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),  # Case, article and punctuation go.
    ("in  Paris, France", ["Paris"], 0.0, 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # P 1/3, R 1: F1 0.5.
    ("an apple a day", ["the apple"], 0.0, 2 * 0.5 * 1 / 1.5),  # "apple day" vs "apple": P 1/2, R 1.
    ("eight", ["8", "Eight."], 1.0, 1.0),  # The best of the references.
    ("blue blue", ["blue"], 0.0, 2 * 0.5 * 1 / 1.5),  # Repeated words count once each in common.
    ("", ["the"], 1.0, 1.0),  # Both empty after normalisation.
    ("", ["cat"], 0.0, 0.0),
    ("dog", ["cat"], 0.0, 0.0),
  ],
)
def test_exact_match_and_f1(prediction, references, exact, f1):
  assert metrics.exact_match(prediction, references) == exact
  assert metrics.token_f1(prediction, references) == pytest.approx(f1)


def test_normalize_answer_as_squad():
  assert metrics.normalize_answer("  The  Quick, brown fox's   tale!  ") == "quick brown foxs tale"
  assert metrics.normalize_answer("A theatre an answer") == "theatre answer"


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
  sacrebleu = pytest.importorskip("sacrebleu")
  hypotheses = ["the cat sat on the mat", "a dog runs in the park today", "hello world"]
  references = [["the cat sat on a mat", "a cat sat on the mat"], ["the dog runs in the park"], ["hello there world"]]
  streams = [[r[0] for r in references], [references[0][1], None, None]]
  assert metrics.bleu(hypotheses, references) == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score)
  assert metrics.chrf(hypotheses, references) == pytest.approx(sacrebleu.corpus_chrf(hypotheses, streams).score)
  assert metrics.bleu(["exactly the same words here"], [["exactly the same words here"]]) == pytest.approx(100.0)
  single = [[r[0]] for r in references]
  assert metrics.bleu(hypotheses, single) == pytest.approx(
    sacrebleu.corpus_bleu(hypotheses, [[r[0] for r in references]]).score
  )
