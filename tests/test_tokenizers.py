"""Tests for data/tokenizers.py: training from texts, loading foreign models, special_id."""

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from data.special_tokens import IM_END, IM_START
from data.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer, train_sentencepiece

WORDS = [
  "def",
  "return",
  "self",
  "import",
  "class",
  "    ",
  "x",
  "y",
  "(",
  ")",
  ":",
  "=",
  "+",
  "value",
  "name",
  IM_START,
  IM_END,
]


def make_texts(num_docs: int = 4, lines_per_doc: int = 300) -> list[str]:
  """Documents of ~15 KB each: longer than sentencepiece's 4192-byte sentence limit."""
  rng = np.random.default_rng(0)
  return ["\n".join(" ".join(rng.choice(WORDS, size=10)) for _ in range(lines_per_doc)) for _ in range(num_docs)]


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {"tokenizer": "sentencepiece", "tokenizer_path": "", "tokenizer_vocab_size": 300, "tokenizer_model_type": "bpe"}
  )
  config.update(overrides)
  return config


class CountingCorpus:
  """A corpus_texts callable that counts how often it was called."""

  def __init__(self, texts):
    self.texts, self.calls = texts, 0

  def __call__(self):
    self.calls += 1
    return iter(self.texts)


def test_train_from_texts_is_byte_reproducible_and_round_trips(tmp_path):
  texts = make_texts()
  first = train_sentencepiece(iter(texts), str(tmp_path / "a.model"), vocab_size=300)
  second = train_sentencepiece(iter(texts), str(tmp_path / "b.model"), vocab_size=300)
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  tokenizer = SentencePieceTokenizer(first)
  assert tokenizer.vocab_size == 300
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert SentencePieceTokenizer(second).identity() == tokenizer.identity()
  text = "def  value(self):\n    return x + y  # ünïcode ✓\n"
  (ids,) = tokenizer.encode_batch([text])
  assert tokenizer.decode(ids) == text


def test_user_defined_and_extra_symbols_are_single_pieces(tmp_path):
  path = train_sentencepiece(
    make_texts(), str(tmp_path / "sp.model"), vocab_size=300, extra_symbols=["<tool>", IM_END]
  )  # IM_END again: deduplicated
  tokenizer = SentencePieceTokenizer(path)
  # User-defined pieces follow pad/bos/eos/unk in the order given.
  assert [tokenizer.special_id(s) for s in ("\n", IM_START, IM_END, "<tool>")] == [4, 5, 6, 7]
  (ids,) = tokenizer.encode_batch([f"{IM_START}x\n<tool>{IM_END}"])
  assert ids[0] == 5 and ids[-1] == 6
  assert ids[-3:-1].tolist() == [4, 7]
  assert tokenizer.decode(ids) == f"{IM_START}x\n<tool>{IM_END}"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"model_type": "word"}, "model_type 'word' is not supported; expected one of bpe, unigram"),
    ({"vocab_size": 200}, "data.tokenizer_vocab_size=200: sentencepiece needs an integer above 263"),
    ({"vocab_size": 5000}, r"Vocabulary size too high \(5000\)"),
    ({"extra_symbols": [""]}, "extra_symbols must be non-empty strings"),
  ],
)
def test_train_rejects_bad_options(tmp_path, kwargs, message):
  kwargs = {"vocab_size": 300, **kwargs}
  with pytest.raises(ValueError, match=message):
    train_sentencepiece(make_texts(1), str(tmp_path / "sp.model"), **kwargs)


def test_train_rejects_texts_without_lines(tmp_path):
  with pytest.raises(ValueError, match="the texts hold no non-empty line"):
    train_sentencepiece(["", " \n\n"], str(tmp_path / "sp.model"), vocab_size=300)


def test_build_tokenizer_calls_corpus_once_and_caches(tmp_path):
  corpus = CountingCorpus(make_texts())
  built = build_tokenizer(make_config(), corpus, str(tmp_path))
  assert corpus.calls == 1 and built.vocab_size == 300
  cached = build_tokenizer(make_config(), corpus, str(tmp_path))
  assert corpus.calls == 1 and cached.identity() == built.identity()

  chars = CountingCorpus(["abc", "cd"])
  assert build_tokenizer(make_config(tokenizer="char"), chars, str(tmp_path)).chars == "abcd"
  assert build_tokenizer(make_config(tokenizer="char"), chars, str(tmp_path)).chars == "abcd"
  assert chars.calls == 1
  assert build_tokenizer(make_config(tokenizer="byte"), chars, str(tmp_path)).vocab_size == 259
  assert chars.calls == 1


def test_llama_style_model_without_pad_loads(tmp_path):
  # Llama 2 and Gemma ship models with unk at 0, bos/eos present and no pad piece.
  lines = "\n".join(make_texts(1)).split("\n")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_prefix=str(tmp_path / "llama"),
    vocab_size=300,
    model_type="bpe",
    pad_id=-1,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    byte_fallback=True,
    minloglevel=2,
  )
  corpus = CountingCorpus([])
  config = make_config(tokenizer_path=str(tmp_path / "llama.model"))
  tokenizer = build_tokenizer(config, corpus, str(tmp_path / "workdir"))
  assert corpus.calls == 0
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (None, 1, 2)
  assert tokenizer.vocab_size == 300
  assert tokenizer.special_id(IM_START) is None  # not in this vocabulary: spelled out
  assert tokenizer.special_id("<s>") == 1
  assert tokenizer.special_id("<unk>") == 0
  (ids,) = tokenizer.encode_batch(["return value"])
  assert tokenizer.decode(ids) == "return value"


def test_special_id_of_byte_and_char_tokenizers_is_none():
  assert ByteTokenizer().special_id(IM_START) is None
  assert ByteTokenizer().special_id("a") is None
  assert CharTokenizer.from_texts(["ab"]).special_id("a") is None


def test_lines_longer_than_sentencepiece_takes_are_trained_on_in_pieces(tmp_path):
  # One 40 KB line (a minified file, say): sentencepiece drops any sentence over 4192 bytes,
  # so whole it left nothing to train on; in pieces it is learned like any other text.
  words = " ".join(["alpha", "beta", "gamma", "delta", "épsilon"] * 1400)
  path = train_sentencepiece([words], str(tmp_path / "sp.model"), vocab_size=300)
  (ids,) = SentencePieceTokenizer(path).encode_batch(["alpha beta gamma"])
  assert len(ids) < len("alpha beta gamma") // 2  # Merged pieces, not bytes.
