"""Finds the corpus files and turns them into tokenized documents.

One file is one document. Reading and tokenizing run in a tf.data pipeline so
file I/O overlaps with the (batched, C++) tokenizer call.
"""
import glob
import os
import sysconfig
from typing import Sequence

import numpy as np

from data.tf_cpu import tf
from data.tokenizers import Tokenizer

# Test suites and the IDLE GUI are large and unrepresentative of library code.
# encodings/ is mostly generated code-page tables: noise for a language model.
_STDLIB_SKIPPED_DIRS = frozenset({'site-packages', 'test', 'tests', 'idlelib', 'encodings'})
_READ_BATCH_SIZE = 64


def resolve_paths(paths: str, max_files: int = 0) -> list[str]:
  """Expands `data.paths` into a sorted list of readable UTF-8 files.

  Args:
    paths: comma-separated globs; '' means the .py files of Python's stdlib.
    max_files: keep only the first N files after sorting (0 keeps all).

  Returns:
    The file list, in a deterministic order.
  """
  if paths.strip():
    files = set()
    for pattern in (p.strip() for p in paths.split(',') if p.strip()):
      matched = [f for f in glob.glob(pattern, recursive=True)
                 if os.path.isfile(f)]
      if not matched:
        raise ValueError(f'data.paths: pattern {pattern!r} matches no files.')
      files.update(matched)
    candidates = sorted(files)
  else:
    candidates = _stdlib_python_files()
  selected = []
  for path in candidates:
    if max_files and len(selected) >= max_files:
      break
    if _is_utf8(path):  # Checked lazily so max_files stops the scan early.
      selected.append(path)
  if not selected:
    raise ValueError(f'data.paths: no UTF-8 readable files in {paths!r}.')
  if all(os.path.getsize(p) == 0 for p in selected):
    raise ValueError(f'data.paths: all {len(selected)} files matched by '
                     f'{paths!r} are empty.')
  return selected


def _stdlib_python_files() -> list[str]:
  stdlib = sysconfig.get_paths()['stdlib']
  files = []
  for root, dirs, names in os.walk(stdlib):
    dirs[:] = [d for d in dirs if d not in _STDLIB_SKIPPED_DIRS]
    files.extend(os.path.join(root, n) for n in names if n.endswith('.py'))
  return sorted(files)


def _is_utf8(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      f.read().decode('utf-8')
    return True
  except (UnicodeDecodeError, OSError):
    return False


def read_documents(paths: Sequence[str],
                   tokenizer: Tokenizer) -> list[np.ndarray]:
  """Reads and tokenizes each file; returns one int32 id array per file.

  The order of the result is the order of `paths`.
  """
  def encode(contents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    texts = [c.decode('utf-8') for c in contents]
    ids = tokenizer.encode_batch(texts)
    lengths = np.array([len(x) for x in ids], np.int64)
    flat = np.concatenate(ids).astype(np.int32) if ids else np.zeros(
        0, np.int32)
    # numpy_function can only return flat tensors: ids + lengths, split later.
    return flat, lengths

  def encode_in_tf(contents):
    flat, lengths = tf.numpy_function(encode, [contents],
                                      (tf.int32, tf.int64), stateful=False)
    return flat, lengths

  dataset = (
      tf.data.Dataset.from_tensor_slices(list(paths))
      .map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE,
           deterministic=True)
      .batch(_READ_BATCH_SIZE)
      .map(encode_in_tf, num_parallel_calls=tf.data.AUTOTUNE,
           deterministic=True)
      .prefetch(tf.data.AUTOTUNE))
  documents = []
  for flat, lengths in dataset.as_numpy_iterator():
    documents.extend(np.split(flat, np.cumsum(lengths)[:-1]))
  return documents
