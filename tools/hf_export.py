"""Write a loom checkpoint as a Hugging Face directory that transformers loads.

  python tools/hf_export.py --workdir=/runs/llama --output=/models/my-llama --model_type=llama
  python tools/hf_export.py --checkpoint=/runs/gpt/checkpoints/4000 --output=/models/my-gpt --model_type=gpt2

The model config comes from the checkpoint's own record (what the run trained
with); --config=FILE.py (e.g. the config the run was started with) replaces its
data fields, while its model fields must match the checkpoint's (a difference
is refused, naming the fields). OUTPUT, a new or empty directory, gets
config.json, model.safetensors, generation_config.json and the run's tokenizer
(tokenizer.model or tokenizer.json) with a tokenizer_config.json holding the
ChatML chat template; they are written beside it and moved into place at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from model.huggingface import MODEL_TYPES  # noqa: E402
from tools.huggingface_io import EXPORT_DTYPES, export_hf  # noqa: E402
from training.cli import define_config_flag, parse_flags  # noqa: E402

_CONFIG = define_config_flag(
  None,
  "The run's .py config file (default: the config saved in the "
  "checkpoint's record); its model fields must match the checkpoint's.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "A loom workdir: its latest checkpoint is exported.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "One checkpoint, WORKDIR/checkpoints/STEP.")
_OUTPUT = flags.DEFINE_string("output", None, "A new or empty directory for the Hugging Face files.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, list(MODEL_TYPES), "The Hugging Face architecture.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "dtype of the written weights.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every step of a save at INFO.
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise SystemExit("hf_export: pass exactly one of --workdir and --checkpoint")
  try:
    written = export_hf(
      _WORKDIR.value or _CHECKPOINT.value, _CONFIG.value, _OUTPUT.value, _MODEL_TYPE.value, dtype=_DTYPE.value
    )
  except ValueError as e:
    raise SystemExit(f"hf_export: {e}") from None
  for path in written:
    print(path)
  if not any(os.path.basename(path) == "tokenizer_config.json" for path in written):
    print("no tokenizer written: the run's tokenizer has no Hugging Face form or was not found")


if __name__ == "__main__":
  flags.mark_flags_as_required(["output", "model_type"])
  app.run(main, flags_parser=parse_flags)
