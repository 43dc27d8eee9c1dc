"""Hugging Face interop: loom computes what transformers computes, export then import is exact.

Every model is made here from a transformers config with random weights (nothing
is downloaded); needs tests/requirements.txt (transformers, torch).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (tests/requirements.txt: the README's test command installs it)
import transformers  # noqa: E402
from flax import nnx

from configs import base  # noqa: E402
from data.chat import render_chat  # noqa: E402
from data.tokenizers import (  # noqa: E402
  ByteTokenizer,
  HuggingFaceTokenizer,
  SentencePieceTokenizer,
  build_tokenizer,  # noqa: E402
  train_sentencepiece,  # noqa: E402
)
from model import huggingface  # noqa: E402
from tools import huggingface_io  # noqa: E402
from training.checkpointing import Checkpointer  # noqa: E402
from training.state import abstract_model  # noqa: E402
from training.validation import validate  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
TOLERANCE = 1e-4  # float32 logits, loom against transformers.

HF_CONFIGS = {
  # Sharded into several safetensors files (an index) by save_pretrained's max_shard_size.
  "llama": lambda vocab: transformers.LlamaConfig(
    vocab_size=vocab,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
  ),
  "qwen2": lambda vocab: transformers.Qwen2Config(
    vocab_size=vocab,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    max_position_embeddings=64,
  ),
  "mistral": lambda vocab: transformers.MistralConfig(
    vocab_size=vocab,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=128,
    head_dim=32,
    sliding_window=None,
    max_position_embeddings=64,
  ),
  "gpt2": lambda vocab: transformers.GPT2Config(
    vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
  ),
}


def make_hf_model(kind: str, directory, vocab: int = VOCAB, seed: int = 0):
  """A randomly initialised transformers model saved as safetensors in `directory`."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind](vocab)).eval()
  # Norm scales and biases start at 1 and 0; perturb them so a misplaced one changes the logits.
  with torch.no_grad():
    for tensor in model.parameters():
      if tensor.ndim == 1:
        tensor.add_(0.1 * torch.randn_like(tensor))
  model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="100KB" if kind == "llama" else "50MB")
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def loom_logits(model_cfg, params: dict, tokens: np.ndarray) -> np.ndarray:
  graphdef, state = abstract_model(model_cfg)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  segments = np.ones_like(tokens)
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions)))


def tokens_batch(vocab: int = VOCAB, length: int = 24) -> np.ndarray:
  return np.random.default_rng(1).integers(0, vocab, (2, length)).astype(np.int32)


def leaves(tree: dict, prefix: str = "") -> dict:
  """{'blocks/attn/wq': leaf, ...} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(leaves(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_imported_model_gives_the_logits_of_transformers(tmp_path, kind):
  model = make_hf_model(kind, tmp_path / "hf")
  if kind == "llama":
    assert os.path.isfile(tmp_path / "hf" / huggingface_io.INDEX_FILE)  # The sharded layout is read.
  config, params = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  tokens = tokens_batch()
  expected = hf_logits(model, tokens)
  got = loom_logits(config.model, params, tokens)
  assert got.shape == expected.shape == (2, 24, VOCAB)
  print(f"{kind}: max |loom - transformers| = {np.abs(got - expected).max():.1e}")  # pytest -s
  assert np.abs(got - expected).max() <= TOLERANCE
  assert np.abs(expected).max() > 0.1  # The comparison is not between two near-zero arrays.
  assert config.model.qkv_bias == (kind == "qwen2")
  assert config.model.tie_embeddings == (kind in ("qwen2", "gpt2"))

  # The written config.py is a valid loom config for this model, pointing at the checkpoint.
  spec = importlib.util.spec_from_file_location("imported_config", tmp_path / "loom" / "config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  written = validate(module.get_config(), 1, tokenizer_vocab_size=VOCAB)
  for key, value in huggingface.loom_model_config(model.config.to_dict()).items():
    assert written.model[key] == value, key
  assert written.init.checkpoint == str(tmp_path / "loom")
  record = Checkpointer(str(tmp_path / "loom" / "checkpoints"), async_save=False).record(0)
  assert record["imported_from"]["path"] == str(tmp_path / "hf")
  assert record["imported_from"]["hf_config"]["model_type"] == kind
  assert record["config"]["model"]["num_layers"] == 2


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_export_loads_in_transformers_and_round_trips_exactly(tmp_path, kind):
  model = make_hf_model(kind, tmp_path / "hf")
  config, params = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  written = huggingface_io.export_hf(str(tmp_path / "loom"), None, str(tmp_path / "exported"), kind)
  assert str(tmp_path / "exported" / "model.safetensors") in written

  # The exported tensors are the original ones, bit for bit.
  original = huggingface_io.read_safetensors(str(tmp_path / "hf"))
  exported = huggingface_io.read_safetensors(str(tmp_path / "exported"))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert np.array_equal(exported[name], value), name

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
  tokens = tokens_batch()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))

  # Export then import gives back loom's parameters bit for bit.
  config_again, params_again = huggingface_io.import_hf(str(tmp_path / "exported"), str(tmp_path / "again"))
  assert config_again.model.to_dict() == config.model.to_dict()
  flat, flat_again = leaves(params), leaves(params_again)
  assert sorted(flat) == sorted(flat_again)
  for name, value in flat.items():
    assert value.dtype == flat_again[name].dtype == np.float32
    assert np.array_equal(value, flat_again[name]), name


def test_mapping_inverts_exactly_and_bfloat16_export_rounds_once():
  """Pure functions: loom params -> HF tensors -> loom params, and a bfloat16 export."""
  bfloat16 = huggingface_io.EXPORT_DTYPES["bfloat16"]
  for kind in ("llama", "qwen2", "gpt2"):
    model_cfg = huggingface.loom_model_config(HF_CONFIGS[kind](VOCAB).to_dict())
    params = random_params(model_cfg)
    flat = leaves(params)
    tensors = huggingface.hf_tensors(params, model_cfg, kind)
    back = leaves(huggingface.params_from_hf(tensors, model_cfg))
    assert sorted(back) == sorted(flat)
    assert all(np.array_equal(back[name], flat[name]) for name in flat)
    rounded = {name: value.astype(bfloat16) for name, value in tensors.items()}
    back = leaves(huggingface.params_from_hf(rounded, model_cfg))
    for name, value in flat.items():
      assert np.array_equal(back[name], value.astype(bfloat16).astype(np.float32))


def random_params(model_fields: dict, seed: int = 0) -> dict:
  """loom's parameter pure dict for `model_fields` (loom_model_config's), random normal float32."""
  config = base.get_config()
  config.model.update(**model_fields)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), nnx.to_pure_dict(abstract_model(config.model)[1])
  )


def test_pickle_only_directory_is_refused_without_opening_it(tmp_path):
  make_hf_model("gpt2", tmp_path / "hf")
  os.remove(tmp_path / "hf" / "model.safetensors")
  # Not even a pickle: any attempt to load it would fail with a different error.
  (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04 this is never read")
  with pytest.raises(
    ValueError,
    match=r"pickle weights only \(pytorch_model\.bin\).*never unpickles.*"
    r"safe_serialization=True",
  ):
    huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  assert not os.path.exists(tmp_path / "loom")


@pytest.mark.parametrize(
  "kind, change, field",
  [
    (
      "llama",
      {
        "rope_scaling": {
          "rope_type": "llama3",
          "factor": 8.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192,
        }
      },
      "rope_",
    ),
    ("mistral", {"sliding_window": 16}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"model_type": "bert"}, "model_type"),
    ("llama", {"num_attention_heads": "four"}, "num_attention_heads'='four': expected a positive integer"),
    ("gpt2", {"n_layer": 0}, "n_layer'=0: expected a positive integer"),
    ("llama", {"rms_norm_eps": "small"}, "rms_norm_eps'='small': expected a positive number"),
    ("gpt2", {"tie_word_embeddings": "yes"}, "tie_word_embeddings'='yes': expected true or false"),
  ],
)
def test_features_loom_cannot_compute_are_refused_by_name(kind, change, field):
  hf = HF_CONFIGS[kind](VOCAB).to_dict()
  hf.update(change)
  with pytest.raises(ValueError, match=re.escape(f"config.json field '{field}")):
    huggingface.loom_model_config(hf)
  # A sliding window as long as the context is full attention: accepted.
  if kind == "mistral":
    hf.update(sliding_window=64)
    assert huggingface.loom_model_config(hf)["max_seq_len"] == 64


def test_wrong_shapes_and_leftover_tensors_are_refused():
  model_cfg = huggingface.loom_model_config(HF_CONFIGS["llama"](VOCAB).to_dict())
  tensors = huggingface.hf_tensors(random_params(model_cfg), model_cfg, "llama")
  with pytest.raises(ValueError, match=r"no place for: model\.layers\.0\.self_attn\.q_norm\.weight"):
    huggingface.params_from_hf({**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(16)}, model_cfg)
  with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\); the config says \(64,\)"):
    huggingface.params_from_hf({**tensors, "model.norm.weight": np.ones(3)}, model_cfg)
  del tensors["lm_head.weight"]
  with pytest.raises(ValueError, match=r"no tensor 'lm_head\.weight'"):
    huggingface.params_from_hf(tensors, model_cfg)
  with pytest.raises(ValueError, match=r"model\.norm='rmsnorm' cannot be exported as gpt2"):
    huggingface.hf_config(model_cfg, "gpt2")


CHAT = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Hi there, loom?"},
  {"role": "assistant", "content": "Hello!\nHow can I help?"},
]
TEXTS = ["Hello world", " two  spaces\nand a newline", "loom trains 123 models", "ünïcödé ☃"]


def test_sentencepiece_tokenizer_and_chat_template_travel_with_the_weights(tmp_path):
  """Llama 2 / Mistral style: tokenizer.model in, tokenizer.model out; transformers tokenizes as loom."""
  corpus = [" ".join(TEXTS + [message["content"] for message in CHAT])] * 20
  sp_path = train_sentencepiece(corpus, str(tmp_path / "sp.model"), vocab_size=300)
  make_hf_model("llama", tmp_path / "hf", vocab=300)
  (tmp_path / "hf" / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
  config, _ = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  assert config.data.tokenizer == "sentencepiece"
  assert config.data.tokenizer_path == str(tmp_path / "loom" / "tokenizer.model")

  huggingface_io.export_hf(str(tmp_path / "loom"), None, str(tmp_path / "exported"), "llama")
  tokenizer_config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
  assert tokenizer_config["chat_template"] == huggingface_io.chatml_template()
  assert (tmp_path / "exported" / "tokenizer.model").read_bytes() == open(sp_path, "rb").read()
  generation = json.loads((tmp_path / "exported" / "generation_config.json").read_text())
  assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

  loom = SentencePieceTokenizer(sp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
  for text in TEXTS:
    assert hf(text, add_special_tokens=False)["input_ids"] == loom.encode_batch([text])[0].tolist(), text
  ids, _ = render_chat(CHAT, loom)
  assert _chat_ids(hf, CHAT) == ids.tolist()


def _byte_level_bpe(path: str) -> None:
  """A small GPT-2-style tokenizer.json, with GPT-2's <|endoftext|> and the ChatML markers as added tokens."""
  import tokenizers

  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(TEXTS * 10, trainer)
  tokenizer.save(path)


def test_tokenizer_json_is_loom_tokenizer_and_travels_with_the_weights(tmp_path):
  """Llama 3 / Qwen2 / GPT-2 style: tokenizer.json, used by loom through data.tokenizer='huggingface'."""
  make_hf_model("gpt2", tmp_path / "hf", vocab=300)
  _byte_level_bpe(str(tmp_path / "hf" / "tokenizer.json"))
  (tmp_path / "hf" / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
  )
  config, _ = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  assert (config.data.tokenizer, config.data.tokenizer_path) == (
    "huggingface",
    str(tmp_path / "loom" / "tokenizer.json"),
  )

  loom = build_tokenizer(config.data, corpus_texts=None, workdir=str(tmp_path / "work"))
  assert isinstance(loom, HuggingFaceTokenizer)
  assert (loom.bos_id, loom.eos_id, loom.pad_id) == (0, 0, None)
  assert loom.special_id("<|im_start|>") == 1 and loom.special_id("<|im_end|>") == 2
  assert loom.special_id("<|not a token|>") is None
  assert 259 < loom.vocab_size <= 300  # 3 added tokens, 256 bytes and some merges.
  for text in TEXTS:
    ids = loom.encode_batch([text])[0]
    assert ids.dtype == np.int32 and loom.decode(ids) == text
  assert loom.decode([0, *loom.encode_batch(["Hello"])[0], 0]) == "Hello"  # bos/eos carry no text.
  assert loom.identity().startswith("huggingface:")

  huggingface_io.export_hf(str(tmp_path / "loom"), None, str(tmp_path / "exported"), "gpt2")
  tokenizer_config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
  assert tokenizer_config["chat_template"] == huggingface_io.chatml_template()
  assert tokenizer_config["tokenizer_class"] == "GPT2Tokenizer"  # The source's settings are kept.
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
  for text in TEXTS:
    assert hf(text, add_special_tokens=False)["input_ids"] == loom.encode_batch([text])[0].tolist(), text
  ids, _ = render_chat(CHAT, loom)
  assert ids[0] == 0 and 1 in ids.tolist()  # bos, then <|im_start|> as one token.
  assert _chat_ids(hf, CHAT) == ids.tolist()


def test_byte_tokenizer_exports_as_tokenizer_json(tmp_path):
  """A run with loom's byte tokenizer: the config given to export_hf overrides the checkpoint's."""
  make_hf_model("llama", tmp_path / "hf", vocab=259)
  config, _ = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  config.data.tokenizer = "byte"
  config.model.vocab_size = 0  # As in a config file: the record's size is used.
  huggingface_io.export_hf(str(tmp_path / "loom"), config, str(tmp_path / "exported"), "llama")
  exported_config = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert (
    exported_config["vocab_size"],
    exported_config["bos_token_id"],
    exported_config["eos_token_id"],
    exported_config["pad_token_id"],
  ) == (259, 1, 2, 0)

  loom = ByteTokenizer()
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
  for text in TEXTS + ["\x00\x7f bytes <|im_start|>"]:
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == loom.encode_batch([text])[0].tolist(), text
    assert hf.decode(ids) == text
  ids, _ = render_chat(CHAT, loom)
  assert _chat_ids(hf, CHAT) == ids.tolist()


def _chat_ids(hf_tokenizer, messages) -> list[int]:
  ids = hf_tokenizer.apply_chat_template(messages, tokenize=True)
  return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_tools_import_and_export_as_a_user_would(tmp_path):
  make_hf_model("gpt2", tmp_path / "hf")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")

  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)

  imported = run("tools/hf_import.py", f"--hf_dir={tmp_path / 'hf'}", f"--output={tmp_path / 'loom'}")
  assert imported.returncode == 0, imported.stderr
  assert f"{tmp_path / 'loom' / 'checkpoints' / '0'}: 0.11M parameters, 2 layers" in imported.stdout
  exported = run(
    "tools/hf_export.py", f"--workdir={tmp_path / 'loom'}", f"--output={tmp_path / 'out'}", "--model_type=llama"
  )
  assert exported.returncode != 0
  assert exported.stderr.strip().splitlines()[-1] == (
    "hf_export: model.norm='layernorm' cannot be exported as llama (it needs 'rmsnorm')"
  )
  assert "Traceback" not in exported.stderr
  exported = run(
    "tools/hf_export.py",
    f"--checkpoint={tmp_path / 'loom' / 'checkpoints' / '0'}",
    f"--output={tmp_path / 'out'}",
    "--model_type=gpt2",
  )
  assert exported.returncode == 0, exported.stderr
  assert str(tmp_path / "out" / "model.safetensors") in exported.stdout.splitlines()
  original = huggingface_io.read_safetensors(str(tmp_path / "hf"))
  written = huggingface_io.read_safetensors(str(tmp_path / "out"))
  assert sorted(written) == sorted(original)
  assert all(np.array_equal(written[name], value) for name, value in original.items())


def _no_weights_read(monkeypatch):
  """Makes reading a Hugging Face model's weights or restoring a loom checkpoint's parameters fail the test."""

  def fail(*args, **kwargs):
    raise AssertionError("weights were read before the output was checked")

  monkeypatch.setattr(huggingface_io, "read_safetensors", fail)
  monkeypatch.setattr(huggingface_io, "load_params", fail)


def test_import_refuses_an_output_it_must_not_write_before_reading_weights(tmp_path, monkeypatch):
  make_hf_model("gpt2", tmp_path / "hf")
  (tmp_path / "stale").mkdir()
  (tmp_path / "stale" / "config.py").write_text("# the user's own config\n")
  (tmp_path / "stale" / "tokenizer.json").write_text("{}")
  (tmp_path / "a_file").write_text("")
  _no_weights_read(monkeypatch)
  hf = str(tmp_path / "hf")
  cases = [
    (
      tmp_path / "stale",
      r"--output=\S+/stale is not empty: it holds config\.py, tokenizer\.json; "
      "a new or empty directory is expected",
    ),
    (tmp_path / "a_file", r"--output=\S+/a_file is a file; a new or empty directory is expected"),
    (tmp_path / "hf", r"--output=\S+/hf is the same directory as --hf_dir=\S+/hf; choose"),
    (tmp_path / "hf" / "loom", r"--output=\S+/hf/loom is inside --hf_dir=\S+/hf; choose"),
  ]
  for output, message in cases:
    with pytest.raises(ValueError, match=message):
      huggingface_io.import_hf(hf, str(output))
  assert (tmp_path / "stale" / "config.py").read_text() == "# the user's own config\n"
  assert not os.path.exists(tmp_path / "hf" / "loom")


def test_export_refuses_an_output_it_must_not_write_before_restoring(tmp_path, monkeypatch):
  make_hf_model("gpt2", tmp_path / "hf")
  huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  huggingface_io.export_hf(str(tmp_path / "loom"), None, str(tmp_path / "exported"), "gpt2")
  config_py = (tmp_path / "loom" / "config.py").read_text()
  _no_weights_read(monkeypatch)
  loom = str(tmp_path / "loom")
  with pytest.raises(
    ValueError,
    match=r"--output=\S+/exported is not empty: it holds config\.json, "
    r"generation_config\.json, model\.safetensors; a new or empty directory is expected",
  ):
    huggingface_io.export_hf(loom, None, str(tmp_path / "exported"), "gpt2")
  with pytest.raises(
    ValueError,
    match=r"--output=\S+/loom is not empty \(a loom workdir or checkpoint "
    r"directory\): it holds checkpoints, config\.py",
  ):
    huggingface_io.export_hf(loom, None, loom, "gpt2")
  with pytest.raises(
    ValueError,
    match=r"--output=\S+/loom/checkpoints/hf is inside the run's checkpoint "
    r"directory \S+/loom/checkpoints",
  ):
    huggingface_io.export_hf(loom, None, str(tmp_path / "loom" / "checkpoints" / "hf"), "gpt2")
  assert (tmp_path / "loom" / "config.py").read_text() == config_py
  assert sorted(os.listdir(tmp_path / "loom")) == ["checkpoints", "config.py"]


def test_export_refuses_a_config_whose_model_differs_from_the_checkpoint(tmp_path, monkeypatch):
  make_hf_model("llama", tmp_path / "hf")
  config, _ = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  _no_weights_read(monkeypatch)
  given = base.get_config()  # A config file's model: another size, num_kv_heads and head_dim left 0.
  given.model.update(
    norm="rmsnorm",
    position="rope",
    mlp="swiglu",
    num_layers=3,
    embed_dim=64,
    num_heads=4,
    max_seq_len=64,
    mlp_dim=128,
    tie_embeddings=False,
  )
  with pytest.raises(
    ValueError,
    match=r"checkpoints/0: the given config's model differs from the one the "
    r"checkpoint was saved with \(norm_eps: saved 1e-06 vs given 1e-05; num_kv_heads: saved 2 vs "
    r"given 4 \(0: num_heads\); num_layers: saved 2 vs given 3\); omit --config to use the "
    "checkpoint's own",
  ):
    huggingface_io.export_hf(str(tmp_path / "loom"), given, str(tmp_path / "exported"), "llama")
  assert not os.path.exists(tmp_path / "exported")
  # The run's own config, as a config file gives it (0 for the derived fields) and with other
  # runtime settings, is accepted.
  same = base.get_config()
  same.model.update(
    {**config.model.to_dict(), "vocab_size": 0, "head_dim": 0, "dtype": "bfloat16", "scan_layers": False}
  )
  full, _ = huggingface_io.checkpoint_config(str(tmp_path / "loom"), same)
  assert (full.model.vocab_size, full.model.head_dim, full.model.num_kv_heads) == (VOCAB, 16, 2)


def test_failed_import_leaves_no_output_behind(tmp_path, monkeypatch):
  make_hf_model("gpt2", tmp_path / "hf")
  write_config_py = huggingface_io._write_config_py

  def fail_mid_write(path, *args):
    with open(path, "w") as f:
      f.write('"""loom config')
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(huggingface_io, "_write_config_py", fail_mid_write)
  with pytest.raises(OSError, match="No space left"):
    huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "out" / "loom"))
  assert os.listdir(tmp_path / "out") == []  # Neither the output nor a temporary directory.

  # The rerun is not refused, and writes a complete output.
  monkeypatch.setattr(huggingface_io, "_write_config_py", write_config_py)
  huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "out" / "loom"))
  assert sorted(os.listdir(tmp_path / "out")) == ["loom"]
  assert sorted(os.listdir(tmp_path / "out" / "loom")) == ["checkpoints", "config.py"]


def test_import_refuses_an_output_filled_while_it_ran(tmp_path, monkeypatch):
  make_hf_model("gpt2", tmp_path / "hf")
  output = tmp_path / "out" / "loom"
  write_config_py = huggingface_io._write_config_py

  def someone_else_writes_there(path, *args):
    write_config_py(path, *args)
    output.mkdir(parents=True)
    (output / "theirs.txt").write_text("")

  monkeypatch.setattr(huggingface_io, "_write_config_py", someone_else_writes_there)
  with pytest.raises(
    ValueError,
    match=r"--output=.*loom: cannot move the finished directory into place .*"
    r"must stay new or empty",
  ):
    huggingface_io.import_hf(str(tmp_path / "hf"), str(output))
  assert os.listdir(tmp_path / "out") == ["loom"]  # No temporary directory left beside it.
  assert os.listdir(output) == ["theirs.txt"]  # What was there is left alone.
