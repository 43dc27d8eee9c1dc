"""Metrics: held-out loss, perplexity, bits per byte and accuracy from summed totals; text metrics.

Held-out metrics are pooled over tokens, never averaged over batches: the eval step returns sums
(summed cross-entropy in nats, target tokens, targets predicted by the argmax, UTF-8 bytes of the
targets) and `summarize` turns any pooled totals into the means. Bits per byte, total loss / ln 2 /
total bytes, compares models whose tokenizers cut the same text into different numbers of tokens.

Text metrics: BLEU and chrF are sacrebleu's corpus scores (an optional dependency,
evaluation/requirements.txt); exact match and token F1 follow SQuAD's official script.
"""

import collections
import json
import math
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

MAX_LOSS_FOR_PERPLEXITY = 50.0  # exp(50) ~ 5e21: a diverged model logs a finite number, not inf.


def summarize(totals: Mapping[str, float]) -> dict[str, float]:
  """{"loss", "tokens"[, "correct", "bytes"]} sums -> {"loss", "perplexity"[, "bits_per_byte", "accuracy"]}.

  loss: nats per target token; bits_per_byte: the summed loss / ln 2 / the targets' UTF-8 bytes;
  accuracy: the share of targets that are the model's argmax prediction.
  """
  tokens = max(totals.get("tokens", 0.0), 1.0)
  loss = totals.get("loss", 0.0) / tokens
  out = {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY))}
  if "bytes" in totals:
    out["bits_per_byte"] = totals["loss"] / math.log(2) / max(totals["bytes"], 1.0)
  if "correct" in totals:
    out["accuracy"] = totals["correct"] / tokens
  return out


def add_totals(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
  return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in {**a, **b}}


# --- Bytes per token.


def byte_lengths(tokenizer, vocab_size: int | None = None) -> np.ndarray:
  """[V] float32: the UTF-8 bytes each token id stands for in decoded text; 0 for special tokens
  (pad, bos, eos, control and added special tokens), which decode to no text. With `vocab_size` (a
  model's, which may be padded past the tokenizer's), that many entries, the extra ones 0."""
  from data import tokenizers  # Imported here: data/ loads TensorFlow, which the hook's metrics do not need.

  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    lengths = np.ones(tokenizer.vocab_size, np.float32)
    lengths[: tokenizer._OFFSET] = 0.0
  elif isinstance(tokenizer, tokenizers.CharTokenizer):
    lengths = np.array([len(c.encode("utf-8")) for c in tokenizer.chars], np.float32)
  elif isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    lengths = _sentencepiece_lengths(tokenizer._sp)
  elif isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
    lengths = _tokenizer_json_lengths(json.loads(tokenizer._json_bytes), tokenizer.vocab_size)
  else:  # Another Tokenizer: each id decoded alone (a byte-level piece of a character may count 3).
    lengths = np.array([len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)], np.float32)
  for special in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id):
    if special is not None and special < len(lengths):
      lengths[special] = 0.0
  if vocab_size is not None:
    lengths = np.pad(lengths, (0, max(vocab_size - len(lengths), 0)))[:vocab_size]
  return lengths


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_METASPACE = "\u2581"  # "▁", sentencepiece's space.


def _piece_bytes(piece: str) -> int:
  """A sentencepiece-style piece: "<0x0A>" is one byte, "▁" a space."""
  if _BYTE_PIECE.fullmatch(piece):
    return 1
  return len(piece.replace(_METASPACE, " ").encode("utf-8"))


def _sentencepiece_lengths(sp) -> np.ndarray:
  lengths = np.zeros(sp.get_piece_size(), np.float32)
  for i in range(len(lengths)):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    lengths[i] = 1 if sp.is_byte(i) else _piece_bytes(sp.id_to_piece(i))
  return lengths


def _byte_level_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _mentions(tree, value: str) -> bool:
  if isinstance(tree, dict):
    return any(_mentions(v, value) for v in tree.values())
  if isinstance(tree, list):
    return any(_mentions(v, value) for v in tree)
  return tree == value


def _tokenizer_json_lengths(spec: dict, vocab_size: int) -> np.ndarray:
  """From a tokenizer.json: a byte-level vocabulary (GPT-2, Llama 3, Qwen2) spells every byte as
  one character; a sentencepiece-style one (Llama 2, Mistral) writes spaces as "▁" and unknown
  bytes as "<0xAB>". Added tokens are their text, or nothing when special."""
  lengths = np.zeros(vocab_size, np.float32)
  byte_level = _mentions(spec.get("decoder"), "ByteLevel") or _mentions(spec.get("pre_tokenizer"), "ByteLevel")
  alphabet = _byte_level_decoder()
  vocab = (spec.get("model") or {}).get("vocab") or {}
  if isinstance(vocab, list):  # A Unigram model: [[piece, score], ...] by id.
    vocab = {entry[0]: i for i, entry in enumerate(vocab)}
  for token, token_id in vocab.items():
    if token_id < vocab_size:
      lengths[token_id] = (
        sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token) if byte_level else _piece_bytes(token)
      )
  for added in spec.get("added_tokens") or []:
    if added["id"] < vocab_size:
      lengths[added["id"]] = 0.0 if added.get("special") else len(added["content"].encode("utf-8"))
  return lengths


# --- Text metrics.


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lowercase, no punctuation, no articles (a, an, the), single spaces."""
  text = "".join(c for c in text.lower() if c not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals any normalised reference."""
  return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
  """The best F1 over the references of the normalised words in common (SQuAD); two empty answers agree."""
  best = 0.0
  predicted = normalize_answer(prediction).split()
  for reference in references:
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
      best = max(best, float(predicted == expected))
      continue
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common:
      precision, recall = common / len(predicted), common / len(expected)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
  """Per example references -> sacrebleu's streams (the k-th reference of every example; None where
  an example has fewer)."""
  width = max((len(r) for r in references), default=0)
  return [[r[k] if k < len(r) else None for r in references] for k in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation) of the hypotheses against each
  example's references."""
  import sacrebleu

  return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """sacrebleu's corpus chrF (0-100)."""
  import sacrebleu

  return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(references)).score)
