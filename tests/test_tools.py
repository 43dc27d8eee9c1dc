"""The commands under tools/: each run once as a user would, as a subprocess."""
import json
import os
import subprocess
import sys

import numpy as np

from data.tokenizers import SentencePieceTokenizer
from data.special_tokens import IM_END, IM_START

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(tmp_path, paths: str) -> str:
  path = tmp_path / 'corpus_config.py'
  path.write_text(
      'from configs import base\n\n\n'
      'def get_config():\n'
      '  config = base.get_config()\n'
      f'  config.data.sources = {{"main": base.source(paths={paths!r})}}\n'
      '  config.data.update(seq_len=32, tokenizer="sentencepiece", tokenizer_vocab_size=320)\n'
      '  return config\n')
  return str(path)


def _corpus(tmp_path) -> str:
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'loom', 'weave', 'thread', '(', ')', '=', '\n']
  (tmp_path / 'corpus').mkdir()
  for i in range(6):
    (tmp_path / 'corpus' / f'{i}.txt').write_text(' '.join(rng.choice(words, size=2000)))
  return str(tmp_path / 'corpus' / '*.txt')


def _run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=180)


def test_train_tokenizer_and_prepare_data(tmp_path):
  config = _write_config(tmp_path, _corpus(tmp_path))
  model_path = str(tmp_path / 'tok.model')
  trained = _run('tools/train_tokenizer.py', f'--config={config}', f'--output={model_path}',
                 '--vocab_size=300', '--model_type=bpe', '--special_tokens=<tool>')
  assert trained.returncode == 0, trained.stderr
  assert 'wrote' in trained.stdout and '300 pieces' in trained.stdout
  tokenizer = SentencePieceTokenizer(model_path)
  assert tokenizer.vocab_size == 300
  assert all(tokenizer.special_id(piece) is not None for piece in (IM_START, IM_END, '<tool>'))

  output = tmp_path / 'prepared'
  prepared = _run('tools/prepare_data.py', f'--config={config}', f'--output={output}',
                  f'--config.data.tokenizer_path={model_path}', '--chunk_tokens=2000')
  assert prepared.returncode == 0, prepared.stderr
  meta = json.loads((output / 'main' / 'meta.json').read_text())
  assert meta['seq_len'] == 32 and meta['splits']['train']['num_rows'] > 10
  assert meta['metadata']['tokenizer'] == tokenizer.identity()
  assert (output / 'main' / 'tokenizer.model').read_bytes() == open(model_path, 'rb').read()
  # Preparing again into a finished directory is refused in one line.
  again = _run('tools/prepare_data.py', f'--config={config}', f'--output={output}',
               f'--config.data.tokenizer_path={model_path}')
  assert again.returncode != 0
  assert again.stderr.strip().splitlines()[-1].startswith('config error (')
  assert 'already holds a prepared dataset' in again.stderr and 'Traceback' not in again.stderr


def test_tools_report_an_unknown_source_in_one_line(tmp_path):
  config = _write_config(tmp_path, _corpus(tmp_path))
  result = _run('tools/prepare_data.py', f'--config={config}', f'--output={tmp_path / "out"}',
                '--sources=nope')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert "no data.sources named ['nope']" in result.stderr
