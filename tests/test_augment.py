"""Text augmentation (data/augment.py): off is bit-identical, reproducible from (seed, step), rates, never on eval."""

import hashlib
import math
import os
import re

import numpy as np
import pytest

from configs import base
from data import augment, build_datasets, packing, pipeline
from data.augment import Augmentation
from training.validation import ConfigError, validate, validate_data

END = 10  # The planted rows' sentence-ending token; 2 is eos, 3 the mask.
MASK = 3
VOCAB = 256
SEQ_LEN = 32


@pytest.fixture(scope="module")
def rows():
  """Long documents of short sentences (2-4 distinct-looking tokens, then END): most rows hold many."""
  rng = np.random.default_rng(0)
  documents = []
  for _ in range(120):
    sentences = [np.append(rng.integers(20, VOCAB, size=rng.integers(2, 5)), END) for _ in range(rng.integers(5, 30))]
    documents.append(np.concatenate(sentences).astype(np.int32))
  return packing.pack_rows(packing.concatenate_documents(documents, eos_id=2), SEQ_LEN)


def _batches(rows, augmentation, steps=range(0, 6), batch_size=64, **kw):
  """The batches of `steps` (a contiguous range), stacked: each field [steps, batch, ...]."""
  made = list(
    pipeline.train_batches(
      rows,
      global_batch_size=batch_size,
      seed=7,
      start_step=steps[0],
      stop_step=steps[-1] + 1,
      augment=augmentation,
      **kw,
    )
  )
  return {name: np.stack([batch[name] for batch in made]) for name in made[0]}


@pytest.fixture(scope="module")
def clean(rows):
  """The batches of steps 0..5 without augmentation."""
  return _batches(rows, None)


@pytest.fixture(scope="module")
def augmented(rows):
  """The batches of steps 0..5 with every augmentation."""
  return _batches(rows, ALL)


def _planted_golden_rows(source, num_docs, seq_len=16):
  rng = np.random.default_rng(7 + source)
  documents = [rng.integers(3, 200, size=rng.integers(1, 40)).astype(np.int32) for _ in range(num_docs)]
  return packing.pack_rows(packing.concatenate_documents(documents, eos_id=2), seq_len)


def _digest(**kw):
  digest = hashlib.sha256()
  for batch in pipeline.train_batches(**kw):
    for name in sorted(batch):
      digest.update(name.encode())
      digest.update(np.ascontiguousarray(batch[name]).tobytes())
  return digest.hexdigest()[:16]


@pytest.mark.parametrize("augmentation", [None, Augmentation()], ids=["none", "all_zero"])
def test_off_is_bit_identical_to_the_batches_before_augmentation(augmentation):
  """Digests of batches made by data/pipeline.py before data/augment.py existed (single source over
  several epochs, a two-source mixture resumed at step 5, random windows). Augmentation() sends the
  batch through augmented_features with every probability 0: nothing may change either."""
  one = _planted_golden_rows(0, 40)
  two = [_planted_golden_rows(0, 40), _planted_golden_rows(1, 15)]
  kw = dict(global_batch_size=8, seed=3, augment=augmentation)
  assert _digest(rows=one, stop_step=12, **kw) == "514ef799b1ef5e91"
  assert _digest(rows=two, weights=[0.7, 0.3], start_step=5, stop_step=15, **kw) == "babb9a67de000111"
  assert _digest(rows=one, windows="random", stop_step=4, **kw) == "5cfd39bdc0a03b7a"


def test_each_augmentation_at_probability_zero_is_the_identity(rows):
  """The graph functions themselves, with every other field set: p=0 changes no token."""
  from data.tf_cpu import tf

  batch = _batches(rows, None, steps=range(0, 1))
  width = SEQ_LEN + 1
  tokens = np.concatenate([batch["inputs"][0], batch["targets"][0][:, -1:]], axis=1)
  segments = np.concatenate([batch["segment_ids"][0], batch["segment_ids"][0][:, -1:]], axis=1)
  arrays = (tf.constant(tokens), tf.constant(segments), tf.ones([64, width], tf.uint8))
  steps, slots = tf.zeros([64], tf.int64), tf.range(64, dtype=tf.int64)
  zero = Augmentation(mask_id=MASK, vocab_size=VOCAB, span_delete_max=5, sentence_end_ids=(END,))
  seed = tf.constant(7, tf.int64)
  for edited in (
    augment.delete_spans(zero, arrays, seed, steps, slots),
    augment.shuffle_sentences(zero, arrays, seed, steps, slots),
  ):
    for before, after in zip(arrays, edited):
      np.testing.assert_array_equal(before.numpy(), after.numpy())
  inputs = augment.mask_and_replace(zero, arrays[0][:, :-1], arrays[1][:, :-1], seed, steps, slots)
  np.testing.assert_array_equal(inputs.numpy(), tokens[:, :-1])


ALL = Augmentation(
  token_mask=0.1,
  mask_id=MASK,
  token_replace=0.1,
  vocab_size=VOCAB,
  span_delete=0.3,
  span_delete_max=6,
  sentence_shuffle=0.5,
  sentence_end_ids=(END,),
)


def test_reproducible_from_seed_and_step(rows, clean, augmented):
  again = _batches(rows, ALL, steps=range(2, 6))  # Another pipeline, resumed at step 2: steps 2..5.
  for name in augmented:
    np.testing.assert_array_equal(augmented[name][2:], again[name])
  changed = augmented["inputs"] != clean["inputs"]  # [steps, batch, L]
  assert changed.any(axis=(1, 2)).all()  # Every step is augmented...
  for step in range(1, 6):  # ...and each step differently.
    assert (changed[step] != changed[0]).mean() > 0.1


def test_each_process_augments_its_slice_of_the_same_global_batch(rows, augmented):
  halves = [_batches(rows, ALL, steps=range(4, 6), process_index=p, process_count=2) for p in (0, 1)]
  for name in ("inputs", "targets", "segment_ids", "positions", "weights"):
    np.testing.assert_array_equal(augmented[name][4:], np.concatenate([h[name] for h in halves], axis=1))


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
  return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_token_mask_and_replace_rates_and_clean_targets(rows, clean):
  mixed = _batches(rows, Augmentation(token_mask=0.15, mask_id=MASK, token_replace=0.25, vocab_size=VOCAB))
  for name in ("targets", "segment_ids", "positions", "weights"):  # Only the inputs change.
    np.testing.assert_array_equal(mixed[name], clean[name])
  real = clean["segment_ids"] > 0
  n = int(real.sum())
  assert n > 8000
  masked = real & (mixed["inputs"] == MASK)
  replaced = real & (mixed["inputs"] != clean["inputs"]) & ~masked
  assert _within_binomial(int(masked.sum()), n, 0.15)
  # Independent draws for each step and each example (the same pattern would differ nowhere).
  assert all((masked[step] != masked[0]).mean() > 0.2 for step in range(1, 6))
  assert (masked[:, 1:] != masked[:, :1]).mean() > 0.2
  # A random token equals the one it replaces 1 time in VOCAB (and is the mask 1 time in VOCAB).
  assert _within_binomial(int(replaced.sum()), n, 0.25 * (1 - 2 / VOCAB))
  assert (mixed["inputs"][~real] == clean["inputs"][~real]).all()  # Padding is never touched.
  drawn = mixed["inputs"][replaced]
  assert drawn.min() >= 0 and drawn.max() < VOCAB
  # Uniform over the vocabulary: each quarter of it holds a quarter of the draws.
  quarters = np.bincount(drawn * 4 // VOCAB, minlength=4)
  assert all(_within_binomial(int(q), len(drawn), 0.25) for q in quarters)


def test_span_delete_rate_and_lengths(rows, clean):
  spans = _batches(rows, Augmentation(span_delete=0.3, span_delete_max=6))
  # A deleted span of k tokens leaves the row's last k targets as padding (0: no planted token is).
  padded = lambda b: (b["targets"] == 0).sum(axis=-1)  # noqa: E731
  deleted = (padded(spans) - padded(clean)).reshape(-1)
  rows_changed = (spans["targets"] != clean["targets"]).any(axis=-1).reshape(-1)
  np.testing.assert_array_equal(deleted > 0, rows_changed)
  assert _within_binomial(int(rows_changed.sum()), rows_changed.size, 0.3)
  lengths = deleted[deleted > 0]
  assert set(lengths.tolist()) == {1, 2, 3, 4, 5, 6}
  assert abs(lengths.mean() - 3.5) < 5 * np.sqrt(35 / 12 / len(lengths))
  # The row is the clean one with one span cut out: the tokens kept are in the same order.
  b, k = np.argwhere(deleted.reshape(spans["targets"].shape[:2]) > 0)[0]
  row = np.append(spans["inputs"][b, k], spans["targets"][b, k, -1])
  clean_row = np.append(clean["inputs"][b, k], clean["targets"][b, k, -1])
  length = int(deleted.reshape(spans["targets"].shape[:2])[b, k])
  start = int(np.argmax(row != clean_row))
  np.testing.assert_array_equal(row[: SEQ_LEN + 1 - length], np.delete(clean_row, range(start, start + length)))


def _sentences(tokens, segments):
  """Each segment's sentences (tuples of tokens ending in END), sorted: what shuffling must keep."""
  out = []
  for segment in np.unique(segments[segments > 0]):
    ids = tokens[segments == segment]
    cuts = np.flatnonzero(ids == END) + 1
    out.append(sorted(tuple(p) for p in np.split(ids, cuts) if len(p)))
  return out


def test_sentence_shuffle_rate_and_content(rows, clean):
  shuffled = _batches(rows, Augmentation(sentence_shuffle=0.4, sentence_end_ids=(END,)))
  for name in ("segment_ids", "positions", "weights"):  # Documents keep their columns.
    np.testing.assert_array_equal(shuffled[name], clean[name])
  width = SEQ_LEN + 1
  whole = lambda b: np.concatenate([b["inputs"], b["targets"][..., -1:]], axis=-1).reshape(-1, width)  # noqa: E731
  segments = np.concatenate([clean["segment_ids"], clean["segment_ids"][..., -1:]], axis=-1).reshape(-1, width)
  changed = (whole(shuffled) != whole(clean)).any(axis=-1)
  # A shuffled row keeps its order when each document's m sentences in it (m ends) come out in their
  # order, 1 time in m!: the chance each row looks changed is 0.4 * (1 - prod 1/m!).
  kept_order = [
    np.prod([1 / math.factorial(int((row[seg == s] == END).sum())) for s in np.unique(seg[seg > 0])])
    for row, seg in zip(whole(clean), segments)
  ]
  q = 0.4 * (1 - np.asarray(kept_order))
  assert abs(changed.sum() - q.sum()) <= 5 * np.sqrt((q * (1 - q)).sum())
  assert q.mean() > 0.35  # Most rows hold several sentences: the test sees the rate, not the identities.
  np.testing.assert_array_equal(whole(shuffled) == 2, whole(clean) == 2)  # A document's end stays its end.
  for row, clean_row, segment_row in zip(whole(shuffled), whole(clean), segments):
    assert _sentences(row, segment_row) == _sentences(clean_row, segment_row)


def test_sentence_end_ids_of_a_tokenizer():
  from data.tokenizers import ByteTokenizer

  assert augment.sentence_end_ids(ByteTokenizer(), ".!?") == tuple(sorted(ord(c) + 3 for c in ".!?"))
  assert augment.sentence_end_ids(ByteTokenizer(), "\n") == (ord("\n") + 3,)


def _corpus_config(tmp_path, **augment_fields):
  directory = tmp_path / "corpus"
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  words = ["one", "two", "three", "four"]
  for f in range(2):
    text = " ".join(f"{words[a]} plus {words[b]} is more{'.!?'[c]}" for a, b, c in rng.integers(0, 3, (400, 3)))
    (directory / f"part{f}.txt").write_text(text)
  config = base.get_config()
  config.data.sources = {"main": base.source(kind="text", paths=str(directory / "*.txt"))}
  config.data.update(tokenizer="byte", seq_len=SEQ_LEN)
  config.model.max_seq_len = SEQ_LEN
  config.data.augment.update(**augment_fields)
  return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("augment")
  on = dict(token_mask=0.2, mask_id=0, token_replace=0.1, span_delete=0.2, sentence_shuffle=0.5)
  built = {}
  for name, fields in (("off", {}), ("on", on), ("on_again", on)):
    config = validate_data(_corpus_config(tmp_path, **fields))
    built[name] = build_datasets(config.data, global_batch_size=16, seed=1, workdir=str(tmp_path / name))
  return tmp_path, built


def test_config_builds_the_augmentation_and_never_augments_evaluation(corpus):
  _, built = corpus
  assert built["off"].augment is None  # Defaults: the pipeline takes the path it took before.
  on = built["on"].augment
  assert (on.token_mask, on.mask_id, on.token_replace, on.span_delete, on.sentence_shuffle) == (0.2, 0, 0.1, 0.2, 0.5)
  assert on.vocab_size == 259 and on.sentence_end_ids == tuple(sorted(ord(c) + 3 for c in ".!?"))
  train = {name: list(built[name].train_batches(0, 3)) for name in built}
  for a, b in zip(train["on"], train["on_again"]):  # Two builds give the same augmented batches.
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  assert all((a["inputs"] != b["inputs"]).mean() > 0.1 for a, b in zip(train["on"], train["off"]))
  evaluated = {name: list(built[name].eval_batches("main")) for name in ("off", "on")}
  assert len(evaluated["on"]) == len(evaluated["off"]) > 0
  for a, b in zip(evaluated["on"], evaluated["off"]):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  # And they are the validation rows as stored: batches are in row order.
  tokens, _, _ = built["on"].sources[0].validation.read(np.arange(16))
  np.testing.assert_array_equal(evaluated["on"][0]["inputs"], tokens[:, :-1])
  np.testing.assert_array_equal(evaluated["on"][0]["targets"], tokens[:, 1:])


@pytest.mark.parametrize(
  "fields, message",
  [
    (
      dict(token_mask=1.5),
      re.escape("config.data.augment.token_mask=1.5: not a probability; allowed: a number in [0, 1] (0: off)"),
    ),
    (dict(sentence_shuffle=-0.1), "config.data.augment.sentence_shuffle=-0.1: not a probability"),
    (dict(span_delete=float("nan")), "config.data.augment.span_delete=nan: not a probability"),
    (dict(token_mask=0.6, token_replace=0.5), r"token_mask=0.6 \+ data.augment.token_replace=0.5 > 1"),
    (dict(span_delete=0.1, span_delete_max=SEQ_LEN), f"span_delete_max={SEQ_LEN}: .* allowed: 1 to data.seq_len - 1"),
    (dict(mask_id=-2), "config.data.augment.mask_id=-2: not a token id"),
  ],
)
def test_a_bad_field_is_one_clear_error(tmp_path, fields, message):
  config = _corpus_config(tmp_path, **fields)
  with pytest.raises(ConfigError, match=message):
    validate_data(config)
  with pytest.raises(ConfigError, match=message):
    validate(config, num_devices=8)


def test_ids_the_tokenizer_lacks_fail_when_the_data_is_built(corpus):
  from data.tokenizers import ByteTokenizer

  tmp_path, _ = corpus
  config = _corpus_config(tmp_path, token_mask=0.1)  # mask_id=-1: the byte tokenizer has no <unk>.
  with pytest.raises(ValueError, match=r"data.augment.mask_id=-1 asks for the tokenizer's <unk> token"):
    augment.from_config(config.data.augment, ByteTokenizer())
  config.data.augment.mask_id = 259
  with pytest.raises(ValueError, match=r"data.augment.mask_id=259: not a token .* allowed: -1 .* \[0, 259\)"):
    augment.from_config(config.data.augment, ByteTokenizer())
  config = _corpus_config(tmp_path, sentence_shuffle=0.1, sentence_ends="\u00a7")
  with pytest.raises(ValueError, match="data.augment.sentence_ends='\u00a7': no token"):
    augment.from_config(config.data.augment, ByteTokenizer())
