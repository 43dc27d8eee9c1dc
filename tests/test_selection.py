"""Online batch selection (training/selection.py): off is plain training; on, a candidate batch
1/fraction times the trained batch is scored and the step trains on its hardest rows, or with a
reference model (RHO-loss) on its rows with the most reducible loss."""

import json

import jax
import numpy as np
import pytest

from tests import synthetic
from tests.test_training import corpus_config
from training import selection
from training.checkpointing import Checkpointer
from training.run import train
from training.setup import build_setup
from training.step import make_train_step
from training.validation import ConfigError

BATCH = 16  # The candidate batch of the planted tests.
HARD_ROWS = np.sort(np.random.default_rng(3).permutation(BATCH)[: BATCH // 2])  # Where the planted rows sit.


def _config(data=1, microbatches=1, fraction=1.0, global_batch_size=BATCH):
  """A tiny config training on `global_batch_size` rows a step (with selection: out of global / fraction)."""
  config = synthetic.tiny_config(data=data)
  config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=1e-2)
  config.train.update(global_batch_size=global_batch_size, microbatches=microbatches)
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


def _one_step(config, host_state, batch, select_rows=None, reference=None):
  """One step from `host_state` on `batch`: the setup's step, or make_train_step with `select_rows`
  (and `reference`, host parameters of the same model, for RHO-loss)."""
  setup = _setup(config)
  if select_rows is None:
    step = setup.train_step()
  else:
    if reference is not None:
      reference = (setup.graphdef, jax.device_put(reference, setup.shardings.params))
    step = make_train_step(
      setup.graphdef,
      setup.tx,
      setup.schedule,
      setup.mesh,
      setup.shardings,
      config.train.microbatches,
      select_rows=select_rows,
      reference=reference,
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
  """fraction 0.5 of a batch of 8 loads 16 candidates and equals a plain step on exactly the planted
  hard rows (on 2 data-parallel devices with 2 microbatches too, where rows are scored a microbatch
  at a time)."""
  host_state, batch = trained
  config = _config(data=data, microbatches=microbatches, fraction=0.5, global_batch_size=BATCH // 2)
  assert selection.loaded_batch_size(synthetic.validated(config, data)) == BATCH
  selected, metrics = _one_step(config, host_state, batch)
  hard = {name: rows[HARD_ROWS] for name, rows in batch.items()}
  easy = {name: rows[np.setdiff1d(np.arange(BATCH), HARD_ROWS)] for name, rows in batch.items()}
  plain_config = _config(data=data, microbatches=microbatches, global_batch_size=BATCH // 2)
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


def _descending_tokens(rows, length, seed):
  """Counting down 19, 18, ..., 10, 19, ... from a random start: learnable, unlike random tokens."""
  starts = np.random.default_rng(seed).integers(0, 10, (rows, 1))
  return 10 + (starts - np.arange(length + 1)) % 10


def test_a_reference_model_selects_the_learnable_rows_not_the_noise():
  """RHO-loss: a candidate batch of 4 learnt rows (counting up), 6 rows of noise (random tokens) and 6
  learnable but not yet learnt rows (counting down). The model knows counting up; the reference
  (trained on holdout data of both patterns) knows both, and neither can predict noise. By loss alone
  the step trains on noise; by loss minus the reference's, on exactly the counting-down rows."""
  config = _config(global_batch_size=6, fraction=6 / 16)
  length = config.data.seq_len
  setup = _setup(_config())
  step = setup.train_step()
  model, reference = setup.init_state(), setup.init_state()
  for i in range(25):
    model, _ = step(model, _rows(_easy_tokens(BATCH, length, seed=i)))
    both = np.concatenate([_easy_tokens(BATCH // 2, length, seed=i), _descending_tokens(BATCH // 2, length, seed=i)])
    reference, metrics = step(reference, _rows(both))
  assert float(metrics["loss"]) < 0.5
  kinds = np.array(["learnt"] * 4 + ["noise"] * 6 + ["learnable"] * 6)
  kinds = kinds[np.random.default_rng(5).permutation(BATCH)]
  tokens = _easy_tokens(BATCH, length, seed=200)
  tokens[kinds == "noise"] = np.random.default_rng(201).integers(20, 256, ((kinds == "noise").sum(), length + 1))
  tokens[kinds == "learnable"] = _descending_tokens((kinds == "learnable").sum(), length, seed=202)
  batch = _rows(tokens)
  host_state, reference_params = jax.device_get(model), jax.device_get(reference.params)

  rho, rho_metrics = _one_step(config, host_state, batch, select_rows=6, reference=reference_params)
  by_loss, _ = _one_step(config, host_state, batch, select_rows=6)
  plain_config = _config(global_batch_size=6)
  on_kind = {
    kind: _one_step(plain_config, host_state, {k: v[kinds == kind] for k, v in batch.items()})[0]
    for kind in ("noise", "learnable")
  }
  assert _max_difference(rho, on_kind["learnable"]) <= 1e-6
  assert _max_difference(rho, on_kind["noise"]) > 1e-3
  assert _max_difference(by_loss, on_kind["noise"]) <= 1e-6  # Loss alone picks the noise.
  assert rho_metrics["selection/fraction"] == pytest.approx(6 / 16)
  # The reference predicts the selected rows well (it learnt them) and the candidates as a whole less well.
  assert rho_metrics["selection/reference_loss_selected"] < 0.5 < rho_metrics["selection/reference_loss_all"]
  assert rho_metrics["selection/loss_selected"] > rho_metrics["selection/reference_loss_selected"] + 1.0


def test_the_reference_loads_from_a_checkpoint_and_bad_ones_are_named(tmp_path):
  """config.selection.reference names a parameters-only checkpoint (as tools/hf_import.py writes); the
  setup loads it on the run's mesh, and a missing one or one without selecting is one clear error."""
  config = _config(global_batch_size=8, fraction=0.5)
  setup = _setup(config)
  params = jax.device_get(setup.init_state().params)
  directory = tmp_path / "reference" / "checkpoints"
  checkpointer = Checkpointer(str(directory), async_save=False)
  checkpointer.save_params(4, params, {"step": 4, "config": json.loads(synthetic.validated(config, 1).to_json())})
  checkpointer.close()
  config.selection.reference = str(tmp_path / "reference")
  setup = _setup(config)
  graphdef, loaded = setup.load_reference()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(loaded)), strict=True):
    np.testing.assert_array_equal(a, b)
  state, metrics = setup.train_step(reference=(graphdef, loaded))(
    setup.init_state(), synthetic.batch(16, 32, 256, seed=1)
  )
  # The reference is the model itself: every score is 0, and the selected rows' losses are the reference's.
  assert float(metrics["selection/loss_selected"]) == pytest.approx(
    float(metrics["selection/reference_loss_selected"]), rel=1e-5
  )
  with pytest.raises(ValueError, match="exactly when selection.reference is set"):
    setup.train_step()
  config.selection.reference = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"^config.selection.reference='.*nowhere': .* not a directory"):
    _setup(config).load_reference()
  config.selection.update(fraction=1.0, reference=str(tmp_path / "reference"))
  with pytest.raises(ConfigError, match=r"selection.reference=.* selection.fraction=1.0 selects nothing"):
    synthetic.validated(config, 1)


def test_scoring_counts_in_the_flops_per_trained_token():
  config = synthetic.validated(_config(global_batch_size=8, fraction=0.25), 1)
  assert selection.loaded_batch_size(config) == 32
  assert selection.flops_per_trained_token(config, 300.0) == pytest.approx(300.0 * (1 + 4 / 3))
  assert selection.flops_per_trained_token(synthetic.validated(_config(), 1), 300.0) == 300.0


@pytest.mark.parametrize(
  "fraction,data,message",
  [
    (0.0, 1, "config.selection.fraction=0.0: not in (0, 1]"),
    (1.5, 1, "config.selection.fraction=1.5: not in (0, 1]"),
    (0.3, 1, "train.global_batch_size=16 / 0.3 = 53.3333 rows, is not a whole multiple"),
    (16 / 17, 2, "= 17 rows, is not a whole multiple of train.microbatches * mesh.data * mesh.fsdp = 2"),
  ],
)
def test_bad_fraction_is_one_clear_error(fraction, data, message):
  with pytest.raises(ConfigError, match="^config.selection.fraction=") as error:
    synthetic.validated(_config(data=data, fraction=fraction), data)
  assert message in str(error.value)
  assert "allowed: " in str(error.value)


def test_a_selecting_run_loads_candidates_and_logs_what_it_selected(tmp_path, capsys):
  """train.py's run with selection.fraction 0.5: the pipeline loads 2x the batch, the step trains on
  the batch's tokens, and every logged step carries the selection metrics."""
  config = corpus_config(tmp_path, num_steps=6, log_every=3, eval_every=0, checkpoint_every=6, num_samples=0)
  config.selection.fraction = 0.5
  result = train(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  batch = config.train.global_batch_size
  assert f"each step scores {2 * batch} candidate rows and trains on the {batch} with the highest loss" in out
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
  assert [r["step"] for r in logged] == [3, 6]
  for record in logged:
    assert record["selection/fraction"] == 0.5
    assert record["selection/loss_selected"] >= record["selection/loss_all"]
  assert int(result.state.step) == 6


def test_a_missing_reference_stops_a_run_before_anything_is_built(tmp_path):
  config = corpus_config(tmp_path, num_steps=2)
  config.selection.update(fraction=0.5, reference=str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match=r"^config.selection.reference='.*nowhere': .* is not a directory"):
    train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before the workdir, the data or the model.
