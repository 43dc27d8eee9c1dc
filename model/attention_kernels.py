"""Memory-efficient attention behind model.attention.attend.

Every function takes q [B, L, N, H], k and v [B, L, K, H] (N query heads share K key/value heads
in groups of G = N // K) and segment ids [B, L], and computes what model.attention's reference
`dot_product_attention` does: causal softmax attention within each segment, scale h**-0.5,
float32 softmax statistics, the output in q's dtype.

- blockwise: flash attention in pure JAX (any platform).
- splash: the Pallas TPU kernel (Pallas's interpreter elsewhere, for tests).
- cudnn: cuDNN's fused attention through jax.nn.dot_product_attention (NVIDIA GPUs).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from sharding import active_mesh_and_rules, logical_to_spec

# What the reference writes into masked scores. Finite: a row whose keys so far are all masked has
# running max MASKED and weighs them exp(0) instead of exp(-inf + inf) = NaN, and its first visible
# key wipes them (exp(MASKED - a real max) is exactly 0).
MASKED = -1e30


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_length(x, length: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


# ---------------------------------------------------------------------------------------------
# blockwise: flash attention in pure JAX.


def blockwise_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, block: int) -> jax.Array:
  """Online-softmax attention over blocks of `block` positions; never forms [L, L].

  The sequence is padded to a multiple of the block. Padded keys come after every real query, so
  causality alone hides them; padded query rows are sliced off (their cotangent is then zero).
  """
  b, l, n, h = q_BLNH.shape
  kv = k_BLKH.shape[2]
  groups = n // kv
  block = min(block, _round_up(l, 8))
  padded = _round_up(l, block)
  nb = padded // block
  # T blocks of C positions. Blocks lead so the loops index contiguous slices; the G query heads of
  # a group sit beside each other so one [G*C, H] x [H, C] product serves them all without
  # repeating K/V.
  q_TBKGCH = _pad_length(q_BLNH, padded).reshape(b, nb, block, kv, groups, h).transpose(1, 0, 3, 4, 2, 5)
  k_TBKCH = _pad_length(k_BLKH, padded).reshape(b, nb, block, kv, h).transpose(1, 0, 3, 2, 4)
  v_TBKCH = _pad_length(v_BLKH, padded).reshape(b, nb, block, kv, h).transpose(1, 0, 3, 2, 4)
  segment_ids_TBC = _pad_length(segment_ids_BL, padded).reshape(b, nb, block).transpose(1, 0, 2)
  out_TBKGCH = _flash(q_TBKGCH, k_TBKCH, v_TBKCH, segment_ids_TBC)
  out_BLNH = out_TBKGCH.transpose(1, 0, 4, 2, 3, 5).reshape(b, padded, n, h)
  return out_BLNH[:, :l]


def _block_scores(q_BKGCH, k_BKCH, seg_q_BC, seg_k_BC, i, j):
  """Masked, scaled float32 scores of query block i against key block j: [B, K, G, Cq, Ck]."""
  block = q_BKGCH.shape[3]
  scale = q_BKGCH.shape[-1] ** -0.5
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_BKGCH, k_BKCH, preferred_element_type=jnp.float32) * scale
  pos_q = i * block + jnp.arange(block)
  pos_k = j * block + jnp.arange(block)
  causal_CC = pos_q[:, None] >= pos_k[None, :]
  same_BCC = seg_q_BC[:, :, None] == seg_k_BC[:, None, :]
  return jnp.where(causal_CC & same_BCC[:, None, None], s, MASKED)


def _flash_forward(q, k, v, seg):
  """Output [T, B, K, G, C, H] and per-row logsumexp [T, B, K, G, C] (T blocks of C positions)."""
  nb = q.shape[0]

  def query_block(args):
    i, q_i, seg_i = args
    shape = q_i.shape[:-1]

    def key_block(j, carry):
      m, l, acc = carry
      s = _block_scores(q_i, k[j], seg_i, seg[j], i, j)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # Until a row meets its first visible key, m is MASKED and masked keys weigh exp(0) = 1;
      # that key makes alpha exactly 0 and wipes them. Every row meets one: its diagonal (padded
      # rows too, which are segment 0 like the padding keys).
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = alpha * l + p.sum(axis=-1)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
      return m_new, l, alpha[..., None] * acc + pv

    init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(q_i.shape, jnp.float32))
    # Causal: key blocks after query block i are all masked, so the loop stops at the diagonal.
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

  return jax.lax.map(query_block, (jnp.arange(nb), q, seg))


@jax.custom_vjp
def _flash(q, k, v, seg):
  return _flash_forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg):
  # Saves only the inputs, the output and the logsumexp: autodiff through the loops would save
  # every block's probabilities, O(L^2) again.
  out, lse = _flash_forward(q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(res, d_out):
  """FlashAttention-2's backward: key blocks outside, the query blocks that see them inside."""
  q, k, v, seg, out, lse = res
  nb = q.shape[0]
  # dsoftmax's row term: sum_s p * dp = sum_h out * d_out.
  delta = jnp.einsum("tbkgqh,tbkgqh->tbkgq", out.astype(jnp.float32), d_out.astype(jnp.float32))

  def key_block(dq, args):
    j, k_j, v_j, seg_j = args

    def query_block(i, carry):
      dk, dv, dq = carry
      q_i, do_i = q[i], d_out[i]
      s = _block_scores(q_i, k_j, seg[i], seg_j, i, j)
      p = jnp.exp(s - lse[i][..., None])
      dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None]) * (q.shape[-1] ** -0.5)).astype(q.dtype)
      dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=jnp.float32)
      return dk, dv, dq.at[i].add(dq_i)

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    # Causal: query blocks before key block j see none of it.
    dk, dv, dq = jax.lax.fori_loop(j, nb, query_block, (zeros, zeros, dq))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (jnp.arange(nb), k, v, seg))
  return dq.astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Kernels that run per device under shard_map.


def _per_shard(fn, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
  """fn on each device's batch rows and heads of the active mesh; fn itself without one.

  The kernels are opaque to XLA's partitioner, so each device is handed whole sequences: batch
  over act_batch's axes, query heads over act_heads', length and head_dim whole.
  """
  active = active_mesh_and_rules()
  if active is None:
    return fn(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
  mesh, rules = active
  batch, _, heads, _ = logical_to_spec(
    ("act_batch", "act_length", "act_heads", "act_head_dim"), rules, q_BLNH.shape, mesh
  )
  kv_heads = k_BLKH.shape[2]
  head_shards = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ()))
  # A device's query heads are a contiguous 1/head_shards of them, and their kv heads the same
  # fraction of the kv heads when head_shards divides those. Otherwise (2 kv heads on tensor=4)
  # each kv head is repeated just enough that it does, which keeps every query head's kv head
  # on its device and holds no more kv heads per device than replicating them would.
  repeats = head_shards // math.gcd(kv_heads, head_shards)
  if repeats > 1:
    k_BLKH, v_BLKH = jnp.repeat(k_BLKH, repeats, axis=2), jnp.repeat(v_BLKH, repeats, axis=2)
  spec = PartitionSpec(batch, None, heads, None)
  # check_vma=False: pallas_call's outputs carry no varying-axes annotation for the check to read.
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(batch)), out_specs=spec, check_vma=False
  )(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


# splash (Pallas, TPU). Its blocks tile the lanes of a TPU vector register: multiples of 128.
SPLASH_LANES = 128


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, length: int, block: int, interpret: bool):
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, block: int) -> jax.Array:
  """The splash kernel per device; in Pallas's interpreter off TPU (slow: tests only)."""
  interpret = platform_of_active_devices() != "tpu"

  def local(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    b, l, n, h = q_BLNH.shape
    size = min(_round_up(block, SPLASH_LANES), _round_up(l, SPLASH_LANES))
    padded = _round_up(l, size)
    kernel = _splash_kernel(n, padded, size, interpret)
    # The kernel does not scale. Padding goes in a segment of its own (-1): every padded row keeps
    # its diagonal, and real rows never see it (it comes after them).
    q_BNLH = _pad_length(q_BLNH * jnp.asarray(h**-0.5, q_BLNH.dtype), padded).transpose(0, 2, 1, 3)
    k_BKLH = _pad_length(k_BLKH, padded).transpose(0, 2, 1, 3)
    v_BKLH = _pad_length(v_BLKH, padded).transpose(0, 2, 1, 3)
    seg_BL = _pad_length(segment_ids_BL.astype(jnp.int32), padded, value=-1)
    # The kernel takes one sequence: N query heads [N, L, H] against K kv heads [K, L, H] (it maps
    # query head i to kv head i // G itself).
    out_BNLH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(
      q_BNLH, k_BKLH, v_BKLH, seg_BL
    )
    return out_BNLH.transpose(0, 2, 1, 3)[:, :l].astype(q_BLNH.dtype)

  return _per_shard(local, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


# cudnn (NVIDIA GPUs).


def cudnn_unsupported(q_BLNH) -> str | None:
  """Why cuDNN's fused attention cannot take this input, or None when it can."""
  h, length = q_BLNH.shape[-1], q_BLNH.shape[1]
  if q_BLNH.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 inputs, not {q_BLNH.dtype} (set model.dtype=bfloat16)"
  if h % 8 or h > 128:
    return f"it needs a head_dim that is a multiple of 8 and at most 128, not {h}"
  if length % 2:
    return f"with a mask it needs an even length in training, not {length}"
  return None


def cudnn_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, implementation: str = "cudnn") -> jax.Array:
  """jax.nn.dot_product_attention, causal, within segments; implementation="xla" runs the same call
  anywhere (the tests' CPU check of the layout and arguments).

  Packed segments need a materialised mask here: this jax's public API takes only per-row lengths
  (one document per row), so the same-segment mask goes in as [B, 1, L, L] booleans broadcast over
  heads, with the causal part left to is_causal. cuDNN turns it into an additive bias of that
  size and returns its gradient too, so with packed rows this saves time, not memory: where
  memory is the limit use blockwise.
  """

  def local(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    same_B1LL = (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
      q_BLNH,
      k_BLKH,
      v_BLKH,
      mask=same_B1LL,
      is_causal=True,
      scale=q_BLNH.shape[-1] ** -0.5,
      implementation=implementation,
    )

  return _per_shard(local, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


def platform_of_active_devices() -> str:
  """'tpu', 'gpu' (CUDA), 'rocm' or 'cpu': the active mesh's devices, else JAX's default backend."""
  active = active_mesh_and_rules()
  device = active[0].devices.flat[0] if active is not None else jax.devices()[0]
  if device.platform == "gpu" and "rocm" in getattr(device.client, "platform_version", "").lower():
    return "rocm"
  return device.platform
