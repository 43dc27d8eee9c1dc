"""A checkpoint to evaluate: its config, tokenizer and parameters on a mesh.

`checkpoint_config` reads the config without touching any array (so every input error comes before
a model is loaded); `load_model` then restores the parameters. A loom workdir and a Hugging Face
import (tools/hf_import.py's OUT directory: checkpoints/0, config.py, the tokenizer) load alike.
"""

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

import sharding
from configs import base
from data import tokenizers
from evaluation.metrics import byte_lengths
from model.lora import merge_lora
from model.quantization import quantize_kernels
from model.transformer import CHECKPOINT_INDEPENDENT_FIELDS
from training import init_from
from training import setup as setup_lib
from training.checkpointing import Checkpointer, locate
from training.validation import validate

# The tokenizer files a workdir caches (data/tokenizers.py) and a prepared source keeps (data/datasets.py).
_CACHED = {"sentencepiece": "sp.model", "char": "char_vocab.json"}
_PREPARED = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json", "char": "char_vocab.json"}


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  config: ConfigDict  # The run's config (or the given one, its model the checkpoint's).
  record: dict[str, Any]
  directory: str  # WORKDIR/checkpoints
  step: int

  @property
  def workdir(self) -> str:
    return os.path.dirname(self.directory)


def checkpoint_config(checkpoint: str, config: ConfigDict | None = None) -> CheckpointInfo:
  """The config to evaluate a checkpoint with: its record's (else the workdir's config.json), or
  `config` with the checkpoint's model, of which `config` may change only CHECKPOINT_INDEPENDENT_FIELDS
  (a difference elsewhere is a ValueError naming the fields). Reads no array."""
  directory, step = locate(checkpoint, field="--checkpoint")
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    record = checkpointer.record(step)
  finally:
    checkpointer.close()
  saved = record.get("config")
  config_json = os.path.join(os.path.dirname(directory), "config.json")
  if not saved and os.path.isfile(config_json):
    with open(config_json, encoding="utf-8") as f:
      saved = json.load(f)
  where = f"{directory}/{step}"
  if not saved:
    raise ValueError(f"{where}: its record holds no config and there is no {config_json}; pass --config")
  full = _merged(saved)
  if config is not None:
    given, saved_model = config.to_dict(), full.model.to_dict()
    differences = [
      f"model.{key}: {saved_model[key]!r} in the checkpoint, {value!r} given"
      for key, value in given.get("model", {}).items()
      if key in saved_model
      and key not in CHECKPOINT_INDEPENDENT_FIELDS
      and value != saved_model[key]
      and not (key in ("vocab_size", "num_kv_heads", "head_dim") and value == 0)  # 0: derived, as saved.
    ]
    if differences:
      raise ValueError(
        f"{where}: the given config's model differs from the checkpoint's ({'; '.join(differences)}); "
        "omit --config to use the checkpoint's own"
      )
    model = dict(saved_model, **{k: v for k, v in given.get("model", {}).items() if k in CHECKPOINT_INDEPENDENT_FIELDS})
    full = _merged(dict(given, model=model))
  return CheckpointInfo(config=full, record=record, directory=directory, step=step)


def _merged(values: dict[str, Any]) -> ConfigDict:
  """configs/base.py's config with `values` (a config as JSON) over it, fields base lacks left out."""
  full = base.get_config()
  for key, value in values.items():
    if key not in full:
      continue
    if isinstance(value, dict) and isinstance(full[key], ConfigDict):
      for field, field_value in value.items():
        if key == "data" and field == "sources":
          full.data.sources = ConfigDict({name: base.source(**source) for name, source in field_value.items()})
        elif field in full[key]:
          full[key][field] = field_value
    else:
      full[key] = value
  return full


def tokenizer_path(info: CheckpointInfo) -> str:
  """The file of the run's tokenizer ('' for the byte tokenizer): data.tokenizer_path, a prepared
  source's copy, or the one the run trained and cached in its workdir. Never trains one."""
  data_cfg = info.config.data
  kind = data_cfg.tokenizer
  if kind == "byte":
    return ""
  if data_cfg.tokenizer_path and kind != "char":
    if os.path.isfile(data_cfg.tokenizer_path):
      return data_cfg.tokenizer_path
    kept = os.path.join(info.workdir, "tokenizer", _CACHED.get(kind, ""))  # training/run.py's copy.
    if kind in _CACHED and os.path.isfile(kept):
      return kept
    raise ValueError(f"data.tokenizer_path: the run's tokenizer {data_cfg.tokenizer_path} is not there")
  candidates = [
    os.path.join(source.paths, _PREPARED[kind]) for source in data_cfg.sources.values() if source.kind == "prepared"
  ]
  if kind in _CACHED:
    candidates.append(os.path.join(info.workdir, "tokenizer", _CACHED[kind]))
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(
    f"data.tokenizer={kind}: the run's tokenizer is not there "
    f"(looked for {', '.join(candidates) or 'data.tokenizer_path'})"
  )


def load_tokenizer(info: CheckpointInfo) -> tokenizers.Tokenizer:
  path, kind = tokenizer_path(info), info.config.data.tokenizer
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind == "char":
    return tokenizers.CharTokenizer.load(path)
  if kind == "sentencepiece":
    return tokenizers.SentencePieceTokenizer(path)
  return tokenizers.HuggingFaceTokenizer(path)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A checkpoint's parameters on a mesh, with what scoring and generation need beside them."""

  info: CheckpointInfo
  setup: setup_lib.Setup
  params: nnx.State
  tokenizer: tokenizers.Tokenizer
  byte_lengths: np.ndarray  # [V]: each token id's UTF-8 bytes (evaluation.metrics.byte_lengths).
  graphdef: nnx.GraphDef  # The setup's, or a quantized model's (`quantized`).
  quantization: str = "none"  # Post-training weight quantization: none | model.quantization.KINDS.

  @property
  def config(self) -> ConfigDict:
    return self.setup.config

  @property
  def param_shardings(self):
    return jax.tree.map(lambda array: array.sharding, self.params)

  @property
  def mesh(self):
    return self.setup.mesh


def restore_params(setup: setup_lib.Setup, directory: str, step: int) -> nnx.State:
  """A checkpoint's parameters in the setup's layout; a LoRA run's adapters joined to their base
  (rebuilt from the run's init.checkpoint, which must still be there)."""
  abstract = setup.saved_abstract_state().params
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    params = checkpointer.restore_params(step, abstract)
  except Exception as e:  # noqa: BLE001 -- a damaged or foreign checkpoint: say which, in one line.
    raise ValueError(
      f"{directory}/{step}: its parameters cannot be restored ({type(e).__name__}: {str(e)[:200]})"
    ) from None
  finally:
    checkpointer.close()
  if setup.lora:
    params = init_from.with_base(setup, params)
  return params


def load_model(info: CheckpointInfo, tokenizer: tokenizers.Tokenizer | None = None) -> LoadedModel:
  """Restores the checkpoint's parameters onto config.mesh over this process's devices."""
  tokenizer = tokenizer or load_tokenizer(info)
  config = info.config.copy_and_resolve_references()
  config.train.microbatches = 1
  config.distillation.teacher = ""  # Training's alone: a distilled model evaluates without its teacher.
  setup_lib.use_cpu_devices(config)
  mesh_sizes = list(config.mesh.values())
  if -1 not in mesh_sizes and math.prod(mesh_sizes) != jax.device_count():
    # The run's mesh was for another machine: evaluation is data parallel over the devices here.
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config = validate(config, jax.device_count(), tokenizer_vocab_size=tokenizer.vocab_size)
  setup = setup_lib.build_setup(config)
  params = restore_params(setup, info.directory, info.step)
  lengths = byte_lengths(tokenizer, config.model.vocab_size)
  return LoadedModel(
    info=info, setup=setup, params=params, tokenizer=tokenizer, byte_lengths=lengths, graphdef=setup.graphdef
  )


def quantize_params(graphdef: nnx.GraphDef, params: nnx.State, kind: str, block: int, mesh) -> tuple:
  """Post-training weight quantization: (graphdef, params) of the same model with its block kernels
  stored in `kind` (model/quantization.py; LoRA adapters merged in first), dequantized a layer at a
  time when it runs; laid out on `mesh` by the logical-axis rules."""

  def quantized(params):
    model = nnx.merge(graphdef, params)
    merge_lora(model)
    quantize_kernels(model, kind, block)
    return nnx.split(model)

  quantized_graphdef, abstract = jax.eval_shape(quantized, params)
  shardings = sharding.tree_shardings(abstract, mesh)
  return quantized_graphdef, jax.jit(lambda p: quantized(p)[1], out_shardings=shardings)(params)


def quantized(model: LoadedModel, kind: str, block: int) -> LoadedModel:
  """The loaded model with post-training weight quantization (`quantize_params`)."""
  if kind == "none":
    return model
  graphdef, params = quantize_params(model.graphdef, model.params, kind, block, model.mesh)
  return dataclasses.replace(model, graphdef=graphdef, params=params, quantization=kind)
