"""Hugging Face <-> loom: config fields and parameter names, as pure functions on dicts and numpy arrays.

Two families of Hugging Face causal LMs map onto loom's one decoder exactly:

* Llama style (model_type llama, mistral, qwen2): RMSNorm, rotary positions in
  the rotate-half layout that Hugging Face checkpoints use (so no permutation
  of q/k), SwiGLU, grouped-query attention; Qwen2 adds q/k/v biases
  (loom's model.qkv_bias).
* GPT-2 (model_type gpt2): LayerNorm, learned positions, tanh GELU
  (gelu_new), biases everywhere; its Conv1D weights are stored (in, out) and
  its attention input projection c_attn is q|k|v fused along the output axis.

A Hugging Face feature that loom cannot compute (rope scaling such as Llama
3.1's, a Mistral or Qwen2 sliding window shorter than the context, Llama's
attention or MLP biases, another activation, ...) is refused with a ValueError
naming the config.json field, never approximated. A Mistral `sliding_window`
is accepted only when it is null or at least `max_position_embeddings`
(a window that long never masks anything, so full attention is the same model).

Nothing here reads or writes files: tools/huggingface_io.py does that.
Parameters are loom's nested pure dict (nnx.to_pure_dict(state)), every block
parameter stacked along a leading layers axis. Import converts to float32,
loom's parameter dtype; all conversions are transposes, reshapes and splits, so
export then import gives back the same bits.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from model.config import ModelConfig

LLAMA_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = LLAMA_TYPES + ("gpt2",)

_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}
# GPT-2 activations loom computes exactly: the tanh approximation under its names, and erf GELU.
_GPT2_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


def _get(hf: Mapping[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
  if key in hf and hf[key] is not None:
    return hf[key]
  if required:
    raise ValueError(f"config.json has no '{key}' (model_type {hf.get('model_type')!r} needs it)")
  return default


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"config.json field '{field}'={value!r}: {why}; loom cannot represent this model")


def _int(hf: Mapping[str, Any], key: str, default: Any = None, required: bool = False) -> int:
  """A positive integer field of config.json; a ValueError naming it otherwise (e.g. "four", 0, 2.5)."""
  value = _get(hf, key, default, required)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.json field '{key}'={value!r}: expected a positive integer")
  return value


def _float(hf: Mapping[str, Any], key: str, default: Any = None) -> float:
  """A positive number field of config.json; a ValueError naming it otherwise."""
  value = _get(hf, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"config.json field '{key}'={value!r}: expected a positive number")
  return float(value)


def _bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
  value = _get(hf, key, default)
  if not isinstance(value, bool):
    raise ValueError(f"config.json field '{key}'={value!r}: expected true or false")
  return value


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_theta from transformers 5's rope_parameters or 4's rope_theta; refuses any rope scaling."""
  for field in ("rope_parameters", "rope_scaling"):
    rope = hf.get(field)
    if rope is None:
      continue
    if not isinstance(rope, Mapping):
      raise _refuse(field, rope, "expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise _refuse(
        field,
        dict(rope),
        f"rope_type {rope_type!r} rescales the rotary frequencies and loom has only plain RoPE (rope_type 'default')",
      )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise _refuse(field, dict(rope), "a partial rotary factor is not supported")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise _refuse("partial_rotary_factor", hf["partial_rotary_factor"], "loom rotates whole heads")
  parameters = hf.get("rope_parameters") or {}
  if parameters.get("rope_theta") is not None:
    return _float({"rope_parameters.rope_theta": parameters["rope_theta"]}, "rope_parameters.rope_theta")
  return _float(hf, "rope_theta", 10000.0)


def _check_sliding_window(hf: Mapping[str, Any], max_positions: int) -> None:
  """A window at least as long as the context never masks anything: full attention, which loom has."""
  # Qwen2 configs carry a sliding_window that applies only with use_sliding_window.
  if hf["model_type"] == "qwen2" and not hf.get("use_sliding_window", False):
    return
  window = hf.get("sliding_window")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
    raise _refuse("sliding_window", window, "expected an integer or null")
  if window is not None and window < max_positions:
    raise _refuse(
      "sliding_window",
      window,
      f"attention limited to the last {window} tokens, shorter than max_position_embeddings="
      f"{max_positions}, and loom attends to the whole context (a window of null or >= "
      "max_position_embeddings is accepted)",
    )


def loom_model_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """loom's model fields (configs/base.py config.model) for a Hugging Face config.json.

  Supports model_type llama, mistral, qwen2 and gpt2. Raises ValueError naming
  the field for anything loom cannot compute exactly: a rope_scaling /
  non-default rope_parameters (e.g. Llama 3.1's 'llama3' scaling), a Mistral or
  Qwen2 sliding_window shorter than max_position_embeddings (null or >= is
  accepted), Llama's attention_bias / mlp_bias, an activation other than silu
  (Llama family) or gelu_new / gelu_pytorch_tanh / gelu (GPT-2), GPT-2's
  scale_attn_by_inverse_layer_idx or unscaled attention.
  """
  hf = hf_config
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"config.json field 'model_type'={model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}"
    )
  if model_type == "gpt2":
    return _gpt2_to_loom(hf)
  return _llama_to_loom(hf)


def _llama_to_loom(hf: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf["model_type"]
  embed_dim = _int(hf, "hidden_size", required=True)
  num_heads = _int(hf, "num_attention_heads", required=True)
  max_positions = _int(hf, "max_position_embeddings", required=True)
  activation = _get(hf, "hidden_act", "silu")
  if activation != "silu":
    raise _refuse("hidden_act", activation, "loom's gated MLP is SwiGLU (silu)")
  if model_type == "llama":
    for field in ("attention_bias", "mlp_bias"):
      if hf.get(field):
        raise _refuse(field, hf[field], "loom has no Llama-style projection biases (only Qwen2's q/k/v ones)")
  if hf.get("qk_norm") or hf.get("use_qk_norm"):
    raise _refuse("qk_norm", True, "loom has no query/key norms")
  _check_sliding_window(hf, max_positions)
  head_dim = _int(hf, "head_dim", embed_dim // num_heads)
  if model_type == "qwen2" and head_dim * num_heads != embed_dim:
    raise _refuse("head_dim", head_dim, "Qwen2's head_dim is hidden_size // num_attention_heads")
  return dict(
    vocab_size=_int(hf, "vocab_size", required=True),
    num_layers=_int(hf, "num_hidden_layers", required=True),
    embed_dim=embed_dim,
    num_heads=num_heads,
    num_kv_heads=_int(hf, "num_key_value_heads", num_heads),
    head_dim=head_dim,
    mlp_dim=_int(hf, "intermediate_size", required=True),
    max_seq_len=max_positions,
    norm="rmsnorm",
    norm_eps=_float(hf, "rms_norm_eps", 1e-6),
    position="rope",
    rope_theta=_rope_theta(hf),
    mlp="swiglu",
    gelu_approximate=False,
    tie_embeddings=_bool(hf, "tie_word_embeddings", False),
    use_bias=False,
    qkv_bias=model_type == "qwen2",
  )


def _gpt2_to_loom(hf: Mapping[str, Any]) -> dict[str, Any]:
  activation = _get(hf, "activation_function", "gelu_new")
  if activation not in _GPT2_ACTIVATIONS:
    raise _refuse("activation_function", activation, f"loom computes only {', '.join(_GPT2_ACTIVATIONS)} exactly")
  if not _get(hf, "scale_attn_weights", True):
    raise _refuse("scale_attn_weights", False, "loom always scales attention scores by head_dim ** -0.5")
  for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if hf.get(field):
      raise _refuse(field, hf[field], "not supported")
  embed_dim = _int(hf, "n_embd", required=True)
  num_heads = _int(hf, "n_head", required=True)
  if embed_dim % num_heads:
    raise _refuse("n_head", num_heads, f"n_embd={embed_dim} is not divisible by it")
  return dict(
    vocab_size=_int(hf, "vocab_size", required=True),
    num_layers=_int(hf, "n_layer", required=True),
    embed_dim=embed_dim,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=embed_dim // num_heads,
    mlp_dim=_int(hf, "n_inner", 4 * embed_dim),
    max_seq_len=_int(hf, "n_positions", required=True),
    norm="layernorm",
    norm_eps=_float(hf, "layer_norm_epsilon", 1e-5),
    position="learned",
    mlp="gelu",
    gelu_approximate=_GPT2_ACTIVATIONS[activation],
    tie_embeddings=_bool(hf, "tie_word_embeddings", True),
    use_bias=True,
    qkv_bias=False,
  )


def _dims(m: ModelConfig) -> tuple[int, int, int, int, int, int, int]:
  """(layers, vocab, embed, heads, kv heads, head dim, mlp dim)."""
  if not m.vocab_size:
    raise ValueError(
      "model.vocab_size is 0 (the tokenizer's size, filled in by validation); pass a "
      "validated model config, such as the one in the checkpoint's record (what "
      "tools/hf_export.py uses without --config), or set model.vocab_size"
    )
  return m.num_layers, m.vocab_size, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim


def _family(m: ModelConfig) -> str:
  return "gpt2" if m.position == "learned" else "llama"


def hf_config(model_config: ModelConfig | Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """config.json for a loom model config (a ModelConfig, config.model or a dict of its fields, with
  vocab_size filled in).

  Raises ValueError naming the loom field when the model is not of the
  requested family (llama / mistral / qwen2: rmsnorm, rope, swiglu, no biases
  except qwen2's q/k/v ones; gpt2: layernorm, learned positions, gelu, biases,
  no grouped-query attention). Token ids (bos/eos/pad) and dtype are the caller's.
  """
  m = ModelConfig.from_config(model_config)
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
  layers, vocab, embed, heads, kv_heads, head_dim, mlp_dim = _dims(m)
  qkv_bias = m.qkv_bias

  def require(field: str, allowed: Any, why: str = "") -> None:
    value = getattr(m, field)
    if value != allowed:
      raise ValueError(f"model.{field}={value!r} cannot be exported as {model_type} (it needs {allowed!r}{why})")

  if model_type == "gpt2":
    for field, allowed in (("norm", "layernorm"), ("position", "learned"), ("mlp", "gelu"), ("use_bias", True)):
      require(field, allowed)
    if kv_heads != heads or head_dim * heads != embed:
      raise ValueError(
        f"model.num_kv_heads={kv_heads}, head_dim={head_dim} cannot be exported as gpt2 "
        f"(it needs num_kv_heads = num_heads = {heads} and head_dim * num_heads = embed_dim)"
      )
    return {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": "gpt2",
      "vocab_size": vocab,
      "n_embd": embed,
      "n_layer": layers,
      "n_head": heads,
      "n_inner": mlp_dim,
      "n_positions": m.max_seq_len,
      "layer_norm_epsilon": m.norm_eps,
      "activation_function": "gelu_new" if m.gelu_approximate else "gelu",
      "tie_word_embeddings": m.tie_embeddings,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "initializer_range": m.init_std,
    }

  for field, allowed in (("norm", "rmsnorm"), ("position", "rope"), ("mlp", "swiglu"), ("use_bias", False)):
    require(field, allowed)
  if qkv_bias != (model_type == "qwen2"):
    require(
      "qkv_bias",
      model_type == "qwen2",
      ": q/k/v biases are Qwen2's; export as qwen2" if qkv_bias else ": qwen2 always has q/k/v biases",
    )
  if model_type == "qwen2" and head_dim * heads != embed:
    raise ValueError(f"model.head_dim={head_dim} cannot be exported as qwen2 (it needs embed_dim // num_heads)")
  config = {
    "architectures": [_ARCHITECTURES[model_type]],
    "model_type": model_type,
    "vocab_size": vocab,
    "hidden_size": embed,
    "intermediate_size": mlp_dim,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": m.max_seq_len,
    "rms_norm_eps": m.norm_eps,
    "rope_theta": m.rope_theta,
    "rope_scaling": None,
    "tie_word_embeddings": m.tie_embeddings,
    "attention_dropout": 0.0,
    "initializer_range": m.init_std,
  }
  if model_type == "llama":
    config.update(attention_bias=False, mlp_bias=False)
  else:
    config.update(sliding_window=None)
  if model_type == "qwen2":
    config.update(use_sliding_window=False, max_window_layers=layers)
    del config["head_dim"]
  return config


# --- Parameters.


class _Reader:
  """Hands out tensors by name, checking shapes, and remembers which were used."""

  def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
    self.tensors = tensors
    # Base-model checkpoints (LlamaModel, GPT2Model) store names without the prefix.
    self.prefix = prefix if any(name.startswith(prefix) for name in tensors) else ""
    self.used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...], top_level: bool = False) -> np.ndarray:
    key = name if top_level else self.prefix + name
    if key not in self.tensors:
      raise ValueError(f"the checkpoint has no tensor '{key}' (expected shape {shape})")
    value = np.asarray(self.tensors[key])
    if value.shape != tuple(shape):
      raise ValueError(f"tensor '{key}' has shape {value.shape}; the config says {tuple(shape)}")
    self.used.add(key)
    return value.astype(np.float32)

  def stack(self, template: str, layers: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([self.take(template.format(i), shape) for i in range(layers)])

  def check_all_used(self, gpt2: bool) -> None:
    def is_buffer(name: str) -> bool:
      """Not parameters: rotary tables and GPT-2's causal masks, which some checkpoints carry."""
      if name.endswith("rotary_emb.inv_freq"):
        return True
      return gpt2 and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"))

    unused = sorted(name for name in self.tensors if name not in self.used and not is_buffer(name))
    if unused:
      shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
      raise ValueError(f"the checkpoint has {len(unused)} tensor(s) loom's model has no place for: {shown}")


def params_from_hf(tensors: Mapping[str, np.ndarray], model_config: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
  """loom's parameter pure dict (float32 numpy) from a Hugging Face state dict.

  `model_config` is loom's model config (loom_model_config's fields are
  enough); position 'learned' reads GPT-2 names, 'rope' Llama-family names.
  Raises ValueError for a missing tensor, a wrong shape or a tensor left over.
  """
  m = ModelConfig.from_config(model_config)
  if _family(m) == "gpt2":
    return _gpt2_params(tensors, m)
  return _llama_params(tensors, m)


def _head(reader: _Reader, embed: np.ndarray, m: ModelConfig) -> np.ndarray | None:
  """The untied output head [embed, vocab], or None; a tied checkpoint may still store a copy."""
  vocab, dim = embed.shape
  if m.tie_embeddings:
    if "lm_head.weight" in reader.tensors:
      copy = reader.take("lm_head.weight", (vocab, dim), top_level=True)
      if not np.array_equal(copy, embed):
        raise ValueError(
          "tie_word_embeddings is true but lm_head.weight differs from the token embedding; "
          "set tie_word_embeddings to false in config.json if the head is separate"
        )
    return None
  return reader.take("lm_head.weight", (vocab, dim), top_level=True).T


def _llama_params(tensors: Mapping[str, np.ndarray], m: ModelConfig) -> dict[str, Any]:
  layers, vocab, d, n, k, h, f = _dims(m)
  r = _Reader(tensors, "model.")
  attn = "layers.{}.self_attn."
  # torch Linear weights are [out, in]; loom's kernels are [in, *out].
  q = r.stack(attn + "q_proj.weight", layers, (n * h, d))
  kk = r.stack(attn + "k_proj.weight", layers, (k * h, d))
  v = r.stack(attn + "v_proj.weight", layers, (k * h, d))
  o = r.stack(attn + "o_proj.weight", layers, (d, n * h))
  attention = {
    "wq": q.transpose(0, 2, 1).reshape(layers, d, n, h),
    "wk": kk.transpose(0, 2, 1).reshape(layers, d, k, h),
    "wv": v.transpose(0, 2, 1).reshape(layers, d, k, h),
    "wo": o.transpose(0, 2, 1).reshape(layers, n, h, d),
  }
  if m.qkv_bias:
    attention["bq"] = r.stack(attn + "q_proj.bias", layers, (n * h,)).reshape(layers, n, h)
    attention["bk"] = r.stack(attn + "k_proj.bias", layers, (k * h,)).reshape(layers, k, h)
    attention["bv"] = r.stack(attn + "v_proj.bias", layers, (k * h,)).reshape(layers, k, h)
  mlp = {
    "w_gate": r.stack("layers.{}.mlp.gate_proj.weight", layers, (f, d)).transpose(0, 2, 1),
    "w_up": r.stack("layers.{}.mlp.up_proj.weight", layers, (f, d)).transpose(0, 2, 1),
    "w_down": r.stack("layers.{}.mlp.down_proj.weight", layers, (d, f)).transpose(0, 2, 1),
  }
  embed = r.take("embed_tokens.weight", (vocab, d))
  params = {
    "embed": embed,
    "blocks": {
      "attn_norm": {"scale": r.stack("layers.{}.input_layernorm.weight", layers, (d,))},
      "attn": attention,
      "mlp_norm": {"scale": r.stack("layers.{}.post_attention_layernorm.weight", layers, (d,))},
      "mlp": mlp,
    },
    "final_norm": {"scale": r.take("norm.weight", (d,))},
  }
  head = _head(r, embed, m)
  if head is not None:
    params["head"] = head
  r.check_all_used(gpt2=False)
  return _contiguous(params)


def _gpt2_params(tensors: Mapping[str, np.ndarray], m: ModelConfig) -> dict[str, Any]:
  layers, vocab, d, n, _, h, f = _dims(m)
  r = _Reader(tensors, "transformer.")
  # Conv1D weights are already [in, out]; c_attn's output axis is q|k|v, each heads-major.
  qkv = r.stack("h.{}.attn.c_attn.weight", layers, (d, 3 * d)).reshape(layers, d, 3, n, h)
  qkv_bias = r.stack("h.{}.attn.c_attn.bias", layers, (3 * d,)).reshape(layers, 3, n, h)

  def norm(name: str, stacked: bool = True) -> dict[str, np.ndarray]:
    if stacked:
      return {"scale": r.stack(name + ".weight", layers, (d,)), "bias": r.stack(name + ".bias", layers, (d,))}
    return {"scale": r.take(name + ".weight", (d,)), "bias": r.take(name + ".bias", (d,))}

  embed = r.take("wte.weight", (vocab, d))
  params = {
    "embed": embed,
    "pos_embed": r.take("wpe.weight", (m.max_seq_len, d)),
    "blocks": {
      "attn_norm": norm("h.{}.ln_1"),
      "attn": {
        "wq": qkv[:, :, 0],
        "wk": qkv[:, :, 1],
        "wv": qkv[:, :, 2],
        "bq": qkv_bias[:, 0],
        "bk": qkv_bias[:, 1],
        "bv": qkv_bias[:, 2],
        "wo": r.stack("h.{}.attn.c_proj.weight", layers, (d, d)).reshape(layers, n, h, d),
        "bo": r.stack("h.{}.attn.c_proj.bias", layers, (d,)),
      },
      "mlp_norm": norm("h.{}.ln_2"),
      "mlp": {
        "w_up": r.stack("h.{}.mlp.c_fc.weight", layers, (d, f)),
        "b_up": r.stack("h.{}.mlp.c_fc.bias", layers, (f,)),
        "w_down": r.stack("h.{}.mlp.c_proj.weight", layers, (f, d)),
        "b_down": r.stack("h.{}.mlp.c_proj.bias", layers, (d,)),
      },
    },
    "final_norm": norm("ln_f", stacked=False),
  }
  head = _head(r, embed, m)
  if head is not None:
    params["head"] = head
  r.check_all_used(gpt2=True)
  return _contiguous(params)


def _contiguous(tree: dict[str, Any]) -> dict[str, Any]:
  return {
    key: _contiguous(value) if isinstance(value, dict) else np.ascontiguousarray(value) for key, value in tree.items()
  }


def hf_tensors(
  params: Mapping[str, Any], model_config: ModelConfig | Mapping[str, Any], model_type: str
) -> dict[str, np.ndarray]:
  """The Hugging Face state dict (numpy, the params' dtype) for loom's parameter pure dict.

  The inverse of params_from_hf. A tied head is not written (as
  transformers' save_pretrained does). Checks the model fits `model_type`
  (see hf_config).
  """
  m = ModelConfig.from_config(model_config)
  hf_config(m, model_type)  # Raises when the model is not of that family.
  if model_type == "gpt2":
    tensors = _gpt2_tensors(params, m)
  else:
    tensors = _llama_tensors(params, m)
  if not m.tie_embeddings:
    tensors["lm_head.weight"] = np.asarray(params["head"]).T
  return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def _llama_tensors(params: Mapping[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
  layers, _, d, n, k, h, f = _dims(m)
  blocks = params["blocks"]
  attn, mlp = blocks["attn"], blocks["mlp"]
  per_layer = {
    "self_attn.q_proj.weight": np.asarray(attn["wq"]).reshape(layers, d, n * h).transpose(0, 2, 1),
    "self_attn.k_proj.weight": np.asarray(attn["wk"]).reshape(layers, d, k * h).transpose(0, 2, 1),
    "self_attn.v_proj.weight": np.asarray(attn["wv"]).reshape(layers, d, k * h).transpose(0, 2, 1),
    "self_attn.o_proj.weight": np.asarray(attn["wo"]).reshape(layers, n * h, d).transpose(0, 2, 1),
    "mlp.gate_proj.weight": np.asarray(mlp["w_gate"]).transpose(0, 2, 1),
    "mlp.up_proj.weight": np.asarray(mlp["w_up"]).transpose(0, 2, 1),
    "mlp.down_proj.weight": np.asarray(mlp["w_down"]).transpose(0, 2, 1),
    "input_layernorm.weight": np.asarray(blocks["attn_norm"]["scale"]),
    "post_attention_layernorm.weight": np.asarray(blocks["mlp_norm"]["scale"]),
  }
  if m.qkv_bias:
    per_layer["self_attn.q_proj.bias"] = np.asarray(attn["bq"]).reshape(layers, n * h)
    per_layer["self_attn.k_proj.bias"] = np.asarray(attn["bk"]).reshape(layers, k * h)
    per_layer["self_attn.v_proj.bias"] = np.asarray(attn["bv"]).reshape(layers, k * h)
  tensors = {f"model.layers.{i}.{name}": value[i] for name, value in per_layer.items() for i in range(layers)}
  tensors["model.embed_tokens.weight"] = np.asarray(params["embed"])
  tensors["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
  return tensors


def _gpt2_tensors(params: Mapping[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
  layers, _, d, _, _, _, _ = _dims(m)
  blocks = params["blocks"]
  attn, mlp = blocks["attn"], blocks["mlp"]
  c_attn = np.stack([np.asarray(attn[w]) for w in ("wq", "wk", "wv")], axis=2).reshape(layers, d, 3 * d)
  c_attn_bias = np.stack([np.asarray(attn[b]) for b in ("bq", "bk", "bv")], axis=1).reshape(layers, 3 * d)
  per_layer = {
    "ln_1.weight": blocks["attn_norm"]["scale"],
    "ln_1.bias": blocks["attn_norm"]["bias"],
    "attn.c_attn.weight": c_attn,
    "attn.c_attn.bias": c_attn_bias,
    "attn.c_proj.weight": np.asarray(attn["wo"]).reshape(layers, d, d),
    "attn.c_proj.bias": attn["bo"],
    "ln_2.weight": blocks["mlp_norm"]["scale"],
    "ln_2.bias": blocks["mlp_norm"]["bias"],
    "mlp.c_fc.weight": mlp["w_up"],
    "mlp.c_fc.bias": mlp["b_up"],
    "mlp.c_proj.weight": mlp["w_down"],
    "mlp.c_proj.bias": mlp["b_down"],
  }
  tensors = {
    f"transformer.h.{i}.{name}": np.asarray(value)[i] for name, value in per_layer.items() for i in range(layers)
  }
  tensors["transformer.wte.weight"] = np.asarray(params["embed"])
  tensors["transformer.wpe.weight"] = np.asarray(params["pos_embed"])
  tensors["transformer.ln_f.weight"] = np.asarray(params["final_norm"]["scale"])
  tensors["transformer.ln_f.bias"] = np.asarray(params["final_norm"]["bias"])
  return tensors
