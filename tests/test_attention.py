"""The attention implementations (model.attention): each gives the reference's values and
gradients, through the model and sharded too; blockwise's memory is O(L x block); `auto` picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from model import attention
from model import attention_kernels as kernels
from tests import synthetic
from tests.test_model import LLAMA, mean_loss, model_config, random_params
from training import state as state_lib


def packed_inputs(batch, length, heads, kv_heads, head_dim, seed=0):
  """q, k, v, segment ids (3 documents per row, then a padding tail of segment 0) and an output cotangent."""
  rng = np.random.default_rng(seed)
  q, d_out = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
  segment_ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    ends = np.sort(rng.choice(np.arange(2, length - 3), 3, replace=False))
    for doc, (start, end) in enumerate(zip([0, *ends[:2]], ends)):
      segment_ids[row, start:end] = doc + 1
  return q, k, v, jnp.asarray(segment_ids), d_out


def values_and_grads(fn, q, k, v, segment_ids, d_out):
  """fn's output and the gradients of <fn, d_out> with respect to q, k and v."""
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
  return (out, *vjp(d_out))


def jitted_values_and_grads(fn, *inputs):
  return jax.jit(lambda *a: values_and_grads(fn, *a))(*inputs)


def assert_close(actual, desired, rtol=1e-5):
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=rtol * 0.1 * np.abs(desired).max())


def assert_matches_reference(fn, inputs):
  expected = jitted_values_and_grads(attention.dot_product_attention, *inputs)
  actual = jitted_values_and_grads(fn, *inputs)
  for name, a, e in zip(("output", "dq", "dk", "dv"), actual, expected):
    assert np.isfinite(np.asarray(a)).all(), name
    assert_close(a, e)


# 4 query heads on 2 kv heads; 37 positions: blocks of 16 leave the last one 11 long (padded to 16),
# block 512 becomes one block of 40.
@pytest.mark.parametrize("block", [16, 512])
def test_blockwise_equals_the_reference(block):
  assert_matches_reference(
    lambda q, k, v, s: kernels.blockwise_attention(q, k, v, s, block), packed_inputs(2, 37, 4, 2, 8)
  )


def test_blockwise_in_bfloat16_is_as_close_to_float32_as_xla_in_bfloat16():
  """bfloat16 in and out; the inputs' rounding dominates the error at this size, so this is a check
  of dtypes and gross errors, not of float32 accumulation."""
  inputs = packed_inputs(2, 37, 4, 2, 8)
  exact = jitted_values_and_grads(attention.dot_product_attention, *inputs)
  bf16 = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in inputs]
  xla = jitted_values_and_grads(attention.dot_product_attention, *bf16)
  blockwise = jitted_values_and_grads(lambda q, k, v, s: kernels.blockwise_attention(q, k, v, s, 16), *bf16)
  for name, x, b, e in zip(("output", "dq", "dk", "dv"), xla, blockwise, exact):
    assert b.dtype == jnp.bfloat16, name
    error = lambda a: np.abs(np.asarray(a, np.float32) - e).max() / np.abs(e).max()  # noqa: B023 (runs in this iteration)
    assert error(b) <= 2 * error(x), (name, error(b), error(x))


def test_cudnn_call_equals_the_reference():
  """The cudnn path's layout and arguments, run by jax.nn.dot_product_attention's xla implementation:
  cuDNN itself needs an NVIDIA GPU."""
  assert_matches_reference(
    lambda q, k, v, s: kernels.cudnn_attention(q, k, v, s, implementation="xla"), packed_inputs(2, 37, 4, 2, 8)
  )


def test_splash_equals_the_reference_and_differentiates_with_its_kernels():
  """In Pallas's interpreter: 130 positions are padded to one 256-long block (blocks are >= 128)."""
  inputs = packed_inputs(1, 130, 4, 2, 8)
  splash = lambda q, k, v, s: kernels.splash_attention(q, k, v, s, 512)
  assert_matches_reference(splash, inputs)
  q, k, v, segment_ids, d_out = inputs
  jaxpr = str(jax.make_jaxpr(lambda *a: values_and_grads(splash, *a))(q, k, v, segment_ids, d_out))
  # jax.grad runs the kernel's own backward kernels, not autodiff of the forward kernel.
  assert "splash_mha_dq_segmented" in jaxpr and "splash_mha_dkv_segmented" in jaxpr


# 6 query heads on tensor=2: 3 per device. 2 kv heads split 1 per device; 3 and 1 do not split in two
# and are repeated to 6 and 2.
@pytest.mark.parametrize("kv_heads,kv_heads_per_device", [(2, 1), (3, 3), (1, 1)])
def test_per_device_kernels_on_a_mesh_equal_the_reference(monkeypatch, kv_heads, kv_heads_per_device):
  """The shard_map around the kernels (cudnn's call here, as xla), data=2 fsdp=2 tensor=2."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  local_shapes, dot_product_attention = [], jax.nn.dot_product_attention

  def spy(q, k, v, **kwargs):
    local_shapes.append((q.shape, k.shape))
    return dot_product_attention(q, k, v, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  cudnn_as_xla = lambda q, k, v, s: kernels.cudnn_attention(q, k, v, s, implementation="xla")

  @jax.jit
  def sharded(*inputs):
    with sharding.activation_rules(mesh):
      return values_and_grads(cudnn_as_xla, *inputs)

  inputs = packed_inputs(4, 37, 6, kv_heads, 8)
  actual = sharded(*inputs)
  assert local_shapes == [((1, 37, 3, 8), (1, 37, kv_heads_per_device, 8))]
  expected = jitted_values_and_grads(attention.dot_product_attention, *inputs)
  for a, e in zip(actual, expected):
    assert_close(a, e)


def test_blockwise_memory_is_far_below_the_full_scores():
  """Compiled forward+backward temporaries at L=2048, 2 heads of 16: an [L, L] float32 tensor is
  16 MiB; xla holds several [2, L, L], blockwise only [2, 256, 256] blocks."""
  length = 2048
  q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  segment_ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def temp_bytes(implementation):
    loss = lambda q, k, v, s: jnp.sum(attention.attend(q, k, v, s, implementation, block=256))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segment_ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_scores = length * length * 4
  xla, blockwise = temp_bytes("xla"), temp_bytes("blockwise")
  assert xla > 2 * full_scores  # What blockwise is there to avoid.
  assert blockwise < full_scores / 2, (blockwise, full_scores)
  assert blockwise < xla / 10, (blockwise, xla)


def test_auto_picks_by_platform_and_xla_is_the_reference(monkeypatch):
  q_f32 = jnp.zeros((1, 64, 4, 64), jnp.float32)
  long_f32 = jnp.zeros((1, attention.CPU_BLOCKWISE_FROM_LENGTH, 4, 64), jnp.float32)
  assert attention.resolve_implementation("auto", q_f32) == "xla"
  assert attention.resolve_implementation("auto", long_f32) == "blockwise"
  assert attention.resolve_implementation("splash", q_f32) == "splash"
  monkeypatch.setattr(kernels, "platform_of_active_devices", lambda: "tpu")
  assert attention.resolve_implementation("auto", q_f32) == "splash"
  monkeypatch.setattr(kernels, "platform_of_active_devices", lambda: "gpu")
  assert attention.resolve_implementation("auto", q_f32.astype(jnp.bfloat16)) == "cudnn"
  assert attention.resolve_implementation("auto", q_f32) == "blockwise"  # cuDNN: no float32.
  assert attention.resolve_implementation("auto", jnp.zeros((1, 64, 4, 12), jnp.bfloat16)) == "blockwise"
  with pytest.raises(ValueError, match=r"'model.attention'='cudnn': it needs bfloat16"):
    attention.attend(q_f32, q_f32, q_f32, jnp.ones((1, 64), jnp.int32), "cudnn")
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"'model.attention'='cudnn' needs an NVIDIA GPU, not cpu"):
    attention.attend(q_f32, q_f32, q_f32, jnp.ones((1, 64), jnp.int32), "cudnn")
  with pytest.raises(ValueError, match=r"'model.attention'='flash': allowed are"):
    attention.resolve_implementation("flash", q_f32)
  q, k, v, segment_ids, _ = packed_inputs(2, 37, 4, 2, 8)
  np.testing.assert_array_equal(
    attention.attend(q, k, v, segment_ids, "auto"), attention.dot_product_attention(q, k, v, segment_ids)
  )


def loss_and_grads(cfg, params, batch):
  graphdef, _ = state_lib.abstract_model(cfg)
  return jax.jit(jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch)))(params)


def assert_same_loss_and_grads(actual, expected):
  (loss, grads), (loss_ref, grads_ref) = actual, expected
  assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref))
  for (path, g_ref), g in zip(jax.tree_util.tree_flatten_with_path(grads_ref)[0], jax.tree.leaves(grads)):
    rel = np.linalg.norm(np.asarray(g) - np.asarray(g_ref)) / np.linalg.norm(np.asarray(g_ref))
    assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def llama_reference():
  """Llama-style tiny model (RoPE, 4 query heads on 2 kv heads), rows of two documents and padding."""
  graphdef, params = random_params(model_config(attention="xla", **LLAMA), seed=3)
  batch = synthetic.batch(4, 32, 64, seed=4)
  batch["segment_ids"][-1, -5:] = 0
  return params, batch, loss_and_grads(model_config(attention="xla", **LLAMA), params, batch)


@pytest.mark.parametrize("implementation,block", [("blockwise", 12), ("splash", 512)])
def test_model_with_each_implementation_equals_xla(llama_reference, implementation, block):
  params, batch, expected = llama_reference
  cfg = model_config(attention=implementation, attention_block=block, **LLAMA)
  assert_same_loss_and_grads(loss_and_grads(cfg, params, batch), expected)


@pytest.mark.parametrize("implementation", ["splash", "blockwise"])
def test_sharded_model_equals_the_unsharded_reference(llama_reference, implementation):
  """data=2 fsdp=2 tensor=2: splash runs under shard_map on each device's 1 row and 2 of the 4 heads;
  blockwise is partitioned by XLA."""
  params_host, batch_host, expected = llama_reference
  config = synthetic.tiny_config(vocab_size=64, data=2, fsdp=2, tensor=2)
  config.model.update(attention=implementation, attention_block=12, **LLAMA)
  config = synthetic.validated(config, 8)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract_params = state_lib.abstract_model(config.model)
  params = jax.device_put(params_host, sharding.tree_shardings(abstract_params, mesh))
  batch = sharding.global_batch_from_local(batch_host, mesh)

  @jax.jit
  def sharded(params, batch):
    with sharding.activation_rules(mesh):
      return jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch))(params)

  assert_same_loss_and_grads(jax.device_get(sharded(params, batch)), expected)


def test_splash_compiles_for_tpu_under_a_mesh():
  """Ahead-of-time for a v5e 2x4 slice (libtpu's compiler, no TPU needed): `auto` resolves to splash
  from the mesh's devices, bfloat16, grouped heads and a length that is no multiple of 128."""
  from jax.experimental import topologies  # libtpu is a requirement; conftest lets both workers load it.

  devices = topologies.get_topology_desc(
    platform="tpu", topology_name="v5e:2x4", chips_per_host_bounds=(2, 2, 1)
  ).devices
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 2, 2), sharding.MESH_AXES)
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
  q = jax.ShapeDtypeStruct((4, 1000, 8, 64), jnp.bfloat16, sharding=spec(("data", "fsdp"), None, "tensor"))
  kv = jax.ShapeDtypeStruct((4, 1000, 2, 64), jnp.bfloat16, sharding=spec(("data", "fsdp"), None, "tensor"))
  segment_ids = jax.ShapeDtypeStruct((4, 1000), jnp.int32, sharding=spec(("data", "fsdp")))

  def grads(q, k, v, segment_ids):
    with sharding.activation_rules(mesh):
      loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, segment_ids, "auto").astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  lowered = jax.jit(grads).lower(q, kv, kv, segment_ids)
  assert lowered.as_text().count("tpu_custom_call") == 3  # Forward, dq and dkv kernels.
  lowered.compile()
