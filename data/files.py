"""How loom writes its own files (whole or not at all, and only where it can), and reads the small
JSON-lines files users hand it.

Every file loom writes (metrics, config.json, tokenizers, row caches, prepared
data's meta.json, downloads) goes through `atomic_write` (or `atomic_copy`): a
reader, a second process or a restart after a kill sees the old file or the
complete new one, never a half-written one. A directory written as one piece
(a converted Hugging Face model) goes through `atomic_directory`.
`writable_directory` is the one probe for a directory loom is about to fill.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO


class DirectoryTaken(OSError):
  """atomic_directory's target became a file or a non-empty directory while it was being written."""


def _temporary_sibling(path: str, kind: str) -> str:
  # Hidden, and named after `path`, so that a leftover of a killed process says whose it was.
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary sibling of `path` for writing; on a clean exit flushes it to disk and renames
  it over `path`. On an exception the temporary file is removed and `path` is left as it was."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = _temporary_sibling(path, "tmp")
  # os.open with 0o666, not tempfile.mkstemp: the file gets the permissions open() would give it
  # (the umask's), where mkstemp's 0600 would hide a shared dataset or workdir from the group.
  fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())  # Renamed only once the bytes are on disk: a crash leaves no empty file.
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def atomic_copy(source: str, path: str) -> str:
  """Copies the file `source` to `path` through atomic_write; returns `path`."""
  with open(source, "rb") as original, atomic_write(path, "wb") as copy:
    shutil.copyfileobj(original, copy)
  return path


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a new temporary sibling directory of `path` to fill; on a clean exit flushes its files
  to disk and renames it to `path`, which must not exist or be an empty directory (a symlink to one:
  the directory it points to is replaced). On an exception the temporary directory is removed, so
  `path` is complete or as it was. Raises DirectoryTaken if `path` filled up meanwhile."""
  target = os.path.realpath(path)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  temporary = _temporary_sibling(target, "partial")
  os.mkdir(temporary)
  try:
    yield temporary
    _fsync_tree(temporary)
    try:
      os.rename(temporary, target)  # Replaces an empty directory; refuses a file or a non-empty one.
    except OSError as e:
      raise DirectoryTaken(
        e.errno,
        f"cannot move the finished directory into place at {target} "
        f"({e.strerror or e}); it must stay new or empty while it is written",
      ) from None
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise


def _fsync_tree(directory: str) -> None:
  """Every file under `directory` on disk, so the rename never publishes files a crash would empty."""
  for root, _, names in os.walk(directory):
    for name in names:
      fsync_file(os.path.join(root, name))


def fsync_file(path: str) -> None:
  """Flushes a file that something else wrote and closed (a library's writer) to disk: what must
  happen before a rename or an index file makes it count as finished."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def writable_directory(path: str) -> str:
  """Creates `path` if needed and proves something can be created in it; returns it, or raises the
  OSError that stops it. A real probe: os.access says yes to root even where nothing can be created
  (/proc, a read-only mount)."""
  os.makedirs(path, exist_ok=True)
  probe = os.path.join(path, f".write-check-{os.getpid()}-{id(path)}")
  os.mkdir(probe)
  os.rmdir(probe)
  return path


def read_json_lines(path: str) -> list[tuple[int, dict]]:
  """(line number, object) for each non-blank line of a JSONL file. A file that cannot be read, or a
  line that is not a JSON object, is a ValueError naming `path:line`."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot be read ({e})") from None
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: not a JSON object but a {type(record).__name__}")
    records.append((number, record))
  return records
