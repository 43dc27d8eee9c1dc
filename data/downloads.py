"""Small public corpora a shipped config reads, fetched once into a local cache.

A config names such a corpus by `cached_path(NAME)`, the file's place in the
cache, so configs stay plain data and refer to no path outside the repository:

  python tools/download.py tinyshakespeare                 # fetches and checks it
  python tools/download.py tinyshakespeare --from=FILE     # offline: installs a copy you have

The cache is $LOOM_DATA_DIR, else $XDG_CACHE_HOME/loom/data, else
~/.cache/loom/data; a corpus lives at CACHE/NAME/FILE_NAME. Every file is
checked against the sha256 registered here before it is put there (written
whole or not at all, by data/files.py's atomic_write), so what a config finds
in the cache is exactly the corpus its results were measured on.

Standard library only: configs import this module.
"""

import contextlib
import dataclasses
import hashlib
import os
import urllib.request

from data.files import atomic_write

DOWNLOAD_COMMAND = "python tools/download.py"
_CHUNK_BYTES = 1 << 20
_TIMEOUT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Corpus:
  url: str
  file_name: str
  sha256: str


CORPORA = {
  # Karpathy's char-rnn tiny Shakespeare (1,115,394 bytes), nanoGPT's shakespeare_char corpus.
  "tinyshakespeare": Corpus(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    file_name="input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
  ),
}


class DownloadError(Exception):
  """A corpus could not be fetched or installed; the message is one line saying what to do."""


def _corpus(name: str) -> Corpus:
  if name not in CORPORA:
    raise DownloadError(f"no corpus named {name!r}; known: {', '.join(sorted(CORPORA))}")
  return CORPORA[name]


def cache_dir() -> str:
  """Where downloaded corpora live (read from the environment on every call, so tests can move it)."""
  if os.environ.get("LOOM_DATA_DIR"):
    return os.path.abspath(os.path.expanduser(os.environ["LOOM_DATA_DIR"]))
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.abspath(os.path.join(os.path.expanduser(cache_home), "loom", "data"))


def cached_path(name: str) -> str:
  """The path of corpus `name` in the cache, whether or not it has been downloaded yet."""
  return os.path.join(cache_dir(), name, _corpus(name).file_name)


def corpus_for_path(path: str) -> str | None:
  """The name of the registered corpus whose cache path `path` is, else None."""
  path = os.path.abspath(os.path.expanduser(path))
  return next((name for name in CORPORA if cached_path(name) == path), None)


def missing_message(name: str, field: str) -> str:
  """What to do when corpus `name`, which config field `field` points at, is not in the cache."""
  return (
    f"{field}: {cached_path(name)} is not downloaded yet; run `{DOWNLOAD_COMMAND} {name}` "
    f"(offline: add --from=A_LOCAL_COPY), or set --config.{field}=FILE to read a copy you have."
  )


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download(name: str, from_file: str = "") -> str:
  """Puts corpus `name` in the cache and returns its path.

  From the corpus's URL, or from the local file `from_file` (an offline
  machine, CI). Either way the bytes must match the registered sha256: on a
  mismatch or a failed transfer nothing is left in the cache. A file already
  cached with the right checksum is kept as it is.

  Raises:
    DownloadError: one line naming what failed and the command or option to use.
  """
  corpus = _corpus(name)
  path = cached_path(name)
  if not from_file and os.path.isfile(path) and _sha256(path) == corpus.sha256:
    return path
  source = os.path.abspath(os.path.expanduser(from_file)) if from_file else corpus.url
  new_directories = []  # What atomic_write will create, deepest first: removed again on failure.
  directory = os.path.dirname(path)
  while not os.path.isdir(directory) and directory != os.path.dirname(directory):
    new_directories.append(directory)
    directory = os.path.dirname(directory)
  try:
    if from_file:
      reader = open(source, "rb")
    else:
      reader = urllib.request.urlopen(corpus.url, timeout=_TIMEOUT_SECONDS)
  except OSError as e:  # urllib.error.URLError, a socket timeout and a missing --from file are all OSErrors.
    if from_file:
      raise DownloadError(f"--from={source}: cannot be read ({e.strerror or e})") from None
    reason = getattr(e, "reason", None) or e
    raise DownloadError(
      f"cannot download {name} from {corpus.url} ({reason}); without a network, fetch "
      f"that URL elsewhere and run `{DOWNLOAD_COMMAND} {name} --from=THE_FILE`"
    ) from None
  try:
    with reader, atomic_write(path, "wb") as out:
      digest = hashlib.sha256()
      for chunk in iter(lambda: reader.read(_CHUNK_BYTES), b""):
        digest.update(chunk)
        out.write(chunk)
      if digest.hexdigest() != corpus.sha256:  # Raised inside atomic_write: the partial file goes too.
        raise DownloadError(
          f"{source}: sha256 {digest.hexdigest()} is not the {corpus.sha256} registered "
          f"for {name} in data/downloads.py; nothing was written to {path}"
        )
  except BaseException as e:
    for directory in new_directories:  # Leave no empty folder behind either.
      with contextlib.suppress(OSError):
        os.rmdir(directory)
    if isinstance(e, OSError):  # A connection dropped midway, a full disk.
      raise DownloadError(f"{name}: copying {source} to {path} failed ({e}); nothing was written") from None
    raise
  return path
