"""Checkpoints that survive faults: kill -9 at random moments, SIGTERM, retention."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from training.checkpointing import Checkpointer
from training.run import train
from training.setup import build_setup
from training.validation import ConfigError, validate

# Each kill costs a process start and a restore: 8 of them land in start-up, mid-save and between
# saves, and keep this, the suite's longest test, near 2 minutes.
KILLS = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frequent async saves (every 3 steps) of a tiny model: a kill often lands in the middle of one.
RUN_FLAGS = [
  "--config=configs/tiny.py",
  "--config.train.num_steps=240",
  "--config.train.checkpoint_every=3",
  "--config.train.log_every=3",
  "--config.train.eval_every=0",
  "--config.train.num_samples=0",
  "--config.train.keep_checkpoints=2",
]


def _start(workdir, *extra, compilation_cache=None):
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  if compilation_cache:  # Restarts skip compiling: the test spends its time on kills, not on XLA.
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return subprocess.Popen(
    [sys.executable, "train.py", f"--workdir={workdir}", *RUN_FLAGS, *extra],
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _final_params(workdir, step):
  config = validate(tiny.get_config(), 1, tokenizer_vocab_size=259)
  abstract = build_setup(config, devices=jax.devices()[:1]).abstract_state().params
  params = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_params(step, abstract)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def _kill_at_a_random_moment(process, rng) -> str:
  """SIGKILL during start-up (a quarter of the time), or once this attempt has logged a step 9 to
  24 steps past where it started, plus up to 1 s, while its saves (every 3 steps, asynchronous) are
  being written. Waiting for a logged step, not for a time, keeps the kills spread over the run on
  a loaded machine too: a save waits for the one before it, so by then this attempt has committed
  a checkpoint past its start, unless it dies mid-save."""
  lines = []
  if rng.uniform() < 0.25:
    time.sleep(rng.uniform(0.5, 5.0))
  else:
    start_step, target = 0, 3 * rng.integers(3, 9)
    for line in process.stdout:
      lines.append(line)
      if match := re.search(r"resumed at step (\d+)", line):
        start_step = int(match[1])
      if (match := re.match(r"step (\d+)/", line)) and int(match[1]) >= start_step + target:
        break
    time.sleep(rng.uniform(0.0, 1.0))
  process.send_signal(signal.SIGKILL)
  rest, _ = process.communicate(timeout=60)
  return "".join(lines) + rest


@pytest.mark.long
def test_kill_9_at_random_moments_never_loses_the_run(tmp_path):
  cache = tmp_path / "compilation_cache"
  reference = _start(tmp_path / "reference", compilation_cache=cache)
  output, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, output

  workdir = tmp_path / "killed"
  rng = np.random.default_rng(0)
  resumed_steps = []
  for _ in range(KILLS):
    process = _start(workdir, compilation_cache=cache)
    output = _kill_at_a_random_moment(process, rng)
    assert process.returncode in (-signal.SIGKILL, 0), output  # Killed, or it had already finished.
    assert "Traceback" not in output, output
    match = re.search(r"resumed at step (\d+)", output)
    if match:
      resumed_steps.append(int(match[1]))
  final = _start(workdir, compilation_cache=cache)
  output, _ = final.communicate(timeout=300)
  assert final.returncode == 0 and "Traceback" not in output, output
  print(f"{KILLS} kills; restarts resumed at steps {resumed_steps}")
  assert resumed_steps == sorted(resumed_steps)  # Never back to an older checkpoint...
  assert len(set(resumed_steps)) >= 4  # ...and the kills landed at many points of the run.
  for killed, uninterrupted in zip(_final_params(workdir, 240), _final_params(tmp_path / "reference", 240)):
    np.testing.assert_array_equal(killed, uninterrupted)


def test_compilation_cache_dir_lets_a_restart_skip_compiling(tmp_path):
  """config.compilation_cache_dir fills on the first run (overriding the session's cache from
  the environment), and a second run of the same config finds every program there."""
  cache = tmp_path / "xla_cache"
  flags = ["--config.train.num_steps=6", f"--config.compilation_cache_dir={cache}"]
  first = _start(tmp_path / "first", *flags)
  output, _ = first.communicate(timeout=300)
  assert first.returncode == 0, output
  compiled = set(os.listdir(cache))
  assert compiled, "nothing was written to the compilation cache"
  second = _start(tmp_path / "second", *flags)
  output, _ = second.communicate(timeout=300)
  assert second.returncode == 0, output
  assert set(os.listdir(cache)) == compiled  # Nothing new was compiled.


def test_unusable_compilation_cache_dir_is_a_config_error(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  config = tiny.get_config()
  config.compilation_cache_dir = str(a_file / "xla")
  with pytest.raises(ConfigError, match=r"^compilation_cache_dir='.*a_file/xla' cannot be used as a directory"):
    train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before anything was built or written.


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
  process = _start(
    tmp_path, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000", "--config.train.log_every=10"
  )
  lines = []
  for line in process.stdout:  # Wait until it is training.
    lines.append(line)
    if line.startswith("step 20/"):
      break
  process.send_signal(signal.SIGTERM)
  rest, _ = process.communicate(timeout=120)
  output = "".join(lines) + rest
  assert process.returncode == 0, output
  step = int(re.search(r"preempted \(SIGTERM\) after step (\d+): checkpoint saved", output)[1])
  checkpointer = Checkpointer(os.path.join(tmp_path, "checkpoints"), read_only=True)
  assert checkpointer.all_steps() == [step]
  record = checkpointer.record(step)
  assert record["step"] == step and record["data"]["next_step"] == step
  assert record["loom_version"] and record["config"]["model"]["num_layers"] == 2


def test_keep_last_k_and_every_n(tmp_path):
  config = tiny.get_config()
  config.mesh.update(data=-1)
  config.train.update(
    num_steps=12,
    checkpoint_every=1,
    keep_checkpoints=2,
    keep_checkpoints_every=5,
    eval_every=0,
    num_samples=0,
    log_every=4,
  )
  train(config, str(tmp_path))
  checkpointer = Checkpointer(os.path.join(tmp_path, "checkpoints"), read_only=True)
  assert checkpointer.all_steps() == [5, 10, 11, 12]
  with open(os.path.join(tmp_path, "checkpoints", "12", "record", "metadata")) as f:
    assert json.load(f)["data"]["next_step"] == 12
