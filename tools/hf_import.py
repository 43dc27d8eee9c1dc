"""Convert a Hugging Face causal LM directory (safetensors) into a loom checkpoint, config and tokenizer.

  python tools/hf_import.py --hf_dir=/models/Llama-3.2-1B --output=/models/llama-3.2-1b-loom
  python train.py --config=/models/llama-3.2-1b-loom/config.py --workdir=/runs/finetune

Llama, Mistral, Qwen2 and GPT-2 models are supported (model/huggingface.py
says what exactly). OUTPUT, a new or empty directory outside HF_DIR, gets
checkpoints/0 (parameters only), config.py (a loom config that starts a run
from them) and the tokenizer files; they are written beside it and moved into
place at the end, so a failed import leaves no OUTPUT. Weights are read from
safetensors only: a directory with only pytorch_model.bin is refused.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from tools.huggingface_io import import_hf  # noqa: E402
from training.cli import parse_flags  # noqa: E402

_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory (config.json, *.safetensors).")
_OUTPUT = flags.DEFINE_string(
  "output", None, "A new or empty directory for the loom checkpoint, config.py and tokenizer."
)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every step of a save at INFO.
  try:
    config, params = import_hf(_HF_DIR.value, _OUTPUT.value)
  except ValueError as e:
    raise SystemExit(f"hf_import: {e}") from None
  output = os.path.abspath(_OUTPUT.value)
  m = config.model
  count = sum(leaf.size for leaf in _leaves(params))
  print(
    f"{os.path.join(output, 'checkpoints', '0')}: {count / 1e6:.2f}M parameters, {m.num_layers} layers, "
    f"embed {m.embed_dim}, vocab {m.vocab_size}"
  )
  print(f"{os.path.join(output, 'config.py')}: the loom config (train.py --config=...)")
  if config.data.tokenizer_path:
    print(f"{config.data.tokenizer_path}: the tokenizer (data.tokenizer={config.data.tokenizer})")
  else:
    print(f"no tokenizer in {_HF_DIR.value}: set data.tokenizer_path in the config")


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else [value])


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "output"])
  app.run(main, flags_parser=parse_flags)
