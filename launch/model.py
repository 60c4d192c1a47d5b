"""A small byte-level GPT: token and position embeddings, pre-LN causal self-attention blocks with a
4× GELU MLP, a final LayerNorm, and an output head ``lm_head`` tied to the token embedding ``wte``.

Linear layers carry no bias. Weights start at N(0, 0.02); the two residual projections of each block
(``attn.proj``, ``mlp.proj``) at N(0, 0.02/√(2·depth)).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    depth: int = 4
    width: int = 128
    heads: int = 4
    seq_len: int = 128
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name in ("depth", "width", "heads", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")


class CausalSelfAttention(nn.Module):
    """``qkv`` rows are laid out ``(3, heads, head_dim)``: all queries, then all keys, then all values.

    Tensor parallelism (``launch.train.parallelize``) needs each rank's contiguous block of ``qkv``
    rows to hold whole heads; it permutes the rows to the head-major layout ``(heads, 3, head_dim)``
    (``head_major = True``) and sets ``heads`` to the heads of one rank. The module computes the
    same function either way.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads  # the heads this module computes (the local heads under tensor parallelism)
        self.head_dim = cfg.width // cfg.heads
        self.head_major = False
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def head_major_order(self) -> Tensor:
        """Row permutation of ``qkv`` from ``(3, heads, head_dim)`` to ``(heads, 3, head_dim)`` (all heads)."""
        return torch.arange(self.qkv.weight.shape[0]).view(3, -1, self.head_dim).transpose(0, 1).flatten()

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        if self.head_major:
            q, k, v = qkv.view(b, t, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        else:
            q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.proj = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx)``: logits ``(B, T, vocab_size)`` for int64 tokens ``idx`` ``(B, T)``, T ≤ seq_len."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def num_params(self) -> int:
        """Trainable elements, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.cfg.seq_len}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
