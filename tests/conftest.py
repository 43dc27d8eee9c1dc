"""Test setup: eight CPU devices and a quiet TensorFlow, fixed before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile for TPU topologies with libtpu (tools/plan.py's planner) from both pytest workers at
# once: its lock file is for processes that drive a real TPU, and there is no TPU metadata server.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import shutil
import sys
import tempfile
from pathlib import Path

# One XLA compilation cache for the whole session, empty at its start: most tests compile the
# same few tiny-model programs, in this process, the other pytest-xdist worker (which inherits
# this environment) and the train.py processes the tests start. It cut test_training.py and
# test_configs.py from 5.1 to 3.2 CPU-minutes. A test that sets its own cache keeps that one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="loom-tests-xla-cache-")
  os.environ["LOOM_TESTS_OWN_XLA_CACHE"] = "1"  # This session made it, so it removes it.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
  config.addinivalue_line("markers", "long: a test of minutes (it is started first, beside the others)")
  config.addinivalue_line("markers", "pods: a shipped pod config compiled for its slice (pytest -m pods)")


def pytest_unconfigure(config):
  is_xdist_worker = hasattr(config, "workerinput")
  if os.environ.get("LOOM_TESTS_OWN_XLA_CACHE") and not is_xdist_worker:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Long tests first and on their own: with pytest-xdist (pytest.ini) the other worker runs
  everything else meanwhile. The rest stay together by file, so module fixtures are built once."""
  for item in items:
    long = item.get_closest_marker("long") is not None
    item.add_marker(pytest.mark.xdist_group(item.nodeid if long else item.module.__name__))
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
