"""End-to-end training: golden first step, learning, gradient accumulation, exact resume."""

import json
import os

import jax
import numpy as np
import pytest

import sharding
from configs import base
from tests import synthetic
from training.run import train
from training.setup import build_setup
from training.validation import ConfigError

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_corpus(directory, num_files=4, lines_per_file=300, seed=0):
  """Sentences with learnable structure: 'three plus four is seven.'"""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for f in range(num_files):
    lines = []
    for _ in range(lines_per_file):
      a, b = rng.integers(0, 5, 2)
      lines.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
    with open(os.path.join(directory, f"part{f}.txt"), "w") as out:
      out.write("\n".join(lines) + "\n")
  return os.path.join(directory, "*.txt")


def corpus_config(tmp_path, **train):
  config = synthetic.tiny_config(vocab_size=0)
  config.data.sources = {"main": base.source(paths=write_corpus(str(tmp_path / "corpus")))}
  config.data.update(tokenizer="byte")
  config.mesh.update(data=2, fsdp=2, tensor=2)  # all 8 test devices
  config.train.update(**train)
  return config


def one_step(config, batch, num_devices=1):
  setup = build_setup(synthetic.validated(config, num_devices), devices=jax.devices()[:num_devices])
  state = setup.init_state()
  before = jax.device_get(state.params)
  state, metrics = setup.train_step()(state, sharding.global_batch_from_local(batch, setup.mesh))
  return before, jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


def test_golden_first_step():
  """Pins the loss and gradient norm of the tiny model's first step on a fixed batch."""
  config = synthetic.tiny_config()
  batch = synthetic.batch(16, config.data.seq_len, config.model.vocab_size, seed=1)
  _, _, metrics = one_step(config, batch)
  assert metrics["loss"] == pytest.approx(5.55129, abs=1e-4)  # ~ ln(256) at init
  assert metrics["grad_norm"] == pytest.approx(0.39613, abs=1e-4)
  assert metrics["tokens"] == 16 * 32 - 16 - 5


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_equals_large_batch(microbatches):
  # Plain SGD with lr 1: the update is the gradient itself.
  config = synthetic.tiny_config()
  config.optimizer.update(
    name="sgd",
    momentum=0.0,
    learning_rate=1.0,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip_norm=0.0,
  )
  batch = synthetic.batch(16, config.data.seq_len, config.model.vocab_size, seed=2)
  before, after_full, metrics_full = one_step(config, batch)
  config.train.microbatches = microbatches
  _, after_micro, metrics_micro = one_step(config, batch)
  assert metrics_micro["loss"] == pytest.approx(metrics_full["loss"], rel=1e-5)
  for b, full, micro in zip(jax.tree.leaves(before), jax.tree.leaves(after_full), jax.tree.leaves(after_micro)):
    update_full, update_micro = b - full, b - micro
    rel = np.linalg.norm(update_micro - update_full) / max(np.linalg.norm(update_full), 1e-12)
    assert rel <= 1e-5


def test_tiny_model_learns_the_corpus(tmp_path):
  config = corpus_config(tmp_path, num_steps=120, eval_every=60, log_every=20, checkpoint_every=60)
  (tmp_path / "corpus" / "empty.txt").write_text("")  # Bad data, skipped and counted.
  result = train(config, str(tmp_path / "run"))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert records[0] == {"step": 0, "data/skipped/empty_file": 1}
  first_loss = records[1]["loss"]
  assert first_loss > 3.0
  assert result.last_metrics["loss"] < 1.5
  assert result.eval_history[-1][1] < 1.5
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records if "eval_loss" in r] == [60, 120]
  assert {
    "loss",
    "perplexity",
    "learning_rate",
    "grad_norm",
    "param_norm",
    "step_time_ms",
    "tokens_per_second",
    "mfu",
  } <= set(records[-2])
  assert result.samples and all(isinstance(s, str) for s in result.samples)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tensorboard"))


def test_resume_is_bit_identical(tmp_path, capsys):
  """With dropout too: its masks come from the state's rng and step, which the checkpoint restores."""
  base = dict(num_steps=30, eval_every=0, checkpoint_every=10, log_every=5, num_samples=0)

  def dropout_config(**train):
    config = corpus_config(tmp_path, **dict(base, **train))
    config.model.dropout_rate = 0.1
    return config

  straight = train(dropout_config(), str(tmp_path / "straight"))
  # The same command twice: the first run is cut off at step 15 (checkpoint there), the second resumes.
  interrupted = str(tmp_path / "interrupted")
  first = train(dropout_config(stop_at_step=15), interrupted)
  assert int(first.state.step) == 15 and first.resumed_from is None
  capsys.readouterr()
  resumed = train(dropout_config(), interrupted)  # The corpus is written again, unchanged.
  assert resumed.resumed_from == 15
  assert "rows differ" not in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)
  records = [json.loads(line) for line in open(os.path.join(interrupted, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
  # The same command once more: the run is complete, so it does nothing (no training, no samples).
  again = train(dropout_config(num_samples=2), interrupted)
  assert again.resumed_from == 30 and again.samples == []


def test_resume_takes_compute_changes_and_refuses_a_different_model(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  steps = dict(eval_every=0, checkpoint_every=4, log_every=2, num_samples=0)
  train(corpus_config(tmp_path, num_steps=4, **steps), workdir)
  # How the same parameters are computed, the mesh and the optimizer may change on resume...
  changed = corpus_config(tmp_path, num_steps=8, **steps)
  changed.model.update(remat="full", scan_layers=not changed.model.scan_layers)
  changed.mesh.update(data=8, fsdp=1, tensor=1)
  changed.optimizer.learning_rate = 5e-4
  with open(tmp_path / "corpus" / "part0.txt", "a") as f:
    f.write("five plus four is nine.\n")
  capsys.readouterr()
  resumed = train(changed, workdir)
  assert resumed.resumed_from == 4 and int(resumed.state.step) == 8
  reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resumed with")]
  assert len(reported) == 1
  for change in (
    "model.remat: 'none' -> 'full'",
    "model.scan_layers: True -> False",
    "mesh.data: 2 -> 8",
    "optimizer.learning_rate: 0.003 -> 0.0005",
    "train.num_steps: 4 -> 8",
    "data.sources.main: its rows differ from the checkpointed run's",
  ):
    assert change in reported[0]
  # ...but not what the parameters mean, and the refused run leaves the workdir's config.json alone.
  saved_config = (tmp_path / "run" / "config.json").read_text()
  changed.model.num_layers = 3
  with pytest.raises(
    ConfigError,
    match=r"different run \(model.num_layers: 2 in the checkpoint, 3 now\); .*"
    r"only attention, attention_block, dropout_rate, dtype, init_std, loss_chunk, remat, "
    r"scan_layers may change",
  ):
    train(changed, workdir)
  assert (tmp_path / "run" / "config.json").read_text() == saved_config


def test_resume_sets_damaged_checkpoints_aside_and_survives_a_cut_log(tmp_path):
  import fcntl
  import shutil

  steps = dict(eval_every=0, checkpoint_every=10, log_every=5, num_samples=0)
  workdir = tmp_path / "run"
  train(corpus_config(tmp_path, num_steps=40, stop_at_step=30, **steps), str(workdir))
  shutil.rmtree(workdir / "checkpoints" / "30" / "params")  # A damaged disk, say.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "grad_no')  # A line a crash cut short.
  # Another process running in the workdir is refused.
  with open(workdir / ".lock", "a+") as other:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ConfigError, match=r"is in use by a running train.py"):
      train(corpus_config(tmp_path, num_steps=40, **steps), str(workdir))
  resumed = train(corpus_config(tmp_path, num_steps=40, **steps), str(workdir))
  assert resumed.resumed_from == 20 and int(resumed.state.step) == 40
  assert (workdir / "checkpoints" / "30.damaged").is_dir()  # Kept for inspection, never restored.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30, 40]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
  # With no readable checkpoint at all, one line says so instead of starting afresh over them.
  for step in (20, 30, 40):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "opt_state")
  with pytest.raises(ConfigError, match=r"holds no checkpoint this run can resume from \(step 40 lacks opt_state"):
    train(corpus_config(tmp_path, num_steps=50, **steps), str(workdir))
