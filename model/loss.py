"""Cross-entropy a chunk of positions at a time, so the [B, L, V] logits never exist at once."""

import functools

import jax
import jax.numpy as jnp
import optax

from model.layers import dense
from sharding import constrain


def chunked_row_losses(
  x_BLD: jax.Array, kernel_DV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """Per row: summed cross-entropy over weighted target tokens [B], and the weight total [B].

  The logits are those of Transformer.__call__ (x [B, L, D] in the compute dtype times the output
  kernel [D, V], accumulated in float32), made `chunk` positions of every row at a time by a
  lax.scan whose step is rematerialised: neither pass keeps the logits of more than one chunk.
  A row that `chunk` does not divide ends in a chunk padded with zero-weight positions.
  """
  batch, length, _ = x_BLD.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  weight_B = jnp.sum(weights_BL, axis=1)
  if pad:
    x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))

  def chunks(a_BL):  # [B, T*C, ...] -> [T, B, C, ...]: the scan's slices keep the batch sharding.
    a_TBC = a_BL.reshape((batch, num_chunks, chunk) + a_BL.shape[2:]).swapaxes(0, 1)
    return constrain(a_TBC, (None, "act_batch", "act_length", "act_embed")[: a_TBC.ndim])

  # Gather the fsdp-sharded feature dimension once here rather than in every chunk (in both
  # passes); the vocabulary stays tensor-sharded.
  kernel_DV = constrain(kernel_DV, ("act_embed", "vocab"))
  dtype = x_BLD.dtype

  @functools.partial(jax.checkpoint, prevent_cse=False)  # Inside a scan: nothing to fear from CSE.
  def chunk_losses(kernel_DV, x_BCD, targets_BC, weights_BC):
    logits_BCV = dense(x_BCD, kernel_DV, 1, dtype).astype(jnp.float32)
    logits_BCV = constrain(logits_BCV, ("act_batch", "act_length", "act_vocab"))
    return optax.softmax_cross_entropy_with_integer_labels(logits_BCV, targets_BC) * weights_BC

  def body(carry, xs):
    return carry, chunk_losses(kernel_DV, *xs)

  _, losses_TBC = jax.lax.scan(body, None, (chunks(x_BLD), chunks(targets_BL), chunks(weights_BL)))
  return jnp.sum(losses_TBC, axis=(0, 2)), weight_B
