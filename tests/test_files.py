"""data/files.py: every file loom writes is whole or absent, and a directory is probed before use."""

import os
import stat

import pytest

from data.files import DirectoryTaken, atomic_copy, atomic_directory, atomic_write, fsync_file, writable_directory


class WriterFailed(Exception):
  pass


def test_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("old\n")
  with atomic_write(str(path)) as f:
    f.write("new\n")
    assert path.read_text() == "old\n"  # Readers see the old file until the writer is done.
  assert path.read_text() == "new\n"
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
  path = tmp_path / "meta.json"
  path.write_text("old")
  with pytest.raises(WriterFailed):
    with atomic_write(str(path)) as f:
      f.write("half of the new")
      raise WriterFailed()
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["meta.json"]  # The temporary sibling went too.


def test_atomic_write_creates_no_file_when_the_first_writer_raises(tmp_path):
  with pytest.raises(WriterFailed):
    with atomic_write(str(tmp_path / "new" / "sp.model"), "wb"):
      raise WriterFailed()
  assert os.listdir(tmp_path / "new") == []


def test_atomic_write_passes_mode_and_encoding_and_creates_the_directory(tmp_path):
  path = tmp_path / "a" / "b" / "vocab.json"
  with atomic_write(str(path), "w", encoding="utf-16") as f:
    f.write("ü")
  assert path.read_bytes() == "ü".encode("utf-16")
  with atomic_write(str(path), "wb") as f:
    f.write(b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
  # Not mkstemp's 0600: a shared dataset's meta.json or tokenizer must stay readable to the group.
  umask = os.umask(0o022)
  try:
    with atomic_write(str(tmp_path / "meta.json")) as f:
      f.write("{}")
    with open(tmp_path / "plain.json", "w") as f:
      f.write("{}")
  finally:
    os.umask(umask)
  mode = stat.S_IMODE(os.stat(tmp_path / "meta.json").st_mode)
  assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode) == 0o644


def test_atomic_copy(tmp_path):
  (tmp_path / "tokenizer.json").write_bytes(b'{"model": 1}')
  target = atomic_copy(str(tmp_path / "tokenizer.json"), str(tmp_path / "out" / "tokenizer.json"))
  assert target == str(tmp_path / "out" / "tokenizer.json")
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == b'{"model": 1}'
  assert os.listdir(tmp_path / "out") == ["tokenizer.json"]


def test_atomic_directory_appears_only_complete(tmp_path):
  target = tmp_path / "exported"
  with atomic_directory(str(target)) as temporary:
    assert os.path.dirname(temporary) == str(tmp_path) and temporary != str(target)
    with open(os.path.join(temporary, "config.json"), "w") as f:
      f.write("{}")
    os.mkdir(os.path.join(temporary, "checkpoints"))
    assert not target.exists()
  assert sorted(os.listdir(target)) == ["checkpoints", "config.json"]
  assert os.listdir(tmp_path) == ["exported"]


def test_atomic_directory_leaves_nothing_when_the_writer_raises(tmp_path):
  with pytest.raises(WriterFailed):
    with atomic_directory(str(tmp_path / "exported")) as temporary:
      with open(os.path.join(temporary, "model.safetensors"), "wb") as f:
        f.write(b"half")
      raise WriterFailed()
  assert os.listdir(tmp_path) == []


def test_atomic_directory_replaces_an_empty_directory_and_refuses_a_filled_one(tmp_path):
  (tmp_path / "empty").mkdir()
  with atomic_directory(str(tmp_path / "empty")) as temporary:
    open(os.path.join(temporary, "config.py"), "w").close()
  assert os.listdir(tmp_path / "empty") == ["config.py"]

  (tmp_path / "taken").mkdir()
  with pytest.raises(DirectoryTaken, match="must stay new or empty"):
    with atomic_directory(str(tmp_path / "taken")) as temporary:
      open(os.path.join(temporary, "config.py"), "w").close()
      open(tmp_path / "taken" / "other", "w").close()  # Someone else filled it meanwhile.
  assert os.listdir(tmp_path / "taken") == ["other"]
  assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]


def test_fsync_file(tmp_path):
  (tmp_path / "shard").write_bytes(b"rows")
  fsync_file(str(tmp_path / "shard"))
  with pytest.raises(FileNotFoundError):
    fsync_file(str(tmp_path / "missing"))


def test_writable_directory_creates_it_and_leaves_no_probe(tmp_path):
  path = str(tmp_path / "a" / "b")
  assert writable_directory(path) == path
  assert os.path.isdir(path) and os.listdir(path) == []


def test_writable_directory_raises_where_nothing_can_be_created(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError):
    writable_directory(str(tmp_path / "file" / "checkpoints"))  # A path under a regular file.
  with pytest.raises(OSError):
    writable_directory(str(tmp_path / "file"))  # A regular file.
  if os.path.isdir("/proc/self"):  # A place even root cannot create a directory in.
    with pytest.raises(OSError):
      writable_directory("/proc/self")
