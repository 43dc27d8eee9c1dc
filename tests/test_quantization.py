"""Weight quantization (model/quantization.py): exact codes and round trips, fake quantization's
straight-through gradient, quantized tiny models (logits, bytes, shapes only), and sharded storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding
from model import Transformer
from model import quantization as quant
from tests import synthetic

# The QLoRA paper's NF4 values (Dettmers et al. 2023, Appendix E), written out again here so a typo
# in the module's table fails.
PAPER_NF4 = [
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
]

KERNELS = ("wq", "wk", "wv", "wo", "w_up", "w_down")


def _model(seed: int = 0, **fields) -> Transformer:
  config = synthetic.tiny_config()
  config.model.update(**fields)
  config = synthetic.validated(config, 1)
  return Transformer(config.model, nnx.Rngs(seed))


def _tokens(batch: int = 2, length: int = 32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch, length)), jnp.int32)


def _dequantized_logits(graphdef, state, tokens):
  """A quantized model's logits through a plain model of its dequantized kernels."""
  m = nnx.merge(graphdef, state)
  quant.dequantize_kernels(m)
  return m(tokens)


def _relative_error(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# --- Pure math ---------------------------------------------------------------------------------------


def test_int8_is_per_output_channel_and_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (3, 48, 20)) * jnp.linspace(0.1, 3.0, 20)
  codes, scales = quant.quantize(w, "int8", 0)
  assert codes.dtype == jnp.int8 and codes.shape == (3, 48, 20)
  assert scales.dtype == jnp.float32 and scales.shape == (3, 1, 20)
  np.testing.assert_allclose(scales, np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127, rtol=1e-7)
  # Each channel's largest magnitude maps to +-127 exactly.
  np.testing.assert_array_equal(np.abs(np.asarray(codes)).max(axis=1), 127)
  error = np.abs(np.asarray(w) - np.asarray(quant.dequantize(codes, scales, "int8", 0)))
  assert np.all(error <= np.asarray(scales) / 2 * (1 + 1e-6))
  assert error.max() > 0.4 * float(scales.min())  # Really rounded: not a trivially exact input.


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_four_bit_error_within_half_the_largest_gap(kind):
  """Every weight is within half its group's widest gap between neighbouring grid values."""
  block = 16
  w = jax.random.normal(jax.random.key(1), (2, 64, 12))
  codes, scales = quant.quantize(w, kind, block)
  assert codes.dtype == jnp.uint8 and codes.shape == (2, 32, 12)
  assert scales.shape == (2, 4, 12)
  dq = np.asarray(quant.dequantize(codes, scales, kind, block))
  widest_gap = 1.0 if kind == "int4" else float(np.diff(PAPER_NF4).max())  # in units of the scale
  scale_per_weight = np.repeat(np.asarray(scales), block, axis=1)
  assert np.all(np.abs(np.asarray(w) - dq) <= scale_per_weight * widest_gap / 2 * (1 + 1e-6))


def test_packing_is_exact():
  nibbles = jax.random.randint(jax.random.key(2), (2, 10, 6), 0, 16).astype(jnp.uint8)
  packed = quant.pack_nibbles(nibbles)
  assert packed.dtype == jnp.uint8 and packed.shape == (2, 5, 6)
  np.testing.assert_array_equal(quant.unpack_nibbles(packed), nibbles)
  # Input 2i in the low nibble, 2i + 1 in the high one.
  assert int(quant.pack_nibbles(jnp.asarray([[1], [2]], jnp.uint8))[0, 0]) == 0x21
  every_byte = jnp.arange(256, dtype=jnp.uint8).reshape(128, 2)
  np.testing.assert_array_equal(quant.pack_nibbles(quant.unpack_nibbles(every_byte)), every_byte)


def test_nf4_codebook_is_qloras():
  np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(PAPER_NF4, np.float32))
  assert quant.NF4_CODEBOOK.shape == (16,) and np.all(np.diff(quant.NF4_CODEBOOK) > 0)


def _grid_weights(kind: str, block: int, shape=(2, 32, 8)):
  """Weights on the kind's grid: codes times power-of-two scales, each group holding its largest code,
  so the scales quantize finds are the ones used and every product is exact."""
  rng = np.random.default_rng(3)
  lead, num_inputs, num_outputs = shape[:-2], shape[-2], shape[-1]
  group = num_inputs if kind == "int8" else block
  scales = 2.0 ** rng.integers(-6, 3, lead + (num_inputs // group, 1, num_outputs))
  if kind == "nf4":
    values = np.asarray(PAPER_NF4, np.float32)[rng.integers(0, 16, shape)]
    top = 1.0
  else:
    top = 127 if kind == "int8" else 7
    values = rng.integers(-top, top + 1, shape).astype(np.float32)
  grouped = values.reshape(lead + (num_inputs // group, group, num_outputs))
  grouped[..., 0, :] = top
  return jnp.asarray((grouped * scales).reshape(shape), jnp.float32)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_values_on_the_grid_round_trip_exactly(kind):
  block = 8
  w = _grid_weights(kind, block)
  codes, scales = quant.quantize(w, kind, block)
  np.testing.assert_array_equal(quant.dequantize(codes, scales, kind, block), w)
  np.testing.assert_array_equal(quant.dequantize(codes, scales, kind, block, jnp.bfloat16), w.astype(jnp.bfloat16))


def test_bad_blocks_and_kinds_are_refused():
  w = jnp.ones((48, 4))
  with pytest.raises(ValueError, match=r"block=32 does not divide the kernel's input size I=48"):
    quant.quantize(w, "int4", 32)
  with pytest.raises(ValueError, match=r"I=3 is odd"):
    quant.quantize(jnp.ones((3, 4)), "nf4", 1)
  with pytest.raises(ValueError, match=r"kind='fp8': allowed are \['int8', 'int4', 'nf4'\]"):
    quant.quantize(w, "fp8", 16)
  with pytest.raises(ValueError, match=r"block=0"):
    quant.quantize(w, "nf4", 0)
  quant.quantize(w, "int8", 32)  # int8 has no groups: block is not read.


def test_a_block_a_kernel_cannot_take_names_the_kernel(tiny):
  with pytest.raises(ValueError, match=r"block kernel wq \(2, 32, 4, 8\).*block=64 does not divide .* I=32"):
    quant.quantize_kernels(nnx.clone(tiny[0]), "nf4", 64)


@pytest.mark.parametrize(("kind", "shape", "input_axes"), [("int8", (2, 32, 4, 8), 1), ("nf4", (2, 4, 8, 32), 2)])
def test_fake_quantize_rounds_forward_and_passes_the_gradient(kind, shape, input_axes):
  """A stacked kernel (leading=1): the forward pass is each layer's round trip, the gradient the identity."""
  w = jax.random.normal(jax.random.key(4), shape)
  block = 16
  matrix = w.reshape(shape[0], int(np.prod(shape[1 : 1 + input_axes])), -1)
  expected = quant.dequantize(*quant.quantize(matrix, kind, block), kind, block).reshape(shape)
  fake = quant.fake_quantize(w, kind, block, input_axes, leading=1)
  np.testing.assert_array_equal(fake, expected)
  assert not np.array_equal(fake, w)
  cotangent = jax.random.normal(jax.random.key(5), shape)
  grad = jax.grad(lambda x: jnp.sum(quant.fake_quantize(x, kind, block, input_axes, 1) * cotangent))(w)
  np.testing.assert_array_equal(grad, cotangent)
  _, tangent = jax.jvp(lambda x: quant.fake_quantize(x, kind, block, input_axes, 1), (w,), (cotangent,))
  np.testing.assert_array_equal(tangent, cotangent)


def test_fake_quantize_params_rounds_the_kernels_alone(tiny):
  """int8's absmax per output channel of each layer: a kernel's layers are rounded apart."""
  m, _, _ = tiny
  params = nnx.state(m, nnx.Param)
  fake = quant.fake_quantize_params(params, "int8", 0)
  flat, fake_flat = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(fake))
  assert flat.keys() == fake_flat.keys()
  rounded = 0
  for path, leaf in flat.items():
    value, fake_value = leaf.get_value(), fake_flat[path].get_value()
    if path[-1] in quant.KERNEL_INPUT_AXES:
      kernel = quant.QuantizedKernel(value, "int8", 0, quant.KERNEL_INPUT_AXES[path[-1]], leaf.out_sharding)
      np.testing.assert_array_equal(fake_value, kernel.value())  # per layer, [layers, *in, *out]
      rounded += 1
    else:
      np.testing.assert_array_equal(fake_value, value)
  assert rounded == len(KERNELS)
  grads = jax.jit(
    jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(quant.fake_quantize_params(p, "int8", 0))))
  )(params)
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf, np.ones_like(leaf))


# --- A quantized tiny Transformer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  m = _model()
  tokens = _tokens()
  return m, tokens, m(tokens)


# Relative logits error (Frobenius) of the tiny model's quantized kernels: measured 0.0019 (int8),
# 0.029 (int4, block 16) and 0.027 (nf4, block 16); the bounds leave about twice that.
LOGITS_ERROR_BOUNDS = {"int8": 0.005, "int4": 0.06, "nf4": 0.06}


@pytest.mark.parametrize("kind", quant.KINDS)
def test_quantized_kernels_keep_the_logits_close(tiny, kind):
  """Tested through dequantize_kernels (a plain model of the rounded weights) and read_kernel per layer."""
  m, tokens, logits = tiny
  q = nnx.clone(m)
  quant.quantize_kernels(q, kind, 16)
  for part, names in (("attn", KERNELS[:4]), ("mlp", KERNELS[4:])):
    for name in names:
      kernel = getattr(getattr(q.blocks, part), name)
      assert isinstance(kernel, quant.QuantizedKernel) and kernel.kind == kind
      assert kernel.shape == getattr(getattr(m.blocks, part), name).shape[1:]  # per layer
  graphdef, state = nnx.split(q)
  error = _relative_error(_dequantized_logits(graphdef, state, tokens), logits)
  assert 0 < error <= LOGITS_ERROR_BOUNDS[kind], error

  # read_kernel on one layer's slice (what the layer scan hands a block) dequantizes that layer.
  blocks_graphdef, blocks_state = nnx.split(q.blocks)
  layer_1 = nnx.merge(blocks_graphdef, jax.tree.map(lambda a: a[1], blocks_state))
  for name in ("wq", "wo"):
    stacked = getattr(q.blocks.attn, name).value(jnp.float32)
    one_layer = quant.read_kernel(layer_1.attn, name, jnp.bfloat16)
    assert one_layer.dtype == jnp.bfloat16 and one_layer.shape == stacked.shape[1:]
    np.testing.assert_array_equal(one_layer, stacked[1].astype(jnp.bfloat16))
  # A plain Param is read as its value, cast.
  np.testing.assert_array_equal(
    quant.read_kernel(m.blocks.attn, "wq", jnp.bfloat16), m.blocks.attn.wq[...].astype(jnp.bfloat16)
  )


# A Llama-shaped model whose blocks dominate its bytes: SwiGLU's gate, grouped kv heads, RoPE, RMSNorm,
# an untied head; embed 64, MLP 256.
LLAMA_FIELDS = dict(
  norm="rmsnorm",
  position="rope",
  mlp="swiglu",
  num_kv_heads=2,
  tie_embeddings=False,
  use_bias=False,
  embed_dim=64,
  mlp_dim=256,
)


def test_nf4_base_quantizes_every_kernel_casts_the_rest_and_stores_a_fifth():
  """nf4 kernels (block 64) and bfloat16 others (QLoRA's base): every kernel quantized, every other
  Param bfloat16, the logits close, and under 0.3 of the float32 model's bytes."""
  m = _model(**LLAMA_FIELDS)
  tokens = _tokens()
  logits = m(tokens)
  float32_bytes = quant.weight_bytes(nnx.state(m))
  params = dict(nnx.to_flat_state(nnx.state(m)))
  kernel_elements = sum(v.get_value().size for p, v in params.items() if p[-1] in quant.KERNEL_INPUT_AXES)
  other_elements = sum(v.get_value().size for p, v in params.items() if p[-1] not in quant.KERNEL_INPUT_AXES)
  assert float32_bytes == 4 * (kernel_elements + other_elements)

  quant.quantize_kernels(m, "nf4", 64, base_dtype=jnp.bfloat16)
  assert isinstance(m.blocks.mlp.w_gate, quant.QuantizedKernel)
  assert m.blocks.attn.wk.shape == (64, 2, 16) and m.blocks.attn.wk.codes.shape == (2, 32, 32)
  assert m.blocks.mlp.w_down.scales.shape == (2, 4, 64)
  remaining = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert {path[-1] for path in remaining} == {"embed", "head", "scale"}
  assert all(leaf.get_value().dtype == jnp.bfloat16 for leaf in remaining.values())
  assert len(nnx.to_flat_state(nnx.state(m, quant.QuantizedArray))) == 2 * 7  # codes and scales of 7 kernels

  nf4_bytes = quant.weight_bytes(nnx.state(m))
  # Half a byte a weight and a float32 scale per 64 of them; two bytes for every other parameter.
  assert nf4_bytes == kernel_elements // 2 + kernel_elements // 64 * 4 + 2 * other_elements
  assert nf4_bytes / float32_bytes <= 0.3, nf4_bytes / float32_bytes  # measured 0.217
  error = _relative_error(_dequantized_logits(*nnx.split(m), tokens), logits)
  assert error <= 0.08, error  # measured 0.050 (with its bfloat16 embeddings and norms; int8: 0.0044)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantize_kernels_on_shapes_alone(tiny, kind):
  """Inside nnx.eval_shape and on a model it returned: the real quantized model's shapes and dtypes."""
  real = nnx.clone(tiny[0])
  quant.quantize_kernels(real, kind, 16, base_dtype=jnp.bfloat16)

  def make():
    m = _model()
    quant.quantize_kernels(m, kind, 16, base_dtype=jnp.bfloat16)
    return m

  abstract = nnx.eval_shape(_model)
  quant.quantize_kernels(abstract, kind, 16, base_dtype=jnp.bfloat16)
  real_shapes = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(real))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(nnx.eval_shape(make))) == real_shapes
  assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(abstract)) == real_shapes
  assert isinstance(abstract.blocks.attn.wo.codes.get_value(), jax.ShapeDtypeStruct)
  assert quant.weight_bytes(nnx.state(abstract)) == quant.weight_bytes(nnx.state(real))


def test_the_model_runs_on_quantized_kernels(tiny):
  """model/ reads every block kernel with read_kernel: the quantized model's own forward pass (the
  layer scan dequantizing one layer at a time) gives the dequantized plain model's logits."""
  m, tokens, _ = tiny
  q = nnx.clone(m)
  quant.quantize_kernels(q, "nf4", 16)
  direct = q(tokens)
  np.testing.assert_allclose(direct, _dequantized_logits(*nnx.split(q), tokens), rtol=1e-5, atol=1e-6)


# --- Sharded storage ---------------------------------------------------------------------------------


def _mesh_2x2x2():
  config = synthetic.validated(synthetic.tiny_config(data=2, fsdp=2, tensor=2), 8)
  return sharding.make_mesh(config.mesh)


def test_sharded_quantized_state_gives_single_device_logits(tiny):
  """nf4 codes and scales on a (data, fsdp, tensor) = (2, 2, 2) mesh: the one-device logits."""
  m, tokens, _ = tiny
  q = nnx.clone(m)
  quant.quantize_kernels(q, "nf4", 16)
  graphdef, state = nnx.split(q)
  mesh = _mesh_2x2x2()
  shardings = sharding.tree_shardings(state, mesh)
  # The codes and scales shard like the flattened kernel [I, O].
  up, wo = shardings["blocks"]["mlp"]["w_up"], shardings["blocks"]["attn"]["wo"]
  assert up["codes"].get_value().spec == up["scales"].get_value().spec == P(None, "fsdp", "tensor")
  assert wo["codes"].get_value().spec == wo["scales"].get_value().spec == P(None, "tensor", "fsdp")
  placed = jax.device_put(state, shardings)

  @jax.jit
  def sharded_logits(state, tokens):
    with sharding.activation_rules(mesh):
      return _dequantized_logits(graphdef, state, tokens)

  one_device = jax.jit(lambda s, t: _dequantized_logits(graphdef, s, t))(state, tokens)
  np.testing.assert_allclose(sharded_logits(placed, tokens), one_device, rtol=1e-5, atol=1e-6)
  # Sharded storage divides the bytes: w_up's codes over fsdp x tensor = 4 devices.
  total = quant.weight_bytes(placed)
  assert total == quant.weight_bytes(state)
  assert sharding.bytes_per_device(placed) < total / 2
  w_up_codes = placed["blocks"]["mlp"]["w_up"]["codes"]
  assert sharding.bytes_per_device(w_up_codes) * 4 == quant.weight_bytes(w_up_codes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  assert sharding.bytes_per_device(abstract) == sharding.bytes_per_device(placed)


def test_scales_a_mesh_axis_does_not_divide_are_replicated(tiny):
  """int4 with block 32 leaves one scale row per output of a [32, O] kernel, as int8 does: fsdp=2 cannot
  divide it, so that dimension is replicated."""
  mesh = _mesh_2x2x2()
  for kind, block, name in (("int4", 32, "embed"), ("int8", 0, None)):
    q = nnx.clone(tiny[0])
    quant.quantize_kernels(q, kind, block)
    scales = q.blocks.attn.wq.scales
    assert scales.shape == (2, 1, 32) and scales.out_sharding == ("layers", name, "heads")
    spec = sharding.tree_shardings(nnx.state(q.blocks.attn.wq), mesh)["scales"].get_value().spec
    assert spec == P(None, None, "tensor")
