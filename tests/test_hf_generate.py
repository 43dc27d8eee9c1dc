"""Generation from a model imported from Hugging Face: greedy decoding with loom's key/value cache gives
the tokens of transformers' own greedy `generate`, in Python and through tools/generate.py with the
model's own tokenizer. Models are tiny and random (nothing is downloaded); needs transformers, torch."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import model as model_lib
import sharding
from tests.test_huggingface import _byte_level_bpe, make_hf_model
from tools import huggingface_io
from training.state import abstract_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 3, 99, 12], [40], [9, 1, 40, 22, 8, 61, 2, 77, 31, 6, 6]]
NEW_TOKENS = 16


def hf_greedy(model, prompt: list[int], new_tokens: int, eos: int | None = None) -> list[int]:
  """transformers' greedy generate of one unpadded prompt: the new tokens, up to and without eos."""
  with torch.no_grad():
    out = model.generate(
      torch.tensor([prompt], dtype=torch.long),
      attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
      max_new_tokens=new_tokens,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=0,
    )
  tokens = out[0, len(prompt) :].tolist()
  return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def imported(tmp_path, kind: str, vocab: int = 128):
  """(transformers model, loom graphdef, loom params) of one random model, imported with hf_import's code."""
  hf = make_hf_model(kind, tmp_path / "initialised", vocab=vocab)
  # Larger weights than the initialisation's: attention that depends on positions and cached keys, and
  # greedy paths that move on (GPT-2's random init repeats one token), 1e-3 or more between the top two.
  with torch.no_grad():
    for tensor in hf.parameters():
      if tensor.ndim == 2:
        tensor.mul_(5.0)
  hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
  hf.generation_config.eos_token_id = None  # Greedy to the end unless a test names its stop token.
  config, pure = huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  graphdef, state = abstract_model(config.model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return hf, graphdef, state


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_gives_the_tokens_of_transformers(tmp_path, kind):
  hf, graphdef, params = imported(tmp_path, kind)
  expected = [hf_greedy(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
  assert sum(len(set(row)) > 1 for row in expected) >= 2  # Not one token repeated: positions matter.
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4])
  assert model_lib.generate(graphdef, params, PROMPTS, NEW_TOKENS, mesh=mesh) == expected
  # Stopping: transformers ends a row at its eos; loom at the same stop token, which it leaves out.
  stop = expected[2][5]
  stopped = [hf_greedy(hf, prompt, NEW_TOKENS, eos=stop) for prompt in PROMPTS]
  assert model_lib.generate(graphdef, params, PROMPTS, NEW_TOKENS, stop_tokens=[stop]) == stopped


def test_the_tool_generates_with_the_imported_tokenizer(tmp_path):
  hf = make_hf_model("gpt2", tmp_path / "hf", vocab=300)  # GPT-2's eos: token 0, <|endoftext|>.
  _byte_level_bpe(str(tmp_path / "hf" / "tokenizer.json"))
  (tmp_path / "hf" / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
  )
  huggingface_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "loom"))
  import transformers

  hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
  prompt = "Hello world"
  ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
  expected = hf_greedy(hf, ids, 10, eos=0)

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  output = tmp_path / "out.jsonl"
  result = subprocess.run(
    [
      sys.executable,
      "tools/generate.py",
      f"--checkpoint={tmp_path / 'loom'}",
      f"--prompt={prompt}",
      "--max_new_tokens=10",
      f"--output={output}",
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  record = json.loads(output.read_text())
  assert record["prompt_tokens"] == ids
  assert record["tokens"] == expected
  completion = hf_tokenizer.decode(expected, skip_special_tokens=True)
  assert record["completion"] == completion and result.stdout == prompt + completion + "\n"
  assert np.asarray(expected).size > 0
