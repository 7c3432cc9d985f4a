"""The attention head of the paper's released code (``AttentionFusion`` + ``AttentionHead``).

Shape, as in ``ssl_diff/attention_fusion.py`` / ``attention_head.py`` of
soumik-kanad/diffssl: LayerNorm over the whole ``C×k×k`` map, a 1×1 convolution
to ``dim`` channels, the ``k²`` positions as tokens (no positional embedding), a
learnable CLS token initialised to zero in front, ``depth`` pre-LayerNorm ViT
blocks (``heads`` heads, MLP ratio 4, GELU, no qkv bias, no dropout), and a
linear classifier on the CLS token. The paper used dim 1024, 8 heads, 1–5 blocks
on an 8×8 token grid; its ``attention.sh`` used 2 blocks on 16×16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffeat.errors import DiffeatError


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (ViT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionHead(nn.Module):
    """LayerNorm + 1×1 projection, CLS token, ``depth`` transformer blocks, linear on CLS.

    Args:
        feature_shape: ``(C, k, k)``; any ``k >= 1`` (k = 1 gives one token besides CLS).
        num_classes: number of outputs.
        dim: token width after the 1×1 projection (paper: 1024).
        depth: number of transformer blocks (paper: 1–5; released script: 2).
        heads: attention heads; must divide ``dim``.
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, *, dim: int = 1024, depth: int = 2,
                 heads: int = 8):
        super().__init__()
        if len(feature_shape) != 3:
            raise DiffeatError(f"the attention head needs C×k×k maps, not features of shape {tuple(feature_shape)}")
        if dim < 1 or depth < 1 or heads < 1 or dim % heads:
            raise DiffeatError(f"attention dim must be a positive multiple of heads and depth >= 1 "
                               f"(got dim={dim}, heads={heads}, depth={depth})")
        self.config = {"dim": int(dim), "depth": int(depth), "heads": int(heads)}
        c = feature_shape[0]
        self.norm = nn.LayerNorm(list(feature_shape))
        self.proj = nn.Conv2d(c, dim, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.norm(x)).flatten(2).transpose(1, 2)  # (B, k², dim)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.fc(self.blocks(tokens)[:, 0])
