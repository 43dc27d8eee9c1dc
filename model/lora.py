"""LoRA: low-rank adapters beside chosen block kernels, the kernels themselves left as they are.

A kernel W [*in, *out] with an adapter computes x W + (alpha / rank) * (dropout(x) A) B, with A
[*in, rank] and B [rank, *out] (B starts at zero, so a fresh adapter changes nothing). The adapters are
nnx.LoRAParam variables on the kernel's module (`lora_wq` beside `wq`), stacked along the layers axis
like every block parameter, so the layer scan slices them with the rest; the training step
differentiates them alone (training/setup.py's `trainable` filter). `merge_lora` folds them into the
kernels, giving back the plain model (model/huggingface.py exports it; tools/lora.py writes PEFT
adapters from the unmerged ones).

Adapters are added to an existing model (`add_lora`), not built by its constructor: a LoRA run starts
from a pre-trained base, and the selection by path regex reads the base's parameter paths.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import dense, dropout
from model.quantization import KERNEL_INPUT_AXES, KERNEL_MODULES, QuantizedKernel, read_kernel, select_kernel_paths

DEFAULT_TARGETS = "blocks/attn/(wq|wk|wv|wo)|blocks/mlp/(w_up|w_gate|w_down)"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS  # A regex matched against whole kernel paths.

  @classmethod
  def from_config(cls, lora_cfg) -> "LoraSpec | None":
    """The spec of config.lora, or None when LoRA is off (rank 0)."""
    if not lora_cfg or lora_cfg.rank <= 0:
      return None
    return cls(
      rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout), targets=lora_cfg.targets
    )


class LoraAdapter(nnx.Module):
  """The low-rank update of one kernel (stacked: one per layer along a leading axis)."""

  def __init__(self, a: nnx.LoRAParam, b: nnx.LoRAParam, input_axes: int, scale: float, rate: float):
    self.a = a
    self.b = b
    self.input_axes = input_axes
    self.scale = scale
    self.rate = rate

  def __call__(self, x: jax.Array, dtype, dropout_key: jax.Array | None = None) -> jax.Array:
    """x [..., *in] -> the adapter's contribution [..., *out] in `dtype`."""
    h = dense(dropout(x, self.rate, dropout_key), self.a[...], self.input_axes, dtype)
    return dense(h, self.b[...], 1, dtype) * jnp.asarray(self.scale, dtype)

  def delta(self) -> jax.Array:
    """(alpha / rank) A B in the kernel's shape (float32; with the leading layers axis when stacked)."""
    a, b = self.a[...], self.b[...]
    rank = a.shape[-1]
    lead = a.ndim - 1 - self.input_axes  # 1 when stacked along layers, else 0.
    in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1 :]
    a_2d = a.reshape(a.shape[:lead] + (math.prod(in_shape), rank))
    b_2d = b.reshape(b.shape[:lead] + (rank, math.prod(out_shape)))
    product = jnp.matmul(a_2d.astype(jnp.float32), b_2d.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (self.scale * product).reshape(a.shape[:lead] + in_shape + out_shape)


def kernel_paths(model: nnx.Module) -> list[str]:
  """Every block kernel's path that an adapter may target."""
  return [
    f"blocks/{module}/{name}"
    for module, names in KERNEL_MODULES.items()
    for name in names
    if hasattr(getattr(model.blocks, module), name)
  ]


def targeted_paths(model: nnx.Module, targets: str, field: str = "lora.targets") -> list[str]:
  """The kernel paths `targets` (a regex over whole paths) selects; a ValueError naming `field` when it
  is not a regex or selects nothing."""
  return select_kernel_paths(kernel_paths(model), targets, field)


def add_lora(model: nnx.Module, spec: LoraSpec, key: jax.Array) -> None:
  """Adds an adapter beside every kernel `spec.targets` selects (in place; works under nnx.eval_shape).

  A starts as PEFT's does (uniform, bound 1 / sqrt(fan_in)), B at zero.
  """
  for index, path in enumerate(targeted_paths(model, spec.targets)):
    _, module_name, name = path.split("/")
    module = getattr(model.blocks, module_name)
    kernel = getattr(module, name)
    if isinstance(kernel, QuantizedKernel):  # QLoRA's base: the names and stacked shape of the kernel it replaced.
      names, shape = kernel.axes, (kernel.codes.shape[0], *kernel.shape)
    else:
      names, shape = kernel.get_metadata()["out_sharding"], kernel.shape  # ("layers", *in, *out): stacked blocks.
    input_axes = KERNEL_INPUT_AXES[name]
    in_shape, out_shape = shape[1 : 1 + input_axes], shape[1 + input_axes :]
    in_names, out_names = names[1 : 1 + input_axes], names[1 + input_axes :]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(jax.random.fold_in(key, index), (shape[0], *in_shape, spec.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((shape[0], spec.rank, *out_shape), jnp.float32)
    adapter = LoraAdapter(
      nnx.LoRAParam(a, out_sharding=(names[0], *in_names, "lora_rank"), eager_sharding=False),
      nnx.LoRAParam(b, out_sharding=(names[0], "lora_rank", *out_names), eager_sharding=False),
      input_axes=input_axes,
      scale=spec.alpha / spec.rank,
      rate=spec.dropout,
    )
    setattr(module, f"lora_{name}", adapter)


def adapters(model: nnx.Module) -> dict[str, LoraAdapter]:
  """'blocks/attn/wq' -> its adapter, for every adapted kernel."""
  found = {}
  for module_name, names in KERNEL_MODULES.items():
    module = getattr(model.blocks, module_name)
    for name in names:
      adapter = getattr(module, f"lora_{name}", None)
      if adapter is not None:
        found[f"blocks/{module_name}/{name}"] = adapter
  return found


def merge_lora(model: nnx.Module, dtype=jnp.float32) -> None:
  """Folds every adapter into its kernel and removes it (in place): the plain model, each merged
  kernel W + (alpha / rank) A B in `dtype` (a quantized kernel is dequantized first)."""
  for path, adapter in adapters(model).items():
    _, module_name, name = path.split("/")
    module = getattr(model.blocks, module_name)
    kernel = getattr(module, name)
    base = read_kernel(module, name, jnp.float32) if isinstance(kernel, nnx.Variable) else _stacked_value(kernel)
    merged = (base + adapter.delta()).astype(dtype)
    names = adapter.a.get_metadata()["out_sharding"][:-1] + adapter.b.get_metadata()["out_sharding"][2:]
    setattr(module, name, nnx.Param(merged, out_sharding=names, eager_sharding=False))
    delattr(module, f"lora_{name}")


def _stacked_value(kernel) -> jax.Array:
  """A stacked quantized kernel, every layer dequantized to float32."""
  graphdef, state = nnx.split(kernel)
  return jax.vmap(lambda s: nnx.merge(graphdef, s).value(jnp.float32))(state)


def project(x: jax.Array, module: nnx.Module, name: str, dtype, dropout_key: jax.Array | None = None) -> jax.Array:
  """x times the block kernel `module.<name>` (a parameter or a quantized kernel, model/quantization.py),
  plus its adapter's low-rank update when it has one: every block matmul goes through here."""
  contract = KERNEL_INPUT_AXES[name]
  y = dense(x, read_kernel(module, name, dtype), contract, dtype)
  adapter = getattr(module, f"lora_{name}", None)
  if adapter is not None:
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, _KERNEL_INDEX[name])
    y = y + adapter(x, dtype, key)
  return y


_KERNEL_INDEX = {name: index for index, name in enumerate(KERNEL_INPUT_AXES)}
