"""Fetch a small public corpus a config reads into loom's data cache, checking its sha256.

  python tools/download.py tinyshakespeare                     # from its URL
  python tools/download.py tinyshakespeare --from=input.txt    # offline / CI: a copy you have

Prints the cached file's path. The cache is $LOOM_DATA_DIR (default ~/.cache/loom/data); the corpora
and their checksums are listed in data/downloads.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from data import downloads  # noqa: E402

_FROM = flags.DEFINE_string(
  "from",
  "",
  "Install this local file instead of downloading (it must have the "
  "registered sha256): for machines without a network.",
)


def main(argv):
  names = argv[1:]
  if len(names) != 1:
    raise SystemExit(
      f"usage: python tools/download.py NAME [--from=FILE]; NAME is one of: {', '.join(sorted(downloads.CORPORA))}"
    )
  try:
    print(downloads.download(names[0], from_file=_FROM.value))
  except downloads.DownloadError as e:
    raise SystemExit(f"download error: {e}") from None


if __name__ == "__main__":
  app.run(main)
