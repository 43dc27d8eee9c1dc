"""Generation with a key/value cache (model/decode.py): cached logits are a full forward pass's, for
both model families, prompts of different lengths in one batch and on a (data, tensor) mesh; greedy,
stop tokens, top-k/top-p, seeds, and requests refused with the prompt named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model as model_lib
import sharding
from model import decode
from tests import synthetic
from training import state as state_lib

VOCAB = 64
FAMILIES = {
  # GPT-2: LayerNorm, learned positions, GELU, biases, tied embeddings; layers unrolled.
  "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True, scan_layers=False),
  # Llama: RMSNorm, RoPE, SwiGLU, 2 key/value heads for 4 query heads, untied head; layers scanned.
  "llama": dict(
    norm="rmsnorm",
    position="rope",
    mlp="swiglu",
    num_kv_heads=2,
    use_bias=False,
    tie_embeddings=False,
    scan_layers=True,
  ),
}


def family_model(family, seed=0, **overrides):
  """A tiny model of `family` (max_seq_len 32) with random parameters, biases and norms included."""
  config = synthetic.tiny_config(vocab_size=VOCAB)
  config.model.update(**FAMILIES[family], **overrides)
  graphdef, abstract = state_lib.abstract_model(synthetic.validated(config, 1).model)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = "scale" in jax.tree_util.keystr(path)
    return jnp.asarray(rng.normal(0.0, 0.1 if scale else 0.3, leaf.shape) + scale, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def data_tensor_mesh():
  return sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4])


@jax.jit
def _forward(graphdef, params, tokens_1L):
  return nnx.merge(graphdef, params)(tokens_1L)[0]


def full_forward_logits(graphdef, params, tokens):
  """The logits [L, V] of one unpadded row, by the training forward pass (over a row of max_seq_len
  with zeros after it, which a causal model's earlier logits do not depend on: one compilation)."""
  row = np.zeros((1, 32), np.int32)
  row[0, : len(tokens)] = tokens
  return np.asarray(_forward(graphdef, params, jnp.asarray(row)))[: len(tokens)]


PROMPTS = [[5, 17, 3], [9, 1, 40, 22, 8, 61, 2], [33], [12, 7, 7, 50, 4]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_logits_equal_a_full_forward_pass(family):
  graphdef, params = family_model(family)
  mesh = data_tensor_mesh()
  params = jax.device_put(params, sharding.tree_shardings(params, mesh))
  rng = np.random.default_rng(1)
  steps = 9
  continuations = rng.integers(0, VOCAB, (len(PROMPTS), steps)).astype(np.int32)
  length = 8  # Left padding: row b's prompt ends at slot 7.
  tokens = np.zeros((len(PROMPTS), length), np.int32)
  pad = np.array([length - len(p) for p in PROMPTS], np.int32)
  for i, prompt in enumerate(PROMPTS):
    tokens[i, pad[i] :] = prompt

  @jax.jit
  def cached(params, tokens_BP, pad_B, continuations_BT):
    with sharding.activation_rules(mesh):
      model = nnx.merge(graphdef, params)
      logits_BV, cache = decode.prefill(model, tokens_BP, pad_B, length + steps)
      every = [logits_BV]
      for t in range(steps):
        logits_BV, cache = decode.step(model, cache, continuations_BT[:, t], length + t)
        every.append(logits_BV)
      return jnp.stack(every, axis=1), cache

  rows = sharding.logical_to_sharding(("act_batch", None), mesh)
  pad_rows = sharding.logical_to_sharding(("act_batch",), mesh)
  logits, cache = cached(params, jax.device_put(tokens, rows), jax.device_put(pad, pad_rows), continuations)
  # The cache lies sharded over the batch (data) and the key/value heads (tensor).
  expected = sharding.logical_to_sharding(decode.CACHE_AXES, mesh, shape=cache.k.shape)
  assert cache.k.sharding.is_equivalent_to(expected, cache.k.ndim)
  assert cache.k.shape == (2, len(PROMPTS), FAMILIES[family].get("num_kv_heads", 4), length + steps, 8)
  logits = np.asarray(logits)
  for i, prompt in enumerate(PROMPTS):
    row = list(prompt) + continuations[i].tolist()
    reference = full_forward_logits(graphdef, params, row)[len(prompt) - 1 :]
    np.testing.assert_allclose(logits[i], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_follows_the_full_forward_argmax_and_stops(family):
  graphdef, params = family_model(family, seed=2)
  new = 10
  expected = []
  for prompt in PROMPTS:
    row = list(prompt)
    for _ in range(new):
      row.append(int(np.argmax(full_forward_logits(graphdef, params, row)[-1])))
    expected.append(row[len(prompt) :])
  got = model_lib.generate(graphdef, params, PROMPTS, new, mesh=data_tensor_mesh())
  assert got == expected
  # A stop token ends its row (and is not returned); the other rows go on to max_new_tokens.
  stop = expected[0][3]
  stopped = model_lib.generate(graphdef, params, PROMPTS, new, stop_tokens=[stop])
  for row, full in zip(stopped, expected):
    assert row == (full[: full.index(stop)] if stop in full else full)
  # Without a mesh (one device), and a prompt alone, the same tokens.
  assert model_lib.generate(graphdef, params, PROMPTS[1:2], new) == expected[1:2]


def test_sampling_is_seeded_and_cut_by_top_k_and_top_p():
  graphdef, params = family_model("llama", seed=3)
  greedy = model_lib.generate(graphdef, params, PROMPTS, 8)
  options = dict(temperature=1.5, seed=7)
  first = model_lib.generate(graphdef, params, PROMPTS, 8, **options)
  assert first == model_lib.generate(graphdef, params, PROMPTS, 8, **options)
  assert first != model_lib.generate(graphdef, params, PROMPTS, 8, temperature=1.5, seed=8)
  assert first != greedy
  # Cut to the one most likely token, sampling is greedy.
  assert model_lib.generate(graphdef, params, PROMPTS, 8, top_k=1, **options) == greedy
  assert model_lib.generate(graphdef, params, PROMPTS, 8, top_p=1e-6, **options) == greedy

  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # Tokens by probability: 1, 3, 4, 2, 0.
  keys = jax.random.split(jax.random.key(0), 2000)

  def draws(top_k, top_p):
    return set(np.asarray(jax.vmap(lambda k: decode.pick(logits, k, 1.0, top_k, top_p))(keys)).ravel().tolist())

  assert draws(0, 1.0) == {0, 1, 2, 3, 4}
  assert draws(2, 1.0) == {1, 3}
  assert draws(0, 0.6) == {1, 3}  # 0.4 < 0.6, so token 3 is needed; 0.4 + 0.3 reaches it.
  assert draws(0, 0.35) == {1}
  # top_p cuts what top_k leaves, renormalised: 1 and 3 hold 0.7 / 0.85 = 0.82 of the top 3.
  assert draws(3, 0.8) == {1, 3}
  assert draws(3, 0.85) == {1, 3, 4}


def test_requests_it_cannot_serve_are_refused_naming_the_prompt():
  graphdef, params = family_model("gpt2")  # max_seq_len 32.
  with pytest.raises(ValueError, match=r"^prompt 1 has 30 tokens: with max_new_tokens=5 it needs 35 positions"):
    model_lib.generate(graphdef, params, [[1], [2] * 30], 5)
  with pytest.raises(ValueError, match=r"^prompt 0 is empty"):
    model_lib.generate(graphdef, params, [[], [2]], 5)
  with pytest.raises(ValueError, match=r"^prompt 1 has token ids \[64, 99\] outside the vocabulary \[0, 64\)"):
    model_lib.generate(graphdef, params, [[1], [64, 3, 99]], 5)
  with pytest.raises(ValueError, match=r"^top_p=0.0 must be in \(0, 1\]"):
    model_lib.generate(graphdef, params, [[1]], 5, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match=r"^max_len=40 must be in \[1, the model's max_seq_len=32\]"):
    model_lib.generate(graphdef, params, [[1]], 5, max_len=40)
  assert model_lib.generate(graphdef, params, [[1], [2, 3]], 0) == [[], []]
  assert model_lib.generate(graphdef, params, [], 5) == []


def test_generation_past_the_context_continues_from_the_last_half_window():
  graphdef, params = family_model("gpt2", seed=4)
  prompts = [[5, 6, 7], [9]]
  out = decode.generate_past_context(graphdef, params, prompts, 50, window=16)
  assert [len(row) for row in out] == [50, 50]
  # The first chunk fills the window; the next starts from the last 8 tokens.
  first = model_lib.generate(graphdef, params, prompts, 13, max_len=16)
  assert [row[:13] for row in out] == first
  second = model_lib.generate(
    graphdef, params, [(p + row)[-8:] for p, row in zip(prompts, first)], 8, max_len=16, seed=1
  )
  assert [row[13:21] for row in out] == second
