"""tools/generate.py, run as a user would (a subprocess): it generates what model.generate does from a
checkpoint's parameters with its tokenizer, renders chat prompts with the fine-tuning template, and
refuses bad flags and inputs in one line, before loading the model."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model as model_lib
from data.special_tokens import IM_END, IM_START
from data.tokenizers import ByteTokenizer
from tests import synthetic
from training.checkpointing import Checkpointer
from training.state import abstract_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with one parameters-only checkpoint of a tiny byte-level model (max_seq_len 128):
  (workdir, graphdef, params)."""
  workdir = tmp_path_factory.mktemp("run")
  config = synthetic.tiny_config(vocab_size=ByteTokenizer().vocab_size)
  config.data.tokenizer = "byte"
  config.model.max_seq_len = 128  # Room for a chat prompt in bytes.
  config = synthetic.validated(config, 1)
  graphdef, abstract = abstract_model(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), leaf.dtype), abstract)
  checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save_params(0, params, {"step": 0, "config": json.loads(config.to_json())})
  checkpointer.close()
  return workdir, graphdef, params


def _run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "tools/generate.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def test_generates_what_model_generate_does_with_the_chat_template(run, tmp_path):
  workdir, graphdef, params = run
  tokenizer = ByteTokenizer()
  prompts = tmp_path / "prompts.jsonl"
  conversation = [{"role": "user", "content": "hi"}]
  prompts.write_text(
    json.dumps({"prompt": "def f("}) + "\n\n" + json.dumps({"messages": conversation}) + "\n", encoding="utf-8"
  )
  output = tmp_path / "out" / "completions.jsonl"
  result = _run(
    f"--checkpoint={workdir}",
    f"--prompts={prompts}",
    "--system=Be brief.",
    "--max_new_tokens=12",
    f"--output={output}",
  )
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r.get("prompt") for r in records] == ["def f(", None] and records[1]["messages"] == conversation
  # The chat prompt: ChatML as fine-tuning renders it (the markers spelled out in bytes), the system
  # message first, then the header of the reply.
  chat_ids = records[1]["prompt_tokens"]
  assert chat_ids[0] == tokenizer.bos_id
  assert tokenizer.decode(chat_ids[1:]) == (
    f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
  )
  plain_ids = tokenizer.encode_batch(["def f("])[0].tolist()
  assert records[0]["prompt_tokens"] == plain_ids
  expected = model_lib.generate(graphdef, params, [plain_ids, chat_ids], 12, stop_tokens=[tokenizer.eos_id])
  assert [r["tokens"] for r in records] == expected
  assert records[0]["completion"] == tokenizer.decode(expected[0])
  assert result.stdout.startswith("def f(" + tokenizer.decode(expected[0]))

  # One --prompt, its checkpoints/STEP named, sampled: the same tokens for the same seed.
  sampled = [
    _run(f"--checkpoint={workdir}/checkpoints/0", "--prompt=x = ", "--max_new_tokens=6", "--temperature=1", "--top_k=5")
    for _ in range(2)
  ]
  assert sampled[0].returncode == 0, sampled[0].stderr
  assert sampled[0].stdout == sampled[1].stdout and sampled[0].stdout.startswith("x = ")


def test_bad_inputs_are_one_line_before_the_model_is_loaded(run, tmp_path):
  workdir, _, _ = run
  # A checkpoint whose arrays are gone: an error found before loading never notices.
  hollow = tmp_path / "hollow"
  shutil.copytree(workdir, hollow)
  params_dir = hollow / "checkpoints" / "0" / "params"
  shutil.rmtree(params_dir)
  params_dir.mkdir()
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  malformed = tmp_path / "malformed.jsonl"
  malformed.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
  no_role = tmp_path / "no_role.jsonl"
  no_role.write_text('{"messages": [{"content": "hi"}]}\n')
  cases = {
    "a prompt longer than the context": (
      [f"--checkpoint={hollow}", "--prompt=" + "y" * 125, "--max_new_tokens=8"],
      "generate: --prompt: the prompt has 125 tokens; with --max_new_tokens=8 it needs 133 positions, "
      "more than the model's max_seq_len=128",
    ),
    "an empty prompt file": (
      [f"--checkpoint={hollow}", f"--prompts={empty}"],
      f"generate: --prompts={empty} holds no prompts",
    ),
    "a malformed line": (
      [f"--checkpoint={hollow}", f"--prompts={malformed}"],
      f"generate: --prompts={malformed}:2: not a JSON object",
    ),
    "a message without a role": (
      [f"--checkpoint={hollow}", f"--prompts={no_role}"],
      f'generate: --prompts={no_role}:1: message 0 has no "role"',
    ),
    "a missing prompt file": (
      [f"--checkpoint={hollow}", f"--prompts={tmp_path / 'absent.jsonl'}"],
      f"generate: --prompts={tmp_path / 'absent.jsonl'}: cannot be read",
    ),
    "a missing checkpoint": (
      [f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=a"],
      f"generate: --checkpoint: {tmp_path / 'nowhere'} is not a directory",
    ),
    "a missing step": (
      [f"--checkpoint={workdir}/checkpoints/7", "--prompt=a"],
      f"generate: --checkpoint: {workdir}/checkpoints has no step 7",
    ),
  }
  for name, (args, message) in cases.items():
    result = _run(*args)
    assert result.returncode != 0, name
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(message), (name, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, name
