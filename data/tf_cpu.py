"""TensorFlow, imported once and kept off accelerators.

tf.data is only the input pipeline here; if TF saw the GPUs/TPUs it would grab
their memory and fight JAX for it, so every data module gets `tf` from here.
"""

import os

# Must be set before the first `import tensorflow` to silence its C++ logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # and its oneDNN banner.

import tensorflow as tf  # pylint: disable=g-import-not-at-top

tf.config.set_visible_devices([], "GPU")
try:
  tf.config.set_visible_devices([], "TPU")
except (ValueError, RuntimeError):  # No TPU device type registered: nothing to hide.
  pass

__all__ = ["tf"]
