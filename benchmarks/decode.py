"""Decoding speed: the key/value cache (model/decode.py) against recomputing the prefix (model/sampling.py).

  python benchmarks/decode.py                                  # a few minutes on 2 CPU cores
  python benchmarks/decode.py --models=quickstart --batches=1,16,64 --new_tokens=512

For each model and batch size, greedy generation of --new_tokens tokens after a --prompt_len token
prompt, random parameters: tokens per second of `model.generate` (prefill, then one token a step
against the cache, the whole loop in one program) and of `model.sampling.sample`, which runs the whole
window (prompt + new tokens, so nothing slides out) through the model for every token. Both are timed
after a first call has compiled them. The recomputation costs the same at every step (a fixed window),
so where --recompute_seconds would be passed it is timed over fewer tokens (the table says how many).

Models: quickstart is configs/quickstart.py's shapes (4 layers of 128, vocabulary 2048) with
max_seq_len raised to hold the prompt and the new tokens (a longer learned position table, nothing
else); gpt2_124m is configs/gpt2_124m.py's shapes (12 layers of 768, vocabulary 50304). Both in float32,
the fast choice on CPUs.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from training.cli import skip_absent_tpu  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["quickstart", "gpt2_124m"], "Configs whose model shapes are measured.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes (prompts decoded together).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "Tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Tokens per prompt.")
_RECOMPUTE_SECONDS = flags.DEFINE_float(
  "recompute_seconds", 30.0, "Time the recomputing sampler over fewer tokens where all would take longer."
)


def build(name: str, max_seq_len: int):
  """(graphdef, random float32 parameters, model config) of configs/NAME.py's model shapes."""
  import importlib

  import jax
  from flax import nnx

  from model import Transformer

  config = importlib.import_module(f"configs.{name}").get_config()
  m = config.model
  m.update(
    vocab_size=m.vocab_size or config.data.tokenizer_vocab_size,
    max_seq_len=max(m.max_seq_len, max_seq_len),
    dtype="float32",
    remat="none",
    loss_chunk=0,
  )
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(Transformer(m, nnx.Rngs(0))))()
  return graphdef, params, m


def main(argv):
  del argv
  skip_absent_tpu()
  import jax
  import numpy as np

  import model as model_lib
  from model.sampling import sample

  new_tokens, prompt_len = _NEW_TOKENS.value, _PROMPT_LEN.value
  window = prompt_len + new_tokens
  print(f"{jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}; greedy, prompt {prompt_len}")
  header = "| model | params | batch | new tokens | KV cache tok/s | recompute tok/s (over) | speedup |"
  rows = [header, "|---|---:|---:|---:|---:|---:|---:|"]
  for name in _MODELS.value:
    graphdef, params, m = build(name, window)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    for batch in (int(b) for b in _BATCHES.value):
      rng = np.random.default_rng(batch)
      prompts = rng.integers(0, m.vocab_size, (batch, prompt_len)).tolist()

      model_lib.generate(graphdef, params, prompts, new_tokens)  # Compiles.
      start = time.perf_counter()
      out = model_lib.generate(graphdef, params, prompts, new_tokens)
      cached = batch * new_tokens / (time.perf_counter() - start)
      assert all(len(row) == new_tokens for row in out)

      def recompute(tokens):
        return sample(graphdef, params, prompts, tokens, window=window, temperature=0.0, seed=0)  # noqa: B023

      recompute(1)  # Compiles.
      start = time.perf_counter()
      recompute(1)
      step = time.perf_counter() - start
      timed = min(new_tokens, max(1, int(_RECOMPUTE_SECONDS.value / step)))
      if timed > 1:
        start = time.perf_counter()
        recompute(timed)
        step = (time.perf_counter() - start) / timed
      slow = batch / step
      rows.append(
        f"| {name} | {count / 1e6:.1f}M | {batch} | {new_tokens} | {cached:,.0f} | {slow:,.1f} ({timed}) "
        f"| {cached / slow:,.0f}x |"
      )
      print(rows[-1], flush=True)
  print()
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
