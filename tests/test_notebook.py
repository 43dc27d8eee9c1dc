"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this virtualenv."""

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert len(code) == 4
  assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # A kernel spec of our own whose argv is this interpreter, so the kernel is the venv's python.
  prefix = tmp_path / "jupyter"
  ipykernel_kernelspec.install(kernel_name="python3", prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  # The kernel inherits the environment: one CPU device is plenty (and quicker on a small machine).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("LOOM_ROOT", str(REPO_ROOT))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
  assert f"kernel python: {sys.executable}" in text
  pngs = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
  assert len(pngs) == 1  # the loss curves
  first = float(re.search(r"first train loss: ([\d.]+)", text).group(1))
  final = float(re.search(r"final train loss: ([\d.]+)", text).group(1))
  assert first > 4.0  # about ln(256) for bytes at initialisation
  assert final < first - 1.0
  sample_text = nb.cells[-1].outputs[0]["text"]
  assert sample_text.startswith("def ") and len(sample_text) > len("def ") + 20
