"""What train.py and the tools under tools/ share: flag parsing that reports bad input in one line."""

import os
import re
import sys
import traceback

from absl import flags
from ml_collections import ConfigDict, config_flags

from data.files import writable_directory


def define_config_flag(default: str | None, help_text: str, **kwargs):
  """`--config` (an ml_collections config file with `--config.a.b=value` overrides).

  Without a --config argument the default file is read, overrides and all, while the flag is
  defined, so its errors are turned into one line here too.
  """
  try:
    return config_flags.DEFINE_config_file("config", default, help_text, **kwargs)
  except Exception as e:  # noqa: BLE001 -- whatever get_config() or an override raised.
    raise _one_line(e, sys.argv) from None


def skip_absent_tpu() -> None:
  """Keeps JAX from starting its TPU backend on a machine with no TPU chips and no NVIDIA GPU.

  requirements.txt installs libtpu everywhere (tools/plan.py compiles train steps for TPU slices with
  it), and JAX then tries the TPU backend first: on a CPU machine libtpu prints an INVALID_ARGUMENT
  block about TPU worker hostnames at every start before JAX falls back to the CPU. A platform the
  user chose (JAX_PLATFORMS, or jax_platforms set in code) is left as it is.
  """
  if os.environ.get("JAX_PLATFORMS"):
    return
  import jax

  try:
    from jax._src import hardware_utils  # What JAX itself asks; private, so its absence is tolerated.

    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    nvidia_gpu = hardware_utils.has_visible_nvidia_gpu()
  except (ImportError, AttributeError, OSError):
    return
  if not jax.config.jax_platforms and tpu_chips == 0 and not nvidia_gpu:
    jax.config.update("jax_platforms", "cpu")


def parse_flags(argv):
  """absl's parsing, with a bad config file or --config override reported in one line, not a traceback."""
  skip_absent_tpu()  # Before anything starts a JAX backend.
  path = _config_file(argv).split(":", 1)[0]  # "file.py:arg" passes arg to get_config().
  if "config" in flags.FLAGS and any(a.startswith("--config") for a in argv[1:]) and path and not os.path.isfile(path):
    raise SystemExit(f"config error: --config={path}: no such file")
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      config = flags.FLAGS.config  # A config file that cannot be read fails here, not mid-run.
      given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
      if (config is not None or given) and not isinstance(config, ConfigDict):
        raise SystemExit(
          f"config error: {_config_file(argv)}: get_config() returned a "
          f"{type(config).__name__}, not an ml_collections ConfigDict "
          "(start from configs/base.py's get_config())"
        )
    return remaining
  except Exception as e:  # noqa: BLE001 -- whatever parsing or the config file's code raised.
    raise _one_line(e, argv) from None


def _one_line(e: Exception, argv) -> SystemExit:
  config_file = _config_file(argv)
  if isinstance(e, SyntaxError):
    return SystemExit(f"config error: {e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}")
  if isinstance(e, OSError):  # ml_collections defers a missing file's error to the first use of the config.
    return SystemExit(f"config error: --config={config_file} cannot be read ({_last_line(str(e))})")
  message = str(e)
  if "Traceback" in message:  # An exception inside get_config(), wrapped with its traceback.
    return SystemExit(f"config error: {_raised_where(message, config_file)}: {_last_line(message)}")
  if isinstance(e, flags.Error):
    return SystemExit(f"{argv[0]}: {message}\nPass --helpfull to see the flags.")
  frames = [(frame.filename, str(frame.lineno)) for frame in traceback.extract_tb(e.__traceback__)]
  in_config_file = any(os.path.abspath(path) == os.path.abspath(config_file) for path, _ in frames)
  if isinstance(e, (AttributeError, KeyError)):
    while e.args and isinstance(e.args[0], Exception):  # ml_collections wraps its KeyError.
      e = e.args[0]
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if "get_config" in message:
      return SystemExit(f"config error: {config_file} defines no get_config()")
    field, _, suggestion = message.partition("\n")  # ml_collections may add a "Did you mean" line.
    suggestion = f" ({' '.join(suggestion.split())})" if suggestion.strip() else ""
    if in_config_file:  # A mistyped field in the config file's own code.
      return SystemExit(f"config error: {_innermost(frames, config_file)}: no field {field.strip()}{suggestion}")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    return SystemExit(
      f"config error: no field {field.strip()} for the override among {overrides}"
      f"{suggestion}; configs/base.py lists every field"
    )
  if in_config_file:
    return SystemExit(f"config error: {_innermost(frames, config_file)}: {type(e).__name__}: {message}")
  return SystemExit(f"config error: {message}")


def _config_file(argv) -> str:
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  default = flags.FLAGS["config"].default_as_str if "config" in flags.FLAGS else None
  return (default or "").strip("'\"") or "the config file"


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


def _raised_where(traceback_text: str, config_file: str) -> str:
  """FILE:LINE of the config file's innermost frame, else of the innermost one outside installed packages."""
  return _innermost(re.findall(r'File "([^"]+)", line (\d+)', traceback_text), config_file)


def _innermost(frames: list[tuple[str, str]], config_file: str) -> str:
  in_config = [(path, line) for path, line in frames if os.path.abspath(path) == os.path.abspath(config_file)]
  in_user_code = [(path, line) for path, line in frames if "site-packages" not in path]
  path, line = (in_config or in_user_code or [(config_file, "?")])[-1]
  return f"{path}:{line}"


def check_output_path(path: str, flag: str, kind: str) -> str:
  """The absolute path a tool may write `kind` ("file" or "directory") to, its directory created.

  Checked before any work, so a tool never reads and converts for minutes and then fails to write;
  a bad path is one line naming the flag.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path) if kind == "file" else os.path.exists(path) and not os.path.isdir(path):
    raise SystemExit(
      f"flag error: {flag}={path} is a {'directory' if kind == 'file' else 'file'}; a {kind} path is expected"
    )
  directory = path if kind == "directory" else os.path.dirname(path)
  try:
    writable_directory(directory)
  except OSError as e:
    raise SystemExit(f"flag error: {flag}={path}: cannot write to {directory} ({e})") from None
  return path


def config_error(error: Exception) -> SystemExit:
  """The one line a user sees for a bad config field or bad input data."""
  return SystemExit(f"config error ({flags.FLAGS['config'].config_filename}): {error}")
