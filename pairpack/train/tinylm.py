"""A small causal transformer language model in plain torch, for the demo and the tests.

Pre-norm blocks (LayerNorm, causal multi-head self-attention, GELU MLP), learned absolute
positions, tied input/output embeddings, no dropout (so the model is deterministic and a DPO
policy equals its reference at initialisation). Maps int64 ids ``(B, N)`` to logits
``(B, N, V)``, the contract of :class:`pairpack.dpo.DPO`. Right padding needs no attention mask:
the attention is causal, so real tokens never see later pads.

It also takes the inputs of the ``packed`` and ``prefix_shared`` layouts (docs/layouts.md):
``positions`` (per-token position ids) and ``attn_mask``: a dense bool mask ``(R, 1, T, T)``
(True = may attend; SDPA on any device), a :class:`~pairpack.batch.attention.SplitAttention`
(the rule as small dense attentions, any device; the default) or a FlexAttention ``BlockMask``
(CUDA). Its ``pairpack_layouts`` and ``pairpack_attention`` attributes tell
:mod:`pairpack.train.models` so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError

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

    def forward(self, x: Tensor, attn_mask: Any = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(self.ln1(x)).view(b, n, 3, self.n_heads, d // self.n_heads)
                   .unbind(2))
        if attn_mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(attn_mask, Tensor):
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif hasattr(attn_mask, "attend"):  # pairpack's SplitAttention: the rule by parts
            a = attn_mask.attend(q, k, v)
        else:  # a FlexAttention BlockMask
            a = _flex_attention(q.device)(q, k, v, block_mask=attn_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


_FLEX: dict[str, Any] = {}


def _flex_attention(device: torch.device) -> Any:
    """FlexAttention, compiled on CUDA (the eager version materialises the scores: only for checks)."""
    if device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device.type] = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return _FLEX[device.type]


class TinyLM(nn.Module):
    """Causal transformer LM: ids ``(B, N)`` int64 -> logits ``(B, N, vocab_size)`` float32.

    Args:
        vocab_size: number of token ids (259 for the built-in byte tokenizer).
        max_len: longest sequence accepted (positions).
        d_model: width; must be divisible by ``n_heads``.
        n_layers: depth (transformer blocks).
        n_heads: attention heads.
    """

    #: the batch layouts it takes (pairpack.train.models calls it with positions and a mask)
    pairpack_layouts: tuple[str, ...] = ("padded", "packed", "prefix_shared")
    #: the attention inputs it takes for them (models.layout_logits picks "split" for "auto")
    pairpack_attention: tuple[str, ...] = ("dense", "flex", "split")

    def __init__(self, vocab_size: int, *, max_len: int = 512, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ArgumentError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
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

    def forward(self, ids: Tensor, positions: Tensor | None = None, attn_mask: Any = None) -> Tensor:
        """Logits ``(R, T, V)`` of ids ``(R, T)`` int64.

        Args:
            positions: int64 ``(R, T)`` position of each token (default ``0..T-1`` in every row).
            attn_mask: None (causal attention), a bool ``(R, 1, T, T)`` tensor (True = query may
                attend key; it must already be causal, and every query row needs one True), a
                ``SplitAttention`` (anything with ``attend(q, k, v)``), or a FlexAttention ``BlockMask``.
        """
        n = ids.shape[1]
        if positions is None:
            if n > self.max_len:
                raise ArgumentError(f"sequence length {n} exceeds max_len {self.max_len}")
            pos = self.pos(torch.arange(n, device=ids.device))
        else:
            # checked on the CPU only: on a GPU the check would wait for the device every call
            top = int(positions.max()) if positions.numel() and positions.device.type == "cpu" else 0
            if top >= self.max_len:
                raise ArgumentError(f"position {top} exceeds max_len {self.max_len} - 1")
            pos = self.pos(positions)
        x = self.tok(ids) + pos
        for blk in self.blocks:
            x = blk(x, attn_mask)
        return self.ln_f(x) @ self.tok.weight.T  # tied output embedding
