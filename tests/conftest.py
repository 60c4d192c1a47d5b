"""Shared fixtures: a small GPT-like model with a tied embedding, and fixed gradients."""

import pytest
import torch
from torch import nn

# assert_close imports heavy modules lazily on first use (~1.4 s): pay that once here, not in every forked rank
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-LN blocks of qkv/proj/fc/fc2, a head tied to the embedding."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln=nn.LayerNorm(width),
                    qkv=nn.Linear(width, 3 * width),
                    proj=nn.Linear(width, width, bias=False),
                    fc=nn.Linear(width, 4 * width),
                    fc2=nn.Linear(4 * width, width, bias=False),
                )
            )
            for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln"](h)).chunk(3, dim=-1)
            att = torch.softmax((q @ k.mT) / q.shape[-1] ** 0.5 + torch.full((h.shape[1],) * 2, -1e9).triu(1), -1)
            h = h + b["proj"](att @ v)
            h = h + b["fc2"](torch.nn.functional.gelu(b["fc"](h)))
        return self.lm_head(self.ln_f(h))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return TinyGPT()


def fixed_grads(params, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
