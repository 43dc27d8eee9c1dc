"""Magnitude pruning: exact sparsity, 2:4 groups, the cubic schedule, zeros that stay zero through
training and a resume, and the same losses on a (2, 2, 2) mesh as on one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from data.tokenizers import ByteTokenizer
from model import Transformer
from tests import synthetic
from tests.test_training import corpus_config
from training import pruning
from training.run import train
from training.setup import build_setup
from training.validation import ConfigError

KERNELS = [
  "blocks/attn/wq",
  "blocks/attn/wk",
  "blocks/attn/wv",
  "blocks/attn/wo",
  "blocks/mlp/w_up",
  "blocks/mlp/w_down",
]


def tiny_params(mlp="gelu", seed=0):
  config = synthetic.validated(synthetic.tiny_config(), 1)
  config.model.mlp = mlp
  return jax.device_get(nnx.state(Transformer(config.model, nnx.Rngs(seed))))


def by_name(params) -> dict[str, np.ndarray]:
  return {pruning._path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def input_groups(name, w):
  """A stacked kernel as [layers, inputs, outputs], its input axes (1, or 2 for wo) flattened."""
  axes = pruning.KERNEL_INPUT_AXES[name]
  return w.reshape(w.shape[0], math.prod(w.shape[1 : 1 + axes]), -1)


def test_layer_scope_prunes_exactly_the_smallest_of_each_layer_slice():
  params = tiny_params()
  before, after = by_name(params), by_name(pruning.prune_params(params, {"sparsity": 0.3}))
  for name in KERNELS:
    for w0, w in zip(before[name], after[name]):  # One layer slice at a time.
      pruned = w == 0
      assert pruned.sum() == round(0.3 * w.size), name  # 0.3 * 1024 = 307.2 -> 307 of wq's 1024.
      assert np.abs(w0[pruned]).max() <= np.abs(w0[~pruned]).min()  # The smallest magnitudes go.
      np.testing.assert_array_equal(w[~pruned], w0[~pruned])
  for name in ("embed", "pos_embed", "blocks/attn_norm/scale", "final_norm/scale"):
    np.testing.assert_array_equal(after[name], before[name])  # Never pruned.
  report = pruning.sparsity_report(pruning.prune_params(params, {"sparsity": 0.3}))
  assert report["blocks/attn/wq"] == 2 * 307 / 2048 and report["blocks/mlp/w_up"] == 2 * 614 / 4096
  assert report["overall"] == pytest.approx(0.3, abs=1e-3)


def test_global_scope_prunes_exactly_the_smallest_over_all_kernels():
  params = tiny_params()
  before, after = by_name(params), by_name(pruning.prune_params(params, {"sparsity": 0.7, "scope": "global"}))
  pruned = np.concatenate([after[n].ravel() == 0 for n in KERNELS])
  magnitudes = np.concatenate([np.abs(before[n]).ravel() for n in KERNELS])
  assert pruned.sum() == round(0.7 * pruned.size) == 11469  # Of 16384 kernel weights.
  assert magnitudes[pruned].max() <= magnitudes[~pruned].min()
  # One threshold over all: wo and w_down start with half the std (GPT-2's residual scaling), so
  # they lose more than the others.
  report = pruning.sparsity_report(after)
  assert report["blocks/attn/wo"] > 0.8 > 0.65 > report["blocks/attn/wq"]


def test_ties_are_broken_by_position():
  """Equal magnitudes: the earlier weights (in row-major order of each layer slice) are pruned first."""
  params = tiny_params()
  params["blocks"]["attn"]["wq"].set_value(np.ones((2, 32, 4, 8), np.float32))
  wq = by_name(pruning.prune_params(params, {"sparsity": 0.25, "targets": "blocks/attn/wq"}))["blocks/attn/wq"]
  for layer in wq:
    np.testing.assert_array_equal(layer.ravel() == 0, np.arange(layer.size) < 256)


def test_two_of_four_holds_in_every_group_of_four_input_weights():
  params = tiny_params(mlp="swiglu")
  pruned_params = pruning.prune_params(params, {"structure": "2:4", "targets": pruning.DEFAULT_TARGETS})
  before, after = by_name(params), by_name(pruned_params)
  for name in [*KERNELS, "blocks/mlp/w_gate"]:
    w0, w = input_groups(name, before[name]), input_groups(name, after[name])
    layers, inputs, outputs = w.shape
    w0 = w0.reshape(layers, inputs // 4, 4, outputs)
    w = w.reshape(layers, inputs // 4, 4, outputs)
    zeros = (w == 0).sum(axis=2)
    assert (zeros == 2).all(), name  # In every group of 4 inputs of every output column.
    kept_min = np.where(w != 0, np.abs(w0), np.inf).min(axis=2)
    pruned_max = np.where(w == 0, np.abs(w0), -np.inf).max(axis=2)
    assert (pruned_max <= kept_min).all(), name
  assert pruning.sparsity_report(pruned_params)["overall"] == 0.5


def test_cubic_schedule_and_its_mask_update_steps():
  cfg = {"sparsity": 0.8, "begin_step": 10, "end_step": 30, "every": 7}
  values = [pruning.scheduled_sparsity(cfg, t) for t in (0, 10, 15, 20, 25, 30, 99)]
  # 0.8 * (1 - (1 - (t - 10) / 20)^3): 0.8 * (1 - 0.75^3) = 0.4625 at 15, 0.8 * 0.875 = 0.7 at 20.
  assert values == pytest.approx([0.0, 0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8], abs=1e-12)
  assert pruning.mask_update_steps(cfg) == [10, 17, 24, 30]
  one_shot = {"sparsity": 0.5, "begin_step": 5, "end_step": 5, "every": 100}
  assert pruning.mask_update_steps(one_shot) == [5]
  assert [pruning.scheduled_sparsity(one_shot, t) for t in (4, 5, 6)] == [0.0, 0.5, 0.5]


def test_the_transformation_follows_the_schedule_and_only_removes_weights():
  """Random updates to a stacked kernel: after each step's update, each layer slice has the zeros of
  the last mask update's scheduled sparsity, and every zero stays zero."""
  rng = np.random.default_rng(0)
  params = {"blocks": {"mlp": {"w_up": jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)}}}
  cfg = {"method": "magnitude", "sparsity": 0.9, "begin_step": 2, "end_step": 10, "every": 4, "targets": ".*"}
  tx = pruning.prune(cfg, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = {2: 0, 6: round(0.9 * (1 - 0.5**3) * 512), 10: round(0.9 * 512)}  # 0, 394, 461 per slice.
  zeros_before, last = np.zeros((2, 16, 32), bool), 0
  for t in range(14):
    updates = {"blocks": {"mlp": {"w_up": jnp.asarray(rng.normal(size=(2, 16, 32)) * 0.1, jnp.float32)}}}
    updates, state = update(updates, state, params)
    params = jax.tree.map(jnp.add, params, updates)
    w = np.asarray(params["blocks"]["mlp"]["w_up"])
    last = expected.get(t, last)
    assert [(layer == 0).sum() for layer in w] == [last, last], t
    assert (w[zeros_before] == 0).all()  # Pruned weights stay exactly zero.
    zeros_before = w == 0
    assert float(pruning.overall_sparsity(params, ".*")) == last / 512
  assert int(state.count) == 14


def pruning_config(config, **fields):
  config.pruning.update(method="magnitude", **fields)
  return config


# The training runs of the two tests below: their (2, 2, 2) train steps are one program, compiled once
# (tests/conftest.py's compilation cache). Mask updates at steps 2, 5 and 8.
RUN = dict(num_steps=12, eval_every=0, checkpoint_every=6, log_every=3, num_samples=0)
SCHEDULE = dict(sparsity=0.5, begin_step=2, end_step=8, every=3)


def test_pruned_weights_stay_zero_through_training_and_an_exact_resume(tmp_path):
  def config(**train):
    return pruning_config(corpus_config(tmp_path, **dict(RUN, **train)), **SCHEDULE)

  straight = train(config(), str(tmp_path / "straight"))
  interrupted = str(tmp_path / "interrupted")
  first = train(config(stop_at_step=6), interrupted)
  resumed = train(config(), interrupted)
  assert resumed.resumed_from == 6
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)  # Parameters, moments, masks and the pruning counter.
  middle, final = by_name(jax.device_get(first.state.params)), by_name(jax.device_get(resumed.state.params))
  for name in KERNELS:
    zeros_at_6 = middle[name] == 0
    assert (final[name][zeros_at_6] == 0).all(), name  # Pruned at step 5: still zero after 6 more steps.
    n = final[name][0].size
    assert [(layer == 0).sum() for layer in middle[name]] == [round(0.5 * (1 - 0.5**3) * n)] * 2
    assert [(layer == 0).sum() for layer in final[name]] == [n // 2] * 2  # Three steps after the last update.
  pruning_state = resumed.state.opt_state[-1]
  assert int(pruning_state.count) == 12
  masks = by_name(jax.device_get(pruning_state.masks))
  assert sorted(masks) == sorted(KERNELS)
  for name in KERNELS:
    np.testing.assert_array_equal(masks[name], final[name] != 0)


def test_pruned_training_on_a_2x2x2_mesh_equals_one_device(tmp_path):
  params = None

  def run(num_devices, **mesh):
    nonlocal params
    config = pruning_config(corpus_config(tmp_path, **RUN), **SCHEDULE)
    config.model.vocab_size = ByteTokenizer().vocab_size
    config.mesh.update(**mesh)
    setup = build_setup(synthetic.validated(config, num_devices), devices=jax.devices()[:num_devices])
    if params is None:  # From the host: an initialisation compiled for the mesh costs seconds.
      params = nnx.state(Transformer(setup.config.model, nnx.Rngs(0)))
    state, step, losses = setup.state_from_params(params), setup.train_step(), []
    for t in range(10):
      batch = synthetic.batch(16, config.data.seq_len, config.model.vocab_size, seed=t)
      state, metrics = step(state, sharding.global_batch_from_local(batch, setup.mesh))
      losses.append(float(metrics["loss"]))
    return setup, state, losses

  setup_8, state_8, losses_8 = run(8)  # corpus_config's (2, 2, 2) mesh.
  _, state_1, losses_1 = run(1, data=1, fsdp=1, tensor=1)
  assert dict(setup_8.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  masks_1, masks_8 = state_1.opt_state[-1].masks, state_8.opt_state[-1].masks
  param_shardings = {
    pruning._path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(setup_8.shardings.params)[0]
  }
  for (path, m1), m8 in zip(jax.tree_util.tree_flatten_with_path(masks_1)[0], jax.tree.leaves(masks_8)):
    name = pruning._path_name(path)
    np.testing.assert_array_equal(np.asarray(m8), np.asarray(m1), err_msg=name)
    assert m8.sharding == param_shardings[name], name  # Each mask is sharded as its kernel...
    assert m8.sharding.spec != jax.sharding.PartitionSpec(), name  # ...not replicated.
  report = pruning.sparsity_report(jax.device_get(state_8.params))
  assert report["overall"] == 0.5 and report["blocks/attn/wo"] == 0.5


@pytest.mark.parametrize("fields", [dict(scope="layer"), dict(scope="global"), dict(structure="2:4")], ids=str)
def test_masks_of_sharded_weights_equal_the_host_ones(fields):
  """The masks' sorts over kernels laid out on (2, 2, 2) pick the same weights as on the host."""
  config = synthetic.validated(synthetic.tiny_config(data=2, fsdp=2, tensor=2), 8)
  params = tiny_params()
  placed = jax.device_put(params, sharding.tree_shardings(params, sharding.make_mesh(config.mesh)))
  host = by_name(pruning.prune_params(params, dict(sparsity=0.5, **fields)))
  sharded = by_name(jax.device_get(pruning.prune_params(placed, dict(sparsity=0.5, **fields))))
  for name in KERNELS:
    np.testing.assert_array_equal(sharded[name] == 0, host[name] == 0, err_msg=name)
  assert placed["blocks"]["mlp"]["w_up"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(method="l1"), "config.pruning.method='l1': not a known value; allowed: none, magnitude"),
    (dict(sparsity=1.0), "config.pruning.sparsity=1.0"),
    (dict(structure="2:4", sparsity=0.6), "config.pruning.sparsity=0.6: structure 2:4"),
    (dict(begin_step=5, end_step=4), "config.pruning.end_step=4: before begin_step=5"),
    (dict(every=0), "config.pruning.every=0"),
    (dict(method="magnitude", end_step=40), "config.pruning.end_step=40: the run (train.num_steps=40)"),
    (dict(method="magnitude", targets="embed"), "config.pruning.targets='embed': matches none"),
    (dict(method="magnitude", targets="blocks/mlp/w_gate"), "matches none"),  # gelu: no gate.
    (dict(method="magnitude", targets="("), "config.pruning.targets='(': not a regular expression"),
  ],
)
def test_bad_pruning_fields_fail_with_one_message_naming_the_field(fields, message):
  config = synthetic.tiny_config()
  config.pruning.update(**fields)
  with pytest.raises(ConfigError, match=None) as error:
    synthetic.validated(config, 1)
  assert message in str(error.value)


def test_pruning_refuses_lora():
  config = pruning_config(synthetic.tiny_config())
  config.lora.rank = 4
  with pytest.raises(ConfigError, match="config.pruning.method='magnitude'"):
    synthetic.validated(config, 1)
