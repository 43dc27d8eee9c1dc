"""Small configs, deterministic batches and stand-ins shared by the tests."""

import numpy as np

from configs import tiny
from training.validation import validate


def tiny_config(vocab_size: int = 256, **mesh):
  config = tiny.get_config()
  config.model.vocab_size = vocab_size
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.mesh.update(**mesh)
  return config


def validated(config, num_devices: int):
  return validate(config, num_devices, tokenizer_vocab_size=config.model.vocab_size)


def batch(global_batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens packed as two documents per row, so the segment mask matters."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (global_batch_size, seq_len + 1)).astype(np.int32)
  split = seq_len // 3
  segment_ids = np.where(np.arange(seq_len) < split, 1, 2).astype(np.int32)
  segment_ids = np.broadcast_to(segment_ids, (global_batch_size, seq_len)).copy()
  positions = np.where(np.arange(seq_len) < split, np.arange(seq_len), np.arange(seq_len) - split)
  positions = np.broadcast_to(positions.astype(np.int32), (global_batch_size, seq_len)).copy()
  weights = np.ones((global_batch_size, seq_len), np.float32)
  weights[:, split - 1] = 0.0  # The last token of document 1 does not predict document 2.
  weights[-1, -5:] = 0.0  # Some padding.
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segment_ids,
    "positions": positions,
    "weights": weights,
  }


class RecordingWriter:
  """A MetricWriter stand-in for hooks under test: keeps what they write."""

  def __init__(self):
    self.records = []

  def write(self, step, record):
    self.records.append((step, record))

  def progress(self, step, record, seconds_per_step):
    pass
