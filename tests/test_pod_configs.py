"""Every shipped pod config fits each slice it names, at its shipped batch and length: its real
train step compiled for that TPU topology here (a GPU node without a GPU: estimated)."""

import importlib

import pytest

from tests.conftest import REPO_ROOT
from training import planner

POD_SLICES = [
  (path.stem, slice_name)
  for path in sorted((REPO_ROOT / "configs").glob("*.py"))
  for slice_name in getattr(importlib.import_module(f"configs.{path.stem}"), "SLICES", ())
]


def test_the_pod_configs_are_found():
  assert {name for name, _ in POD_SLICES} >= {"gpt2_124m", "llama3_1b", "llama3_8b", "llama3_70b", "llama3_8b_gpu"}
  assert ("llama3_8b", "v6e-64") in POD_SLICES


@pytest.mark.pods
@pytest.mark.long
@pytest.mark.parametrize("name, slice_name", POD_SLICES)
def test_pod_config_fits_its_slice(name, slice_name):
  config = importlib.import_module(f"configs.{name}").get_config(slice_name)
  result = planner.plan(config, planner.resolve_target(slice_name))
  assert result.fits, result.report()
  # On TPUs attention is the splash kernel; on the GPUs, cuDNN's (its [L, L] mask is in the estimate).
  assert result.settings["attention"] == ("auto (cudnn)" if slice_name.startswith("h100") else "auto (splash)")
  cfg = planner.validate(config, result.mesh["data"] * result.mesh["fsdp"] * result.mesh["tensor"])
  assert result.batch.startswith(f"{cfg.train.global_batch_size} x {cfg.data.seq_len}")
