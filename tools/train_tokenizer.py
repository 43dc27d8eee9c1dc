"""Train a sentencepiece tokenizer on the sources of a config.

  python tools/train_tokenizer.py --config=configs/quickstart.py --output=/tmp/sp.model \
      --vocab_size=8000 --model_type=unigram --special_tokens='<|tool|>,<|code|>'

pad/bos/eos/unk and the chat markers are always in the vocabulary (data/special_tokens.py);
--special_tokens adds more single-token symbols. Use the result with --config.data.tokenizer_path.
"""

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from data import source_rows  # noqa: E402
from data.bad_data import BadData  # noqa: E402
from data.tokenizers import MODEL_TYPES, NoTextError, SentencePieceTokenizer, train_sentencepiece  # noqa: E402
from training.cli import check_output_path, config_error, define_config_flag, parse_flags  # noqa: E402
from training.validation import ConfigError, validate_data  # noqa: E402

_CONFIG = define_config_flag("configs/quickstart.py", "Config whose data.sources to read.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .model file.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "Pieces; default: the config's data.tokenizer_vocab_size.")
_MODEL_TYPE = flags.DEFINE_enum(
  "model_type", None, list(MODEL_TYPES), "Default: the config's data.tokenizer_model_type."
)
_SPECIAL_TOKENS = flags.DEFINE_list("special_tokens", [], "Extra symbols that must stay single tokens.")
_SOURCES = flags.DEFINE_list("sources", [], "Names of data.sources to read (default: all that are not prepared).")


def main(argv):
  del argv
  try:
    data = validate_data(_CONFIG.value).data
  except ConfigError as e:
    raise config_error(e) from None
  names = _SOURCES.value or [n for n, s in data.sources.items() if s.kind != "prepared"]
  unknown = [n for n in names if n not in data.sources]
  if unknown:
    raise config_error(
      ValueError(f"--sources: no data.sources named {unknown}; there are {', '.join(data.sources.keys())}")
    )
  if not names:
    raise config_error(
      ValueError("every data.sources entry is prepared (already tokenized); a tokenizer is trained on sources of text")
    )
  output = check_output_path(_OUTPUT.value, "--output", "file")
  bad_data = BadData("skip")
  texts = itertools.chain.from_iterable(
    source_rows.document_texts(name, data.sources[name], bad_data) for name in names
  )
  try:
    path = train_sentencepiece(
      texts,
      output,
      vocab_size=_VOCAB_SIZE.value or data.tokenizer_vocab_size,
      model_type=_MODEL_TYPE.value or data.tokenizer_model_type,
      extra_symbols=tuple(_SPECIAL_TOKENS.value),
    )
  except NoTextError:
    raise config_error(
      ValueError(
        f"data.sources {', '.join(names)}: no text to train a tokenizer on (every document is empty or "
        f"bad: {bad_data.summary()})"
      )
    ) from None
  except ValueError as e:
    raise config_error(e) from None
  tokenizer = SentencePieceTokenizer(path)
  print(
    f"wrote {path}: {tokenizer.vocab_size} pieces from data.sources {', '.join(names)}"
    + (f"; skipped bad records: {bad_data.summary()}" if bad_data.counts else "")
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main, flags_parser=parse_flags)
