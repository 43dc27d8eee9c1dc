"""Held-out metrics of a loom checkpoint: loss, perplexity, bits per byte and next-token accuracy.

  python tools/evaluate.py --checkpoint=/runs/tiny
  python tools/evaluate.py --checkpoint=/runs/cpt/checkpoints/4000 --split=train --max_batches=50
  python tools/evaluate.py --checkpoint=/models/llama-3.2-1b-loom --data='/corpus/val/*.txt'

CHECKPOINT is a workdir (its latest checkpoint), its checkpoints/ directory or one checkpoints/STEP;
a Hugging Face import (tools/hf_import.py's output) is one too. Without --config, the checkpoint's own
config (its record's, else the workdir's config.json) says the tokenizer and the data sources; with
--config, that file's (its model fields must be the checkpoint's). Each source is reported, and all of
them pooled over tokens. Bits per byte (summed loss / ln 2 / the targets' UTF-8 bytes) compare models
with different tokenizers. --output=FILE.json keeps the numbers.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from training.cli import check_output_path, define_config_flag, parse_flags  # noqa: E402

_CONFIG = define_config_flag(None, "A .py config (default: the checkpoint's own); its model must be the checkpoint's.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A loom workdir, its checkpoints/ directory or checkpoints/STEP.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train"], "Which split of each source.")
_SOURCES = flags.DEFINE_string("sources", "", "Comma-separated source names of the config (default: all).")
_DATA = flags.DEFINE_string("data", "", "Comma-separated globs of text/.jsonl/.parquet files, instead of the sources.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Batches per source (0: the whole split).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Rows per batch (0: the config's train.global_batch_size).")
_OUTPUT = flags.DEFINE_string("output", "", "A .json file for the metrics.")
_QUANTIZE = flags.DEFINE_enum(
  "quantize",
  "none",
  ["none", "int8", "int4", "nf4"],
  "Post-training weight quantization of the block kernels before evaluating: int8 per output channel, "
  "int4 or nf4 per group of --quantization_block input rows (model/quantization.py).",
)
_QUANTIZATION_BLOCK = flags.DEFINE_integer("quantization_block", 64, "int4 / nf4: input rows sharing one scale.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  output = check_output_path(_OUTPUT.value, "--output", "file") if _OUTPUT.value else ""
  # Imported after parsing: loading JAX and TensorFlow takes seconds that a bad flag need not wait for.
  import jax

  from evaluation import heldout, loading

  try:
    info = loading.checkpoint_config(_CHECKPOINT.value, _CONFIG.value)
    heldout.select_sources(info, _SOURCES.value, _DATA.value)
    if _BATCH_SIZE.value:
      info.config.train.global_batch_size = _BATCH_SIZE.value
    datasets = heldout.heldout_datasets(info, info.config.train.global_batch_size)
    model = loading.load_model(info, datasets.tokenizer)
    model = loading.quantized(model, _QUANTIZE.value, _QUANTIZATION_BLOCK.value)
    results = heldout.evaluate_heldout(model, datasets, _SPLIT.value, _MAX_BATCHES.value)
    results["weight_bytes"] = sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))
  except ValueError as e:
    raise SystemExit(f"evaluate: {e}") from None
  quantized = f", weights {_QUANTIZE.value}" if _QUANTIZE.value != "none" else ""
  weights = f"{results['weight_bytes'] / 2**20:.2f} MiB of weights"
  print(f"{info.directory}/{info.step}, {_SPLIT.value} split{quantized} ({weights}):")
  rows = dict(results["sources"], **({"all": results["all"]} if len(results["sources"]) > 1 else {}))
  for name, m in rows.items():
    print(
      f"  {name}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  bits/byte {m['bits_per_byte']:.4f}  "
      f"accuracy {m['accuracy']:.4f}  ({m['tokens']:.0f} tokens, {m['bytes']:.0f} bytes)"
    )
  if output:
    with open(output, "w", encoding="utf-8") as f:
      json.dump({"checkpoint": f"{info.directory}/{info.step}", "split": _SPLIT.value, **results}, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=parse_flags)
