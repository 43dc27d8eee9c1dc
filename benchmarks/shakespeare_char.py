"""loom against nanoGPT's PyTorch code on the shakespeare_char "baby GPT", in one interleaved run.

  pip install -r benchmarks/requirements.txt   # torch 2.13 CPU, the peer
  SHAKESPEARE=../shared/data/tinyshakespeare/input.txt   # a local copy; or: python tools/download.py tinyshakespeare
  python benchmarks/shakespeare_char.py --config.data.sources.shakespeare.paths=$SHAKESPEARE   # about 5 minutes

Both models see the same batches (loom's pipeline) in the same order. Steps run
in alternating rounds (loom, then torch), so both meet the same machine load;
the table reports medians over rounds. Validation loss is over the whole
validation split (last 10% of the text by position), at the same iterations.
At the end, a second table resamples each final model's per-window validation
losses into nanoGPT's own estimator (the mean of 20 batches of 12 windows,
drawn with replacement from the split's aligned windows where nanoGPT draws
random offsets): the spread shows how far a published figure can sit from
the whole split's loss by sampling alone.
loom runs as configured: shakespeare_char sets cpu_devices=-1, data parallelism with
one device per core (as many as the batch divides into); --config.cpu_devices=0 measures one
multithreaded device instead (the peer always uses PyTorch's default threads).
MFU divides model FLOPs (6N + 12 L H Q T per token, nanoGPT's formula, N
without position embeddings) by one measured matmul peak, the same for both.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import data  # noqa: E402
import model as model_lib  # noqa: E402
import sharding  # noqa: E402
from benchmarks.torch_peer import peer_for  # noqa: E402
from training.cli import define_config_flag  # noqa: E402
from training.cpu_memory import keep_step_buffers_mapped  # noqa: E402
from training.peak_flops import measured_matmul_flops  # noqa: E402
from training.run import STEPS_IN_FLIGHT  # noqa: E402
from training.setup import build_setup, use_cpu_devices  # noqa: E402
from training.validation import validate  # noqa: E402

_CONFIG = define_config_flag("configs/shakespeare_char.py", "loom config.")
_ROUND = flags.DEFINE_integer("round_steps", 50, "Steps per timed round of each side.")
_EVAL_AT = flags.DEFINE_list("eval_at", ["250", "500", "1000", "2000"], "Iterations with a validation loss.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loom_bench_shakespeare", "Data cache and char vocabulary.")

# nanoGPT's published run (../shared/BENCHMARKS.md): val loss by iteration, each estimated by
# nanoGPT's estimate_loss from --eval_iters=20 batches of random validation windows.
NANOGPT_VAL_LOSS = {250: 2.4447, 500: 2.3141, 1000: 2.0528, 1500: 1.9225, 2000: 1.8857}
NANOGPT_EVAL_ITERS = 20
_ESTIMATE_DRAWS = 10_000


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  use_cpu_devices(_CONFIG.value)
  config = validate(_CONFIG.value, jax.device_count())
  keep_step_buffers_mapped()  # As train.py does.
  num_steps = config.train.num_steps
  datasets = data.build_datasets(
    config.data, global_batch_size=config.train.global_batch_size, seed=config.seed, workdir=_WORKDIR.value
  )
  config = validate(config, jax.device_count(), tokenizer_vocab_size=datasets.tokenizer.vocab_size)
  m = config.model

  # loom.
  setup = build_setup(config)
  mesh = setup.mesh
  state = setup.init_state()
  train_step = setup.train_step()
  eval_step = setup.eval_step()

  # The peer, with nanoGPT's hyperparameters from the same config.
  peer = peer_for(config, num_steps)

  def model_inputs(batch):  # The per-source row counts feed mixture metrics, not the model.
    return {name: value for name, value in batch.items() if name != "source_counts"}

  eval_batches = [model_inputs(b) for b in datasets.eval_batches(datasets.names[0], config.train.eval_batches)]

  def loom_eval(params):
    total, weight = 0.0, 0.0
    for batch in eval_batches:
      loss_sum, w = eval_step(params, sharding.global_batch_from_local(batch, mesh))
      total, weight = total + float(loss_sum), weight + float(w)
    return total / weight

  def torch_targets(batch):
    """The rows with any weight, and their targets with -1 (nanoGPT's ignore_index) at padding,
    so both sides average the same tokens."""
    keep = batch["weights"].sum(axis=1) > 0
    return keep, np.where(batch["weights"] > 0, batch["targets"], -1)[keep]

  def torch_eval():
    pairs = []
    for batch in eval_batches:
      keep, targets = torch_targets(batch)
      pairs.append((batch["inputs"][keep], targets))
    return peer.eval_loss(pairs)

  peak = measured_matmul_flops()
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  eval_at = sorted(int(s) for s in _EVAL_AT.value)
  results = {"loom": {"round_ms": [], "eval": {}, "loss": {}}, "torch": {"round_ms": [], "eval": {}, "loss": {}}}
  results["loom"]["eval"][0] = loom_eval(state.params)
  results["torch"]["eval"][0] = torch_eval()

  batches = map(model_inputs, datasets.train_batches(0, num_steps))
  compile_start = time.perf_counter()
  first = next(batches)
  compiled = train_step.lower(state, sharding.global_batch_from_local(first, mesh)).compile()
  print(f"loom compile: {time.perf_counter() - compile_start:.1f}s", flush=True)
  pending = [first]
  step = 0
  while step < num_steps:
    size = min(_ROUND.value, num_steps - step)
    while len(pending) < size:
      pending.append(next(batches))
    round_batches, pending = pending[:size], pending[size:]
    device_batches = [sharding.global_batch_from_local(b, mesh) for b in round_batches]

    start = time.perf_counter()
    in_flight = []
    for batch in device_batches:  # At most STEPS_IN_FLIGHT ahead of the devices, as train.py.
      state, metrics = compiled(state, batch)
      in_flight.append(metrics["loss"])
      if len(in_flight) > STEPS_IN_FLIGHT:
        in_flight.pop(0).block_until_ready()
    loom_loss = float(metrics["loss"])  # waits for the round's last step
    results["loom"]["round_ms"].append(1000 * (time.perf_counter() - start) / size)

    start = time.perf_counter()
    for batch in round_batches:
      torch_loss = peer.train_step(batch["inputs"], batch["targets"])
    results["torch"]["round_ms"].append(1000 * (time.perf_counter() - start) / size)

    step += size
    results["loom"]["loss"][step], results["torch"]["loss"][step] = loom_loss, torch_loss
    if step in eval_at:
      results["loom"]["eval"][step] = loom_eval(state.params)
      results["torch"]["eval"][step] = torch_eval()
      print(
        f"iter {step}: val loss loom {results['loom']['eval'][step]:.4f} torch {results['torch']['eval'][step]:.4f}",
        flush=True,
      )

  flops = {"loom": model_lib.flops_per_token(m, config.data.seq_len), "torch": peer.flops_per_token()}
  print()
  print(
    f"shakespeare_char: {m.num_layers} layers, {m.embed_dim} wide, block {config.data.seq_len}, "
    f"batch {config.train.global_batch_size}, {num_steps} iterations, compute {m.dtype}; "
    f"matmul peak {peak / 1e9:.0f} GFLOP/s (float32, measured)"
  )
  print("| | ms/step (median of rounds) | tokens/s | MFU | " + " | ".join(f"val loss @{s}" for s in eval_at) + " |")
  print("|---|---|---|---|" + "---|" * len(eval_at))
  for name in ("loom", "torch"):
    ms = float(np.median(results[name]["round_ms"]))
    tps = tokens_per_step / (ms / 1000)
    evals = " | ".join(f"{results[name]['eval'].get(s, float('nan')):.4f}" for s in eval_at)
    print(f"| {name} | {ms:.1f} | {tps:,.0f} | {tps * flops[name] / peak:.0%} | {evals} |")
  ratios = np.array(results["torch"]["round_ms"]) / np.array(results["loom"]["round_ms"])
  print(
    f"\nloom speed / torch speed: median over rounds {np.median(ratios):.2f}x "
    f"(interquartile {np.percentile(ratios, 25):.2f}x to {np.percentile(ratios, 75):.2f}x)"
  )

  # nanoGPT's published losses are not over the whole split but the mean of --eval_iters=20
  # batches of random windows: how far from the whole split can such an estimate fall?
  row_eval = setup.eval_step(per_row=True)
  window_losses, window_tokens = {"loom": [], "torch": []}, []
  for batch in eval_batches:
    loss_B, weight_B = (np.asarray(a) for a in row_eval(state.params, sharding.global_batch_from_local(batch, mesh)))
    keep, targets = torch_targets(batch)
    window_losses["loom"].append(loss_B[keep] / weight_B[keep])
    window_losses["torch"].append(peer.row_losses(batch["inputs"][keep], targets))
    window_tokens.append(weight_B[keep])
  window_tokens = np.concatenate(window_tokens)
  windows = NANOGPT_EVAL_ITERS * config.train.global_batch_size
  published = NANOGPT_VAL_LOSS.get(num_steps)
  print(
    f"\nnanoGPT's estimate of the val loss at iteration {num_steps} (the mean of {NANOGPT_EVAL_ITERS} "
    f"batches, {windows} windows), drawn {_ESTIMATE_DRAWS:,} times from each final model's windows:"
  )
  print(
    "| | whole split | estimate's std | 5th to 95th percentile | draws at or below nanoGPT's "
    f"{published if published else 'n/a'} |"
  )
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for name, losses in window_losses.items():
    losses = np.concatenate(losses)
    estimates = losses[rng.integers(0, len(losses), (_ESTIMATE_DRAWS, windows))].mean(axis=1)
    below = f"{np.mean(estimates <= published):.0%}" if published else "n/a"
    print(
      f"| {name} | {np.average(losses, weights=window_tokens):.4f} | {estimates.std():.4f} | "
      f"{np.percentile(estimates, 5):.4f} to "
      f"{np.percentile(estimates, 95):.4f} | {below} |"
    )


if __name__ == "__main__":
  app.run(main)
