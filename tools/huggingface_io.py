"""Hugging Face checkpoint directories <-> loom checkpoints: the file side of model/huggingface.py.

import_hf reads a directory that transformers' save_pretrained wrote
(config.json, model.safetensors or sharded model-*.safetensors with
model.safetensors.index.json, the tokenizer) and writes OUT/checkpoints/0, a
parameters-only loom checkpoint, OUT/config.py, a loom config for the model,
and a copy of the tokenizer. export_hf writes a loom checkpoint back as such a
directory, with the tokenizer and a ChatML chat template matching
data/chat.py, so that transformers' AutoModelForCausalLM and AutoTokenizer load it.

Weights are read from safetensors only. PyTorch's .bin/.pt files are pickles,
and unpickling runs whatever code the file holds, so a directory that has only
those is refused and never opened.
"""

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so safetensors' numpy API reads bf16 shards.
import numpy as np
import sentencepiece as spm
from absl import logging
from flax import nnx
from ml_collections import ConfigDict
from safetensors.numpy import load_file, save_file

from configs import base
from data.files import DirectoryTaken, atomic_copy, atomic_directory, atomic_write, writable_directory
from model import huggingface
from model.transformer import CHECKPOINT_INDEPENDENT_FIELDS
from training.checkpointing import Checkpointer, locate
from training.state import abstract_model
from version import __version__

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files of a tokenizer that travel with the weights, both ways.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# --- Reading a Hugging Face directory.


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{hf_dir} has no config.json; a Hugging Face model directory (save_pretrained) is expected")
  return _read_json(path)


def safetensors_files(hf_dir: str) -> list[str]:
  """The weight files of `hf_dir`: the index's shards, model.safetensors, or every *.safetensors.

  Refuses a directory whose weights are only pickles, without opening them.
  """
  if not os.path.isdir(hf_dir):
    raise ValueError(f"{hf_dir} is not a directory")
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path}: no 'weight_map' object naming each tensor's shard")
    files = [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ValueError(f"{index_path} names shards that are not there: {', '.join(missing[:3])}")
    return files
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if files:
    return files
  pickles = sorted(os.path.basename(p) for pattern in PICKLE_PATTERNS for p in glob.glob(os.path.join(hf_dir, pattern)))
  if pickles:
    raise ValueError(
      f"{hf_dir} has PyTorch pickle weights only ({', '.join(pickles[:3])}); loom reads safetensors "
      "and never unpickles a file (loading a pickle runs any code it holds). Convert it where you "
      "trust it, e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
      "safe_serialization=True), and import that"
    )
  raise ValueError(f"{hf_dir} has no model.safetensors, {INDEX_FILE} or *.safetensors file")


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors shards, by name (numpy, the stored dtype)."""
  tensors: dict[str, np.ndarray] = {}
  for path in safetensors_files(hf_dir):
    try:
      shard = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged file.
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    repeated = sorted(set(shard) & set(tensors))
    if repeated:
      raise ValueError(f"{path}: tensor {repeated[0]} is in another shard too")
    tensors.update(shard)
  return tensors


# --- Import.


def import_hf(hf_dir: str, out_dir: str) -> tuple[ConfigDict, dict[str, Any]]:
  """Converts a Hugging Face model directory into a loom checkpoint, config and tokenizer under `out_dir`.

  Writes OUT/checkpoints/0 (parameters only; its record holds the loom config,
  the source directory, its config.json and loom's version), OUT/config.py
  and the tokenizer files. Returns the loom config and the parameters (loom's
  pure dict of float32 numpy arrays).

  `out_dir` must be new or an empty directory outside `hf_dir` (checked, with
  a ValueError naming --output, before any weight is read). Everything is
  written into a temporary sibling directory that is renamed to `out_dir` at
  the end, so a failed import leaves no `out_dir` behind.
  """
  hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
  files = safetensors_files(hf_dir)  # First: a pickle-only directory is refused before anything else.
  hf_cfg = read_hf_config(hf_dir)
  try:
    fields = huggingface.loom_model_config(hf_cfg)
  except ValueError as e:
    raise ValueError(f"{os.path.join(hf_dir, 'config.json')}: {e}") from None
  check_output_dir(out_dir, "--output", within=(("--hf_dir", hf_dir),))

  config = base.get_config()
  config.model.update(**fields)
  config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
  try:
    params = huggingface.params_from_hf(read_safetensors(hf_dir), config.model)
  except ValueError as e:
    raise ValueError(f"{hf_dir}: {e}") from None

  tokenizer = _hf_tokenizer(hf_dir)
  if tokenizer:  # The paths a run reads: out_dir's, where the files are once the import is complete.
    config.data.update(tokenizer=tokenizer[0], tokenizer_path=os.path.join(out_dir, tokenizer[1]))
  if "init" in config:
    config.init.checkpoint = out_dir
  record = {
    "step": 0,
    "config": json.loads(config.to_json()),
    "loom_version": __version__,
    "imported_from": {"path": hf_dir, "files": [os.path.basename(f) for f in files], "hf_config": hf_cfg},
  }

  with output_directory(out_dir, "--output") as directory:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(hf_dir, name)):
        atomic_copy(os.path.join(hf_dir, name), os.path.join(directory, name))
    save_params(os.path.join(directory, "checkpoints"), config.model, params, record)
    _write_config_py(os.path.join(directory, "config.py"), fields, config, tokenizer, hf_dir)
  return config, params


def _hf_tokenizer(hf_dir: str) -> tuple[str, str] | None:
  """(data.tokenizer, file name) of the tokenizer that `hf_dir` holds, for loom; None when there is none.

  A sentencepiece tokenizer.model (Llama 2, Mistral) is preferred to a
  tokenizer.json, since loom then tokenizes with sentencepiece itself.
  """
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
    return "sentencepiece", "tokenizer.model"
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    return "huggingface", "tokenizer.json"
  return None


def check_output_dir(out_dir: str, flag: str, within: tuple[tuple[str, str], ...] = ()) -> None:
  """Refuses, in one line naming `flag`, an output directory a converter must not write into.

  Allowed: a path that does not exist yet (its nearest existing ancestor must let
  us create directories) or an empty directory, not equal to or inside any of
  `within`'s (flag, directory) pairs. A non-empty directory is refused: files
  of an earlier run left beside the new ones would be read with them.
  """
  path = os.path.abspath(out_dir)
  real = os.path.realpath(path)
  for label, other in within:  # label: a flag ("--hf_dir") or a description.
    other = os.path.realpath(other)
    if real == other or real.startswith(other.rstrip(os.sep) + os.sep):
      named = f"{label}={other}" if label.startswith("--") else f"{label} {other}"
      raise ValueError(
        f"{flag}={path} is {'the same directory as' if real == other else 'inside'} "
        f"{named}; choose a new or empty directory outside it"
      )
  if os.path.exists(real) and not os.path.isdir(real):
    raise ValueError(f"{flag}={path} is a file; a new or empty directory is expected")
  if os.path.isdir(real):
    contents = sorted(os.listdir(real))
    if contents:
      shown = ", ".join(contents[:4]) + (f" and {len(contents) - 4} more" if len(contents) > 4 else "")
      what = (
        " (a loom workdir or checkpoint directory)"
        if "checkpoints" in contents or any(name.isdigit() for name in contents)
        else ""
      )
      raise ValueError(
        f"{flag}={path} is not empty{what}: it holds {shown}; a new or empty directory "
        "is expected, so nothing stale is mixed with what is written"
      )
  ancestor = os.path.dirname(real)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ValueError(f"{flag}={path}: {ancestor} is a file, so no directory can be created under it")
  try:
    writable_directory(ancestor)
  except OSError as e:
    raise ValueError(
      f"{flag}={path}: cannot create a directory in {ancestor} ({e.strerror or e}); choose a writable location"
    ) from None


@contextlib.contextmanager
def output_directory(out_dir: str, flag: str) -> Iterator[str]:
  """data.files.atomic_directory for `out_dir`, with a taken place reported in one line naming `flag`."""
  try:
    with atomic_directory(out_dir) as temporary:
      yield temporary
  except DirectoryTaken as e:
    raise ValueError(f"{flag}={out_dir}: {e.strerror}") from None


def save_params(directory: str, model_cfg: ConfigDict, params: Mapping[str, Any], record: dict[str, Any]) -> None:
  """A parameters-only checkpoint at step 0, in the nnx.State structure training restores."""
  _, state = abstract_model(model_cfg)
  host = _host_device()
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda value: jax.device_put(value, host), params))
  checkpointer = Checkpointer(directory, async_save=False)
  checkpointer.save_params(0, state, record)
  checkpointer.close()


def _write_config_py(
  path: str, fields: dict[str, Any], config: ConfigDict, tokenizer: tuple[str, str] | None, hf_dir: str
) -> None:
  model_lines = ",\n".join(f"      {key}={value!r}" for key, value in fields.items())
  lines = [
    f'"""loom config for the Hugging Face model imported from {hf_dir} (loom {__version__}).',
    "",
    "Its parameters are checkpoints/0 beside this file; a run starts from them with",
    "  python train.py --config=THIS_FILE --workdir=... (init.checkpoint is set below)",
    '"""',
    "import os",
    "",
    "from configs import base",
    "",
    "HERE = os.path.dirname(os.path.abspath(__file__))",
    "",
    "",
    "def get_config():",
    "  config = base.get_config()",
    f"  config.model.update(\n{model_lines})",
  ]
  if config.data.seq_len != base.get_config().data.seq_len:
    lines.append(f"  config.data.seq_len = {config.data.seq_len}")
  if tokenizer:
    lines.append(
      f"  config.data.update(tokenizer={tokenizer[0]!r}, tokenizer_path=os.path.join(HERE, {tokenizer[1]!r}))"
    )
  else:
    lines.append(f"  # {hf_dir} has no tokenizer.model or tokenizer.json: set data.tokenizer_path.")
  if "init" in config:
    lines.append("  config.init.checkpoint = HERE")
  lines.append("  return config")
  with atomic_write(path) as f:
    f.write("\n".join(lines) + "\n")


# --- Export.


def checkpoint_config(
  checkpoint: str, config: ConfigDict | Mapping[str, Any] | None = None
) -> tuple[ConfigDict, dict[str, Any]]:
  """(the full loom config of a checkpoint, its record), read without touching the arrays.

  The config is the one in the checkpoint's record, overlaid with `config`'s
  model and data fields when given (a config file's unset fields, such as
  vocab_size=0, keep the record's values).
  """
  directory, step = locate(checkpoint)
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    record = checkpointer.record(step)
  finally:
    checkpointer.close()
  return _full_config(config, record.get("config"), f"{directory}/{step}"), record


def load_params(checkpoint: str, model_cfg: ConfigDict) -> dict[str, Any]:
  """A checkpoint's parameters as loom's pure dict of numpy arrays, restored into host memory."""
  directory, step = locate(checkpoint)
  _, abstract = abstract_model(model_cfg)
  host = jax.sharding.SingleDeviceSharding(_host_device())
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=host), abstract)
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    params = checkpointer.restore_params(step, abstract)
  finally:
    checkpointer.close()
  return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(params)))


def _host_device() -> jax.Device:
  """The CPU: converting a model must not need room for it in accelerator memory."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu.
    return jax.local_devices()[0]


# A config file's values that mean "not set here": derived at run time, so the record's value stands.
_UNSET = {"model": {"vocab_size": 0, "num_kv_heads": 0, "head_dim": 0}, "data": {"tokenizer_path": ""}}


def _model_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """'field: saved X vs given Y' for each model field of `given` that `saved` sets otherwise.

  The fields left 0 for their defaults compare by what they stand for: num_kv_heads
  and head_dim as num_heads and embed_dim // num_heads, vocab_size (the
  tokenizer's size) not at all.
  """

  def effective(m: Mapping[str, Any], other: Mapping[str, Any], key: str) -> Any:
    value = m.get(key)
    heads = m.get("num_heads") or other.get("num_heads")
    if key == "num_kv_heads" and value == 0:
      return heads
    if key == "head_dim" and value == 0 and heads:
      return (m.get("embed_dim") or other.get("embed_dim") or 0) // heads
    return value

  differences = []
  for key in given:
    if key not in saved or key in CHECKPOINT_INDEPENDENT_FIELDS or (key == "vocab_size" and given[key] == 0):
      continue
    ours, theirs = effective(saved, given, key), effective(given, saved, key)
    if ours != theirs:
      derived = {"num_kv_heads": " (0: num_heads)", "head_dim": " (0: embed_dim // num_heads)"}
      note = derived[key] if given[key] == 0 and key in derived else ""
      differences.append(f"{key}: saved {ours!r} vs given {theirs!r}{note}")
  return differences


def _full_config(config, saved: Mapping[str, Any] | None, where: str) -> ConfigDict:
  """configs/base.py's config with the model and data fields of the record's config, then `config`'s.

  Raises ValueError when `config`'s model fields differ from the record's (its
  parameters would not fit that model), naming each field.
  """
  if config is None and not saved:
    raise ValueError(
      f"{where}: the checkpoint's record has no config; pass --config=the .py config file the run was started with"
    )
  given = config.to_dict() if isinstance(config, ConfigDict) else config
  saved_model, given_model = dict((saved or {}).get("model") or {}), dict((given or {}).get("model") or {})
  differences = _model_differences(saved_model, given_model)
  if differences:
    raise ValueError(
      f"{where}: the given config's model differs from the one the checkpoint was saved "
      f"with ({'; '.join(differences)}); omit --config to use the checkpoint's own, or "
      "pass the .py config the run was started with"
    )
  full = base.get_config()
  for source in (saved, given):
    for section in ("model", "data"):
      values = {
        key: value
        for key, value in dict((source or {}).get(section) or {}).items()
        if key in full[section] and key != "sources"
      }
      if source is given:
        values = {
          key: value for key, value in values.items() if not (key in _UNSET[section] and value == _UNSET[section][key])
        }
      full[section].update(values)
  m = full.model
  if not m.vocab_size:
    raise ValueError(
      f"{where}: model.vocab_size is 0 and the checkpoint's record does not say it; "
      "pass it with the run's config, e.g. --config=RUN_CONFIG.py "
      "--config.model.vocab_size=N (the run's tokenizer size)"
    )
  m.num_kv_heads = m.num_kv_heads or m.num_heads
  m.head_dim = m.head_dim or m.embed_dim // m.num_heads
  return full


def export_hf(
  checkpoint: str,
  config: ConfigDict | Mapping[str, Any] | None,
  out_dir: str,
  model_type: str,
  dtype: str = "float32",
  params: Mapping[str, Any] | None = None,
) -> list[str]:
  """Writes a loom checkpoint as a Hugging Face directory; returns the paths written.

  `checkpoint` is a workdir (its latest step), its checkpoints/ directory or one
  checkpoints/STEP; `config` the run's config (None: the one in the checkpoint's
  record). Writes config.json, model.safetensors (`dtype`: float32, bfloat16 or
  float16), generation_config.json, and the tokenizer: tokenizer.model (a
  sentencepiece model) or tokenizer.json, with tokenizer_config.json carrying
  the special tokens and the ChatML chat_template. Raises ValueError, before
  reading any array, when the model is not of `model_type`'s family, when
  `config`'s model differs from the checkpoint's, or when `out_dir` is not a
  new or empty directory outside the checkpoints. The files are written into
  a temporary sibling directory renamed to `out_dir` at the end.

  `params` (loom's pure dict) are written instead of the checkpoint's own: tools/lora.py passes a LoRA
  run's base, which its checkpoint (the adapters alone) does not hold. Without them a LoRA run's
  checkpoint is refused, pointing at tools/lora.py.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(EXPORT_DTYPES)}")
  out_dir = os.path.abspath(out_dir)
  directory, _ = locate(checkpoint)
  check_output_dir(out_dir, "--output", within=(("the run's checkpoint directory", directory),))
  full, record = checkpoint_config(checkpoint, config)
  if params is None and ((record.get("config") or {}).get("lora") or {}).get("rank", 0) > 0:
    raise ValueError(
      f"{checkpoint} is a LoRA run's checkpoint, which holds its adapters alone: export the merged model "
      "(tools/lora.py merge, then this) or the adapters for PEFT (tools/lora.py export_peft)"
    )
  hf_cfg = huggingface.hf_config(full.model, model_type)
  workdir = os.path.dirname(directory)
  _check_tokenizer_path(full.data)
  if params is None:
    params = load_params(checkpoint, full.model)
  tensors = huggingface.hf_tensors(params, full.model, model_type)
  tensors = {name: np.ascontiguousarray(value.astype(EXPORT_DTYPES[dtype])) for name, value in tensors.items()}

  written: list[str] = []
  with output_directory(out_dir, "--output") as target:
    tokens = _write_tokenizer(full.data, workdir, target, full.model.max_seq_len, written)
    hf_cfg.update(
      torch_dtype=dtype,
      bos_token_id=tokens.get("bos_id"),
      eos_token_id=tokens.get("eos_id"),
      pad_token_id=tokens.get("pad_id"),
    )
    weights = os.path.join(target, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})  # transformers reads "pt" as torch layout.
    written.append(weights)
    written.append(_write_json(os.path.join(target, "config.json"), hf_cfg))
    generation = {
      key: value
      for key, value in (
        ("bos_token_id", tokens.get("bos_id")),
        ("eos_token_id", tokens.get("eos_id")),
        ("pad_token_id", tokens.get("pad_id")),
      )
      if value is not None
    }
    written.append(_write_json(os.path.join(target, "generation_config.json"), generation))
  return [os.path.join(out_dir, os.path.relpath(path, target)) for path in written]


def chatml_template() -> str:
  """data/chat.py's rendering as the Jinja template that transformers' apply_chat_template runs.

  The bos token, then <|im_start|>{role}\\n{content}<|im_end|>\\n per message; with
  add_generation_prompt, the header of the assistant's reply.
  """
  # Imported here: the data package loads TensorFlow, which only an export with a tokenizer needs.
  from data.special_tokens import IM_END, IM_START

  return (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
  )


def _check_tokenizer_path(data_cfg: ConfigDict) -> None:
  kind, path = data_cfg.tokenizer, data_cfg.tokenizer_path
  if kind in ("sentencepiece", "huggingface") and path and not os.path.isfile(path):
    raise ValueError(f"data.tokenizer_path: the run's tokenizer {path} is not there")


def _write_tokenizer(
  data_cfg: ConfigDict, workdir: str, out_dir: str, max_length: int, written: list[str]
) -> dict[str, int]:
  """Writes the run's tokenizer with a tokenizer_config.json; returns its {'bos_id': ..., ...}.

  Without one (a char tokenizer, or none found) only the weights are written, with a warning.
  """
  kind, path = data_cfg.tokenizer, data_cfg.tokenizer_path
  _check_tokenizer_path(data_cfg)
  if kind == "sentencepiece" and not path:
    path = os.path.join(workdir, "tokenizer", "sp.model")  # Trained by the run, cached there.
    if not os.path.isfile(path):
      logging.warning("no tokenizer exported: data.tokenizer_path is empty and %s is not there", path)
      return {}
  if kind == "sentencepiece":
    tokenizer_cfg, specials = _sentencepiece_files(path, out_dir, written)
  elif kind == "huggingface":
    tokenizer_cfg, specials = _tokenizer_json_files(path, out_dir, written)
  elif kind == "byte":
    tokenizer_cfg, specials = _byte_tokenizer_files(out_dir, written)
  else:
    logging.warning("no tokenizer exported: data.tokenizer=%s has no Hugging Face form", kind)
    return {}
  for role, (name, _) in specials.items():
    tokenizer_cfg[f"{role}_token"] = name
  tokenizer_cfg.update(chat_template=chatml_template(), model_max_length=max_length)
  written.append(_write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_cfg))
  return {f"{role}_id": token_id for role, (_, token_id) in specials.items() if role != "unk"}


# What each writer returns: tokenizer_config.json's settings, and {role: (token, id)} of its
# bos / eos / pad / unk tokens.
_Specials = dict[str, tuple[str, int]]


def _sentencepiece_files(path: str, out_dir: str, written: list[str]) -> tuple[dict[str, Any], _Specials]:
  sp = spm.SentencePieceProcessor(model_file=path)
  specials = {
    role: (sp.id_to_piece(token_id), token_id)
    for role, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))
    if token_id >= 0
  }
  written.append(atomic_copy(path, os.path.join(out_dir, "tokenizer.model")))
  # loom's sentencepiece models keep text as is (no dummy prefix, identity normalisation), which
  # LlamaTokenizer reproduces with legacy=False and add_prefix_space=False.
  return {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": False,
    "add_prefix_space": False,
    "add_bos_token": "bos" in specials,
    "add_eos_token": False,
  }, specials


def _tokenizer_json_files(path: str, out_dir: str, written: list[str]) -> tuple[dict[str, Any], _Specials]:
  from data.tokenizers import HuggingFaceTokenizer  # See chatml_template.

  tokenizer = HuggingFaceTokenizer(path)
  specials = {
    role: (tokenizer.id_to_token(token_id), token_id)
    for role, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))
    if token_id is not None
  }
  written.append(atomic_copy(path, os.path.join(out_dir, "tokenizer.json")))
  # The settings transformers saved beside it (added tokens, class) stay; the template is loom's.
  beside = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.isfile(beside):
    return _read_json(beside), specials
  return {"tokenizer_class": "PreTrainedTokenizerFast"}, specials


def _byte_tokenizer_files(out_dir: str, written: list[str]) -> tuple[dict[str, Any], _Specials]:
  """data.tokenizers.ByteTokenizer as a tokenizer.json: pad/bos/eos at 0..2, then byte b at b + 3.

  A byte-level BPE without merges gives one token per byte. The one difference:
  transformers matches the literal texts '<pad>', '<s>' and '</s>' as those
  tokens, where loom spells them out in bytes.
  """
  import tokenizers  # Only this writer needs it; loom's own byte tokenizer does not.

  from data import special_tokens
  from data.tokenizers import ByteTokenizer

  loom = ByteTokenizer()
  specials = {
    "pad": (special_tokens.PAD, loom.pad_id),
    "bos": (special_tokens.BOS, loom.bos_id),
    "eos": (special_tokens.EOS, loom.eos_id),
  }
  offset = int(loom.encode_batch(["\0"])[0][0])  # The id of byte 0.
  vocab = {name: token_id for name, token_id in specials.values()}
  vocab.update({char: byte + offset for byte, char in _byte_level_chars().items()})
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.add_special_tokens([tokenizers.AddedToken(name, special=True) for name, _ in specials.values()])
  target = os.path.join(out_dir, "tokenizer.json")
  tokenizer.save(target)
  written.append(target)
  return {"tokenizer_class": "PreTrainedTokenizerFast"}, specials


def _byte_level_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which tokenizers' ByteLevel pre-tokenizer maps bytes with."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("\u00a1"), ord("\u00ac") + 1),
    *range(ord("\u00ae"), ord("\u00ff") + 1),
  ]
  chars = {byte: chr(byte) for byte in printable}
  others = [byte for byte in range(256) if byte not in chars]
  chars.update({byte: chr(256 + i) for i, byte in enumerate(others)})
  return chars


# --- Files.


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value


def _write_json(path: str, value: dict[str, Any]) -> str:
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")
  return path
