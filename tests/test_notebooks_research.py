"""notebooks/ablation.ipynb, finetune_chat.ipynb and continued_pretraining.ipynb run top to bottom in a fresh
kernel of this virtualenv."""

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"


def execute(name: str, tmp_path, monkeypatch):
  """The executed notebook (every cell's outputs), run as tests/test_notebook.py runs the quickstart."""
  prefix = tmp_path / "jupyter"
  ipykernel_kernelspec.install(kernel_name="python3", prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("LOOM_ROOT", str(REPO_ROOT))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  client.execute()  # Raises CellExecutionError on the first failing cell.
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  return nb, outputs


def stream_text(outputs) -> str:
  return "".join(out.get("text", "") for out in outputs if out.output_type == "stream")


@pytest.mark.parametrize("name", ["ablation.ipynb", "finetune_chat.ipynb", "continued_pretraining.ipynb"])
def test_committed_notebook_has_no_outputs_and_a_colab_cell(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert "google.colab" in code[0].source and "pip" in code[0].source


def test_ablation_notebook_runs(tmp_path, monkeypatch):
  nb, outputs = execute("ablation.ipynb", tmp_path, monkeypatch)
  text = stream_text(outputs)
  assert f"kernel python: {sys.executable}" in text
  assert "2 finished" in text
  losses = {
    float(lr): float(loss) for lr, loss in re.findall(r"learning_rate ([\d.e-]+): final eval_loss ([\d.]+)", text)
  }
  assert sorted(losses) == [3e-4, 3e-3]
  assert all(2.0 < loss < 6.0 for loss in losses.values())  # Bytes: about ln(256) = 5.5 at initialisation.
  best = float(re.search(r"best learning rate: ([\d.e-]+)", text).group(1))
  assert best == min(losses, key=losses.get)  # results.md's best row is the lowest final eval loss.
  pngs = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
  assert len(pngs) == 1  # The sweep's curves and its metric against the learning rate.
  tables = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
  assert len(tables) == 1 and tables[0].count("**best**") == 1
  assert "| trial | field:optimizer.learning_rate | final_eval_loss" in tables[0]


def test_finetune_chat_notebook_runs(tmp_path, monkeypatch):
  nb, outputs = execute("finetune_chat.ipynb", tmp_path, monkeypatch)
  text = stream_text(outputs)
  assert f"kernel python: {sys.executable}" in text
  assert "36 conversations" in text
  assert "LoRA rank 4" in text  # The fine-tune trained adapters, not the whole model...
  assert "initialised from" in text and "base/checkpoints step 40" in text  # ...beside the notebook's base.
  first = float(re.search(r"first chat loss: ([\d.]+)", text).group(1))
  final = float(re.search(r"final chat loss: ([\d.]+)", text).group(1))
  assert final < first - 0.1
  # The prompt is the ChatML rendering with the assistant's header, as tools/generate.py --chat builds it.
  assert "'<|im_start|>user\\nHi, I am Grace.<|im_end|>\\n<|im_start|>assistant\\n'" in text
  assert re.search(r"assistant: '.+'", text)  # Some reply, cut at <|im_end|>.


# A row of the continued-pretraining notebook's comparison: run | steps | old start -> end | new start -> end.
CONTINUED_ROW = re.compile(
  r"^(replay 30%|no replay)\s*\|\s*(\d+) \| ([\d.]+) -> ([\d.]+)\s*\| ([\d.]+) -> ([\d.]+)$", re.MULTILINE
)


def test_continued_pretraining_notebook_runs(tmp_path, monkeypatch):
  nb, outputs = execute("continued_pretraining.ipynb", tmp_path, monkeypatch)
  text = stream_text(outputs)
  assert f"kernel python: {sys.executable}" in text
  pretrained = float(re.search(r"pretrained: old-data eval_loss ([\d.]+)", text).group(1))
  assert 1.5 < pretrained < 2.8  # Bytes: about ln(256) = 5.5 at initialisation; 2.01-2.21 over seeds 0-2.
  rows = {label: [float(v) for v in values] for label, *values in CONTINUED_ROW.findall(text)}
  assert sorted(rows) == ["no replay", "replay 30%"]
  for steps, old_start, _old_end, new_start, new_end in rows.values():
    assert steps == 80  # Both continued runs finished.
    assert old_start == pytest.approx(pretrained, abs=1e-4)  # Both start from the pre-trained model...
    assert new_end < new_start - 2.0  # ...and learn the new data (3.9-5.4 -> 1.05-1.19 over seeds 0-2).
  replay, without = rows["replay 30%"], rows["no replay"]
  assert replay[3] == without[3]  # The same new-data batches evaluated at the same start.
  assert without[2] > without[1] + 1.0  # Without replay the old data is forgotten (+2.0 to +2.3)...
  assert replay[2] < without[2] - 1.5  # ...with 30% replay it is not (2.57 to 2.71 lower)...
  assert replay[2] < replay[1]  # ...and still falls (-0.43 to -0.53: 80 steps of pre-training left it to learn).
  lower = float(re.search(r"replay kept the old-data eval_loss ([\d.]+) lower", text).group(1))
  assert lower == pytest.approx(without[2] - replay[2], abs=2e-4)
  pngs = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
  assert len(pngs) == 1  # Both runs' curves, each source's evaluation loss among them.
