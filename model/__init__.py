"""Decoder-only transformer (Flax NNX) that knows logical axis names and nothing of data or training."""
from model.flops import flops_per_token, num_params
from model.transformer import Transformer

__all__ = ["Transformer", "flops_per_token", "num_params"]
