"""Train a loom model.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/shakespeare_char.py --workdir=/tmp/sc --config.train.num_steps=500

Running the same command again with the same workdir resumes from its latest checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402

from training.cli import config_error, define_config_flag, parse_flags  # noqa: E402
from training.run import train  # noqa: E402
from training.validation import ConfigError  # noqa: E402

_CONFIG = define_config_flag("configs/quickstart.py", "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, metrics and the tokenizer; "
  "on several hosts, a path every host sees (a shared filesystem).",
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() first: on a TPU pod "
  "slice or a SLURM/Open MPI cluster it finds the other processes itself.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "With --multihost where nothing finds the processes itself: host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  given = [flag.name for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if flag.value is not None]
  if given and not _MULTIHOST.value:  # Else the run would silently train as one process.
    raise SystemExit(f"flag error: --{', --'.join(given)} take effect only with --multihost")
  if _MULTIHOST.value:
    import jax

    try:
      jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
      )
    except (ValueError, RuntimeError) as e:  # Nothing found the other processes, or bad ids.
      raise SystemExit(
        f"flag error: --multihost: {e} (on a single machine, pass --coordinator_address="
        "HOST:PORT --num_processes=N --process_id=I with 0 <= I < N)"
      ) from None
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise config_error(e) from None


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parse_flags)
