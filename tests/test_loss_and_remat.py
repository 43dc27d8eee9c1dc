"""The chunked cross-entropy (model.loss_chunk) and the rematerialisation policies (model.remat):
the same loss and gradients as the plain computation, and the memory each is there to save."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from tests import synthetic
from tests.test_model import GPT2, LLAMA, mean_loss, model_config, random_params
from training import state as state_lib
from training import step as step_lib
from training.setup import build_setup


def relative_differences(tree, reference):
  """Per leaf: |a - r| / |r|. A leaf whose reference vanishes (GPT-2's key bias: softmax ignores a
  constant per query, so its gradient is 0 up to rounding) is measured against 1e-4 of the tree's norm."""
  whole = float(np.sqrt(sum(np.sum(np.square(r)) for r in jax.tree.leaves(reference))))
  return {
    jax.tree_util.keystr(path): float(
      np.linalg.norm(np.asarray(a) - np.asarray(r)) / max(np.linalg.norm(r), 1e-4 * whole)
    )
    for (path, r), a in zip(jax.tree_util.tree_flatten_with_path(reference)[0], jax.tree.leaves(tree))
  }


def losses_and_grads(cfgs, params, batch):
  """For each model config: per-row loss sums [B], weight totals [B], and the gradient of their total.

  One program for all of them: XLA compiles it in about half the time of one program each.
  """
  graphdefs = [state_lib.abstract_model(cfg)[0] for cfg in cfgs]

  def total(graphdef, p):
    loss_sum_B, weight_B = step_lib.row_losses(graphdef, p, batch)
    return jnp.sum(loss_sum_B), (loss_sum_B, weight_B)

  results = jax.jit(lambda p: [jax.value_and_grad(functools.partial(total, g), has_aux=True)(p) for g in graphdefs])(
    params
  )
  return [(np.asarray(loss_sum_B), np.asarray(weight_B), grads) for (_, (loss_sum_B, weight_B)), grads in results]


# Rows of 32 positions: 8 divides them; 5 and 7 leave a last chunk padded with zero-weight positions.
# GPT-2's output projection is the tied embedding, Llama's its own head.
@pytest.mark.parametrize("style,loss_chunks", [("gpt2", (8, 5)), ("llama", (7,))])
def test_chunked_loss_equals_the_whole_row_loss(style, loss_chunks):
  overrides = GPT2 if style == "gpt2" else LLAMA
  _, params = random_params(model_config(**overrides), seed=11)
  # Two packed documents per row; zero weights at the first one's end, in the middle of row 1 and on
  # the last row's tail: that row's padded last chunk holds only zero weights, the others' real ones too.
  batch = synthetic.batch(4, 32, 64, seed=12)
  batch["weights"][1, 20:23] = 0.0
  cfgs = [model_config(loss_chunk=loss_chunk, **overrides) for loss_chunk in (0,) + loss_chunks]
  (loss_ref, weight_ref, grads_ref), *chunked = losses_and_grads(cfgs, params, batch)
  assert loss_ref.min() > 50  # ~ln(64) per weighted token: real losses, not zeros.
  for loss_chunk, (loss, weight, grads) in zip(loss_chunks, chunked):
    np.testing.assert_array_equal(weight, weight_ref)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, err_msg=f"loss_chunk={loss_chunk}")
    for name, rel in relative_differences(grads, grads_ref).items():
      assert rel <= 1e-5, f"loss_chunk={loss_chunk}, {name}: relative difference {rel:.2e}"


def test_chunked_loss_in_the_train_and_eval_steps_with_a_sharded_vocabulary():
  """One SGD step on data=2 fsdp=2 tensor=2, the vocabulary split over tensor, with and without
  chunks (5 positions: rows of 32 end in a padded chunk); and the per-row evaluation."""
  config = synthetic.tiny_config(data=2, fsdp=2, tensor=2)
  # Learning rate 1e6: the update -1e6 * gradient dwarfs the parameters (~0.02), so before - after
  # holds the gradient to float32 precision (with lr 1 the subtraction alone costs ~1e-5 of it).
  config.optimizer.update(
    name="sgd",
    momentum=0.0,
    learning_rate=1e6,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip_norm=0.0,
  )
  config = synthetic.validated(config, 8)
  setups = {}
  for loss_chunk in (0, 5):
    config.model.loss_chunk = loss_chunk
    setups[loss_chunk] = build_setup(config)
  _, params = random_params(config.model, seed=13)  # Faster than tracing the initialiser.
  state = setups[0].state_from_params(params)
  before = jax.device_get(state.params)
  batch = sharding.global_batch_from_local(synthetic.batch(16, 32, 256, seed=13), setups[0].mesh)
  updates, metrics, rows = {}, {}, {}
  for loss_chunk, setup in setups.items():
    after, step_metrics = setup.train_step()(jax.tree.map(jnp.copy, state), batch)  # The step donates its state.
    updates[loss_chunk] = jax.tree.map(np.subtract, before, jax.device_get(after.params))
    metrics[loss_chunk] = {k: float(v) for k, v in step_metrics.items()}
    rows[loss_chunk] = jax.device_get(setup.eval_step(per_row=True)(state.params, batch))
  assert metrics[5]["tokens"] == metrics[0]["tokens"] == 16 * 32 - 16 - 5
  assert metrics[5]["loss"] == pytest.approx(metrics[0]["loss"], rel=1e-5)
  assert metrics[5]["grad_norm"] == pytest.approx(metrics[0]["grad_norm"], rel=1e-5)
  for name, rel in relative_differences(updates[5], updates[0]).items():
    assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
  (loss_ref, weight_ref), (loss, weight) = rows[0], rows[5]
  np.testing.assert_array_equal(weight, weight_ref)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert np.sum(loss_ref) / np.sum(weight_ref) == pytest.approx(metrics[0]["loss"], rel=1e-5)


def train_step_temp_bytes(loss_chunk, vocab_size, batch_size, seq_len):
  """Temporary memory per device of the compiled train step on data=2 fsdp=2 tensor=2 (not run)."""
  config = synthetic.tiny_config(vocab_size=vocab_size, data=2, fsdp=2, tensor=2)
  config.model.update(loss_chunk=loss_chunk, max_seq_len=seq_len)
  config.data.seq_len = seq_len
  config.train.global_batch_size = batch_size
  setup = build_setup(synthetic.validated(config, 8))
  rows = sharding.logical_to_sharding(("act_batch", None), setup.mesh)
  batch = {
    name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if name == "weights" else jnp.int32, sharding=rows)
    for name in ("inputs", "targets", "segment_ids", "positions", "weights")
  }
  compiled = setup.train_step().lower(setup.abstract_state(), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_loss_needs_far_less_temporary_memory():
  vocab, batch_size, seq_len = 32768, 8, 256
  whole = train_step_temp_bytes(0, vocab, batch_size, seq_len)
  chunked = train_step_temp_bytes(16, vocab, batch_size, seq_len)
  logits_bytes = batch_size * seq_len * vocab * 4 // 8  # float32 [B, L, V] over 8 devices: 32 MiB each.
  # Measured: 74.4 MiB whole, 17.3 MiB in chunks of 16 (most of the rest: the [L, L] attention scores).
  sizes = f"{whole / 2**20:.1f} MiB whole, {chunked / 2**20:.1f} MiB chunked"
  assert whole > logits_bytes, sizes
  assert chunked < whole / 2, sizes
  assert whole - chunked > logits_bytes, sizes


def test_remat_policies_keep_the_loss_and_gradients():
  """Against no rematerialisation with the scan. With tests/test_model.py's none, full (with and without
  the scan) and dots (with it) on the GPT-2-style model, every policy is checked with and without it."""
  cases = [("none", True), ("proj", True), ("proj", False), ("offload", True), ("offload", False), ("dots", False)]
  _, params = random_params(model_config(**LLAMA), seed=14)
  batch = synthetic.batch(2, 16, 64, seed=15)
  (loss_ref, _, grads_ref), *results = losses_and_grads(
    [model_config(remat=remat, scan_layers=scan, **LLAMA) for remat, scan in cases], params, batch
  )
  for (remat, scan), (loss, _, grads) in zip(cases[1:], results):
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6, err_msg=f"remat={remat} scan_layers={scan}")
    for name, rel in relative_differences(grads, grads_ref).items():
      assert rel <= 1e-6, f"remat={remat} scan_layers={scan}, {name}: relative difference {rel:.2e}"


def saved_residuals(remat, scan_layers, batch):
  """What the forward pass keeps for the backward pass: (element count, the jaxpr of the gradient)."""
  graphdef, params = random_params(model_config(scan_layers=scan_layers, remat=remat, **LLAMA), seed=14)
  loss = lambda p: mean_loss(graphdef, p, batch)  # noqa: E731
  vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
  return sum(leaf.size for leaf in jax.tree.leaves(vjp_fn)), str(jax.make_jaxpr(jax.grad(loss))(params))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_proj_and_offload_keep_exactly_the_named_projections(scan_layers):
  """Beyond what `full` keeps (each block's input), proj keeps q, k, v, the attention output and
  the MLP hidden activations of every layer; the MLP output is named too, but no backward reads
  it (it is only added to the residual stream). offload moves those same tensors to the host."""
  cfg = model_config(**LLAMA)
  b, l = 2, 16
  batch = synthetic.batch(b, l, 64, seed=15)
  per_layer = b * l * (cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + cfg.embed_dim + cfg.mlp_dim)
  full, _ = saved_residuals("full", scan_layers, batch)
  proj, proj_jaxpr = saved_residuals("proj", scan_layers, batch)
  offload, offload_jaxpr = saved_residuals("offload", scan_layers, batch)
  none, _ = saved_residuals("none", scan_layers, batch)
  assert proj - full == cfg.num_layers * per_layer
  assert offload == proj < none
  assert "MemorySpace.Host" not in proj_jaxpr
  # One move to the host per named tensor: in the scanned block once, in the unrolled loop per layer.
  assert offload_jaxpr.count("devices=(MemorySpace.Host,)") == 5 * (1 if scan_layers else cfg.num_layers)


def test_offload_lowers_to_host_memory_for_a_tpu():
  """Compiled ahead of time for a TPU v5e 2x2 (libtpu, no TPU needed): the offloaded activations
  live in host memory (memory space S(5)); proj keeps none there."""
  from jax.experimental import topologies  # libtpu is a requirement; conftest lets both workers load it.

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 1, 1), sharding.MESH_AXES)
  batch = synthetic.batch(8, 16, 64, seed=15)
  rows = sharding.logical_to_sharding(("act_batch", None), mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch.items()}
  host_bytes = {}
  for remat in ("proj", "offload"):
    cfg = model_config(remat=remat, attention="xla", **LLAMA)
    graphdef, abstract_params = state_lib.abstract_model(cfg)
    params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_params,
      sharding.tree_shardings(abstract_params, mesh),
    )

    def grads(p, batch):
      with sharding.activation_rules(mesh):
        return jax.grad(lambda q: mean_loss(graphdef, q, batch))(p)  # noqa: B023 (runs in this iteration)

    compiled = jax.jit(grads).lower(params, batch).compile()
    host_bytes[remat] = compiled.memory_analysis().host_temp_size_in_bytes
    assert ("S(5)" in compiled.as_text()) == (remat == "offload")
  assert host_bytes["proj"] == 0 and host_bytes["offload"] > 0
