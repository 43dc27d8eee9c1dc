"""Regularisers (z-loss, label smoothing) and divergence guards (training/guards.py): a non-finite loss,
gradient or parameter stops the run (or is skipped), a loss spike is skipped, no checkpoint holds a
non-finite value, and resuming with spike detection on is bit-exact."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from model.loss import chunked_row_losses, cross_entropy
from tests import synthetic
from tests.test_training import corpus_config
from training import guards, hooks, run
from training.checkpointing import Checkpointer
from training.run import train
from training.setup import build_setup
from training.state import TrainState
from training.step import token_losses
from training.validation import ConfigError, validate


def test_z_loss_and_label_smoothing_equal_hand_computations():
  logits_NV = jnp.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, -2.0, 4.0]])
  targets_N = jnp.array([0, 2])
  log_z = np.log(np.exp(np.asarray(logits_NV, np.float64)).sum(-1))
  target = np.asarray(logits_NV)[[0, 1], [0, 2]]
  plain = log_z - target
  np.testing.assert_array_equal(
    cross_entropy(logits_NV, targets_N), optax.softmax_cross_entropy_with_integer_labels(logits_NV, targets_N)
  )
  np.testing.assert_allclose(cross_entropy(logits_NV, targets_N, z_loss=1e-2), plain + 1e-2 * log_z**2, rtol=1e-6)
  # Smoothing 0.1 over V=4: the target gets 0.9 + 0.1/4, every other token 0.1/4.
  log_p = np.asarray(logits_NV, np.float64) - log_z[:, None]
  q = np.full((2, 4), 0.1 / 4)
  q[[0, 1], [0, 2]] += 0.9
  np.testing.assert_allclose(cross_entropy(logits_NV, targets_N, label_smoothing=0.1), -(q * log_p).sum(-1), rtol=1e-6)
  both = cross_entropy(logits_NV, targets_N, z_loss=1e-2, label_smoothing=0.1)
  np.testing.assert_allclose(both, -(q * log_p).sum(-1) + 1e-2 * log_z**2, rtol=1e-6)


@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-3, 0.0), (0.0, 0.2), (1e-2, 0.1)])
def test_chunked_loss_equals_unchunked(z_loss, label_smoothing):
  keys = jax.random.split(jax.random.key(0), 3)
  x_BLD = jax.random.normal(keys[0], (2, 7, 8))
  kernel_DV = jax.random.normal(keys[1], (8, 11))
  targets_BL = jax.random.randint(keys[2], (2, 7), 0, 11)
  weights_BL = jnp.ones((2, 7)).at[1, 5:].set(0.0)
  losses_BL = cross_entropy(x_BLD @ kernel_DV, targets_BL, z_loss, label_smoothing)
  chunked_B, weight_B = chunked_row_losses(x_BLD, kernel_DV, targets_BL, weights_BL, 3, z_loss, label_smoothing)
  np.testing.assert_allclose(chunked_B, (losses_BL * weights_BL).sum(1), rtol=1e-5)
  np.testing.assert_array_equal(weight_B, [7.0, 5.0])
  # The gradients too (the chunks are rematerialised in the backward pass).
  grad_chunked = jax.grad(
    lambda k: chunked_row_losses(x_BLD, k, targets_BL, weights_BL, 3, z_loss, label_smoothing)[0].sum()
  )(kernel_DV)
  grad_plain = jax.grad(lambda k: (cross_entropy(x_BLD @ k, targets_BL, z_loss, label_smoothing) * weights_BL).sum())(
    kernel_DV
  )
  np.testing.assert_allclose(grad_chunked, grad_plain, rtol=1e-4, atol=1e-5)


def test_nonfinite_code_names_the_first_quantity():
  params = {"a": jnp.ones(3), "b": {"c": jnp.ones(2), "d": jnp.ones(2)}}
  paths = guards.param_paths(params)
  assert paths == ["a", "b/c", "b/d"]
  bad = {"a": jnp.ones(3), "b": {"c": jnp.ones(2).at[1].set(jnp.inf), "d": jnp.full(2, jnp.nan)}}
  code = lambda loss, norm, p: int(guards.nonfinite_code(jnp.float32(loss), jnp.float32(norm), p))
  assert code(1.0, 1.0, params) == 0
  assert guards.describe(code(np.nan, np.inf, bad), paths) == "loss"
  assert guards.describe(code(1.0, np.inf, bad), paths) == "grad_norm"
  assert guards.describe(code(1.0, 1.0, bad), paths) == "parameter b/c"


def test_spike_guard_skips_losses_above_k_times_the_median():
  """SGD with lr 1 on a constant gradient of 1: a parameter falls by 1 per update not skipped."""
  tx = guards.spike_guard(optax.sgd(1.0), factor=2.0, window=3)
  params = jnp.zeros(())
  state = tx.init(params)
  skipped = []
  for loss in [5.0, 1.0, 1.2, 2.3, 1.1, 9.0, np.nan, 2.0, 2.5]:
    updates, state = tx.update(jnp.ones(()), state, params, loss=loss)
    params = optax.apply_updates(params, updates)
    skipped.append(bool(state.spike))
  # 5.0 would be a spike but the window fills first; the median of (1.0, 1.2, 2.3) is 1.2, so 9.0
  # (> 2.4) is skipped; NaN is no spike (the step's non-finite guard skips it) and never enters the window.
  assert skipped == [False, False, False, False, False, True, False, False, False]
  assert float(params) == -8.0
  assert int(state.count) == 8
  np.testing.assert_array_equal(np.sort(state.losses_W), [2.0, 2.5, 9.0])


def test_validation_names_the_fields():
  config = synthetic.tiny_config()
  for field, value, words in [
    ("on_nonfinite", "ignore", "allowed: stop, skip"),
    ("z_loss", -1.0, "config.train.z_loss=-1.0"),
    ("label_smoothing", 1.0, "config.train.label_smoothing=1.0"),
    ("spike_factor", 0.5, "config.train.spike_factor=0.5"),
    ("spike_window", 0, "config.train.spike_window=0"),
  ]:
    bad = config.copy_and_resolve_references()
    bad.train[field] = value
    with pytest.raises(ConfigError, match=words):
      validate(bad, 1, tokenizer_vocab_size=256)


def test_default_step_equals_the_unguarded_step():
  """Defaults (z_loss 0, label_smoothing 0, no spike guard): the guarded step's loss is the golden one
  and its parameters and optimizer state are a plain jitted AdamW step's (to float rounding: XLA fuses
  the two programs differently; against the step before the guards it was bit-identical)."""
  config = synthetic.validated(synthetic.tiny_config(), 1)
  setup = build_setup(config, devices=jax.devices()[:1])
  batch = sharding.global_batch_from_local(synthetic.batch(16, 32, 256, seed=1), setup.mesh)

  @jax.jit
  def unguarded(state: TrainState, batch):
    (loss_sum, weight), grads = jax.value_and_grad(lambda p: token_losses(setup.graphdef, p, batch), has_aux=True)(
      state.params
    )
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, loss_sum / jnp.maximum(weight, 1.0)

  params, opt_state, loss = jax.device_get(unguarded(setup.init_state(), batch))
  state, metrics = setup.train_step()(setup.init_state(), batch)
  assert int(metrics["nonfinite"]) == 0 and "spike" not in metrics
  assert float(metrics["loss"]) == float(loss) == pytest.approx(5.55129, abs=1e-4)  # test_training's golden
  assert float(metrics["grad_norm"]) == pytest.approx(0.39613, abs=1e-4)
  guarded = jax.tree.leaves(jax.device_get((state.params, state.opt_state)))
  for a, b in zip(jax.tree.leaves((params, opt_state)), guarded, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_a_nonfinite_step_keeps_the_old_state():
  config = synthetic.validated(synthetic.tiny_config(), 1)
  setup = build_setup(config, devices=jax.devices()[:1])
  local = synthetic.batch(16, 32, 256, seed=1)
  local["weights"] = local["weights"] * np.float32(np.nan)
  state = setup.init_state()
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = setup.train_step()(state, sharding.global_batch_from_local(local, setup.mesh))
  assert guards.describe(int(metrics["nonfinite"]), []) == "loss"
  assert int(state.step) == 1  # The next batch is the next step's.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_hook_refuses_a_nonfinite_parameter(tmp_path):
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
  hook = hooks.CheckpointHook(1, checkpointer, lambda step: {"step": step})
  state = TrainState(
    step=jnp.int32(1),
    params={"w": jnp.ones(3).at[0].set(jnp.nan)},
    opt_state={"m": jnp.zeros(3)},
    rng=jnp.zeros(2, jnp.uint32),
  )
  hook.on_step(1, state, {})
  state = state.replace(step=jnp.int32(2), params={"w": jnp.ones(3)})
  hook.on_step(2, state, {})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2]
  checkpointer.close()


def _planted(monkeypatch, nan_steps=(), spike_steps=()):
  """Training batches as run.py makes them, except: NaN weights at `nan_steps` (a NaN loss) and, at
  `spike_steps`, targets shifted into bytes the corpus never has (a loss spike)."""
  make_batches = run._train_batches

  def batches(datasets, mesh, start_step, stop_step, mixture_stats):
    for step, batch in enumerate(make_batches(datasets, mesh, start_step, stop_step, mixture_stats), start_step + 1):
      if step in nan_steps:
        batch = dict(batch, weights=batch["weights"] * jnp.nan)
      if step in spike_steps:
        batch = dict(batch, targets=batch["targets"] + 128)
      yield batch

  monkeypatch.setattr(run, "_train_batches", batches)


def _logged(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


RUN = dict(num_steps=20, eval_every=0, log_every=5, checkpoint_every=5, num_samples=0)


def test_learning_rate_1e6_stops_the_run_naming_the_quantity(tmp_path, capsys):
  """AdamW at 1e6 makes the gradient non-finite within a few steps: the run stops within one logging
  interval of it, saying what and when, and its latest checkpoint restores to finite values only."""
  config = corpus_config(tmp_path, **RUN)
  config.optimizer.update(learning_rate=1e6, warmup_steps=0)
  workdir = str(tmp_path / "run")
  result = train(config, workdir)
  out = capsys.readouterr().out
  first = int(re.search(r"non-finite (?:loss|grad_norm|parameter \S+) at step (\d+)", result.diverged).group(1))
  stopped = int(result.state.step)
  assert stopped < RUN["num_steps"] and first <= stopped <= first + RUN["log_every"]
  assert f"stopped after step {stopped}: {result.diverged}" in out
  assert result.samples == [] and not result.early_stopped
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  latest = checkpointer.latest_step()
  assert latest is not None and latest <= stopped
  setup = build_setup(result.config)
  restored, _ = checkpointer.restore(latest, setup.saved_abstract_state())
  checkpointer.close()
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(restored)))
  assert _logged(workdir)[-1]["skipped_steps/nonfinite"] >= 1


def test_skipped_nan_and_spike_are_counted_and_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
  """on_nonfinite=skip with spike detection on: a planted NaN (step 7) and loss spike (step 12) are
  skipped and counted, and no other step of the 16 is; a run cut at step 10 and resumed (the spike
  window restored from the checkpoint) ends bit-identical to the straight run, with the same counts."""

  def config(**train):
    config = corpus_config(tmp_path, **dict(RUN, num_steps=16, log_every=4, checkpoint_every=5, **train))
    config.train.update(on_nonfinite="skip", spike_factor=1.5, spike_window=4)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)  # Learns fast: a planted spike is 2x the median.
    return config

  _planted(monkeypatch, nan_steps=(7,), spike_steps=(12,))
  straight = train(config(), str(tmp_path / "straight"))
  out = capsys.readouterr().out
  assert "step 7: non-finite loss: update skipped (train.on_nonfinite=skip)" in out
  assert re.search(r"step 12: loss [\d.]+ above 1.5 x the median of the last 4 losses: update skipped", out)
  assert out.count("update skipped") == 2  # Nothing else skipped.
  counts = [
    (r["step"], r["skipped_steps"], r["skipped_steps/spike"]) for r in _logged(tmp_path / "straight") if "loss" in r
  ]
  assert counts == [(4, 0, 0), (8, 1, 0), (12, 2, 1), (16, 2, 1)]
  assert straight.diverged is None and int(straight.state.step) == 16 and straight.samples == []

  interrupted = str(tmp_path / "interrupted")
  first = train(config(stop_at_step=10), interrupted)
  assert int(first.state.step) == 10
  resumed = train(config(), interrupted)
  assert resumed.resumed_from == 10
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)
  assert resumed.last_metrics["skipped_steps"] == 2 and resumed.last_metrics["skipped_steps/nonfinite"] == 1


def test_toggling_spike_detection_on_resume_is_one_clear_error(tmp_path):
  """spike_guard wraps the optimizer only with train.spike_factor > 0, so a checkpoint written with it
  off does not restore into a run with it on (nor the other way, nor another window while on): the run
  stops before restoring, naming the field, both values and what to do, instead of Orbax's tree error."""
  # A workdir whose step-2 checkpoint was written with the guard off: its record is what is compared
  # (the arrays are placeholders, never restored: the refusal comes first).
  workdir = str(tmp_path / "run")
  off_run = validate(corpus_config(tmp_path, **dict(RUN, num_steps=4, checkpoint_every=2)), 8, tokenizer_vocab_size=259)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  placeholder = TrainState(
    step=jnp.int32(2), params={"w": jnp.ones(3)}, opt_state={"m": jnp.zeros(3)}, rng=jnp.zeros(2, jnp.uint32)
  )
  checkpointer.save(placeholder, {"step": 2, "config": json.loads(off_run.to_json())})
  checkpointer.close()
  checkpoint = os.path.join(workdir, "checkpoints", "2")

  on = corpus_config(tmp_path, **dict(RUN, num_steps=4, checkpoint_every=2))
  on.train.update(spike_factor=2.0, spike_window=8)
  with pytest.raises(ConfigError) as caught:
    train(on, workdir)
  message = str(caught.value)
  assert message.startswith(
    f"train.spike_factor=2 turns the loss-spike guard on, but {checkpoint} was written with train.spike_factor=0 "
    "(guard off): the guard's window of recent losses is part of the optimizer state"
  )
  assert "To resume, keep train.spike_factor=0 (--config.train.spike_factor=...)" in message
  assert f"--config.init.checkpoint={checkpoint}" in message and "\n" not in message

  # The other way, and another window, checked from the record alone (as train() does, before restoring).
  saved = json.loads(on.to_json())
  off = corpus_config(tmp_path, **RUN)
  with pytest.raises(ConfigError, match=r"^train.spike_factor=0 turns the loss-spike guard off, but /ckpt/5 was "):
    guards.check_resume(saved, off.train, "/ckpt/5")
  with pytest.raises(ConfigError, match=r"keep train.spike_factor=2 and train.spike_window=8 \("):
    guards.check_resume(saved, off.train, "/ckpt/5")
  on.train.spike_window = 16
  with pytest.raises(ConfigError, match=r"^train.spike_window=16, but /ckpt/5 was written with train.spike_window=8 "):
    guards.check_resume(saved, on.train, "/ckpt/5")
  # What the optimizer state does not hold may change; a record without a config, or from before the
  # guard (no spike_factor: it ran without), compares as it should.
  on.train.update(spike_factor=3.0, spike_window=8)
  guards.check_resume(saved, on.train, "/ckpt/5")
  guards.check_resume({}, on.train, "/ckpt/5")
  guards.check_resume({"train": {}}, off.train, "/ckpt/5")
  with pytest.raises(ConfigError, match=r"was written with train.spike_factor=0 \(guard off\)"):
    guards.check_resume({"train": {}}, on.train, "/ckpt/5")
