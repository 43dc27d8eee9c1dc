"""Causal self-attention with grouped-query heads, RoPE and packed-segment masking."""
import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import matmul, param
from sharding import constrain


def rotary_embedding(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """RoPE in the rotate-half layout (as Llama checkpoints in Hugging Face format use)."""
  head_dim = x_BLNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BLH = positions_BL[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_BLH)[:, :, None, :]
  cos = jnp.cos(angles_BLH)[:, :, None, :]
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLNH.dtype)


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """[B, 1, 1, L, L] boolean: causal, and only within the same non-padding segment.

  Packed rows hold several documents; a token must never see another's.
  """
  length = segment_ids_BL.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (causal_LL[None] & same_segment_BLL)[:, None, None]


class Attention(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs, out_std: float):
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std = cfg.init_std
    self.cfg = cfg
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std)
    self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
    if cfg.use_bias:
      self.bq = param(rngs, (n, h), ("heads", "head_dim"), None)
      self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), None)
      self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), None)
      self.bo = param(rngs, (d,), ("embed",), None)

  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    cfg = self.cfg
    dtype = x_BLD.dtype
    q_BLNH = matmul("bld,dnh->blnh", x_BLD, self.wq[...], dtype)
    k_BLKH = matmul("bld,dkh->blkh", x_BLD, self.wk[...], dtype)
    v_BLKH = matmul("bld,dkh->blkh", x_BLD, self.wv[...], dtype)
    if cfg.use_bias:
      q_BLNH = q_BLNH + self.bq[...].astype(dtype)
      k_BLKH = k_BLKH + self.bk[...].astype(dtype)
      v_BLKH = v_BLKH + self.bv[...].astype(dtype)
    q_BLNH = constrain(q_BLNH, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    if cfg.position == "rope":
      q_BLNH = rotary_embedding(q_BLNH, positions_BL, cfg.rope_theta)
      k_BLKH = rotary_embedding(k_BLKH, positions_BL, cfg.rope_theta)

    b, l, n, h = q_BLNH.shape
    kv = k_BLKH.shape[2]
    q_BLKGH = q_BLNH.reshape(b, l, kv, n // kv, h)
    scores_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BLKH,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    mask = attention_mask(segment_ids_BL)
    scores_BKGLS = jnp.where(mask, scores_BKGLS, jnp.finfo(jnp.float32).min)
    probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(dtype)
    out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BLKH,
                           preferred_element_type=jnp.float32).astype(dtype)
    out_BLNH = out_BLKGH.reshape(b, l, n, h)
    y_BLD = matmul("blnh,nhd->bld", out_BLNH, self.wo[...], dtype)
    if cfg.use_bias:
      y_BLD = y_BLD + self.bo[...].astype(dtype)
    return constrain(y_BLD, ("act_batch", "act_length", "act_embed"))
