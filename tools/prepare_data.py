"""Tokenize and pack a config's sources once, so training reads integers.

  python tools/prepare_data.py --config=configs/llama3_1b.py --output=/data/prepared
  python train.py --config=configs/llama3_1b.py --workdir=... \
      --config.data.sources.main.kind=prepared --config.data.sources.main.paths=/data/prepared/main

Each source becomes OUTPUT/NAME/: ArrayRecord shards of packed rows (train and
validation), meta.json (written last: a directory without it is an unfinished
preparation) and the sentencepiece model it was tokenized with. The same
data.seq_len, tokenizer and chat settings must be used for training.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from data.datasets import prepare_datasets  # noqa: E402
from training.cli import check_output_path, config_error, define_config_flag, parse_flags  # noqa: E402
from training.validation import ConfigError, validate_data  # noqa: E402
from version import __version__  # noqa: E402

_CONFIG = define_config_flag("configs/quickstart.py", "Config whose data section to prepare.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory; each source goes to OUTPUT/NAME.")
_SOURCES = flags.DEFINE_list("sources", [], "Names of data.sources to prepare (default: all).")
_CHUNK_TOKENS = flags.DEFINE_integer(
  "chunk_tokens", 16_000_000, "Tokens tokenized and packed at a time (bounds memory)."
)
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 8192, "Rows per ArrayRecord shard file.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace finished preparations in OUTPUT.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  if _CHUNK_TOKENS.value < 1:
    raise SystemExit(f"flag error: --chunk_tokens={_CHUNK_TOKENS.value} must be at least 1 (it bounds memory)")
  try:
    data = validate_data(_CONFIG.value).data
  except ConfigError as e:
    raise config_error(e) from None
  output = os.path.abspath(os.path.expanduser(_OUTPUT.value))
  try:
    _check_not_in_a_recursive_glob(data, output)
  except ValueError as e:
    raise config_error(e) from None
  check_output_path(output, "--output", "directory")
  try:
    metas = prepare_datasets(
      data,
      output,
      names=_SOURCES.value or None,
      chunk_tokens=_CHUNK_TOKENS.value,
      rows_per_shard=_ROWS_PER_SHARD.value,
      overwrite=_OVERWRITE.value,
      loom_version=__version__,
    )
  except (ConfigError, ValueError, OSError) as e:
    raise config_error(e) from None
  for name, meta in metas.items():
    splits = ", ".join(
      f"{split}: {v['num_rows']} rows, {v['num_tokens']} tokens" for split, v in meta["splits"].items()
    )
    skipped = meta["metadata"]["bad_data"]
    print(f"{os.path.join(output, name)}: {splits}" + (f"; skipped {skipped}" if skipped else ""))


def _check_not_in_a_recursive_glob(data, output: str) -> None:
  """A source globbing `DIR/**` would read this preparation (and earlier ones) as text."""
  for name, source in data.sources.items():
    for pattern in filter(None, (p.strip() for p in source.paths.split(","))):
      if "**" not in pattern:
        continue
      fixed = os.path.abspath(os.path.expanduser(pattern.split("**", 1)[0].rstrip("*?[")))
      if output == fixed.rstrip("/") or output.startswith(fixed.rstrip("/") + "/"):
        raise ValueError(
          f"--output={output} is inside data.sources.{name}.paths={pattern!r}: the source "
          "would read prepared files as documents; write the output elsewhere"
        )


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main, flags_parser=parse_flags)
