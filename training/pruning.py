"""Magnitude pruning of the matmul kernels: one-shot or gradual on Zhu & Gupta's cubic schedule.

The masks are the state of an optax GradientTransformation (`prune`), chained last in
training/optimizer.build_optimizer: they are checkpointed, restored and resharded with the rest of the
optimizer state, each sharded like its kernel (training/state.state_shardings matches an optimizer
leaf to the parameter with its path suffix and shape), and its own step counter continues the
schedule in a resumed run. Its updates make `params + updates` exactly zero wherever a mask is 0, so a
pruned weight stays zero through training; at a mask-update step the masks are recomputed from the
magnitudes of the updated weights, and a mask only ever removes weights.

Structures: "unstructured" prunes the smallest magnitudes, exactly round(sparsity * n) of them per
layer slice of each kernel (scope "layer") or over all pruned weights together (scope "global"); "2:4"
zeroes the 2 smallest of every 4 consecutive weights along a kernel's input (contracted) axes, per
output column, the sparsity pattern sparse tensor cores run. Ties are broken by position (the earlier
weight is pruned first), so the masks are a function of the weights alone.
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import quantization

# pruning.method's values: none, or magnitude pruning (validation reads these lists).
METHODS = ("none", "magnitude")
# pruning.structure's values: any weight, or 2 of every 4 along the input axes (NVIDIA's 2:4).
STRUCTURES = ("unstructured", "2:4")
# pruning.scope's values (unstructured): a threshold per layer slice of each kernel, or one over all.
SCOPES = ("layer", "global")
# The block matmul kernels: pruning.targets' default.
DEFAULT_TARGETS = "blocks/(attn/(wq|wk|wv|wo)|mlp/(w_up|w_gate|w_down))"

# The kernels that can be pruned, and how many of their leading axes (after the layers axis of a
# stacked block kernel) are the input axes the matmul contracts: attn/wq, wk, wv [D, N, H] and
# mlp/w_up, w_gate [D, F] contract D; attn/wo [N, H, D] contracts N and H; mlp/w_down [F, D] contracts
# F; the untied output head [D, V] contracts D. Embeddings, norms and biases are never pruned.
KERNEL_INPUT_AXES = {
  **{
    f"blocks/{module}/{name}": quantization.KERNEL_INPUT_AXES[name]
    for module, names in quantization.KERNEL_MODULES.items()
    for name in names
  },
  "head": 1,
}

# 2:4: GROUP consecutive input weights, of which round(sparsity * GROUP) (2 at sparsity 0.5) are zero.
GROUP = 4


def _path_name(path) -> str:
  """'blocks/attn/wq' for the key path of a parameter (or of its Variable's value)."""
  names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
  return "/".join(n for n in names if n and n != "value")


def _stacked(name: str) -> bool:
  """Block kernels carry a leading layers axis; the head does not."""
  return name.startswith("blocks/")


def model_kernel_paths(model_cfg) -> list[str]:
  """The prunable kernels a model of `model_cfg` (config.model) has: w_gate only with SwiGLU, the head
  only when untied."""
  paths = [p for p in KERNEL_INPUT_AXES if p != "head" and (p != "blocks/mlp/w_gate" or model_cfg.mlp == "swiglu")]
  return paths + ([] if model_cfg.tie_embeddings else ["head"])


def kernel_input_size(name: str, model_cfg) -> int:
  """The size of kernel `name`'s input (contracted) axes, flattened, in a model of `model_cfg`."""
  if name == "blocks/attn/wo":
    return model_cfg.num_heads * model_cfg.head_dim
  if name == "blocks/mlp/w_down":
    return model_cfg.mlp_dim
  return model_cfg.embed_dim


def match_targets(targets: str, paths) -> list[str]:
  """The prunable kernels among `paths` whose whole path `targets` (a regex) matches; a ValueError
  naming config.pruning.targets when it is no regex or matches none of them (embeddings, norms and
  biases are never pruned)."""
  kernels = [p for p in paths if p in KERNEL_INPUT_AXES]
  return quantization.select_kernel_paths(kernels, targets, "config.pruning.targets")


def check_config(cfg, model_cfg, num_steps: int) -> None:
  """One ValueError naming the first bad config.pruning field (`cfg`: config.pruning; `model_cfg`:
  config.model with head_dim filled in). The model-dependent checks run only when pruning is on."""

  def fail(field, what, allowed):
    raise ValueError(f"config.pruning.{field}={cfg[field]!r}: {what}; allowed: {allowed}")

  for field, choices in (("method", METHODS), ("structure", STRUCTURES), ("scope", SCOPES)):
    if cfg[field] not in choices:
      fail(field, "not a known value", ", ".join(choices))
  if not 0.0 <= cfg.sparsity < 1.0:
    fail("sparsity", "not a fraction of zeros below 1", "[0, 1)")
  if cfg.structure == "2:4" and cfg.sparsity != 0.5:
    fail("sparsity", "structure 2:4 zeroes 2 of every 4 weights", "0.5 with structure=2:4")
  if cfg.begin_step < 0:
    fail("begin_step", "negative", ">= 0")
  if cfg.end_step < cfg.begin_step:
    fail("end_step", f"before begin_step={cfg.begin_step}", ">= begin_step (equal: one-shot pruning at begin_step)")
  if cfg.every < 1:
    fail("every", "not a number of steps between mask updates", ">= 1")
  if cfg.method == "none":
    return
  if cfg.end_step >= num_steps:
    fail("end_step", f"the run (train.num_steps={num_steps}) ends before the masks reach the sparsity", "< num_steps")
  matched = match_targets(cfg.targets, model_kernel_paths(model_cfg))
  if cfg.structure == "2:4":
    for name in matched:
      size = kernel_input_size(name, model_cfg)
      if size % GROUP:
        fail(
          "structure",
          f"{name}'s input axes hold {size} weights per output, not groups of {GROUP}",
          f"unstructured, or targets without {name}",
        )


def _fields(cfg: Any, **overrides) -> dict[str, Any]:
  """config.pruning's fields as a dict: a ConfigDict or mapping of some of them, the rest defaults."""
  fields = dict(
    method="magnitude",
    structure="unstructured",
    scope="layer",
    sparsity=0.5,
    begin_step=0,
    end_step=0,
    every=100,
    targets=DEFAULT_TARGETS,
  )
  if cfg is not None:
    fields.update(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  fields.update(overrides)
  return fields


def scheduled_sparsity(cfg, step: int) -> float:
  """Zhu & Gupta's cubic schedule: 0 before pruning.begin_step t0, then s_f * (1 - (1 - (t - t0) /
  (t1 - t0))^3) to pruning.sparsity s_f at pruning.end_step t1, and s_f after (end_step == begin_step:
  s_f from begin_step on). The masks follow it at mask_update_steps alone."""
  s_f, t0, t1 = cfg["sparsity"], cfg["begin_step"], cfg["end_step"]
  if step < t0:
    return 0.0
  if step >= t1:
    return float(s_f)
  return s_f * (1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3)


def mask_update_steps(cfg) -> list[int]:
  """The steps whose update recomputes the masks: begin_step, every `every` steps after it, and
  end_step. Step t is the update made from state.step == t, as the learning-rate schedule counts."""
  t0, t1 = cfg["begin_step"], cfg["end_step"]
  return sorted(set(range(t0, t1, cfg["every"])) | {t1})


def num_pruned(sparsity: float, n: int) -> int:
  """How many of n weights a sparsity zeroes: round(sparsity * n), computed in float64 (Python's round:
  halves go to the even count)."""
  return int(round(sparsity * n))


def _ranks(score, axis: int):
  """Each element's place in ascending order along `axis`, ties in order of position."""
  order = jnp.argsort(score, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)  # The inverse permutation: no ties left.


def _view_shape(shape, name: str) -> tuple[int, int, int]:
  """A kernel's shape as [slices, inputs, outputs]: one slice per layer of a stacked kernel, one for
  the head; its input (contracted) axes flattened, and its output axes."""
  slices, shape = (shape[0], shape[1:]) if _stacked(name) else (1, shape)
  axes = KERNEL_INPUT_AXES[name]
  return slices, math.prod(shape[:axes]), math.prod(shape[axes:])


def _view(x, name: str):
  return x.reshape(_view_shape(x.shape, name))


def _new_masks(weights: dict, old: dict, counts: dict, structure: str, scope: str) -> dict:
  """Masks (True: kept) that also drop the `counts` smallest magnitudes of `weights`, within `old`.

  `counts` holds, per kernel name, the zeros wanted per layer slice (unstructured, scope layer) or per
  group of GROUP (2:4), and under "global" the zeros wanted over all kernels together. The weights `old`
  already drops score below every other, so they count towards those zeros and stay dropped.
  """
  scores = {
    name: jnp.where(old[name], jnp.abs(w).astype(jnp.float32), -1.0) for name, w in weights.items()
  }  # Magnitudes are >= 0: -1 sorts the pruned weights first.
  if structure == "2:4":
    keep = {}
    for name, score in scores.items():
      slices, inputs, outputs = _view(score, name).shape
      grouped = _view(score, name).reshape(slices, inputs // GROUP, GROUP, outputs)
      keep[name] = (_ranks(grouped, axis=2) >= counts[name]).reshape(score.shape)
  elif scope == "layer":
    keep = {}
    for name, score in scores.items():
      flat = _view(score, name).reshape(_view(score, name).shape[0], -1)
      keep[name] = (_ranks(flat, axis=1) >= counts[name]).reshape(score.shape)
  else:
    names = list(scores)
    ranks = _ranks(jnp.concatenate([scores[n].reshape(-1) for n in names]), axis=0)
    offsets = np.cumsum([0] + [scores[n].size for n in names])
    keep = {
      n: (ranks[offsets[i] : offsets[i + 1]] >= counts["global"]).reshape(scores[n].shape) for i, n in enumerate(names)
    }
  return {name: keep[name] & old[name] for name in weights}


def _counts(cfg: Mapping[str, Any], shapes: dict, sparsity: float) -> dict:
  """The zero counts `_new_masks` takes for `sparsity` over kernels of `shapes` (name -> shape)."""
  if cfg["structure"] == "2:4":
    return {name: num_pruned(sparsity, GROUP) for name in shapes}
  if cfg["scope"] == "global":
    return {"global": num_pruned(sparsity, sum(math.prod(shape) for shape in shapes.values()))}
  return {
    name: num_pruned(sparsity, math.prod(shape[1:] if _stacked(name) else shape)) for name, shape in shapes.items()
  }


def _targets(cfg, params) -> list[str]:
  """The targeted kernels among `params`, checked: 2:4 needs input axes a multiple of GROUP."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [_path_name(path) for path, _ in flat]
  names = match_targets(cfg["targets"], paths)
  if cfg["structure"] == "2:4":
    for path, leaf in flat:
      name = _path_name(path)
      if name in names and _view_shape(leaf.shape, name)[1] % GROUP:
        raise ValueError(
          f"config.pruning.structure='2:4': {name} {tuple(leaf.shape)} has input axes not a multiple of {GROUP}"
        )
  return names


class PruneState(NamedTuple):
  """`count`: the updates made (state.step, unless the optimizer state was started afresh from a
  checkpoint's parameters); `masks`: a bool mask (True: kept) per targeted kernel, in the parameters'
  tree with optax.MaskedNode at every other parameter."""

  count: jax.Array
  masks: Any


def prune(cfg, params) -> optax.GradientTransformation:
  """Magnitude pruning as the last transformation of an optimizer chain (`cfg`: config.pruning;
  `params`: the parameters or their shapes, for paths and shapes alone).

  Its update needs `params`: it returns updates with params + updates zero wherever a mask is 0, and
  at a mask-update step (mask_update_steps) first drops the smallest magnitudes of params + updates
  to the scheduled sparsity. Mask counts are tabled per update step in float64, so they are exact.
  """
  cfg = _fields(cfg)
  names = set(_targets(cfg, params))
  shapes = {
    _path_name(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if _path_name(path) in names
  }
  steps = mask_update_steps(cfg)
  per_step = [_counts(cfg, shapes, scheduled_sparsity(cfg, t)) for t in steps]
  tables = {key: np.asarray([c[key] for c in per_step], np.int32) for key in per_step[0]}
  steps_U = np.asarray(steps, np.int32)
  structure, scope = cfg["structure"], cfg["scope"]

  def init(params):
    def mask(path, leaf):
      return jnp.ones(leaf.shape, jnp.bool_) if _path_name(path) in names else optax.MaskedNode()

    return PruneState(count=jnp.zeros((), jnp.int32), masks=jax.tree_util.tree_map_with_path(mask, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("training.pruning.prune: its update needs the parameters (tx.update(grads, state, params))")
    flat_updates, treedef = jax.tree_util.tree_flatten_with_path(updates)
    flat_params = jax.tree.leaves(params)
    order = [_path_name(path) for path, _ in flat_updates]
    mask_leaves, mask_def = jax.tree.flatten(state.masks)
    old = dict(zip([n for n in order if n in names], mask_leaves, strict=True))
    by_name = {n: (u, p) for n, (_, u), p in zip(order, flat_updates, flat_params, strict=True)}

    index = jnp.minimum(jnp.searchsorted(steps_U, state.count), len(steps) - 1)

    def recompute(old):
      weights = {n: optax.apply_updates(by_name[n][1], by_name[n][0]) for n in old}
      counts = {key: jnp.asarray(table)[index] for key, table in tables.items()}
      return _new_masks(weights, old, counts, structure, scope)

    # The sort of a mask update runs only at its steps: a cond, not a select of both branches.
    masks = jax.lax.cond(jnp.asarray(steps_U)[index] == state.count, recompute, lambda m: m, old)
    new_updates = [
      jnp.where(masks[n], u, -p).astype(u.dtype) if n in names else u
      for n, (_, u), p in zip(order, flat_updates, flat_params, strict=True)
    ]
    new_state = PruneState(
      count=optax.safe_increment(state.count),
      masks=jax.tree.unflatten(mask_def, [masks[n] for n in order if n in names]),
    )
    return jax.tree.unflatten(treedef, new_updates), new_state

  return optax.GradientTransformation(init, update)


def _apply(params, masks: dict):
  """`params` with zeros wherever the mask of their kernel (by path name) is False."""

  def zero(path, leaf):
    name = _path_name(path)
    return jnp.where(masks[name], leaf, jnp.zeros((), leaf.dtype)) if name in masks else leaf

  return jax.tree_util.tree_map_with_path(zero, params)


def prune_params(params, cfg=None, **fields):
  """`params` pruned once to pruning.sparsity (no training; e.g. to evaluate a pruned model): the
  same tree with the targeted kernels' smallest magnitudes zeroed as a run's last mask update would.
  `cfg`: config.pruning (or a mapping of some of its fields, the rest defaults); `fields` override it;
  method and the schedule's steps are ignored."""
  cfg = _fields(cfg, **fields)
  for field, allowed in (("structure", STRUCTURES), ("scope", SCOPES)):
    if cfg[field] not in allowed:
      raise ValueError(f"config.pruning.{field}={cfg[field]!r}: not a known value; allowed: {', '.join(allowed)}")
  if not 0.0 <= cfg["sparsity"] < 1.0 or (cfg["structure"] == "2:4" and cfg["sparsity"] != 0.5):
    raise ValueError(f"config.pruning.sparsity={cfg['sparsity']}: allowed: [0, 1) unstructured, 0.5 with structure 2:4")
  names = set(_targets(cfg, params))
  weights = {
    _path_name(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if _path_name(path) in names
  }
  counts = _counts(cfg, {n: w.shape for n, w in weights.items()}, float(cfg["sparsity"]))
  old = {n: jnp.ones(w.shape, jnp.bool_) for n, w in weights.items()}
  masks = jax.jit(_new_masks, static_argnums=(3, 4))(weights, old, counts, cfg["structure"], cfg["scope"])
  return _apply(params, masks)


def _kernels(params, targets: str | None) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [_path_name(path) for path, _ in flat]
  names = set(match_targets(targets, paths) if targets else (p for p in paths if p in KERNEL_INPUT_AXES))
  return {_path_name(path): leaf for path, leaf in flat if _path_name(path) in names}


def overall_sparsity(params, targets: str | None = None) -> jax.Array:
  """The fraction of zeros over the kernels `targets` matches (default: every prunable kernel), as a
  float32 scalar: traceable, for a train step's metrics."""
  kernels = _kernels(params, targets)
  zeros = sum(jnp.sum(w == 0, dtype=jnp.float32) for w in kernels.values())
  return zeros / sum(w.size for w in kernels.values())


def sparsity_report(params, targets: str | None = None) -> dict[str, float]:
  """The fraction of zeros of each kernel `targets` matches (default: every prunable kernel) by path,
  and over them all ("overall")."""
  kernels = _kernels(params, targets)
  zeros = {name: int(jax.device_get(jnp.sum(w == 0))) for name, w in kernels.items()}
  report = {name: zeros[name] / kernels[name].size for name in kernels}
  report["overall"] = sum(zeros.values()) / sum(w.size for w in kernels.values())
  return report
