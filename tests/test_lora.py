"""LoRA: what trains, what is saved, that resuming, sharding, merging and exporting change nothing.

The base is a tiny random Hugging Face Llama (GQA, SwiGLU, untied head) imported with
tools/hf_import.py's import_hf; module fixtures LoRA-train it with training.run.train (float32 base)
and, step by step on synthetic batches, with a bfloat16 base on one device and on a (2, 2, 2) mesh.
Nothing is downloaded; transformers and torch make the base, peft loads the exported adapters
(tests/requirements.txt; skipped without them).
"""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import sharding
from evaluation import loading
from tests import synthetic
from tests.test_training import corpus_config
from tools import huggingface_io
from tools import lora as lora_tool
from training import init_from
from training.checkpointing import Checkpointer
from training.optimizer import parameter_paths
from training.run import train
from training.setup import build_setup
from training.state import abstract_model, trainable_filter
from training.validation import ConfigError

VOCAB = 260  # The byte tokenizer's 259 ids fit.
LAYERS, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP = 2, 32, 4, 2, 8, 64
RANK, ALPHA = 4, 16.0
STEPS = dict(eval_every=0, eval_batches=1, log_every=2, num_samples=0)
MERGE_TOLERANCE = 1e-5  # float32 logits: the merged model against the adapted one.
HF_TOLERANCE = 1e-4  # float32 logits: transformers (+ peft) against loom.
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(tmp, base_dir, model_fields, **train_fields):
  """The LoRA run on the test corpus from `base_dir`'s checkpoint: 6 steps, checkpoints at 3 and 6."""
  config = corpus_config(tmp, **dict(STEPS, num_steps=6, checkpoint_every=3, **train_fields))
  config.model.update(**model_fields)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=1)  # B moves well away from 0 in 6 steps.
  config.init.checkpoint = str(base_dir)
  config.lora.update(rank=RANK, alpha=ALPHA, base_dtype="float32")
  return config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random Hugging Face Llama, imported: (its directory, loom config, loom parameters, HF dir)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tmp = tmp_path_factory.mktemp("lora")
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=EMBED,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    intermediate_size=MLP,
    tie_word_embeddings=False,
    max_position_embeddings=32,
  )
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  with torch.no_grad():  # Norm scales start at 1: perturb them so a misplaced one shows.
    for tensor in model.parameters():
      if tensor.ndim == 1:
        tensor.add_(0.1 * torch.randn_like(tensor))
  model.save_pretrained(str(tmp / "hf"), safe_serialization=True)
  config, params = huggingface_io.import_hf(str(tmp / "hf"), str(tmp / "imported"))
  return types.SimpleNamespace(tmp=tmp, dir=tmp / "imported", hf_dir=tmp / "hf", model=config.model, params=params)


@pytest.fixture(scope="module")
def run(base):
  """The LoRA run (training.run.train, float32 base, on (2, 2, 2))."""
  config = lora_config(base.tmp, base.dir, base.model.to_dict())
  return train(config, str(base.tmp / "lora"))


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def logits(graphdef, params, tokens_BL) -> np.ndarray:
  """The model's float32 logits [B, L, V], each row one document from position 0."""
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, host(params)))
  return np.asarray(model(jnp.asarray(tokens_BL)))


def plain_logits(model_cfg, params: dict, tokens_BL) -> np.ndarray:
  """The plain model's (no adapters) logits from loom's pure dict of parameters."""
  graphdef, state = abstract_model(model_cfg)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens_BL)))


def hf_logits(model, tokens_BL) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.tensor(tokens_BL, dtype=torch.long)).logits.float().numpy()


def tokens(length: int = 24) -> np.ndarray:
  return np.random.default_rng(3).integers(0, VOCAB - 1, (2, length)).astype(np.int32)


def split_lora(params):
  """(adapters, frozen base) of a LoRA model's parameters, as pure dicts on the host."""
  adapted, frozen = nnx.split_state(params, nnx.LoRAParam, ...)
  return host(nnx.to_pure_dict(adapted)), host(nnx.to_pure_dict(frozen))


def flat(tree: dict) -> dict:
  """{'blocks/attn/wq': leaf, ...} of a nested dict."""
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def adapter_shapes() -> dict:
  """Every adapter's A [layers, *in, r] and B [layers, r, *out], from its kernel's shape."""
  d, n, k, h, f = EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP
  kernels = {
    "attn/lora_wq": ((d,), (n, h)),
    "attn/lora_wk": ((d,), (k, h)),
    "attn/lora_wv": ((d,), (k, h)),
    "attn/lora_wo": ((n, h), (d,)),
    "mlp/lora_w_gate": ((d,), (f,)),
    "mlp/lora_w_up": ((d,), (f,)),
    "mlp/lora_w_down": ((f,), (d,)),
  }
  shapes = {}
  for name, (inputs, outputs) in kernels.items():
    shapes[f"blocks/{name}/a"] = (LAYERS, *inputs, RANK)
    shapes[f"blocks/{name}/b"] = (LAYERS, RANK, *outputs)
  return shapes


# --- What trains and what is saved.


def test_only_the_adapters_train_and_have_optimizer_state(base, run):
  # rank * (in + out) per kernel and layer: wq and wo 4 * (32 + 4 * 8), wk and wv 4 * (32 + 2 * 8),
  # w_gate, w_up and w_down 4 * (32 + 64).
  expected = LAYERS * (2 * RANK * (32 + 32) + 2 * RANK * (32 + 16) + 3 * RANK * (32 + 64))
  assert expected == 4096
  trained, frozen = split_lora(run.state.params)
  assert sum(leaf.size for leaf in jax.tree.leaves(trained)) == expected
  assert {path: leaf.shape for path, leaf in flat(trained).items()} == adapter_shapes()
  assert sorted(flat(frozen)) == sorted(flat(base.params))  # The base is the plain model, no adapter in it.

  # AdamW keeps two moments per trained parameter (and scalar counts): nothing for the frozen base.
  opt_leaves = jax.tree_util.tree_flatten_with_path(run.state.opt_state)[0]
  moments = [(jax.tree_util.keystr(path), leaf) for path, leaf in opt_leaves if np.ndim(leaf) > 0]
  assert sum(leaf.size for _, leaf in moments) == 2 * expected
  assert len(moments) == 2 * len(flat(trained))
  assert all("lora_" in path for path, _ in moments)


def test_a_checkpoint_holds_only_the_adapters(base, run):
  checkpointer = Checkpointer(str(base.tmp / "lora" / "checkpoints"), async_save=False, read_only=True)
  assert checkpointer.all_steps() == [3, 6]
  saved = checkpointer.params_shapes(6)
  checkpointer.close()
  assert saved == adapter_shapes()
  assert set(parameter_paths(split_lora(run.state.params)[1])).isdisjoint(saved)


def test_the_float32_base_is_bit_identical_after_a_lora_run(base, run):
  trained, frozen = split_lora(run.state.params)
  for path, value in flat(base.params).items():
    assert flat(frozen)[path].dtype == np.float32
    np.testing.assert_array_equal(flat(frozen)[path], value, err_msg=path)
  # ...while the adapters moved: every B started at zero.
  assert min(np.abs(leaf).max() for path, leaf in flat(trained).items() if path.endswith("/b")) > 1e-3


def test_a_resumed_lora_run_is_bit_identical(base, run):
  interrupted = str(base.tmp / "interrupted")
  first = train(lora_config(base.tmp, base.dir, base.model.to_dict(), stop_at_step=3), interrupted)
  assert int(first.state.step) == 3
  resumed = train(lora_config(base.tmp, base.dir, base.model.to_dict()), interrupted)
  assert resumed.resumed_from == 3 and int(resumed.state.step) == 6
  for a, b in zip(jax.tree.leaves(host(run.state)), jax.tree.leaves(host(resumed.state)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def merged_dir(base, run):
  """tools/lora.py merge of the LoRA run's last checkpoint."""
  written = lora_tool.merge_checkpoint(str(base.tmp / "lora"), str(base.tmp / "merged"))
  assert written == str(base.tmp / "merged" / "checkpoints" / "0")
  return base.tmp / "merged"


def test_the_merged_model_gives_the_adapted_models_logits(base, run, merged_dir):
  """tools/lora.py merge: W + (alpha / rank) A B, written as a plain checkpoint that loads as any other."""
  full, record = huggingface_io.checkpoint_config(str(merged_dir))
  assert record["config"]["lora"]["rank"] == 0 and record["config"]["init"]["checkpoint"] == ""
  assert record["merged_from"]["checkpoint"] == f"{base.tmp / 'lora' / 'checkpoints'}/6"
  merged = huggingface_io.load_params(str(merged_dir), full.model)

  batch = tokens()
  adapted = logits(run.graphdef, run.state.params, batch)
  got = plain_logits(full.model, merged, batch)
  difference, moved = np.abs(got - adapted).max(), np.abs(adapted - plain_logits(base.model, base.params, batch)).max()
  print(f"merged vs adapted: max |difference| {difference:.1e}; the adapters moved the logits by {moved:.1e}")
  assert difference <= MERGE_TOLERANCE
  assert moved > 100 * MERGE_TOLERANCE  # The adapters do change the logits.

  # tools/evaluate.py's and tools/generate.py's loader reads it as a plain model, onto the run's mesh.
  loaded = loading.load_model(loading.checkpoint_config(str(merged_dir)))
  assert not loaded.setup.lora and loaded.config.init.checkpoint == ""
  for path, value in flat(host(nnx.to_pure_dict(loaded.params))).items():
    np.testing.assert_array_equal(value, flat(merged)[path], err_msg=path)


def test_merge_copies_a_tokenizer_only_the_runs_workdir_holds(tmp_path):
  """A trained char (or sentencepiece) vocabulary cached in the LoRA run's workdir travels with the merge;
  the byte tokenizer has no file."""
  config = synthetic.tiny_config()
  config.data.tokenizer = "char"
  os.makedirs(tmp_path / "run" / "tokenizer")
  (tmp_path / "run" / "tokenizer" / "char_vocab.json").write_text("{}")
  info = loading.CheckpointInfo(config=config, record={}, directory=str(tmp_path / "run" / "checkpoints"), step=6)
  assert lora_tool._cached_tokenizer(info) == str(tmp_path / "run" / "tokenizer" / "char_vocab.json")
  config.data.tokenizer = "byte"
  assert lora_tool._cached_tokenizer(info) is None


# --- A bfloat16 base, one device against a (2, 2, 2) mesh.


@pytest.fixture(scope="module")
def bfloat16_runs(base):
  """Three LoRA steps on synthetic batches with a bfloat16 base, on one device and on (2, 2, 2); the
  one-device state also saved as a LoRA run's checkpoint would be (for the PEFT export)."""

  def steps(mesh: dict, num_devices: int):
    config = lora_config(base.tmp, base.dir, base.model.to_dict())
    config.mesh.update(**mesh)
    config.lora.base_dtype = "bfloat16"
    setup = build_setup(synthetic.validated(config, num_devices), devices=jax.devices()[:num_devices])
    state, _ = init_from.initial_state(setup.config.init, setup)
    step, losses = setup.train_step(), []
    for seed in range(3):
      batch = synthetic.batch(16, config.data.seq_len, VOCAB - 1, seed=seed)
      state, metrics = step(state, sharding.global_batch_from_local(batch, setup.mesh))
      losses.append(float(metrics["loss"]))
    return setup, state, losses

  one = steps(dict(data=1, fsdp=1, tensor=1), 1)
  sharded = steps(dict(data=2, fsdp=2, tensor=2), 8)
  setup, state, _ = one
  checkpointer = Checkpointer(str(base.tmp / "bf16" / "checkpoints"), async_save=False, saved_params=setup.saved_params)
  checkpointer.save(state, {"step": 3, "config": json.loads(setup.config.to_json())})
  checkpointer.close()
  return types.SimpleNamespace(one=one, sharded=sharded, workdir=base.tmp / "bf16")


def test_a_lora_run_on_a_2x2x2_mesh_equals_one_device(bfloat16_runs):
  one, sharded = bfloat16_runs.one[2], bfloat16_runs.sharded[2]
  print(f"losses on one device {one}, on (2, 2, 2) {sharded}")
  np.testing.assert_allclose(sharded, one, rtol=1e-5)
  assert one[-1] < one[0] - 1e-3  # The adapters trained between the first and the last step.


def test_the_bfloat16_base_is_bit_identical_to_its_cast_after_a_lora_run(base, bfloat16_runs):
  for _, state, _ in (bfloat16_runs.one, bfloat16_runs.sharded):
    trained, frozen = split_lora(state.params)
    for path, value in flat(base.params).items():
      assert flat(frozen)[path].dtype == jnp.bfloat16
      np.testing.assert_array_equal(flat(frozen)[path], value.astype(jnp.bfloat16), err_msg=path)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(trained))
    assert min(np.abs(leaf).max() for path, leaf in flat(trained).items() if path.endswith("/b")) > 1e-3


# --- Errors.


def test_errors_are_one_clear_line(base, run):
  config = lora_config(base.tmp, base.dir, base.model.to_dict())
  config.lora.targets = "blocks/attn/nothing"
  with pytest.raises(ConfigError, match=r"lora.targets='blocks/attn/nothing': matches none of the kernels"):
    build_setup(synthetic.validated(config, 8))

  # A LoRA run's checkpoint holds no base: starting from one is refused, pointing at the merge.
  config = lora_config(base.tmp, base.tmp / "lora", base.model.to_dict())
  with pytest.raises(ConfigError, match=r"is a LoRA run's checkpoint \(adapters alone\); merge it") as caught:
    train(config, str(base.tmp / "from_lora"))
  assert "\n" not in str(caught.value)

  with pytest.raises(ValueError, match=r"--checkpoint: .*imported/checkpoints/0 is not a LoRA run's checkpoint"):
    lora_tool.merge_checkpoint(str(base.dir), str(base.tmp / "never"))
  with pytest.raises(ValueError, match=r"--checkpoint: .*imported/checkpoints/0 is not a LoRA run's checkpoint"):
    lora_tool.export_peft(str(base.dir), str(base.tmp / "never"))
  os.makedirs(base.tmp / "taken")
  open(base.tmp / "taken" / "file", "w").close()
  with pytest.raises(ValueError, match=r"--output=.*taken is not empty"):
    lora_tool.merge_checkpoint(str(base.tmp / "lora"), str(base.tmp / "taken"))
  with pytest.raises(ValueError, match=r"--base_output=.*taken is not empty"):
    lora_tool.export_peft(str(base.tmp / "lora"), str(base.tmp / "never"), base_out_dir=str(base.tmp / "taken"))
  with pytest.raises(ValueError, match=r"is a LoRA run's checkpoint, which holds its adapters alone"):
    huggingface_io.export_hf(str(base.tmp / "lora"), None, str(base.tmp / "never"), "llama")

  # A GPT-2-style run: PEFT's c_attn fuses q, k and v, so export_peft refuses it (read from the record alone).
  gpt2 = synthetic.tiny_config()
  gpt2.lora.rank = RANK
  _record_only_checkpoint(base.tmp / "gpt2", gpt2)
  with pytest.raises(ValueError, match=r"model.position='learned': the run's model is GPT-2-style"):
    lora_tool.export_peft(str(base.tmp / "gpt2"), str(base.tmp / "never"))
  assert not os.path.exists(base.tmp / "never")


# --- PEFT.


def check_peft_export(workdir, graphdef, params, out, modules_to_save=None) -> None:
  """Exports `workdir`'s LoRA checkpoint as a PEFT adapter and its base; peft on transformers gives
  loom's logits (those of `graphdef` with `params`). `modules_to_save`: {Hugging Face module: its
  tensors' count} of the parameters the run trained in full (lora.train_full)."""
  peft = pytest.importorskip("peft")
  import torch
  import transformers

  written = lora_tool.export_peft(str(workdir), str(out / "adapter"), base_out_dir=str(out / "hf_base"))
  assert str(out / "adapter" / "adapter_model.safetensors") in written
  with open(out / "adapter" / "adapter_config.json") as f:
    adapter_cfg = json.load(f)
  assert (adapter_cfg["peft_type"], adapter_cfg["task_type"], adapter_cfg["bias"]) == ("LORA", "CAUSAL_LM", "none")
  assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["target_modules"]) == (RANK, 16, PEFT_TARGETS)
  assert adapter_cfg["base_model_name_or_path"] == str(out / "hf_base")
  assert adapter_cfg["modules_to_save"] == (sorted(modules_to_save) if modules_to_save else None)
  weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
  assert len(weights) == LAYERS * len(PEFT_TARGETS) * 2 + sum((modules_to_save or {}).values())
  prefix = "base_model.model.model.layers"
  assert weights[f"{prefix}.1.self_attn.q_proj.lora_A.weight"].shape == (RANK, EMBED)
  assert weights[f"{prefix}.1.self_attn.k_proj.lora_B.weight"].shape == (KV_HEADS * HEAD_DIM, RANK)
  assert weights[f"{prefix}.0.mlp.down_proj.lora_A.weight"].shape == (RANK, MLP)

  batch = tokens()
  expected = logits(graphdef, params, batch)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf_base"), dtype=torch.float32).eval()
  base_logits = hf_logits(base_model, batch)
  got = hf_logits(peft.PeftModel.from_pretrained(base_model, str(out / "adapter")).eval(), batch)
  difference, moved = np.abs(got - expected).max(), np.abs(got - base_logits).max()
  print(f"peft vs loom: max |difference| {difference:.1e}; the adapters moved the logits by {moved:.1e}")
  assert difference <= HF_TOLERANCE
  assert moved > 100 * HF_TOLERANCE


def test_a_peft_adapter_gives_loom_logits_in_transformers(base, run):
  check_peft_export(base.tmp / "lora", run.graphdef, run.state.params, base.tmp / "peft")
  # The base exported beside it is the imported model, bit for bit.
  original = huggingface_io.read_safetensors(str(base.hf_dir))
  for name, value in huggingface_io.read_safetensors(str(base.tmp / "peft" / "hf_base")).items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_a_peft_adapter_of_a_bfloat16_base_gives_loom_logits(base, bfloat16_runs):
  """The exported base is the one the adapters were trained on: the bfloat16 cast, in float32."""
  setup, state, _ = bfloat16_runs.one
  check_peft_export(bfloat16_runs.workdir, setup.graphdef, state.params, base.tmp / "peft_bf16")


def test_the_merged_export_gives_loom_logits_in_transformers(base, run, merged_dir):
  """tools/lora.py merge, then tools/hf_export.py."""
  import torch
  import transformers

  huggingface_io.export_hf(str(merged_dir), None, str(base.tmp / "hf_merged"), "llama")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(base.tmp / "hf_merged"), dtype=torch.float32).eval()
  batch = tokens()
  difference = np.abs(hf_logits(model, batch) - logits(run.graphdef, run.state.params, batch)).max()
  print(f"merged export vs loom: max |difference| {difference:.1e}")
  assert difference <= HF_TOLERANCE


# --- Parameters trained in full beside the adapters (lora.train_full, PEFT's modules_to_save).

TRAIN_FULL = "embed|head|final_norm"
FULL_SHAPES = {"embed": (VOCAB, EMBED), "head": (EMBED, VOCAB), "final_norm/scale": (EMBED,)}


def full_config(tmp, base_dir, model_fields, **train_fields):
  """lora_config with TRAIN_FULL trained in full, on a bfloat16 base (so the float32 of the fully
  trained parameters is theirs, not the base's)."""
  config = lora_config(tmp, base_dir, model_fields, **train_fields)
  config.lora.update(train_full=TRAIN_FULL, base_dtype="bfloat16")
  return config


@pytest.fixture(scope="module")
def full_run(base):
  """The LoRA run with TRAIN_FULL (training.run.train on (2, 2, 2), checkpoints at 3 and 6)."""
  return train(full_config(base.tmp, base.dir, base.model.to_dict()), str(base.tmp / "lora_full"))


def split_full(params):
  """(adapters, fully trained parameters, frozen base) of a train_full run's parameters, host dicts."""
  adapters, rest = split_lora(params)
  rest = flat(rest)
  full = {path: rest.pop(path) for path in FULL_SHAPES}
  return adapters, full, rest


def test_train_full_trains_exactly_the_adapters_and_the_selected_parameters(base, full_run):
  adapters = 4096  # As test_only_the_adapters_train_and_have_optimizer_state counts them.
  full = VOCAB * EMBED + EMBED * VOCAB + EMBED
  assert full == 16672
  trainable = trainable_filter(full_config(base.tmp, base.dir, base.model.to_dict()).lora)  # Setup.trainable.
  trained, _ = nnx.split_state(full_run.state.params, trainable, ...)
  trained = flat(host(nnx.to_pure_dict(trained)))
  assert sum(leaf.size for leaf in trained.values()) == adapters + full
  assert {path: leaf.shape for path, leaf in trained.items()} == adapter_shapes() | FULL_SHAPES
  # AdamW's two moments of each trained parameter, and of nothing else.
  opt_leaves = jax.tree_util.tree_flatten_with_path(full_run.state.opt_state)[0]
  moments = [leaf for _, leaf in opt_leaves if np.ndim(leaf) > 0]
  assert sum(leaf.size for leaf in moments) == 2 * (adapters + full)


def test_train_full_moves_the_selected_parameters_and_nothing_else_of_the_base(base, full_run):
  adapters, full, frozen = split_full(full_run.state.params)
  original = flat(base.params)
  assert sorted(frozen) == sorted(set(original) - set(FULL_SHAPES))
  for path, value in frozen.items():  # The rest of the base: its bfloat16 cast, bit for bit.
    assert value.dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(value, original[path].astype(jnp.bfloat16), err_msg=path)
  for path, value in full.items():  # Trained in float32 (not lora.base_dtype), and moved.
    assert value.dtype == np.float32, path
    moved = np.abs(value - original[path]).max()
    print(f"{path}: max |change| {moved:.1e}")
    assert moved > 1e-3, path
  assert min(np.abs(leaf).max() for path, leaf in flat(adapters).items() if path.endswith("/b")) > 1e-3


def test_a_train_full_checkpoint_holds_the_adapters_and_the_selected_parameters(base, full_run):
  checkpointer = Checkpointer(str(base.tmp / "lora_full" / "checkpoints"), async_save=False, read_only=True)
  assert checkpointer.all_steps() == [3, 6]
  saved = checkpointer.params_shapes(6)
  checkpointer.close()
  assert saved == adapter_shapes() | FULL_SHAPES


def test_a_resumed_train_full_run_is_bit_identical(base, full_run):
  """A workdir holding the run's step-3 checkpoint alone (as an interrupted run leaves it) resumes to
  the unbroken run's step 6, bit for bit: the full parameters and their moments are restored too."""
  interrupted = base.tmp / "full_interrupted"
  shutil.copytree(base.tmp / "lora_full" / "checkpoints" / "3", interrupted / "checkpoints" / "3")
  resumed = train(full_config(base.tmp, base.dir, base.model.to_dict()), str(interrupted))
  assert resumed.resumed_from == 3 and int(resumed.state.step) == 6
  for a, b in zip(jax.tree.leaves(host(full_run.state)), jax.tree.leaves(host(resumed.state)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_merged_train_full_run_gives_the_adapted_models_logits(base, full_run):
  merged_dir = base.tmp / "full_merged"
  lora_tool.merge_checkpoint(str(base.tmp / "lora_full"), str(merged_dir))
  full, _ = huggingface_io.checkpoint_config(str(merged_dir))
  merged = huggingface_io.load_params(str(merged_dir), full.model)
  _, trained, _ = split_full(full_run.state.params)
  for path, value in trained.items():  # The trained values, not the base's.
    np.testing.assert_array_equal(flat(merged)[path], value, err_msg=path)
  batch = tokens()
  difference = np.abs(plain_logits(full.model, merged, batch) - logits(full_run.graphdef, full_run.state.params, batch))
  print(f"merged vs adapted: max |difference| {difference.max():.1e}")
  assert difference.max() <= MERGE_TOLERANCE


def test_a_peft_adapter_with_modules_to_save_gives_loom_logits(base, full_run):
  """train_full's parameters go out as PEFT's modules_to_save; the base written beside the adapter is
  the one the run started from, not the trained one: its embeddings the imported model's (kept in
  float32), its kernels their bfloat16 cast."""
  out = base.tmp / "peft_full"
  modules = {"model.embed_tokens": 1, "lm_head": 1, "model.norm": 1}
  check_peft_export(base.tmp / "lora_full", full_run.graphdef, full_run.state.params, out, modules)
  weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
  _, trained, _ = split_full(full_run.state.params)
  np.testing.assert_array_equal(weights["base_model.model.model.embed_tokens.weight"], trained["embed"])
  np.testing.assert_array_equal(weights["base_model.model.lm_head.weight"], trained["head"].T)
  exported_base = huggingface_io.read_safetensors(str(out / "hf_base"))
  original = huggingface_io.read_safetensors(str(base.hf_dir))
  for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
    np.testing.assert_array_equal(exported_base[name], original[name], err_msg=name)
  name = "model.layers.0.self_attn.q_proj.weight"
  np.testing.assert_array_equal(exported_base[name], original[name].astype(jnp.bfloat16).astype(np.float32))


def test_train_full_errors_are_one_clear_line(base):
  def setup_error(**lora):
    config = lora_config(base.tmp, base.dir, base.model.to_dict())
    config.lora.update(**lora)
    with pytest.raises(ConfigError) as caught:
      build_setup(synthetic.validated(config, 8))
    assert "\n" not in str(caught.value)
    return str(caught.value)

  assert "lora.train_full='embed' needs lora.rank > 0" in setup_error(rank=0, train_full="embed")
  assert "lora.train_full='embed(' is not a regular expression" in setup_error(train_full="embed(")
  message = setup_error(train_full="pos_embed")
  assert message.startswith("lora.train_full='pos_embed' matches no parameter; the paths are: blocks/attn/wk,")
  message = setup_error(train_full="embed|blocks/attn/wq")
  assert "selects blocks/attn/wq, which lora.targets=" in message and "adapts" in message
  message = setup_error(targets="blocks/attn/wq", train_full="blocks/mlp/w_down", base_quantization="int8")
  assert "selects the block kernels blocks/mlp/w_down, which lora.base_quantization='int8' stores quantized" in message
  # Unquantized, a kernel no adapter targets may train in full; the QLoRA base's embeddings too.
  for lora in (
    dict(targets="blocks/attn/wq", train_full="blocks/mlp/w_down"),
    dict(train_full="embed", base_quantization="nf4", quantization_block=16),
  ):
    config = lora_config(base.tmp, base.dir, base.model.to_dict())
    config.lora.update(**lora)
    setup = build_setup(synthetic.validated(config, 8))
    saved = setup.saved_params(setup.abstract_params)
    full = {p: leaf.dtype for p, leaf in zip(parameter_paths(saved), jax.tree.leaves(saved)) if "lora_" not in p}
    assert full == {lora["train_full"]: jnp.float32}  # Neither quantized nor in lora.base_dtype.

  # PEFT export refuses a tied embedding (PEFT would leave the tied head on the old rows), from the record alone.
  tied = lora_config(base.tmp, base.dir, dict(base.model.to_dict(), tie_embeddings=True))
  tied.lora.train_full = "embed"
  _record_only_checkpoint(base.tmp / "tied", tied)
  with pytest.raises(ValueError, match=r"lora.train_full='embed' trains embed, which the model ties to its output"):
    lora_tool.export_peft(str(base.tmp / "tied"), str(base.tmp / "never"))
  assert not os.path.exists(base.tmp / "never")


def _record_only_checkpoint(workdir, config):
  """A checkpoint whose record holds `config` and whose parameters are a placeholder: what the tools
  read from the record alone, before any parameter, is all it serves."""
  checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save_params(1, {"unused": np.zeros(1)}, {"step": 1, "config": json.loads(config.to_json())})
  checkpointer.close()
