"""The decoder: embeddings, a stack of pre-norm blocks, and the output head.

One config covers GPT-2 (LayerNorm, learned positions, GELU, tied embeddings,
biases) and Llama 3 (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied
head). The blocks' parameters are stacked along a leading "layers" axis whether
or not the forward pass scans over them, so a checkpoint does not depend on
`scan_layers` or `remat`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from ml_collections import ConfigDict

from model.attention import Attention
from model.config import ModelConfig
from model.layers import Norm, dense, dropout, param
from model.lora import project
from sharding import constrain

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The allowed values of model.position: a learned table added to the embeddings (Transformer), or
# rotary embeddings applied to queries and keys (model/attention.py).
POSITIONS = ("learned", "rope")

# The allowed values of model.mlp: GELU (GPT-2) or the gated SwiGLU (Llama), both in Mlp below.
MLPS = ("gelu", "swiglu")

# Config fields that change how the same parameters are computed with (precision, the layer loop,
# rematerialisation) or trained (dropout), or are read only at initialisation: a checkpoint fits a
# model that differs from its own in these alone.
CHECKPOINT_INDEPENDENT_FIELDS = frozenset(
  {"dtype", "scan_layers", "remat", "dropout_rate", "init_std", "attention", "attention_block", "loss_chunk"}
)

# The activations model/attention.py and Mlp name with checkpoint_name: the inputs of the attention
# core and of the MLP's down projection, and the two outputs a block adds to its residual stream.
PROJECTION_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden", "mlp_out")

# What a rematerialised block keeps for the backward pass (None: no rematerialisation, everything).
# offload keeps proj's activations in the host's pinned memory and brings them back for the backward
# pass. On the CPU backend the host memory is the device memory: JAX lowers the move to nothing there
# (only TPU and GPU lower memory kinds), so offload runs as proj does.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  "proj": jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
  "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(),
    names_which_can_be_offloaded=PROJECTION_NAMES,
    offload_src="device",
    offload_dst="pinned_host",
  ),
}


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """GELU; the exact form is written with erf, which XLA's CPU backend runs faster than the
  erfc that jax.nn.gelu(approximate=False) lowers to (same values to 5e-7; docs/performance_notes.md)."""
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std: float):
    if cfg.mlp not in MLPS:
      raise ValueError(f"config field 'model.mlp'={cfg.mlp!r}: allowed are {list(MLPS)}")
    d, f = cfg.embed_dim, cfg.mlp_dim
    self.cfg = cfg
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
    if cfg.mlp == "swiglu":
      self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), out_std)
    if cfg.use_bias:
      self.b_up = param(rngs, (f,), ("mlp",), None)
      self.b_down = param(rngs, (d,), ("embed",), None)

  def __call__(self, x_BLD, lora_key=None):
    """`lora_key`: the dropout key of the LoRA adapters (model/lora.py), if any; None in evaluation."""
    cfg, dtype = self.cfg, x_BLD.dtype
    h_BLF = project(x_BLD, self, "w_up", dtype, lora_key)
    if cfg.use_bias:
      h_BLF = h_BLF + self.b_up[...].astype(dtype)
    if cfg.mlp == "swiglu":
      gate_BLF = project(x_BLD, self, "w_gate", dtype, lora_key)
      h_BLF = jax.nn.silu(gate_BLF) * h_BLF
    else:
      h_BLF = gelu(h_BLF, cfg.gelu_approximate)
    h_BLF = constrain(h_BLF, ("act_batch", "act_length", "act_mlp"))
    h_BLF = checkpoint_name(h_BLF, "mlp_hidden")
    y_BLD = project(h_BLF, self, "w_down", dtype, lora_key)
    if cfg.use_bias:
      y_BLD = y_BLD + self.b_down[...].astype(dtype)
    y_BLD = checkpoint_name(y_BLD, "mlp_out")
    return constrain(y_BLD, ("act_batch", "act_length", "act_embed"))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    # GPT-2's scaling of the residual projections keeps the residual stream's
    # variance independent of depth.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.attn_norm = Norm(cfg.embed_dim, cfg.norm, cfg.norm_eps, cfg.has_norm_bias)
    self.attn = Attention(cfg, rngs, out_std)
    self.mlp_norm = Norm(cfg.embed_dim, cfg.norm, cfg.norm_eps, cfg.has_norm_bias)
    self.mlp = Mlp(cfg, rngs, out_std)

  def __call__(self, x_BLD, segment_ids_BL, positions_BL, dropout_key=None):
    rate = self.cfg.dropout_rate
    attn_key, mlp_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    # The adapters' dropout keys are derived apart from the residual dropout's, which stay as they were.
    attn_lora_key, mlp_lora_key = (
      (None, None) if dropout_key is None else (jax.random.fold_in(attn_key, 1), jax.random.fold_in(mlp_key, 1))
    )
    attn_out = self.attn(self.attn_norm(x_BLD), segment_ids_BL, positions_BL, attn_lora_key)
    x_BLD = x_BLD + dropout(attn_out, rate, attn_key)
    x_BLD = x_BLD + dropout(self.mlp(self.mlp_norm(x_BLD), mlp_lora_key), rate, mlp_key)
    return constrain(x_BLD, ("act_batch", "act_length", "act_embed"))

  def prefill(self, x_BLD, segment_ids_BL, positions_BL):
    """__call__ without dropout that also returns this layer's keys and values [B, L, K, H]."""
    y_BLD, k_BLKH, v_BLKH = self.attn.prefill(self.attn_norm(x_BLD), segment_ids_BL, positions_BL)
    x_BLD = x_BLD + y_BLD
    x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
    return constrain(x_BLD, ("act_batch", "act_length", "act_embed")), k_BLKH, v_BLKH

  def decode(self, x_BLD, positions_BL, k_cache, v_cache, index, visible_BLS, layer=None):
    """The block on L new tokens against its key/value cache (Attention.decode, `layer` as there)."""
    y_BLD, k_cache, v_cache = self.attn.decode(
      self.attn_norm(x_BLD), positions_BL, k_cache, v_cache, index, visible_BLS, layer
    )
    x_BLD = x_BLD + y_BLD
    x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
    return constrain(x_BLD, ("act_batch", "act_length", "act_embed")), k_cache, v_cache


class Transformer(nnx.Module):
  """tokens [B, L] -> logits [B, L, V] (float32).

  `hidden_states` and `output_kernel` are the two halves of `__call__`, for a loss that computes
  the logits a chunk of positions at a time (model/loss.py) instead of all [B, L, V] at once.
  `cfg` is a ModelConfig or the config.model ConfigDict it is made from.
  """

  def __init__(self, cfg: ModelConfig | ConfigDict, rngs: nnx.Rngs):
    cfg = ModelConfig.from_config(cfg)
    for field, allowed in (("dtype", COMPUTE_DTYPES), ("position", POSITIONS), ("remat", REMAT_POLICIES)):
      if getattr(cfg, field) not in allowed:
        raise ValueError(f"config field 'model.{field}'={getattr(cfg, field)!r}: allowed are {list(allowed)}")
    self.cfg = cfg
    self.dtype = COMPUTE_DTYPES[cfg.dtype]
    self.embed = param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.init_std)
    if cfg.position == "learned":
      self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.embed_dim), ("position", "embed"), cfg.init_std)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg.embed_dim, cfg.norm, cfg.norm_eps, cfg.has_norm_bias)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

  def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, dropout_key=None):
    return self.logits(self.hidden_states(tokens_BL, segment_ids_BL, positions_BL, dropout_key))

  def hidden_states(self, tokens_BL, segment_ids_BL=None, positions_BL=None, dropout_key=None):
    """tokens [B, L] -> the final norm's output [B, L, D] in the compute dtype."""
    cfg = self.cfg
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    x_BLD = self.embed_tokens(tokens_BL, positions_BL)
    if dropout_key is not None:
      embed_key, dropout_key = jax.random.split(dropout_key)
      x_BLD = dropout(x_BLD, cfg.dropout_rate, embed_key)
    x_BLD = constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
    x_BLD = self._run_blocks(x_BLD, segment_ids_BL, positions_BL, dropout_key)
    return self.final_norm(x_BLD)

  def embed_tokens(self, tokens_BL, positions_BL):
    """tokens [B, L] at positions [B, L] -> the first block's input [B, L, D] in the compute dtype."""
    # The lookup reads whole rows: gather the fsdp-sharded feature dimension first
    # (as ZeRO-3 does for every weight), which the partitioner cannot do inside a gather.
    embed_VD = constrain(self.embed[...], ("vocab", "act_embed"))
    x_BLD = jnp.take(embed_VD, tokens_BL, axis=0)
    if self.cfg.position == "learned":
      pos_embed_LD = constrain(self.pos_embed[...], ("position", "act_embed"))
      x_BLD = x_BLD + jnp.take(pos_embed_LD, positions_BL, axis=0)
    return x_BLD.astype(self.dtype)

  def logits(self, x_BLD):
    """The final norm's output [B, L, D] -> logits [B, L, V] (float32)."""
    logits_BLV = dense(x_BLD, self.output_kernel(), 1, self.dtype)
    return constrain(logits_BLV.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

  def prefill(self, tokens_BL, segment_ids_BL, positions_BL):
    """The forward pass (no dropout) that also returns every layer's keys and values, stacked
    [layers, B, L, K, H] each: (the final norm's output [B, L, D], keys, values). model/decode.py
    starts its cache from them."""
    x_BLD = constrain(self.embed_tokens(tokens_BL, positions_BL), ("act_batch", "act_length", "act_embed"))
    graphdef, stacked_state = nnx.split(self.blocks)

    def apply_block(x, layer_state):
      return nnx.merge(graphdef, layer_state).prefill(x, segment_ids_BL, positions_BL)

    if self.cfg.scan_layers:

      def body(x, layer_state):
        x, k_BLKH, v_BLKH = apply_block(x, layer_state)
        return x, (k_BLKH, v_BLKH)

      x_BLD, (k, v) = jax.lax.scan(body, x_BLD, stacked_state)
    else:
      keys, values = [], []
      for i in range(self.cfg.num_layers):
        x_BLD, k_BLKH, v_BLKH = apply_block(x_BLD, jax.tree.map(lambda a: a[i], stacked_state))  # noqa: B023
        keys.append(k_BLKH)
        values.append(v_BLKH)
      k, v = jnp.stack(keys), jnp.stack(values)
    return self.final_norm(x_BLD), k, v

  def decode(self, tokens_BL, positions_BL, k, v, index, visible_BLS):
    """L new tokens (one, in a decoding step) against the cache of every layer, k and v [layers, B, K,
    S, H], their keys and values written into slots [index, index + L) (Attention.decode).

    Returns (the final norm's output [B, L, D], k, v updated). The cache goes through the layer loop
    whole and is written where it lies, so a step writes only its new slots.
    """
    x_BLD = constrain(self.embed_tokens(tokens_BL, positions_BL), ("act_batch", "act_length", "act_embed"))
    graphdef, stacked_state = nnx.split(self.blocks)

    def apply_block(i, x, k, v, layer_state):
      return nnx.merge(graphdef, layer_state).decode(x, positions_BL, k, v, index, visible_BLS, layer=i)

    if self.cfg.scan_layers:

      def body(carry, layer):
        i, layer_state = layer
        return apply_block(i, *carry, layer_state), None

      (x_BLD, k, v), _ = jax.lax.scan(body, (x_BLD, k, v), (jnp.arange(self.cfg.num_layers), stacked_state))
    else:
      for i in range(self.cfg.num_layers):
        x_BLD, k, v = apply_block(i, x_BLD, k, v, jax.tree.map(lambda a: a[i], stacked_state))  # noqa: B023
    return self.final_norm(x_BLD), k, v

  def output_kernel(self):
    """The output projection [D, V] (float32): the transposed embedding when tied, else the head."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.head[...]

  def _run_blocks(self, x_BLD, segment_ids_BL, positions_BL, dropout_key):
    cfg = self.cfg
    graphdef, stacked_state = nnx.split(self.blocks)
    layer_keys = jax.random.split(dropout_key, cfg.num_layers) if dropout_key is not None else [None] * cfg.num_layers

    def apply_block(x, layer_state, key):
      return nnx.merge(graphdef, layer_state)(x, segment_ids_BL, positions_BL, key)

    policy = REMAT_POLICIES[cfg.remat]
    if policy is not None:
      apply_block = jax.checkpoint(apply_block, policy=policy)

    if cfg.scan_layers:
      keys = None if dropout_key is None else layer_keys

      def body(x, layer):
        layer_state, key = layer
        return apply_block(x, layer_state, key), None

      x_BLD, _ = jax.lax.scan(body, x_BLD, (stacked_state, keys))
      return x_BLD
    for i in range(cfg.num_layers):
      layer_state = jax.tree.map(lambda a: a[i], stacked_state)  # noqa: B023 (runs in this iteration)
      x_BLD = apply_block(x_BLD, layer_state, layer_keys[i])
    return x_BLD
