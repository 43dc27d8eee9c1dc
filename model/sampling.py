"""Autoregressive sampling over a sliding window: each token recomputes its whole window (no cache).

model/decode.py's `generate` (a key/value cache) is what loom generates with; this is its peer in
benchmarks/decode.py, the cost of recomputing the prefix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  prompts: list[list[int]],
  num_tokens: int,
  window: int,
  temperature: float,
  seed: int,
) -> list[list[int]]:
  """Extends each prompt by `num_tokens` tokens; temperature 0 is greedy."""
  batch = len(prompts)
  buffer = np.zeros((batch, window), np.int32)
  lengths = np.zeros((batch,), np.int32)
  for i, prompt in enumerate(prompts):
    prompt = list(prompt)[-window:] or [0]
    buffer[i, : len(prompt)] = prompt
    lengths[i] = len(prompt)

  next_tokens = _next_tokens(graphdef, temperature)
  outputs = [list(p) for p in prompts]
  key = jax.random.key(seed)
  for t in range(num_tokens):
    tokens = np.asarray(next_tokens(params, buffer, lengths, jax.random.fold_in(key, t)))
    for i in range(batch):
      outputs[i].append(int(tokens[i]))
      if lengths[i] == window:  # Slide the window: drop the oldest token.
        buffer[i, :-1] = buffer[i, 1:]
        buffer[i, -1] = tokens[i]
      else:
        buffer[i, lengths[i]] = tokens[i]
        lengths[i] += 1
  return outputs


@functools.lru_cache(maxsize=16)
def _next_tokens(graphdef: nnx.GraphDef, temperature: float):
  """The jitted step of `sample`, kept across calls so a second call compiles nothing."""

  @jax.jit
  def next_tokens(params, tokens_BL, lengths_B, key):
    logits_BLV = nnx.merge(graphdef, params)(tokens_BL)
    last_BV = jnp.take_along_axis(logits_BLV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    if temperature == 0:
      return jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, last_BV / temperature).astype(jnp.int32)

  return next_tokens
