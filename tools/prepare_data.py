"""Tokenize and pack a config's sources once, so training reads integers.

  python tools/prepare_data.py --config=configs/llama3_1b.py --output=/data/prepared
  python train.py --config=configs/llama3_1b.py --workdir=... \
      --config.data.sources.main.kind=prepared --config.data.sources.main.paths=/data/prepared/main

Each source becomes OUTPUT/NAME/: ArrayRecord shards of packed rows (train and
validation), meta.json (written last: a directory without it is an unfinished
preparation) and the sentencepiece model it was tokenized with. The same
data.seq_len, tokenizer and chat settings must be used for training.

Offline data selection (evaluation/document_selection.py) drops documents of text
sources first: --dedup=exact|minhash removes duplicates, keeping the first of
each cluster; --filter_checkpoint=RUN_DIR with --filter_keep_fraction or
--filter_max_perplexity keeps the documents a reference model finds likeliest:

  python tools/prepare_data.py --config=... --output=/data/clean --dedup=minhash \
      --filter_checkpoint=/runs/reference --filter_keep_fraction=0.8

meta.json's metadata.document_selection records the settings and what each stage removed.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from data.datasets import prepare_datasets  # noqa: E402
from evaluation.document_selection import SelectionOptions, refuse_chat_sources, select_documents  # noqa: E402
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
# Offline data selection; a minhash_* or filter_* flag left out takes the default of
# evaluation/document_selection.py's SelectionOptions.
flags.DEFINE_enum(
  "dedup",
  "none",
  ["none", "exact", "minhash"],
  "Drop duplicate documents: exact (normalized text), or also MinHash near-duplicates.",
)
flags.DEFINE_float("minhash_threshold", None, "Jaccard similarity at which two documents are near-duplicates (0.8).")
flags.DEFINE_integer("minhash_num_perm", None, "MinHash functions per signature (128).")
flags.DEFINE_integer("minhash_bands", None, "LSH bands, dividing num_perm (0: chosen for the threshold).")
flags.DEFINE_integer("minhash_ngram", None, "Words or characters per shingle (5).")
flags.DEFINE_enum("minhash_shingle", None, ["word", "char"], "Shingles of words or of characters (word).")
flags.DEFINE_integer("minhash_seed", None, "Seed of the MinHash functions (0).")
flags.DEFINE_string("filter_checkpoint", "", "A reference model (run directory, checkpoint or hf_import output).")
flags.DEFINE_float("filter_keep_fraction", None, "Keep this lowest-perplexity share of each source's documents.")
flags.DEFINE_float("filter_max_perplexity", None, "Keep documents whose perplexity is at most this.")
_SELECTION_FLAGS = [field.name for field in dataclasses.fields(SelectionOptions)]


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  if _CHUNK_TOKENS.value < 1:
    raise SystemExit(f"flag error: --chunk_tokens={_CHUNK_TOKENS.value} must be at least 1 (it bounds memory)")
  # Given flags only: a minhash_* or filter_* value left out is None, and SelectionOptions tells a
  # value given to a stage that is off from a default.
  options = SelectionOptions(
    **{name: flags.FLAGS[name].value for name in _SELECTION_FLAGS if flags.FLAGS[name].present or name == "dedup"}
  )
  try:
    options.check()
  except ValueError as e:
    raise SystemExit(f"flag error: {e}") from None
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
  names = _SOURCES.value or list(data.sources.keys())
  try:
    selections = _selections(data, names, options)
    metas = prepare_datasets(
      data,
      output,
      names=_SOURCES.value or None,
      chunk_tokens=_CHUNK_TOKENS.value,
      rows_per_shard=_ROWS_PER_SHARD.value,
      overwrite=_OVERWRITE.value,
      loom_version=__version__,
      selections=selections,
    )
  except (ConfigError, ValueError, OSError) as e:
    raise config_error(e) from None
  for name, meta in metas.items():
    splits = ", ".join(
      f"{split}: {v['num_rows']} rows, {v['num_tokens']} tokens" for split, v in meta["splits"].items()
    )
    skipped = meta["metadata"]["bad_data"]
    print(f"{os.path.join(output, name)}: {splits}" + (f"; skipped {skipped}" if skipped else ""))
    selection = meta["metadata"].get("document_selection")
    if selection:
      removed = ", ".join(f"{count} {reason}" for reason, count in selection["removed"].items())
      print(f"{name}: kept {selection['kept']} of {selection['documents']} documents (removed: {removed})")


def _selections(data, names: list[str], options: SelectionOptions) -> dict:
  """The documents each source keeps, or {} when no selection is asked for."""
  if not options.active or not set(names) <= set(data.sources.keys()):
    return {}  # prepare_datasets names the unknown sources.
  refuse_chat_sources(data, names)  # Before a model is loaded.
  model = None
  if options.filter_checkpoint:
    from evaluation import loading  # JAX and the model: only with a reference model.
    from training.checkpointing import locate

    try:  # A wrong path fails here, before any document is read, in one line naming the flag.
      locate(options.filter_checkpoint, field="--filter_checkpoint")
    except ValueError as e:
      raise SystemExit(f"flag error: {e}") from None
    model = loading.load_model(loading.checkpoint_config(options.filter_checkpoint))
  return select_documents(data, names, options, model)


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
