"""Distillation end to end, through train(): a distilled student beats the same student trained alone on
the quickstart corpus; a distilled run on a (2, 2, 2) mesh matches one device, resumes bit-identically,
and is evaluated without its teacher; a missing teacher stops a run before any step.

tests/test_distillation.py tests the loss, its chunked form and load_teacher on their own.
"""

import json
import os

import jax
import numpy as np
import pytest

import data
import sharding
from configs import base, quickstart
from evaluation import heldout, loading
from tests import synthetic
from tests.test_training import corpus_config
from training.checkpointing import Checkpointer
from training.run import train
from training.setup import build_setup
from training.state import abstract_model
from training.validation import ConfigError, validate

# --- A student distilled from a quickstart teacher against the same student alone.

# The quickstart corpus (Python's standard library) cut to what trains in about a minute on 2 cores:
# 30 files, a 512-piece sentencepiece vocabulary, rows of 64 tokens.
QUICK_FILES, QUICK_VOCAB, QUICK_SEQ = 30, 512, 64
STUDENT_STEPS = 100
# Measured on this setup (final eval_loss over 4 validation batches, alone -> distilled at T=1, alpha=0.8):
# a 1x64 student at seeds 0-3: 4.598 -> 4.290, 4.453 -> 4.212, 4.519 -> 4.254, 4.436 -> 4.203; a 1x48 one
# at seeds 0, 1: 4.909 -> 4.715, 4.725 -> 4.517 (alpha=1: 0.02 to 0.04 lower still). T=2 was worse than
# training alone (seed 0: 4.911 at alpha 1, 4.801 at alpha 0.5), T=4 too: in 100 steps a student learns
# most from the teacher's own distribution, not a softened one.
TEMPERATURE, ALPHA = 1.0, 0.8
MARGIN = 0.1  # The distilled student's eval_loss is at least this much lower (measured 0.19 to 0.31).


def _quickstart_config(steps: int, learning_rate: float, warmup: int, **model):
  config = quickstart.get_config()
  config.data.sources = {"main": base.source(kind="stdlib", max_files=QUICK_FILES)}
  config.data.update(seq_len=QUICK_SEQ, tokenizer_vocab_size=QUICK_VOCAB)
  config.model.update(max_seq_len=QUICK_SEQ, num_heads=4, mlp_dim=4 * model["embed_dim"], **model)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.optimizer.update(learning_rate=learning_rate, warmup_steps=warmup)
  # One evaluation, at the end; the run's last checkpoint is the teacher.
  config.train.update(
    num_steps=steps, eval_every=0, eval_batches=4, log_every=50, checkpoint_every=steps, num_samples=0
  )
  return config


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory):
  """A 2x128 teacher trained 250 steps; a 1x64 student trained STUDENT_STEPS steps from it and alone,
  same seed and batches, both with the teacher's tokenizer (distillation compares token by token)."""
  root = tmp_path_factory.mktemp("quickstart")
  teacher = train(_quickstart_config(250, 3e-3, 20, num_layers=2, embed_dim=128), str(root / "teacher"))
  students = {}
  for name, teacher_dir in (("distilled", root / "teacher"), ("alone", "")):
    config = _quickstart_config(STUDENT_STEPS, 2e-3, 10, num_layers=1, embed_dim=64)
    config.data.tokenizer_path = str(root / "teacher" / "tokenizer" / "sp.model")
    config.distillation.update(teacher=str(teacher_dir), temperature=TEMPERATURE, alpha=ALPHA)
    students[name] = train(config, str(root / name))
  return root, teacher, students


def test_a_distilled_student_beats_the_same_student_trained_alone(quickstart_runs):
  _, teacher, students = quickstart_runs
  distilled, alone = students["distilled"].eval_history, students["alone"].eval_history
  assert [step for step, _ in distilled] == [step for step, _ in alone] == [STUDENT_STEPS]
  teacher_loss, distilled_loss, alone_loss = teacher.eval_history[-1][1], distilled[-1][1], alone[-1][1]
  # The teacher is clearly better than either student (measured 3.56 against 4.29 and 4.60)...
  assert teacher_loss < distilled_loss - 0.3
  # ...and the student learning its distribution beats the one learning from the data alone. Both are
  # the plain cross-entropy on the same validation batches (evaluation never sees the teacher).
  assert distilled_loss < alone_loss - MARGIN, (distilled_loss, alone_loss)


def test_a_student_on_the_teachers_tokenizer_is_evaluated_after_the_teacher_moved(quickstart_runs):
  """The run keeps a copy of data.tokenizer_path in its workdir (training/run.py), which evaluation reads."""
  root, _, students = quickstart_runs
  os.rename(root / "teacher", root / "teacher_moved")
  try:
    results = _evaluate(root / "distilled")
  finally:
    os.rename(root / "teacher_moved", root / "teacher")
  assert results["all"]["loss"] == pytest.approx(students["distilled"].eval_history[-1][1], rel=1e-5)


# --- Tiny runs (byte tokenizer, the 8 test devices as (data, fsdp, tensor) = (2, 2, 2)).

TINY_STEPS = 8
BYTE_VOCAB = 259  # The byte tokenizer's.


def _tiny_student(root, teacher_dir, **train_fields):
  """The tiny model with 1 layer of 32, a student of _write_teacher's model, distilled at T=2, alpha=0.5
  (both terms, the T^2 scaling), logging every step."""
  fields = dict(num_steps=TINY_STEPS, checkpoint_every=TINY_STEPS, log_every=1, eval_every=0, num_samples=0)
  config = corpus_config(root, **dict(fields, **train_fields))
  config.model.num_layers = 1
  config.distillation.update(teacher=str(teacher_dir), temperature=2.0, alpha=0.5)
  return config


def _logged_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return {record["step"]: record["loss"] for record in records if "loss" in record}


def _evaluate(workdir):
  """What tools/evaluate.py computes of a workdir's latest checkpoint (its eval_batches)."""
  info = loading.checkpoint_config(str(workdir))
  datasets = heldout.heldout_datasets(info, info.config.train.global_batch_size)
  model = loading.load_model(info, datasets.tokenizer)
  return heldout.evaluate_heldout(model, datasets, "validation", info.config.train.eval_batches)


def _write_teacher(directory) -> None:
  """A parameters-only teacher checkpoint with its config in the record, as tools/hf_import.py writes
  one: a model of another shape than the student (2 layers of 48, Llama-style, untied), drawn on the
  host (nothing compiled) with weights large enough that its logits are far from uniform."""
  config = synthetic.tiny_config(vocab_size=BYTE_VOCAB)
  config.model.update(num_layers=2, embed_dim=48, mlp_dim=96, norm="rmsnorm", position="rope", mlp="swiglu")
  config.model.tie_embeddings = False
  config = synthetic.validated(config, 1)
  rng = np.random.default_rng(7)

  def draw(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract_model(config.model)[1])
  checkpointer = Checkpointer(str(directory / "checkpoints"), async_save=False)
  checkpointer.save_params(0, params, {"step": 0, "config": json.loads(config.to_json())})
  checkpointer.close()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """The tiny teacher, and a student distilled from it TINY_STEPS steps on (2, 2, 2)."""
  root = tmp_path_factory.mktemp("tiny")
  _write_teacher(root / "teacher")
  straight = train(_tiny_student(root, root / "teacher"), str(root / "straight"))
  return root, straight


def test_a_distilled_run_on_a_222_mesh_matches_one_device(tiny_runs):
  """The run's logged losses (train() on 8 devices) against the same steps on one device, driven by hand
  through Setup: its teacher, its train step and the run's batches."""
  root, straight = tiny_runs
  config = _tiny_student(root, root / "teacher")
  config.mesh.update(data=1, fsdp=1, tensor=1)
  datasets = data.build_datasets(
    config.data, global_batch_size=config.train.global_batch_size, seed=config.seed, workdir=str(root / "one")
  )
  setup = build_setup(validate(config, 1, datasets.tokenizer.vocab_size), devices=jax.devices()[:1])
  teacher = setup.load_teacher()
  step, state, losses = setup.train_step(teacher), setup.init_state(), []
  for local in datasets.train_batches(0, TINY_STEPS):
    local.pop("source_counts")
    state, metrics = step(state, sharding.global_batch_from_local(local, setup.mesh))
    losses.append(float(metrics["loss"]))
  logged = _logged_losses(root / "straight")
  assert sorted(logged) == list(range(1, TINY_STEPS + 1))
  assert losses[0] > losses[-1] + 0.2  # It learns (measured 3.300 -> 2.970).
  # The same float32 sums reduced in another order over 8 devices: the losses differed by at most
  # 3.1e-7 relative (about 3 ulps) and the parameters after 8 Adam steps by 2.6e-8.
  np.testing.assert_allclose([logged[s] for s in sorted(logged)], losses, rtol=1e-6)
  for one, eight in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(straight.state.params)):
    np.testing.assert_allclose(one, np.asarray(eight), atol=1e-6)


def test_a_distilled_run_stopped_half_way_and_resumed_is_bit_identical(tiny_runs, capsys):
  root, straight = tiny_runs
  workdir = str(root / "interrupted")
  first = train(_tiny_student(root, root / "teacher", stop_at_step=TINY_STEPS // 2), workdir)
  assert int(first.state.step) == TINY_STEPS // 2 and first.eval_history == []
  capsys.readouterr()
  resumed = train(_tiny_student(root, root / "teacher"), workdir)
  assert resumed.resumed_from == TINY_STEPS // 2 and int(resumed.state.step) == TINY_STEPS
  assert "distilling from" in capsys.readouterr().out  # The teacher loaded again for the second half.
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(a, b)
  assert _logged_losses(workdir) == _logged_losses(root / "straight")
  assert resumed.eval_history == straight.eval_history


def test_the_student_is_evaluated_without_its_teacher_and_a_missing_teacher_stops_a_run(tiny_runs):
  root, straight = tiny_runs
  os.rename(root / "teacher", root / "teacher_moved")
  try:
    # The distilled student's checkpoint alone: its record's config names the teacher, which is ignored.
    results = _evaluate(root / "straight")
    assert results["all"]["loss"] == pytest.approx(straight.eval_history[-1][1], rel=1e-6)
    # A run whose teacher is not there stops in validation, before anything is built or written:
    # a new one, and the distilled run asked to continue (its checkpoints untouched).
    for name, steps in (("fresh", TINY_STEPS), ("straight", 2 * TINY_STEPS)):
      config = _tiny_student(root, root / "teacher", num_steps=steps)
      with pytest.raises(ConfigError, match=r"^config.distillation.teacher='.*teacher': .* not a directory"):
        train(config, str(root / name))
    assert not os.path.exists(root / "fresh")
    assert sorted(os.listdir(root / "straight" / "checkpoints")) == [str(TINY_STEPS)]
  finally:
    os.rename(root / "teacher_moved", root / "teacher")
  # A teacher that is there but does not fit (another vocabulary) stops the run before its first step.
  config = _tiny_student(root, root / "teacher")
  config.model.vocab_size = 264
  with pytest.raises(ConfigError, match=r"^config.distillation.teacher=.* 259 tokens and this run's .* 264"):
    train(config, str(root / "misfit"))
  assert not os.listdir(root / "misfit" / "checkpoints") and _logged_losses(root / "misfit") == {}
