"""The default: a small GPT trained on Python's own standard library in a few minutes on a CPU.

python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
"""

from configs import base


def get_config():
  config = base.get_config()
  # float32 and unrolled layers: the fastest choice on CPUs (bfloat16 is only faster on CPUs
  # with bf16 instructions, and scanning pays off in compile time for deep models).
  config.model.update(
    num_layers=4, embed_dim=128, num_heads=4, mlp_dim=512, max_seq_len=128, dtype="float32", scan_layers=False
  )
  config.data.sources = {"main": base.source(kind="stdlib", max_files=300)}
  config.data.update(seq_len=128, tokenizer="sentencepiece", tokenizer_vocab_size=2048)
  config.optimizer.update(learning_rate=2e-3, warmup_steps=50, b2=0.99)
  config.train.update(
    num_steps=600,
    global_batch_size=16,
    log_every=25,
    eval_every=200,
    eval_batches=10,
    checkpoint_every=200,
    num_samples=2,
    sample_length=160,
    sample_prompt="def ",
  )
  return config
