"""Test setup: eight CPU devices and a quiet TensorFlow, fixed before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
  config.addinivalue_line("markers", "long: a test of minutes (it is started first, beside the others)")


def pytest_collection_modifyitems(config, items):
  """Long tests first and on their own: with pytest-xdist (pytest.ini) the other worker runs
  everything else meanwhile. The rest stay together by file, so module fixtures are built once."""
  for item in items:
    long = item.get_closest_marker("long") is not None
    item.add_marker(pytest.mark.xdist_group(item.nodeid if long else item.module.__name__))
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
