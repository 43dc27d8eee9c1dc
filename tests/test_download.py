"""tools/download.py and data/downloads.py: corpora fetched into a checked cache, and configs that run anywhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import shakespeare_char
from data import downloads
from data.sources import resolve_files
from sharding import mesh as mesh_lib
from training.validation import ConfigError, validate, validate_data

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, as on developer machines and in CI: the local copy every test passes.
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty download cache for the test (LOOM_DATA_DIR), not yet created."""
  directory = tmp_path / "cache"
  monkeypatch.setenv("LOOM_DATA_DIR", str(directory))
  return directory


def test_the_cache_is_loom_data_dir_else_the_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path / "here"))
  assert downloads.cached_path("tinyshakespeare") == str(tmp_path / "here" / "tinyshakespeare" / "input.txt")
  monkeypatch.delenv("LOOM_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert downloads.cache_dir() == str(tmp_path / "xdg" / "loom" / "data")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert downloads.cache_dir() == os.path.expanduser("~/.cache/loom/data")
  with pytest.raises(downloads.DownloadError, match=r"^no corpus named 'nope'; known: tinyshakespeare$"):
    downloads.cached_path("nope")


def test_shipped_config_reads_the_cache_and_runs_after_an_install_from_a_local_copy(cache):
  config = shakespeare_char.get_config()
  assert config.data.sources.shakespeare.paths == str(cache / "tinyshakespeare" / "input.txt")
  path = downloads.download("tinyshakespeare", from_file=str(SHAKESPEARE))
  assert path == config.data.sources.shakespeare.paths
  assert Path(path).read_bytes() == SHAKESPEARE.read_bytes()
  assert sorted(os.listdir(cache / "tinyshakespeare")) == ["input.txt"]  # No temporary file left over.
  data = validate_data(config).data
  assert resolve_files("shakespeare", data.sources.shakespeare) == [path]
  # Already there with the right checksum: kept as it is, without a download.
  assert downloads.download("tinyshakespeare") == path


def test_a_checksum_mismatch_leaves_nothing_in_the_cache(cache, tmp_path):
  truncated = tmp_path / "truncated.txt"
  truncated.write_bytes(SHAKESPEARE.read_bytes()[:1000])
  with pytest.raises(
    downloads.DownloadError,
    match=rf"^{truncated}: sha256 [0-9a-f]{{64}} is not the "
    rf"{downloads.CORPORA['tinyshakespeare'].sha256} registered for tinyshakespeare in "
    r"data/downloads.py; nothing was written to ",
  ):
    downloads.download("tinyshakespeare", from_file=str(truncated))
  assert not cache.exists()  # Not even the folders it would have made.
  # Over a good cached copy, a bad one changes nothing either.
  good = downloads.download("tinyshakespeare", from_file=str(SHAKESPEARE))
  with pytest.raises(downloads.DownloadError, match="nothing was written"):
    downloads.download("tinyshakespeare", from_file=str(truncated))
  assert Path(good).read_bytes() == SHAKESPEARE.read_bytes()
  assert os.listdir(cache / "tinyshakespeare") == ["input.txt"]


def test_download_from_the_url_and_offline(cache, tmp_path, monkeypatch):
  # No network in tests: the registered URL is swapped for a file:// URL, which urllib opens like any other.
  corpus = downloads.CORPORA["tinyshakespeare"]
  monkeypatch.setitem(
    downloads.CORPORA,
    "tinyshakespeare",
    downloads.Corpus(url=SHAKESPEARE.as_uri(), file_name=corpus.file_name, sha256=corpus.sha256),
  )
  path = downloads.download("tinyshakespeare")
  assert Path(path).read_bytes() == SHAKESPEARE.read_bytes()
  os.remove(path)
  unreachable = (tmp_path / "offline" / "input.txt").as_uri()
  monkeypatch.setitem(
    downloads.CORPORA,
    "tinyshakespeare",
    downloads.Corpus(url=unreachable, file_name=corpus.file_name, sha256=corpus.sha256),
  )
  with pytest.raises(downloads.DownloadError) as error:
    downloads.download("tinyshakespeare")
  message = str(error.value)
  assert message.startswith(f"cannot download tinyshakespeare from {unreachable} (")
  assert message.endswith("run `python tools/download.py tinyshakespeare --from=THE_FILE`")
  assert "\n" not in message
  assert os.listdir(cache / "tinyshakespeare") == []  # The folder was there before; no file was written.


def test_a_missing_download_is_one_line_naming_the_command_and_the_field(cache):
  config = shakespeare_char.get_config()
  expected = (
    f"data.sources.shakespeare.paths: {cache / 'tinyshakespeare' / 'input.txt'} is not downloaded "
    "yet; run `python tools/download.py tinyshakespeare` (offline: add --from=A_LOCAL_COPY), or set "
    "--config.data.sources.shakespeare.paths=FILE to read a copy you have."
  )
  with pytest.raises(ConfigError) as error:
    validate(config, num_devices=2)
  assert str(error.value) == expected
  with pytest.raises(ConfigError) as error:
    validate_data(config)
  assert str(error.value) == expected
  # Any other path that matches nothing keeps the plain message.
  config.data.sources.shakespeare.paths = str(cache / "elsewhere.txt")
  with pytest.raises(ConfigError, match=r"^data.sources.shakespeare.paths: pattern .*elsewhere.txt' matches no files"):
    validate_data(config)


def test_train_py_without_the_download_stops_in_one_line(cache, tmp_path):
  env = dict(
    os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
  )
  run = subprocess.run(
    [sys.executable, "train.py", "--config=configs/shakespeare_char.py", f"--workdir={tmp_path / 'run'}"],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode != 0
  assert run.stderr.strip().splitlines() == [
    f"config error (configs/shakespeare_char.py): data.sources.shakespeare.paths: "
    f"{cache / 'tinyshakespeare' / 'input.txt'} is not downloaded yet; run `python tools/download.py "
    "tinyshakespeare` (offline: add --from=A_LOCAL_COPY), or set --config.data.sources.shakespeare.paths=FILE "
    "to read a copy you have."
  ], run.stderr
  assert not (tmp_path / "run").exists()


def test_download_tool(cache, tmp_path):
  truncated = tmp_path / "truncated.txt"
  truncated.write_bytes(SHAKESPEARE.read_bytes()[:1000])
  bad = subprocess.run(
    [sys.executable, "tools/download.py", "tinyshakespeare", f"--from={truncated}"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"download error: {truncated}: sha256 "), bad.stderr
  assert not cache.exists()
  good = subprocess.run(
    [sys.executable, "tools/download.py", "tinyshakespeare", f"--from={SHAKESPEARE}"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert good.returncode == 0, good.stderr
  assert good.stdout.strip() == str(cache / "tinyshakespeare" / "input.txt")
  assert (cache / "tinyshakespeare" / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()


@pytest.mark.parametrize(
  "cores, mesh, batch, microbatches, expected",
  [
    (2, dict(data=-1, fsdp=1, tensor=1), 12, 1, 2),  # shakespeare_char on the 2-core benchmark machine
    (16, dict(data=-1, fsdp=1, tensor=1), 12, 1, 12),  # a core per row at most: 16 cores do not divide 12
    (8, dict(data=-1, fsdp=1, tensor=1), 12, 1, 6),
    (8, dict(data=-1, fsdp=1, tensor=1), 12, 2, 6),  # microbatches of 6 rows
    (8, dict(data=-1, fsdp=2, tensor=1), 12, 1, 6),  # data*fsdp = 3*2 divides 12, 4*2 does not
    (8, dict(data=1, fsdp=1, tensor=4), 12, 1, 4),  # a fixed mesh of 4
    (3, dict(data=4, fsdp=1, tensor=1), 12, 1, 3),  # nothing fits: every core, and validation says why
    (5, None, 0, 1, 5),  # no mesh given: every core
  ],
)
def test_cpu_devices_minus_one_is_a_device_per_core_as_the_mesh_and_batch_allow(
  monkeypatch, cores, mesh, batch, microbatches, expected
):
  monkeypatch.setattr(mesh_lib, "available_cores", lambda: cores)
  assert mesh_lib.resolve_cpu_devices(-1, mesh, batch, microbatches) == expected


def test_cpu_devices_counts():
  if hasattr(os, "sched_getaffinity"):
    assert mesh_lib.available_cores() == len(os.sched_getaffinity(0))
  assert mesh_lib.resolve_cpu_devices(0, dict(data=-1), 12) == 0  # JAX's default.
  assert mesh_lib.resolve_cpu_devices(3, dict(data=-1), 12) == 3  # As given, even where the batch does not divide.
  with pytest.raises(ValueError, match=r"^config field 'cpu_devices'=-2: must be 0 \(JAX's default\), a positive "):
    mesh_lib.resolve_cpu_devices(-2)
  assert shakespeare_char.get_config().cpu_devices == -1
  # In a process whose JAX has started (conftest's 8 CPU devices), -1 keeps the devices it has.
  import jax

  started = len(jax.devices("cpu"))
  mesh_lib.use_cpu_devices(-1, dict(data=-1, fsdp=1, tensor=1), 12)
  assert len(jax.devices("cpu")) == started
