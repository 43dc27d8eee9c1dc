"""Llama 3 8B shapes (untied head, GQA 32/8, RoPE theta 5e5) for a v5p-64 (32 chips) or v6e-64 slice.

4M tokens a step (512 x 8192). The slice is the config's argument
(--config=configs/llama3_8b.py:v6e-64); the remat policy, microbatches, mesh and loss chunk for
each are the ones tools/plan.py --search found to fit it (README, "Running on a pod").
"""

from configs import base

SLICES = ("v5p-64", "v6e-64")  # The slices tools/plan.py proves this config on (tests/test_pod_configs.py).


def get_config(slice_name: str = "v5p-64"):
  if slice_name not in SLICES:
    raise ValueError(f"configs/llama3_8b.py:{slice_name}: this config is planned for {', '.join(SLICES)}")
  config = base.get_config()
  config.model.update(
    vocab_size=128256,
    num_layers=32,
    embed_dim=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
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
    loss_chunk=512,
  )
  # Read C4 through TFDS; for a real run prepare it once (tools/prepare_data.py) and point a
  # kind="prepared" source at the output, so the hosts read integers.
  config.data.sources = {"main": base.source(kind="tfds", name="c4/en", split="train", field="text")}
  config.data.update(seq_len=8192, tokenizer="sentencepiece", tokenizer_vocab_size=128256)
  config.optimizer.update(learning_rate=3e-4, b2=0.95, weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1)
  config.train.update(
    num_steps=100_000, global_batch_size=512, log_every=50, eval_every=2000, eval_batches=50, checkpoint_every=500
  )
  # As tools/plan.py found them to fit: 8 rows of 8192 per chip at a time on v5p-64 (32 chips,
  # 95.74 GiB each), 2 on v6e-64 (64 chips, 31.25 GiB each).
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.train.microbatches = {"v5p-64": 2, "v6e-64": 4}[slice_name]
  return config
