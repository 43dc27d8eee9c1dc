"""Causal self-attention with grouped-query heads, RoPE and packed-segment masking."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import attention_kernels as kernels
from model.config import ModelConfig
from model.layers import param
from model.lora import project as project_kernel
from sharding import constrain

# The allowed values of model.attention, dispatched on in `attend`.
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")

# On CPU, `auto` uses xla below this length and blockwise (block 512) from it on. Forward+backward time
# blockwise/xla on 2 cores (benchmarks/attention.py, benchmarks/README.md): 0.99x at 12 x 64 and 0.98x
# at 64 x 256 (6 heads of 64; 1.07-1.45x in a run at L=128-256), 0.81x at 1 x 512, 0.44x at 2048,
# 0.24x at 8192 (8 heads of 64). Below 512 xla stays: no slower, and bit-identical to the reference.
CPU_BLOCKWISE_FROM_LENGTH = 512


def rotary_embedding(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """RoPE in the rotate-half layout (as Llama checkpoints in Hugging Face format use)."""
  head_dim = x_BLNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BLH = positions_BL[..., None].astype(jnp.float32) * inv_freq  # H / 2 of them: one a pair.
  sin = jnp.sin(angles_BLH)[:, :, None, :]
  cos = jnp.cos(angles_BLH)[:, :, None, :]
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLNH.dtype)


def attention_mask(segment_ids_BL: jax.Array) -> jax.Array:
  """[B, L, L] boolean: causal, and only within the same segment.

  Packed rows hold several documents; a token must never see another's.
  """
  length = segment_ids_BL.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return causal_LL[None] & same_segment_BLL


def dot_product_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL) -> jax.Array:
  """Masked softmax attention; N query heads share K key/value heads in groups of G.

  Heads move in front of the sequence ([B, K, G*L, H]) so both products are
  batched GEMMs with leading batch dimensions, the layout XLA runs fastest;
  scores and softmax are float32.
  """
  b, l, n, h = q_BLNH.shape
  kv = k_BLKH.shape[2]
  groups = n // kv
  dtype = q_BLNH.dtype
  q_BKMH = q_BLNH.reshape(b, l, kv, groups, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * l, h)
  k_BKSH = k_BLKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BLKH.transpose(0, 2, 1, 3)
  scores_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * (h**-0.5)
  mask_B1MS = jnp.tile(attention_mask(segment_ids_BL), (1, groups, 1))[:, None]
  scores_BKMS = jnp.where(mask_B1MS, scores_BKMS, -1e30)
  # Softmax written out: one fused exp/sum/divide, cheaper to differentiate than
  # jax.nn.softmax's generic form on CPU. Every row keeps its diagonal, so no row is empty.
  scores_BKMS = scores_BKMS - jax.lax.stop_gradient(jnp.max(scores_BKMS, axis=-1, keepdims=True))
  weights_BKMS = jnp.exp(scores_BKMS)
  probs_BKMS = (weights_BKMS / jnp.sum(weights_BKMS, axis=-1, keepdims=True)).astype(dtype)
  out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSH, preferred_element_type=jnp.float32).astype(dtype)
  return out_BKMH.reshape(b, kv, groups, l, h).transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)


def cached_attention(q_BLNH, k_BKSH, v_BKSH, visible_BLS) -> jax.Array:
  """Softmax attention of L queries over the S slots of a key/value cache where visible_BLS is true.

  The reference's arithmetic (float32 scores, the same scale and softmax), so cached decoding gives a
  full forward pass's logits. The cache keeps heads before slots, so both products are batched GEMMs
  over [S, H] blocks as they lie. A query that sees no slot (a padding row) gets a finite average.
  """
  b, l, n, h = q_BLNH.shape
  kv = k_BKSH.shape[1]
  groups = n // kv
  dtype = q_BLNH.dtype
  q_BKMH = q_BLNH.reshape(b, l, kv, groups, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * l, h)
  scores_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * (h**-0.5)
  visible_B1MS = jnp.tile(visible_BLS, (1, groups, 1))[:, None]
  scores_BKMS = jnp.where(visible_B1MS, scores_BKMS, -1e30)
  scores_BKMS = scores_BKMS - jnp.max(scores_BKMS, axis=-1, keepdims=True)
  weights_BKMS = jnp.exp(scores_BKMS)
  probs_BKMS = (weights_BKMS / jnp.sum(weights_BKMS, axis=-1, keepdims=True)).astype(dtype)
  out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSH, preferred_element_type=jnp.float32).astype(dtype)
  return out_BKMH.reshape(b, kv, groups, l, h).transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)


def resolve_implementation(implementation: str, q_BLNH: jax.Array) -> str:
  """The implementation `auto` stands for on the active mesh's devices (else JAX's default backend)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config field 'model.attention'={implementation!r}: allowed are {list(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  platform = kernels.platform_of_active_devices()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    return "blockwise" if kernels.cudnn_unsupported(q_BLNH) else "cudnn"
  if platform == "cpu":
    return "xla" if q_BLNH.shape[1] < CPU_BLOCKWISE_FROM_LENGTH else "blockwise"
  return "blockwise"


def attend(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, implementation: str = "auto", block: int = 512):
  """Causal attention within segments by `implementation` (model.attention); all give the reference's
  values. `block` (model.attention_block) is blockwise's and splash's block length."""
  implementation = resolve_implementation(implementation, q_BLNH)
  if implementation == "xla":
    return dot_product_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
  if implementation == "blockwise":
    return kernels.blockwise_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, block)
  if implementation == "splash":
    return kernels.splash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, block)
  platform = kernels.platform_of_active_devices()
  if platform != "gpu":
    raise ValueError(
      f"config field 'model.attention'='cudnn' needs an NVIDIA GPU, not {platform}; use auto, xla or blockwise"
    )
  reason = kernels.cudnn_unsupported(q_BLNH)
  if reason:
    raise ValueError(f"config field 'model.attention'='cudnn': {reason}; or use blockwise")
  return kernels.cudnn_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std: float):
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std = cfg.init_std
    self.cfg = cfg
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std)
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std)
    self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
    if cfg.has_qkv_bias:
      self.bq = param(rngs, (n, h), ("heads", "head_dim"), None)
      self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), None)
      self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), None)
    if cfg.use_bias:
      self.bo = param(rngs, (d,), ("embed",), None)

  def __call__(self, x_BLD, segment_ids_BL, positions_BL, lora_key=None):
    """`lora_key`: the dropout key of the LoRA adapters (model/lora.py), if any; None in evaluation."""
    q_BLNH, k_BLKH, v_BLKH = self.project(x_BLD, positions_BL, lora_key)
    out_BLNH = attend(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, self.cfg.attention, self.cfg.attention_block)
    return self.output(out_BLNH, lora_key)

  def project(self, x_BLD, positions_BL, lora_key=None):
    """The queries, keys and values of x (RoPE applied), in x's dtype."""
    cfg = self.cfg
    dtype = x_BLD.dtype
    q_BLNH = project_kernel(x_BLD, self, "wq", dtype, lora_key)
    k_BLKH = project_kernel(x_BLD, self, "wk", dtype, lora_key)
    v_BLKH = project_kernel(x_BLD, self, "wv", dtype, lora_key)
    if cfg.has_qkv_bias:
      q_BLNH = q_BLNH + self.bq[...].astype(dtype)
      k_BLKH = k_BLKH + self.bk[...].astype(dtype)
      v_BLKH = v_BLKH + self.bv[...].astype(dtype)
    q_BLNH = constrain(q_BLNH, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    if cfg.position == "rope":
      q_BLNH = rotary_embedding(q_BLNH, positions_BL, cfg.rope_theta)
      k_BLKH = rotary_embedding(k_BLKH, positions_BL, cfg.rope_theta)

    # Names for the remat policies that keep the projections (model/transformer.REMAT_POLICIES).
    q_BLNH = checkpoint_name(q_BLNH, "query_proj")
    k_BLKH = checkpoint_name(k_BLKH, "key_proj")
    v_BLKH = checkpoint_name(v_BLKH, "value_proj")
    return q_BLNH, k_BLKH, v_BLKH

  def output(self, out_BLNH, lora_key=None):
    """The heads' outputs projected back to the residual stream."""
    dtype = out_BLNH.dtype
    y_BLD = project_kernel(out_BLNH, self, "wo", dtype, lora_key)
    if self.cfg.use_bias:
      y_BLD = y_BLD + self.bo[...].astype(dtype)
    y_BLD = checkpoint_name(y_BLD, "attention_out")
    return constrain(y_BLD, ("act_batch", "act_length", "act_embed"))

  def prefill(self, x_BLD, segment_ids_BL, positions_BL):
    """__call__ that also returns the keys and values [B, L, K, H], for a decoding cache (model/decode.py)."""
    q_BLNH, k_BLKH, v_BLKH = self.project(x_BLD, positions_BL)
    out_BLNH = attend(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, self.cfg.attention, self.cfg.attention_block)
    return self.output(out_BLNH), k_BLKH, v_BLKH

  def decode(self, x_BLD, positions_BL, k_cache, v_cache, index, visible_BLS, layer=None):
    """Attention of L new tokens against a key/value cache of S slots, after writing their keys and
    values into slots [index, index + L). The cache is [B, K, S, H], or with `layer` every layer's
    [layers, B, K, S, H], written where it lies (a decoding step writes L slots, not the layer).
    visible_BLS says which slots each new token sees (model/decode.py makes it). Returns the output
    and the updated cache."""
    q_BLNH, k_BLKH, v_BLKH = self.project(x_BLD, positions_BL)
    k_BKLH = k_BLKH.transpose(0, 2, 1, 3).astype(k_cache.dtype)
    v_BKLH = v_BLKH.transpose(0, 2, 1, 3).astype(v_cache.dtype)
    start = (0, 0, index, 0) if layer is None else (layer, 0, 0, index, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_BKLH if layer is None else k_BKLH[None], start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_BKLH if layer is None else v_BKLH[None], start)
    k_BKSH = k_cache if layer is None else k_cache[layer]
    v_BKSH = v_cache if layer is None else v_cache[layer]
    out_BLNH = cached_attention(q_BLNH, k_BKSH, v_BKSH, visible_BLS)
    return self.output(out_BLNH), k_cache, v_cache
