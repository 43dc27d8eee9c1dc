"""Optax chains from the `optimizer` config: optimizer, schedule, clipping, decay mask, frozen parameters,
pruning (training/pruning.py)."""

import re

import jax
import jax.numpy as jnp
import optax

from training import pruning as pruning_lib

# optimizer.schedule's values: learning_rate_schedule computes each (validation reads this list).
SCHEDULES = ("warmup_cosine", "warmup_linear", "constant", "wsd", "rsqrt")


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
  """Peak `cfg.learning_rate` after a linear warmup, then the named decay.

  Warmup reaches (step + 1) / (warmup + 1) of the peak, as nanoGPT does, so
  the first step already learns.
  """
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  final = peak * cfg.min_lr_ratio

  def warmup_factor(step):
    return jnp.minimum(1.0, (step + 1.0) / (warmup + 1.0))

  def after_warmup(step):  # fraction of the post-warmup steps done, in [0, 1]
    return jnp.clip((step - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if cfg.schedule == "constant":
      decayed = jnp.asarray(peak, jnp.float32)
    elif cfg.schedule == "warmup_cosine":
      decayed = final + 0.5 * (peak - final) * (1.0 + jnp.cos(jnp.pi * after_warmup(step)))
    elif cfg.schedule == "warmup_linear":
      decayed = peak + (final - peak) * after_warmup(step)
    elif cfg.schedule == "wsd":
      # Warmup, stable at the peak, then a linear decay over the last decay_fraction of steps.
      decay_start = num_steps - int(round(cfg.decay_fraction * num_steps))
      into_decay = jnp.clip((step - decay_start) / max(num_steps - decay_start, 1), 0.0, 1.0)
      decayed = peak + (final - peak) * into_decay
    elif cfg.schedule == "rsqrt":
      decayed = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
    else:
      raise ValueError(f"optimizer.schedule={cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return jnp.where(step < warmup, peak * warmup_factor(step), decayed)

  return schedule


# Parameter names (model/) that are never decayed: norm scales and every bias.
NO_DECAY = frozenset({"scale", "bias", "bq", "bk", "bv", "bo", "b_up", "b_down"})
EMBEDDINGS = frozenset({"embed", "pos_embed"})


def _names(path) -> list[str]:
  names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
  return [n for n in names if n and n != "value"]


def parameter_paths(params) -> list[str]:
  """'blocks/attn/wq'-style paths of every parameter: what init.freeze matches."""
  return ["/".join(_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def parse_layers(spec: str, num_layers: int) -> list[int]:
  """'0-5,7' -> [0, 1, 2, 3, 4, 5, 7]; a ValueError naming init.freeze_layers otherwise."""
  layers = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not match:
      raise ValueError(f"init.freeze_layers={spec!r}: {part!r} is not an index or a range like 0-5")
    first, last = int(match[1]), int(match[2] or match[1])
    if not first <= last < num_layers:
      raise ValueError(f"init.freeze_layers={spec!r}: {part!r} is outside the model's layers 0-{num_layers - 1}")
    layers.update(range(first, last + 1))
  return sorted(layers)


def trainable_mask(params, freeze: str, freeze_layers: str, num_layers: int):
  """1 where a parameter (or a layer of a stacked one) trains, 0 where it is frozen; None: all train.

  `freeze` holds comma-separated regexes matched against whole path prefixes
  ("embed" freezes embed, not pos_embed; "blocks/attn" every attention weight).
  """
  patterns = [p.strip() for p in freeze.split(",") if p.strip()]
  layers = parse_layers(freeze_layers, num_layers)
  if not patterns and not layers:
    return None
  paths = parameter_paths(params)
  for pattern in patterns:
    try:
      matcher = re.compile(f"(?:{pattern})(?:/.*)?")
    except re.error as e:
      raise ValueError(f"init.freeze: {pattern!r} is not a regular expression ({e})") from None
    if not any(matcher.fullmatch(path) for path in paths):
      raise ValueError(f"init.freeze: {pattern!r} matches no parameter; paths are: {', '.join(paths)}")
  matchers = [re.compile(f"(?:{p})(?:/.*)?") for p in patterns]

  def mask(path, leaf):
    name = "/".join(_names(path))
    if any(m.fullmatch(name) for m in matchers):
      return jnp.zeros((), jnp.float32)
    if layers and name.startswith("blocks/"):  # Stacked along a leading layers axis.
      per_layer = jnp.ones((leaf.shape[0],), jnp.float32).at[jnp.array(layers)].set(0.0)
      return per_layer.reshape((-1,) + (1,) * (len(leaf.shape) - 1))
    return jnp.ones((), jnp.float32)

  return jax.tree_util.tree_map_with_path(mask, params)


def freeze(mask) -> optax.GradientTransformation:
  """Zeroes the final updates of frozen parameters, so neither gradients nor weight decay move them."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the weights that are decayed: matrices, embeddings only if asked.

  Decided by name, not rank: stacked layers give a norm scale two dimensions.
  """

  def decays(path, _):
    name = _names(path)[-1]
    if name in NO_DECAY:
      return False
    if name in EMBEDDINGS:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


# optimizer.name's values: build_optimizer builds each (validation reads this list).
OPTIMIZERS = ("adamw", "sgd", "adafactor")


def build_optimizer(
  cfg, num_steps: int, params, frozen=None, pruning=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`frozen`: a trainable_mask (or None); frozen parameters get zero updates. `pruning`: config.pruning
  (or None); with its method on, the pruning masks come last, so every update before them is masked."""
  schedule = learning_rate_schedule(cfg, num_steps)
  mask = weight_decay_mask(params, cfg.decay_embeddings)
  if cfg.name == "adamw":
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "sgd":
    core = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay, mask=mask),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )
  elif cfg.name == "adafactor":
    # optax.adafactor adds its decay after the learning rate, so weight_decay=0.1 would shrink the
    # weights by 10% a step whatever the rate; scaling after it makes the decay lr * weight_decay,
    # as for AdamW (and PyTorch's and Hugging Face's Adafactor).
    core = optax.chain(
      optax.adafactor(None, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask),
      optax.scale_by_learning_rate(schedule, flip_sign=False),
    )
  else:
    raise ValueError(f"optimizer.name={cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if cfg.grad_clip_norm > 0:
    core = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
  if frozen is not None:
    core = optax.chain(core, freeze(frozen))
  if pruning is not None and pruning.method != "none":
    core = optax.chain(core, pruning_lib.prune(pruning, params))
  return core, schedule
