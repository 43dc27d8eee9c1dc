"""A model small enough for a test to train in seconds on a CPU."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.update(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_seq_len=32)
  config.data.sources = {"main": base.source(kind="stdlib", max_files=20)}
  config.data.update(seq_len=32, tokenizer="byte")
  config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  config.train.update(
    num_steps=40,
    global_batch_size=16,
    log_every=10,
    eval_every=20,
    eval_batches=2,
    checkpoint_every=20,
    num_samples=1,
    sample_length=32,
    plot_curves=False,  # Tests train it by the hundred; tests/test_plot.py turns it on.
  )
  return config
