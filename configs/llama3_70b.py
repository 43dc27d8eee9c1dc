"""Llama 3 70B shapes (untied head, GQA 64/8, RoPE theta 5e5) for a v5p-256 slice (128 chips), fsdp.

2M tokens a step (256 x 8192). The remat policy, microbatches and loss chunk are the ones
tools/plan.py --search found to fit the slice (README, "Running on a pod").
"""

from configs import base

SLICES = ("v5p-256",)  # The slices tools/plan.py proves this config on (tests/test_pod_configs.py).


def get_config(slice_name: str = "v5p-256"):
  del slice_name  # One slice.
  config = base.get_config()
  config.model.update(
    vocab_size=128256,
    num_layers=80,
    embed_dim=8192,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=28672,
    max_seq_len=8192,
    norm="rmsnorm",
    norm_eps=1e-5,
    position="rope",
    rope_theta=500000.0,
    mlp="swiglu",
    tie_embeddings=False,
    use_bias=False,
    dtype="bfloat16",
    remat="full",
    attention="auto",
    loss_chunk=1024,
  )
  config.data.sources = {"main": base.source(kind="tfds", name="c4/en", split="train", field="text")}
  config.data.update(seq_len=8192, tokenizer="sentencepiece", tokenizer_vocab_size=128256)
  config.optimizer.update(learning_rate=1.5e-4, b2=0.95, weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1)
  config.train.update(
    num_steps=100_000,
    global_batch_size=256,
    microbatches=1,
    log_every=10,
    eval_every=1000,
    eval_batches=20,
    checkpoint_every=250,
  )
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
