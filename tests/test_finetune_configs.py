"""The fine-tuning and compression configs: each validates and builds (shapes only) once the runs and
files it names exist, and names the missing one in one clear line until then. No training here."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model as model_lib
import sharding
from configs import base, distill_quickstart, lora_chat, prune_gradual, qat_int8, qlora_chat, quickstart
from evaluation import loading
from model import huggingface
from model.quantization import weight_bytes
from training import checkpointing
from training.setup import build_setup
from training.state import abstract_model
from training.validation import ConfigError, validate

DEVICES = 8  # conftest's CPU devices: the configs' data=-1 meshes take all of them.
QUICKSTART_VOCAB = quickstart.get_config().data.tokenizer_vocab_size
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
# SmolLM2-360M-Instruct, as Hugging Face counts it (362M): 361,821,120 parameters.
SMOLLM2_360M_PARAMS = 361_821_120
# LoRA rank 16 on all 7 kernels of its 32 layers, per layer 16 * (in + out) summed: wq and wo
# 960 + 960, wk and wv 960 + 320 (5 kv heads of 64), w_up, w_gate and w_down 960 + 2560.
SMOLLM2_360M_LORA_16 = 32 * 16 * (2 * 1920 + 2 * 1280 + 3 * 3520)


def _fake_checkpoint(directory) -> str:
  """A directory `training.checkpointing.locate` takes as a finished loom checkpoint (no arrays)."""
  step = directory / "checkpoints" / "0"
  for item in checkpointing.REQUIRED:
    (step / item).mkdir(parents=True)
  (step / checkpointing.FINISHED_MARKER).write_text("{}")
  return str(directory)


def _chat_file(tmp_path) -> str:
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(CHAT) + "\n")
  return str(path)


def _abstract_state(config):
  """build_setup on an abstract mesh of DEVICES devices: the state's shapes, dtypes and shardings."""
  sizes = sharding.resolve_mesh_shape(config.mesh, DEVICES)
  mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  setup = build_setup(config, mesh)
  return setup, setup.abstract_state()


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_placeholders_stop_the_run_naming_the_field_and_path(tmp_path, monkeypatch):
  # Relative paths resolve against the working directory: an empty one, where nothing was made yet.
  monkeypatch.chdir(tmp_path)
  for module in (lora_chat, qlora_chat):
    config = module.get_config()
    with pytest.raises(
      ConfigError, match=r"^data\.sources\.chat\.paths: pattern 'your_chat_data/\*\.jsonl' matches no"
    ):
      validate(config, DEVICES)
    config.data.sources.chat.paths = _chat_file(tmp_path)
    with pytest.raises(
      ConfigError, match=r"^init\.checkpoint: \S+/workdirs/smollm2_360m_instruct is not a directory \(a loom workdir"
    ):
      validate(config, DEVICES)
  with pytest.raises(ConfigError, match=r"^init\.checkpoint: \S+/workdirs/quickstart is not a directory"):
    validate(prune_gradual.get_config(), DEVICES)
  with pytest.raises(
    ConfigError,
    match=r"^config\.distillation\.teacher='workdirs/quickstart': \S+/workdirs/quickstart is not a directory",
  ):
    validate(distill_quickstart.get_config(), DEVICES)
  # An import directory without tools/hf_import.py's config.py: the command that writes it.
  with pytest.raises(
    ValueError, match=r"there is no .*nowhere/config\.py; import the model there first \(python tools"
  ):
    lora_chat.get_config(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("module", [lora_chat, qlora_chat], ids=["lora", "qlora"])
def test_lora_chat_configs_build_smollm2_with_rank_16_adapters(module, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _fake_checkpoint(tmp_path / "workdirs" / "smollm2_360m_instruct")
  config = module.get_config()
  config.data.sources.chat.paths = _chat_file(tmp_path)
  config = validate(config, DEVICES, tokenizer_vocab_size=49152)
  assert model_lib.num_params(config.model) == SMOLLM2_360M_PARAMS
  assert (config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.base_dtype) == (
    16,
    32.0,
    0.05,
    "bfloat16",
  )
  assert (config.data.tokenizer, config.data.tokenizer_path) == (
    "huggingface",
    "workdirs/smollm2_360m_instruct/tokenizer.json",
  )
  assert (config.data.sources.chat.kind, config.data.chat_loss_on, config.optimizer.learning_rate) == (
    "chat",
    "assistant",
    2e-4,
  )

  setup, state = _abstract_state(config)
  adapters, frozen = nnx.split_state(state.params, nnx.LoRAParam, ...)
  assert _count(adapters) == SMOLLM2_360M_LORA_16 == 8_683_520  # 2.4% of the model
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(adapters))
  assert _count(setup.saved_params(state.params)) == SMOLLM2_360M_LORA_16  # Checkpoints hold the adapters.
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert _count(moments) == 2 * SMOLLM2_360M_LORA_16  # Adam's two moments, of the adapters alone.
  kernels = 32 * (960 * 960 * 2 + 960 * 320 * 2 + 960 * 2560 * 3)
  others = SMOLLM2_360M_PARAMS - kernels  # Embeddings and norms: bfloat16 in both.
  if module is lora_chat:
    assert config.lora.base_quantization == "none"
    assert weight_bytes(frozen) == 2 * SMOLLM2_360M_PARAMS
  else:
    assert (config.lora.base_quantization, config.lora.quantization_block) == ("nf4", 64)
    # NF4: half a byte a weight, and one float32 scale per 64 input rows of each output.
    assert weight_bytes(frozen) == 2 * others + kernels // 2 + 4 * kernels // 64


def _tiny_hf_llama(directory) -> dict:
  """A tiny Llama in Hugging Face's layout (config.json, model.safetensors, tokenizer.json), random
  weights: what tools/hf_import.py reads. Returns loom's model fields for it."""
  import tokenizers
  from safetensors.numpy import save_file

  fields = dict(
    vocab_size=300, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64
  )
  fields.update(norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True, use_bias=False)
  config = base.get_config()
  config.model.update(**fields)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), nnx.to_pure_dict(abstract_model(config.model)[1])
  )
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(huggingface.hf_config(config.model, "llama")))
  save_file(huggingface.hf_tensors(params, config.model, "llama"), str(directory / "model.safetensors"))
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(["Hello there, how are you?"] * 10, trainer)
  tokenizer.save(str(directory / "tokenizer.json"))
  return fields


def test_lora_chat_takes_another_import_from_its_config_py(tmp_path):
  from tools import huggingface_io

  fields = _tiny_hf_llama(tmp_path / "hf")
  huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  for module in (lora_chat, qlora_chat):
    config = module.get_config(str(tmp_path / "loom"))  # configs/lora_chat.py:DIR
    assert {key: config.model[key] for key in fields} == fields
    assert config.init.checkpoint == str(tmp_path / "loom")
    assert (config.data.tokenizer, config.data.tokenizer_path) == (
      "huggingface",
      str(tmp_path / "loom" / "tokenizer.json"),
    )
    assert config.data.seq_len == 64  # The import's max_seq_len, below the config's 2048.
    config.data.sources.chat.paths = _chat_file(tmp_path)
    config = validate(config, DEVICES, tokenizer_vocab_size=300)  # init.checkpoint is the real import.
    _, state = _abstract_state(config)
    adapters = nnx.split_state(state.params, nnx.LoRAParam, ...)[0]
    # Per layer 16 * (in + out): wq and wo 64 + 64, wk and wv 64 + 32, w_up, w_gate and w_down 64 + 128.
    assert _count(adapters) == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)


def test_qat_config_is_the_quickstart_with_int8_fake_quantization():
  config = validate(qat_int8.get_config(), DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB)
  plain = validate(quickstart.get_config(), DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB)
  assert (config.quantization.qat, config.quantization.block) == ("int8", 64)
  assert config.model == plain.model and config.train == plain.train and config.init.checkpoint == ""
  setup, state = _abstract_state(config)
  assert setup.params_transform() is not None and build_setup(plain).params_transform() is None
  assert _count(state.params) == model_lib.num_params(config.model) == 1_066_112  # Stored in float32, as trained.


def test_prune_gradual_config_reaches_half_the_kernels_at_60_percent_of_its_steps(tmp_path):
  config = prune_gradual.get_config()
  assert config.init.checkpoint == "workdirs/quickstart"
  # The trained run's tokenizer (a new workdir would train its own, whose ids are not the model's).
  assert config.data.tokenizer_path == os.path.join(
    config.init.checkpoint, "tokenizer", loading._CACHED["sentencepiece"]
  )
  config.init.checkpoint = _fake_checkpoint(tmp_path / "quickstart")
  config = validate(config, DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB)
  p = config.pruning
  assert (p.method, p.structure, p.sparsity, p.begin_step, p.every) == ("magnitude", "unstructured", 0.5, 0, 20)
  assert (p.end_step, config.train.num_steps) == (180, 300)
  assert config.model == validate(quickstart.get_config(), DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB).model
  _, state = _abstract_state(config)
  masks = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.dtype == jnp.bool_]
  # The quickstart's GELU blocks have wq, wk, wv, wo, w_up and w_down: 6 masks of their kernels' shapes.
  assert len(masks) == 6 and _count(masks) == 4 * (4 * 128 * 128 + 2 * 128 * 512)


def test_distill_config_is_a_smaller_student_on_the_teachers_tokenizer(tmp_path):
  config = distill_quickstart.get_config()
  teacher = distill_quickstart.TEACHER
  assert config.distillation.teacher == teacher == "workdirs/quickstart"
  # The tokenizer the quickstart run trained and cached in its workdir, where evaluation looks for it.
  assert config.data.tokenizer_path == os.path.join(teacher, "tokenizer", loading._CACHED["sentencepiece"])
  assert config.data.sources.to_dict() == quickstart.get_config().data.sources.to_dict()
  config.distillation.teacher = _fake_checkpoint(tmp_path / "quickstart")
  config = validate(config, DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB)
  assert (config.distillation.temperature, config.distillation.alpha) == (2.0, 0.5)
  student = model_lib.num_params(config.model)
  teacher_params = model_lib.num_params(
    validate(quickstart.get_config(), DEVICES, tokenizer_vocab_size=QUICKSTART_VOCAB).model
  )
  assert (config.model.num_layers, config.model.embed_dim, student, teacher_params) == (2, 96, 430_560, 1_066_112)
  _, state = _abstract_state(config)
  assert _count(state.params) == student
