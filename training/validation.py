"""Checks a config against loom's schema and the devices at hand before anything compiles.

Each problem is one ValueError naming the config field, what it was and what is allowed.
"""

import copy
import re

from ml_collections import ConfigDict

import model
from configs import base
from data import bad_data, chat, packing, tokenizers
from data.sources import check_source
from model.quantization import KINDS as QUANTIZATION_KINDS
from sharding import resolve_mesh_shape
from training import guards, optimizer, pruning, selection
from training.checkpointing import locate
from training.reports import METRIC_MODES

# Each field's allowed values, as defined beside the code that implements them: a new choice
# there is allowed here without a second list to keep in step.
CHOICES = {
  "model.norm": tuple(model.NORMS),
  "model.position": tuple(model.POSITIONS),
  "model.mlp": tuple(model.MLPS),
  "model.dtype": tuple(model.COMPUTE_DTYPES),
  "model.remat": tuple(model.REMAT_POLICIES),
  "model.attention": tuple(model.ATTENTION_IMPLEMENTATIONS),
  "data.tokenizer": tokenizers.TOKENIZER_NAMES,
  "data.tokenizer_model_type": tokenizers.MODEL_TYPES,
  "data.windows": packing.WINDOWS,
  "data.bad_data": bad_data.POLICIES,
  "data.chat_template": chat.CHAT_TEMPLATES,
  "data.chat_loss_on": chat.LOSS_ON,
  "optimizer.name": optimizer.OPTIMIZERS,
  "optimizer.schedule": optimizer.SCHEDULES,
  "train.early_stopping_mode": METRIC_MODES,
  "train.on_nonfinite": guards.ON_NONFINITE,
}


class ConfigError(ValueError):
  """A config field has a value loom cannot run with."""


def _check_schema(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> None:
  for key, value in config.items():
    name = f"{prefix}{key}"
    if name == "data.sources":  # User-named entries, each checked against base.SOURCE_DEFAULTS.
      if not isinstance(value, ConfigDict) or not value:
        raise ConfigError(
          "config field 'data.sources' must be a section of named sources, "
          "e.g. {'main': base.source(kind='text', paths='corpus/*.txt')}"
        )
      for source_name, source in value.items():
        if not isinstance(source, ConfigDict):
          raise ConfigError(
            f"config field 'data.sources.{source_name}' must be a section (made with configs.base.source(...))"
          )
        _check_schema(source, ConfigDict(base.SOURCE_DEFAULTS), f"data.sources.{source_name}.")
      continue
    if key not in schema:
      known = ", ".join(sorted(schema.keys()))
      raise ConfigError(f"unknown config field '{name}'; fields here are: {known}")
    expected = schema[key]
    if isinstance(expected, ConfigDict):
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"config field '{name}' must be a section, got {value!r}")
      _check_schema(value, expected, name + ".")
    elif (
      isinstance(expected, bool) != isinstance(value, bool)
      or (isinstance(expected, (int, float)) and not isinstance(value, (int, float)))
      or (isinstance(expected, str) and not isinstance(value, str))
    ):
      raise ConfigError(f"config field '{name}'={value!r} must be a {type(expected).__name__}")
    elif isinstance(expected, int) and not isinstance(expected, bool) and isinstance(value, float):
      raise ConfigError(f"config field '{name}'={value!r} must be an integer")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(config: ConfigDict, num_devices: int, tokenizer_vocab_size: int | None = None) -> ConfigDict:
  """Returns a copy with derived fields filled in (head_dim, num_kv_heads, vocab_size).

  `tokenizer_vocab_size` fills in model.vocab_size=0 and is checked against a
  fixed model.vocab_size; without it, a vocab_size of 0 stays 0.
  """
  _check_schema(config, base.get_config())
  config = copy.deepcopy(config)
  m, d, o, t = config.model, config.data, config.optimizer, config.train

  for field, allowed in CHOICES.items():
    section, key = field.split(".")
    value = config[section][key]
    _require(value in allowed, f"config field '{field}'={value!r}; allowed: {', '.join(allowed)}")

  for field in ("num_layers", "embed_dim", "num_heads", "mlp_dim", "max_seq_len"):
    _require(m[field] > 0, f"config field 'model.{field}'={m[field]} must be positive")
  for field in ("num_kv_heads", "head_dim", "vocab_size"):
    _require(m[field] >= 0, f"config field 'model.{field}'={m[field]} must be positive (or 0 for the default)")
  for field in ("norm_eps", "rope_theta", "init_std"):
    _require(m[field] > 0, f"config field 'model.{field}'={m[field]} must be positive")
  if m.num_kv_heads == 0:
    m.num_kv_heads = m.num_heads
  if m.head_dim == 0:
    _require(
      m.embed_dim % m.num_heads == 0,
      f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
      "set model.head_dim explicitly or change one of them",
    )
    m.head_dim = m.embed_dim // m.num_heads
  _require(
    m.num_heads % m.num_kv_heads == 0,
    f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}",
  )
  _require(m.position != "rope" or m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for rope positions")
  _require(m.attention_block > 0, f"config field 'model.attention_block'={m.attention_block} must be positive")
  _require(m.loss_chunk >= 0, f"config field 'model.loss_chunk'={m.loss_chunk} must be >= 0 (0: the whole row)")
  _require(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
  if tokenizer_vocab_size is not None:
    if m.vocab_size == 0:
      m.vocab_size = tokenizer_vocab_size
    _require(
      tokenizer_vocab_size <= m.vocab_size,
      f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({tokenizer_vocab_size}); raise it or set it to 0 to use the tokenizer's size",
    )

  _require(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")
  _require(
    not d.tokenizer_path or d.tokenizer in ("sentencepiece", "huggingface"),
    f"data.tokenizer_path={d.tokenizer_path!r} is set but data.tokenizer={d.tokenizer!r} reads no "
    "file; it is for data.tokenizer=sentencepiece (a .model) or huggingface (a tokenizer.json)",
  )
  _require(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  _require(0.0 < d.validation_fraction < 1.0, f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")
  _fill_and_check_sources(d)
  _check_augment(d)

  mesh = _mesh_sizes(config, num_devices)
  batch_shards = mesh["data"] * mesh["fsdp"]
  _require(t.global_batch_size > 0, f"train.global_batch_size={t.global_batch_size} must be positive")
  _require(t.microbatches >= 1, f"train.microbatches={t.microbatches} must be at least 1")
  _require(
    t.global_batch_size % t.microbatches == 0,
    f"train.global_batch_size={t.global_batch_size} is not divisible by train.microbatches={t.microbatches}",
  )
  micro = t.global_batch_size // t.microbatches
  _require(
    micro % batch_shards == 0,
    f"train.global_batch_size={t.global_batch_size} (per microbatch {micro}) is not divisible "
    f"by the data-parallel size mesh.data*mesh.fsdp = {mesh['data']}*{mesh['fsdp']} = {batch_shards}",
  )
  _check_selection(config, batch_shards)
  tensor = mesh["tensor"]
  _require(m.num_heads % tensor == 0, f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}")
  _require(m.mlp_dim % tensor == 0, f"model.mlp_dim={m.mlp_dim} is not divisible by mesh.tensor={tensor}")
  _require(
    m.embed_dim % mesh["fsdp"] == 0, f"model.embed_dim={m.embed_dim} is not divisible by mesh.fsdp={mesh['fsdp']}"
  )

  _require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be positive")
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
  _require(0.0 <= o.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  _require(0.0 < o.decay_fraction <= 1.0, f"optimizer.decay_fraction={o.decay_fraction} must be in (0, 1]")
  _require(o.grad_clip_norm >= 0, f"optimizer.grad_clip_norm={o.grad_clip_norm} must be >= 0")
  for field in ("b1", "b2", "momentum"):
    _require(0.0 <= o[field] < 1.0, f"optimizer.{field}={o[field]} must be in [0, 1)")
  for field in ("eps", "weight_decay"):
    _require(o[field] >= 0, f"optimizer.{field}={o[field]} must be >= 0")

  _require(t.num_steps > 0, f"train.num_steps={t.num_steps} must be positive")
  _require(
    0 <= t.stop_at_step <= t.num_steps,
    f"train.stop_at_step={t.stop_at_step} must be in [0, train.num_steps={t.num_steps}]",
  )
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _require(t[field] > 0, f"train.{field}={t[field]} must be positive")
  _require(t.keep_checkpoints_every >= 0, f"train.keep_checkpoints_every={t.keep_checkpoints_every} must be >= 0")
  i = config.init
  _require(i.step >= -1, f"init.step={i.step} must be a step number or -1 (the latest)")
  for field in ("load_optimizer", "keep_step"):
    _require(not i[field] or bool(i.checkpoint), f"init.{field}=True needs init.checkpoint (the run to take them from)")
  if i.checkpoint:  # A wrong path fails here, not after the data is read and tokenized.
    try:
      locate(i.checkpoint, i.step, field="init.checkpoint")
    except ValueError as e:
      raise ConfigError(str(e)) from None
  for field in ("eval_every", "eval_batches", "num_samples", "sample_length", "sample_temperature"):
    _require(
      t[field] >= 0,
      f"train.{field}={t[field]} must be >= 0" + (" (0 samples greedily)" if field == "sample_temperature" else ""),
    )
  _check_early_stopping(t, tuple(d.sources.keys()))
  _check_guards(t, config.distillation)
  profile_step_range(t)
  _check_distillation(config.distillation)
  _check_lora(config)
  _check_pruning(config)
  _check_quantization(config)
  return config


def _check_selection(config: ConfigDict, batch_shards: int) -> None:
  """config.selection (training/selection.py); a config.json from before it existed has none: off."""
  s = config.get("selection")
  if s is None:
    return
  try:
    selection.check_config(s.fraction, config.train.global_batch_size, config.train.microbatches, batch_shards)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  reference = s.get("reference", "")
  _require(isinstance(reference, str), f"selection.reference={reference!r} must be a checkpoint path or ''")
  _require(
    not reference or s.fraction < 1.0,
    f"selection.reference={reference!r} is set but selection.fraction=1.0 selects nothing: set a fraction "
    "below 1 for the reference to score rows, or selection.reference=''",
  )


def _check_quantization(config: ConfigDict) -> None:
  q = config.quantization
  allowed = ("none", *QUANTIZATION_KINDS)
  _require(q.qat in allowed, f"quantization.qat={q.qat!r}; allowed: {', '.join(allowed)}")
  _require(q.block > 0, f"quantization.block={q.block} must be positive")
  if q.qat in ("int4", "nf4"):
    _check_quantization_block(config.model, q.block, "quantization.block")


def _check_quantization_block(m: ConfigDict, block: int, field: str) -> None:
  """Groups of `block` input rows must tile every block kernel's input (model/quantization.py)."""
  inputs = {
    "model.embed_dim": m.embed_dim,
    "model.mlp_dim": m.mlp_dim,
    "model.num_heads*head_dim": m.num_heads * m.head_dim,
  }
  for name, size in inputs.items():
    _require(
      size % block == 0,
      f"{field}={block} does not divide {name}={size}, an input size of the block kernels; use a divisor of it",
    )


# lora.base_dtype's and lora.base_quantization's values (training/state.py builds each).
LORA_BASE_DTYPES = ("float32", "bfloat16")
LORA_BASE_QUANTIZATIONS = ("none", "int8", "nf4")


def _check_lora(config: ConfigDict) -> None:
  lora = config.lora
  train_full = lora.get("train_full", "")  # A record's config from before the field reads as "".
  # lora.train_full: the regex here; what it selects when the model is built (training/state.py full_paths).
  _require(
    not train_full or lora.rank > 0,
    f"lora.train_full={train_full!r} needs lora.rank > 0: without LoRA every parameter trains already",
  )
  if train_full:
    try:
      re.compile(train_full)
    except re.error as e:
      raise ConfigError(f"lora.train_full={train_full!r} is not a regular expression ({e})") from None
  if lora.rank == 0:
    return
  _require(lora.rank > 0, f"lora.rank={lora.rank} must be positive (or 0: no LoRA)")
  _require(lora.alpha > 0, f"lora.alpha={lora.alpha} must be positive")
  _require(0.0 <= lora.dropout < 1.0, f"lora.dropout={lora.dropout} must be in [0, 1)")
  _require(
    lora.base_dtype in LORA_BASE_DTYPES, f"lora.base_dtype={lora.base_dtype!r}; allowed: {', '.join(LORA_BASE_DTYPES)}"
  )
  _require(
    lora.base_quantization in LORA_BASE_QUANTIZATIONS,
    f"lora.base_quantization={lora.base_quantization!r}; allowed: {', '.join(LORA_BASE_QUANTIZATIONS)}",
  )
  _require(lora.quantization_block > 0, f"lora.quantization_block={lora.quantization_block} must be positive")
  if lora.base_quantization == "nf4":
    _check_quantization_block(config.model, lora.quantization_block, "lora.quantization_block")
  _require(
    not (config.init.freeze or config.init.freeze_layers),
    "init.freeze / init.freeze_layers cannot be combined with lora.rank > 0 (LoRA already freezes the whole base)",
  )
  _require(
    not config.init.load_optimizer,
    "init.load_optimizer=True cannot be combined with lora.rank > 0: the base's optimizer state does not "
    "fit the adapters",
  )


def _check_pruning(config: ConfigDict) -> None:
  """config.pruning's fields (training/pruning.py checks them, the targets against this model's kernels)."""
  try:
    pruning.check_config(config.pruning, config.model, config.train.num_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(
    config.pruning.method == "none" or config.lora.rank == 0,
    f"config.pruning.method={config.pruning.method!r}: prunes the kernels, which LoRA (lora.rank="
    f"{config.lora.rank}) freezes; allowed: none with lora.rank > 0",
  )


def _check_distillation(distillation: ConfigDict) -> None:
  """The teacher's path is found here (a wrong one fails before the data is read); its record, model
  and vocabulary are checked when training.distillation.load_teacher loads it."""
  _require(
    distillation.step >= -1,
    f"config.distillation.step={distillation.step}: not a step; allowed: a step number or -1 (the latest)",
  )
  _require(
    distillation.temperature > 0,
    f"config.distillation.temperature={distillation.temperature}: not positive; allowed: > 0 (1: the plain softmax)",
  )
  _require(
    0.0 <= distillation.alpha <= 1.0,
    f"config.distillation.alpha={distillation.alpha}: outside [0, 1]; allowed: 0 (cross-entropy only) to 1 "
    "(distillation only)",
  )
  if distillation.teacher:
    try:
      locate(distillation.teacher, distillation.step, field=f"config.distillation.teacher={distillation.teacher!r}")
    except ValueError as e:
      raise ConfigError(str(e)) from None


def _check_early_stopping(t: ConfigDict, sources: tuple[str, ...]) -> None:
  """The metric's name as far as it is known before an evaluation: whether the evaluation logs it is
  checked at the first one."""
  metric = t.early_stopping_metric
  _require(t.early_stopping_patience >= 0, f"train.early_stopping_patience={t.early_stopping_patience} must be >= 0")
  _require(t.early_stopping_min_delta >= 0, f"train.early_stopping_min_delta={t.early_stopping_min_delta} must be >= 0")
  if not metric:
    return
  _require(
    metric.startswith("eval_"),
    f"train.early_stopping_metric={metric!r} is not an evaluated metric; evaluation logs eval_loss, "
    "eval_perplexity (and, per source of several, eval_loss/NAME ...)",
  )
  _, _, source = metric.partition("/")
  _require(
    not source or (source in sources and len(sources) > 1),
    f"train.early_stopping_metric={metric!r}: per-source metrics are logged for each of several "
    f"data.sources ({', '.join(sources)})",
  )
  _require(
    t.eval_every > 0,
    f"train.early_stopping_metric={metric!r} needs train.eval_every > 0 (with 0 the run is evaluated only at its end)",
  )


def _check_guards(t: ConfigDict, distillation: ConfigDict) -> None:
  """train.z_loss, label_smoothing and the loss-spike guard (training/guards.py)."""
  _require(t.z_loss >= 0, f"config.train.z_loss={t.z_loss}: must be >= 0 (0: off)")
  _require(0 <= t.label_smoothing < 1, f"config.train.label_smoothing={t.label_smoothing}: must be in [0, 1) (0: off)")
  _require(
    not (t.z_loss or t.label_smoothing) or not distillation.teacher,
    f"config.train.z_loss={t.z_loss}, train.label_smoothing={t.label_smoothing}: not applied to "
    "distillation's loss (distillation.teacher is set); allowed: 0 with distillation",
  )
  _require(
    t.spike_factor == 0 or t.spike_factor > 1,
    f"config.train.spike_factor={t.spike_factor}: a loss spike is above this many times the running "
    "median; allowed: a number > 1, or 0 (off)",
  )
  _require(t.spike_window >= 1, f"config.train.spike_window={t.spike_window}: must be at least 1")


def profile_step_range(t: ConfigDict) -> tuple[int, int] | None:
  """train.profile_steps "N-M" as (N, M), the first and last step traced; None when it is "" (off)."""
  text = t.get("profile_steps", "")
  if not text:
    return None
  first, dash, last = text.strip().partition("-")
  allowed = f"allowed: 'N-M' with 1 <= N <= M <= train.num_steps={t.num_steps} (e.g. '10-15'), or '' for no trace"
  _require(
    bool(dash) and first.strip().isdigit() and last.strip().isdigit(),
    f"config.train.profile_steps={text!r}: not a range of steps; {allowed}",
  )
  first_step, last_step = int(first), int(last)
  _require(
    1 <= first_step <= last_step <= t.num_steps,
    f"config.train.profile_steps={text!r}: steps {first_step} to {last_step} are not within the run's; {allowed}",
  )
  return first_step, last_step


def validate_data(config: ConfigDict) -> ConfigDict:
  """Checks only the data section (for tools that read data without training): a filled-in copy."""
  _check_schema(config, base.get_config())
  config = copy.deepcopy(config)
  for field, allowed in CHOICES.items():
    section, key = field.split(".")
    if section == "data":
      _require(
        config.data[key] in allowed, f"config field '{field}'={config.data[key]!r}; allowed: {', '.join(allowed)}"
      )
  _fill_and_check_sources(config.data)
  _check_augment(config.data)
  return config


def _check_augment(d: ConfigDict) -> None:
  """data.augment (data/augment.py): probabilities, and the ids and lengths they need."""
  a = d.get("augment")
  if a is None:  # An older run's config.json: no augmentation.
    return
  for field in ("token_mask", "token_replace", "span_delete", "sentence_shuffle"):
    _require(
      0.0 <= a[field] <= 1.0,
      f"config.data.augment.{field}={a[field]}: not a probability; allowed: a number in [0, 1] (0: off)",
    )
  _require(
    a.token_mask + a.token_replace <= 1.0,
    f"config.data.augment.token_mask={a.token_mask} + data.augment.token_replace={a.token_replace} > 1: "
    "one draw per token decides between them; allowed: a sum in [0, 1]",
  )
  _require(
    a.mask_id >= -1,
    f"config.data.augment.mask_id={a.mask_id}: not a token id; allowed: -1 (the tokenizer's <unk>) or an id >= 0",
  )
  _require(
    a.span_delete == 0 or 1 <= a.span_delete_max < d.seq_len,
    f"config.data.augment.span_delete_max={a.span_delete_max}: the longest deleted span must leave some of a row; "
    f"allowed: 1 to data.seq_len - 1 = {d.seq_len - 1}",
  )
  _require(
    a.sentence_shuffle == 0 or bool(a.sentence_ends),
    f"config.data.augment.sentence_ends={a.sentence_ends!r}: no characters end a sentence; allowed: e.g. '.!?'",
  )


def _fill_and_check_sources(data: ConfigDict) -> None:
  for name in list(data.sources.keys()):
    data.sources[name] = ConfigDict({**base.SOURCE_DEFAULTS, **data.sources[name].to_dict()})
    try:
      check_source(name, data.sources[name])
    except ValueError as e:
      raise ConfigError(str(e)) from None
  _require(
    any(source.weight > 0 for source in data.sources.values()),
    "data.sources: every weight is 0; at least one source needs a positive weight",
  )


def _mesh_sizes(config: ConfigDict, num_devices: int) -> dict[str, int]:
  try:
    return resolve_mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
