"""On-disk cache of a source's packed rows, so a resumed run does not re-tokenize.

The key (see `cache_key`) covers everything the rows depend on: the source's
identity (config, files with size and mtime), the tokenizer's identity,
seq_len, the validation fraction and the chat settings.
"""

import hashlib
import json
import os

import numpy as np

from data.files import atomic_write
from data.packing import PackedRows

_FORMAT_VERSION = 2  # Bump when packing changes what the same inputs produce.


def cache_key(**parts) -> str:
  key = json.dumps({"version": _FORMAT_VERSION, **parts}, sort_keys=True)
  return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def cache_path(workdir: str, key: str) -> str:
  return os.path.join(workdir, "data_cache", f"{key}.npz")


def load(path: str) -> tuple[PackedRows, PackedRows, dict] | None:
  """Returns (train rows, validation rows, info), or None if absent."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    info = json.loads(str(f["info"]))
    train, val = (
      PackedRows(
        f[f"{split}_tokens"],
        f[f"{split}_segment_ids"],
        f[f"{split}_loss_mask"] if info["has_loss_mask"] else None,
        stream=info["stream"],
      )
      for split in ("train", "val")
    )
  return train, val, info


def save(path: str, train: PackedRows, val: PackedRows, info: dict) -> None:
  info = dict(info, has_loss_mask=train.loss_mask is not None, stream=train.stream)
  arrays = {"info": np.array(json.dumps(info))}
  for split, rows in (("train", train), ("val", val)):
    arrays[f"{split}_tokens"] = rows.tokens
    arrays[f"{split}_segment_ids"] = rows.segment_ids
    arrays[f"{split}_loss_mask"] = rows.full_loss_mask()
  with atomic_write(path, "wb") as f:  # Several processes may share the workdir.
    np.savez(f, **arrays)
