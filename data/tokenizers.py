"""Tokenizers with one small interface: bytes, characters, sentencepiece, Hugging Face tokenizer.json.

Every tokenizer exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id` (None when it
has no such token), `encode_batch(texts)` and `decode(ids)`, `special_id(piece)`
(the id of a piece that is one token, such as a chat marker), and `identity()`,
a string that changes whenever the text -> ids mapping changes (used to key
the tokenized-data cache).
"""

import abc
import hashlib
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from absl import logging

from data import special_tokens
from data.files import atomic_write


class Tokenizer(abc.ABC):
  """Common interface used by the corpus reader, packer and samplers."""

  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes each text to an int32 id array (no bos/eos added)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids back to text."""

  @abc.abstractmethod
  def identity(self) -> str:
    """A string that changes whenever the text -> ids mapping changes."""

  def special_id(self, piece: str) -> int | None:
    """The id of `piece` when the vocabulary has it as one token, else None.

    Used to tell whether chat markers such as '<|im_start|>' are single tokens
    or have to be spelled out as text.
    """
    del piece  # Byte and char vocabularies have no multi-character tokens.
    return None


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted by 3 so that 0/1/2 are free for pad/bos/eos."""

  _OFFSET = 3

  def __init__(self):
    self.vocab_size = 256 + self._OFFSET
    self.pad_id = special_tokens.PAD_ID
    self.bos_id = special_tokens.BOS_ID
    self.eos_id = special_tokens.EOS_ID

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + self._OFFSET for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    # Special tokens carry no text; drop them instead of mangling the bytes.
    ids = ids[ids >= self._OFFSET] - self._OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def identity(self) -> str:
    return "byte"


class CharTokenizer(Tokenizer):
  """One id per character of the corpus, nanoGPT style: no special tokens."""

  def __init__(self, chars: Sequence[str]):
    self.chars = "".join(chars)
    self.vocab_size = len(self.chars)
    self.pad_id = self.bos_id = self.eos_id = None
    # A lookup table over code points makes encoding one numpy gather per text.
    max_code = max((ord(c) for c in self.chars), default=0)
    self._code_to_id = np.full(max_code + 1, -1, np.int32)
    for i, c in enumerate(self.chars):
      self._code_to_id[ord(c)] = i

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
    charset = set()
    for text in texts:
      charset.update(text)
    return cls(sorted(charset))

  @classmethod
  def load(cls, path: str) -> "CharTokenizer":
    with open(path, encoding="utf-8") as f:
      return cls(json.load(f)["chars"])

  def save(self, path: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:  # Other processes may be reading it.
      json.dump({"chars": self.chars}, f)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self._encode(t) for t in texts]

  def _encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    known = codes < len(self._code_to_id)
    ids = np.where(known, self._code_to_id[np.where(known, codes, 0)], -1)
    if (ids < 0).any():
      unknown = sorted({chr(c) for c in codes[ids < 0]})
      raise ValueError(
        f"characters {unknown[:20]!r} are not in the {self.vocab_size}-character "
        "vocabulary of the char tokenizer, built from the corpus when the workdir "
        "was started (WORKDIR/tokenizer/char_vocab.json); text with new characters "
        "needs a new --workdir, since the model has no ids for them."
      )
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).tolist())

  def identity(self) -> str:
    return "char:" + hashlib.sha256(self.chars.encode("utf-8")).hexdigest()


class SentencePieceTokenizer(Tokenizer):
  """A trained sentencepiece model (.model file)."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    with open(model_path, "rb") as f:
      self._model_bytes = f.read()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
    except RuntimeError as e:
      raise ValueError(
        f"data.tokenizer_path: {model_path} is not a sentencepiece model ({str(e).strip()[:120]})."
      ) from None
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = _none_if_negative(self._sp.pad_id())
    self.bos_id = _none_if_negative(self._sp.bos_id())
    self.eos_id = _none_if_negative(self._sp.eos_id())

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # One call for the whole batch: sentencepiece then works in C++ over the
    # list, where a Python loop of per-text calls pays the call overhead per text.
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(np.asarray(ids).tolist())

  def special_id(self, piece: str) -> int | None:
    # piece_to_id answers unk for a piece it does not know; a piece that maps
    # back to itself is in the vocabulary (user-defined and control pieces too).
    token_id = self._sp.piece_to_id(piece)
    return token_id if self._sp.id_to_piece(token_id) == piece else None

  def identity(self) -> str:
    return "sentencepiece:" + hashlib.sha256(self._model_bytes).hexdigest()


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer.json (Llama 3, Qwen2, GPT-2 and most recent models).

  The bos/eos/pad tokens are named in the tokenizer_config.json that
  transformers saves beside tokenizer.json; without one, the usual names
  ('<|begin_of_text|>', '<s>', '<|endoftext|>', ...) are looked up.
  """

  # Names tried, in order, when no tokenizer_config.json names the token.
  _DEFAULT_NAMES = {
    "bos_token": ("<|begin_of_text|>", "<s>", "<|startoftext|>"),
    "eos_token": ("<|end_of_text|>", "</s>", "<|endoftext|>"),
    "pad_token": ("<pad>", "<|pad|>"),
  }

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      self._json_bytes = f.read()
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(self._json_bytes.decode("utf-8"))
    except Exception as e:  # The Rust parser's errors have no common Python type.
      raise ValueError(
        f"data.tokenizer_path: {path} is not a tokenizer.json that the tokenizers library can read: {e}"
      ) from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    named = _special_tokens_beside(path)
    ids = {}
    for kind, defaults in self._DEFAULT_NAMES.items():
      names = (named[kind],) if kind in named else defaults
      ids[kind] = next((i for i in map(self._tokenizer.token_to_id, names) if i is not None), None)
    self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # add_special_tokens=False: no bos/eos from the post-processor, as the interface promises.
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(encoding.ids, np.int32) for encoding in encodings]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    # Like sentencepiece: bos/eos/pad carry no text, but chat markers are kept.
    control = {self.bos_id, self.eos_id, self.pad_id} - {None}
    kept = [i for i in np.asarray(ids).tolist() if i not in control]
    return self._tokenizer.decode(kept, skip_special_tokens=False)

  def special_id(self, piece: str) -> int | None:
    return self._tokenizer.token_to_id(piece)

  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry of `token_id` (e.g. '<|endoftext|>'), as tokenizer_config.json names it."""
    return self._tokenizer.id_to_token(token_id)

  def identity(self) -> str:
    return "huggingface:" + hashlib.sha256(self._json_bytes).hexdigest()


def _special_tokens_beside(path: str) -> dict[str, str]:
  """bos/eos/pad token names from the tokenizer_config.json next to `path`, when there is one."""
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return {}
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path}: not readable JSON ({e})") from None
  names = {}
  for kind in HuggingFaceTokenizer._DEFAULT_NAMES:
    value = config.get(kind)
    if isinstance(value, dict):  # An AddedToken written out: {"content": "<s>", ...}.
      value = value.get("content")
    if isinstance(value, str):
      names[kind] = value
  return names


def _none_if_negative(token_id: int) -> int | None:
  return None if token_id < 0 else token_id


MODEL_TYPES = ("bpe", "unigram")


class NoTextError(ValueError):
  """There is no text to learn a vocabulary from."""


# Sentencepiece silently drops "sentences" over its max_sentence_length (4192 bytes), so it
# is fed lines, never whole documents, and a longer line in pieces of at most this many
# characters (4 UTF-8 bytes each at most).
_MAX_PIECE_CHARS = 1024


def _lines_of(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.split("\n"):
      for start in range(0, len(line), _MAX_PIECE_CHARS):
        piece = line[start : start + _MAX_PIECE_CHARS]
        if piece.strip():
          yield piece


def train_sentencepiece(
  texts: Iterable[str],
  output_path: str,
  *,
  vocab_size: int,
  model_type: str = "bpe",
  num_threads: int = 2,
  max_sentences: int = 2_000_000,
  extra_symbols: Sequence[str] = (),
) -> str:
  """Trains a sentencepiece model on the lines of `texts`; returns its path.

  The options keep text exactly round-trippable (identity normalisation,
  whitespace kept, byte fallback for anything unseen), which matters for code.
  The newline, the chat markers and `extra_symbols` become single pieces.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"sentencepiece model_type {model_type!r} is not supported; expected one of {', '.join(MODEL_TYPES)}."
    )
  symbols = tuple(
    dict.fromkeys(  # In order, without duplicates.
      special_tokens.USER_DEFINED_SYMBOLS + tuple(extra_symbols)
    )
  )
  if not all(isinstance(s, str) and s for s in symbols):
    raise ValueError(f"extra_symbols must be non-empty strings; got {list(extra_symbols)!r}.")
  # Every model holds pad/bos/eos/unk, the user-defined pieces and 256 bytes;
  # sentencepiece then needs room for the corpus characters (checked below).
  min_vocab_size = 4 + len(symbols) + 256
  if not isinstance(vocab_size, int) or vocab_size <= min_vocab_size:
    raise ValueError(
      f"data.tokenizer_vocab_size={vocab_size!r}: sentencepiece needs an "
      f"integer above {min_vocab_size} (4 special tokens, "
      f"{len(symbols)} user-defined symbols, 256 byte pieces, "
      "plus the characters of the corpus)."
    )
  lines = _lines_of(texts)
  first_line = next(lines, None)
  if first_line is None:
    raise NoTextError("train_sentencepiece: the texts hold no non-empty line.")

  spm.set_random_generator_seed(0)  # Sentence sampling must be reproducible.
  model = io.BytesIO()
  try:
    # Written to memory, the model records no path (model_prefix stays '' and
    # there are no input files), so the same texts give byte-identical models
    # and thus the same data-cache key.
    spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.chain([first_line], lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=special_tokens.PAD_ID,
      pad_piece=special_tokens.PAD,
      bos_id=special_tokens.BOS_ID,
      bos_piece=special_tokens.BOS,
      eos_id=special_tokens.EOS_ID,
      eos_piece=special_tokens.EOS,
      unk_id=special_tokens.UNK_ID,
      unk_piece=special_tokens.UNK,
      byte_fallback=True,
      user_defined_symbols=list(symbols),
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      character_coverage=0.9995,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      num_threads=num_threads,
      minloglevel=2,
    )
  except RuntimeError as e:
    # E.g. "Vocabulary size too high (5000). Please set it to a value <= 308."
    raise ValueError(
      f"training a sentencepiece tokenizer with data.tokenizer_vocab_size={vocab_size}, "
      f"data.tokenizer_model_type={model_type!r} failed: {e}"
    ) from e
  with atomic_write(output_path, "wb") as f:  # Other processes may be reading it.
    f.write(model.getvalue())
  return output_path


TOKENIZER_NAMES = ("sentencepiece", "byte", "char", "huggingface")


def build_tokenizer(data_config, corpus_texts: Callable[[], Iterator[str]], workdir: str) -> Tokenizer:
  """Loads or builds the tokenizer named by `data_config.tokenizer`.

  Learned vocabularies (char, sentencepiece) are built from the document texts
  that `corpus_texts()` yields; it is called at most once, and only when a
  vocabulary has to be built. They are cached in WORKDIR/tokenizer/ so a
  resumed run or a sampler maps text to ids exactly as training did.
  """
  name = data_config.tokenizer
  if name not in TOKENIZER_NAMES:
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZER_NAMES)}.")
  if name == "byte":
    return ByteTokenizer()
  if name == "huggingface":
    path = data_config.get("tokenizer_path", "")
    if not path or not os.path.isfile(path):
      raise ValueError(f"data.tokenizer=huggingface needs data.tokenizer_path, a tokenizer.json file; got {path!r}.")
    return HuggingFaceTokenizer(path)
  cache_dir = os.path.join(workdir, "tokenizer")
  if name == "char":
    return _build_char_tokenizer(corpus_texts, cache_dir)
  return _build_sentencepiece_tokenizer(data_config, corpus_texts, cache_dir)


def _build_char_tokenizer(corpus_texts: Callable[[], Iterator[str]], cache_dir: str) -> CharTokenizer:
  vocab_path = os.path.join(cache_dir, "char_vocab.json")
  if os.path.exists(vocab_path):
    tokenizer = CharTokenizer.load(vocab_path)
    logging.info("Loaded char vocabulary (%d chars) from %s", tokenizer.vocab_size, vocab_path)
    return tokenizer
  tokenizer = CharTokenizer.from_texts(corpus_texts())
  tokenizer.save(vocab_path)
  logging.info("Built char vocabulary (%d chars), saved to %s", tokenizer.vocab_size, vocab_path)
  return tokenizer


def _build_sentencepiece_tokenizer(
  data_config, corpus_texts: Callable[[], Iterator[str]], cache_dir: str
) -> SentencePieceTokenizer:
  model_path = data_config.get("tokenizer_path", "")
  if model_path:
    if not os.path.isfile(model_path):
      raise ValueError(f"data.tokenizer_path: file {model_path} does not exist.")
    return SentencePieceTokenizer(model_path)

  vocab_size = data_config.tokenizer_vocab_size
  cached_path = os.path.join(cache_dir, "sp.model")
  if os.path.exists(cached_path):
    tokenizer = SentencePieceTokenizer(cached_path)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(
        f"data.tokenizer_vocab_size={vocab_size} but the cached model "
        f"{cached_path} has {tokenizer.vocab_size} pieces; delete it or use "
        "a fresh workdir."
      )
    logging.info("Loaded cached sentencepiece model %s (vocab %d)", cached_path, vocab_size)
    return tokenizer

  model_type = data_config.get("tokenizer_model_type", "bpe")
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"data.tokenizer_model_type: unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}."
    )
  logging.info("Training a %s sentencepiece model (vocab %d)", model_type, vocab_size)
  start = time.perf_counter()
  train_sentencepiece(corpus_texts(), cached_path, vocab_size=vocab_size, model_type=model_type)
  logging.info("Trained sentencepiece model in %.2fs, saved to %s", time.perf_counter() - start, cached_path)
  return SentencePieceTokenizer(cached_path)
