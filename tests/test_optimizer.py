"""Learning-rate schedules, the weight-decay mask, and that every optimizer learns."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import sharding
from configs import base
from tests import synthetic
from training import optimizer
from training import state as state_lib
from training.setup import build_setup


def optimizer_config(**overrides) -> ConfigDict:
  config = base.get_config().optimizer
  config.update(**overrides)
  return config


def lr_at(config, num_steps, steps):
  schedule = optimizer.learning_rate_schedule(config, num_steps)
  return [float(schedule(jnp.asarray(s, jnp.int32))) for s in steps]


def nanogpt_get_lr(it, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000):
  """nanoGPT's train.py get_lr, verbatim."""
  if it < warmup_iters:
    return learning_rate * (it + 1) / (warmup_iters + 1)
  if it > lr_decay_iters:
    return min_lr
  decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  assert 0 <= decay_ratio <= 1
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return min_lr + coeff * (learning_rate - min_lr)


def test_warmup_cosine_matches_nanogpt():
  config = optimizer_config(schedule="warmup_cosine", learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=100)
  steps = [0, 50, 99, 100, 101, 1000, 1999, 2000, 2500]
  got = lr_at(config, 2000, steps)
  np.testing.assert_allclose(got, [nanogpt_get_lr(s) for s in steps], rtol=1e-6)
  # And by hand: (0+1)/101, (50+1)/101, 100/101 of the peak; the peak; halfway-ish; the floor.
  np.testing.assert_allclose(got[:4], [1e-3 / 101, 51e-3 / 101, 100e-3 / 101, 1e-3], rtol=1e-6)
  assert got[5] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 900 / 1900)), rel=1e-6)
  assert got[5] == pytest.approx(5.871607e-4, rel=1e-6)
  assert got[7] == pytest.approx(1e-4, rel=1e-6) and got[8] == pytest.approx(1e-4, rel=1e-6)


def test_warmup_linear():
  config = optimizer_config(schedule="warmup_linear", learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10)
  got = lr_at(config, 110, [0, 9, 10, 35, 60, 110, 200])
  np.testing.assert_allclose(got, [1 / 11, 10 / 11, 1.0, 0.775, 0.55, 0.1, 0.1], rtol=1e-6)


def test_constant():
  config = optimizer_config(schedule="constant", learning_rate=3e-4, warmup_steps=4)
  np.testing.assert_allclose(
    lr_at(config, 100, [0, 3, 4, 50, 100, 1000]), [3e-4 / 5, 3e-4 * 4 / 5, 3e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6
  )
  config.warmup_steps = 0
  np.testing.assert_allclose(lr_at(config, 100, [0, 99]), [3e-4, 3e-4], rtol=1e-6)


def test_wsd():
  # 100 steps, the last 20% decaying linearly from the peak to 0.1 of it.
  config = optimizer_config(schedule="wsd", learning_rate=2.0, min_lr_ratio=0.1, warmup_steps=10, decay_fraction=0.2)
  got = lr_at(config, 100, [0, 9, 10, 50, 80, 85, 90, 100, 150])
  np.testing.assert_allclose(got, [2 / 11, 20 / 11, 2.0, 2.0, 2.0, 1.55, 1.1, 0.2, 0.2], rtol=1e-6)


def test_rsqrt():
  config = optimizer_config(schedule="rsqrt", learning_rate=1.0, warmup_steps=100)
  got = lr_at(config, 100_000, [0, 99, 100, 400, 10_000])
  np.testing.assert_allclose(got, [1 / 101, 100 / 101, 1.0, 0.5, 0.1], rtol=1e-6)
  config.warmup_steps = 0  # no warmup: 1/sqrt(step) from step 1 on
  np.testing.assert_allclose(lr_at(config, 100, [0, 1, 4, 16]), [1.0, 1.0, 0.5, 0.25], rtol=1e-6)


def _biased_params():
  config = synthetic.tiny_config()
  config.model.update(use_bias=True, tie_embeddings=False, position="learned")
  config = synthetic.validated(config, 1)
  _, abstract_params = state_lib.abstract_model(config.model)
  return config, abstract_params


def _mask_by_name(mask):
  return {
    jax.tree_util.keystr(path).replace(".value", ""): bool(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
  }


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask(decay_embeddings):
  _, params = _biased_params()
  mask = _mask_by_name(optimizer.weight_decay_mask(params, decay_embeddings))
  decayed = {name for name, decays in mask.items() if decays}
  matrices = {f"['blocks']['attn']['{w}']" for w in ("wq", "wk", "wv", "wo")} | {
    "['blocks']['mlp']['w_up']",
    "['blocks']['mlp']['w_down']",
    "['head']",
  }
  embeddings = {"['embed']", "['pos_embed']"}
  assert decayed == (matrices | embeddings if decay_embeddings else matrices)
  assert len(mask) == 21  # 7 matrices, 2 embeddings, 4 attention + 2 MLP biases, 3 norms * (scale, bias)


def _filled_params(abstract_params, seed=0):
  """Distinct nonzero values, so an update proportional to the parameter shows which one it used."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), abstract_params)


def _one_update(tx, grads, params):
  return jax.device_get(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params))


def _by_name(tree):
  return {
    jax.tree_util.keystr(path).replace(".value", ""): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.parametrize("decay_embeddings", [False, True], ids=["no_embed_decay", "embed_decay"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_every_optimizer_decays_only_the_masked_weights(name, decay_embeddings):
  """With zero gradients the update is -lr * wd * param on decayed weights and exactly 0 elsewhere.

  The same for every optimizer: optimizer.weight_decay is decoupled decay scaled by the learning rate
  (as AdamW, and as PyTorch's and Hugging Face's Adafactor, do).
  """
  _, abstract_params = _biased_params()
  opt = optimizer_config(
    name=name,
    schedule="constant",
    warmup_steps=0,
    learning_rate=0.5,
    weight_decay=0.1,
    momentum=0.0,
    grad_clip_norm=1.0,
    decay_embeddings=decay_embeddings,
  )
  tx, _ = optimizer.build_optimizer(opt, 10, abstract_params)
  params = _filled_params(abstract_params)
  updates = _by_name(_one_update(tx, jax.tree.map(jnp.zeros_like, params), params))
  params = _by_name(params)
  mask = _mask_by_name(optimizer.weight_decay_mask(abstract_params, decay_embeddings))
  assert sum(mask.values()) == (9 if decay_embeddings else 7)
  for path, update in updates.items():
    expected = -0.5 * 0.1 * params[path] if mask[path] else np.zeros_like(update)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=0, err_msg=path)


@pytest.mark.parametrize(
  "learning_rate,clip",
  [(1.0, 2.0), (0.5, 2.0), (0.5, 0.0), (0.5, 1e9)],
  ids=["lr1_clip2", "lr0.5_clip2", "no_clip", "clip_above_norm"],
)
def test_gradient_clipping(learning_rate, clip):
  """A gradient of norm ~1000 is scaled to norm `clip` before the step; clip 0 (or a norm below the
  clip) leaves it whole. SGD without momentum or decay: the update is -lr * (clipped) gradient."""
  _, abstract_params = _biased_params()
  opt = optimizer_config(
    name="sgd",
    schedule="constant",
    warmup_steps=0,
    learning_rate=learning_rate,
    weight_decay=0.0,
    momentum=0.0,
    grad_clip_norm=clip,
  )
  tx, _ = optimizer.build_optimizer(opt, 10, abstract_params)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 30.0, a.shape), a.dtype), abstract_params)
  grad_norm = float(optax.tree.norm(grads))
  assert grad_norm > 500
  updates = _one_update(tx, grads, _filled_params(abstract_params))
  scale = clip / grad_norm if 0 < clip < grad_norm else 1.0
  assert float(optax.tree.norm(updates)) == pytest.approx(learning_rate * scale * grad_norm, rel=1e-5)
  if 0 < clip < grad_norm:
    assert float(optax.tree.norm(updates)) == pytest.approx(learning_rate * clip, rel=1e-5)
  grads, updates = _by_name(grads), _by_name(updates)
  for path, update in updates.items():
    np.testing.assert_allclose(update, -learning_rate * scale * grads[path], rtol=1e-5, atol=1e-6, err_msg=path)


OPTIMIZERS = {
  "adamw": dict(name="adamw", learning_rate=1e-2),
  "sgd_nesterov": dict(name="sgd", learning_rate=0.5, momentum=0.9, nesterov=True),
  # Adafactor scales its steps by each parameter's RMS (~0.02 here), so it takes a larger rate.
  "adafactor": dict(name="adafactor", learning_rate=0.3),
}


@pytest.fixture(scope="module")
def initial_params():
  """The tiny model's initial parameters, created once: the same start for every optimizer."""
  config = synthetic.validated(synthetic.tiny_config(), 1)
  return jax.device_get(build_setup(config, devices=jax.devices()[:1]).init_state(seed=0).params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_lowers_the_loss(name, initial_params):
  config = synthetic.tiny_config()
  config.optimizer.update(schedule="constant", warmup_steps=0, **OPTIMIZERS[name])
  setup = build_setup(synthetic.validated(config, 1), devices=jax.devices()[:1])
  state = setup.state_from_params(initial_params)
  train_step = setup.train_step()
  batch = sharding.global_batch_from_local(
    synthetic.batch(16, config.data.seq_len, config.model.vocab_size, seed=3), setup.mesh
  )
  losses = []
  for _ in range(6):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 6
  assert losses[0] == pytest.approx(math.log(256), abs=0.05)  # the same init for every optimizer
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.05, losses
