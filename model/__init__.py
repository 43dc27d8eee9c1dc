"""Decoder-only transformer (Flax NNX) that knows logical axis names and nothing of data or training.

The model is configured by a ModelConfig (model/config.py), made from config.model at its entry points.

A tensor's name ends in its shape, one letter a dimension (`x_BLD`: batch, length, embedding):
  B  batch (rows)
  L  length: a row's positions (the queries' where keys differ, see S)
  S  key positions, in the reference attention's scores
  D  embed_dim, the residual stream
  F  mlp_dim, the MLP's hidden width
  V  vocab_size
  N  query heads (num_heads)
  K  key/value heads (num_kv_heads)
  G  query heads per key/value head (N // K)
  H  head_dim
  M  G * L: a key/value head's query rows, its G heads' positions one after another
  T  blocks (blockwise attention) or chunks (the chunked loss): the steps of a loop along L
  C  positions within one such block or chunk
  1  a broadcast dimension of size 1
"""

from model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from model.config import ModelConfig
from model.decode import generate
from model.flops import flops_per_token, num_params
from model.layers import NORMS
from model.transformer import COMPUTE_DTYPES, MLPS, POSITIONS, REMAT_POLICIES, Transformer

__all__ = [
  "ATTENTION_IMPLEMENTATIONS",
  "COMPUTE_DTYPES",
  "MLPS",
  "ModelConfig",
  "NORMS",
  "POSITIONS",
  "REMAT_POLICIES",
  "Transformer",
  "flops_per_token",
  "generate",
  "num_params",
]
