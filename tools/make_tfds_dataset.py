"""Writes local text / JSONL files as a versioned TFDS dataset.

The result is then read like any TFDS dataset, as a source
`kind='tfds', name='NAME:VERSION', data_dir=DATA_DIR`:

  python tools/make_tfds_dataset.py --name=my_corpus --version=1.0.0 \
      --paths='corpus/*.txt' --kind=text --data_dir=~/tensorflow_datasets \
      --validation_fraction=0.01

Bad records (empty files, undecodable bytes, malformed JSON lines, ...) are
skipped and counted; the counts are printed at the end.
"""

import os
import sys

# Run as a script from anywhere: the repo root holds the `data` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import (
  app,  # pylint: disable=g-import-not-at-top
  flags,
)

from data import sources
from data.bad_data import BadData
from training.cli import parse_flags

_NAME = flags.DEFINE_string("name", None, "TFDS dataset name (lower_snake_case).", required=True)
_VERSION = flags.DEFINE_string("version", "1.0.0", "Dataset version 'MAJOR.MINOR.PATCH'.")
_PATHS = flags.DEFINE_string("paths", None, "Comma-separated file globs (** recursive).", required=True)
_KIND = flags.DEFINE_enum(
  "kind", "text", list(sources.TFDS_WRITABLE_KINDS), "text: one file = one document; jsonl: one JSON object per line."
)
_FIELD = flags.DEFINE_string("field", "text", "JSONL field holding the text.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
_VALIDATION_FRACTION = flags.DEFINE_float(
  "validation_fraction", 0.0, "Share of documents (every Nth) in a 'validation' split."
)
_MAX_FILES = flags.DEFINE_integer("max_files", 0, "Read only the first N files (0: all).")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0, "Stop after N documents (0: all).")
_DESCRIPTION = flags.DEFINE_string("description", "", "Stored in the dataset info.")


def main(argv):
  del argv
  source = dict(
    kind=_KIND.value,
    paths=_PATHS.value,
    field=_FIELD.value,
    max_files=_MAX_FILES.value,
    max_documents=_MAX_DOCUMENTS.value,
  )
  bad_data = BadData("skip")
  try:
    written = sources.write_tfds_dataset(
      _NAME.value,
      _VERSION.value,
      source,
      data_dir=_DATA_DIR.value,
      validation_fraction=_VALIDATION_FRACTION.value,
      bad_data=bad_data,
      description=_DESCRIPTION.value,
    )
  except (ValueError, OSError) as e:
    # The flags fill a source named "input": name them as the user typed them.
    raise SystemExit("make_tfds_dataset: " + str(e).replace("data.sources.input.", "--")) from None
  sizes = ", ".join(f"{split}: {n}" for split, n in sorted(written.num_examples.items()))
  print(f"Wrote {_NAME.value}:{_VERSION.value} to {written.directory} ({sizes} documents).")
  print(f"Skipped bad records: {bad_data.summary()}.")
  data_dir = _DATA_DIR.value or "~/tensorflow_datasets"
  print(f"Read it as a source: kind='tfds', name='{_NAME.value}:{_VERSION.value}', data_dir='{data_dir}'.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
