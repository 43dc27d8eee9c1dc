"""Cross-entropy a chunk of positions at a time, so the [B, L, V] logits never exist at once."""

import functools

import jax
import jax.numpy as jnp
import optax

from model.layers import dense
from sharding import constrain


def cross_entropy(
  logits_NV: jax.Array, targets_N: jax.Array, z_loss: float = 0.0, label_smoothing: float = 0.0
) -> jax.Array:
  """Per position (any leading shape N): the cross-entropy of the integer targets, with label
  smoothing (the target distribution is (1 - s) on the target plus s spread evenly over the
  vocabulary) and PaLM's z-loss (z_loss * log(Z)^2, which keeps the softmax normaliser Z near 1).

  With both 0 it is optax's own cross-entropy, bit for bit: what evaluation always reports.
  """
  if not z_loss and not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits_NV, targets_N)
  log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NV, targets_N[..., None], axis=-1)[..., 0]
  smoothed_logit_N = (1.0 - label_smoothing) * target_logit_N + label_smoothing * jnp.mean(logits_NV, axis=-1)
  return log_z_N - smoothed_logit_N + z_loss * jnp.square(log_z_N)


def chunked_row_losses(
  x_BLD: jax.Array,
  kernel_DV: jax.Array,
  targets_BL: jax.Array,
  weights_BL: jax.Array,
  chunk: int,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Per row: summed cross-entropy over weighted target tokens [B], and the weight total [B].

  The logits are those of Transformer.__call__ (x [B, L, D] in the compute dtype times the output
  kernel [D, V], accumulated in float32), made `chunk` positions of every row at a time by a
  lax.scan whose step is rematerialised: neither pass keeps the logits of more than one chunk.
  A row that `chunk` does not divide ends in a chunk padded with zero-weight positions.
  `z_loss`, `label_smoothing`: training's regularisers (`cross_entropy`), 0 for the plain loss.
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
    return cross_entropy(logits_BCV, targets_BC, z_loss, label_smoothing) * weights_BC

  def body(carry, xs):
    return carry, chunk_losses(kernel_DV, *xs)

  _, losses_TBC = jax.lax.scan(body, None, (chunks(x_BLD), chunks(targets_BL), chunks(weights_BL)))
  return jnp.sum(losses_TBC, axis=(0, 2)), weight_B
