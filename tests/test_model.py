"""The transformer: packed-segment masking, causality, layout-independence of scan/remat,
GPT-2 and Llama variants, bfloat16, greedy sampling and the FLOPs estimate."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model as model_lib
from configs import base
from model.attention import rotary_embedding
from model.config import ModelConfig
from model.sampling import sample
from model.transformer import CHECKPOINT_INDEPENDENT_FIELDS
from tests import synthetic
from training import state as state_lib

VOCAB = 64


def model_config(**overrides):
  config = synthetic.tiny_config(vocab_size=VOCAB)
  config.model.update(**overrides)
  return synthetic.validated(config, 1).model


def random_params(cfg, seed=0):
  """Parameters of the right shapes without running the (slow to trace) initialiser.

  Norm scales near 1, everything else small and nonzero (biases included, so they matter).
  """
  graphdef, abstract = state_lib.abstract_model(cfg)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    values = rng.normal(0.0, 0.02 if "scale" not in name else 0.1, leaf.shape)
    return jnp.asarray(values + (1.0 if "scale" in name else 0.0), leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def forward(graphdef):
  return jax.jit(lambda params, tokens, segments, positions: nnx.merge(graphdef, params)(tokens, segments, positions))


def mean_loss(graphdef, params, batch):
  logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"])


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_documents_do_not_see_each_other_and_attention_is_causal(position):
  graphdef, params = random_params(model_config(position=position))
  rng = np.random.default_rng(1)
  length, split = 16, 6
  doc1, doc2 = rng.integers(0, VOCAB, split), rng.integers(0, VOCAB, length - split)
  # Row 0: both documents packed, positions restarting at 0 for document 2.
  # Row 1: document 2 alone at the start of the row, then padding (segment 0).
  # Row 2: row 0 with one token of document 2 changed.
  tokens = np.stack(
    [np.concatenate([doc1, doc2]), np.concatenate([doc2, np.zeros(split, int)]), np.concatenate([doc1, doc2])]
  ).astype(np.int32)
  tokens[2, 11] = (tokens[2, 11] + 1) % VOCAB
  segments = np.array(
    [[1] * split + [2] * (length - split), [1] * (length - split) + [0] * split, [1] * split + [2] * (length - split)],
    np.int32,
  )
  positions = np.array(
    [
      list(range(split)) + list(range(length - split)),
      list(range(length - split)) + list(range(split)),
      list(range(split)) + list(range(length - split)),
    ],
    np.int32,
  )
  logits = np.asarray(forward(graphdef)(params, tokens, segments, positions))

  np.testing.assert_allclose(logits[0, split:], logits[1, : length - split], rtol=1e-5, atol=1e-5)
  # The sanity of the comparison: document 2 in row 0 is not what the model predicts at random.
  assert np.abs(logits[0, split:] - logits[0, : length - split]).max() > 1e-3
  # Causality: changing token 11 leaves logits 0..10 alone and changes those from 11 on.
  np.testing.assert_array_equal(logits[2, :11], logits[0, :11])
  assert np.abs(logits[2, 11:] - logits[0, 11:]).max(axis=-1).min() > 1e-4


@pytest.fixture(scope="module")
def reference_loss_and_grads():
  cfg = model_config(scan_layers=True, remat="none")
  graphdef, params = random_params(cfg, seed=2)
  batch = synthetic.batch(4, 16, VOCAB, seed=3)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch)))(params)
  return params, batch, float(loss), grads


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "full"), (True, "dots"), (False, "full")])
def test_scan_and_remat_do_not_change_loss_or_grads(reference_loss_and_grads, scan_layers, remat):
  params, batch, loss_ref, grads_ref = reference_loss_and_grads
  assert loss_ref == pytest.approx(np.log(VOCAB), abs=0.1)
  graphdef, _ = state_lib.abstract_model(model_config(scan_layers=scan_layers, remat=remat))
  loss, grads = jax.jit(jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch)))(params)
  assert float(loss) == pytest.approx(loss_ref, rel=1e-6)
  # Relative to each gradient's norm: XLA may sum in another order, so single tiny entries
  # differ in their last bits (~1e-9 absolute) while the tensors agree to float32 precision.
  for (path, g_ref), g in zip(jax.tree_util.tree_flatten_with_path(grads_ref)[0], jax.tree.leaves(grads)):
    rel = np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)
    assert rel <= 1e-6, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


LLAMA = dict(
  norm="rmsnorm", position="rope", mlp="swiglu", num_heads=4, num_kv_heads=2, tie_embeddings=False, use_bias=False
)
GPT2 = dict(norm="layernorm", position="learned", mlp="gelu", gelu_approximate=True, tie_embeddings=True, use_bias=True)
# Tiny: 2 layers, embed 32, 4 heads of 8, mlp 64, max length 32; leading 2 = stacked layers.
EXPECTED_SHAPES = {
  "llama": {
    "embed": (64, 32),
    "head": (32, 64),
    "blocks.attn.wq": (2, 32, 4, 8),
    "blocks.attn.wk": (2, 32, 2, 8),
    "blocks.attn.wv": (2, 32, 2, 8),
    "blocks.attn.wo": (2, 4, 8, 32),
    "blocks.mlp.w_up": (2, 32, 64),
    "blocks.mlp.w_gate": (2, 32, 64),
    "blocks.mlp.w_down": (2, 64, 32),
    "blocks.attn_norm.scale": (2, 32),
    "blocks.mlp_norm.scale": (2, 32),
    "final_norm.scale": (32,),
  },
  "gpt2": {
    "embed": (64, 32),
    "pos_embed": (32, 32),
    "blocks.attn.wq": (2, 32, 4, 8),
    "blocks.attn.wk": (2, 32, 4, 8),
    "blocks.attn.wv": (2, 32, 4, 8),
    "blocks.attn.wo": (2, 4, 8, 32),
    "blocks.attn.bq": (2, 4, 8),
    "blocks.attn.bk": (2, 4, 8),
    "blocks.attn.bv": (2, 4, 8),
    "blocks.attn.bo": (2, 32),
    "blocks.mlp.w_up": (2, 32, 64),
    "blocks.mlp.w_down": (2, 64, 32),
    "blocks.mlp.b_up": (2, 64),
    "blocks.mlp.b_down": (2, 32),
    "blocks.attn_norm.scale": (2, 32),
    "blocks.attn_norm.bias": (2, 32),
    "blocks.mlp_norm.scale": (2, 32),
    "blocks.mlp_norm.bias": (2, 32),
    "final_norm.scale": (32,),
    "final_norm.bias": (32,),
  },
}


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_model_styles_run_forward_and_backward(style):
  cfg = model_config(**(LLAMA if style == "llama" else GPT2))
  graphdef, params = random_params(cfg, seed=4)
  shapes = {
    ".".join(re.findall(r"\['(\w+)'\]", jax.tree_util.keystr(path))): leaf.shape
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  assert shapes == EXPECTED_SHAPES[style]
  assert sum(np.prod(s) for s in shapes.values()) == model_lib.num_params(cfg)
  batch = synthetic.batch(2, 16, VOCAB, seed=5)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch)))(params)
  assert np.isfinite(float(loss)) and float(loss) == pytest.approx(np.log(VOCAB), abs=0.1)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_bfloat16_loss_is_close_to_float32():
  batch = synthetic.batch(4, 16, VOCAB, seed=6)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, params = random_params(model_config(dtype=dtype, **LLAMA), seed=7)
    losses[dtype] = float(jax.jit(lambda p: mean_loss(graphdef, p, batch))(params))  # noqa: B023 (runs in this iteration)
  assert losses["float32"] == pytest.approx(np.log(VOCAB), abs=0.05)
  assert abs(losses["bfloat16"] - losses["float32"]) < 1e-2
  assert losses["bfloat16"] != losses["float32"]  # it really computed in bfloat16


def test_greedy_sampling_is_deterministic():
  graphdef, params = random_params(model_config(), seed=8)
  prompts = [[1, 2, 3], [5]]
  first = sample(graphdef, params, prompts, num_tokens=6, window=8, temperature=0.0, seed=0)
  again = sample(graphdef, params, prompts, num_tokens=6, window=8, temperature=0.0, seed=123)
  assert first == again
  assert [len(out) for out in first] == [3 + 6, 1 + 6]
  assert first[0][:3] == [1, 2, 3] and first[1][:1] == [5]
  assert all(0 <= t < VOCAB for out in first for t in out)
  # Greedy means the argmax of the model's logits at the prompt's last token.
  logits = nnx.merge(graphdef, params)(jnp.array([[1, 2, 3]], jnp.int32))
  assert first[0][3] == int(jnp.argmax(logits[0, -1]))


def test_flops_per_token_matches_nanogpt_for_shakespeare_char():
  config = synthetic.tiny_config(vocab_size=65)
  config.model.update(num_layers=4, embed_dim=128, num_heads=4, mlp_dim=512, max_seq_len=64)
  config.data.seq_len = 64
  cfg = synthetic.validated(config, 1).model
  n = model_lib.num_params(cfg) - cfg.max_seq_len * cfg.embed_dim  # nanoGPT's get_num_params()
  assert n == 795_904
  expected = 6 * n + 12 * 4 * 4 * 32 * 64  # estimate_mfu: 6N + 12 L H Q T
  assert expected == 5_168_640
  assert model_lib.flops_per_token(cfg, 64) == expected


def test_qkv_bias_alone_is_counted():
  """Qwen2's q/k/v biases (without use_bias's other biases) are parameters num_params counts."""
  cfg = model_config(**LLAMA, qkv_bias=True)
  _, params = random_params(cfg, seed=4)
  names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert sum("'bq'" in n or "'bk'" in n or "'bv'" in n for n in names) == 3
  assert not any("'bo'" in n or "'b_up'" in n for n in names)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == model_lib.num_params(cfg)


def test_rotary_embedding_matches_values_by_hand():
  """Rotate-half RoPE (Hugging Face Llama): head_dim 4 pairs dimension i with i + 2 and turns the
  pair (i, i + 2) by position * theta**(-2i / 4), i.e. by p and p / 100 radians for theta 10000."""
  x = np.array([1.0, 2.0, 3.0, 4.0])
  y = np.array([-0.5, 0.25, 2.0, -1.5])
  positions = np.array([0, 1, 2, 50])
  x_BLNH = np.broadcast_to(np.stack([x, y])[None, None], (1, 4, 2, 4)).astype(np.float32)
  got = np.asarray(rotary_embedding(jnp.asarray(x_BLNH), jnp.asarray(positions[None]), 10000.0))

  def by_hand(v, p):
    a, b = p * 1.0, p * 0.01  # theta**(-0/4), theta**(-2/4)
    return [
      v[0] * np.cos(a) - v[2] * np.sin(a),
      v[1] * np.cos(b) - v[3] * np.sin(b),
      v[2] * np.cos(a) + v[0] * np.sin(a),
      v[3] * np.cos(b) + v[1] * np.sin(b),
    ]

  expected = np.array([[by_hand(v, p) for v in (x, y)] for p in positions])[None]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[0, 0], x_BLNH[0, 0])  # position 0 is the identity
  # Position 1 written out: (cos 1, sin 1) = (0.540302, 0.841471); (cos .01, sin .01) = (0.99995, 0.0099998).
  np.testing.assert_allclose(
    got[0, 1, 0],
    [
      1 * 0.540302 - 3 * 0.841471,
      2 * 0.99995 - 4 * 0.0099998,
      3 * 0.540302 + 1 * 0.841471,
      4 * 0.99995 + 2 * 0.0099998,
    ],
    rtol=1e-5,
  )


def test_model_config_defaults_are_configs_base():
  """Field for field: the same names, and each default equal to base.py's value and of its type."""
  base_model = base.get_config().model.to_dict()
  defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
  assert sorted(defaults) == sorted(base_model)
  for name, value in base_model.items():
    assert defaults[name] == value and type(defaults[name]) is type(value), name
  assert ModelConfig.from_config(base.get_config().model) == ModelConfig()


def test_model_config_fills_derived_fields_and_keeps_given_ones():
  cfg = ModelConfig.from_config(dict(embed_dim=96, num_heads=6))
  assert (cfg.num_kv_heads, cfg.head_dim) == (6, 16)
  cfg = ModelConfig.from_config(dict(embed_dim=96, num_heads=6, num_kv_heads=2, head_dim=32))
  assert (cfg.num_kv_heads, cfg.head_dim) == (2, 32)
  # A config validation filled in and the one it came from are the same model.
  assert ModelConfig.from_config(model_config()) == ModelConfig.from_config(synthetic.tiny_config(VOCAB).model)


def test_model_config_refuses_unknown_fields_and_wrong_types():
  with pytest.raises(ValueError, match="'num_head'"):
    ModelConfig.from_config(dict(num_head=4))
  with pytest.raises(ValueError, match="'embed_dim'=12.5 must be a int"):
    ModelConfig.from_config(dict(embed_dim=12.5))
  with pytest.raises(ValueError, match="'use_bias'=1 must be a bool"):
    ModelConfig.from_config(dict(use_bias=1))
  rope_theta = ModelConfig.from_config(dict(rope_theta=500000)).rope_theta
  assert rope_theta == 500000.0 and type(rope_theta) is float


def test_model_config_is_frozen_hashable_and_passes_through():
  cfg = ModelConfig.from_config(model_config())
  assert ModelConfig.from_config(cfg) is cfg
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.num_layers = 3
  assert hash(cfg) == hash(ModelConfig.from_config(model_config()))
  assert {cfg: 1}[ModelConfig.from_config(model_config())] == 1
  assert jax.jit(lambda c: c.num_layers, static_argnums=0)(cfg) == cfg.num_layers
  # The model keeps it as a static attribute of its graph, converted from the ConfigDict once.
  graphdef, _ = state_lib.abstract_model(model_config())
  assert nnx.merge(graphdef, state_lib.abstract_model(model_config())[1]).cfg == cfg


def test_checkpoint_independent_fields_are_model_config_fields():
  assert CHECKPOINT_INDEPENDENT_FIELDS <= {field.name for field in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize(
  "field,value",
  [("norm", "batchnorm"), ("position", "alibi"), ("mlp", "relu"), ("dtype", "float16"), ("remat", "some")],
)
def test_unknown_choices_are_refused_naming_the_field(field, value):
  model_fields = synthetic.tiny_config(vocab_size=VOCAB).model  # Unvalidated: validation would refuse first.
  model_fields[field] = value
  with pytest.raises(ValueError, match=f"'model.{field}'='{value}'"):
    state_lib.abstract_model(model_fields)
