"""TensorFlow, imported once, on first use, and kept off accelerators.

tf.data is only the input pipeline here; if TF saw the GPUs/TPUs it would grab
their memory and fight JAX for it, so every data module gets `tf` from here.
The import waits for the first attribute read (`tf.data`, `tf.Tensor`, ...): it
takes seconds, and a command that stops on a config error, or never builds an
input pipeline (evaluation, generation, planning), should not pay them.
"""

import importlib
import os
import threading


class _TensorFlowOnFirstUse:
  """Stands for the `tensorflow` module; imports and configures it at the first attribute read."""

  _lock = threading.Lock()
  _module = None

  def __getattr__(self, name: str):
    return getattr(self._load(), name)

  @classmethod
  def _load(cls):
    with cls._lock:
      if cls._module is None:
        # Must be set before the first `import tensorflow` to silence its C++ logging.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # and its oneDNN banner.
        module = importlib.import_module("tensorflow")
        module.config.set_visible_devices([], "GPU")
        try:
          module.config.set_visible_devices([], "TPU")
        except (ValueError, RuntimeError):  # No TPU device type registered: nothing to hide.
          pass
        cls._module = module
    return cls._module


tf = _TensorFlowOnFirstUse()

__all__ = ["tf"]
