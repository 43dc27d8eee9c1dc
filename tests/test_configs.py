"""Every shipped config validates and builds (shapes only); every bad config names its field."""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import model as model_lib
import sharding
from configs import tiny
from sharding.mesh import resolve_cpu_devices
from training import state as state_lib
from training.setup import build_setup
from training.validation import ConfigError, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.name not in ("base.py", "__init__.py"))
CHAR_VOCAB = 65  # tiny Shakespeare's characters: what a vocab_size=0 config gets here.
# Corpora the shipped configs download (tools/download.py), passed explicitly as a local copy so no
# test needs the download cache: ../shared beside the checkout, as on developer machines and in CI.
LOCAL_COPIES = {
  "shakespeare_char": {"shakespeare": str(REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")}
}

# Exact parameter counts (embeddings and positions included).
KNOWN_PARAMS = {
  "gpt2_124m": 124_475_904,  # nanoGPT's GPT-2 with vocab 50304 and biases: 123.69M + 0.79M positions
  "llama3_1b": 1_235_814_400,  # Llama 3.2 1B
  "llama3_8b": 8_030_261_248,  # Llama 3 8B
  "shakespeare_char": 804_096,  # 795,904 without positions: nanoGPT's "0.80M"
}


def _load(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for source, path in LOCAL_COPIES.get(name, {}).items():
    config.data.sources[source].paths = path
  return config


def _num_devices(config):
  """The CPU devices a config asks for (-1: as on this machine); else 8 where an axis is -1, or a fully
  fixed mesh's own count."""
  if config.cpu_devices:
    return resolve_cpu_devices(
      config.cpu_devices, config.mesh, config.train.global_batch_size, config.train.microbatches
    )
  sizes = dict(config.mesh)
  return 8 if -1 in sizes.values() else math.prod(sizes.values())


def test_configs_are_discovered():
  assert {"gpt2_124m", "llama3_1b", "llama3_8b", "shakespeare_char", "tiny", "quickstart"} <= set(CONFIG_NAMES)


# Configs that start from a run or files the user makes first (their docstrings give the commands): until
# then they stop at validation naming the field; tests/test_finetune_configs.py builds them with those made.
NEEDS_USER_FILES = {"distill_quickstart", "lora_chat", "prune_gradual", "qlora_chat"}


@pytest.mark.parametrize("name", [name for name in CONFIG_NAMES if name not in NEEDS_USER_FILES])
def test_config_validates_and_builds_abstractly(name):
  config = _load(name)
  vocab = config.model.vocab_size or CHAR_VOCAB
  config = validate(config, num_devices=_num_devices(config), tokenizer_vocab_size=vocab)
  m = config.model
  assert m.vocab_size == vocab
  assert m.head_dim > 0 and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads == 0

  _, abstract_params = state_lib.abstract_model(m)
  leaves = jax.tree.leaves(abstract_params)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  tree_size = sum(math.prod(leaf.shape) for leaf in leaves)
  assert tree_size == model_lib.num_params(m)
  if name in KNOWN_PARAMS:
    assert tree_size == KNOWN_PARAMS[name]

  sizes = sharding.resolve_mesh_shape(config.mesh, _num_devices(config))
  mesh = jax.sharding.AbstractMesh(tuple(sizes[axis] for axis in sharding.MESH_AXES), sharding.MESH_AXES)
  state = build_setup(config, mesh).abstract_state()
  param_leaves = jax.tree.leaves(state.params)
  assert sum(math.prod(leaf.shape) for leaf in param_leaves) == tree_size
  assert all(leaf.dtype == jax.numpy.float32 for leaf in param_leaves)
  assert state.step.shape == ()
  if config.optimizer.name == "adamw":  # two moments per parameter
    opt_size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.opt_state))
    assert opt_size >= 2 * tree_size


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_no_shipped_config_reads_a_path_outside_the_repository(name, tmp_path, monkeypatch):
  # A config runs from a fresh clone: what it reads is in the repository or in loom's download cache
  # (tools/download.py fills it), never a folder of one machine.
  from data import downloads

  monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path / "cache"))
  config = importlib.import_module(f"configs.{name}").get_config()
  paths = [p for source in config.data.sources.values() for p in source.paths.split(",") + [source.data_dir]]
  paths += [config.data.tokenizer_path, config.init.checkpoint, config.compilation_cache_dir]
  allowed = (str(REPO_ROOT) + os.sep, downloads.cache_dir() + os.sep)
  outside = [p for p in paths if p.strip() and not os.path.abspath(REPO_ROOT / p.strip()).startswith(allowed)]
  assert not outside, f"configs/{name}.py reads {outside}"


def test_shakespeare_char_matches_nanogpt():
  m = validate(_load("shakespeare_char"), num_devices=1, tokenizer_vocab_size=CHAR_VOCAB).model
  without_positions = model_lib.num_params(m) - m.max_seq_len * m.embed_dim
  assert without_positions == 795_904
  assert f"{without_positions / 1e6:.2f}M" == "0.80M"


def _tiny():
  """A valid config for 8 devices: every axis in use, 12 rows = 3 per data-parallel shard."""
  config = tiny.get_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.train.global_batch_size = 12
  return config


def _set_unknown_field(c):
  c.model.foo = 1


def _set_wrong_type(c):
  with c.ignore_type():
    c.model.num_layers = "4"


def _set_float_for_int(c):
  with c.ignore_type():
    c.train.num_steps = 1.5


def _set(section, **values):
  return lambda c: c[section].update(**values)


BAD_CONFIGS = {
  "unknown_field": (_set_unknown_field, 8, None, r"unknown config field 'model\.foo'"),
  "wrong_type": (_set_wrong_type, 8, None, r"'model\.num_layers'='4' must be a int"),
  "float_for_int": (_set_float_for_int, 8, None, r"'train\.num_steps'=1\.5 must be an integer"),
  "bad_choice": (_set("model", norm="batchnorm"), 8, None, r"'model\.norm'='batchnorm'; allowed: layernorm, rmsnorm"),
  "mesh_product": (_set("mesh", tensor=1), 8, None, r"2\*2\*1 = 4, but there are 8 devices"),
  "two_free_axes": (_set("mesh", data=-1, fsdp=-1, tensor=2), 8, None, r"only one axis may be -1"),
  "batch_vs_data_parallel": (
    _set("mesh", data=8, fsdp=1, tensor=1),
    8,
    None,
    r"global_batch_size=12 .*not divisible by the data-parallel size",
  ),
  "batch_vs_microbatches": (
    _set("train", microbatches=5),
    8,
    None,
    r"global_batch_size=12 is not divisible by train\.microbatches=5",
  ),
  "heads_vs_tensor": (
    _set("mesh", data=1, fsdp=1, tensor=8),
    8,
    None,
    r"model\.num_heads=4 is not divisible by mesh\.tensor=8",
  ),
  "mlp_vs_tensor": (
    lambda c: (c.mesh.update(data=1, fsdp=1, tensor=8), c.model.update(num_heads=8, mlp_dim=60)),
    8,
    None,
    r"model\.mlp_dim=60 is not divisible by mesh\.tensor=8",
  ),
  "seq_len_vs_max": (_set("data", seq_len=64), 8, None, r"data\.seq_len=64 exceeds model\.max_seq_len=32"),
  "tokenizer_vocab": (
    _set("model", vocab_size=256),
    8,
    300,
    r"model\.vocab_size=256 is smaller than the tokenizer's vocabulary \(300\)",
  ),
  "stop_after_end": (
    _set("train", stop_at_step=41),
    8,
    None,
    r"train\.stop_at_step=41 must be in \[0, train\.num_steps=40\]",
  ),
  "embed_vs_heads": (
    _set("model", num_heads=3),
    8,
    None,
    r"model\.embed_dim=32 is not divisible by model\.num_heads=3",
  ),
  "negative_kv_heads": (_set("model", num_kv_heads=-2), 8, None, r"'model\.num_kv_heads'=-2 must be positive"),
  "negative_norm_eps": (_set("model", norm_eps=-1.0), 8, None, r"'model\.norm_eps'=-1\.0 must be positive"),
  "zero_rope_theta": (_set("model", rope_theta=0.0), 8, None, r"'model\.rope_theta'=0\.0 must be positive"),
  "zero_batch": (_set("train", global_batch_size=0), 8, None, r"train\.global_batch_size=0 must be positive"),
  "adam_b2": (_set("optimizer", b2=1.5), 8, None, r"optimizer\.b2=1\.5 must be in \[0, 1\)"),
  "negative_temperature": (
    _set("train", sample_temperature=-1.0),
    8,
    None,
    r"train\.sample_temperature=-1\.0 must be >= 0 \(0 samples greedily\)",
  ),
  "negative_sample_length": (_set("train", sample_length=-5), 8, None, r"train\.sample_length=-5 must be >= 0"),
  "path_for_byte_tokenizer": (
    _set("data", tokenizer_path="x.model"),
    8,
    None,
    r"data\.tokenizer_path='x\.model' is set but data\.tokenizer='byte' reads no file",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_rejected(case):
  mutate, num_devices, tokenizer_vocab, pattern = BAD_CONFIGS[case]
  config = _tiny()
  # The unmodified config is fine: the error below comes from the one change.
  validate(config, num_devices, tokenizer_vocab_size=tokenizer_vocab)
  mutate(config)
  with pytest.raises(ConfigError, match=pattern):
    validate(config, num_devices, tokenizer_vocab_size=tokenizer_vocab)


def test_validate_does_not_modify_its_argument():
  config = _tiny()
  validated = validate(config, 8, tokenizer_vocab_size=256)
  assert config.model.vocab_size == 0 and config.model.head_dim == 0 and config.model.num_kv_heads == 0
  assert (validated.model.vocab_size, validated.model.head_dim, validated.model.num_kv_heads) == (256, 8, 4)


def _train_command(tmp_path, *overrides, config="configs/tiny.py"):
  config_flag = [f"--config={config}"] if config else []
  return [sys.executable, "train.py", *config_flag, f"--workdir={tmp_path / 'run'}", *overrides]


_TRAIN_ENV = dict(
  os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
)


def _run_train(tmp_path, *overrides, config="configs/tiny.py"):
  env = _TRAIN_ENV
  return subprocess.run(
    _train_command(tmp_path, *overrides, config=config),
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_train_py_reports_config_errors(tmp_path):
  bad_heads = _run_train(tmp_path, "--config.model.num_heads=3")
  assert bad_heads.returncode != 0
  lines = bad_heads.stderr.strip().splitlines()
  assert len(lines) == 1, bad_heads.stderr
  assert lines[0].startswith("config error (configs/tiny.py): model.embed_dim=32 is not divisible by model.num_heads=3")
  assert "Traceback" not in bad_heads.stderr
  assert not (tmp_path / "run").exists()  # stopped before anything was written

  # An unknown override is refused while parsing flags, before main() runs, also in one line.
  unknown = _run_train(tmp_path, "--config.model.nonexistent=1")
  assert unknown.returncode != 0
  lines = unknown.stderr.strip().splitlines()
  assert lines[-1].startswith("config error: no field 'nonexistent'"), unknown.stderr
  assert "Traceback" not in unknown.stderr
  assert not (tmp_path / "run").exists()

  # Multi-host flags without --multihost would otherwise train as one process: refused in one line.
  stray = _run_train(tmp_path, "--coordinator_address=127.0.0.1:1234", "--process_id=1")
  assert stray.returncode != 0
  assert stray.stderr.strip().splitlines() == [
    "flag error: --coordinator_address, --process_id take effect only with --multihost"
  ], stray.stderr
  assert not (tmp_path / "run").exists()


CONFIG_FILE_ERRORS = {  # A config file's body -> the one line train.py prints.
  "raises.py": (
    "from configs import tiny\ndef get_config():\n  c = tiny.get_config()\n  c.model.num_layers = 'two'\n  return c\n",
    r"config error: .*raises\.py:4: TypeError: Could not override field 'num_layers'",
  ),
  "syntax.py": ("def get_config(:\n  pass\n", r"config error: .*syntax\.py:1: SyntaxError: invalid syntax"),
  "no_get_config.py": ("x = 1\n", r"config error: .*no_get_config\.py defines no get_config\(\)"),
  "returns_dict.py": (
    "from configs import tiny\ndef get_config():\n  return tiny.get_config().to_dict()\n",
    r"config error: .*returns_dict\.py: get_config\(\) returned a dict, not an ml_collections",
  ),
}


def test_train_py_reports_config_file_errors_in_one_line(tmp_path):
  for name, (body, _) in CONFIG_FILE_ERRORS.items():
    (tmp_path / name).write_text(body)
  commands = {name: _train_command(tmp_path, config=tmp_path / name) for name in CONFIG_FILE_ERRORS}
  commands["missing.py"] = _train_command(tmp_path, config=tmp_path / "missing.py")
  # With no --config, the default file is read while the flag is defined: a bad override fails there.
  commands["default"] = _train_command(tmp_path, "--config.model.num_layer=3", config=None)
  processes = {
    name: subprocess.Popen(
      command, cwd=REPO_ROOT, env=_TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for name, command in commands.items()
  }
  outputs = {}
  for name, process in processes.items():
    out, err = process.communicate(timeout=120)
    outputs[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
  patterns = {name: pattern for name, (_, pattern) in CONFIG_FILE_ERRORS.items()}
  patterns["missing.py"] = r"config error: --config=.*missing\.py: no such file"
  patterns["default"] = (
    r"config error: no field 'num_layer' for the override among \['--config.model.num_layer=3'\] "
    r"\(Did you mean \"num_layers\" instead of \"num_layer\"\?\)"
  )
  for name, result in outputs.items():
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert re.match(patterns[name], result.stderr.strip()), (name, result.stderr)
  assert not (tmp_path / "run").exists()


def test_bad_data_input_is_a_config_error(tmp_path):
  from training.run import train

  config = tiny.get_config()
  config.mesh.update(data=-1)
  config.data.sources.main.update(kind="text", paths=str(tmp_path / "missing" / "*.txt"))
  with pytest.raises(ConfigError, match=r"^data.sources.main.paths: pattern .*missing.* matches no files"):
    train(config, str(tmp_path / "run"))
  # Bad records under data.bad_data="stop": one line naming the file and line, before any step.
  (tmp_path / "chat.jsonl").write_text(
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"messages": 3}\n'
  )
  config.data.sources.main.update(kind="chat", paths=str(tmp_path / "chat.jsonl"))
  config.data.bad_data = "stop"
  with pytest.raises(ConfigError, match=r"chat.jsonl:2: .*data.bad_data=\"stop\""):
    train(config, str(tmp_path / "run"))


def test_cpu_devices_splits_the_cpu_into_a_data_parallel_mesh(tmp_path):
  # A fresh process (started with 1 CPU device by XLA_FLAGS) trains on 2 when cpu_devices=2, for
  # 300 steps with nothing logged in between (so nothing but the loop's own bound on steps in
  # flight ever waits for the devices).
  run = _run_train(
    tmp_path,
    "--config.cpu_devices=2",
    "--config.train.num_steps=300",
    "--config.train.log_every=300",
    "--config.train.checkpoint_every=300",
    "--config.train.eval_every=0",
    "--config.train.num_samples=0",
  )
  assert run.returncode == 0, run.stderr
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in run.stdout, run.stdout
  assert "step 300/300" in run.stdout, run.stdout
  # In this process JAX has started (with conftest's 8 CPU devices): another count is one config
  # error, the count it has is accepted.
  from training.run import train

  started = len(jax.devices())
  config = tiny.get_config()
  config.cpu_devices = started + 1
  with pytest.raises(
    ConfigError,
    match=rf"^config field 'cpu_devices'={started + 1}: JAX's CPU backend "
    rf"already started in this process with {started} devices",
  ):
    train(config, str(tmp_path / "more"))
  config.cpu_devices = -2
  with pytest.raises(ConfigError, match=r"^config field 'cpu_devices'=-2: must be 0"):
    train(config, str(tmp_path / "negative"))
  sharding.use_cpu_devices(started)


def test_bad_paths_and_prompts_are_config_errors_before_training(tmp_path):
  from training.run import train

  (tmp_path / "corpus.txt").write_text("to be or not to be\n" * 200)
  config = tiny.get_config()
  config.mesh.update(data=-1)
  config.data.sources.main.update(kind="text", paths=str(tmp_path / "corpus.txt"))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ConfigError, match=r"--workdir=.*a_file cannot be used as a directory"):
    train(config, str(tmp_path / "a_file"))
  (tmp_path / "not_a_run" / "checkpoints" / "7").mkdir(parents=True)  # An empty step directory.
  config.init.checkpoint = str(tmp_path / "not_a_run")
  with pytest.raises(ConfigError, match=r"init.checkpoint: .*checkpoints holds no finished loom checkpoint"):
    train(config, str(tmp_path / "run"))
  config.init.checkpoint = str(tmp_path / "not_a_run" / "checkpoints" / "7")
  with pytest.raises(
    ConfigError,
    match=r"checkpoints/7 is not a complete loom checkpoint \(it needs params/, record/ and _CHECKPOINT_METADATA\)",
  ):
    train(config, str(tmp_path / "run"))
  config.init.checkpoint = ""
  config.model.attention = "cudnn"  # On these CPU devices: refused before any data is read.
  with pytest.raises(ConfigError, match=r"model.attention='cudnn' needs NVIDIA GPUs, not cpu"):
    train(config, str(tmp_path / "run"))
  config.model.attention = "auto"
  config.data.update(tokenizer="char")
  config.train.sample_prompt = "to be ☃"  # A character the corpus does not have: found now, not after training.
  with pytest.raises(
    ConfigError,
    match=r"train.sample_prompt='to be ☃': characters \['☃'\] are not in the "
    r"8-character vocabulary",
  ):
    train(config, str(tmp_path / "run"))
  config.train.sample_prompt = ""
  config.data.update(tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "corpus.txt"))
  with pytest.raises(ConfigError, match=r"data.tokenizer_path: .*corpus.txt is not a sentencepiece model"):
    train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
