"""Online batch selection (training/selection.py): off is plain training, on trains on the hardest rows."""

import jax
import numpy as np
import pytest

from tests import synthetic
from training import selection
from training.setup import build_setup
from training.step import make_train_step
from training.validation import ConfigError

BATCH = 16
HARD_ROWS = np.sort(np.random.default_rng(3).permutation(BATCH)[: BATCH // 2])  # Where the planted rows sit.


def _config(data=1, microbatches=1, fraction=1.0):
  config = synthetic.tiny_config(data=data)
  config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=1e-2)
  config.train.update(global_batch_size=BATCH, microbatches=microbatches)
  config.selection.fraction = fraction
  return config


def _setup(config):
  num_devices = config.mesh.data
  return build_setup(synthetic.validated(config, num_devices), devices=jax.devices()[:num_devices])


def _rows(tokens_BL1):
  """A batch of single-document rows from [B, L + 1] tokens."""
  batch, length = tokens_BL1.shape[0], tokens_BL1.shape[1] - 1
  return {
    "inputs": tokens_BL1[:, :-1].astype(np.int32),
    "targets": tokens_BL1[:, 1:].astype(np.int32),
    "segment_ids": np.ones((batch, length), np.int32),
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    "weights": np.ones((batch, length), np.float32),
  }


def _easy_tokens(rows, length, seed):
  """Counting runs 0, 1, ..., 9, 0, ... from a random start: learnt within a few steps."""
  starts = np.random.default_rng(seed).integers(0, 10, (rows, 1))
  return (starts + np.arange(length + 1)) % 10


@pytest.fixture(scope="module")
def trained():
  """A state trained on easy rows alone (host arrays), and a batch with random, hard rows planted at HARD_ROWS."""
  config = _config()
  setup = _setup(config)
  step = setup.train_step()
  state = setup.init_state()
  length = config.data.seq_len
  for i in range(25):
    state, metrics = step(state, _rows(_easy_tokens(BATCH, length, seed=i)))
  assert float(metrics["loss"]) < 0.5  # The easy rows are learnt; random tokens stay near ln(256) = 5.5.
  tokens = _easy_tokens(BATCH, length, seed=100)
  tokens[HARD_ROWS] = np.random.default_rng(101).integers(10, 256, (len(HARD_ROWS), length + 1))
  return jax.device_get(state), _rows(tokens)


def _one_step(config, host_state, batch, select_rows=None):
  """One step from `host_state` on `batch`: the setup's step, or make_train_step with `select_rows`."""
  setup = _setup(config)
  if select_rows is None:
    step = setup.train_step()
  else:
    step = make_train_step(
      setup.graphdef,
      setup.tx,
      setup.schedule,
      setup.mesh,
      setup.shardings,
      config.train.microbatches,
      select_rows=select_rows,
    )
  state, metrics = step(jax.device_put(host_state, setup.shardings), batch)
  return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


def _max_difference(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fraction_one_is_plain_training(trained):
  """fraction 1.0 builds the plain step (no scoring pass, no selection metrics): bit-identical. Selecting
  every row through top_k instead keeps the rows in order, so it trains on the very same batch."""
  host_state, batch = trained
  config = _config()
  assert selection.step_selection(config) == 0
  plain, plain_metrics = _one_step(config, host_state, batch, select_rows=0)
  off, off_metrics = _one_step(config, host_state, batch)
  assert _max_difference(plain, off) == 0.0
  assert off_metrics == plain_metrics and "selection/fraction" not in off_metrics
  every, every_metrics = _one_step(config, host_state, batch, select_rows=BATCH)
  assert _max_difference(plain, every) <= 1e-6  # Float tolerance: the step holds another forward pass to fuse.
  assert every_metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-6)
  assert every_metrics["selection/fraction"] == 1.0
  assert every_metrics["selection/loss_selected"] == pytest.approx(every_metrics["selection/loss_all"], rel=1e-6)


@pytest.mark.parametrize("data,microbatches", [(1, 1), (2, 2)])
def test_half_trains_on_the_hardest_half(trained, data, microbatches):
  """With fraction 0.5 the step equals a plain step on exactly the planted hard rows (on 2 data-parallel
  devices with 2 microbatches too, where rows are scored a microbatch at a time)."""
  host_state, batch = trained
  config = _config(data=data, microbatches=microbatches, fraction=0.5)
  selected, metrics = _one_step(config, host_state, batch)
  hard = {name: rows[HARD_ROWS] for name, rows in batch.items()}
  easy = {name: rows[np.setdiff1d(np.arange(BATCH), HARD_ROWS)] for name, rows in batch.items()}
  plain_config = _config(data=data, microbatches=microbatches)
  plain_config.train.global_batch_size = BATCH // 2
  on_hard, hard_metrics = _one_step(plain_config, host_state, hard)
  on_easy, _ = _one_step(plain_config, host_state, easy)
  assert _max_difference(selected, on_hard) <= 1e-6
  assert _max_difference(selected, on_easy) > 1e-3  # The comparison tells the halves apart.
  assert metrics["loss"] == pytest.approx(hard_metrics["loss"], rel=1e-6)
  assert metrics["grad_norm"] == pytest.approx(hard_metrics["grad_norm"], rel=1e-5)
  assert metrics["tokens"] == BATCH // 2 * config.data.seq_len
  assert metrics["selection/fraction"] == 0.5
  assert metrics["selection/loss_selected"] == pytest.approx(metrics["loss"], rel=1e-6)
  # Measured: 5.52 on the random rows (about ln 256) and 2.89 over all, the easy rows' 0.25 averaged in.
  assert metrics["selection/loss_selected"] > 5.0 and metrics["selection/loss_all"] < 3.0


@pytest.mark.parametrize(
  "fraction,data,message",
  [
    (0.0, 1, "config.selection.fraction=0.0: not in (0, 1]"),
    (1.5, 1, "config.selection.fraction=1.5: not in (0, 1]"),
    (0.01, 1, "selects round(0.01 * train.global_batch_size=16) = 0 rows"),
    (0.3, 2, "= 5 rows, not a positive multiple of train.microbatches * mesh.data * mesh.fsdp = 2"),
  ],
)
def test_bad_fraction_is_one_clear_error(fraction, data, message):
  with pytest.raises(ConfigError, match="^config.selection.fraction=") as error:
    synthetic.validated(_config(data=data, fraction=fraction), data)
  assert message in str(error.value)
  assert "allowed: " in str(error.value)
