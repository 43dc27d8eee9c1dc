"""tools/plot.py and training/plots.py: curves of finished runs and of a sweep as PNGs; a finished run
writes WORKDIR/curves.png."""

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from configs import base
from tests.test_training import corpus_config
from training import plots
from training.run import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
  """(width, height) from the PNG's header, after checking its signature and first chunk."""
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR"
  return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny run on two sources (so it logs eval_loss/NAME), and its log."""
  tmp_path = tmp_path_factory.mktemp("plot")
  config = corpus_config(tmp_path, num_steps=8, log_every=2, eval_every=4, checkpoint_every=8, num_samples=0)
  paths = config.data.sources.main.paths
  config.data.sources = {"math": base.source(paths=paths), "more": base.source(paths=paths)}
  config.train.plot_curves = True  # The default, whatever the tiny config's is.
  workdir = str(tmp_path / "run")
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    train(config, workdir)
  return workdir, log.getvalue()


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_finished_run_writes_its_curves(run):
  workdir, log = run
  path = os.path.join(workdir, "curves.png")
  assert png_size(path) == (1500, 360)  # Three panels of 5 x 3.6 inches at 100 dpi.
  assert os.path.getsize(path) > 10_000
  assert f"curves: {path} (python tools/plot.py {workdir} --output=FILE redraws them)\n" in log


def test_curves_are_the_logged_values(run):
  workdir, _ = run
  records = _records(workdir)
  curves = plots.read_curves(workdir)
  assert sorted(curves) == ["eval_loss", "eval_loss/math", "eval_loss/more", "learning_rate", "loss"]
  assert curves["loss"] == ([2, 4, 6, 8], [r["loss"] for r in records if "loss" in r])
  assert curves["eval_loss/more"] == ([4, 8], [r["eval_loss/more"] for r in records if "eval_loss/more" in r])
  figure = plots.plot([workdir])
  loss_ax, eval_ax, lr_ax = figure.axes
  assert [len(ax.lines) for ax in figure.axes] == [1, 3, 1]  # Eval: the pooled loss and each source's.
  assert [line.get_label() for line in eval_ax.lines] == ["run", "run math", "run more"]
  assert list(lr_ax.lines[0].get_ydata()) == curves["learning_rate"][1]


@pytest.fixture(scope="module")
def sweep(run, tmp_path_factory):
  """A sweep directory as tools/sweep.py leaves one: two finished trials (copies of the run, the second
  with its losses raised by 0.5), a third stopped before its metric, and results.csv."""
  workdir, _ = run
  directory = tmp_path_factory.mktemp("sweep") / "lr_sweep"
  for index, shift in enumerate((0.0, 0.5)):
    trial = directory / f"trial_{index}"
    trial.mkdir(parents=True)
    shutil.copy(os.path.join(workdir, "config.json"), trial)
    records = [{k: v + shift if "loss" in k else v for k, v in r.items()} for r in _records(workdir)]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (directory / "results.csv").write_text(
    "trial,workdir,field:optimizer.learning_rate,field:model.num_layers,field:model.norm,final_eval_loss,best\n"
    "0,trial_0,0.0001,2,rmsnorm,1.25,*\n"
    "1,trial_1,0.01,4,layernorm,1.75,\n"
    "2,trial_2,0.001,3,rmsnorm,,\n"
  )
  return str(directory)


def test_sweep_plots_every_trial_and_the_metric_per_field(sweep):
  figure = plots.plot([sweep])
  assert len(figure.axes) == 6  # Three curve panels, then one per swept field.
  loss_ax, _, _, lr_ax, layers_ax, norm_ax = figure.axes
  assert [line.get_label() for line in loss_ax.lines] == ["trial_0", "trial_1"]
  assert loss_ax.lines[1].get_ydata()[0] == pytest.approx(loss_ax.lines[0].get_ydata()[0] + 0.5)
  assert lr_ax.get_title() == "optimizer.learning_rate" and lr_ax.get_xscale() == "log"  # 0.0001 to 0.01: 100x.
  assert layers_ax.get_xscale() == "linear"  # 2 to 4.
  points, best = lr_ax.collections  # The finished trials, then the best one marked.
  assert points.get_offsets().tolist() == [[0.0001, 1.25], [0.01, 1.75]]
  assert best.get_offsets().tolist() == [[0.0001, 1.25]]
  assert [label.get_text() for label in norm_ax.get_xticklabels()] == ["layernorm", "rmsnorm"]
  assert [c.get_offsets().tolist() for c in norm_ax.collections] == [[[1, 1.25], [0, 1.75]], [[1, 1.25]]]


def _plot(*args, cwd):
  return subprocess.run(
    [sys.executable, os.path.join(REPO_ROOT, "tools", "plot.py"), *args], cwd=cwd, capture_output=True, text=True
  )


def test_command_writes_pngs_for_runs_and_a_sweep(run, sweep, tmp_path):
  workdir, _ = run
  result = _plot(workdir, sweep, "--output=both.png", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "wrote both.png\n"
  assert png_size(tmp_path / "both.png") == (1500, 720)  # A second row for the three fields.
  result = _plot(workdir, "--output=one.png", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert png_size(tmp_path / "one.png") == (1500, 360)


def test_a_path_that_is_no_run_is_one_error(run, tmp_path):
  workdir, _ = run
  (tmp_path / "empty").mkdir()
  result = _plot(workdir, str(tmp_path / "empty"), "--output=x.png", cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr == (
    f"plot: {tmp_path / 'empty'}: not a loom workdir (no metrics.jsonl) nor a sweep directory (no results.csv)\n"
  )
  assert not (tmp_path / "x.png").exists()
