"""One process of tests/test_multihost.py: read this host's share, assemble the global batches.

Run as `python tests/multihost_worker.py SPEC_JSON PROCESS_ID OUT_NPZ`. SPEC_JSON
holds the coordinator address, the process count and the cases, each a filled
data config (as a dict), a global batch size, a seed and a number of train
steps. For every case the worker builds the Datasets as process PROCESS_ID,
logs every row index that PreparedRows.read is asked for, turns each step's
local slice into a global jax.Array over all processes' devices
(sharding.placement.global_batch_from_local), gathers it back with
process_allgather, and saves the lot to OUT_NPZ for the parent to compare.

XLA_FLAGS (the number of CPU devices per process) must be in the environment
before jax is imported; the parent sets it.
"""

import collections
import json
import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data import build_datasets
from data.prepared import PreparedRows
from sharding.mesh import make_mesh
from sharding.placement import global_batch_from_local

# Batch keys that are per-process slices; 'source_counts' is already global.
SLICED_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


class ReadLog:
  """Every row index PreparedRows.read was asked for, per (directory, split)."""

  def __init__(self):
    self._lock = threading.Lock()  # tf.data calls read from several threads.
    self.indices = collections.defaultdict(list)

  def install(self) -> None:
    original = PreparedRows.read
    log = self

    def logged_read(rows, indices):
      with log._lock:
        log.indices[(os.path.normpath(rows.directory), rows.split)].append(np.array(indices, np.int64).reshape(-1))
      return original(rows, indices)

    PreparedRows.read = logged_read

  def take(self, directory: str, split: str) -> np.ndarray:
    with self._lock:
      parts = self.indices.pop((os.path.normpath(directory), split), [])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def run_case(name: str, case: dict, mesh, read_log: ReadLog, out: dict) -> None:
  data_config = ml_collections.ConfigDict(case["data"])
  datasets = build_datasets(
    data_config,
    global_batch_size=case["global_batch_size"],
    seed=case["seed"],
    workdir=case["workdir"],
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  gathered = collections.defaultdict(list)
  local_batch_size = case["global_batch_size"] // jax.process_count()
  for batch in datasets.train_batches(0, case["steps"]):
    local = {key: batch[key] for key in SLICED_KEYS}
    for key, value in local.items():
      assert value.shape[0] == local_batch_size, (key, value.shape)
    global_batch = global_batch_from_local(local, mesh)
    for key, array in global_batch.items():
      assert array.shape[0] == case["global_batch_size"], (key, array.shape)
      assert not array.is_fully_addressable  # Really spread over both processes.
    for key, value in multihost_utils.process_allgather(global_batch, tiled=True).items():
      gathered[key].append(np.asarray(value))
    gathered["source_counts"].append(np.asarray(batch["source_counts"]))
  for key, values in gathered.items():
    out[f"{name}__train__{key}"] = np.stack(values)
  for source_name, source in data_config.sources.items():
    out[f"{name}__reads__{source_name}__train"] = read_log.take(source.paths, "train")

  if case.get("eval_batches"):
    source_name = next(iter(data_config.sources.keys()))
    gathered = collections.defaultdict(list)
    for batch in datasets.eval_batches(source_name, case["eval_batches"]):
      global_batch = global_batch_from_local({key: batch[key] for key in SLICED_KEYS}, mesh)
      for key, value in multihost_utils.process_allgather(global_batch, tiled=True).items():
        gathered[key].append(np.asarray(value))
    for key, values in gathered.items():
      out[f"{name}__eval__{key}"] = np.stack(values)
    out[f"{name}__reads__{source_name}__validation"] = read_log.take(
      data_config.sources[source_name].paths, "validation"
    )


def main(spec_path: str, process_id: int, out_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  jax.distributed.initialize(
    coordinator_address=spec["coordinator_address"],
    num_processes=spec["num_processes"],
    process_id=process_id,
    initialization_timeout=spec.get("initialization_timeout", 60),
  )
  try:
    out = {
      "process_index": np.int64(jax.process_index()),
      "process_count": np.int64(jax.process_count()),
      "device_count": np.int64(jax.device_count()),
      "local_device_count": np.int64(jax.local_device_count()),
    }
    mesh = make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
    read_log = ReadLog()
    read_log.install()
    for name, case in spec["cases"].items():
      run_case(name, case, mesh, read_log, out)
    # Nobody leaves before everyone has gathered (so no collective loses a peer).
    multihost_utils.sync_global_devices("multihost_worker done")
    tmp_path = out_path + ".tmp.npz"
    np.savez(tmp_path, **out)
    os.replace(tmp_path, out_path)
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit(f"usage: {sys.argv[0]} SPEC_JSON PROCESS_ID OUT_NPZ")
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
