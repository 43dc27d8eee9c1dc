"""What train.py and the tools under tools/ share: flag parsing that reports bad input in one line."""
from absl import flags


def parse_flags(argv):
  """absl's parsing, with a bad --config override reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"{argv[0]}: {e}\nPass --helpfull to see the flags.") from None
  except (AttributeError, KeyError) as e:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    raise SystemExit(f"config error: no field {str(e).strip(chr(34))} for the override among {overrides}; "
                     "configs/base.py lists every field") from None
  except (TypeError, ValueError) as e:
    raise SystemExit(f"config error: {e}") from None


def config_error(error: Exception) -> SystemExit:
  """The one line a user sees for a bad config field or bad input data."""
  return SystemExit(f"config error ({flags.FLAGS['config'].config_filename}): {error}")
