"""Distillation: the loss by hand, its chunked form, the teacher on any mesh, and the errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import sharding
from model.layers import dense
from tests import synthetic
from training import distillation
from training.checkpointing import Checkpointer
from training.state import abstract_model
from training.step import _row_losses_of_logits
from training.validation import ConfigError

VOCAB = 256
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)
MESH_222 = dict(data=2, fsdp=2, tensor=2)

# The loss and its gradients jitted, temperature and alpha static as in the train step: one program
# a test, not one per operation.
row_losses = jax.jit(distillation.distillation_row_losses, static_argnums=(4, 5))


def _logits(seed, shape=(3, 7, 13), scale=3.0):
  """Random logits drawn with numpy: no JAX program compiled for test data."""
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _targets_and_weights(shape=(3, 7), vocab=13):
  targets_BL = np.random.default_rng(9).integers(0, vocab, shape).astype(np.int32)
  weights_BL = np.ones(shape, np.float32)
  weights_BL[0, 2] = weights_BL[2, -3:] = 0.0  # Some padding.
  return targets_BL, weights_BL


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _softmax(z):
  return np.exp(_log_softmax(z))


def _by_hand(student_BLV, teacher_BLV, targets_BL, weights_BL, temperature, alpha):
  """The loss in float64 numpy, written from its definition."""
  log_p_t, log_p_s = _log_softmax(teacher_BLV / temperature), _log_softmax(student_BLV / temperature)
  kl_BL = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1)
  ce_BL = -np.take_along_axis(_log_softmax(student_BLV), targets_BL[..., None], -1)[..., 0]
  w = np.asarray(weights_BL, np.float64)
  return ((alpha * temperature**2 * kl_BL + (1 - alpha) * ce_BL) * w).sum(1), kl_BL, w


def test_alpha_zero_is_the_train_steps_cross_entropy():
  student, teacher = _logits(0), _logits(1)
  targets, weights = _targets_and_weights()
  loss_B, weight_B = row_losses(student, teacher, targets, weights, 2.0, 0.0)
  expected_B, expected_weight_B = jax.jit(_row_losses_of_logits)(student, targets, weights)
  np.testing.assert_array_equal(loss_B, expected_B)
  np.testing.assert_array_equal(weight_B, expected_weight_B)
  assert float(jnp.sum(weight_B)) == 3 * 7 - 1 - 3


def test_alpha_one_with_the_student_as_teacher_is_zero():
  student = _logits(0)
  targets, weights = _targets_and_weights()
  loss_B, _ = distillation.distillation_row_losses(student, student, targets, weights, 2.0, 1.0)
  np.testing.assert_allclose(loss_B, 0.0, atol=1e-5)
  grads = jax.grad(lambda s: jnp.sum(distillation.distillation_row_losses(s, student, targets, weights, 2.0, 1.0)[0]))(
    student
  )
  np.testing.assert_allclose(grads, 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_the_loss_by_hand_and_its_temperature_squared_scaling(temperature, alpha):
  student, teacher = _logits(0), _logits(1)
  targets, weights = _targets_and_weights()
  loss_B, _ = row_losses(student, teacher, targets, weights, temperature, alpha)
  expected_B, kl_BL, w = _by_hand(student, teacher, targets, weights, temperature, alpha)
  np.testing.assert_allclose(loss_B, expected_B, rtol=2e-5)
  if alpha == 1.0:  # The distillation term alone: T^2 times the KL of the softened distributions.
    np.testing.assert_allclose(np.sum(loss_B) / np.sum(kl_BL * w), temperature**2, rtol=2e-5)


def test_the_teacher_gets_no_gradient_and_the_student_the_hand_derived_one():
  student, teacher = _logits(0), _logits(1)
  targets, weights = _targets_and_weights()
  temperature, alpha = 2.0, 0.25

  def loss(s, t):
    return jnp.sum(distillation.distillation_row_losses(s, t, targets, weights, temperature, alpha)[0])

  grad_student, grad_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, teacher)
  np.testing.assert_array_equal(grad_teacher, 0.0)
  # d/ds of alpha T^2 KL + (1 - alpha) CE = alpha T (p_s^T - p_t^T) + (1 - alpha) (p_s - onehot).
  p_s_T, p_t_T, p_s = _softmax(student / temperature), _softmax(teacher / temperature), _softmax(student)
  onehot = np.eye(student.shape[-1])[targets]
  expected = (alpha * temperature * (p_s_T - p_t_T) + (1 - alpha) * (p_s - onehot)) * weights[..., None]
  np.testing.assert_allclose(grad_student, expected, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 7])  # 3 leaves a padded last chunk; 7 is the whole row.
def test_the_chunked_loss_equals_the_unchunked_with_its_gradients(chunk):
  x_BLD, kernel_DV = _logits(3, (3, 7, 8), 1.0), _logits(4, (8, 13), 1.0)
  teacher_x_BLE, teacher_kernel_EV = _logits(5, (3, 7, 6), 1.0), _logits(6, (6, 13), 1.0)  # The teacher's own D.
  targets, weights = _targets_and_weights()

  def unchunked(x, kernel, tx, tkernel):
    logits, teacher = dense(x, kernel, 1, jnp.float32), dense(tx, tkernel, 1, jnp.float32)
    return distillation.distillation_row_losses(logits, teacher, targets, weights, 2.0, 0.6)

  def chunked(x, kernel, tx, tkernel):
    return distillation.chunked_distillation_row_losses(x, kernel, tx, tkernel, targets, weights, 2.0, 0.6, chunk)

  args = (x_BLD, kernel_DV, teacher_x_BLE, teacher_kernel_EV)
  results = [
    jax.jit(lambda *a, f=f: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b)[0]), argnums=(0, 1, 2, 3))(*a)))(*args)
    for f in (unchunked, chunked)
  ]
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  (loss_B, weight_B), grads = results[1]
  assert float(jnp.sum(weight_B)) == 3 * 7 - 1 - 3 and float(jnp.min(loss_B)) > 0
  np.testing.assert_array_equal(grads[2], 0.0)  # Nothing flows into the teacher.
  np.testing.assert_array_equal(grads[3], 0.0)


def test_different_vocabularies_are_refused_by_the_loss():
  targets, weights = _targets_and_weights()
  with pytest.raises(ValueError, match=r"config.distillation.teacher: the teacher's vocabulary has 12 tokens .* 13"):
    distillation.distillation_row_losses(_logits(0), _logits(1, (3, 7, 12)), targets, weights, 2.0, 0.5)
  with pytest.raises(ValueError, match="same tokenizer"):
    distillation.chunked_distillation_row_losses(
      jnp.ones((3, 7, 4)), jnp.ones((4, 13)), jnp.ones((3, 7, 4)), jnp.ones((4, 12)), targets, weights, 2.0, 0.5, 4
    )


# --- The teacher.


def _teacher_config():
  """A teacher of another shape than the tiny student: wider, deeper, Llama-style, untied."""
  config = synthetic.tiny_config(vocab_size=VOCAB)
  config.model.update(
    num_layers=3, embed_dim=48, num_heads=4, num_kv_heads=2, mlp_dim=96, norm="rmsnorm", position="rope", mlp="swiglu"
  )
  config.model.tie_embeddings = False
  return synthetic.validated(config, 1)


def _host_params(model_cfg, seed: int, std: float):
  """Parameters drawn on the host (no compile for an initialisation): normal(0, std), norm scales near 1."""
  _, abstract = abstract_model(model_cfg)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "['scale']" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A parameters-only teacher checkpoint, its record holding its config, as tools/hf_import.py writes."""
  config = _teacher_config()
  params = _host_params(config.model, seed=7, std=0.2)  # Logits far from uniform.
  directory = tmp_path_factory.mktemp("teacher") / "checkpoints"
  checkpointer = Checkpointer(str(directory), async_save=False)
  checkpointer.save_params(3, params, {"step": 3, "config": json.loads(config.to_json())})
  checkpointer.close()
  return directory.parent, params


def _mesh(shape):
  devices = jax.devices()[: int(np.prod(list(shape.values())))]
  return sharding.make_mesh(shape, devices)


def _cfg(teacher, **fields):
  return ConfigDict(dict(dict(teacher=str(teacher), step=-1, temperature=2.0, alpha=0.5), **fields))


def _student_batch():
  return synthetic.batch(8, 32, VOCAB, seed=4)


def _teacher_logits_on(mesh, graphdef, params, batch):
  @jax.jit
  def run(params, batch):
    with sharding.activation_rules(mesh):
      return distillation.teacher_logits(graphdef, params, batch)

  return np.asarray(run(params, sharding.global_batch_from_local(batch, mesh)))


def test_the_teacher_on_a_222_mesh_gives_one_devices_logits(teacher_dir):
  directory, saved = teacher_dir
  batch = _student_batch()
  logits = {}
  for name, shape in (("one", ONE_DEVICE), ("222", MESH_222)):
    mesh = _mesh(shape)
    graphdef, params = distillation.load_teacher(_cfg(directory), mesh, "float32", VOCAB, seq_len=32)
    logits[name] = _teacher_logits_on(mesh, graphdef, params, batch)
    if name == "222":  # Sharded by the logical-axis rules, as the student is.
      assert params["embed"].sharding.spec == P("tensor", "fsdp")
      assert params["blocks"]["mlp"]["w_up"].sharding.spec == P(None, "fsdp", "tensor")
  # The restored parameters are the saved ones, and so are the logits (the model of the record: 3 layers).
  np.testing.assert_array_equal(np.asarray(params["head"]), saved["head"])
  assert params["blocks"]["mlp"]["w_up"].shape == (3, 48, 96)
  assert logits["one"].shape == (8, 32, VOCAB) and np.std(logits["one"]) > 1.0
  np.testing.assert_allclose(logits["222"], logits["one"], atol=2e-5)


def test_the_teacher_runs_in_the_students_compute_dtype(teacher_dir):
  directory, _ = teacher_dir
  mesh = _mesh(ONE_DEVICE)
  graphdef, params = distillation.load_teacher(_cfg(directory), mesh, jnp.bfloat16, VOCAB)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  reference_graphdef, reference = distillation.load_teacher(_cfg(directory), mesh, "float32", VOCAB)
  logits = _teacher_logits_on(mesh, graphdef, params, _student_batch())
  reference_logits = _teacher_logits_on(mesh, reference_graphdef, reference, _student_batch())
  assert logits.dtype == np.float32
  # bfloat16 keeps about 3 significant digits: close to the float32 teacher, but not equal.
  assert 0 < np.max(np.abs(logits - reference_logits)) < 0.05 * np.max(np.abs(reference_logits))


def test_a_step_with_the_teacher_as_an_argument_is_the_same_on_a_222_mesh(teacher_dir):
  """The train step's loss and gradients with a teacher (as training/step.py wires it: the teacher's
  parameters one argument of the jitted function) on one device equal those on 8 devices with the
  student's model.loss_chunk=12 (both models' logits 12 positions at a time, sharded)."""
  directory, _ = teacher_dir
  batch = _student_batch()
  results = {}
  for name, shape, loss_chunk in (("one", ONE_DEVICE, 0), ("222 chunked", MESH_222, 12)):
    config = synthetic.tiny_config(vocab_size=VOCAB)
    config.model.loss_chunk = loss_chunk
    model_cfg = synthetic.validated(config, 1).model
    graphdef, params = abstract_model(model_cfg)[0], _host_params(model_cfg, seed=0, std=0.05)
    mesh = _mesh(shape)
    teacher_graphdef, teacher_params = distillation.load_teacher(_cfg(directory), mesh, "float32", VOCAB)

    def loss_and_grads(params, batch, teacher_params, graphdef=graphdef, teacher_graphdef=teacher_graphdef, mesh=mesh):
      with sharding.activation_rules(mesh):
        return jax.value_and_grad(
          lambda p: distillation.token_losses_with_teacher(
            graphdef, p, teacher_graphdef, teacher_params, batch, 2.0, 0.5
          ),
          has_aux=True,
        )(params)

    student_params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    if shape == MESH_222:  # Both models laid out by the rules, not replicated.
      assert student_params["embed"].sharding.spec == teacher_params["embed"].sharding.spec == P("tensor", "fsdp")
    placed = sharding.global_batch_from_local(batch, mesh)
    (loss, weight), grads = jax.jit(loss_and_grads)(student_params, placed, teacher_params)
    results[name] = (float(loss), float(weight), jax.device_get(grads))
  loss1, weight1, grads1 = results["one"]
  assert weight1 == 8 * 32 - 8 - 5
  loss, weight, grads = results["222 chunked"]
  assert (loss, weight) == (pytest.approx(loss1, rel=1e-5), weight1)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_a_bad_teacher_path_is_one_error_naming_the_field(tmp_path, teacher_dir):
  mesh = _mesh(ONE_DEVICE)
  with pytest.raises(ConfigError, match=r"^config.distillation.teacher='.*nowhere': .* is not a directory"):
    distillation.load_teacher(_cfg(tmp_path / "nowhere"), mesh, "float32", VOCAB)
  with pytest.raises(ConfigError, match=r"config.distillation.teacher=.*holds no finished loom checkpoint"):
    distillation.load_teacher(_cfg(tmp_path), mesh, "float32", VOCAB)
  directory, _ = teacher_dir
  with pytest.raises(ConfigError, match=r"config.distillation.teacher=.*step 5 is not in .* steps \[3\]"):
    distillation.load_teacher(_cfg(directory, step=5), mesh, "float32", VOCAB)
  config = synthetic.tiny_config(vocab_size=VOCAB)  # Validation finds a wrong path before anything is built.
  config.distillation.teacher = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"^config.distillation.teacher='.*nowhere'"):
    synthetic.validated(config, 1)


def test_a_vocabulary_mismatch_is_one_error_naming_the_field(teacher_dir):
  directory, _ = teacher_dir
  with pytest.raises(
    ConfigError,
    match=r"^config.distillation.teacher=.* vocabulary has 256 tokens and this run's .* 259; .*tokenizer",
  ):
    distillation.load_teacher(_cfg(directory), _mesh(ONE_DEVICE), "float32", 259)


def test_a_sequence_longer_than_the_teachers_is_refused(teacher_dir):
  directory, _ = teacher_dir
  with pytest.raises(ConfigError, match=r"data.seq_len=64 exceeds the teacher's model.max_seq_len=32"):
    distillation.load_teacher(_cfg(directory), _mesh(ONE_DEVICE), "float32", VOCAB, seq_len=64)


def test_a_lora_runs_checkpoint_is_refused_as_a_teacher(tmp_path):
  """Its checkpoints hold the adapters alone: one error saying to merge them first."""
  config = _teacher_config()
  record_config = json.loads(config.to_json())
  record_config["lora"] = {"rank": 4}
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save_params(0, _host_params(config.model, seed=1, std=0.02), {"step": 0, "config": record_config})
  checkpointer.close()
  with pytest.raises(ConfigError, match=r"^config.distillation.teacher=.*LoRA run's .* tools/lora.py merge"):
    distillation.load_teacher(_cfg(tmp_path), _mesh(ONE_DEVICE), "float32", VOCAB)


def test_on_an_abstract_mesh_the_teacher_is_shapes_with_shardings(teacher_dir):
  """What a planner compiles a step with, without the devices of the target or any array."""
  directory, _ = teacher_dir
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  _, params = distillation.load_teacher(_cfg(directory), mesh, "bfloat16", VOCAB)
  embed = params["embed"].get_value()
  assert isinstance(embed, jax.ShapeDtypeStruct) and embed.dtype == jnp.bfloat16 and embed.shape == (VOCAB, 48)
  assert embed.sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("temperature", 0.0, r"config.distillation.temperature=0.0: not positive"),
    ("alpha", 1.5, r"config.distillation.alpha=1.5: outside \[0, 1\]"),
    ("step", -2, r"config.distillation.step=-2: not a step"),
  ],
)
def test_bad_distillation_values_are_refused_by_validation(field, value, message):
  config = synthetic.tiny_config(vocab_size=VOCAB)
  config.distillation[field] = value
  with pytest.raises(ConfigError, match=message):
    synthetic.validated(config, 1)
