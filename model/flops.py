"""Model size and training FLOPs per token, from the config alone."""

from ml_collections import ConfigDict

from model.config import ModelConfig


def num_params(cfg: ModelConfig | ConfigDict, include_embeddings: bool = True) -> int:
  cfg = ModelConfig.from_config(cfg)
  d, f, n, k, h, v = (cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
  attn = d * n * h * 2 + d * k * h * 2
  mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
  norm = d * (2 if cfg.has_norm_bias else 1)
  biases = (n * h + 2 * k * h + d + f + d) if cfg.use_bias else 0
  if cfg.qkv_bias and not cfg.use_bias:  # Qwen2: q/k/v biases alone.
    biases = n * h + 2 * k * h
  per_layer = attn + mlp + 2 * norm + biases
  total = cfg.num_layers * per_layer + norm
  if not cfg.tie_embeddings:
    total += d * v
  if include_embeddings:
    total += v * d
    if cfg.position == "learned":
      total += cfg.max_seq_len * d
  return total


def flops_per_token(cfg: ModelConfig | ConfigDict, seq_len: int) -> float:
  """Training FLOPs per token: 6 per weight use plus causal-agnostic attention.

  Matmul weights = all parameters except position embeddings (the tied or
  untied output projection counts, the embedding lookup does not when untied).
  Attention adds 12 * layers * heads * head_dim * seq_len (PaLM appendix B;
  nanoGPT's estimate_mfu uses the same), so MFU is comparable with theirs.
  """
  cfg = ModelConfig.from_config(cfg)
  weights = num_params(cfg, include_embeddings=False)
  if cfg.tie_embeddings:
    weights += cfg.vocab_size * cfg.embed_dim  # the tied output projection
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * weights + attention
