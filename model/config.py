"""The model's config: one typed, frozen field per model.* field of configs/base.py.

The ConfigDict a run is configured with is converted once, at the model's entry points
(`Transformer`, `num_params`, `flops_per_token`, model/huggingface.py), so model code reads typed
attributes and never a default of its own: a field a saved config predates takes the default here,
which is base.py's. Frozen and hashable, so it can be a static jit argument and a graph's static
attribute.
"""

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The defaults are configs/base.py's (tests/test_model.py checks that they stay so).

  num_kv_heads and head_dim given as 0 stand for num_heads and embed_dim // num_heads; the instance
  holds what they stand for. To change num_heads or embed_dim, build a new one with from_config
  rather than dataclasses.replace, which would keep the derived values of the old one.
  """

  vocab_size: int = 0  # 0: the tokenizer's vocabulary size (filled in by validation).
  num_layers: int = 4
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: num_heads (no grouped-query attention).
  head_dim: int = 0  # 0: embed_dim // num_heads.
  mlp_dim: int = 512
  max_seq_len: int = 128
  norm: str = "layernorm"  # model.layers.NORMS
  norm_eps: float = 1e-5
  position: str = "learned"  # model.transformer.POSITIONS
  rope_theta: float = 10000.0
  mlp: str = "gelu"  # model.transformer.MLPS
  gelu_approximate: bool = False  # tanh GELU (GPT-2) instead of exact erf GELU.
  tie_embeddings: bool = True
  use_bias: bool = False
  qkv_bias: bool = False  # biases on q/k/v alone (Qwen2); use_bias already implies them.
  dtype: str = "float32"  # model.transformer.COMPUTE_DTYPES
  scan_layers: bool = True
  remat: str = "none"  # model.transformer.REMAT_POLICIES
  attention: str = "auto"  # model.attention.IMPLEMENTATIONS
  attention_block: int = 512
  loss_chunk: int = 0  # 0: the cross-entropy over the whole row at once.
  dropout_rate: float = 0.0
  init_std: float = 0.02

  def __post_init__(self):
    if self.num_kv_heads == 0:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim == 0 and self.num_heads > 0:  # num_heads <= 0 is validation's to report.
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)

  @property
  def has_qkv_bias(self) -> bool:
    """Whether q, k and v have biases: with use_bias (GPT-2, biases everywhere) or qkv_bias (Qwen2)."""
    return self.use_bias or self.qkv_bias

  @property
  def has_norm_bias(self) -> bool:
    """Whether the norms have a bias: LayerNorm with use_bias (GPT-2); RMSNorm never has one."""
    return self.use_bias and self.norm == "layernorm"

  @classmethod
  def from_config(cls, config: "ModelConfig | Mapping[str, Any]") -> "ModelConfig":
    """From a ConfigDict (config.model) or a dict of model fields; a ModelConfig comes back as it is.

    Fields left out take their defaults; an unknown field or a value of the wrong type is a
    ValueError naming the field. Integers are accepted for float fields.
    """
    if isinstance(config, cls):
      return config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      raise ValueError(
        f"unknown model config field(s) {', '.join(repr(name) for name in unknown)}; fields: {', '.join(fields)}"
      )
    return cls(**{name: _typed(name, fields[name].type, value) for name, value in values.items()})


def _typed(name: str, kind: type, value: Any) -> Any:
  """`value` as the field's type (an integer for a float field becomes a float), else a ValueError."""
  if kind is bool and isinstance(value, (bool, np.bool_)):  # np.bool_ is no subclass of bool.
    return bool(value)
  if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  if kind is str and isinstance(value, str):
    return value
  raise ValueError(f"model config field '{name}'={value!r} must be a {kind.__name__}")
