"""tools/evaluate.py and tools/evaluate_tasks.py as a user runs them, and their one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from evaluation import heldout, loading
from tests.test_tasks import trained_workdir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory.getbasetemp())


def _one_line(result, pattern):
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert pattern in lines[0], lines[0]


def test_bad_inputs_are_one_line_before_any_model_is_loaded(workdir, tmp_path):
  _one_line(_run("tools/evaluate.py", f"--checkpoint={tmp_path / 'nothing'}"), "is not a directory")
  _one_line(_run("tools/evaluate.py", f"--checkpoint={tmp_path}"), "holds no finished loom checkpoint")
  _one_line(_run("tools/evaluate.py", f"--checkpoint={workdir}", "--sources=other"), "--sources: no source other")
  # Empty and malformed task files are refused by evaluation.tasks.read_task (tests/test_tasks.py);
  # here one of them shows the tool turns that into its one line.
  task = ("tools/evaluate_tasks.py", f"--checkpoint={workdir}", "--kind=qa")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a", \n')
  _one_line(_run(*task, f"--task={bad}"), f"{bad}:2: not a JSON object")


def test_evaluate_reports_the_validation_metrics_of_a_run(workdir, tmp_path):
  output = tmp_path / "metrics.json"
  result = _run("tools/evaluate.py", f"--checkpoint={workdir}", f"--output={output}")
  assert result.returncode == 0, result.stderr
  assert "main: loss" in result.stdout and "bits/byte" in result.stdout
  written = json.loads(output.read_text())
  metrics = written["all"]
  assert set(metrics) >= {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "bytes"}
  # The byte tokenizer: a target is a byte, or eos (no bytes) at a line's end.
  assert metrics["bytes"] < metrics["tokens"] and metrics["bits_per_byte"] > metrics["loss"] / 0.6931
  # The run's own last evaluation of the same split (whole: the run evaluated 2 batches of it).
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in records if "eval_loss" in r][-1]
  assert {"eval_perplexity", "eval_bits_per_byte", "eval_accuracy"} <= set(logged)
  info = loading.checkpoint_config(workdir)
  datasets = heldout.heldout_datasets(info, info.config.train.global_batch_size)
  two_batches = heldout.evaluate_heldout(loading.load_model(info, datasets.tokenizer), datasets, max_batches=2)
  for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
    assert two_batches["all"][key] == pytest.approx(logged[f"eval_{key}"], rel=1e-5)


def test_evaluate_tasks_scores_a_task_file(workdir, tmp_path):
  task = tmp_path / "animals.jsonl"
  task.write_text(json.dumps({"prompt": "the owl says", "choices": [" moo.", " hoot."], "answer": 1}) + "\n")
  answers = tmp_path / "answers.jsonl"
  result = _run(
    "tools/evaluate_tasks.py", f"--checkpoint={workdir}", f"--task={task}", "--kind=choice", f"--output={answers}"
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["accuracy"] == 1.0
  assert len(json.loads(answers.read_text())["logprobs"]) == 2
