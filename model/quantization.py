"""Weight quantization of the block kernels: int8, int4 and NF4 storage, and fake quantization for QAT.

A kernel [*in, *out] (model/layers.dense's layout) is seen as a matrix w [..., I, O]: I the product of
its input axes, O of its output axes, and any leading axes (the stacked "layers" axis) batch.

- int8: symmetric absmax per output channel: codes int8 [..., I, O] in [-127, 127], scales float32
  [..., 1, O] (absmax / 127).
- int4: symmetric absmax per group of `block` consecutive inputs: codes in [-7, 7] (-8 is never used,
  so zero and +-absmax are all exact), scales float32 [..., I/block, O] (absmax / 7).
- nf4: QLoRA's NormalFloat4 (Dettmers et al. 2023, Appendix E; bitsandbytes' table): absmax per group
  of `block` inputs, each weight the nearest of the 16 codebook values times its group's absmax.

int4 and nf4 store 4-bit nibbles (int4: code + 8, in [1, 15]; nf4: the codebook index) two to a
uint8 byte along I: byte i holds input 2i in its low nibble and 2i + 1 in its high one, codes uint8
[..., I/2, O]. Adjacent inputs share a byte, so a contiguous shard of the bytes along I is a
contiguous shard of the inputs and the codes shard along I as the kernel does.

The weights are dequantized before the matmul (weight-only quantization): the stored bytes shrink,
the matmul runs in the compute dtype as before.

A model's block kernels become `QuantizedKernel` modules (`quantize_kernels`, QLoRA's frozen base or
post-training quantization), which the model reads through `read_kernel`; `fake_quantize_params`
rounds the kernels in the forward pass of quantization-aware training.
"""

import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The block kernels and how many of their leading (per-layer) axes are contracted in their matmul
# (model/layers.dense's `contract`).
KERNEL_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_up": 1, "w_gate": 1, "w_down": 1}
# Which block module holds each: their parameter paths are blocks/MODULE/NAME ("blocks/attn/wq").
KERNEL_MODULES = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("w_up", "w_gate", "w_down")}


def select_kernel_paths(paths: Sequence[str], pattern: str, field: str) -> list[str]:
  """The kernel paths (as LoRA, pruning and quantization name them) among `paths` that the regex
  `pattern` matches whole; a ValueError naming the config `field` when it is no regex or matches none."""
  try:
    matcher = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{field}={pattern!r}: not a regular expression ({e})") from None
  chosen = [path for path in paths if matcher.fullmatch(path)]
  if not chosen:
    raise ValueError(f"{field}={pattern!r}: matches none of the kernels {', '.join(paths)}")
  return chosen


# The allowed quantization kinds.
KINDS = ("int8", "int4", "nf4")

# NormalFloat4's 16 values (QLoRA, Appendix E; bitsandbytes' NF4 table), ascending; index 7 is 0.
NF4_CODEBOOK = np.array(
  [
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
  ],
  dtype=np.float32,
)

INT8_MAX = 127
INT4_MAX = 7

# The logical-axis name of the stacked layers axis (model/transformer.py's nnx.vmap).
LAYERS_AXIS = "layers"


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"quantization kind={kind!r}: allowed are {list(KINDS)}")


def _check_block(kind: str, block: int, num_inputs: int) -> None:
  """int4 and nf4 need a group size that divides I, and an even I (two codes a byte)."""
  if kind == "int8":
    return
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"quantization block={block!r}: must be a positive integer (inputs per scale)")
  if num_inputs % block:
    raise ValueError(f"quantization block={block} does not divide the kernel's input size I={num_inputs}")
  if num_inputs % 2:
    raise ValueError(f"quantization kind={kind!r} packs two codes a byte along I: the input size I={num_inputs} is odd")


@jax.jit
def pack_nibbles(nibbles: jax.Array) -> jax.Array:
  """uint8 values in [0, 16) [..., I, O] -> bytes [..., I/2, O]: input 2i low, 2i + 1 high."""
  nibbles = nibbles.astype(jnp.uint8)
  return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)


@jax.jit
def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Bytes [..., I/2, O] -> uint8 nibbles [..., I, O]; the inverse of pack_nibbles."""
  pairs = jnp.stack([packed & 0x0F, packed >> 4], axis=-2)  # [..., I/2, 2, O]
  return pairs.reshape(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))


def _safe(scale: jax.Array) -> jax.Array:
  """A divisor for w / scale: an all-zero channel or group (scale 0) gets codes 0."""
  return jnp.where(scale == 0, 1.0, scale)


@functools.partial(jax.jit, static_argnames=("kind", "block"))
def quantize(w: jax.Array, kind: str, block: int) -> tuple[jax.Array, jax.Array]:
  """w [..., I, O] -> (codes, scales) of `kind` (see the module docstring for their layouts).

  `block` (inputs per scale) is read by int4 and nf4 only; it must divide I. Jitted: called eagerly
  (quantize_kernels on a real model) it compiles once per shape instead of running op by op.
  """
  _check_kind(kind)
  num_inputs, num_outputs = w.shape[-2], w.shape[-1]
  _check_block(kind, block, num_inputs)
  w = w.astype(jnp.float32)
  lead = w.shape[:-2]
  if kind == "int8":
    scales = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / INT8_MAX
    codes = jnp.clip(jnp.round(w / _safe(scales)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return codes, scales
  groups = w.reshape(lead + (num_inputs // block, block, num_outputs))
  absmax = jnp.max(jnp.abs(groups), axis=-2)  # [..., I/block, O]
  if kind == "int4":
    scales = absmax / INT4_MAX
    codes = jnp.clip(jnp.round(groups / _safe(scales)[..., None, :]), -INT4_MAX, INT4_MAX)
    nibbles = (codes + 8).astype(jnp.uint8)
  else:
    scales = absmax
    normalized = groups / _safe(scales)[..., None, :]
    # The nearest codebook value: the count of midpoints between neighbours that lie below.
    midpoints = jnp.asarray((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2)
    nibbles = jnp.searchsorted(midpoints, normalized).astype(jnp.uint8)
  return pack_nibbles(nibbles.reshape(w.shape)), scales


@functools.partial(jax.jit, static_argnames=("kind", "block", "dtype"))
def dequantize(codes: jax.Array, scales: jax.Array, kind: str, block: int, dtype=jnp.float32) -> jax.Array:
  """(codes, scales) of `quantize` -> w [..., I, O] in `dtype` (the products are formed in float32)."""
  _check_kind(kind)
  if kind == "int8":
    return (codes.astype(jnp.float32) * scales).astype(dtype)
  nibbles = unpack_nibbles(codes)
  if kind == "int4":
    values = nibbles.astype(jnp.float32) - 8.0
  else:
    values = jnp.take(jnp.asarray(NF4_CODEBOOK), nibbles.astype(jnp.int32), axis=0)
  num_inputs, num_outputs = values.shape[-2], values.shape[-1]
  lead = values.shape[:-2]
  _check_block(kind, block, num_inputs)
  groups = values.reshape(lead + (num_inputs // block, block, num_outputs)) * scales[..., None, :]
  return groups.reshape(values.shape).astype(dtype)


def _as_matrix_shape(shape: Sequence[int], input_axes: int, leading: int) -> tuple[int, ...]:
  """A kernel's shape [*lead, *in, *out] -> [*lead, I, O]."""
  if not 1 <= input_axes < len(shape) - leading:
    raise ValueError(
      f"input_axes={input_axes} with {leading} leading axes leaves no input or no output axis in shape {tuple(shape)}"
    )
  lead, kernel = tuple(shape[:leading]), tuple(shape[leading:])
  return lead + (math.prod(kernel[:input_axes]), math.prod(kernel[input_axes:]))


def _round_trip(w: jax.Array, kind: str, block: int, input_axes: int, leading: int) -> jax.Array:
  matrix = w.reshape(_as_matrix_shape(w.shape, input_axes, leading))
  codes, scales = quantize(matrix, kind, block)
  return dequantize(codes, scales, kind, block, w.dtype).reshape(w.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _fake_quantize(w, kind, block, input_axes, leading):
  return _round_trip(w, kind, block, input_axes, leading)


@_fake_quantize.defjvp
def _fake_quantize_jvp(kind, block, input_axes, leading, primals, tangents):
  # Straight-through estimator: rounding has zero derivative almost everywhere, so the gradient
  # passes through as if the forward pass were the identity.
  (w,), (w_dot,) = primals, tangents
  return _fake_quantize(w, kind, block, input_axes, leading), w_dot


def fake_quantize(w: jax.Array, kind: str, block: int, input_axes: int, leading: int = 0) -> jax.Array:
  """dequantize(quantize(w)) in w's dtype, with the gradient of the identity (straight-through).

  w is a kernel [*lead, *in, *out]: its first `leading` axes are batch (a stacked kernel's "layers"
  axis: leading=1), the next `input_axes` the inputs that dense contracts (KERNEL_INPUT_AXES), the
  rest the outputs. The count of leading axes is given, not inferred, because a stacked
  [layers, D, N, H] and a per-layer [N, H, D] kernel cannot be told apart by their ranks.
  """
  _check_kind(kind)
  return _fake_quantize(w, kind, block, input_axes, leading)


class QuantizedArray(nnx.Variable):
  """Stored codes or scales of a quantized kernel: a frozen base, never trained, so not an nnx.Param
  (filters on nnx.Param, the optimizer's and LoRA's, leave them out)."""


def _flat_axis_name(names: Sequence[str | None]) -> str | None:
  """The logical name of axes flattened into one: the major axis's, whose shards stay contiguous."""
  return names[0] if names else None


class QuantizedKernel(nnx.Module):
  """A block kernel stored quantized: `codes` and `scales` (QuantizedArray) of the kernel seen as
  [*lead, I, O], and as static attributes its per-layer `shape` ([*in, *out]), `kind`, `block`,
  `input_axes`, and `axes`, the logical names of the kernel it replaced (with "layers" in front when
  stacked), which `dequantize_kernels` gives back to the Param.

  Stacked, the variables carry the layers axis in front; nnx.split + lax.scan over a model's blocks
  hand each layer a QuantizedKernel of that layer's slice, and `value` dequantizes that layer alone.
  """

  def __init__(self, kernel: jax.Array, kind: str, block: int, input_axes: int, axes: Sequence[str | None]):
    """`kernel` [*lead, *in, *out] with logical names `axes`; the leading axes are those named "layers".

    A ShapeDtypeStruct kernel (a model from nnx.eval_shape) gives abstract codes and scales.
    """
    _check_kind(kind)
    axes = tuple(axes)
    if len(axes) != len(kernel.shape):
      raise ValueError(f"axes {axes} do not name every axis of the kernel's shape {tuple(kernel.shape)}")
    leading = 0
    while leading < len(axes) and axes[leading] == LAYERS_AXIS:
      leading += 1
    matrix_shape = _as_matrix_shape(kernel.shape, input_axes, leading)
    _check_block(kind, block, matrix_shape[-2])
    self.shape = tuple(kernel.shape[leading:])
    self.kind = kind
    self.block = block
    self.input_axes = input_axes
    self.axes = axes

    def encode(w):
      return quantize(w.reshape(matrix_shape), kind, block)

    if isinstance(kernel, jax.ShapeDtypeStruct):
      codes, scales = jax.eval_shape(encode, kernel)
    else:
      codes, scales = encode(kernel)
    lead_names = axes[:leading]
    in_name = _flat_axis_name(axes[leading : leading + input_axes])
    out_name = _flat_axis_name(axes[leading + input_axes :])
    # int8's scales have one row: named None, it is replicated (as a name its mesh axis cannot
    # divide would be by sharding.logical_to_spec).
    scales_in_name = None if kind == "int8" else in_name
    self.codes = QuantizedArray(codes, out_sharding=lead_names + (in_name, out_name), eager_sharding=False)
    self.scales = QuantizedArray(scales, out_sharding=lead_names + (scales_in_name, out_name), eager_sharding=False)

  def value(self, dtype=jnp.float32) -> jax.Array:
    """The kernel [*lead, *in, *out] in `dtype` ([*in, *out] for one layer's slice)."""
    w = dequantize(self.codes[...], self.scales[...], self.kind, self.block, dtype)
    return w.reshape(w.shape[:-2] + self.shape)


def read_kernel(module: nnx.Module, name: str, dtype) -> jax.Array:
  """The kernel `getattr(module, name)` in `dtype`: an nnx.Param's value cast, or a QuantizedKernel dequantized."""
  kernel = getattr(module, name)
  if isinstance(kernel, QuantizedKernel):
    return kernel.value(dtype)
  return kernel[...].astype(dtype)


def _kernel_slots(model: nnx.Module, kernel_type: type) -> list[tuple[nnx.Module, str, object]]:
  """(module, attribute, kernel) for every attribute named in KERNEL_INPUT_AXES holding a `kernel_type`."""
  slots = []
  for _, module in nnx.iter_modules(model):
    for name in KERNEL_INPUT_AXES:
      kernel = vars(module).get(name)
      if isinstance(kernel, kernel_type):
        slots.append((module, name, kernel))
  return slots


def _cast(value, dtype):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape, dtype, sharding=value.sharding)
  return value.astype(dtype)


def quantize_kernels(model: nnx.Module, kind: str, block: int, base_dtype=None) -> None:
  """Replaces every block kernel Param of `model` (the attributes KERNEL_INPUT_AXES names: a
  Transformer's model.blocks.attn.wq, ..., model.blocks.mlp.w_down, stacked [layers, ...]) by a
  QuantizedKernel, in place. With `base_dtype` (jnp.bfloat16, QLoRA's base), every other Param
  (embeddings, norms, biases, an untied head) is cast to it.

  Works on real arrays, inside nnx.eval_shape, and on a model nnx.eval_shape returned (shapes only).
  """
  _check_kind(kind)
  for module, name, kernel in _kernel_slots(model, nnx.Param):
    axes = kernel.get_metadata().get("out_sharding")
    value = kernel.get_value()
    if axes is None:
      axes = (None,) * len(value.shape)
    try:
      quantized = QuantizedKernel(value, kind, block, KERNEL_INPUT_AXES[name], axes)
    except ValueError as e:
      raise ValueError(f"block kernel {name} {tuple(value.shape)} (axes {axes}): {e}") from None
    setattr(module, name, quantized)
  if base_dtype is not None:
    for _, param in nnx.iter_graph(model):
      if isinstance(param, nnx.Param):
        param.set_value(_cast(param.get_value(), base_dtype))


def dequantize_kernels(model: nnx.Module, dtype=jnp.float32) -> None:
  """The inverse surgery of quantize_kernels, in place: every QuantizedKernel becomes an nnx.Param of
  its dequantized kernel in `dtype`, with the logical names of the Param it replaced. (Other params
  stay in the dtype they have.) A quantized model's rounded weights as a plain model."""
  for module, name, kernel in _kernel_slots(model, QuantizedKernel):
    setattr(module, name, nnx.Param(kernel.value(dtype), out_sharding=kernel.axes, eager_sharding=False))


def _leading_axes(path, leaf) -> int:
  """A kernel leaf's leading batch axes: the "layers" names in front of its logical names; a bare
  array under "blocks" is taken as stacked (model/transformer.py's layout)."""
  if isinstance(leaf, nnx.Variable):
    names = leaf.get_metadata().get("out_sharding")
    if names is not None:
      count = 0
      while count < len(names) and names[count] == LAYERS_AXIS:
        count += 1
      return count
  return 1 if "blocks" in _path_names(path) else 0


def _path_names(path) -> list[str]:
  return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def fake_quantize_params(params: nnx.State, kind: str, block: int) -> nnx.State:
  """`params` with every block kernel (a leaf named in KERNEL_INPUT_AXES) fake-quantized per layer
  (fake_quantize: rounded forward, identity gradient), other leaves unchanged; for the forward pass
  of quantization-aware training."""
  _check_kind(kind)

  def visit(path, leaf):
    names = _path_names(path)
    if not names or names[-1] not in KERNEL_INPUT_AXES:
      return leaf
    leading = _leading_axes(path, leaf)
    input_axes = KERNEL_INPUT_AXES[names[-1]]
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(fake_quantize(leaf.get_value(), kind, block, input_axes, leading))
    return fake_quantize(leaf, kind, block, input_axes, leading)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def weight_bytes(state) -> int:
  """Total bytes of the arrays (or ShapeDtypeStructs) in `state`, any pytree such as an nnx.State."""
  return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))
