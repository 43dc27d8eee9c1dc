"""A LoRA run's checkpoint -> a merged loom checkpoint, or a PEFT adapter for Hugging Face.

  python tools/lora.py merge --checkpoint=/runs/lora --output=/ckpt/merged
  python tools/lora.py export_peft --checkpoint=/runs/lora --output=/models/adapter --base_output=/models/base

A LoRA run's checkpoints hold its adapters alone; the frozen base they were trained on is rebuilt as
the run built it (its init.checkpoint cast to lora.base_dtype or quantized, model/lora.py), which must
still be there.

`merge` folds the adapters into the kernels (W + (alpha / rank) A B, float32) and writes OUTPUT/checkpoints/0,
a parameters-only checkpoint of the plain model whose record's config is the run's with lora.rank=0 and
init cleared: init.checkpoint, tools/generate.py, tools/evaluate.py and tools/hf_export.py read it like
any other (a tokenizer the run cached in its workdir is copied beside it).

`export_peft` writes a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that
peft.PeftModel.from_pretrained applies to the Hugging Face form of the base; --base_output also writes
that base (tools/huggingface_io.export_hf), as the run held it: the base_dtype-rounded or dequantized
kernels, in float32. Llama-style models only (llama, mistral, qwen2): GPT-2 fuses q, k and v into one
Conv1D (c_attn), which loom's three adapters do not map onto as one PEFT adapter; merge such a run instead.
Parameters trained in full beside the adapters (lora.train_full) are written as PEFT's modules_to_save:
every Hugging Face module they map onto, whole (a module's frozen tensors too), under the adapter's
prefix; --base_output holds their values from before the run. A tied embedding in lora.train_full is
refused (PEFT would copy embed_tokens and leave the tied lm_head on the old rows): merge such a run.

OUTPUT (and BASE_OUTPUT) must be new or empty directories; the files are written beside them and moved
into place at the end, so a failed command leaves nothing behind.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from configs import base  # noqa: E402
from data.files import atomic_copy, atomic_write  # noqa: E402
from evaluation import loading  # noqa: E402
from model import huggingface  # noqa: E402
from model.lora import adapters, merge_lora  # noqa: E402
from tools import huggingface_io  # noqa: E402
from training import init_from  # noqa: E402
from training import setup as setup_lib  # noqa: E402
from training.checkpointing import Checkpointer, locate  # noqa: E402
from training.cli import parse_flags  # noqa: E402
from training.state import abstract_model  # noqa: E402
from version import __version__  # noqa: E402

COMMANDS = ("merge", "export_peft")

# loom's adaptable kernels -> the Hugging Face Llama modules they are (model/huggingface.py's mapping):
# PEFT's target_modules name the last part, its weight keys the whole path under the decoder layer.
PEFT_MODULES = {
  "blocks/attn/wq": "self_attn.q_proj",
  "blocks/attn/wk": "self_attn.k_proj",
  "blocks/attn/wv": "self_attn.v_proj",
  "blocks/attn/wo": "self_attn.o_proj",
  "blocks/mlp/w_gate": "mlp.gate_proj",
  "blocks/mlp/w_up": "mlp.up_proj",
  "blocks/mlp/w_down": "mlp.down_proj",
}
PEFT_MODEL_TYPES = huggingface.LLAMA_TYPES
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Where PEFT's save_pretrained puts a causal LM's decoder layers (PeftModelForCausalLM -> LoraModel ->
# LlamaForCausalLM -> LlamaModel), the adapter's name left out.
PEFT_PREFIX = "base_model.model.model.layers"
# ...and the causal LM itself: a modules_to_save module's tensors are saved under it by their
# Hugging Face names ("model.embed_tokens.weight"), without "modules_to_save.<adapter name>".
PEFT_MODEL_PREFIX = "base_model.model"


def lora_checkpoint(checkpoint: str, step: int = -1, field: str = "--checkpoint") -> loading.CheckpointInfo:
  """The config and record of a LoRA run's checkpoint (a workdir, its checkpoints/ or one STEP), read
  without touching any array; a ValueError naming `field` for a checkpoint that is not a LoRA run's."""
  directory, step = locate(checkpoint, step, field=field)
  info = loading.checkpoint_config(os.path.join(directory, str(step)))
  if info.config.lora.rank <= 0:
    raise ValueError(
      f"{field}: {directory}/{step} is not a LoRA run's checkpoint (its config has lora.rank="
      f"{info.config.lora.rank}): it holds the whole model already; use it as it is"
    )
  return info


def _host_device() -> jax.Device:
  """The CPU: merging or exporting a model must not need room for it in accelerator memory."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu.
    return jax.local_devices()[0]


def _host_setup(info: loading.CheckpointInfo) -> setup_lib.Setup:
  """The run's setup on one host device. The record's config is already validated (its vocab_size is
  set); the data it names is not needed, so it is not validated again (it may be gone)."""
  config = info.config.copy_and_resolve_references()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.train.microbatches = 1
  config.model.attention = "auto"  # No attention runs here; a cudnn run's config must not refuse the CPU.
  return setup_lib.build_setup(config, devices=[_host_device()])


def lora_params(info: loading.CheckpointInfo, with_base: bool = True) -> tuple[setup_lib.Setup, nnx.State]:
  """(the run's setup on the host, its parameters): the checkpoint's adapters, with the frozen base
  rebuilt as the run built it when `with_base` (the adapters alone otherwise)."""
  setup = _host_setup(info)
  if with_base:
    return setup, loading.restore_params(setup, info.directory, info.step)
  checkpointer = Checkpointer(info.directory, async_save=False, read_only=True)
  try:
    params = checkpointer.restore_params(info.step, setup.saved_abstract_state().params)
  except Exception as e:  # noqa: BLE001 -- a damaged or foreign checkpoint: say which, in one line.
    raise ValueError(
      f"{info.directory}/{info.step}: its adapters cannot be restored ({type(e).__name__}: {str(e)[:200]})"
    ) from None
  finally:
    checkpointer.close()
  return setup, params


def plain_params(setup: setup_lib.Setup, params: nnx.State, with_adapters: bool = True) -> dict[str, Any]:
  """The plain model's parameters (loom's pure dict of float32 numpy arrays) from a LoRA run's full
  ones: every adapter folded into its kernel (model.lora.merge_lora), or, without adapters, the base
  alone as the run held it (a quantized kernel dequantized, a bfloat16 one widened exactly)."""
  model = nnx.merge(setup.graphdef, params)
  if not with_adapters:
    for adapter in adapters(model).values():  # B = 0: the merge adds exactly nothing.
      adapter.b[...] = jnp.zeros_like(adapter.b[...])
  merge_lora(model, jnp.float32)
  merged = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), nnx.to_pure_dict(nnx.state(model)))
  _, plain = abstract_model(setup.config.model)
  expected = jax.tree_util.tree_structure(nnx.to_pure_dict(plain))
  if jax.tree_util.tree_structure(merged) != expected:  # An adapter left unmerged, or a kernel type not handled.
    raise ValueError(f"the merged parameters do not have the plain model's structure ({expected})")
  return merged


def _lora_summary(info: loading.CheckpointInfo) -> dict[str, Any]:
  return {
    "checkpoint": f"{info.directory}/{info.step}",
    "step": int(info.record.get("step", info.step)),
    "base": info.config.init.checkpoint or f"the initialisation of seed {info.config.seed}",
    "lora": info.config.lora.to_dict(),
  }


def merge_checkpoint(checkpoint: str, out_dir: str, step: int = -1) -> str:
  """Writes the merged model of a LoRA run's checkpoint as OUT/checkpoints/0; returns that directory.

  The parameters are float32: every kernel W + (alpha / rank) A B (a quantized base dequantized
  first), the rest of the base as the run held it. The record's config is the run's with lora.rank=0
  and init cleared, and `merged_from` says what was merged. A tokenizer the run cached in its workdir
  (a trained sentencepiece or char vocabulary) is copied to OUT/tokenizer/, where readers of a workdir
  look. Raises ValueError (one line) for a checkpoint that is not a LoRA run's or an `out_dir` that is
  not new or empty, before anything is loaded.
  """
  out_dir = os.path.abspath(out_dir)
  info = lora_checkpoint(checkpoint, step)
  huggingface_io.check_output_dir(out_dir, "--output", within=(("the run's checkpoint directory", info.directory),))
  setup, params = lora_params(info)
  merged = plain_params(setup, params)

  config = info.config.copy_and_resolve_references()
  config.lora.rank = 0
  config.init = base.get_config().init
  record = {
    "step": 0,
    "config": json.loads(config.to_json()),
    "loom_version": __version__,
    "merged_from": _lora_summary(info),
  }
  cached = _cached_tokenizer(info)
  with huggingface_io.output_directory(out_dir, "--output") as directory:
    if cached:
      atomic_copy(cached, os.path.join(directory, "tokenizer", os.path.basename(cached)))
    huggingface_io.save_params(os.path.join(directory, "checkpoints"), setup.config.model, merged, record)
  return os.path.join(out_dir, "checkpoints", "0")


def _cached_tokenizer(info: loading.CheckpointInfo) -> str | None:
  """The tokenizer file the run cached in its own workdir (so a merged checkpoint elsewhere needs a
  copy), or None: a byte tokenizer, one named by a path the config keeps, or none found."""
  try:
    path = loading.tokenizer_path(info)
  except ValueError as e:
    logging.warning("no tokenizer copied: %s", e)
    return None
  cache = os.path.join(info.workdir, "tokenizer") + os.sep
  return path if path and path.startswith(cache) else None


def peft_tensors(adapter_params: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(adapter_model.safetensors' tensors, PEFT's target_modules) from loom's adapters (a pure dict
  with blocks/attn/lora_wq/{a, b}, ...).

  loom's adapter is x A B with A [layers, *in, r], B [layers, r, *out]; PEFT's is x lora_A^T lora_B^T
  with lora_A [r, in], lora_B [out, r]. The kernels' *in and *out flatten in model/huggingface.py's
  order (q_proj's output is heads-major, o_proj's input too), and loom's rotary embeddings use the
  Hugging Face rotate-half layout, so no q/k permutation applies to either side.
  """
  tensors, targets = {}, []
  for path, hf_module in PEFT_MODULES.items():
    _, module_name, name = path.split("/")
    adapter = adapter_params.get("blocks", {}).get(module_name, {}).get(f"lora_{name}")
    if adapter is None:
      continue
    a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
    layers, rank = a.shape[0], a.shape[-1]
    a_LIR, b_LRO = a.reshape(layers, -1, rank), b.reshape(layers, rank, -1)
    for layer in range(layers):
      prefix = f"{PEFT_PREFIX}.{layer}.{hf_module}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_LIR[layer].T)  # [r, in]
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_LRO[layer].T)  # [out, r]
    targets.append(hf_module.split(".")[-1])
  return tensors, targets


def full_parameter_paths(trained: dict[str, Any]) -> list[str]:
  """The paths of the parameters lora.train_full trained in full, in a LoRA run's saved parameters (a
  pure dict): every leaf that is not an adapter's."""
  flat = jax.tree_util.tree_flatten_with_path(trained)[0]
  names = [[str(k.key) for k in path] for path, _ in flat]
  return ["/".join(n) for n in names if not any(part.startswith("lora_") for part in n)]


def peft_modules_to_save(
  model_cfg: ConfigDict, current: dict[str, Any], full: list[str], model_type: str
) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the modules_to_save tensors of adapter_model.safetensors, PEFT's modules_to_save) for the
  parameters at `full` paths, from `current` (the plain model's pure dict holding their trained values).

  Which Hugging Face tensors a loom parameter becomes is read from model/huggingface.py's mapping itself:
  hf_tensors of a tree that is 1 at those parameters and 0 elsewhere (the mapping only reshapes and
  transposes) is nonzero exactly there. PEFT replaces a module in modules_to_save whole, so every tensor
  of those modules is written, a frozen one (a weight whose bias alone trained) at its base value.
  """
  full_set = set(full)

  def marker(path, leaf):
    name = "/".join(str(k.key) for k in path)
    return np.full(np.shape(leaf), 1.0 if name in full_set else 0.0, np.float32)

  marked = huggingface.hf_tensors(jax.tree_util.tree_map_with_path(marker, current), model_cfg, model_type)
  modules = sorted({name.rsplit(".", 1)[0] for name, value in marked.items() if np.any(value)})
  tensors = huggingface.hf_tensors(current, model_cfg, model_type)
  saved = {
    f"{PEFT_MODEL_PREFIX}.{name}": np.ascontiguousarray(value, np.float32)
    for name, value in tensors.items()
    if name.rsplit(".", 1)[0] in modules
  }
  return saved, modules


def _initial_params(setup: setup_lib.Setup) -> nnx.State:
  """A LoRA run's parameters as it began (its init.checkpoint adapted, or the seed's initialisation):
  what a base with parameters trained in full is exported from."""
  if setup.config.init.checkpoint:
    return init_from.initial_state(setup.config.init, setup)[0].params
  return setup.init_state().params


def peft_config(
  lora_cfg: ConfigDict, targets: list[str], base_model_name_or_path: str, modules_to_save: list[str] | None = None
) -> dict[str, Any]:
  """adapter_config.json: PEFT's scale is lora_alpha / r, as loom's alpha / rank. `modules_to_save`:
  whole Hugging Face module names (matched by PEFT as name suffixes, so never ambiguous)."""
  alpha = float(lora_cfg.alpha)
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": int(lora_cfg.rank),
    "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
    "lora_dropout": float(lora_cfg.dropout),
    "target_modules": targets,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": modules_to_save or None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "revision": None,
  }


def _imported_from(info: loading.CheckpointInfo) -> str:
  """The Hugging Face directory the run's base was imported from (tools/hf_import.py), or ''."""
  if not info.config.init.checkpoint:
    return ""
  try:
    directory, step = locate(info.config.init.checkpoint, info.config.init.step, field="init.checkpoint")
    reader = Checkpointer(directory, async_save=False, read_only=True)
    try:
      return (reader.record(step).get("imported_from") or {}).get("path", "")
    finally:
      reader.close()
  except ValueError:
    return ""


def export_peft(
  checkpoint: str,
  out_dir: str,
  base_out_dir: str | None = None,
  model_type: str = "llama",
  step: int = -1,
  base_model_name_or_path: str | None = None,
) -> list[str]:
  """Writes a LoRA run's adapters as a PEFT adapter directory; with `base_out_dir`, also the Hugging Face
  form of the base they apply to. Returns the paths written.

  base_model_name_or_path (adapter_config.json) defaults to `base_out_dir`, else to the Hugging Face
  directory the base was imported from, else ''. Raises ValueError, before anything is loaded, for a
  checkpoint that is not a LoRA run's, a model that is not llama-style or not of `model_type`, or an
  output directory that is not new or empty.
  """
  if model_type not in PEFT_MODEL_TYPES:
    raise ValueError(f"--model_type={model_type!r}: PEFT export supports {', '.join(PEFT_MODEL_TYPES)}")
  out_dir = os.path.abspath(out_dir)
  base_out_dir = os.path.abspath(base_out_dir) if base_out_dir else None
  info = lora_checkpoint(checkpoint, step)
  model_cfg = info.config.model
  if model_cfg.position != "rope":
    raise ValueError(
      f"model.position={model_cfg.position!r}: the run's model is GPT-2-style, whose q, k and v are one fused "
      "Conv1D (c_attn) in Hugging Face, which loom's three adapters do not map onto; PEFT export supports "
      f"llama-style models ({', '.join(PEFT_MODEL_TYPES)}). Merge the run instead (tools/lora.py merge) and "
      "export the merged checkpoint with tools/hf_export.py"
    )
  huggingface.hf_config(model_cfg, model_type)  # A model that is not of model_type's family: one line naming the field.
  train_full = info.config.lora.get("train_full", "")
  if train_full and model_cfg.tie_embeddings and re.fullmatch(f"(?:{train_full})(?:/.*)?", "embed"):
    raise ValueError(
      f"lora.train_full={train_full!r} trains embed, which the model ties to its output layer: PEFT's "
      "modules_to_save would copy embed_tokens and leave the tied lm_head on the old rows. Merge the run "
      "instead (tools/lora.py merge) and export the merged checkpoint with tools/hf_export.py"
    )
  within = (("the run's checkpoint directory", info.directory),)
  huggingface_io.check_output_dir(out_dir, "--output", within=within)
  if base_out_dir:
    huggingface_io.check_output_dir(base_out_dir, "--base_output", within=within + (("--output", out_dir),))
    huggingface_io.check_output_dir(out_dir, "--output", within=(("--base_output", base_out_dir),))

  # The parameters trained in full are written through their whole Hugging Face modules: the base is needed.
  setup, params = lora_params(info, with_base=bool(base_out_dir or train_full))
  trained = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(setup.saved_params(params))))
  tensors, targets = peft_tensors(trained)
  full = full_parameter_paths(trained)
  modules_to_save = []
  if full:
    saved, modules_to_save = peft_modules_to_save(
      model_cfg, plain_params(setup, params, with_adapters=False), full, model_type
    )
    tensors.update(saved)
  if base_model_name_or_path is None:
    base_model_name_or_path = base_out_dir or _imported_from(info)

  written = []
  if base_out_dir:
    # The base the adapter applies to: with the fully trained parameters as they were before the run.
    base_params = plain_params(setup, _initial_params(setup) if full else params, with_adapters=False)
    written += huggingface_io.export_hf(
      os.path.join(info.directory, str(info.step)), None, base_out_dir, model_type, params=base_params
    )
  with huggingface_io.output_directory(out_dir, "--output") as directory:
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    with atomic_write(config_path) as f:
      json.dump(peft_config(info.config.lora, targets, base_model_name_or_path, modules_to_save), f, indent=2)
      f.write("\n")
  return [os.path.join(out_dir, ADAPTER_WEIGHTS), os.path.join(out_dir, ADAPTER_CONFIG)] + written


# --- The command.

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "A LoRA run's workdir (its latest step), its checkpoints/ directory or one checkpoints/STEP."
)
_STEP = flags.DEFINE_integer("step", -1, "Which step of --checkpoint (-1: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "A new or empty directory for what the command writes.")
_BASE_OUTPUT = flags.DEFINE_string(
  "base_output", None, "export_peft: also write the base the adapter applies to, as a Hugging Face model, here."
)
_MODEL_TYPE = flags.DEFINE_enum("model_type", "llama", list(PEFT_MODEL_TYPES), "export_peft: the base's architecture.")
_BASE_NAME = flags.DEFINE_string(
  "base_model_name_or_path",
  None,
  "export_peft: adapter_config.json's base_model_name_or_path (default: --base_output, else the Hugging Face "
  "directory the base was imported from).",
)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax reports every step of a save at INFO.
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"lora: expected one command, {' or '.join(COMMANDS)}; got {' '.join(argv[1:]) or 'none'}")
  command = argv[1]
  if command == "merge" and (_BASE_OUTPUT.value or _BASE_NAME.value is not None):
    raise SystemExit("lora: --base_output and --base_model_name_or_path are for export_peft")
  try:
    if command == "merge":
      written = [merge_checkpoint(_CHECKPOINT.value, _OUTPUT.value, _STEP.value)]
    else:
      written = export_peft(
        _CHECKPOINT.value, _OUTPUT.value, _BASE_OUTPUT.value, _MODEL_TYPE.value, _STEP.value, _BASE_NAME.value
      )
  except ValueError as e:
    raise SystemExit(f"lora {command}: {e}") from None
  for path in written:
    print(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "output"])
  app.run(main, flags_parser=parse_flags)
