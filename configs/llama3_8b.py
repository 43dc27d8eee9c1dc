"""Llama 3 8B shapes (untied head, GQA 32/8, RoPE theta 5e5) for a v5p-64 slice: fsdp x 4-way tensor."""
from configs import base


def get_config():
  config = base.get_config()
  config.model.update(vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
                      head_dim=128, mlp_dim=14336, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5,
                      position="rope", rope_theta=500000.0, mlp="swiglu", tie_embeddings=False,
                      use_bias=False, dtype="bfloat16", remat="full")
  # Read C4 through TFDS; for a real run prepare it once (tools/prepare_data.py) and point a
  # kind="prepared" source at the output, so the hosts read integers.
  config.data.sources = {"main": base.source(kind="tfds", name="c4/en", split="train", field="text")}
  config.data.update(seq_len=8192, tokenizer="sentencepiece", tokenizer_vocab_size=128256)
  config.optimizer.update(learning_rate=3e-4, b2=0.95, weight_decay=0.1, warmup_steps=2000,
                          min_lr_ratio=0.1)
  config.train.update(num_steps=100_000, global_batch_size=512, log_every=50, eval_every=2000,
                      eval_batches=50, checkpoint_every=500)
  config.mesh.update(data=1, fsdp=-1, tensor=4)
  return config
