"""On-disk cache of packed rows, so a resumed run does not re-tokenize.

The key covers everything the rows depend on: each file's path, size and
mtime, the tokenizer's identity, seq_len and the validation fraction.
"""
import hashlib
import json
import os
import tempfile
from typing import Sequence

import numpy as np

from data.packing import PackedRows

_FORMAT_VERSION = 1  # Bump when packing changes what the same inputs produce.


def fingerprint(paths: Sequence[str], *, tokenizer_identity: str,
                seq_len: int, validation_fraction: float) -> str:
  files = []
  for path in paths:
    stat = os.stat(path)
    files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
  key = json.dumps({
      'version': _FORMAT_VERSION,
      'files': files,
      'tokenizer': tokenizer_identity,
      'seq_len': seq_len,
      'validation_fraction': validation_fraction,
  }, sort_keys=True)
  return hashlib.sha256(key.encode('utf-8')).hexdigest()[:24]


def cache_path(workdir: str, key: str) -> str:
  return os.path.join(workdir, 'data_cache', f'{key}.npz')


def load(path: str) -> tuple[PackedRows, PackedRows, int] | None:
  """Returns (train rows, val rows, num train tokens), or None if absent."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    train, val = (PackedRows(f[f'{split}_tokens'], f[f'{split}_segment_ids'],
                             f[f'{split}_positions'])
                  for split in ('train', 'val'))
    return train, val, int(f['num_train_tokens'])


def save(path: str, train: PackedRows, val: PackedRows,
         num_train_tokens: int) -> None:
  arrays = {'num_train_tokens': np.int64(num_train_tokens)}
  for split, rows in (('train', train), ('val', val)):
    arrays[f'{split}_tokens'] = rows.tokens
    arrays[f'{split}_segment_ids'] = rows.segment_ids
    arrays[f'{split}_positions'] = rows.positions
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write-then-rename: several processes may share the workdir.
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp_path, path)
