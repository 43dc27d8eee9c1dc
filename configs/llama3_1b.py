"""Llama 3.2 1B shapes (tied embeddings, GQA 32/8, RoPE theta 5e5) for a v5e-16 slice, fully sharded:
1M tokens a step (256 x 4096)."""

from configs import base

SLICES = ("v5e-16",)  # The slices tools/plan.py proves this config on (tests/test_pod_configs.py).


def get_config(slice_name: str = "v5e-16"):
  del slice_name  # One slice.
  config = base.get_config()
  config.model.update(
    vocab_size=128256,
    num_layers=16,
    embed_dim=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    max_seq_len=4096,
    norm="rmsnorm",
    norm_eps=1e-5,
    position="rope",
    rope_theta=500000.0,
    mlp="swiglu",
    tie_embeddings=True,
    use_bias=False,
    dtype="bfloat16",
    remat="dots",
    attention="auto",
    loss_chunk=1024,
  )  # As tools/plan.py --search found for v5e-16.
  # Read C4 through TFDS; for a real run prepare it once (tools/prepare_data.py) and point a
  # kind="prepared" source at the output, so the hosts read integers.
  config.data.sources = {"main": base.source(kind="tfds", name="c4/en", split="train", field="text")}
  config.data.update(seq_len=4096, tokenizer="sentencepiece", tokenizer_vocab_size=128256)
  config.optimizer.update(learning_rate=3e-4, b2=0.95, weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1)
  config.train.update(
    num_steps=100_000,
    global_batch_size=256,
    microbatches=8,
    log_every=100,
    eval_every=2000,
    eval_batches=50,
    checkpoint_every=1000,
  )
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
