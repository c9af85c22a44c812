"""A small causal transformer language model in plain torch, for the demo and the tests.

Pre-norm blocks (LayerNorm, causal multi-head self-attention, GELU MLP), learned absolute
positions, tied input/output embeddings, no dropout (so the model is deterministic and a DPO
policy equals its reference at initialisation). Maps int64 ids ``(B, N)`` to logits
``(B, N, V)``, the contract of :class:`pairpack.dpo.DPO`. Right padding needs no attention mask:
the attention is causal, so real tokens never see later pads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyLM"]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Causal transformer LM: ids ``(B, N)`` int64 -> logits ``(B, N, vocab_size)`` float32.

    Args:
        vocab_size: number of token ids (259 for the built-in byte tokenizer).
        max_len: longest sequence accepted (positions).
        d_model: width; must be divisible by ``n_heads``.
        n_layers, n_heads: depth and attention heads.
    """

    def __init__(self, vocab_size: int, *, max_len: int = 512, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2 style: scale residual projections by depth
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}")
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.tok.weight.T  # tied output embedding
