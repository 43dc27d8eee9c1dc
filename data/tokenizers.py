"""Tokenizers with one small interface: bytes, characters, sentencepiece.

Every tokenizer exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id` (None when it
has no such token), `encode_batch(texts)` and `decode(ids)`, and `identity()`,
a string that changes whenever the text -> ids mapping changes (used to key
the tokenized-data cache).
"""
import abc
import hashlib
import json
import os
import tempfile
import time
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2


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


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted by 3 so that 0/1/2 are free for pad/bos/eos."""

  _OFFSET = 3

  def __init__(self):
    self.vocab_size = 256 + self._OFFSET
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode('utf-8'), np.uint8).astype(np.int32)
            + self._OFFSET for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    # Special tokens carry no text; drop them instead of mangling the bytes.
    ids = ids[ids >= self._OFFSET] - self._OFFSET
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def identity(self) -> str:
    return 'byte'


class CharTokenizer(Tokenizer):
  """One id per character of the corpus, nanoGPT style: no special tokens."""

  def __init__(self, chars: Sequence[str]):
    self.chars = ''.join(chars)
    self.vocab_size = len(self.chars)
    self.pad_id = self.bos_id = self.eos_id = None
    # A lookup table over code points makes encoding one numpy gather per text.
    max_code = max((ord(c) for c in self.chars), default=0)
    self._code_to_id = np.full(max_code + 1, -1, np.int32)
    for i, c in enumerate(self.chars):
      self._code_to_id[ord(c)] = i

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> 'CharTokenizer':
    charset = set()
    for text in texts:
      charset.update(text)
    return cls(sorted(charset))

  @classmethod
  def load(cls, path: str) -> 'CharTokenizer':
    with open(path, encoding='utf-8') as f:
      return cls(json.load(f)['chars'])

  def save(self, path: str) -> None:
    _write_atomically(path, json.dumps({'chars': self.chars}).encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self._encode(t) for t in texts]

  def _encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32).astype(np.int64)
    known = codes < len(self._code_to_id)
    ids = np.where(known, self._code_to_id[np.where(known, codes, 0)], -1)
    if (ids < 0).any():
      unknown = sorted({chr(c) for c in codes[ids < 0]})
      raise ValueError(
          f'CharTokenizer: characters {unknown[:20]!r} are not in the '
          f'{self.vocab_size}-character vocabulary (it was built from another '
          'corpus; delete WORKDIR/tokenizer/char_vocab.json to rebuild it).')
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return ''.join(self.chars[i] for i in np.asarray(ids).tolist())

  def identity(self) -> str:
    return 'char:' + hashlib.sha256(self.chars.encode('utf-8')).hexdigest()


class SentencePieceTokenizer(Tokenizer):
  """A trained sentencepiece model (.model file)."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    with open(model_path, 'rb') as f:
      self._model_bytes = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = _none_if_negative(self._sp.pad_id())
    self.bos_id = _none_if_negative(self._sp.bos_id())
    self.eos_id = _none_if_negative(self._sp.eos_id())

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # One call for the whole batch: sentencepiece then works in C++ over the
    # list; a Python loop of per-text calls is ~25x slower.
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(np.asarray(ids).tolist())

  def identity(self) -> str:
    return 'sentencepiece:' + hashlib.sha256(self._model_bytes).hexdigest()


def _none_if_negative(token_id: int) -> int | None:
  return None if token_id < 0 else token_id


def _write_atomically(path: str, data: bytes) -> None:
  """Write-then-rename so concurrent processes never read a half file."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path) or '.')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp_path, path)


def _lines_of(paths: Sequence[str]) -> Iterator[str]:
  # Sentencepiece silently drops "sentences" longer than max_sentence_length,
  # so it is fed lines, never whole documents.
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for line in f:
        line = line.rstrip('\n')
        if line.strip():
          yield line


def train_sentencepiece(paths: Sequence[str], output_path: str, *,
                        vocab_size: int, model_type: str = 'bpe',
                        num_threads: int = 2,
                        max_sentences: int = 2_000_000) -> str:
  """Trains a sentencepiece model on the lines of `paths`; returns its path.

  The options keep text exactly round-trippable (identity normalisation,
  whitespace kept, byte fallback for anything unseen), which matters for code.
  """
  spm.set_random_generator_seed(0)  # Sentence sampling must be reproducible.
  output_dir = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(output_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=output_dir) as tmp_dir:
    prefix = os.path.join(tmp_dir, 'sp')
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines_of(paths),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        byte_fallback=True,
        user_defined_symbols=['\n'],  # Lines were split off; keep '\n' 1 token.
        normalization_rule_name='identity',
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
    model = sentencepiece_model_pb2.ModelProto()
    with open(prefix + '.model', 'rb') as f:
      model.ParseFromString(f.read())
    # The proto records the temp dir it was written to; clear it so the same
    # inputs give byte-identical models (and so the same data-cache key).
    model.trainer_spec.model_prefix = ''
    _write_atomically(output_path, model.SerializeToString())
  return output_path


TOKENIZER_NAMES = ('sentencepiece', 'byte', 'char')


def build_tokenizer(data_config, train_paths: Sequence[str],
                    workdir: str) -> Tokenizer:
  """Loads or builds the tokenizer named by `data_config.tokenizer`.

  Learned vocabularies (char, sentencepiece) are cached in WORKDIR/tokenizer/
  so a resumed run or a sampler maps text to ids exactly as training did.
  """
  name = data_config.tokenizer
  if name not in TOKENIZER_NAMES:
    raise ValueError(f'data.tokenizer: unknown tokenizer {name!r}; expected '
                     f'one of {", ".join(TOKENIZER_NAMES)}.')
  if name == 'byte':
    return ByteTokenizer()
  cache_dir = os.path.join(workdir, 'tokenizer')
  if name == 'char':
    return _build_char_tokenizer(train_paths, cache_dir)
  return _build_sentencepiece_tokenizer(data_config, train_paths, cache_dir)


def _build_char_tokenizer(train_paths: Sequence[str],
                          cache_dir: str) -> CharTokenizer:
  vocab_path = os.path.join(cache_dir, 'char_vocab.json')
  if os.path.exists(vocab_path):
    tokenizer = CharTokenizer.load(vocab_path)
    logging.info('Loaded char vocabulary (%d chars) from %s',
                 tokenizer.vocab_size, vocab_path)
    return tokenizer

  def texts():
    for path in train_paths:
      with open(path, encoding='utf-8') as f:
        yield f.read()

  tokenizer = CharTokenizer.from_texts(texts())
  tokenizer.save(vocab_path)
  logging.info('Built char vocabulary (%d chars), saved to %s',
               tokenizer.vocab_size, vocab_path)
  return tokenizer


def _build_sentencepiece_tokenizer(data_config, train_paths: Sequence[str],
                                   cache_dir: str) -> SentencePieceTokenizer:
  model_path = data_config.get('tokenizer_path', '')
  if model_path:
    if not os.path.isfile(model_path):
      raise ValueError(
          f'data.tokenizer_path: file {model_path} does not exist.')
    return SentencePieceTokenizer(model_path)

  vocab_size = data_config.tokenizer_vocab_size
  cached_path = os.path.join(cache_dir, 'sp.model')
  if os.path.exists(cached_path):
    tokenizer = SentencePieceTokenizer(cached_path)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(
          f'data.tokenizer_vocab_size={vocab_size} but the cached model '
          f'{cached_path} has {tokenizer.vocab_size} pieces; delete it or use '
          'a fresh workdir.')
    logging.info('Loaded cached sentencepiece model %s (vocab %d)',
                 cached_path, vocab_size)
    return tokenizer

  model_type = data_config.get('tokenizer_model_type', 'bpe')
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f'data.tokenizer_model_type: unknown model type '
                     f'{model_type!r}; expected bpe or unigram.')
  logging.info('Training a %s sentencepiece model (vocab %d) on %d files',
               model_type, vocab_size, len(train_paths))
  start = time.perf_counter()
  train_sentencepiece(train_paths, cached_path, vocab_size=vocab_size,
                      model_type=model_type)
  logging.info('Trained sentencepiece model in %.2fs, saved to %s',
               time.perf_counter() - start, cached_path)
  return SentencePieceTokenizer(cached_path)
