"""nanoGPT's "baby GPT" on tiny Shakespeare, character level (benchmarks/README.md compares the two).

  python tools/download.py tinyshakespeare    # once: into loom's data cache (data/downloads.py)
  python train.py --config=configs/shakespeare_char.py --workdir=workdirs/shakespeare_char

4 layers, 4 heads, 128 wide, block 64, batch 12, no dropout, AdamW lr 1e-3 with
warmup 100 and cosine decay to 1e-4 over 2000 iterations, beta2 0.99, weight
decay 0.1 (embeddings included, as nanoGPT decays every 2-D parameter), clip 1.0,
no biases, tied embeddings, learned positions, exact GELU, 90/10 split by position.
"""

from configs import base
from data.downloads import cached_path


def get_config():
  config = base.get_config()
  config.model.update(
    num_layers=4,
    embed_dim=128,
    num_heads=4,
    mlp_dim=512,
    max_seq_len=64,
    norm="layernorm",
    position="learned",
    mlp="gelu",
    gelu_approximate=False,
    tie_embeddings=True,
    use_bias=False,
    # Four layers unrolled: on a CPU, XLA fuses across them and skips the
    # loop's stacking copies (about 20% faster; compile time is no concern here).
    scan_layers=False,
  )
  # Fetched once by `python tools/download.py tinyshakespeare` into loom's data cache (data/downloads.py);
  # --config.data.sources.shakespeare.paths=FILE reads a copy from elsewhere.
  config.data.sources = {"shakespeare": base.source(paths=cached_path("tinyshakespeare"))}
  config.data.update(seq_len=64, tokenizer="char", validation_fraction=0.1)
  config.optimizer.update(
    name="adamw",
    learning_rate=1e-3,
    b1=0.9,
    b2=0.99,
    weight_decay=0.1,
    decay_embeddings=True,
    grad_clip_norm=1.0,
    schedule="warmup_cosine",
    warmup_steps=100,
    min_lr_ratio=0.1,
  )
  config.train.update(
    num_steps=2000,
    global_batch_size=12,
    log_every=50,
    eval_every=250,
    eval_batches=200,
    checkpoint_every=1000,
    num_samples=2,
    sample_length=300,
    sample_prompt="ROMEO:",
  )
  # Data parallelism over the machine's cores, one CPU device per core (as many as divide the
  # batch of 12): faster than one device splitting every small op across the cores
  # (docs/performance_notes.md). data=-1 takes every device, so it runs on a GPU too.
  config.cpu_devices = -1
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
