"""GPT-2 small (124M) at 1024 tokens, for a v5e-8 slice: 512K tokens a step (512 x 1024).

Reads C4 through TFDS; for a real run, prepare it once with tools/prepare_data.py and train from
--config.data.sources.main.kind=prepared --config.data.sources.main.paths=DIR/main
"""

from configs import base

SLICES = ("v5e-8",)  # The slices tools/plan.py proves this config on (tests/test_pod_configs.py).


def get_config(slice_name: str = "v5e-8"):
  del slice_name  # One slice.
  config = base.get_config()
  config.model.update(
    vocab_size=50304,
    num_layers=12,
    embed_dim=768,
    num_heads=12,
    mlp_dim=3072,
    max_seq_len=1024,
    norm="layernorm",
    position="learned",
    mlp="gelu",
    gelu_approximate=True,
    tie_embeddings=True,
    use_bias=True,
    dtype="bfloat16",
    remat="dots",
    attention="auto",
    loss_chunk=128,
  )
  # Read C4 through TFDS; for a real run prepare it once (tools/prepare_data.py) and point a
  # kind="prepared" source at the output, so the hosts read integers.
  config.data.sources = {"main": base.source(kind="tfds", name="c4/en", split="train", field="text")}
  config.data.update(seq_len=1024, tokenizer="sentencepiece", tokenizer_vocab_size=50304)
  config.optimizer.update(learning_rate=6e-4, b2=0.95, weight_decay=0.1, warmup_steps=2000, min_lr_ratio=0.1)
  config.train.update(
    num_steps=600_000,
    global_batch_size=512,
    microbatches=2,
    log_every=100,
    eval_every=2000,
    eval_batches=100,
    checkpoint_every=2000,
    keep_checkpoints=3,
  )
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
