"""Optax chains from the `optimizer` config: optimizer, schedule, clipping, decay mask."""
import jax
import jax.numpy as jnp
import optax


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
      raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not a known schedule")
    return jnp.where(step < warmup, peak * warmup_factor(step), decayed)

  return schedule


# Parameter names (model/) that are never decayed: norm scales and every bias.
NO_DECAY = frozenset({"scale", "bias", "bq", "bk", "bv", "bo", "b_up", "b_down"})
EMBEDDINGS = frozenset({"embed", "pos_embed"})


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the weights that are decayed: matrices, embeddings only if asked.

  Decided by name, not rank: stacked layers give a norm scale two dimensions.
  """

  def decays(path, _):
    names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    name = [n for n in names if n and n != "value"][-1]
    if name in NO_DECAY:
      return False
    if name in EMBEDDINGS:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg, num_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg, num_steps)
  mask = weight_decay_mask(params, cfg.decay_embeddings)
  if cfg.name == "adamw":
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=mask)
  elif cfg.name == "sgd":
    core = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                           weight_decay_mask=mask)
  else:
    raise ValueError(f"optimizer.name={cfg.name!r} is not a known optimizer")
  if cfg.grad_clip_norm > 0:
    core = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
  return core, schedule
