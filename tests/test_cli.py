"""What train.py and the tools do before JAX starts: choose the platforms a machine has."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _platform_probe(env_update: dict[str, str]) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(env_update)
  code = (
    "from training.cli import skip_absent_tpu; skip_absent_tpu(); import jax; "
    "print(jax.config.jax_platforms, jax.default_backend())"
  )
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_a_cpu_machine_starts_without_libtpu_noise():
  # This machine has no TPU chips and no NVIDIA GPU, and requirements.txt installs libtpu.
  result = _platform_probe({})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu", "cpu"]
  assert "TPU_WORKER_HOSTNAMES" not in result.stderr and "libtpu" not in result.stderr, result.stderr


def test_platforms_the_user_chose_are_kept():
  # Asked for by name, the TPU is tried (and, with no chips here, fails loudly, as JAX does).
  result = _platform_probe({"JAX_PLATFORMS": "tpu,cpu"})
  assert "Unable to initialize backend 'tpu'" in result.stderr
