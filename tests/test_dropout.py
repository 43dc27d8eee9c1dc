"""Dropout (model.dropout_rate): new masks every step and every microbatch, none in evaluation or
sampling. (tests/test_training.py's resume test runs with dropout: a resumed run drops as the
uninterrupted one did.)"""

import jax
import numpy as np

import sharding
from model.sampling import sample
from tests import synthetic
from tests.test_model import model_config, random_params
from training import state as state_lib
from training import step as step_lib
from training.setup import build_setup


def test_masks_differ_between_steps_and_between_microbatches():
  config = synthetic.tiny_config()
  config.model.dropout_rate = 0.5
  # Plain SGD with lr 1: the update is the gradient itself.
  config.optimizer.update(
    name="sgd",
    momentum=0.0,
    learning_rate=1.0,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip_norm=0.0,
  )
  config.train.microbatches = 2
  setup = build_setup(synthetic.validated(config, 1), devices=jax.devices()[:1])
  mesh, shardings = setup.mesh, setup.shardings
  initial = jax.device_get(setup.state_from_params(random_params(config.model, seed=6)[1]))
  train_step = setup.train_step()  # With dropout (model.dropout_rate) and 2 microbatches.

  def gradient(step, rows):
    """The gradient of one step on `rows` from the same parameters, at train step `step`."""
    state = jax.device_put(initial.replace(step=np.int32(step)), shardings)  # The step donates it.
    after = jax.device_get(train_step(state, sharding.global_batch_from_local(rows, mesh))[0].params)
    return np.concatenate(
      [np.ravel(before - now) for before, now in zip(jax.tree.leaves(initial.params), jax.tree.leaves(after))]
    )

  def relative_difference(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  # Microbatch k takes rows k, k + 2, ...: interleaving puts x in microbatch 0 and y in microbatch 1.
  x, y = (synthetic.batch(8, config.data.seq_len, config.model.vocab_size, seed=seed) for seed in (1, 2))
  interleave = lambda a, b: {k: np.stack([a[k], b[k]], axis=1).reshape((16,) + a[k].shape[1:]) for k in a}
  xy = gradient(0, interleave(x, y))
  np.testing.assert_array_equal(gradient(0, interleave(x, y)), xy)  # Differences below are the masks'.
  next_step = gradient(1, interleave(x, y))
  assert relative_difference(next_step, xy) > 0.1
  # With one mask for both microbatches, xy's gradient would be the mean of xx's and yy's.
  mean = (gradient(0, interleave(x, x)) + gradient(0, interleave(y, y))) / 2
  assert relative_difference(xy, mean) > 0.1


def test_evaluation_and_sampling_do_not_drop():
  graphdef, params = random_params(model_config(dropout_rate=0.5), seed=4)
  plain_graphdef, _ = state_lib.abstract_model(model_config(dropout_rate=0.0))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  batch = synthetic.batch(4, 16, 64, seed=5)
  loss, weight = jax.device_get(step_lib.make_eval_step(graphdef, mesh, None)(params, batch))
  plain = jax.device_get(step_lib.make_eval_step(plain_graphdef, mesh, None)(params, batch))
  assert (loss, weight) == plain
  dropped, _ = jax.device_get(
    jax.jit(lambda p, b, key: step_lib.token_losses(graphdef, p, b, key))(params, batch, jax.random.key(0))
  )
  assert abs(dropped - loss) > 1e-4 * loss  # The rate is not lost on the way: a key would drop.

  prompts = [[1, 2, 3], [7], [5, 9, 11, 13], [60, 2]]
  greedy = dict(num_tokens=8, window=16, temperature=0.0, seed=0)
  assert sample(graphdef, params, prompts, **greedy) == sample(plain_graphdef, params, prompts, **greedy)
