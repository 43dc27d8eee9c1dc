"""Generation with a key/value cache: the prompts run once (prefill), then one token a step.

The cache holds every layer's keys and values, k and v [layers, B, K, S, H] in the compute dtype
(heads before slots: a step's attention reads them as they lie), sharded like the activations (batch
over data and fsdp, key/value heads over tensor). Prompts of different lengths are left-padded to one
length P, so a step writes the same slot of every row: the token at slot s of row b has position
s - pad[b] and sees the slots from pad[b] to s. Prefill is the
training forward pass (its attention implementation, the padding a segment of its own), so its keys
and values are the ones a full forward pass computes; a step attends over the cache with the
reference attention's arithmetic (model/attention.cached_attention).

`generate` runs the prefill and the whole loop in one jitted program (a while loop that ends early
once every row has met a stop token) and returns the new tokens of each prompt.
"""

import contextlib
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sharding
from model.transformer import Transformer

CACHE_AXES = ("layers", "act_batch", "act_kv_heads", "act_length", "act_head_dim")


class Cache(NamedTuple):
  """Every layer's keys and values [layers, B, K, S, H], and each row's left padding [B]."""

  k: jax.Array
  v: jax.Array
  pad_B: jax.Array


def _visible(pad_B, index, length: int, slots: int):
  """[B, length, slots]: what tokens at slots index..index+length-1 see, their own row's slots from
  pad_B up to themselves."""
  query_L1 = index + jnp.arange(length)[:, None]
  slot_1S = jnp.arange(slots)[None, :]
  return (slot_1S <= query_L1)[None] & (slot_1S >= pad_B[:, None, None])


def prefill(model: Transformer, tokens_BP, pad_B, slots: int) -> tuple[jax.Array, Cache]:
  """Runs left-padded prompts [B, P] (row b's first pad_B[b] tokens are padding) and returns the logits
  after each prompt's last token [B, V] and a cache of `slots` >= P slots holding the prompts."""
  length = tokens_BP.shape[1]
  slot_1P = jnp.arange(length)[None]
  real_BP = slot_1P >= pad_B[:, None]
  positions_BP = jnp.maximum(slot_1P - pad_B[:, None], 0)
  x_BPD, k, v = model.prefill(tokens_BP, real_BP.astype(jnp.int32), positions_BP)
  widths = ((0, 0), (0, 0), (0, 0), (0, slots - length), (0, 0))
  k = sharding.constrain(jnp.pad(k.transpose(0, 1, 3, 2, 4), widths), CACHE_AXES)
  v = sharding.constrain(jnp.pad(v.transpose(0, 1, 3, 2, 4), widths), CACHE_AXES)
  logits_BV = model.logits(x_BPD[:, -1:])[:, 0]
  return logits_BV, Cache(k, v, pad_B)


def step(model: Transformer, cache: Cache, tokens_B, index) -> tuple[jax.Array, Cache]:
  """Feeds one token per row at slot `index` (the same for every row): the logits after it [B, V] and
  the cache with its keys and values added."""
  positions_B1 = (index - cache.pad_B)[:, None]
  visible_B1S = _visible(cache.pad_B, index, 1, cache.k.shape[3])
  x_B1D, k, v = model.decode(tokens_B[:, None], positions_B1, cache.k, cache.v, index, visible_B1S)
  k, v = sharding.constrain(k, CACHE_AXES), sharding.constrain(v, CACHE_AXES)
  return model.logits(x_B1D)[:, 0], Cache(k, v, cache.pad_B)


def pick(logits_BV, key, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The next token [B] from logits [B, V]: the argmax at temperature 0, else a draw from the
  softmax of logits / temperature restricted to the top_k most likely tokens (0: all) and then to
  the fewest whose probabilities reach top_p (1: all). Ties at either cut are kept."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # The mass of the more likely tokens.
    threshold_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _program(graphdef, mesh, new_tokens: int, temperature: float, top_k: int, top_p: float, stops: tuple[int, ...]):
  """The jitted `run(params, tokens_BP, pad_B, key) -> (new tokens [B, new_tokens], steps)`; after a
  row's stop token its tokens are the stop token again."""
  stop_T = jnp.asarray(stops or (-1,), jnp.int32)

  def run(params, tokens_BP, pad_B, key):
    with sharding.activation_rules(mesh) if mesh is not None else contextlib.nullcontext():
      model = nnx.merge(graphdef, params)
      length = tokens_BP.shape[1]
      logits_BV, cache = prefill(model, tokens_BP, pad_B, length + new_tokens - 1)
      first_B = pick(logits_BV, jax.random.fold_in(key, 0), temperature, top_k, top_p)
      out_BT = jnp.zeros((tokens_BP.shape[0], new_tokens), jnp.int32).at[:, 0].set(first_B)
      done_B = jnp.isin(first_B, stop_T)

      def more(state):
        t, _, _, _, done_B = state
        return (t < new_tokens) & ~jnp.all(done_B)

      def advance(state):
        t, token_B, cache, out_BT, done_B = state
        logits_BV, cache = step(model, cache, token_B, length + t - 1)
        next_B = pick(logits_BV, jax.random.fold_in(key, t), temperature, top_k, top_p)
        next_B = jnp.where(done_B, token_B, next_B)
        out_BT = jax.lax.dynamic_update_index_in_dim(out_BT, next_B, t, axis=1)
        return t + 1, next_B, cache, out_BT, done_B | jnp.isin(next_B, stop_T)

      steps, _, _, out_BT, _ = jax.lax.while_loop(more, advance, (jnp.int32(1), first_B, cache, out_BT, done_B))
      return out_BT, steps

  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return jax.jit(run, out_shardings=replicated)  # Replicated: every host reads the whole result.


def check_request(
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  vocab_size: int,
  max_seq_len: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  max_len: int | None = None,
) -> int:
  """Raises ValueError naming the offending argument (a prompt by its index and length) for a request
  `generate` cannot serve; returns the positions a row may use (max_len, default max_seq_len)."""
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0: no top-k cut)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus cut)")
  max_len = max_seq_len if max_len is None else max_len
  if not 0 < max_len <= max_seq_len:
    raise ValueError(f"max_len={max_len} must be in [1, the model's max_seq_len={max_seq_len}]")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty: give it at least one token (a bos token, say)")
    if len(prompt) + max_new_tokens > max_len:
      raise ValueError(
        f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it needs "
        f"{len(prompt) + max_new_tokens} positions, more than the {max_len} the model takes "
        f"(max_len; the model's max_seq_len is {max_seq_len}); shorten it to at most "
        f"{max(max_len - max_new_tokens, 0)} tokens"
      )
    bad = [int(t) for t in prompt if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
  return max_len


def generate(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  prompts: list[list[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  stop_tokens: Sequence[int] = (),
  seed: int = 0,
  mesh: Mesh | None = None,
  max_len: int | None = None,
) -> list[list[int]]:
  """The new tokens of each prompt (token ids), decoded with a key/value cache.

  Up to `max_new_tokens` per prompt, fewer when a row meets one of `stop_tokens` (which ends it and is
  not returned). temperature 0 is greedy; otherwise tokens are drawn from the softmax of logits /
  temperature, cut to the top_k most likely (0: no cut) and then to the top_p nucleus (1: no cut),
  with random keys from `seed`. A prompt plus max_new_tokens must fit in max_len positions (default
  and at most the model's max_seq_len); a request that does not is a ValueError naming the prompt.

  `mesh`: the mesh to run on, the parameters placed by their logical axes and the cache sharded
  over batch and key/value heads; by default the mesh the parameters already lie on, if any.
  """
  model_cfg = nnx.merge(graphdef, params).cfg
  max_len = check_request(
    prompts,
    max_new_tokens,
    vocab_size=model_cfg.vocab_size,
    max_seq_len=model_cfg.max_seq_len,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    max_len=max_len,
  )
  if not prompts or max_new_tokens == 0:
    return [[] for _ in prompts]
  if mesh is None:
    mesh = _mesh_of(params)
  stops = tuple(sorted({int(t) for t in stop_tokens}))

  # Left padding to a power of two (fewer programs to compile for prompts of many lengths), and
  # rows padded to a multiple of the mesh's batch shards.
  longest = max(len(p) for p in prompts)
  length = min(max(1 << (longest - 1).bit_length(), 1), max_len - max_new_tokens)
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))
  rows = -(-len(prompts) // shards) * shards
  tokens_BP = np.zeros((rows, length), np.int32)
  pad_B = np.full((rows,), length - 1, np.int32)  # Filler rows: one token 0.
  for i, prompt in enumerate(prompts):
    tokens_BP[i, length - len(prompt) :] = np.asarray(prompt, np.int32)
    pad_B[i] = length - len(prompt)

  program = _program(graphdef, mesh, max_new_tokens, float(temperature), int(top_k), float(top_p), stops)
  key = jax.random.key(seed)
  if mesh is not None:
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))  # A no-op where they lie so.
    batch = sharding.logical_to_sharding(("act_batch", None), mesh, shape=tokens_BP.shape)
    tokens_BP = jax.device_put(tokens_BP, batch)
    pad_B = jax.device_put(pad_B, sharding.logical_to_sharding(("act_batch",), mesh, shape=pad_B.shape))
    key = jax.device_put(key, NamedSharding(mesh, PartitionSpec()))
  out_BT, _ = jax.device_get(program(params, tokens_BP, pad_B, key))
  outputs = []
  for row in out_BT[: len(prompts)].tolist():
    ends = [i for i, token in enumerate(row) if token in stops]
    outputs.append(row[: ends[0]] if ends else row)
  return outputs


def generate_past_context(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  prompts: list[list[int]],
  max_new_tokens: int,
  *,
  window: int | None = None,
  seed: int = 0,
  **options,
) -> list[list[int]]:
  """`generate`, continued past the model's context: a row whose next tokens would not fit in `window`
  positions (default and at most max_seq_len) continues from its last window // 2 tokens, run again
  as a prompt. For previews longer than the context (train.py's end-of-run samples); a prompt
  longer than the window keeps its last window - 1 tokens. `options` are generate's."""
  model_cfg = nnx.merge(graphdef, params).cfg
  window = min(window or model_cfg.max_seq_len, model_cfg.max_seq_len)
  keep = max(window // 2, 1)
  contexts = [list(p)[-(window - 1) :] if window > 1 else list(p)[-1:] for p in prompts]
  outputs: list[list[int]] = [[] for _ in prompts]
  active = list(range(len(prompts)))
  remaining, chunk = max_new_tokens, 0
  while active and remaining > 0:
    for i in active:
      if window - len(contexts[i]) < min(remaining, window - keep):
        contexts[i] = contexts[i][-keep:]
    count = min(remaining, min(window - len(contexts[i]) for i in active))
    new = generate(graphdef, params, [contexts[i] for i in active], count, seed=seed + chunk, max_len=window, **options)
    for i, tokens in zip(list(active), new):
      outputs[i] += tokens
      contexts[i] += tokens
      if len(tokens) < count:  # A stop token.
        active.remove(i)
    remaining, chunk = remaining - count, chunk + 1
  return outputs


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  axes = sharding.logical_to_spec(("act_batch",))[0]
  names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return tuple(name for name in names if name in mesh.shape)


def _mesh_of(params) -> Mesh | None:
  """The mesh the parameters lie on, when they were placed by NamedShardings (a train state's)."""
  for leaf in jax.tree.leaves(params):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding) and isinstance(leaf.sharding.mesh, Mesh):
      return leaf.sharding.mesh
  return None
