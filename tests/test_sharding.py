"""Sharded steps equal the single-device step; fsdp and tensor really divide the memory."""

import re

import jax
import numpy as np
import pytest

import sharding
from tests import synthetic
from training import state as state_lib
from training import step as step_lib
from training.setup import build_setup

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _loss_and_grads(config, mesh, params_host, batch_host):
  graphdef, abstract_params = state_lib.abstract_model(config.model)
  param_shardings = sharding.tree_shardings(abstract_params, mesh)
  params = jax.device_put(params_host, param_shardings)
  batch = sharding.global_batch_from_local(batch_host, mesh)

  @jax.jit
  def loss_and_grads(params, batch):
    with sharding.activation_rules(mesh):

      def mean_loss(p):
        loss_sum, weight = step_lib.token_losses(graphdef, p, batch)
        return loss_sum / weight

      return jax.value_and_grad(mean_loss)(params)

  loss, grads = loss_and_grads(params, batch)
  return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
  config = synthetic.validated(synthetic.tiny_config(), 1)
  setup = build_setup(config, devices=jax.devices()[:1])
  params = jax.device_get(setup.init_state(seed=0).params)
  batch = synthetic.batch(16, config.data.seq_len, config.model.vocab_size)
  loss, grads = _loss_and_grads(config, setup.mesh, params, batch)
  return params, batch, loss, grads


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grads_match_single_device(reference, mesh_shape):
  params, batch, loss_1, grads_1 = reference
  data, fsdp, tensor = mesh_shape
  config = synthetic.validated(synthetic.tiny_config(data=data, fsdp=fsdp, tensor=tensor), 8)
  mesh = sharding.make_mesh(config.mesh)
  loss_8, grads_8 = _loss_and_grads(config, mesh, params, batch)
  assert abs(loss_8 - loss_1) <= 1e-5 * abs(loss_1)
  for (path, g1), g8 in zip(jax.tree_util.tree_flatten_with_path(grads_1)[0], jax.tree.leaves(grads_8)):
    rel = np.linalg.norm(g8 - g1) / max(np.linalg.norm(g1), 1e-12)
    assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


def test_per_row_eval_pools_to_the_batch_eval(reference):
  """Rows of an 8-way data-sharded eval sum to the pooled eval, and each row is that row alone."""
  params_host, batch, _, _ = reference
  config = synthetic.validated(synthetic.tiny_config(data=8), 8)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract_params = state_lib.abstract_model(config.model)
  param_shardings = sharding.tree_shardings(abstract_params, mesh)
  params = jax.device_put(params_host, param_shardings)
  pooled = step_lib.make_eval_step(graphdef, mesh, param_shardings)
  per_row = step_lib.make_eval_step(graphdef, mesh, param_shardings, per_row=True)
  loss_B, weight_B = (np.asarray(a) for a in per_row(params, sharding.global_batch_from_local(batch, mesh)))
  loss_sum, weight = pooled(params, sharding.global_batch_from_local(batch, mesh))
  assert loss_B.shape == weight_B.shape == (16,)
  np.testing.assert_array_equal(weight_B, batch["weights"].sum(axis=1))
  assert loss_B.sum() == pytest.approx(float(loss_sum), rel=1e-6)
  assert weight_B.sum() == float(weight)
  one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  alone = step_lib.make_eval_step(graphdef, one_device, sharding.tree_shardings(abstract_params, one_device))
  row_3 = {name: value[3:4] for name, value in batch.items()}
  loss_3, _ = alone(
    jax.device_put(params_host, sharding.tree_shardings(abstract_params, one_device)),
    sharding.global_batch_from_local(row_3, one_device),
  )
  assert loss_B[3] == pytest.approx(float(loss_3), rel=1e-5)


def _initialised_state(config):
  """The train state of `config` initialised in its sharded layout on the 8 test devices."""
  return build_setup(synthetic.validated(config, 8)).init_state(seed=0)


def test_fsdp_shards_params_and_optimizer_state():
  config = synthetic.tiny_config(fsdp=8)
  config.model.update(embed_dim=64, mlp_dim=128)
  state = _initialised_state(config)
  for tree in (state.params, state.opt_state):
    arrays = [x for x in jax.tree.leaves(tree) if x.size > 1]
    total = sum(x.nbytes for x in arrays)
    per_device = {}
    for x in arrays:
      for shard in x.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    for device, nbytes in per_device.items():
      assert nbytes == pytest.approx(total / 8, rel=0.02), (device, nbytes, total)


def test_tensor_shards_heads_kv_heads_mlp_and_vocab():
  """With tensor=8 each device holds 1/8 of every attention and MLP weight, of the embedding and
  of the output head (Megatron), for the parameters and the optimizer moments alike; norms stay whole."""
  config = synthetic.tiny_config(tensor=8)
  config.model.update(
    embed_dim=64,
    num_heads=8,
    num_kv_heads=8,
    mlp_dim=128,
    mlp="swiglu",
    norm="rmsnorm",
    position="rope",
    tie_embeddings=False,
  )
  state = _initialised_state(config)
  # Full shape -> the shape one device holds; leading 2 = stacked layers, heads of 8.
  expected = {
    "blocks.attn.wq": ((2, 64, 8, 8), (2, 64, 1, 8)),
    "blocks.attn.wk": ((2, 64, 8, 8), (2, 64, 1, 8)),
    "blocks.attn.wv": ((2, 64, 8, 8), (2, 64, 1, 8)),
    "blocks.attn.wo": ((2, 8, 8, 64), (2, 1, 8, 64)),
    "blocks.mlp.w_up": ((2, 64, 128), (2, 64, 16)),
    "blocks.mlp.w_gate": ((2, 64, 128), (2, 64, 16)),
    "blocks.mlp.w_down": ((2, 128, 64), (2, 16, 64)),
    "embed": ((256, 64), (32, 64)),
    "head": ((64, 256), (64, 32)),
    "blocks.attn_norm.scale": ((2, 64), (2, 64)),
    "blocks.mlp_norm.scale": ((2, 64), (2, 64)),
    "final_norm.scale": ((64,), (64,)),
  }
  params = {
    ".".join(re.findall(r"\['(\w+)'\]", jax.tree_util.keystr(path))): x
    for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }
  assert set(params) == set(expected)
  for name, (shape, shard_shape) in expected.items():
    x = params[name]
    assert x.shape == shape, name
    assert x.sharding.shard_shape(x.shape) == shard_shape, (name, x.sharding)
    assert len(x.addressable_shards) == 8
    assert {s.data.shape for s in x.addressable_shards} == {shard_shape}, name
    # Eight different slices, not eight copies of one.
    starts = {tuple(i.start for i in s.index) for s in x.addressable_shards}
    assert len(starts) == (1 if shard_shape == shape else 8), name
  # AdamW's two moments are laid out as their parameters.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.size > 1]
  assert len(moments) == 2 * len(params)
  for x in moments:
    name = next(n for n, (shape, _) in expected.items() if shape == x.shape)
    assert x.sharding.shard_shape(x.shape) == expected[name][1], (x.shape, x.sharding)


def test_rules_map_logical_names_to_mesh_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = sharding.logical_to_spec(("layers", "embed", "mlp"), shape=(2, 64, 128), mesh=mesh)
  assert tuple(spec) == (None, "fsdp", "tensor")
  assert tuple(sharding.logical_to_spec(("act_batch", "act_length"))) == (("data", "fsdp"), None)
  # A dimension the mesh axis does not divide is replicated rather than failing.
  assert tuple(sharding.logical_to_spec(("vocab", "embed"), shape=(259, 64), mesh=mesh)) == (None, "fsdp")
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_to_spec(("act_batch", "embed"))


@pytest.mark.parametrize(
  "mesh_config, message",
  [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "there are 8 devices"),
    ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
    ({"data": -1, "fsdp": 3}, "does not divide"),
    ({"pipeline": 2}, "unknown axis"),
  ],
)
def test_bad_mesh_is_rejected(mesh_config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_config)
