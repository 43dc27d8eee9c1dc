"""loom data: sources -> tokenizer -> packed rows (in memory or prepared on disk) -> batches.

Independent of model/, training/ and sharding/. The names below are loaded on first use: importing
one light module (data.files, which every writer of a file uses) must not load TensorFlow.
"""

import importlib

_HOMES = {
  "build_datasets": "data.datasets",
  "Datasets": "data.datasets",
  "PackedRows": "data.packing",
  "build_tokenizer": "data.tokenizers",
  "ByteTokenizer": "data.tokenizers",
  "CharTokenizer": "data.tokenizers",
  "SentencePieceTokenizer": "data.tokenizers",
  "Tokenizer": "data.tokenizers",
}
__all__ = list(_HOMES)


def __getattr__(name):
  if name not in _HOMES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_HOMES[name]), name)
  globals()[name] = value  # Looked up once.
  return value
