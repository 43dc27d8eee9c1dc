"""Parameter creation, matmuls and norms shared by the attention and MLP blocks."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The allowed values of model.norm: LayerNorm (GPT-2) and RMSNorm (Llama), both in Norm below.
NORMS = ("layernorm", "rmsnorm")


def param(
  rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float | None, dtype=jnp.float32
) -> nnx.Param:
  """A parameter with logical axis names; normal(0, std) or, with std=None, zeros.

  eager_sharding=False: placement is decided once for the whole state from
  these names (sharding/rules.py), not per variable at creation time.
  """
  if std is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def ones_param(shape: Sequence[int], axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def dense(x: jax.Array, kernel: jax.Array, contract: int, dtype) -> jax.Array:
  """x [..., *in] times kernel [*in, *out] -> [..., *out], as one 2-D matmul.

  Flattening to [tokens, in] x [in, out] gives XLA's CPU backend a plain GEMM,
  which it runs faster than the equivalent multi-dimensional einsum
  (docs/performance_notes.md). Inputs are cast to the compute dtype and accumulated in
  float32 (preferred_element_type), which keeps bfloat16 products accurate and
  is what makes them fast on CPUs.
  """
  in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
  batch_shape = x.shape[: x.ndim - contract]
  x_2d = x.reshape(-1, math.prod(in_shape)).astype(dtype)
  kernel_2d = kernel.reshape(math.prod(in_shape), math.prod(out_shape)).astype(dtype)
  y = jnp.dot(x_2d, kernel_2d, preferred_element_type=jnp.float32)
  return y.astype(dtype).reshape(batch_shape + out_shape)


class Norm(nnx.Module):
  """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32."""

  def __init__(self, dim: int, kind: str, eps: float, use_bias: bool):
    """`use_bias`: a learned bias after the scale (LayerNorm's in GPT-2); RMSNorm has none."""
    if kind not in NORMS:
      raise ValueError(f"config field 'model.norm'={kind!r}: allowed are {list(NORMS)}")
    self.kind = kind
    self.eps = eps
    self.scale = ones_param((dim,), ("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,)), out_sharding=("embed",), eager_sharding=False) if use_bias else None

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x_BLD.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
