"""The commands under tools/: each run once as a user would, as a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np

from data.special_tokens import IM_END, IM_START
from data.tokenizers import SentencePieceTokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(tmp_path, paths: str, name: str = "corpus_config.py") -> str:
  path = tmp_path / name
  path.write_text(
    "from configs import base\n\n\n"
    "def get_config():\n"
    "  config = base.get_config()\n"
    f'  config.data.sources = {{"main": base.source(paths={paths!r})}}\n'
    '  config.data.update(seq_len=32, tokenizer="sentencepiece", tokenizer_vocab_size=320)\n'
    "  return config\n"
  )
  return str(path)


def _corpus(tmp_path) -> str:
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "loom", "weave", "thread", "(", ")", "=", "\n"]
  (tmp_path / "corpus").mkdir()
  for i in range(6):
    (tmp_path / "corpus" / f"{i}.txt").write_text(" ".join(rng.choice(words, size=2000)))
  return str(tmp_path / "corpus" / "*.txt")


def _run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_train_tokenizer_and_prepare_data(tmp_path):
  config = _write_config(tmp_path, _corpus(tmp_path))
  model_path = str(tmp_path / "tok.model")
  trained = _run(
    "tools/train_tokenizer.py",
    f"--config={config}",
    f"--output={model_path}",
    "--vocab_size=300",
    "--model_type=bpe",
    "--special_tokens=<tool>",
  )
  assert trained.returncode == 0, trained.stderr
  assert "wrote" in trained.stdout and "300 pieces" in trained.stdout
  tokenizer = SentencePieceTokenizer(model_path)
  assert tokenizer.vocab_size == 300
  assert all(tokenizer.special_id(piece) is not None for piece in (IM_START, IM_END, "<tool>"))

  output = tmp_path / "prepared"
  prepared = _run(
    "tools/prepare_data.py",
    f"--config={config}",
    f"--output={output}",
    f"--config.data.tokenizer_path={model_path}",
    "--chunk_tokens=2000",
  )
  assert prepared.returncode == 0, prepared.stderr
  meta = json.loads((output / "main" / "meta.json").read_text())
  assert meta["seq_len"] == 32 and meta["splits"]["train"]["num_rows"] > 10
  assert meta["metadata"]["tokenizer"] == tokenizer.identity()
  assert (output / "main" / "tokenizer.model").read_bytes() == open(model_path, "rb").read()
  # Preparing again into a finished directory is refused in one line.
  again = _run(
    "tools/prepare_data.py", f"--config={config}", f"--output={output}", f"--config.data.tokenizer_path={model_path}"
  )
  assert again.returncode != 0
  assert again.stderr.strip().splitlines()[-1].startswith("config error (")
  assert "already holds a prepared dataset" in again.stderr and "Traceback" not in again.stderr


def test_tools_report_an_unknown_source_in_one_line(tmp_path):
  config = _write_config(tmp_path, _corpus(tmp_path))
  result = _run("tools/prepare_data.py", f"--config={config}", f"--output={tmp_path / 'out'}", "--sources=nope")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "no data.sources named ['nope']" in result.stderr


def test_tools_refuse_bad_outputs_and_inputs_in_one_line(tmp_path):
  corpus = _corpus(tmp_path)
  config = _write_config(tmp_path, corpus)
  recursive = _write_config(tmp_path, str(tmp_path / "corpus" / "**"), name="recursive_config.py")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  empty = _write_config(tmp_path, str(tmp_path / "empty" / "*.txt"), name="empty_config.py")
  (tmp_path / "a_file").write_text("")
  cases = {  # arguments -> what the one line says
    ("tools/prepare_data.py", f"--config={config}", f"--output={tmp_path / 'a_file'}"): "flag error: --output="
    + str(tmp_path / "a_file")
    + " is a file; a directory path is expected",
    (
      "tools/prepare_data.py",
      f"--config={recursive}",
      f"--output={tmp_path / 'corpus' / 'prepared'}",
    ): "is inside data.sources.main.paths=",
    (
      "tools/prepare_data.py",
      f"--config={empty}",
      f"--output={tmp_path / 'p2'}",
      "--config.data.tokenizer=byte",
    ): "data.sources.main: no usable documents (1 empty_file)",
    (
      "tools/train_tokenizer.py",
      f"--config={config}",
      f"--output={tmp_path}",
      "--vocab_size=300",
    ): "flag error: --output=" + str(tmp_path) + " is a directory; a file path is expected",
    (
      "tools/train_tokenizer.py",
      f"--config={empty}",
      f"--output={tmp_path / 't.model'}",
    ): "data.sources main: no text to train a tokenizer on (every document is empty or bad: 1 empty_file)",
    (
      "tools/make_tfds_dataset.py",
      "--name=c",
      "--version=1.0",
      f"--paths={corpus}",
      f"--data_dir={tmp_path / 'tfds'}",
    ): "make_tfds_dataset: version='1.0'",
  }
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  processes = {
    args: subprocess.Popen(
      [sys.executable, *args], cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for args in cases
  }
  for args, process in processes.items():
    _, stderr = process.communicate(timeout=180)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith(("W", "I"))]  # absl logs
    assert process.returncode != 0 and "Traceback" not in stderr, (args, stderr)
    assert len(lines) == 1 and cases[args] in lines[0], (args, stderr)
  assert not (tmp_path / "corpus" / "prepared").exists()
