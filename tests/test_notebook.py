"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this virtualenv."""

import re
import sys
from pathlib import Path

import pytest

from tests.test_notebooks_research import execute

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
  nb, outputs = execute(NOTEBOOK.name, tmp_path, monkeypatch)
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
