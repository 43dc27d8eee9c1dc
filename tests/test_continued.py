"""Continued pre-training: start from a checkpoint on any mesh and dtype, replay, freeze, grow the vocabulary."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from tests.test_training import corpus_config
from training import init_from
from training.checkpointing import Checkpointer
from training.run import train
from training.setup import build_setup
from training.validation import ConfigError, validate

LETTERS = "abcdefghij"


def write_letter_corpus(directory, num_files=4, lines_per_file=300, seed=1):
  """A second 'domain': counting runs of letters, 'c d e f g.'"""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for f in range(num_files):
    lines = []
    for _ in range(lines_per_file):
      start, length = rng.integers(0, 5), rng.integers(3, 6)
      lines.append(" ".join(LETTERS[start : start + length]) + ".")
    with open(os.path.join(directory, f"letters{f}.txt"), "w") as out:
      out.write("\n".join(lines) + "\n")
  return os.path.join(directory, "*.txt")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny model trained on the number sentences, written on the (2,2,2) mesh."""
  tmp_path = tmp_path_factory.mktemp("pretrained")
  config = corpus_config(tmp_path, num_steps=80, eval_every=0, checkpoint_every=80, log_every=40, num_samples=0)
  result = train(config, str(tmp_path / "run"))
  return tmp_path, config, result


def _mesh_setup(config, devices, mesh_shape):
  config = config.copy_and_resolve_references()
  config.mesh.update(**mesh_shape)
  return build_setup(validate(config, len(devices), tokenizer_vocab_size=259), devices=devices)


def _initial_state(setup):
  """init_from's state for the setup's config.init, as train() starts it."""
  return init_from.initial_state(setup.config.init, setup)


def test_a_checkpoint_from_8_devices_restores_on_1_and_4(pretrained):
  tmp_path, config, result = pretrained
  written = jax.device_get(result.state)
  checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True)
  for devices, shape in (
    (jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)),
    (jax.devices()[:4], dict(data=1, fsdp=4, tensor=1)),
  ):
    state, record = checkpointer.restore(80, _mesh_setup(config, devices, shape).abstract_state())
    assert record["step"] == 80 and record["loom_version"]
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(written)):
      np.testing.assert_array_equal(np.asarray(restored), original)
    embed = state.params["embed"][...]
    assert len(embed.sharding.device_set) == len(devices)
  # Cast on load: the float32 parameters restored as bfloat16.
  abstract = _mesh_setup(config, jax.devices()[:4], dict(data=1, fsdp=4, tensor=1)).abstract_state()
  as_bf16 = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16, sharding=leaf.sharding), abstract.params
  )
  params = checkpointer.restore_params(80, as_bf16)
  for restored, original in zip(jax.tree.leaves(params), jax.tree.leaves(written.params)):
    assert restored.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(original).astype(jnp.bfloat16))


def test_init_grows_the_vocabulary_keeps_or_resets_step_and_optimizer(pretrained):
  tmp_path, config, result = pretrained
  written = jax.device_get(result.state)
  grown = corpus_config(tmp_path / "grown", num_steps=10)
  grown.model.vocab_size = 300
  grown.init.update(checkpoint=str(tmp_path / "run"))
  state, record = _initial_state(_mesh_setup(grown, jax.devices(), dict(data=2, fsdp=2, tensor=2)))
  embed = np.asarray(state.params["embed"][...])
  old = written.params["embed"][...]
  assert embed.shape == (300, old.shape[1]) and record["restored_step"] == 80
  np.testing.assert_array_equal(embed[:259], old)
  np.testing.assert_allclose(embed[259:], np.broadcast_to(old.mean(axis=0), (41, old.shape[1])), rtol=1e-6)
  assert int(state.step) == 0  # A fresh schedule by default...
  adam = state.opt_state[1][0]  # (clip, adamw) -> adam's ScaleByAdamState
  assert int(adam.count) == 0

  same = corpus_config(tmp_path / "same", num_steps=100)
  same.init.update(checkpoint=str(tmp_path / "run" / "checkpoints" / "80"), load_optimizer=True, keep_step=True)
  state, _ = _initial_state(_mesh_setup(same, jax.devices(), dict(data=2, fsdp=2, tensor=2)))
  assert int(state.step) == 80  # ...or the old step and optimizer state when asked.
  for restored, original in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(written.opt_state)):
    np.testing.assert_array_equal(np.asarray(restored), original)

  wrong = corpus_config(tmp_path / "wrong", num_steps=10)
  wrong.model.embed_dim = 64
  wrong.init.update(checkpoint=str(tmp_path / "run"))
  wrong_setup = _mesh_setup(wrong, jax.devices(), dict(data=2, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match=r"parameter .* has shape .* only model.vocab_size may grow"):
    _initial_state(wrong_setup)


def _continue(tmp_path, pretrained_dir, name, weights, **init):
  config = corpus_config(
    tmp_path / name, num_steps=40, eval_every=40, eval_batches=4, log_every=20, checkpoint_every=40, num_samples=0
  )
  config.data.sources = {
    "new": base.source(paths=write_letter_corpus(str(tmp_path / "letters")), weight=weights[0]),
    "old": base.source(paths=write_corpus_path(tmp_path / name), weight=weights[1]),
  }
  config.init.update(checkpoint=pretrained_dir, **init)
  config.optimizer.update(warmup_steps=5, learning_rate=3e-3)
  return train(config, str(tmp_path / name / "run"))


def write_corpus_path(directory):
  from tests.test_training import write_corpus

  return write_corpus(str(directory / "numbers"))  # The same sentences as the pretraining corpus.


def test_continued_pretraining_learns_the_new_data_and_replay_protects_the_old(pretrained, tmp_path):
  pretrained_dir, _, _ = pretrained
  without = _continue(tmp_path, str(pretrained_dir / "run"), "no_replay", (1.0, 0.0))
  replay = _continue(tmp_path, str(pretrained_dir / "run"), "replay", (0.7, 0.3))
  (start_new, end_new), (start_old, end_old) = (
    [loss for _, loss in without.eval_history_by_source[name]] for name in ("new", "old")
  )
  replay_old = [loss for _, loss in replay.eval_history_by_source["old"]]
  replay_new = [loss for _, loss in replay.eval_history_by_source["new"]]
  print(
    f"new data: {start_new:.3f} -> {end_new:.3f} (replay: -> {replay_new[-1]:.3f}); old data: "
    f"{start_old:.3f} -> {end_old:.3f} without replay, -> {replay_old[-1]:.3f} with replay"
  )
  assert replay_old[0] == pytest.approx(start_old, abs=1e-6)  # Both start from the same model.
  assert end_new < start_new - 0.5  # It learns the new corpus...
  assert replay_new[-1] < start_new - 0.5
  assert end_old > start_old + 0.05  # ...forgetting some of the old without replay...
  assert replay_old[-1] - start_old < 0.5 * (end_old - start_old)  # ...and under half of that with it.


def test_frozen_parameters_and_layers_do_not_move(pretrained, tmp_path):
  pretrained_dir, _, result = pretrained
  before = jax.device_get(result.state.params)
  frozen = _continue(
    tmp_path, str(pretrained_dir / "run"), "frozen", (1.0, 0.0), freeze="embed,final_norm", freeze_layers="0"
  )
  after = jax.device_get(frozen.state.params)
  np.testing.assert_array_equal(after["embed"][...], before["embed"][...])
  np.testing.assert_array_equal(after["final_norm"]["scale"][...], before["final_norm"]["scale"][...])
  wq_before, wq_after = (p["blocks"]["attn"]["wq"][...] for p in (before, after))
  np.testing.assert_array_equal(wq_after[0], wq_before[0])  # Layer 0 fixed...
  assert np.abs(wq_after[1] - wq_before[1]).max() > 1e-4  # ...layer 1 trained.
  with pytest.raises(ConfigError, match=r"init.freeze: 'embedding' matches no parameter"):
    _continue(tmp_path, str(pretrained_dir / "run"), "typo", (1.0, 0.0), freeze="embedding")
  with pytest.raises(ConfigError, match=r"init.freeze_layers='3': '3' is outside the model's layers 0-1"):
    _continue(tmp_path, str(pretrained_dir / "run"), "typo2", (1.0, 0.0), freeze_layers="3")


def test_a_wrong_init_checkpoint_is_one_config_error_before_the_data(tmp_path):
  config = corpus_config(tmp_path, num_steps=4)
  config.init.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"^init.checkpoint: .*nowhere is not a directory"):
    validate(config, 8, tokenizer_vocab_size=259)
  (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
  config.init.update(checkpoint=str(tmp_path / "empty_run"))
  with pytest.raises(ConfigError, match=r"^init.checkpoint: .* holds no finished loom checkpoint"):
    validate(config, 8, tokenizer_vocab_size=259)
