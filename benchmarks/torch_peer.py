"""PyTorch peer for the loom benchmark: nanoGPT's model + training step.

A from-scratch re-implementation of Karpathy's nanoGPT ``model.py`` (as used by
the "baby GPT" shakespeare_char config) and of its training-loop step
(AdamW with decay / no-decay param groups, warmup + cosine ``get_lr``, grad
clipping), in float32, without dropout.

The benchmark drives it with the same numpy batches it feeds the JAX model:

    peer = TorchPeer(vocab_size=65, n_layer=6, n_head=6, n_embd=384, block_size=256)
    loss = peer.train_step(x, y)          # x, y: (B, T) int arrays
    val = peer.eval_loss([(x, y), ...])
    peer.flops_per_token()                # nanoGPT's estimate_mfu numerator
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# --------------------------------------------------------------------------- model


class LayerNorm(nn.Module):
  """LayerNorm with an optional bias (nanoGPT's; PyTorch's once lacked bias=False)."""

  def __init__(self, ndim: int, bias: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))
    self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
  def __init__(self, n_embd: int, n_head: int, bias: bool):
    super().__init__()
    assert n_embd % n_head == 0
    self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
    self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
    self.n_head = n_head
    self.n_embd = n_embd

  def forward(self, x):
    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return self.c_proj(y)


class MLP(nn.Module):
  def __init__(self, n_embd: int, bias: bool):
    super().__init__()
    self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
    self.gelu = nn.GELU()  # exact (erf) GELU, as nanoGPT
    self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

  def forward(self, x):
    return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
  def __init__(self, n_embd: int, n_head: int, bias: bool):
    super().__init__()
    self.ln_1 = LayerNorm(n_embd, bias=bias)
    self.attn = CausalSelfAttention(n_embd, n_head, bias)
    self.ln_2 = LayerNorm(n_embd, bias=bias)
    self.mlp = MLP(n_embd, bias)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    x = x + self.mlp(self.ln_2(x))
    return x


class GPT(nn.Module):
  def __init__(self, *, vocab_size, n_layer, n_head, n_embd, block_size, bias, generator=None):
    super().__init__()
    self.block_size = block_size
    self.n_layer = n_layer
    self.transformer = nn.ModuleDict(
      dict(
        wte=nn.Embedding(vocab_size, n_embd),
        wpe=nn.Embedding(block_size, n_embd),
        h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
        ln_f=LayerNorm(n_embd, bias=bias),
      )
    )
    self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # weight tying

    self._gen = generator
    self.apply(self._init_weights)
    # scaled init of the residual projections (GPT-2 paper)
    for pn, p in self.named_parameters():
      if pn.endswith("c_proj.weight"):
        torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer), generator=self._gen)
    del self._gen

  def _init_weights(self, module):
    if isinstance(module, nn.Linear):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=self._gen)
      if module.bias is not None:
        torch.nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=self._gen)

  def get_num_params(self, non_embedding: bool = True) -> int:
    n = sum(p.numel() for p in self.parameters())
    if non_embedding:
      n -= self.transformer.wpe.weight.numel()
    return n

  def forward(self, idx, targets=None):
    b, t = idx.size()
    assert t <= self.block_size, f"sequence length {t} > block_size {self.block_size}"
    pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
    x = self.transformer.wte(idx) + self.transformer.wpe(pos)
    for block in self.transformer.h:
      x = block(x)
    x = self.transformer.ln_f(x)
    logits = self.lm_head(x)
    loss = None
    if targets is not None:
      loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    return logits, loss


def configure_optimizers(model, weight_decay, learning_rate, betas):
  """nanoGPT: decay every param with dim >= 2 (matmul weights, embeddings), not the rest."""
  param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad}
  decay_params = [p for p in param_dict.values() if p.dim() >= 2]
  nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
  groups = [
    {"params": decay_params, "weight_decay": weight_decay},
    {"params": nodecay_params, "weight_decay": 0.0},
  ]
  # nanoGPT only uses fused=True on CUDA; this peer runs on CPU.
  return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def get_lr(it, *, learning_rate, min_lr, warmup_iters, lr_decay_iters):
  """nanoGPT's train.py get_lr, verbatim semantics."""
  if it < warmup_iters:
    return learning_rate * (it + 1) / (warmup_iters + 1)
  if it > lr_decay_iters:
    return min_lr
  decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  assert 0 <= decay_ratio <= 1
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return min_lr + coeff * (learning_rate - min_lr)


# --------------------------------------------------------------------------- peer


class TorchPeer:
  def __init__(
    self,
    *,
    vocab_size,
    n_layer,
    n_head,
    n_embd,
    block_size,
    bias=False,
    learning_rate=1e-3,
    min_lr=1e-4,
    warmup_iters=100,
    lr_decay_iters=2000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
    seed=0,
    num_threads=None,
  ):
    if num_threads is not None:
      torch.set_num_threads(int(num_threads))
    self.device = torch.device("cpu")
    self.n_layer, self.n_head, self.n_embd, self.block_size = n_layer, n_head, n_embd, block_size
    self.learning_rate, self.min_lr = learning_rate, min_lr
    self.warmup_iters, self.lr_decay_iters = warmup_iters, lr_decay_iters
    self.grad_clip = grad_clip

    gen = torch.Generator().manual_seed(seed)
    self.model = GPT(
      vocab_size=vocab_size,
      n_layer=n_layer,
      n_head=n_head,
      n_embd=n_embd,
      block_size=block_size,
      bias=bias,
      generator=gen,
    ).to(self.device, dtype=torch.float32)
    self.optimizer = configure_optimizers(self.model, weight_decay, learning_rate, (beta1, beta2))
    self.num_params = self.model.get_num_params()
    self.iter = 0

  def _tensor(self, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)

  def lr_at(self, it: int) -> float:
    return get_lr(
      it,
      learning_rate=self.learning_rate,
      min_lr=self.min_lr,
      warmup_iters=self.warmup_iters,
      lr_decay_iters=self.lr_decay_iters,
    )

  def train_step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
    """One optimizer step at self.iter; returns the (pre-update) loss. Synchronous."""
    lr = self.lr_at(self.iter)
    for g in self.optimizer.param_groups:
      g["lr"] = lr
    self.model.train()
    x, y = self._tensor(inputs), self._tensor(targets)
    _, loss = self.model(x, y)
    loss.backward()
    if self.grad_clip != 0.0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.iter += 1
    return float(loss.item())  # .item() blocks until the step's work is done

  @torch.no_grad()
  def eval_loss(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean cross-entropy over every target token of `batches` (a short last batch
    counts by its tokens, not as a whole batch); targets of -1 are padding."""
    self.model.eval()
    losses, tokens = [], []
    for inputs, targets in batches:
      _, loss = self.model(self._tensor(inputs), self._tensor(targets))
      losses.append(loss.item())
      tokens.append(int((targets >= 0).sum()))
    self.model.train()
    if not losses:
      raise ValueError("eval_loss got no batches")
    return float(np.average(losses, weights=tokens))

  @torch.no_grad()
  def row_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Mean cross-entropy of each row (window) of one batch; targets of -1 are padding."""
    self.model.eval()
    logits, _ = self.model(self._tensor(inputs))
    losses = F.cross_entropy(logits.transpose(1, 2), self._tensor(targets), reduction="none", ignore_index=-1)
    self.model.train()
    return (losses.sum(dim=1) / (self._tensor(targets) >= 0).sum(dim=1)).numpy()

  def flops_per_token(self) -> float:
    """nanoGPT estimate_mfu: 6N + 12*L*H*Q*T (T = block_size), per token, fwd+bwd."""
    N, L, H = self.num_params, self.n_layer, self.n_head
    Q, T = self.n_embd // self.n_head, self.block_size
    return float(6 * N + 12 * L * H * Q * T)


# --------------------------------------------------------------------------- smoke run


if __name__ == "__main__":
  import time

  vocab, B, T, steps = 65, 12, 64, 60
  peer = TorchPeer(vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, block_size=T)
  rng = np.random.default_rng(0)
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
  print(f"num_params {peer.num_params} ({peer.num_params / 1e6:.2f}M), flops/token {peer.flops_per_token():.4g}")
  times, losses = [], []
  for _ in range(steps):
    x = rng.integers(0, vocab, size=(B, T))
    y = rng.integers(0, vocab, size=(B, T))
    t0 = time.perf_counter()
    losses.append(peer.train_step(x, y))
    times.append(time.perf_counter() - t0)
  ms = float(np.median(times[-50:])) * 1e3
  print(f"loss step0 {losses[0]:.4f} (ln {vocab} = {math.log(vocab):.4f}), step{steps - 1} {losses[-1]:.4f}")
  print(f"median {ms:.2f} ms/step over last 50, {B * T / (ms / 1e3):.0f} tokens/s")
  evb = [(rng.integers(0, vocab, size=(B, T)), rng.integers(0, vocab, size=(B, T))) for _ in range(4)]
  print(f"eval_loss {peer.eval_loss(evb):.4f}")


def peer_for(config, num_steps: int) -> TorchPeer:
  """The peer with a loom config's model shapes and nanoGPT's optimizer settings from the same config."""
  m, o = config.model, config.optimizer
  return TorchPeer(
    vocab_size=m.vocab_size,
    n_layer=m.num_layers,
    n_head=m.num_heads,
    n_embd=m.embed_dim,
    block_size=config.data.seq_len,
    bias=m.use_bias,
    learning_rate=o.learning_rate,
    min_lr=o.learning_rate * o.min_lr_ratio,
    warmup_iters=o.warmup_steps,
    lr_decay_iters=num_steps,
    weight_decay=o.weight_decay,
    beta1=o.b1,
    beta2=o.b2,
    grad_clip=o.grad_clip_norm,
    seed=config.seed,
  )
