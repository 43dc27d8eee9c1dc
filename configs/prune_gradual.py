"""The trained quickstart model pruned to 50% sparsity by gradual magnitude pruning while it trains on.

Every attention and MLP kernel loses its smallest weights on Zhu & Gupta's cubic schedule: the sparsity
rises from 0 at step 0 to 50% at step 180 (the masks recomputed every 20 steps), and the last 120 of the
300 steps train the pruned network to recover; pruned weights stay exactly zero.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart          # the run to prune
  python train.py --config=configs/prune_gradual.py --workdir=workdirs/prune_gradual
  python tools/evaluate.py --checkpoint=workdirs/prune_gradual

init.checkpoint is the quickstart's workdir and the tokenizer the one that run trained and cached there
(TRAINED/tokenizer/sp.model: a new workdir would otherwise train its own, whose ids are not the model's);
--config.init.checkpoint=... and --config.data.tokenizer_path=... for another run of this model. A missing
run stops before anything is built. --config.pruning.structure=2:4 prunes 2 of every 4
consecutive input weights instead (the pattern sparse tensor cores run). benchmarks/finetune.py
measures one-shot pruning of the same model without any retraining.
"""

from configs import quickstart

# The run this config continues: the quickstart's workdir (README's first command), and its tokenizer.
TRAINED = "workdirs/quickstart"
TRAINED_TOKENIZER = f"{TRAINED}/tokenizer/sp.model"


def get_config():
  config = quickstart.get_config()
  config.init.checkpoint = TRAINED
  config.data.tokenizer_path = TRAINED_TOKENIZER
  num_steps = 300
  config.pruning.update(
    method="magnitude",
    structure="unstructured",
    scope="layer",
    sparsity=0.5,
    begin_step=0,
    end_step=int(0.6 * num_steps),
    every=20,
  )
  # A fresh optimizer and schedule on trained weights: a short re-warmup to a quarter of the
  # quickstart's peak, then the cosine decay while the last masks are recovered from.
  config.optimizer.update(learning_rate=5e-4, warmup_steps=20)
  config.train.update(num_steps=num_steps, eval_every=100, checkpoint_every=100)
  return config
