"""tools/compare.py and training.reports: runs compared from their workdirs' config.json and metrics.jsonl."""

import json
import os
import subprocess
import sys

import pytest

from training import reports

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(path, batch, seq_len, num_steps, records, best_steps=()):
  path.mkdir()
  config = {"train": {"global_batch_size": batch, "num_steps": num_steps}, "data": {"seq_len": seq_len}}
  (path / "config.json").write_text(json.dumps(config))
  lines = [json.dumps(record) for record in records]
  (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "lo')  # A line a kill cut short.
  for step in best_steps:
    (path / "best" / str(step)).mkdir(parents=True)
  return str(path)


@pytest.fixture
def two_runs(tmp_path):
  a = _workdir(
    tmp_path / "a",
    batch=16,
    seq_len=32,
    num_steps=40,
    records=[
      {"step": 0, "data/skipped/empty_file": 1},
      {"step": 10, "loss": 3.0, "step_time_ms": 100.0},
      {"step": 20, "loss": 2.5, "step_time_ms": 200.0},
      {"step": 20, "eval_loss": 2.0, "eval_accuracy": 0.3},
      {"step": 30, "loss": 2.25, "step_time_ms": 100.0},
      {"step": 30, "eval_loss": 2.2, "eval_accuracy": 0.35},
    ],
  )
  b = _workdir(
    tmp_path / "b",
    batch=8,
    seq_len=64,
    num_steps=100,
    records=[
      {"step": 50, "loss": 1.5, "step_time_ms": 1500.0},
      {"step": 50, "eval_loss": 1.8, "eval_loss/web": 1.7},
      {"step": 100, "loss": 1.25, "step_time_ms": 1000.0},
      {"step": 100, "eval_loss": 1.9, "eval_loss/web": 1.6},
    ],
    best_steps=(50,),
  )
  return a, b


EXPECTED = """\
| workdir | a | b |
|---|---:|---:|
| steps | 30 / 40 | 100 / 100 |
| tokens | 15,360 | 51,200 |
| train time | 4.0s | 2m05s |
| loss (final) | 2.2500 | 1.2500 |
| eval_accuracy (final) | 0.3500 | - |
| eval_accuracy (best) | 0.3500 at step 30 | - |
| eval_loss (final) | 2.2000 | 1.9000 |
| eval_loss (best) | 2.0000 at step 20 | 1.8000 at step 50 |
| eval_loss/web (final) | - | 1.6000 |
| eval_loss/web (best) | - | 1.6000 at step 100 |
| best checkpoint | - | step 50 |
"""


def _compare(*args, cwd):
  return subprocess.run(
    [sys.executable, os.path.join(REPO_ROOT, "tools", "compare.py"), *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_compare_prints_a_markdown_table_of_two_runs(tmp_path, two_runs):
  result = _compare("a", "b", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout == EXPECTED


def test_the_function_gives_each_runs_numbers(two_runs):
  a, b = reports.compare(list(two_runs))
  assert (a["steps"], a["tokens"], a["train_seconds"]) == (30, 30 * 16 * 32, pytest.approx(4.0))
  assert a["final"] == {"loss": 2.25, "eval_loss": 2.2, "eval_accuracy": 0.35}
  # The lowest loss, but the highest accuracy.
  assert a["best"] == {"eval_loss": {"value": 2.0, "step": 20}, "eval_accuracy": {"value": 0.35, "step": 30}}
  assert a["best_checkpoint"] is None and b["best_checkpoint"] == 50


def test_bad_workdirs_are_one_line_naming_them(tmp_path, two_runs, monkeypatch):
  (tmp_path / "empty").mkdir()
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "config.json").write_text("{not json")
  cases = {
    ("a", "missing"): "compare: missing: no such directory",
    ("empty",): "compare: empty: no config.json (not a loom workdir, or its run never started)",
    ("broken", "a"): "compare: broken/config.json cannot be read (JSONDecodeError: ",
    ("missing", "empty"): "compare: missing: no such directory; empty: no config.json",
  }
  for args, message in cases.items():
    result = _compare(*args, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "", args
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
  (tmp_path / "no_metrics").mkdir()
  (tmp_path / "no_metrics" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
  monkeypatch.chdir(tmp_path)
  with pytest.raises(reports.RunError, match=r"^no_metrics: no metrics.jsonl"):
    reports.compare(["a", "no_metrics"])
